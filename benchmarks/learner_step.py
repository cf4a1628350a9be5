"""Learner updates/s by batch size and discount, replay add/sample, and the cost of one DQN decision.

    .venv/bin/python benchmarks/learner_step.py [--trials 5] [--out benchmarks/results/learner_step.md] [--note TEXT]

Uses the production shapes: the permutation-equivariant QNetwork (rl/network.py, Settings' hidden
width) over states of the training width (LEARNING_WIDTH_MIN = 16 rows: the replay width of a pool of
up to 16 backends), Settings defaults otherwise. Rows:
- updates/s: `replay.sample` + `Learner.update` (what DqnAgent.observe and the live learner run),
  batch 64/128/256 with gamma 0.5 (Settings default: Double-DQN bootstrap, two more forward passes
  over s'), and batch 128 with gamma 0.0 (a contextual bandit: the update skips s'), on CPU and, when CUDA exists, on
  the GPU (update() returns loss.item(), so each step is synchronised);
- the replay buffer alone: `add` of one transition, `add_batch` of 16 (the live join's per-iteration
  flush, per transition), `sample` of a batch of 128 to CPU tensors;
- decision forward at batch 1: torch under inference_mode; NumPy `numpy_q` (the whole network, padding
  rows included); `greedy_action` (RowScorer over the pool's rows only: what the agent runs); and
  `NumpyWeights.from_state_dict`, the agent's fresh weight copy after each completion that updated;
- a whole greedy `GreedyDqn.choose` (encode_state + greedy_action), and a training agent's
  choose+observe per decision with the default 0.25 updates/decision amortised in (both discounts).
Each figure is the median of --trials; ratios are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import machine, utc_now  # noqa: E402

from lbproxy.config import Settings  # noqa: E402
from lbproxy.observe import (  # noqa: E402
    LEARNING_WIDTH_MIN,
    ClusterView,
    Outcome,
    action_mask,
    encode_state,
    feature_dim,
)
from lbproxy.rl.action_selection import best_candidate, masked_argmax  # noqa: E402
from lbproxy.rl.agent import DqnAgent, GreedyDqn, greedy_action  # noqa: E402
from lbproxy.rl.learner import DqnConfig, Learner  # noqa: E402
from lbproxy.rl.network import NumpyWeights, numpy_q  # noqa: E402
from lbproxy.rl.replay import ReplayBuffer, TransitionBatch  # noqa: E402

READING = """Reading: with torch's default intra-op threads (one per core) a small update is not faster,
and when other processes compete for the cores OpenMP's spinning threads make it several times slower.
Callers that train (simulator loop, live learner thread) should run torch with one thread:
`torch.set_num_threads(1)` (tests/test_rl_core.py does). With gamma 0 an update runs one forward and
one backward pass instead of three forwards and a backward. The agent decides with NumPy over the
pool's rows only (`greedy_action`) and refreshes its NumPy copy of the weights after each completion
that ran an update."""

BATCHES = (64, 128, 256)
GAMMAS = (0.5, 0.0)
BANDIT_BATCH = 128
"""gamma 0 is timed at the Settings batch size only (the batch scaling is the gamma 0.5 rows')."""
WIDTH = LEARNING_WIDTH_MIN
"""Rows per state: the replay width of a pool of up to 16 backends (observe.learning_width)."""
BACKENDS = 4  # a 4-backend pool in 16-row states
OBS_DIM = feature_dim(WIDTH)
GREEDY_ROW = "greedy_action (RowScorer, pool rows only)"
TRIAL_BUDGET_S = 1.0
"""Longest a trial of one row runs (a slow update on a shared machine takes ~50 ms a call)."""


def median_per_call_us(fn: Callable[[], object], calls: int, trials: int) -> float:
    """Median over `trials` of the mean µs per call of `fn`; a trial runs `calls` calls, or fewer when
    they would take more than TRIAL_BUDGET_S (estimated from the warm-up), at least 5."""
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(5):
        fn()
    est_s = max((clock() - t0) / 5e9, 1e-9)
    for _ in range(min(calls, 50, int(TRIAL_BUDGET_S / est_s)) - 5):
        fn()
    calls = max(5, min(calls, int(TRIAL_BUDGET_S / est_s)))
    out = []
    for _ in range(trials):
        t0 = clock()
        for _ in range(calls):
            fn()
        out.append((clock() - t0) / 1000.0 / calls)
    return sorted(out)[len(out) // 2]


def busy_view(seed: int) -> ClusterView:
    """A BACKENDS-slot view with filled estimates and some requests in flight."""
    rng = np.random.default_rng(seed)
    view = ClusterView.create(BACKENDS)
    for k in range(100):
        i = int(rng.integers(BACKENDS))
        queued = int(rng.integers(3))
        view.on_dispatch(i)
        view.on_complete(Outcome(i, k % 3, 0.002 * (i + 1) * (1 + queued), False, queued_behind=queued), k * 1e-3)
    for i in range(BACKENDS):
        for _ in range(int(rng.integers(0, 8))):
            view.on_dispatch(i)
    return view


def filled_replay(n: int = 20_000) -> ReplayBuffer:
    """n transitions over 64 distinct encoded states (real row layouts: padding rows zero)."""
    rng = np.random.default_rng(0)
    states = [encode_state(busy_view(s), s % 3, 0.2, WIDTH) for s in range(64)]
    buf = ReplayBuffer(n, OBS_DIM, WIDTH, seed=0)
    mask = np.zeros(WIDTH, dtype=bool)
    mask[:BACKENDS] = True
    for k in range(n):
        buf.add(states[k % 64], int(rng.integers(BACKENDS)), -float(rng.random()), states[(k + 1) % 64], mask)
    return buf


Row = tuple[str, str, float]
"""(what, device, µs per call)."""


def update_rows(
    cfg: DqnConfig, device: str, replay: ReplayBuffer, trials: int, threads: int
) -> list[tuple[str, str, float]]:
    """`threads` torch intra-op threads (CPU); the default uses every core, which on a shared
    2-core machine can be slower than one thread, so both are measured."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for gamma in GAMMAS:
            for b in BATCHES if gamma > 0.0 else (BANDIT_BATCH,):
                learner = Learner(dataclasses.replace(cfg, gamma=gamma), device=device)
                calls = 200 if device == "cpu" else 500

                def step(b: int = b, lr: Learner = learner) -> float:
                    return lr.update(replay.sample(b, lr.device))

                us = median_per_call_us(step, calls, trials)
                where = f"{device}, {threads} thread{'s' if threads > 1 else ''}" if device == "cpu" else device
                rows.append((f"sample+update, batch {b}, gamma {gamma}", where, us))
    finally:
        torch.set_num_threads(default_threads)
    return rows


def replay_rows(replay: ReplayBuffer, trials: int) -> list[tuple[str, str, float]]:
    s = replay.obs[0].copy()
    mask = replay.next_mask[0].copy()
    scratch = ReplayBuffer(4096, OBS_DIM, WIDTH, seed=0)
    k = 16
    batch = TransitionBatch(np.repeat(s[None], k, axis=0), [0] * k, [-1.0] * k, s, mask)
    calls = 5000
    return [
        (
            "replay.add, 1 transition",
            "cpu",
            median_per_call_us(lambda: scratch.add(s, 0, -1.0, s, mask), calls, trials),
        ),
        (
            f"replay.add_batch, {k} transitions (per transition)",
            "cpu",
            median_per_call_us(lambda: scratch.add_batch(batch), calls // k, trials) / k,
        ),
        ("replay.sample, batch 128", "cpu", median_per_call_us(lambda: replay.sample(128), 500, trials)),
    ]


def forward_rows(cfg: DqnConfig, trials: int) -> list[tuple[str, str, float]]:
    learner = Learner(cfg)
    net = learner.online.eval()
    view = busy_view(1)
    x = encode_state(view, 1, 0.2, WIDTH)
    x_batch = x[None, :]
    mask_np = action_mask(view, WIDTH)
    mask_t = torch.from_numpy(mask_np)
    weights = NumpyWeights.from_state_dict(net.state_dict())

    def torch_inference() -> int:
        with torch.inference_mode():
            return int(masked_argmax(net(torch.from_numpy(x_batch)), mask_t)[0])

    def numpy_whole() -> int:
        return best_candidate(numpy_q(weights, x_batch)[0], view.candidates)

    greedy = GreedyDqn(weights, WIDTH)
    calls = 2000
    rows = [
        ("forward+argmax batch 1: torch inference_mode", "cpu", median_per_call_us(torch_inference, calls, trials)),
        ("forward+argmax batch 1: NumPy numpy_q", "cpu", median_per_call_us(numpy_whole, calls, trials)),
        (
            GREEDY_ROW,
            "cpu",
            median_per_call_us(lambda: greedy_action(weights, x, view), calls, trials),
        ),
        (
            "NumpyWeights.from_state_dict (agent's weight refresh)",
            "cpu",
            median_per_call_us(lambda: NumpyWeights.from_state_dict(net.state_dict()), calls, trials),
        ),
        ("encode_state alone", "cpu", median_per_call_us(lambda: encode_state(view, 1, 0.2, WIDTH), calls, trials)),
        ("GreedyDqn.choose", "cpu", median_per_call_us(lambda: greedy.choose(1, view, 0.2), calls, trials)),
    ]
    return rows


def training_agent_row(cfg: DqnConfig, trials: int, threads: int) -> tuple[str, str, float]:
    """choose + observe per decision for a training agent past learning_starts (default cadence)."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _training_agent_row(cfg, trials, threads)
    finally:
        torch.set_num_threads(default_threads)


def _training_agent_row(cfg: DqnConfig, trials: int, threads: int) -> tuple[str, str, float]:
    learner = Learner(cfg)
    replay = ReplayBuffer(cfg.buffer_size, OBS_DIM, WIDTH, seed=0)
    agent = DqnAgent(learner, replay, cfg, total_decisions=10**6, seed=0, width=WIDTH)
    view = ClusterView.create(BACKENDS)
    state = {"t": 0.0}

    def step() -> None:
        state["t"] += 0.001
        did = agent.decisions
        c = did % 3
        i = agent.choose(c, view, state["t"])
        queued = view.in_flight[i]
        view.on_dispatch(i)
        out = Outcome(i, c, 0.01 * (i + 1), False, decision_id=did, queued_behind=queued)
        view.on_complete(out, state["t"])
        agent.observe(out, view, state["t"])

    for _ in range(cfg.learning_starts + 10):
        step()
    us = median_per_call_us(step, 2000, trials)
    where = f"cpu, {threads} thread{'s' if threads > 1 else ''}"
    return (
        f"training agent choose+observe ({cfg.updates_per_decision} updates/decision, gamma {cfg.gamma})",
        where,
        us,
    )


def measure_rows(cfg: DqnConfig, trials: int, threads: int) -> tuple[list[Row], list[Row]]:
    """Every row in table order, and the decision-forward rows among them."""
    replay = filled_replay()
    rows = update_rows(cfg, "cpu", replay, trials, threads)
    if threads > 1:
        rows += update_rows(cfg, "cpu", replay, trials, 1)
    if torch.cuda.is_available():
        rows += update_rows(cfg, "cuda", replay, trials, threads)
    else:
        print("CUDA rows skipped: no CUDA device", file=sys.stderr)
    rows += replay_rows(replay, trials)
    fwd = forward_rows(cfg, trials)
    rows += fwd
    for gamma in GAMMAS:
        agent_cfg = dataclasses.replace(cfg, gamma=gamma)
        rows.append(training_agent_row(agent_cfg, trials, threads))
        if threads > 1:
            rows.append(training_agent_row(agent_cfg, trials, 1))
    return rows, fwd


def summary_text(rows: list[Row], fwd: list[Row], threads: int) -> str:
    """The ratios measured side by side: torch vs greedy_action, gamma 0.5 vs 0, many threads vs one."""
    by_name = {what: us for what, _dev, us in fwd}
    ratio = by_name["forward+argmax batch 1: torch inference_mode"] / by_name[GREEDY_ROW]
    summary = f"- batch-1 decision: torch inference_mode / greedy_action = {ratio:.2f}x (the agent uses greedy_action)"
    cpu = {(what, dev): us for what, dev, us in rows}
    b = BANDIT_BATCH
    for where in dict.fromkeys(dev for what, dev, _us in rows if what.startswith("sample+update")):
        bandit = cpu[(f"sample+update, batch {b}, gamma 0.0", where)]
        boot = cpu[(f"sample+update, batch {b}, gamma 0.5", where)]
        summary += f"\n- update batch {b} ({where}): gamma 0.5 / gamma 0.0 time = {boot / bandit:.2f}x"
    if threads > 1:
        for b in BATCHES:
            many = cpu[(f"sample+update, batch {b}, gamma 0.5", f"cpu, {threads} threads")]
            one = cpu[(f"sample+update, batch {b}, gamma 0.5", "cpu, 1 thread")]
            summary += f"\n- update batch {b}, gamma 0.5: {threads} torch threads / 1 thread time = {many / one:.2f}x"
    return summary


def main(argv: list[str] | None = None) -> int:
    global TRIAL_BUDGET_S  # read by median_per_call_us: a script-wide knob, set once here from the flag
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--trial-budget-s",
        type=float,
        default=TRIAL_BUDGET_S,
        help="longest a trial of one row runs (the smoke test uses 0.05; figures need the default)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/learner_step.md")
    ap.add_argument("--note", default="", help="free text for the results file (e.g. 'machine shared')")
    args = ap.parse_args(argv)
    TRIAL_BUDGET_S = args.trial_budget_s
    cfg = DqnConfig.from_settings(Settings.model_validate({}))
    threads = torch.get_num_threads()
    rows, fwd = measure_rows(cfg, args.trials, threads)
    lines = ["| what | device | µs per call | calls/s |", "|---|---|---|---|"]
    lines += [f"| {what} | {dev} | {us:.1f} | {1e6 / us:,.0f} |" for what, dev, us in rows]
    summary = summary_text(rows, fwd, threads)
    table = "\n".join(lines)
    print(table)
    print(summary, flush=True)

    cmd = shlex.join([".venv/bin/python", "benchmarks/learner_step.py", *(argv if argv is not None else sys.argv[1:])])
    text = (
        "# Learner step and decision forward cost\n\n"
        f"- date: {utc_now()}\n"
        f"- machine: {machine()}\n"
        f"- command: `{cmd.strip()}`\n"
        f"- network: QNetwork(hidden={cfg.hidden}) (permutation-equivariant, rl/network.py) over states of {WIDTH}"
        f" rows ({OBS_DIM} features), Adam, Double DQN (gamma > 0), Huber, grad clip {cfg.grad_clip};"
        f" {BACKENDS} backends available; median of {args.trials} trials (each up to the row's call count or"
        f" ~{TRIAL_BUDGET_S:g} s, whichever comes first)\n"
        + (f"- note: {args.note}\n" if args.note else "")
        + f"\n{table}\n\n{summary}\n\n{READING}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
