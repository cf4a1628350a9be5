"""Cost of one balancing decision per heuristic policy, with the DQN's per-decision CPU work as reference.

    .venv/bin/python benchmarks/decision_cost.py [--iterations 100000] [--trials 9] [--note TEXT]
        [--out benchmarks/results/decision_cost.md]

Times `policy.choose(req_class, view, now_s)` in a tight loop on a 4-, a 16- and a 64-backend
`ClusterView` (equal capacities, distinct in-flight counts, latency and service estimates, all backends
candidates), which is what the proxy pays per request and the simulator pays up to ~200k times per
wall-clock second. Reference rows: an empty call through the same loop (the floor any Python policy
pays); `round_robin` and `least_conn` with unequal weights (smooth WRR instead of plain rotation, the
Python scan instead of the C-level min); `peak_ewma` calling `view.decayed_cost` instead of its inlined
copy (why the copy exists).

The DQN's pieces (the permutation-equivariant network of rl/network.py, Settings' hidden width, random
weights: the cost does not depend on them), each what the live policy (policies/dqn.py) or the
simulator agent (rl/agent.py) runs:
- `encode_state` into a preallocated buffer at the serving width (MAX_BACKENDS rows), once per loop
  iteration and request class live;
- one inline pass: `RowScorer` (the pooled cluster summary) + the scores of the n backend rows;
- the live policy's whole snapshot pass: `DispatchModel` + the n what-if rows after one more dispatch
  + `InferenceEngine.inline_pass` over the 2n rows;
- one incremental re-score of one row (`RowScorer.scores` of one row, and with the what-if row built
  by `DispatchModel.rows_after`): what a decision pays when its dispatch outruns the precomputed levels;
- a greedy decision of the simulator (`greedy_action` on an encoded state; `GreedyDqn.choose` with its
  encoding, at the training width);
- the whole network for one state in NumPy (`numpy_q`, what an off-loop CPU pass runs per state) and in
  torch (`QNetwork.forward` + `masked_argmax`, one thread, `inference_mode`), at the serving width.
Prints ns/decision (median of interleaved rounds) and the ratio to round_robin measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import machine  # noqa: E402

from lbproxy.observe import (  # noqa: E402
    MAX_BACKENDS,
    NUM_CLASSES,
    ClusterView,
    DispatchModel,
    Outcome,
    action_mask,
    encode_state,
    feature_dim,
    learning_width,
)
from lbproxy.policies import HEURISTICS, PeakEwma, make_policy  # noqa: E402
from lbproxy.rl.action_selection import best_candidate, masked_argmax  # noqa: E402
from lbproxy.rl.agent import GreedyDqn, greedy_action  # noqa: E402
from lbproxy.rl.batcher import InferenceEngine  # noqa: E402
from lbproxy.rl.network import NumpyWeights, QNetwork, RowScorer, numpy_q  # noqa: E402

BACKEND_COUNTS = (4, 16, 64)
HIDDEN = 64  # Settings.hidden default
SERVING_WIDTH = MAX_BACKENDS
"""Rows of the live policy's states when serving (create_dqn_runtime: room for every slot the pool can have)."""
NOW_S = 100.0
DEFAULT_OUT = REPO / "benchmarks" / "results" / "decision_cost.md"

Step = Callable[[], object]


class PeakEwmaViaMethod(PeakEwma):
    """peak_ewma as the spec reads, calling `view.decayed_cost` (reference row, not shipped)."""

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        k = len(cands)
        if k <= 1:
            return cands[0]
        r = self._random
        a = int(r() * k)
        b = int(r() * (k - 1))
        if b >= a:
            b += 1
        ia = cands[a]
        ib = cands[b]
        in_flight = view.in_flight
        load_a = view.decayed_cost(ia, now_s) * (in_flight[ia] + 1)
        load_b = view.decayed_cost(ib, now_s) * (in_flight[ib] + 1)
        return ia if load_a <= load_b else ib


def make_view(n: int, weighted: bool = False, seed: int = 0) -> ClusterView:
    """A busy-looking view: every estimate filled by completions of all classes (as the pool's would
    be), then distinct in-flight counts and costs, so argmin scans and the encoder do real work."""
    rng = random.Random(seed)
    capacity = [rng.choice((1.0, 2.0, 4.0)) for _ in range(n)] if weighted else None
    view = ClusterView.create(n, capacity=capacity)
    speed = [rng.uniform(0.5, 2.0) for _ in range(n)]
    t = NOW_S - 10.0
    for _ in range(40 * n):
        i = rng.randrange(n)
        c = rng.randrange(NUM_CLASSES)
        svc = 0.01 * (c + 1) * speed[i]
        queued = rng.randint(0, 3)
        view.on_dispatch(i)
        t += 0.001
        view.on_complete(Outcome(i, c, svc * (1 + queued), False, queued_behind=queued), t)
    for i in range(n):
        view.in_flight[i] = rng.randint(0, 20)
        view.latency_cost_s[i] = rng.uniform(0.005, 0.2)
        view.last_update_s[i] = NOW_S - rng.uniform(0.0, 5.0)
    view.total_in_flight = sum(view.in_flight)
    return view


def time_once(step: Step, iterations: int) -> float:
    """ns per call over one tight loop of `iterations` calls."""
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(iterations):
        step()
    return (clock() - t0) / iterations


def policy_step(policy: object, view: ClusterView) -> Step:
    choose = policy.choose  # type: ignore[attr-defined]
    return lambda: choose(0, view, NOW_S)


def empty(req_class: int, view: ClusterView, now_s: float) -> int:
    """The cheapest possible policy: what the loop and one Python call cost."""
    return 0


def cases_for(n: int, net: QNetwork, iterations: int) -> dict[str, tuple[Step, int]]:
    """Every row's (step, calls per trial) for an n-backend view."""
    view = make_view(n)
    slow = max(1, iterations // 20)  # the DQN's rows are ~10-100x dearer: keep their trials as short
    return {**heuristic_cases(view, n, iterations), **dqn_cases(view, n, net, slow)}


def heuristic_cases(view: ClusterView, n: int, iterations: int) -> dict[str, tuple[Step, int]]:
    """The empty-call floor, every heuristic, and the reference rows (unequal weights, the method call)."""
    weighted = make_view(n, weighted=True)
    out: dict[str, tuple[Step, int]] = {"(empty call: loop + call floor)": (lambda: empty(0, view, NOW_S), iterations)}
    for name in HEURISTICS:
        out[name] = (policy_step(make_policy(name, 0), view), iterations)
    out["round_robin, unequal weights (smooth WRR)"] = (policy_step(make_policy("round_robin"), weighted), iterations)
    out["least_conn, unequal weights (Python scan)"] = (policy_step(make_policy("least_conn"), weighted), iterations)
    out["peak_ewma via view.decayed_cost (not shipped)"] = (policy_step(PeakEwmaViaMethod(0), view), iterations)
    return out


def dqn_cases(view: ClusterView, n: int, net: QNetwork, slow: int) -> dict[str, tuple[Step, int]]:
    """The DQN's pieces on `view` (the module docstring lists them), `slow` calls per trial each."""
    out: dict[str, tuple[Step, int]] = {}
    weights = NumpyWeights.from_state_dict(net.state_dict())
    state = np.empty(feature_dim(SERVING_WIDTH), dtype=np.float32)
    out[f"dqn: encode_state into a buffer ({SERVING_WIDTH} rows)"] = (
        lambda: encode_state(view, 0, NOW_S, SERVING_WIDTH, out=state),
        slow,
    )
    encode_state(view, 0, NOW_S, SERVING_WIDTH, out=state)
    model = DispatchModel(view, 0, state)
    rows, ctx = model.rows, model.ctx  # the n slots' rows (padding left out, as the live policy does)
    out["dqn: inline pass, RowScorer + scores of n rows"] = (
        lambda: RowScorer(weights, rows, ctx).scores(rows),
        slow,
    )
    engine = InferenceEngine(SERVING_WIDTH)
    engine.publish(weights)
    cands = np.asarray(view.candidates)
    ones = np.ones(len(cands))

    def snapshot_pass() -> object:
        m = DispatchModel(view, 0, state)
        return engine.inline_pass(m.rows, m.ctx, m.rows_after(cands, ones))

    out["dqn: the policy's snapshot pass (DispatchModel + 2n rows via inline_pass)"] = (snapshot_pass, slow)
    scorer = RowScorer(weights, rows, ctx)
    one_row = rows[n // 2 : n // 2 + 1].copy()
    out["dqn: re-score one row (RowScorer.scores)"] = (lambda: scorer.scores(one_row), slow)
    slot, extra = np.array([n // 2]), np.array([2.0])
    out["dqn: re-score one what-if row (rows_after + InferenceEngine.score)"] = (
        lambda: engine.score(scorer, model.rows_after(slot, extra)),
        slow,
    )
    width = learning_width(n)
    train_state = encode_state(view, 0, NOW_S, width)
    out["dqn: greedy_action on an encoded state (training width)"] = (
        lambda: greedy_action(weights, train_state, view),
        slow,
    )
    greedy = GreedyDqn(weights, width)
    out["dqn: GreedyDqn.choose, encode + greedy (training width)"] = (policy_step(greedy, view), slow)
    x_np = state[None, :].copy()
    m_np = action_mask(view, SERVING_WIDTH)[None, :]
    out[f"dqn: numpy_q + argmax, 1 state of {SERVING_WIDTH} rows"] = (
        lambda: best_candidate(numpy_q(weights, x_np)[0], view.candidates),
        slow,
    )
    x_t = torch.from_numpy(x_np)
    m_t = torch.from_numpy(m_np)

    def torch_forward() -> int:
        with torch.inference_mode():
            return int(masked_argmax(net(x_t), m_t)[0])

    out[f"dqn: torch QNetwork forward + argmax, 1 state of {SERVING_WIDTH} rows"] = (torch_forward, slow)
    return out


def measure(iterations: int, trials: int) -> list[tuple[str, dict[int, float]]]:
    """Rows of (label, {backend count: median ns/decision}) in table order.

    Trials are interleaved (every row once per round, in a fresh shuffled order each round) so that
    load from other processes on a shared machine hits all rows alike and the ratios stay meaningful.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = QNetwork(HIDDEN).eval()
    cases = {(label, n): case for n in BACKEND_COUNTS for label, case in cases_for(n, net, iterations).items()}
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in cases}
    order = list(cases)
    shuffler = random.Random(0)
    for key in order:  # warm-up round, not recorded
        time_once(*cases[key])
    for _ in range(trials):
        shuffler.shuffle(order)
        for key in order:
            samples[key].append(time_once(*cases[key]))
    labels = list(dict.fromkeys(label for label, _ in cases))
    return [(label, {n: statistics.median(samples[label, n]) for n in BACKEND_COUNTS}) for label in labels]


def render(rows: list[tuple[str, dict[int, float]]], command: str, note: str, iterations: int, trials: int) -> str:
    rr = dict(rows)["round_robin"]
    head = "| decision | " + " | ".join(f"{n} backends ns | x round_robin" for n in BACKEND_COUNTS) + " |"
    sep = "|---|" + "---|---|" * len(BACKEND_COUNTS)
    lines = [
        "# Decision cost per policy",
        "",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- method: median of {trials} interleaved rounds (after one warm-up round; rows in shuffled order "
        f"each round) of a tight loop of {iterations} calls per row (the dqn rows: {max(1, iterations // 20)}); "
        "static view, equal capacities unless the row says otherwise, distinct in-flight counts; dqn rows: "
        f"QNetwork(hidden={HIDDEN}) with random weights (the cost does not depend on them), n = the backend "
        "count of the column, training width = learning_width(n) rows ("
        + ", ".join(str(learning_width(n)) for n in BACKEND_COUNTS)
        + "); torch.set_num_threads(1), inference_mode",
    ]
    if note:
        lines.append(f"- note: {note}")
    lines += ["", head, sep]
    for label, by_n in rows:
        cells = " | ".join(f"{by_n[n]:,.0f} | {by_n[n] / rr[n]:.1f}" for n in BACKEND_COUNTS)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--iterations", type=int, default=100_000, help="calls per round for each policy")
    parser.add_argument("--trials", type=int, default=9, help="timed rounds per row (median reported)")
    parser.add_argument("--note", default="", help="free text recorded in the result file (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown result file")
    args = parser.parse_args()
    if args.iterations < 1 or args.trials < 1:
        print("decision_cost: --iterations and --trials must be at least 1", file=sys.stderr)
        return 2
    command = shlex.join(["python", "benchmarks/decision_cost.py", *sys.argv[1:]])
    rows = measure(args.iterations, args.trials)
    text = render(rows, command.strip(), args.note, args.iterations, args.trials)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
