"""Learner updates/s by batch size, and the cost of one DQN decision (torch vs NumPy at batch 1).

    .venv/bin/python benchmarks/learner_step.py [--trials 5] [--out benchmarks/results/learner_step.md] [--note TEXT]

Uses the production shapes (FEATURE_DIM -> 128 -> 128 -> MAX_BACKENDS, Settings defaults). Rows:
- updates/s: `replay.sample` + `Learner.update` (what DqnAgent.observe runs), batch 64/128/256, on
  CPU and, when CUDA exists, on the GPU (update() returns loss.item(), so each step is synchronised);
- decision forward at batch 1: torch under inference_mode and under no_grad, NumPy over views of
  the parameters (rl/agent.NumpyQ, what the agent uses) and NumPy over contiguous copies;
- a whole greedy `DqnAgent.choose` (encode_state + forward + masked argmax), and a training agent's
  choose+observe per decision with the default 0.25 updates/decision amortised in.
Each figure is the median of --trials; ratios are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import machine  # noqa: E402

from lbproxy.config import Settings  # noqa: E402
from lbproxy.observe import FEATURE_DIM, MAX_BACKENDS, ClusterView, Outcome, encode_state  # noqa: E402
from lbproxy.rl.agent import DqnAgent, NumpyQ  # noqa: E402
from lbproxy.rl.batcher import prepare_weights  # noqa: E402
from lbproxy.rl.learner import DqnConfig, Learner  # noqa: E402
from lbproxy.rl.network import masked_argmax, numpy_q  # noqa: E402
from lbproxy.rl.replay import ReplayBuffer  # noqa: E402

READING = """Reading: with torch's default intra-op threads (one per core) a small update is not faster,
and when other processes compete for the cores OpenMP's spinning threads make it several times slower
(on an idle moment of this machine the two settings were within ~1.3x of each other). Callers that
train (simulator loop, live learner thread) should run torch with one thread:
`torch.set_num_threads(1)` (tests/test_rl_core.py does). The agent decides with NumPy over views of
the CPU parameters: no copy to refresh, and ~4x cheaper than a torch batch-1 forward."""

BATCHES = (64, 128, 256)
BACKENDS = 4  # a 4-backend pool in a 16-slot action space


def median_per_call_us(fn: Callable[[], object], calls: int, trials: int) -> float:
    for _ in range(min(calls, 50)):
        fn()
    out = []
    for _ in range(trials):
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter_ns() - t0) / 1000.0 / calls)
    return sorted(out)[len(out) // 2]


def filled_replay(n: int = 20_000) -> ReplayBuffer:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(n, FEATURE_DIM, MAX_BACKENDS, seed=0)
    mask = np.zeros(MAX_BACKENDS, dtype=bool)
    mask[:BACKENDS] = True
    for _ in range(n):
        s = rng.random(FEATURE_DIM, dtype=np.float32)
        buf.add(s, int(rng.integers(BACKENDS)), -float(rng.random()), s, mask)
    return buf


def update_rows(
    cfg: DqnConfig, device: str, replay: ReplayBuffer, trials: int, threads: int
) -> list[tuple[str, str, float]]:
    """`threads` torch intra-op threads (CPU); the default uses every core, which on a shared
    2-core machine can be slower than one thread, so both are measured."""
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for b in BATCHES:
            learner = Learner(FEATURE_DIM, MAX_BACKENDS, cfg, device=device)
            calls = 200 if device == "cpu" else 500

            def step(b: int = b, lr: Learner = learner) -> float:
                return lr.update(replay.sample(b, lr.device))

            us = median_per_call_us(step, calls, trials)
            where = f"{device}, {threads} thread{'s' if threads > 1 else ''}" if device == "cpu" else device
            rows.append((f"sample+update, batch {b}", where, us))
    finally:
        torch.set_num_threads(default_threads)
    return rows


def forward_rows(cfg: DqnConfig, trials: int) -> list[tuple[str, str, float]]:
    learner = Learner(FEATURE_DIM, MAX_BACKENDS, cfg)
    net = learner.online
    view = ClusterView.create(BACKENDS)
    x = encode_state(view, 0)
    mask_np = np.zeros(MAX_BACKENDS, dtype=bool)
    mask_np[:BACKENDS] = True
    mask_t = torch.from_numpy(mask_np)
    shared = NumpyQ(net, share=True)
    copied = functools.partial(numpy_q, prepare_weights(net.state_dict()))  # the live engine's contiguous copies

    def torch_inference() -> int:
        with torch.inference_mode():
            return int(masked_argmax(net(torch.from_numpy(x)), mask_t))

    def torch_no_grad() -> int:
        with torch.no_grad():
            return int(masked_argmax(net(torch.from_numpy(x)), mask_t))

    def numpy_views() -> int:
        return int(np.where(mask_np, shared(x), -np.inf).argmax())

    def numpy_copies() -> int:
        return int(np.where(mask_np, copied(x), -np.inf).argmax())

    greedy = DqnAgent(learner, None, cfg, train=False, total_decisions=1, seed=0)
    calls = 5000
    rows = [
        ("forward+argmax batch 1: torch inference_mode", "cpu", median_per_call_us(torch_inference, calls, trials)),
        ("forward+argmax batch 1: torch no_grad", "cpu", median_per_call_us(torch_no_grad, calls, trials)),
        ("forward+argmax batch 1: NumPy, parameter views", "cpu", median_per_call_us(numpy_views, calls, trials)),
        ("forward+argmax batch 1: NumPy, contiguous copies", "cpu", median_per_call_us(numpy_copies, calls, trials)),
        ("encode_state alone", "cpu", median_per_call_us(lambda: encode_state(view, 1), calls, trials)),
        ("DqnAgent.choose, greedy", "cpu", median_per_call_us(lambda: greedy.choose(1, view, 0.0), calls, trials)),
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
    learner = Learner(FEATURE_DIM, MAX_BACKENDS, cfg)
    replay = ReplayBuffer(cfg.buffer_size, FEATURE_DIM, MAX_BACKENDS, seed=0)
    agent = DqnAgent(learner, replay, cfg, train=True, total_decisions=10**6, seed=0)
    view = ClusterView.create(BACKENDS)
    state = {"t": 0.0}

    def step() -> None:
        state["t"] += 0.001
        did = agent.decisions
        i = agent.choose(did % 3, view, state["t"])
        view.on_dispatch(i)
        out = Outcome(i, did % 3, 0.01 * (i + 1), False, decision_id=did)
        view.on_complete(out, state["t"])
        agent.observe(out, view, state["t"])

    for _ in range(cfg.learning_starts + 10):
        step()
    us = median_per_call_us(step, 2000, trials)
    where = f"cpu, {threads} thread{'s' if threads > 1 else ''}"
    return (f"training agent choose+observe ({cfg.updates_per_decision} updates/decision)", where, us)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/learner_step.md")
    ap.add_argument("--note", default="", help="free text for the results file (e.g. 'machine shared')")
    args = ap.parse_args(argv)
    cfg = DqnConfig.from_settings(Settings.model_validate({}))
    replay = filled_replay()

    threads = torch.get_num_threads()
    rows = update_rows(cfg, "cpu", replay, args.trials, threads)
    if threads > 1:
        rows += update_rows(cfg, "cpu", replay, args.trials, 1)
    if torch.cuda.is_available():
        rows += update_rows(cfg, "cuda", replay, args.trials, threads)
    else:
        print("CUDA rows skipped: no CUDA device", file=sys.stderr)
    fwd = forward_rows(cfg, args.trials)
    rows += fwd
    rows.append(training_agent_row(cfg, args.trials, threads))
    if threads > 1:
        rows.append(training_agent_row(cfg, args.trials, 1))

    lines = ["| what | device | µs per call | calls/s |", "|---|---|---|---|"]
    lines += [f"| {what} | {dev} | {us:.1f} | {1e6 / us:,.0f} |" for what, dev, us in rows]
    by_name = {what: us for what, _dev, us in fwd}
    ratio = (
        by_name["forward+argmax batch 1: torch inference_mode"]
        / by_name["forward+argmax batch 1: NumPy, parameter views"]
    )
    summary = f"- batch-1 decision: torch inference_mode / NumPy views = {ratio:.2f}x (the agent uses NumPy views)"
    if threads > 1:
        cpu = {(what, dev): us for what, dev, us in rows}
        for b in BATCHES:
            many = cpu[(f"sample+update, batch {b}", f"cpu, {threads} threads")]
            one = cpu[(f"sample+update, batch {b}", "cpu, 1 thread")]
            summary += f"\n- update batch {b}: {threads} torch threads / 1 thread time = {many / one:.2f}x"
    table = "\n".join(lines)
    print(table)
    print(summary, flush=True)

    cmd = shlex.join([".venv/bin/python", "benchmarks/learner_step.py", *(argv if argv is not None else sys.argv[1:])])
    text = (
        "# Learner step and decision forward cost\n\n"
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- machine: {machine()}\n"
        f"- command: `{cmd.strip()}`\n"
        f"- network: {FEATURE_DIM} -> {cfg.hidden} -> {cfg.hidden} -> {MAX_BACKENDS}, Adam, Double DQN, "
        f"Huber, grad clip {cfg.grad_clip}; {BACKENDS} backends available; median of {args.trials} trials\n"
        + (f"- note: {args.note}\n" if args.note else "")
        + f"\n{table}\n\n{summary}\n\n{READING}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
