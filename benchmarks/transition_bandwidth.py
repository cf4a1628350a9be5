"""Bandwidth one proxy replica would need to a remote learner: transitions up, weights down (issue 12).

Bytes of one transition as the live learner stores it: one row of each ReplayBuffer array (rl/replay.py;
the `--learner-process` shared-memory block has the same fields and dtypes, rl/learner_process.py):
obs and next_obs float32 x feature_dim(width), next_mask bool x width, action int64, reward and done
float32, where width = learning_width(n) (16 rows for any cluster of up to 16 backends: padded rows are
zeros). "Dense" is what a wire format that sends only the cluster's own n rows would carry. The
compression column is measured: zlib level 1 over 256-row batches of transitions the simulator's agent
stored (shipped model, epsilon 0.02, no updates), on a 4- and a 16-backend cluster.

One weight snapshot: the QNetwork state_dict of the shipped model (lbproxy/models/dqn_default.pth), as
float32 tensors (what a replica would pull).

Rates (one proxy worker, measured on this 2-vCPU machine, see the results files named): each routed
request makes one transition, so transition bytes/s = req/s x bytes per transition.

    .venv/bin/python benchmarks/transition_bandwidth.py
(benchmarks/replicas.py appends the same lines to benchmarks/results/replicas.md)
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import utc_now  # noqa: E402

from lbproxy.observe import feature_dim, learning_width  # noqa: E402
from lbproxy.rl.agent import DqnAgent  # noqa: E402
from lbproxy.rl.checkpoint import default_model_path, load_model  # noqa: E402
from lbproxy.rl.learner import DqnConfig, Learner  # noqa: E402
from lbproxy.rl.replay import ReplayBuffer, ReplaySamples  # noqa: E402
from lbproxy.sim import Scenario, load_scenario  # noqa: E402
from lbproxy.sim.episode import run_episode  # noqa: E402
from lbproxy.sim.generator import MAX_GENERATED_BACKENDS, generate_scenario  # noqa: E402

RATES_RPS = (
    ("1 worker, dqn --online (benchmarks/results/dqn_proxy.md, 2026-12-01)", 3_170),
    ("1 worker, round_robin (benchmarks/results/workers.md, 2026-12-01)", 3_331),
    ("1 core, round_robin, idle machine (benchmarks/results/proxy_overhead.md, 2026-11-24)", 22_385),
)
"""Requests per second of one proxy worker: each is one transition for the learner."""
WEIGHT_SYNC_S = (1.0, 10.0)
"""Weight-pull intervals the bandwidth is given for (SCALE_OUT.md proposes 1 s; 10 s for a quiet link)."""
BATCH_ROWS = 256
"""Transitions per shipped batch (and per compressed block)."""
SAMPLE_DECISIONS = 2048
"""Decisions simulated per cluster to get realistic rows for the compression measurement."""


def row_bytes(width: int) -> int:
    """Bytes of one transition in a ReplayBuffer of `width` rows (every stored field, one row)."""
    replay = ReplayBuffer(1, feature_dim(width), width)
    return sum(getattr(replay, f).nbytes for f in ReplaySamples._fields)


def dense_bytes(n: int) -> int:
    """The same transition with only the cluster's n rows: 2 states, n mask bytes, action, reward, done."""
    return 2 * 4 * feature_dim(n) + n + 8 + 4 + 4


def weight_bytes() -> tuple[int, int]:
    """(float32 bytes of the shipped model's state_dict, parameter count)."""
    net, _meta = load_model(default_model_path())
    tensors = list(net.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors)


def sixteen_backends() -> Scenario:
    """The first generated training cluster with MAX_GENERATED_BACKENDS backends (the generator is pure)."""
    seed = 0
    while len(generate_scenario(seed, "train").cluster.servers) != MAX_GENERATED_BACKENDS:
        seed += 1
    return generate_scenario(seed, "train")


def compression(scenario: Scenario) -> tuple[float, float]:
    """(raw / zlib-1 bytes, CPU µs per transition to compress) over BATCH_ROWS-row batches of the
    transitions the agent stores on `scenario`."""
    torch.set_num_threads(1)
    width = learning_width(len(scenario.cluster.servers))
    net, _meta = load_model(default_model_path())
    cfg = DqnConfig(
        eps_start=0.02,
        eps_end=0.02,
        buffer_size=SAMPLE_DECISIONS,
        learning_starts=SAMPLE_DECISIONS,
        hidden=net.hidden,  # the shipped model's width, whatever it is
    )
    learner = Learner(cfg)
    learner.online.load_state_dict(net.state_dict())
    replay = ReplayBuffer(cfg.buffer_size, feature_dim(width), width)
    agent = DqnAgent(learner, replay, cfg, total_decisions=SAMPLE_DECISIONS, seed=0, width=width)
    phase = min(1, len(scenario.phases) - 1)  # the mixed phase where there is one
    run_episode(lambda _sim: agent, scenario, 7, phase, SAMPLE_DECISIONS - 1)  # fills the replay; no update runs
    raw = packed = rows = 0
    cpu_s = 0.0
    for lo in range(0, len(replay) - BATCH_ROWS + 1, BATCH_ROWS):
        block = b"".join(
            np.ascontiguousarray(getattr(replay, f)[lo : lo + BATCH_ROWS]).tobytes() for f in ReplaySamples._fields
        )
        t0 = time.process_time()
        packed += len(zlib.compress(block, 1))
        cpu_s += time.process_time() - t0
        raw += len(block)
        rows += BATCH_ROWS
    return raw / packed, 1e6 * cpu_s / rows


def bandwidth_lines() -> list[str]:
    """The results-file section: per-transition and per-snapshot bytes, and MB/s per replica."""
    clusters = (
        ("4 backends (curriculum)", load_scenario("curriculum")),
        ("16 backends (generated)", sixteen_backends()),
    )
    wbytes, params = weight_bytes()
    lines = [
        "## Bandwidth per replica to a remote learner",
        "",
        f"- computed {utc_now()} by `python benchmarks/transition_bandwidth.py` "
        "(benchmarks/replicas.py runs it too); the rates are copied from the results files named in the table; "
        "compression CPU is process time on the shared 2-vCPU machine",
        "",
        "| cluster | stored width | bytes / transition (as stored) | dense (n rows) | zlib-1 ratio (measured) "
        "| bytes compressed | zlib-1 CPU µs / transition |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    per = []
    for label, scen in clusters:
        n = len(scen.cluster.servers)
        width = learning_width(n)
        stored, (ratio, us) = row_bytes(width), compression(scen)
        per.append((label, stored, ratio))
        lines.append(
            f"| {label} | {width} | {stored:,} | {dense_bytes(n):,} | {ratio:.1f}x | {stored / ratio:,.0f} | {us:.1f} |"
        )
    lines += [
        "",
        f"Weight snapshot (shipped model, float32 state_dict): {wbytes:,} bytes ({params:,} parameters), the same for "
        "any cluster size (the network scores each backend from its own row).",
        "",
        "| request rate (one worker) | req/s | transitions up, as stored | zlib-1 | weights down every "
        + " / every ".join(f"{s:g} s" for s in WEIGHT_SYNC_S)
        + " |",
        "|---|---:|---:|---:|---:|",
    ]
    down = " / ".join(f"{wbytes / s / 1e6:.3f}" for s in WEIGHT_SYNC_S)
    for label, rps in RATES_RPS:
        for clabel, stored, ratio in per:
            lines.append(
                f"| {label}, {clabel} | {rps:,} | {rps * stored / 1e6:.2f} MB/s "
                f"| {rps * stored / ratio / 1e6:.2f} MB/s | {down} MB/s |"
            )
    return lines


def main() -> int:
    print("\n".join(bandwidth_lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
