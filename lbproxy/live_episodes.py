"""Episodes of live training: windows of `episode_decisions` routed decisions, measured with the same
WindowStats as the simulator's episodes (lbproxy/observe/metrics.py).

The dqn policy feeds the tracker every decision and every outcome (lbproxy/policies/dqn.py); the live
trainer (lbproxy/train/live.py) consumes the completed windows, one per episode (train/report.py).
"""

from __future__ import annotations

from collections.abc import Callable

from lbproxy.observe import ClusterView, Outcome, WindowStats, is_accurate


class EpisodeTracker:
    """Per-episode quality window for live training.

    Outcomes are counted in the window open when they complete (live requests straddle episodes).
    """

    def __init__(self, n: int, episode_decisions: int, error_penalty: float) -> None:
        self.episode_decisions = episode_decisions
        self.error_penalty = error_penalty
        self.n = n
        self.window = WindowStats(n, error_penalty)
        self.completed: list[WindowStats] = []
        self.on_episode: Callable[[], None] | None = None

    def record_decision(self, action: int, req_class: int, view: ClusterView) -> None:
        ok = is_accurate(action, view.in_flight, view.class_rate[req_class], view.candidates)
        self.window.record_decision(action, ok)
        if self.window.decisions >= self.episode_decisions:
            self.completed.append(self.window)
            self.window = WindowStats(max(self.n, view.n), self.error_penalty)
            if self.on_episode is not None:
                self.on_episode()

    def record_outcome(self, outcome: Outcome, view: ClusterView) -> None:
        self.window.record_outcome(outcome, view.typical_all_s)
