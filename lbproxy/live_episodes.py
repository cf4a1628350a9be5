"""Episodes of live training: windows of `episode_decisions` routed decisions, measured with the same
WindowStats as the simulator's episodes (lbproxy/observe/metrics.py).

The dqn policy feeds the tracker every decision and every outcome (lbproxy/policies/dqn.py). A finished
window becomes its WindowSummary at once, so what the live trainer (lbproxy/train/live.py) consumes is
the same whether the tracker is in its process or in one of N workers, which send the summaries over
their control socket (lbproxy/train/live_workers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lbproxy.observe import ClusterView, Outcome, WindowStats, WindowSummary, is_accurate


class EpisodeTracker:
    """Per-episode quality window for live training.

    Outcomes are counted in the window open when they complete (live requests straddle episodes).
    Gini is capacity-normalised by `capacity` (the configured weights, DESIGN.md §6); a backend added
    at run time counts with capacity 1.
    """

    def __init__(self, n: int, episode_decisions: int, error_penalty: float, capacity: Sequence[float]) -> None:
        self.episode_decisions = episode_decisions
        self.error_penalty = error_penalty
        self.n = n
        self.capacity = list(capacity)
        self.window = WindowStats(n, error_penalty)
        self.completed: list[WindowSummary] = []
        self.on_episode: Callable[[], None] | None = None

    def record_decision(self, action: int, req_class: int, view: ClusterView) -> None:
        ok = is_accurate(action, view.in_flight, view.class_rate[req_class], view.candidates)
        self.window.record_decision(action, ok)
        if self.window.decisions >= self.episode_decisions:
            n = len(self.window.load)
            self.completed.append(self.window.summary((self.capacity + [1.0] * n)[:n]))
            self.window = WindowStats(max(self.n, view.n), self.error_penalty)
            if self.on_episode is not None:
                self.on_episode()

    def record_outcome(self, outcome: Outcome, view: ClusterView) -> None:
        self.window.record_outcome(outcome, view.typical_all_s)
