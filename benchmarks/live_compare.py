"""Routing policies measured live on foreign backends (benchmarks/live_foreign.py describes the method):
the policies as proxy flags, a fresh pinned proxy per measured run with its warm-up, the client's
and the proxy's view of the run, and rounds of every policy on one schedule per round.

Used by benchmarks/live_foreign.py, benchmarks/live_train_foreign.py, benchmarks/reliability.py and
their tests (which put benchmarks/ on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import LOAD_CPU, PROXY_CPU, MetricsPage, admin_backends, cpu_s, pinned, scrape_metrics  # noqa: E402
from foreign_cluster import ForeignCluster, start_foreign_cluster  # noqa: E402
from support import LOOPBACK, Proc, start_on_free_ports  # noqa: E402

from lbproxy.config import POLICY_NAMES  # noqa: E402
from loadgen.open_loop import RunResult, Schedule, Summary, parse_mix, poisson_schedule, run  # noqa: E402

DEFAULT_SPEED = 0.5
"""Backends at half the cluster model's speed (light 20 / heavy 100 / static 4 ms): 283 req/s at 0.8 load
instead of 566. gunicorn, the client and the proxy each spend ~0.3-0.8 ms of CPU per request (sync
workers open and close a connection per request); at full speed that is most of the 2 shared cores,
and the figures would measure CPU contention, not routing. Queueing scales with time: ratios between
policies are what this speed leaves unchanged."""
ONLINE_SUFFIX = "_online"
"""`dqn_online` means `--policy dqn --online` (learning from the live traffic while serving)."""
OPTION_MARK = "@"
"""`dqn_online@lr=0.0001@eps-end=0` is `dqn_online` run with `--lr 0.0001 --eps-end 0`: variants of one
policy side by side, each labelled by its full name."""
WARMUP_SEED_OFFSET = 1_000_000
"""Warm-up schedules use seed + this, so they never repeat a measured schedule."""
PROXY_STOP_S = 3.0
"""Then the proxy is killed: its drain (lbproxy.serve.DRAIN_TIMEOUT_S, 10 s) would only wait for requests
queued at an overloaded backend, which `ForeignCluster.settle` clears anyway."""
PROXY_BOOT_S = 90.0
"""Longest wait for a proxy's /readyz (the dqn policies import torch and load a model first)."""
DRAIN_TIMEOUT_S = 180.0
"""Longest wait for the backends' accept queues to empty (after a warm-up, while the proxy runs)."""
RESTART_AFTER_S = 2.0
"""Between runs (no proxy), a backend whose queue needs longer than this to drain is restarted: up to
512 dead connections (the proxy's per-backend connection cap) would take a 1-worker backend 11 s at
speed 1, 22 s at the default speed."""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """One column of the comparison: a name for the table and the proxy flags that select it."""

    name: str
    args: tuple[str, ...]

    @property
    def is_dqn(self) -> bool:
        return self.args[1] == "dqn"


def policy_configs(names: Sequence[str], model: Path | None) -> tuple[list[PolicyConfig], list[str]]:
    """The runnable policies, and a one-line note for each name lbproxy does not know (yet)."""
    configs: list[PolicyConfig] = []
    notes: list[str] = []
    for name in names:
        policy, *options = name.split(OPTION_MARK)
        online = policy.endswith(ONLINE_SUFFIX)
        base = policy.removesuffix(ONLINE_SUFFIX)
        if base not in POLICY_NAMES or (online and base != "dqn"):
            notes.append(f"skipped {name}: lbproxy has no such policy yet (it knows {', '.join(POLICY_NAMES)})")
            continue
        args = ["--policy", base]
        if base == "dqn" and model is not None:
            args += ["--model", str(model)]
        if online:
            args.append("--online")
        for option in options:
            flag, sep, value = option.partition("=")
            if not sep or not flag:
                raise SystemExit(f"policy {name!r}: options are written @flag=value, e.g. dqn_online@lr=0.0001")
            args += [f"--{flag}", value]
        configs.append(PolicyConfig(name, tuple(args)))
    return configs, notes


@contextlib.contextmanager
def pinned_self(cpu: int) -> Iterator[None]:
    """Run this process (the generator) on `cpu` inside the block, restoring its affinity after (the
    tests call `measure` from a pytest process that must not stay pinned)."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def start_lbproxy(mode_args: Sequence[str], backends: str, args: Sequence[str], log: Path | None = None) -> Proc:
    """`python -m lbproxy MODE_ARGS ARGS` on free loopback ports in front of `backends`, pinned to
    PROXY_CPU, active health checks off (a foreign backend has no /health: see live_foreign.md for what
    the default does), its output to `log` or to a pipe; returns once /readyz answers."""

    def launch(port: int, admin: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "lbproxy", *mode_args, "--host", LOOPBACK, "--port", str(port)]
        argv += ["--admin-port", str(admin), "--backends", backends, "--health-interval-s", "0", *args]
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("wb")) if log is not None else subprocess.PIPE
            return subprocess.Popen(
                pinned(PROXY_CPU, argv),
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    return start_on_free_ports(launch, timeout_s=PROXY_BOOT_S, log=log)


def start_proxy(backends: str, policy: PolicyConfig, seed: int) -> Proc:
    """`lbproxy --mode serve` with `policy` (see start_lbproxy)."""
    return start_lbproxy(("--mode", "serve"), backends, ["--seed", str(seed), *policy.args])


def backend_requests(admin_url: str) -> list[int]:
    """Requests the proxy has sent to each backend so far, in --backends order."""
    return [int(b["requests"]) for b in admin_backends(admin_url)]


@dataclass
class Measurement:
    """One policy's measured run (after its warm-up) in one round."""

    policy: str
    round: int
    summary: Summary
    shares: list[float]
    """Fraction of the run's requests the proxy sent to each backend."""
    proxy_cpu_pct: float
    generator_cpu_pct: float
    metrics: MetricsPage = field(default_factory=MetricsPage)
    """The proxy's /metrics at the end of the run."""
    result: RunResult | None = field(default=None, repr=False)
    """The run request by request (benchmarks/live_train_foreign.py slices it per minute)."""


def measure(
    cluster: ForeignCluster,
    policy: PolicyConfig,
    schedule: Schedule,
    warmup_s: float,
    grace_s: float,
    weighted: bool = False,
    round_index: int = 0,
) -> Measurement:
    """A fresh proxy with `policy` in front of `cluster`, a warm-up at the schedule's rate, then
    `schedule`; the proxy is stopped and the cluster drained before returning."""
    cluster.settle(DRAIN_TIMEOUT_S, restart_after_s=RESTART_AFTER_S)
    proxy = start_proxy(cluster.backends_arg(weighted), policy, schedule.seed)
    try:
        if warmup_s > 0:
            warm = poisson_schedule(schedule.rate_rps, warmup_s, schedule.seed + WARMUP_SEED_OFFSET, schedule.mix)
            run(proxy.url, warm, grace_s)
            # No queue left by the warm-up when the measured run starts. Waited for, not restarted away:
            # the proxy would see the dropped connections as failures and could eject the backend.
            cluster.settle(DRAIN_TIMEOUT_S)
        return measure_running(proxy, policy.name, schedule, grace_s, round_index)
    finally:
        proxy.stop(PROXY_STOP_S)


def measure_running(proxy: Proc, name: str, schedule: Schedule, grace_s: float, round_index: int = 0) -> Measurement:
    """`schedule` through a proxy already running (the measured part of `measure`; live training
    measures its trainer with it), its /metrics read at the end."""
    before = backend_requests(proxy.admin_url)
    cpu0, self0, t0 = cpu_s(proxy.popen.pid), _self_cpu_s(), time.monotonic()
    result = run(proxy.url, schedule, grace_s)
    wall = time.monotonic() - t0
    proxy_cpu, self_cpu = cpu_s(proxy.popen.pid) - cpu0, _self_cpu_s() - self0
    after = backend_requests(proxy.admin_url)
    metrics = scrape_metrics(proxy.admin_url)
    sent = [a - b for a, b in zip(after, before, strict=True)]
    total = max(1, sum(sent))
    return Measurement(
        policy=name,
        round=round_index,
        summary=result.summary,
        shares=[s / total for s in sent],
        proxy_cpu_pct=100.0 * proxy_cpu / wall,
        generator_cpu_pct=100.0 * self_cpu / wall,
        metrics=metrics,
        result=result,
    )


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Comparison:
    """Every measurement of a run, grouped by policy, and the summary figures the table shows."""

    policies: list[PolicyConfig]
    runs: dict[str, list[Measurement]] = field(default_factory=dict)

    def med(self, name: str, key: str) -> float:
        return statistics.median(getattr(m.summary, key) for m in self.runs[name])

    def span(self, name: str, key: str) -> tuple[float, float]:
        xs = [getattr(m.summary, key) for m in self.runs[name]]
        return min(xs), max(xs)

    def best_heuristic(self) -> str | None:
        heuristics = [p.name for p in self.policies if not p.is_dqn and self.runs.get(p.name)]
        return min(heuristics, key=lambda n: self.med(n, "p99_ms")) if heuristics else None

    def ratio_span(self, name: str, best: str) -> tuple[float, float]:
        """min-max over rounds of this policy's p99 over the best heuristic's p99 in the same round."""
        base = {m.round: m.summary.p99_ms for m in self.runs[best]}
        xs = [m.summary.p99_ms / base[m.round] for m in self.runs[name] if m.round in base]
        return (min(xs), max(xs)) if xs else (math.nan, math.nan)


def compare(
    cluster: ForeignCluster,
    configs: Sequence[PolicyConfig],
    rate_rps: float,
    mix: tuple[float, float, float],
    duration_s: float,
    warmup_s: float,
    grace_s: float,
    rounds: int,
    seed: int,
    notes: list[str],
    weighted: bool = False,
) -> Comparison:
    """`rounds` rounds of every policy, in an order shuffled per round (seeded), each round's policies
    on one schedule (seed + round); a proxy that does not start is skipped with a line in `notes`."""
    cmp = Comparison(list(configs))
    for rnd in range(rounds):
        order = list(configs)
        random.Random(seed * 1000 + rnd).shuffle(order)
        schedule = poisson_schedule(rate_rps, duration_s, seed + rnd, mix)
        for policy in order:
            try:
                m = measure(cluster, policy, schedule, warmup_s, grace_s, weighted, rnd)
            except (RuntimeError, TimeoutError) as exc:  # e.g. the dqn model is missing or being rebuilt
                last = (str(exc).strip().splitlines() or [repr(exc)])[-1][:200]  # the error, after its traceback
                notes.append(f"{policy.name} round {rnd + 1}: proxy did not start: {last}")
                print(notes[-1], flush=True)
                continue
            cmp.runs.setdefault(policy.name, []).append(m)
            print(f"round {rnd + 1} {policy.name:<12} {m.summary.line()}", flush=True)
    return cmp


def add_cluster_args(ap: argparse.ArgumentParser) -> None:
    """The flags that set the foreign cluster and the load on it (see `live_cluster`)."""
    ap.add_argument("--workers", default="1,2,4,8", help="gunicorn sync workers per backend")
    ap.add_argument("--speed", type=float, default=DEFAULT_SPEED, help="service-time divisor of every backend")
    ap.add_argument("--load", type=float, default=0.8, help="offered load, share of the cluster's capacity")
    ap.add_argument("--mix", default="light=0.6,heavy=0.3,static=0.1", help="request classes (loadgen.open_loop)")


@dataclass
class ClusterRun:
    """What a live benchmark's results file says about its cluster and the run around the measurements."""

    workers: list[int]
    mix: tuple[float, float, float]
    capacity_rps: float = 0.0
    rate_rps: float = 0.0
    """Offered load: --load x capacity."""
    gunicorn: str = ""
    loads: dict[str, float] = field(default_factory=dict)
    """The 1-minute load average at named points of the run ("start" first)."""
    started: float = field(default_factory=time.monotonic)
    elapsed_s: float = 0.0


@contextlib.contextmanager
def live_cluster(args: argparse.Namespace) -> Iterator[tuple[ForeignCluster, ClusterRun]]:
    """The cluster `add_cluster_args`' flags describe, its backends and this process (the generator)
    pinned to LOAD_CPU; the run's facts are filled in as it goes (gunicorn's version and the elapsed
    time once the block ends)."""
    workers = [int(w) for w in args.workers.split(",")]
    facts = ClusterRun(workers, parse_mix(args.mix), loads={"start": os.getloadavg()[0]})
    with start_foreign_cluster(workers, args.speed, cpu=LOAD_CPU) as cluster, pinned_self(LOAD_CPU):
        facts.capacity_rps = cluster.capacity_rps(facts.mix)
        facts.rate_rps = args.load * facts.capacity_rps
        print(
            f"cluster workers {workers}: capacity {facts.capacity_rps:.0f} req/s, offered {facts.rate_rps:.0f} req/s",
            flush=True,
        )
        yield cluster, facts
        facts.gunicorn = version("gunicorn")
    facts.elapsed_s = time.monotonic() - facts.started
