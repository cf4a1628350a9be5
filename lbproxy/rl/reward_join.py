"""The reward join: a decision record + its outcome + the reward + s' -> a batch of transitions.

One mechanism for the simulator agent (rl/agent.py) and the live policy (policies/dqn.py):

1. `record` keeps the decision (the state it was taken in, the action, the request class) under its
   decision id, in a bounded :class:`DecisionTable`;
2. `join` pops it when the outcome arrives and computes the reward (`observe.reward`, from the view
   right after the completion);
3. `flush` turns what was joined into one :class:`TransitionBatch`, with ``s'`` the state the view
   is in now (DESIGN.md §4) encoded once per request class, and hands it to the sink (the replay
   buffer, or the live learner that feeds one).

The simulator flushes after every completion. The live policy flushes once per event-loop
iteration, after the pool applied all of the iteration's completions: the state the next decisions
start from. (Per completion, the encoding and the replay row cost the loop ~7 µs a request; batched,
~4: benchmarks/results/dqn_proxy.md.) Without bootstrapping (gamma = 0) s' is never read: an
all-zero state with an empty mask, never encoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lbproxy.observe import NUM_CLASSES, ClusterView, Outcome, action_mask, encode_state, feature_dim, reward
from lbproxy.rl.replay import TransitionBatch

DEFAULT_TABLE_MAX_ENTRIES = 65_536
"""Decisions awaiting an outcome; far above any realistic in-flight count (the connector limits it)."""

DEFAULT_TABLE_TTL_S = 120.0
"""A live decision with no outcome after this long is dropped: above the 60 s default total_timeout_s,
so only requests that truly never completed (dropped client, crash) expire. The simulator reports
every completion, so its records never expire (ttl inf)."""


@dataclass(slots=True)
class DecisionRecord:
    state: np.ndarray
    """The state the decision was taken in (never mutated afterwards)."""
    action: int
    req_class: int
    t_s: float
    by_fallback: bool = False
    """Routed by the guardrail's control arm (the fallback heuristic), not by the DQN."""


class DecisionTable:
    """Decision id -> record, bounded by a maximum size and a time-to-live.

    Insertion order is decision order, so expiry only ever looks at the oldest entries (a dict keeps
    insertion order): O(1) amortised per insert, no timers.
    """

    def __init__(self, max_entries: int = DEFAULT_TABLE_MAX_ENTRIES, ttl_s: float = DEFAULT_TABLE_TTL_S) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._records: dict[int, DecisionRecord] = {}
        self.expired = 0
        """Records dropped because their TTL passed or the table was full (outcome never joined)."""

    def __len__(self) -> int:
        return len(self._records)

    def put(self, decision_id: int, record: DecisionRecord) -> None:
        records = self._records
        self.expire(record.t_s)
        while len(records) >= self.max_entries:
            del records[next(iter(records))]
            self.expired += 1
        records[decision_id] = record

    def pop(self, decision_id: int) -> DecisionRecord | None:
        return self._records.pop(decision_id, None)

    def expire(self, now_s: float) -> int:
        """Drop records older than the TTL; returns how many went."""
        records = self._records
        limit = now_s - self.ttl_s
        n = 0
        while records:
            key = next(iter(records))
            if records[key].t_s >= limit:
                break
            del records[key]
            n += 1
        self.expired += n
        return n

    def items(self) -> list[tuple[int, DecisionRecord]]:
        return list(self._records.items())


class RewardJoin:
    """Decision records waiting for their outcomes, and the outcomes joined but not yet flushed."""

    def __init__(
        self,
        width: int,
        error_penalty: float,
        *,
        bootstrap: bool,
        sink: Callable[[TransitionBatch], None],
        table: DecisionTable | None = None,
    ) -> None:
        self.width = width
        """Rows of every state (the replay buffer's width)."""
        self.error_penalty = error_penalty
        self.bootstrap = bootstrap
        """False with gamma = 0: transitions carry no s' (the learner never reads it)."""
        self.sink = sink
        self.table = table if table is not None else DecisionTable()
        self._joined: list[list[tuple[DecisionRecord, float]]] = [[] for _ in range(NUM_CLASSES)]
        self._mask = np.zeros(width, dtype=bool)
        self._mask_src: list[int] | None = None
        self._mask_len = -1
        self._no_state = np.zeros(feature_dim(width), dtype=np.float32)
        self._no_mask = np.zeros(width, dtype=bool)

    def record(
        self, decision_id: int, state: np.ndarray, action: int, req_class: int, t_s: float, by_fallback: bool = False
    ) -> None:
        """Keep a decision until its outcome arrives (`state` must not be mutated afterwards)."""
        self.table.put(decision_id, DecisionRecord(state, action, req_class, t_s, by_fallback))

    def join(self, outcome: Outcome, view: ClusterView) -> DecisionRecord | None:
        """Pop the outcome's decision and reward it (`view`: right after the completion); the record,
        or None when it is unknown (never recorded, already joined, or expired)."""
        rec = self.table.pop(outcome.decision_id)
        if rec is not None:
            r = reward(outcome.latency_s, outcome.error, view.typical_all_s, self.error_penalty)
            self._joined[rec.req_class].append((rec, r))
        return rec

    def flush(self, view: ClusterView, now_s: float) -> None:
        """What was joined, as ONE batch handed to the sink, with s' the state `view` is in now for
        each transition's class (encoded once per class; a single shared row when one class joined).
        One batch, not one per class: each hand-off is a locked replay write of its own."""
        records: list[tuple[DecisionRecord, float]] = []
        next_states: list[np.ndarray] = []
        counts: list[int] = []
        for req_class, joined in enumerate(self._joined):
            if not joined:
                continue
            records.extend(joined)
            counts.append(len(joined))
            if self.bootstrap:
                next_states.append(encode_state(view, req_class, now_s, self.width))
            joined.clear()
        if not records:
            return
        if not self.bootstrap:
            next_state, next_mask = self._no_state, self._no_mask
        else:
            next_mask = self._mask_for(view)
            next_state = next_states[0] if len(next_states) == 1 else np.repeat(np.stack(next_states), counts, axis=0)
        self.sink(
            TransitionBatch(
                np.stack([rec.state for rec, _r in records]),
                [rec.action for rec, _r in records],
                [r for _rec, r in records],
                next_state,
                next_mask,
            )
        )

    def _mask_for(self, view: ClusterView) -> np.ndarray:
        """s''s action mask, rebuilt only when the view replaced its candidates list (health events).
        Never mutated once built: a batch handed to the sink may keep a reference to it."""
        cands = view.candidates
        if cands is not self._mask_src or self._mask_len != len(cands):
            self._mask = action_mask(view, self.width)
            self._mask_src = cands
            self._mask_len = len(cands)
        return self._mask

    # --- persistence (the simulator's exact resume) --------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The records waiting for an outcome, as tensors and primitives (nothing is joined-unflushed
        between the simulator's completions)."""
        items = self.table.items()
        obs_dim = feature_dim(self.width)
        states = np.stack([r.state for _i, r in items]) if items else np.zeros((0, obs_dim), np.float32)
        return {
            "pending_ids": torch.tensor([i for i, _r in items], dtype=torch.int64),
            "pending_states": torch.from_numpy(states),
            "pending_actions": torch.tensor([r.action for _i, r in items], dtype=torch.int64),
            "pending_classes": torch.tensor([r.req_class for _i, r in items], dtype=torch.int64),
            "pending_times": torch.tensor([r.t_s for _i, r in items], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table = DecisionTable(self.table.max_entries, self.table.ttl_s)
        states = state["pending_states"].numpy()
        columns = (state[k].tolist() for k in ("pending_ids", "pending_actions", "pending_classes", "pending_times"))
        for k, (i, a, c, t) in enumerate(zip(*columns, strict=True)):
            self.table.put(int(i), DecisionRecord(states[k].copy(), int(a), int(c), float(t)))
