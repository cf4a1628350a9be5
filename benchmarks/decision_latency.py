"""Decision latency: the inline NumPy pass, off-loop passes by batch size (CPU, and GPU eager vs CUDA
graphs when CUDA exists), and a whole dqn decision as the proxy pays for it.

    .venv/bin/python benchmarks/decision_latency.py [--repeats 2000] [--out benchmarks/results/decision_latency.md]

The network is the production shape (rl/network.py: QNetwork with Settings' hidden width; weights set to
route like least in-flight, common.load_routing_network, so the policy rows spread load) over states of
the serving width (MAX_BACKENDS rows: create_dqn_runtime serves with room for every slot the pool can
have), encoded from a 4-backend pool. Pass rows:
- the inline pass (the default CPU path, `InferenceEngine.inline_pass`): one state's pooled summary and
  the scores of its n rows plus the n what-if rows after one more dispatch, what the dqn policy runs
  once per loop iteration and request class;
- off-loop passes over a block of k states, what `submit_q` batches: the `thread` backend's NumPy pass
  (`InferenceEngine.q_values`), the torch forward on the CPU as a reference (not an engine backend), and
  on CUDA the device pass with host staging included, then pre-staged (one H2D copy, the graph or eager
  forward, one D2H copy and the sync).
Also times a whole decision of the dqn policy for N requests arriving in one loop iteration (uvloop),
which is what a proxy request pays, next to round robin in the same harness: inline, off-loop through
the worker thread, and on the CUDA device when there is one.
On an H200 the same command adds the GPU rows (targets: >= 20 M states/s at batch 8192, p99 <= 100 µs
at batch <= 512); without CUDA it prints "skipped: no CUDA".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import command, load_routing_network, machine, utc_now, write_result  # noqa: E402

from lbproxy.observe import MAX_BACKENDS, ClusterView, DispatchModel, Outcome, encode_state, feature_dim  # noqa: E402
from lbproxy.policies import make_policy  # noqa: E402
from lbproxy.policies.dqn import DqnPolicy  # noqa: E402
from lbproxy.policy import AsyncPolicy  # noqa: E402
from lbproxy.rl.batcher import InferenceEngine  # noqa: E402
from lbproxy.rl.iteration import OFF_LOOP_LEVELS  # noqa: E402

CPU_BATCHES = (1, 2, 8, 32, 128, 512)
GPU_BATCHES = (1, 8, 32, 128, 512, 2048, 8192)
HIDDEN = 64  # Settings.hidden default
WIDTH = MAX_BACKENDS
"""Rows of a served state (create_dqn_runtime in serve mode)."""
BACKENDS = 4
TRIALS = 7

Samples = tuple[float, float]


def make_view(seed: int) -> ClusterView:
    """A 4-backend view with filled estimates and some requests in flight (distinct per seed)."""
    rng = np.random.default_rng(seed)
    view = ClusterView.create(BACKENDS)
    for k in range(200):
        i = int(rng.integers(BACKENDS))
        queued = int(rng.integers(3))
        view.on_dispatch(i)
        view.on_complete(Outcome(i, k % 3, 0.002 * (i + 1) * (1 + queued), False, queued_behind=queued), k * 1e-3)
    for i in range(BACKENDS):
        view.in_flight[i] = int(rng.integers(0, 12))
    view.total_in_flight = sum(view.in_flight)
    return view


def inputs(k: int) -> np.ndarray:
    """k flat states of WIDTH rows (16 distinct ones, tiled)."""
    distinct = np.stack([encode_state(make_view(s), s % 3, 1.0, WIDTH) for s in range(min(k, 16))])
    return np.ascontiguousarray(np.resize(distinct, (k, distinct.shape[1])))


def percentiles(samples: list[float]) -> Samples:
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """µs per call of `fn`, one sample per call, after a warm-up."""
    for _ in range(20):
        fn()
    out = []
    clock = time.perf_counter_ns
    for _ in range(repeats):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000.0)
    return out


def time_inline(engine: InferenceEngine, repeats: int) -> Samples:
    """p50 and p99 (µs) of the dqn policy's inline pass over one snapshot (rl/iteration.py `_evaluate`)."""
    state = inputs(1)[0]
    model = DispatchModel(make_view(0), 0, state)
    cands = np.arange(BACKENDS)
    more = model.rows_after(cands, np.ones(BACKENDS))
    return percentiles(time_calls(lambda: engine.inline_pass(model.rows, model.ctx, more), repeats))


def time_cpu_passes(fn: Callable[[np.ndarray], object], k: int, repeats: int) -> Samples:
    """p50 and p99 (µs) of one pass of `fn` over k states."""
    states = inputs(k)
    return percentiles(time_calls(lambda: fn(states), repeats))


def time_device(engine: InferenceEngine, k: int, repeats: int, staged: bool) -> Samples:
    """p50 and p99 (µs) of a device pass over k states, timed on the engine's device thread (where the
    live passes run): with the host staging copy into pinned memory, or over rows already staged (the
    live path stages them as blocks are queued)."""
    runner = engine._cuda
    assert runner is not None and engine._executor is not None
    states = inputs(k)
    runner.staging[:k] = states

    def one() -> object:
        return runner.run_staged(k) if staged else runner.run(states)

    return percentiles(engine._executor.submit(time_calls, one, repeats).result())


async def time_policy(policy: Any, concurrency: int, rounds: int) -> float:
    """µs per decision when `concurrency` requests arrive in one loop iteration, as the proxy makes
    them: decide, then dispatch (and complete, so the view stays bounded). Median of TRIALS; the
    harness's own cost is the round_robin row's."""
    view = ClusterView.create(BACKENDS)
    out = Outcome(0, 0, 0.001, False)
    is_async = isinstance(policy, AsyncPolicy)  # a runtime Protocol check costs µs: once, not per call

    async def one_round() -> None:
        pending = []
        for _ in range(concurrency):
            res = policy.decide(0, view, 0.0) if is_async else (policy.choose(0, view, 0.0), -1)
            if type(res) is tuple:
                view.on_dispatch(res[0])
            else:
                pending.append(res)
        for a, _ in await asyncio.gather(*pending):
            view.on_dispatch(a)
        await asyncio.sleep(0)  # the next loop iteration
        for i in range(view.n):
            out.backend = i
            for _ in range(view.in_flight[i]):
                view.on_complete(out, 0.0)

    for _ in range(5):
        await one_round()
    trials = []
    for _ in range(TRIALS):  # median of trials: the machine this ran on was shared
        t0 = time.perf_counter_ns()
        for _ in range(rounds):
            await one_round()
        trials.append((time.perf_counter_ns() - t0) / 1000.0 / (rounds * concurrency))
    return sorted(trials)[len(trials) // 2]


PASS_HEADER = (
    "| path | states per pass | p50 µs/pass | p99 µs/pass | ns/state (p50) | M states/s (p50) |\n"
    "|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--repeats",
        type=int,
        default=2000,
        help="timed passes per pass row (the policy rows time 2x this many requests)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/decision_latency.md")
    ap.add_argument("--note", default="", help="free text for the results file (e.g. 'machine shared')")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    net = load_routing_network(HIDDEN)  # spreads load; the passes cost the same whatever the weights
    print(PASS_HEADER)
    rows, gpu_note = pass_rows(net, args.repeats)
    decide_rows = decision_rows(net, args.repeats)
    write_result(args.out, report(net, command(argv), args.note, rows, gpu_note, decide_rows))
    return 0


def pass_rows(net: Any, repeats: int) -> tuple[list[str], str]:
    """The pass table's rows (printed as they come) and the GPU note ("" when CUDA rows were run)."""
    rows: list[str] = []

    def emit(path: str, k: int, p50: float, p99: float) -> None:
        per_ns = p50 * 1000.0 / k
        rate = k / (p50 * 1e-6)
        line = f"| {path} | {k} | {p50:.1f} | {p99:.1f} | {per_ns:.0f} | {rate / 1e6:.2f} |"
        rows.append(line)
        print(line, flush=True)

    def cpu_repeats(k: int) -> int:
        """Fewer repeats for big CPU blocks (a NumPy pass scores its states one by one)."""
        return max(min(repeats, 50), repeats * 32 // max(k, 32))

    inline = InferenceEngine(WIDTH)
    inline.load_network(net)
    emit(f"CPU numpy, inline pass ({BACKENDS} + {BACKENDS} rows)", 1, *time_inline(inline, repeats))
    thread = InferenceEngine(WIDTH, max_batch=max(CPU_BATCHES), cpu_backend="thread")
    thread.load_network(net)
    for k in CPU_BATCHES:
        emit("CPU numpy, off-loop pass (thread backend)", k, *time_cpu_passes(thread.q_values, k, cpu_repeats(k)))
    thread.close()

    def torch_pass(states: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(states)).numpy()

    for k in CPU_BATCHES:
        emit("CPU torch forward (reference, not an engine backend)", k, *time_cpu_passes(torch_pass, k, cpu_repeats(k)))
    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return rows, "skipped: no CUDA"
    for graphs in (False, True):
        eng = InferenceEngine(WIDTH, max_batch=max(GPU_BATCHES), device="cuda", use_graphs=graphs)
        eng.load_network(net)
        label = "CUDA graph" if graphs else "eager"
        for k in GPU_BATCHES:
            emit(f"GPU {label}, host staging incl.", k, *time_device(eng, k, repeats, staged=False))
        for k in GPU_BATCHES:
            emit(f"GPU {label}, pre-staged", k, *time_device(eng, k, repeats, staged=True))
        eng.close()
    return rows, ""


def decision_rows(net: Any, repeats: int) -> list[str]:
    """What a proxy request pays for its decision: the dqn policy (state snapshot, the iteration's pass,
    dispatch-moved scores; or the off-loop round trip), next to round robin in the same harness."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    paths = {
        "round_robin": "round_robin (harness baseline)",
        "numpy": "dqn, inline on the loop",
        "thread": "dqn, worker thread (off-loop)",
    }
    if torch.cuda.is_available():
        paths["cuda"] = "dqn, CUDA device (off-loop)"
    decide_rows = []
    for backend, where in paths.items():
        for conc in (1, 8, 64, 256):
            eng = None
            if backend == "round_robin":
                policy: Any = make_policy("round_robin", 0)
            else:
                device = "cuda" if backend == "cuda" else "cpu"
                cpu_backend = "thread" if backend == "thread" else "numpy"
                eng = InferenceEngine(WIDTH, max_batch=256, device=device, cpu_backend=cpu_backend)
                eng.load_network(net)
                policy = DqnPolicy(eng, width=WIDTH)
            rounds = max(10, 2 * repeats // conc)
            us = runner(time_policy(policy, conc, rounds))
            mean_batch = f"{eng.decisions / eng.passes:.1f}" if eng is not None and eng.passes else "-"
            if eng is not None:
                eng.close()
            line = f"| {where} | {conc} per iteration | {us:.2f} µs/decision | {mean_batch} |"
            decide_rows.append(line)
            print(line, flush=True)
    return decide_rows


def report(net: Any, cmd: str, note: str, rows: list[str], gpu_note: str, decide_rows: list[str]) -> list[str]:
    return [
        "# Decision latency by batch size",
        "",
        f"- date: {utc_now()}",
        f"- machine: {machine()}",
        f"- command: `{cmd}`",
        f"- network: QNetwork(hidden={HIDDEN}, summary={net.summary}) (permutation-equivariant, rl/network.py),"
        " weights set by hand to route like least in-flight (benchmarks/common.py `load_routing_network`: a"
        " random network sends a whole iteration to one backend);"
        f" states of {WIDTH} rows ({feature_dim(WIDTH)} features) from a {BACKENDS}-backend pool; a pass"
        " returns scores / Q-values (the policy's argmax is not in the pass rows);"
        " torch.set_num_threads(1); GPU rows include the pinned host copy in and out",
        f"- note: {note}" if note else "",
        "",
        PASS_HEADER,
        *rows,
        "",
        f"GPU: {gpu_note}" if gpu_note else "",
        "",
        "Notes: the inline pass is ONE state, whatever the load: it answers every decision of its request"
        " class in one loop iteration, and only the backends' rows are scored (padding rows are left out)."
        " An off-loop pass scores all the rows of each state it gets, padding included, and the NumPy one"
        f" (the `thread` backend) does so state by state; the dqn policy sends {OFF_LOOP_LEVELS} states per"
        " snapshot (every backend after 0.."
        f"{OFF_LOOP_LEVELS - 1} more dispatches), so a state here is not a decision. NumPy's OpenBLAS runs"
        " single-threaded (the engine caps it: its spinning threads fought the event loop on 2 cores)."
        " GPU targets (H200: >= 20 M states/s at batch 8192, p99 <= 100 µs at batch <= 512, copies"
        " included) need a CUDA machine: run this same command there.",
        "",
        f"## A decision as the proxy pays for it (uvloop): N requests per loop iteration, {BACKENDS} backends",
        "",
        "Each request: the policy's decision, then its dispatch; the round completes them all. The"
        " round_robin rows are the harness's own cost. Inline, the dqn policy decides an iteration's"
        " requests from one state snapshot and ONE pass (the first decision of the iteration pays it),"
        " each dispatch re-scoring only the dispatched backend's row (exact: nothing else of any score"
        " changes); 'worker thread' is the off-loop path that the CUDA device uses (the same snapshots,"
        f" {OFF_LOOP_LEVELS} states each, their passes in a device thread, each request suspended until its"
        " snapshot's pass lands; a backend that takes more dispatches than the snapshot scored needs a new"
        " snapshot), run with the NumPy pass: its cost is what the event loop pays whatever the device"
        " (the harness gathers the suspended requests, a task each). 'mean batch' is decisions per pass.",
        "",
        "| path | load | cost | mean batch |",
        "|---|---|---|---|",
        *decide_rows,
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
