"""What learning costs the event loop itself per request: the dqn policy with and without its
decision record, reward join and transition hand-off, side by side in one process (issue 12 item 3).

    .venv/bin/python benchmarks/loop_bookkeeping.py [--iterations 2000] [--per-iteration 8] [--trials 9]
        [--out benchmarks/results/loop_bookkeeping.md]

`benchmarks/dqn_proxy.py`'s learner-idle row measures the same thing through HTTP, where the proxy's
~150 µs of other work per request and a noisy shared machine (its per-round ratios ranged 0.4-1.2 on
2026-12-01) bury a difference of a few µs. Here the loop runs only the policy: each simulated
iteration decides `--per-iteration` requests (classes in turn) on a 4-backend `ClusterView`, the
next iteration completes them (`ClusterView.on_complete`, then `policy.observe`, as the proxy's
accounting does), and the iteration after runs the callbacks the policy queued (snapshot retirement,
the join's flush into the replay). Rows, each a fresh runtime built by `create_dqn_runtime`:

- `greedy` -- `--mode serve`, at the serving width (MAX_BACKENDS rows), as deployed;
- `greedy, learning width` -- the online runtime's own engine and width with no record kept: the
  baseline that differs from the next row only by the bookkeeping;
- `online, learner idle` -- `--online` with `learning_starts` out of reach: records, joins, the flush
  into the replay (the learner thread is not started, so nothing else shares the process);
- `online, learner idle, first record by NumPy` -- the same with a snapshot's first moved record
  state computed in NumPy from all the dispatch counts (the rule before 2026-12-02, swapped in for
  this row only; later records were already moved row by row), so the change to
  `Snapshot.decided_state` is measured side by side;
- `online, learner idle, one replay write per class` -- the same with the reward join's flush as
  it was until 2026-12-02: one batch, i.e. one locked replay write, per request class and iteration;
- `online, learner idle, gamma 0` -- the same without bootstrapping, whose transitions carry no s':
  what encoding s' (once per class and loop iteration) adds to the bookkeeping.

Prints µs per request (median of interleaved trials) and the bookkeeping cost = online idle minus
greedy at the learning width, with a 90 % bootstrap interval of the per-trial differences.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import (  # noqa: E402
    bootstrap_median_interval,
    load_routing_network,
    machine,
    quoted_command,
    revision,
    utc_now,
    write_result,
)

from lbproxy.config import Settings  # noqa: E402
from lbproxy.observe import NUM_CLASSES, ROW_FEATURES, ClusterView, DispatchModel, Outcome, encode_state  # noqa: E402
from lbproxy.observe.features import C_LOAD, C_LOG_TOTAL, CLIP_RATIO, state_width  # noqa: E402
from lbproxy.policies.dqn import DqnPolicy  # noqa: E402
from lbproxy.policies.dqn_runtime import create_dqn_runtime  # noqa: E402
from lbproxy.rl.iteration import Snapshot  # noqa: E402
from lbproxy.rl.replay import TransitionBatch  # noqa: E402
from lbproxy.rl.reward_join import RewardJoin  # noqa: E402

BACKENDS = 4
TARGET_US = 5.0
"""Issue 12's bound on the bookkeeping per request."""


def busy_view(n: int) -> ClusterView:
    """A view whose backends have answered a few hundred requests each, at different speeds."""
    view = ClusterView.create(n)
    rng = random.Random(1)
    for k in range(400):
        b = k % n
        view.on_dispatch(b)
        view.on_complete(Outcome(b, k % NUM_CLASSES, 0.005 * (b + 1) * rng.uniform(0.5, 1.5), False), now_s=k * 1e-3)
    return view


def policies(hidden: int) -> dict[str, DqnPolicy]:
    """Every row's policy (see the module docstring)."""
    net = load_routing_network(hidden)
    view = busy_view(BACKENDS)
    common = {"device": "cpu", "hidden": hidden, "backends": [f"http://127.0.0.1:{9000 + i}" for i in range(BACKENDS)]}
    greedy = create_dqn_runtime(Settings(mode="serve", **common), view, net=net).policy
    online_rt = create_dqn_runtime(Settings(mode="serve", online=True, learning_starts=10**9, **common), view, net=net)
    online = online_rt.policy
    same_width = DqnPolicy(online.engine, width=online.width, guardrail=online.guardrail, seed=1)
    old_rule = create_dqn_runtime(Settings(mode="serve", online=True, learning_starts=10**9, **common), view, net=net)
    no_next = Settings(mode="serve", online=True, learning_starts=10**9, gamma=0.0, **common)
    return {
        "greedy": greedy,
        "greedy, learning width": same_width,
        "online, learner idle": online,
        OLD_RULE: old_rule.policy,
        OLD_FLUSH: create_dqn_runtime(
            Settings(mode="serve", online=True, learning_starts=10**9, **common), view, net=net
        ).policy,
        "online, learner idle, gamma 0": create_dqn_runtime(no_next, view, net=net).policy,
    }


async def drive(policy: DqnPolicy, iterations: int, per_iteration: int) -> float:
    """µs per request of `iterations` simulated loop iterations (see the module docstring)."""
    view = busy_view(BACKENDS)
    rng = random.Random(2)
    latencies = [rng.uniform(0.002, 0.02) for _ in range(1024)]
    pending: list[tuple[int, int, int]] = []
    t0 = time.perf_counter()
    for it in range(iterations):
        now = 1.0 + it * 1e-4
        for j, (action, req_class, did) in enumerate(pending):
            out = Outcome(action, req_class, latencies[(it + j) & 1023], False, decision_id=did)
            view.on_complete(out, now)
            policy.observe(out, view, now)
        pending = []
        for j in range(per_iteration):
            req_class = j % NUM_CLASSES
            decision = policy.decide(req_class, view, now)
            assert isinstance(decision, tuple), "the inline path answers at once"
            action, did = decision
            view.on_dispatch(action)
            pending.append((action, req_class, did))
        await asyncio.sleep(0)  # the iteration ends: the callbacks the policy queued run
    return (time.perf_counter() - t0) / (iterations * per_iteration) * 1e6


OLD_RULE = "online, learner idle, first record by NumPy"
OLD_FLUSH = "online, learner idle, one replay write per class"


def numpy_state_after(model: DispatchModel, counts: list[int]) -> np.ndarray:
    """`DispatchModel.state_after` as it was until 2026-12-02: the state after counts[b] more
    dispatches to every slot b, in NumPy (reads the model's internals; benchmark only)."""
    x = model.state.copy()
    slots = np.flatnonzero(np.asarray(counts[: model.n]))
    extra = np.asarray(counts, dtype=np.float64)[slots]
    width = state_width(x.shape[0])
    x[: width * ROW_FEATURES].reshape(width, ROW_FEATURES)[slots] = model.rows_after(slots, extra)
    total = model.total_in_flight + float(extra.sum())
    x[width * ROW_FEATURES + C_LOAD] = min(total / model._total_concurrency(), CLIP_RATIO)
    x[width * ROW_FEATURES + C_LOG_TOTAL] = math.log1p(total)
    return x


def old_decided_state(snap: Snapshot) -> np.ndarray:
    """`Snapshot.decided_state` as it was until 2026-12-02."""
    after = snap.after
    if after is None:
        if not any(snap.counts):
            return snap.state
        after = snap.after = numpy_state_after(snap.model, snap.counts)
    elif snap.moved:
        total = sum(snap.counts)
        for b in set(snap.moved):
            snap.model.apply(after, b, snap.counts[b], total)
        snap.moved.clear()
    return after.copy()


def per_class_flush(join: RewardJoin, view: ClusterView, now_s: float) -> None:
    """`RewardJoin.flush` as it was until 2026-12-02: one batch (one locked replay write) per class."""
    for req_class, joined in enumerate(join._joined):
        if not joined:
            continue
        if join.bootstrap:
            next_state, next_mask = encode_state(view, req_class, now_s, join.width), join._mask_for(view)
        else:
            next_state, next_mask = join._no_state, join._no_mask
        states = np.stack([rec.state for rec, _r in joined])
        join.sink(
            TransitionBatch(
                states, [rec.action for rec, _r in joined], [r for _rec, r in joined], next_state, next_mask
            )
        )
        joined.clear()


SWAPS: dict[str, tuple[Any, str, Callable[..., Any]]] = {
    OLD_RULE: (Snapshot, "decided_state", old_decided_state),
    OLD_FLUSH: (RewardJoin, "flush", per_class_flush),
}
"""Rows that run with one method swapped for the rule it replaced (class, method, replacement)."""


def run_row(name: str, policy: DqnPolicy, run: Callable[[DqnPolicy], float]) -> float:
    swap = SWAPS.get(name)
    if swap is None:
        return run(policy)
    cls, method, replacement = swap
    current = getattr(cls, method)
    setattr(cls, method, replacement)
    try:
        return run(policy)
    finally:
        setattr(cls, method, current)


def measure(rows: dict[str, DqnPolicy], trials: int, run: Callable[[DqnPolicy], float]) -> dict[str, list[float]]:
    """Interleaved trials in shuffled order, after one warm-up of each row."""
    for name, p in rows.items():
        run_row(name, p, run)
    out: dict[str, list[float]] = {name: [] for name in rows}
    order = list(rows)
    shuffler = random.Random(3)
    for _ in range(trials):
        shuffler.shuffle(order)
        for name in order:
            out[name].append(run_row(name, rows[name], run))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=2000, help="simulated loop iterations per trial")
    ap.add_argument("--per-iteration", type=int, default=8, help="requests decided per iteration")
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=64, help="network width (the shipped model's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loop_bookkeeping.md")
    ap.add_argument("--note", default="")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = policies(args.hidden)
    loop = asyncio.new_event_loop()
    try:
        times = measure(
            rows, args.trials, lambda p: loop.run_until_complete(drive(p, args.iterations, args.per_iteration))
        )
    finally:
        loop.close()
    base, online = times["greedy, learning width"], times["online, learner idle"]
    diffs = [o - b for o, b in zip(online, base, strict=True)]
    lo, hi = bootstrap_median_interval(diffs)
    cost = statistics.median(diffs)
    change = [o - n for o, n in zip(times[OLD_RULE], online, strict=True)]
    clo, chi = bootstrap_median_interval(change)
    fchange = [o - n for o, n in zip(times[OLD_FLUSH], online, strict=True)]
    flo, fhi = bootstrap_median_interval(fchange)
    lines = [
        "| row | µs per request (median) | min-max |",
        "|---|---|---|",
        *(f"| {n} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} |" for n, t in times.items()),
        "",
        f"bookkeeping per request (online, learner idle - greedy at the learning width, per trial): {cost:.2f} µs, "
        f"90 % bootstrap interval of the median {lo:.2f}-{hi:.2f} (target <= {TARGET_US:g}: "
        f"{'met' if hi <= TARGET_US else 'not met'})",
        f"a snapshot's first moved record by scalar row rewrites instead of NumPy: {statistics.median(change):.2f} µs "
        f"less per request, 90 % bootstrap interval {clo:.2f}-{chi:.2f}; per-request ratio online idle new / old "
        f"{statistics.median(online) / statistics.median(times[OLD_RULE]):.3f}",
        f"one replay write per loop iteration instead of one per class: {statistics.median(fchange):.2f} µs less per "
        f"request, 90 % bootstrap interval {flo:.2f}-{fhi:.2f}; per-request ratio online idle new / old "
        f"{statistics.median(online) / statistics.median(times[OLD_FLUSH]):.3f}",
    ]
    print("\n".join(lines))
    header = [
        "# What learning costs the event loop per request (decision record, reward join, transition hand-off)",
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}",
        f"- command: `{quoted_command(argv)}`",
        f"- code: {revision()}",
        f"- method: {args.trials} interleaved trials (shuffled order, after one warm-up each) of {args.iterations} "
        f"simulated loop iterations, {args.per_iteration} decisions per iteration on a {BACKENDS}-backend view, "
        f"outcomes one iteration later; hand-set equivariant network (hidden {args.hidden}); see the docstring",
        *([f"- note: {args.note}"] if args.note else []),
        "",
    ]
    write_result(args.out, header + lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
