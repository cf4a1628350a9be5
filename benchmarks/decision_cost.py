"""Cost of one balancing decision per heuristic policy, with the DQN's per-decision CPU work as reference.

    .venv/bin/python benchmarks/decision_cost.py [--iterations 100000] [--trials 9] [--note TEXT]
        [--out benchmarks/results/decision_cost.md]

Times `policy.choose(req_class, view, now_s)` in a tight loop on a 4- and a 16-backend `ClusterView`
(equal capacities, distinct in-flight counts and latency costs, all backends candidates), which is
what the proxy pays per request and the simulator pays up to ~200k times per wall-clock second.
Reference rows: an empty call through the same loop (the floor any Python policy pays); `round_robin`
and `least_conn` with unequal weights (smooth WRR instead of plain rotation, the Python scan instead
of the C-level min); `peak_ewma` calling `view.decayed_cost` instead of its inlined copy (why the
copy exists); `encode_state` into a preallocated buffer; a batch-1 forward + masked argmax of the
production MLP shape (84 -> 128 -> 128 -> 16) in NumPy and in torch (one thread, `inference_mode`),
i.e. the DQN's CPU cost per decision without batching. Prints ns/decision (median of interleaved
rounds) and the ratio to round_robin measured in the same run.
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

from lbproxy.observe import FEATURE_DIM, MAX_BACKENDS, ClusterView, action_mask, encode_state  # noqa: E402
from lbproxy.policies import HEURISTICS, PeakEwma, make_policy  # noqa: E402
from lbproxy.rl.network import QNetwork, masked_argmax  # noqa: E402

BACKEND_COUNTS = (4, 16)
HIDDEN = 128  # Settings.hidden default
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
    """A busy-looking view: distinct in-flight counts and costs, so argmin scans do real work."""
    rng = random.Random(seed)
    capacity = [rng.choice((1.0, 2.0, 4.0)) for _ in range(n)] if weighted else None
    view = ClusterView.create(n, capacity=capacity)
    for i in range(n):
        view.in_flight[i] = rng.randint(0, 20)
        view.latency_cost_s[i] = rng.uniform(0.005, 0.2)
        view.last_update_s[i] = NOW_S - rng.uniform(0.0, 5.0)
        view.service_time_s[i] = rng.uniform(0.005, 0.05)
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


def numpy_mlp(net: QNetwork) -> Callable[[np.ndarray, np.ndarray], int]:
    """Batch-1 forward + masked argmax with the network's weights as float32 NumPy arrays."""
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    w1, b1 = sd["body.0.weight"].T.copy(), sd["body.0.bias"].copy()
    w2, b2 = sd["body.2.weight"].T.copy(), sd["body.2.bias"].copy()
    w3, b3 = sd["head.weight"].T.copy(), sd["head.bias"].copy()
    neg_inf = np.float32(-np.inf)

    def forward(x: np.ndarray, mask: np.ndarray) -> int:
        h = np.maximum(x @ w1 + b1, 0.0)
        h = np.maximum(h @ w2 + b2, 0.0)
        q = h @ w3 + b3
        return int(np.where(mask, q, neg_inf).argmax())

    return forward


def torch_mlp(net: QNetwork) -> Callable[[torch.Tensor, torch.Tensor], int]:
    def forward(x: torch.Tensor, mask: torch.Tensor) -> int:
        with torch.inference_mode():
            return int(masked_argmax(net(x), mask)[0])

    return forward


def empty(req_class: int, view: ClusterView, now_s: float) -> int:
    """The cheapest possible policy: what the loop and one Python call cost."""
    return 0


def cases_for(n: int, net: QNetwork, iterations: int) -> dict[str, tuple[Step, int]]:
    """Every row's (step, calls per trial) for an n-backend view."""
    slow = max(1, iterations // 20)  # forward passes are ~100x dearer: keep their trials as short
    view = make_view(n)
    weighted = make_view(n, weighted=True)
    out: dict[str, tuple[Step, int]] = {"(empty call: loop + call floor)": (lambda: empty(0, view, NOW_S), iterations)}
    for name in HEURISTICS:
        out[name] = (policy_step(make_policy(name, 0), view), iterations)
    out["round_robin, unequal weights (smooth WRR)"] = (policy_step(make_policy("round_robin"), weighted), iterations)
    out["least_conn, unequal weights (Python scan)"] = (policy_step(make_policy("least_conn"), weighted), iterations)
    out["peak_ewma via view.decayed_cost (not shipped)"] = (policy_step(PeakEwmaViaMethod(0), view), iterations)
    state = np.empty(FEATURE_DIM, dtype=np.float32)
    mask = np.zeros(MAX_BACKENDS, dtype=bool)
    out["encode_state + action_mask (DQN input)"] = (
        lambda: (encode_state(view, 0, out=state), action_mask(view, out=mask)),
        slow,
    )
    x_np = encode_state(view, 0)[None, :]
    m_np = action_mask(view)[None, :]
    np_forward = numpy_mlp(net)
    out["numpy MLP 84-128-128-16 forward + argmax, batch 1"] = (lambda: np_forward(x_np, m_np), slow)
    x_t = torch.from_numpy(x_np)
    m_t = torch.from_numpy(m_np)
    t_forward = torch_mlp(net)
    out["torch MLP 84-128-128-16 forward + argmax, batch 1"] = (lambda: t_forward(x_t, m_t), slow)
    return out


def measure(iterations: int, trials: int) -> list[tuple[str, dict[int, float]]]:
    """Rows of (label, {backend count: median ns/decision}) in table order.

    Trials are interleaved (every row once per round, in a fresh shuffled order each round) so that
    load from other processes on a shared machine hits all rows alike and the ratios stay meaningful.
    """
    torch.set_num_threads(1)
    net = QNetwork(FEATURE_DIM, MAX_BACKENDS, hidden=HIDDEN).eval()
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
        f"each round) of a tight loop of {iterations} calls per row (forward passes and encode_state: "
        f"{max(1, iterations // 20)}); static view, equal capacities unless the row says otherwise, distinct "
        "in-flight counts; torch.set_num_threads(1), inference_mode",
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
