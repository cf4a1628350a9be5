"""Per-loop-iteration inference for the live dqn policy: one encoded state per request class and
iteration, moved exactly by every dispatch (DESIGN.md §5).

The requests whose handlers run in one event-loop iteration are decided from one :class:`Snapshot`
per class. They are not blind to each other: every dispatch (by any class, any arm) advances the
dispatched backend's score to the one it has with one more request in flight (`levels`), which is
exactly the score a full forward pass of the state after that dispatch would give it: a dispatch
changes that one row and nothing the other rows' scores depend on (rl/network.py, observe/features.py's
DispatchModel). Without that, every request of an iteration would go to the same backend: worse
routing, and ~5 % less proxy throughput even for round robin made to do so (measured while building
this).

Inline (NumPy on the loop), the pass runs when the iteration's first request needs it and nobody
is suspended; it scores every backend as it is and after as many more dispatches as the last
iteration needed (LOOKAHEAD_ROWS), and a backend that runs out of levels anyway is re-scored alone
(`_refresh`).
Off-loop (CUDA), the snapshot's states (the backend rows after 0..OFF_LOOP_LEVELS-1 more dispatches)
go to the device thread and its requests wait for them; the dispatches other requests make meanwhile
are counted and applied when the scores land. Every snapshot is retired by one callback queued
behind the iteration's handlers (`at_iteration_end`).

What a decision does with the scores (ε, fallbacks, the guardrail, the decision record) is the
policy's: lbproxy/policies/dqn.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import numpy as np

from lbproxy.observe import NUM_CLASSES, ROW_FEATURES, ClusterView, DispatchModel, encode_state
from lbproxy.rl.action_selection import best_candidate
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.network import RowScorer

LOOKAHEAD_LEVELS = 4
"""Inline: the fewest what-if rows per backend a re-score adds. A backend that runs out of the levels
its snapshot's pass scored (below) is scored after further dispatches in ONE row pass with every other
backend that ran out: the first time every candidate gets 4 more, later a backend that keeps running out
gets as many more as it has (doubling). Scores are exact whatever the count (observe.DispatchModel);
this only batches them."""

LOOKAHEAD_ROWS = 32
"""Inline: what-if rows a snapshot's pass scores at most, beside the backends as they are. The pass
scores every candidate after 0..L-1 more dispatches, L sized from the dispatches the busiest backend
took in the last iteration (`IterationScheduler.demand`) and capped so that n x (L - 1) stays within
this. In a busy proxy an iteration decides a dozen requests (2026-12-02, benchmarks/dqn_proxy.py:
13 per pass on average), and re-scoring later took ~40 % of the decision time (py-spy, same day); a row more in the one
pass costs far less than a second pass (its NumPy calls cost per call, not per row)."""

OFF_LOOP_LEVELS = 8
"""Off-loop: an off-loop pass scores every backend after 0..7 more dispatches in one device pass (8
states); a snapshot whose backend would need a ninth is retired and the next decision takes a new
one (a device round trip costs more than re-encoding, so no per-row extension)."""

LATE = -1
"""`IterationScheduler.greedy`'s answer when the pass missed the decision deadline."""


@dataclasses.dataclass(slots=True, eq=False)  # identity: it holds arrays, and lists of snapshots are searched
class Snapshot:
    """What every request of one class sees during one event-loop iteration (the batch).
    `state` is never mutated once built: decision records keep references to it."""

    state: np.ndarray
    model: DispatchModel
    candidates: list[int]
    """The view's candidates list it was built from: a new list (health event) invalidates it."""
    counts: list[int]
    """Dispatches per slot since the snapshot was encoded."""
    scores: np.ndarray | None = None
    """Each slot's current score (-inf off the candidates), once evaluated."""
    levels: list[list[float]] | None = None
    """levels[b][k]: slot b's score after k dispatches since the snapshot."""
    scorer: RowScorer | None = None
    """Inline: the state's pass, to score further what-if rows of one backend."""
    stale: list[int] = dataclasses.field(default_factory=list)
    """Inline: slots dispatched to whose next score is not computed yet (done before the next decision)."""
    looked_ahead: bool = False
    """Inline: every candidate's what-if rows were scored once (`_refresh`)."""
    late: bool = False
    """The pass missed the decision deadline (or failed): the snapshot's requests fall back."""
    exhausted: bool = False
    """Off-loop: a backend went past the dispatches its scores were computed for: take a new snapshot."""
    answered: int = 0
    """Greedy decisions answered from this snapshot's pass (the pass's batch size)."""
    pending: asyncio.Future[np.ndarray | None] | None = None
    """Off-loop: the pass in flight."""
    after: np.ndarray | None = None
    """The state moved by the dispatches since it was encoded, kept from the first decision record
    that needs it (learning only); the rows dispatched to since are rewritten when the next record
    needs it (`moved`, `DispatchModel.apply`)."""
    moved: list[int] = dataclasses.field(default_factory=list)
    """Slots dispatched to since `after` was last brought up to date."""

    def decided_state(self) -> np.ndarray:
        """The state a decision taken now was taken in: the snapshot after the dispatches made since
        it was encoded (a new array when there were any; never mutated afterwards)."""
        after, counts = self.after, self.counts
        if after is None:
            if not any(counts):
                return self.state
            # The first record after a dispatch: copy the state and rewrite the dispatched rows in
            # scalar arithmetic, as every later record does (benchmarks/loop_bookkeeping.py measures it
            # against the NumPy rule it replaced). Keeping only each record's dispatch counts and
            # materialising a snapshot's records together in NumPy when the first is read was tried
            # on 2026-12-03 and cost more: ~45 µs for 16 two-backend states, and 2-3 µs more per
            # request in loop_bookkeeping's drive (a dozen NumPy calls per batch outweigh the copies).
            after = self.after = self.state.copy()
            self.moved = [b for b, k in enumerate(counts) if k]
        if self.moved:
            apply = self.model.apply
            total = sum(counts)  # learning only: the greedy hot path keeps no running total
            for b in set(self.moved):  # a slot dispatched to k times since: one rewrite, at its count now
                apply(after, b, counts[b], total)
            self.moved.clear()
        return after.copy()


class IterationScheduler:
    """The snapshots of the current loop iteration over an :class:`InferenceEngine`."""

    def __init__(self, engine: InferenceEngine, width: int) -> None:
        self.engine = engine
        self.width = width
        """Rows of every encoded state."""
        self.inline = engine.inline
        self.max_batch = engine.max_batch
        """Decisions one pass answers before the next is taken."""
        self.snapshots: list[Snapshot | None] = [None] * NUM_CLASSES
        self._live: list[Snapshot] = []
        """Snapshots whose scores this iteration's dispatches move (evaluated, or off-loop in flight)."""
        self._clear_armed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.demand = 0
        """Most dispatches one backend took since a snapshot of the last iteration: sizes the next
        inline pass's what-if rows (LOOKAHEAD_ROWS)."""
        self._grid_of: list[int] | None = None
        self._grid: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        """The first pass's what-if rows (slots, extra dispatches) by L, for the candidates `_grid_of`."""

    def current(self, req_class: int, view: ClusterView, now_s: float, *, answering: bool = True) -> Snapshot:
        """The class's snapshot for this iteration; a new one on first use, after new candidates, once
        exhausted, or (`answering`) once max_batch greedy decisions were taken from it."""
        snap = self.snapshots[req_class]
        if (
            snap is None
            or snap.candidates is not view.candidates
            or snap.exhausted
            or (answering and snap.answered >= self.max_batch)
        ):
            snap = self._snapshot(req_class, view, now_s)
        return snap

    def at_iteration_end(self, callback: Callable[[], None]) -> None:
        """Run `callback` after the handlers already queued for this loop iteration (asyncio and uvloop
        run callbacks queued during an iteration in the next one, in order)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(callback)

    # --- greedy decisions ------------------------------------------------------------------------------
    def greedy(self, snap: Snapshot) -> int:
        """Inline: the best candidate now (running the snapshot's pass first if it has not run), or
        LATE when the pass missed the deadline."""
        scores = snap.scores
        if scores is None:
            if snap.late or (scores := self._evaluate(snap)) is None:
                return LATE
        elif snap.stale:
            self._refresh(snap)
        snap.answered += 1
        return best_candidate(scores, snap.candidates)

    def dispatched(self, action: int) -> None:
        """A request went to `action` (however it was decided): move that backend's score in every
        live snapshot to the one it has with one more request in flight, exactly."""
        for live in self._live:
            counts = live.counts
            if action >= len(counts):
                continue  # a slot added after the snapshot was taken
            k = counts[action] + 1
            counts[action] = k
            if live.after is not None:  # learning: the record state's row is rewritten when next needed
                live.moved.append(action)
            levels, scores = live.levels, live.scores
            if levels is None or scores is None or scores[action] == -np.inf:
                continue  # in flight (applied when it lands), or not a candidate of that snapshot
            lev = levels[action]
            if k < len(lev):
                scores[action] = lev[k]
            elif live.scorer is not None:
                live.stale.append(action)  # scored before the snapshot's next decision, if it has one
            else:
                live.exhausted = True

    # --- off-loop passes -------------------------------------------------------------------------------
    def submit(self, snap: Snapshot) -> asyncio.Future[np.ndarray | None]:
        """Off-loop: the snapshot's pass, submitted by its first request (scores land in the snapshot
        before any waiting request resumes)."""
        pending = snap.pending
        if pending is None:
            model = snap.model
            cands = np.asarray(snap.candidates)
            states = np.repeat(snap.state[None], OFF_LOOP_LEVELS, axis=0)
            width = self.width
            for k in range(1, OFF_LOOP_LEVELS):
                rows = states[k, : width * ROW_FEATURES].reshape(width, ROW_FEATURES)
                rows[cands] = model.rows_after(cands, np.full(len(cands), float(k)))
            pending = snap.pending = self.engine.submit_q(states)
            # Registered before any request awaits, so it runs first when the pass lands.
            pending.add_done_callback(lambda fut: self._landed(snap, fut))
        return pending

    def _landed(self, snap: Snapshot, fut: asyncio.Future[np.ndarray | None]) -> None:
        q = None if fut.cancelled() else fut.result()
        if q is None:
            snap.late = True
            if snap in self._live:
                self._live.remove(snap)
            return
        n = snap.model.n
        self._install(snap, [q[:, b].tolist() for b in range(n)])
        self._arm_clear()  # queued behind the snapshot's waiting requests: they all see its scores

    # --- snapshot lifetime -----------------------------------------------------------------------------
    def _snapshot(self, req_class: int, view: ClusterView, now_s: float) -> Snapshot:
        """A new snapshot for the class. All are retired by one callback queued behind the
        iteration's handlers."""
        snap = self.snapshots[req_class]
        if snap is not None:
            self._retire(snap)
        self._arm_clear()
        state = encode_state(view, req_class, now_s, self.width)
        snap = Snapshot(state, DispatchModel(view, req_class, state), view.candidates, [0] * view.n)
        self.snapshots[req_class] = snap
        self._live.append(snap)  # counts every dispatch from now on, evaluated or not
        return snap

    def _retire(self, snap: Snapshot) -> None:
        """Account the snapshot's pass (the batch size is known now) and stop moving its scores."""
        if snap.answered:
            self.engine.record_pass(snap.answered)
            snap.answered = 0
            self.demand = max(snap.counts, default=0)
        if snap.pending is None and snap in self._live:
            self._live.remove(snap)

    def _arm_clear(self) -> None:
        if not self._clear_armed:
            self.at_iteration_end(self._clear_snapshots)
            self._clear_armed = True

    def _clear_snapshots(self) -> None:
        """End of the iteration: account every evaluated snapshot's pass; the next request of each
        class takes a new snapshot. (Off-loop snapshots still in flight stay live.)"""
        self._clear_armed = False
        for c in range(NUM_CLASSES):
            self.snapshots[c] = None
        keep = []
        demand = -1
        for snap in self._live:
            if snap.pending is not None and snap.scores is None and not snap.late:  # off-loop, in flight
                keep.append(snap)
            elif snap.answered:
                self.engine.record_pass(snap.answered)
                demand = max(demand, max(snap.counts, default=0))
        if demand >= 0:
            self.demand = demand
        self._live = keep

    # --- scores ----------------------------------------------------------------------------------------
    def _install(self, snap: Snapshot, levels: list[list[float]]) -> np.ndarray:
        """Start deciding from a pass's scores, moved by the dispatches counted since the snapshot."""
        n = len(levels)
        scores = np.full(n, -np.inf)
        snap.levels = levels
        for b in snap.candidates:
            k = snap.counts[b]
            lev = levels[b]
            if k < len(lev):
                scores[b] = lev[k]
            elif snap.scorer is not None:
                snap.stale.append(b)
            else:
                snap.exhausted = True
                break
        snap.scores = scores
        if snap not in self._live:
            self._live.append(snap)
        if snap.stale:
            self._refresh(snap)
        return scores

    def _refresh(self, snap: Snapshot) -> None:
        """Inline: score what the stale slots (dispatched to, next score missing) read now, in one row
        pass: the first time for every candidate (LOOKAHEAD_LEVELS further dispatches each), then for
        the stale slots only."""
        levels, scores, scorer = snap.levels, snap.scores, snap.scorer
        assert levels is not None and scores is not None and scorer is not None
        slots = snap.candidates if not snap.looked_ahead else sorted(set(snap.stale))
        snap.looked_ahead = True
        snap.stale.clear()
        counts = snap.counts
        starts = [len(levels[b]) for b in slots]
        # Doubling: a backend that keeps taking dispatches in one iteration gets 4, 8, 16, ... more at a time.
        ends = [
            max(counts[b] + 1, start + max(LOOKAHEAD_LEVELS, start)) for b, start in zip(slots, starts, strict=True)
        ]
        which = np.repeat(np.asarray(slots, dtype=np.intp), np.subtract(ends, starts))
        extra = np.concatenate([np.arange(a, e, dtype=np.float64) for a, e in zip(starts, ends, strict=True)])
        got = self.engine.score(scorer, snap.model.rows_after(which, extra)).tolist()
        k = 0
        for b, a, e in zip(slots, starts, ends, strict=True):
            levels[b].extend(got[k : k + e - a])
            k += e - a
            scores[b] = levels[b][counts[b]]

    def _evaluate(self, snap: Snapshot) -> np.ndarray | None:
        """The inline pass for a snapshot: every candidate's score now and after 1..L-1 more dispatches
        (LOOKAHEAD_ROWS); None (and the snapshot marked late) when the pass missed the deadline."""
        model = snap.model
        cands = snap.candidates
        levels = self._first_levels(len(cands))
        if levels > 1:
            if self._grid_of is not cands:
                self._grid_of, self._grid = cands, {}
            grid = self._grid.get(levels)
            if grid is None:
                slots = np.asarray(cands, dtype=np.intp)
                grid = np.repeat(slots, levels - 1), np.tile(np.arange(1.0, float(levels)), len(cands))
                self._grid[levels] = grid
            more = model.rows_after(*grid)
        else:
            more = model.rows[:0]
        out = self.engine.inline_pass(model.rows, model.ctx, more)
        if out is None:
            snap.late = True
            return None
        snap.scorer, scores = out
        flat = scores.tolist()
        by_slot = [[flat[b]] for b in range(model.n)]
        if levels > 1:
            snap.looked_ahead = True
            k = model.n
            for b in cands:
                by_slot[b].extend(flat[k : k + levels - 1])
                k += levels - 1
        return self._install(snap, by_slot)

    def _first_levels(self, candidates: int) -> int:
        """L: the levels per candidate the next inline pass scores (LOOKAHEAD_ROWS)."""
        want = 2 * (self.demand + 1)  # headroom: iterations vary, and a row costs less than a re-score
        cap = 1 + LOOKAHEAD_ROWS // max(1, candidates)
        levels = 1
        while levels < want and levels < cap:
            levels *= 2
        return min(levels, cap)
