"""Routing policies live, side by side, on foreign backends with unequal capacities under open-loop load.

    .venv/bin/python benchmarks/live_foreign.py [--workers 1,2,4,8] [--load 0.8] [--duration-s 30] [--rounds 3]
        [--policies round_robin,random,least_conn,p2c,peak_ewma,sed,prequal,c3,dqn,dqn_online]

The backends are gunicorn processes (sync workers) serving backends/foreign_app.py: a server this
project did not write, which sends none of the headers our own backends send (no service time, no
utilisation, no /health), with capacity set by worker count. The proxy is told only their URLs
(`--weights workers` gives it the worker counts as weights). The load is open loop
(loadgen/open_loop.py: Poisson arrivals drawn from a seed, never waiting for answers), so a policy
that queues cannot slow its own offered load down.

For each round, in an order shuffled per round with a fixed seed, each policy gets a fresh proxy in
front of the same cluster, a short warm-up, then the same schedule (seed + round: every policy of a
round sees identical arrival times and classes). No run starts behind another's queue: the warm-up's
is waited for, and after a run a backend still holding one is restarted. The table shows medians over
rounds with min-max, and each policy's p99 over the best heuristic's (lowest median p99 among non-dqn
policies) from the same run. Policies lbproxy does not know yet (prequal and c3 are being added) are
skipped with a note.

Pinning as ANCHORS.md: the proxy alone on CPU 0; this process (the generator) and the backends on CPU
1 (when taskset exists). The generator's own send lag is reported so the figures can be trusted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import LOAD_CPU, TASKSET, command, machine, pinned, write_result  # noqa: E402
from dqn_proxy import cpu_s  # noqa: E402
from foreign_cluster import ForeignCluster, start_foreign_cluster  # noqa: E402
from support import LOOPBACK, Proc, free_port, wait_http_ok  # noqa: E402

from lbproxy.cluster import ServiceSpec  # noqa: E402
from lbproxy.config import POLICY_NAMES  # noqa: E402
from loadgen.open_loop import RunResult, Schedule, Summary, parse_mix, poisson_schedule, run  # noqa: E402

PROXY_CPU = 0
DEFAULT_SPEED = 0.5
"""Backends at half the cluster model's speed (light 20 / heavy 100 / static 4 ms): 283 req/s at 0.8 load
instead of 566. gunicorn, the client and the proxy each spend ~0.3-0.8 ms of CPU per request (sync
workers open and close a connection per request); at full speed that is most of the 2 shared cores,
and the figures would measure CPU contention, not routing. Queueing scales with time: ratios between
policies are what this speed leaves unchanged."""
DEFAULT_POLICIES = (
    "round_robin",
    "random",
    "least_conn",
    "p2c",
    "peak_ewma",
    "sed",
    "prequal",
    "c3",
    "dqn",
    "dqn_online",
)
ONLINE_SUFFIX = "_online"
"""`dqn_online` means `--policy dqn --online` (learning from the live traffic while serving)."""
LAG_TRUSTED_P99_MS = 5.0
"""A run whose send lag p99 stays below this sent on schedule; above, the client was starved."""
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


SHAPED = [
    "## What shaped these numbers",
    "",
    "- gunicorn's sync workers close the connection after every response, so the proxy opens a new upstream "
    "connection per request (no keep-alive reuse, no stale-connection retries). A request beyond a backend's "
    "workers waits in the kernel's accept queue (gunicorn --backlog 2048, somaxconn 4096), where neither "
    "gunicorn nor the proxy sees it except as a request still in flight.",
    "- The proxy allows 512 connections per backend (lbproxy/proxy/app.py CONNECTIONS_PER_BACKEND); with one "
    "connection per request, a policy that queues more than 512 requests at one backend queues the rest inside "
    "the proxy. Both count as in flight, so the in-flight policies see them either way.",
    "- Told only the URLs, round robin and random give each backend the same share, so the 1-worker backend "
    "gets several times its capacity at 0.8 load and its queue grows for the whole run: their p99 is bounded "
    "by the run length and the grace period, not a steady state. `--weights workers` tells the proxy the "
    "worker counts; then round robin is stable too.",
    "- After each run the proxy is stopped and a backend still holding a queue (dead connections it would "
    "serve anyway) is restarted, so no run starts behind the previous one's queue.",
    "- Active health checks are off unless `--health-path` is set (they were on, probing `/health`, before "
    "2026-12-01: every foreign backend answered 404 and was marked down within ~6 s, so the proxy routed in "
    "panic mode). These runs also pass `--health-interval-s 0`, which keeps them comparable with earlier ones.",
]


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
        online = name.endswith(ONLINE_SUFFIX)
        base = name.removesuffix(ONLINE_SUFFIX)
        if base not in POLICY_NAMES or (online and base != "dqn"):
            notes.append(f"skipped {name}: lbproxy has no such policy yet (it knows {', '.join(POLICY_NAMES)})")
            continue
        args = ["--policy", base]
        if base == "dqn" and model is not None:
            args += ["--model", str(model)]
        if online:
            args.append("--online")
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


def start_proxy(backends: str, policy: PolicyConfig, seed: int) -> Proc:
    """`python -m lbproxy --mode serve` on free loopback ports, pinned to PROXY_CPU, active health checks
    off: a foreign backend has no /health (see the results file for what the default does)."""
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "lbproxy", "--mode", "serve", "--host", LOOPBACK, "--port", str(port)]
    argv += ["--admin-port", str(admin), "--backends", backends, "--health-interval-s", "0", "--seed", str(seed)]
    popen = subprocess.Popen(
        pinned(PROXY_CPU, [*argv, *policy.args]),
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    proc = Proc(popen, port, admin)
    try:
        wait_http_ok(f"{proc.admin_url}/readyz", timeout_s=PROXY_BOOT_S, proc=popen)
    except Exception:
        proc.stop()
        raise
    return proc


def backend_requests(admin_url: str) -> list[int]:
    """Requests the proxy has sent to each backend so far, in --backends order."""
    with urllib.request.urlopen(admin_url + "/admin/backends", timeout=5) as resp:
        data = json.loads(resp.read())
    rows = data["backends"] if isinstance(data, dict) else data
    return [int(b["requests"]) for b in sorted(rows, key=lambda b: b["index"])]


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
    metrics: dict[str, float] = field(default_factory=dict)
    """The proxy's /metrics at the end of the run (see `proxy_metrics`)."""
    result: RunResult | None = field(default=None, repr=False)
    """The run request by request (benchmarks/live_train_foreign.py slices it per minute)."""


def proxy_metrics(admin_url: str) -> dict[str, float]:
    """The proxy's /metrics page as {series: value}, each series written as on the page
    (`lbproxy_epsilon`, `lbproxy_guardrail_switches_total{to="fallback"}`)."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[series] = float(value)
    return out


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
    metrics = proxy_metrics(proxy.admin_url)
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


def table(cmp: Comparison, workers: Sequence[int]) -> list[str]:
    best = cmp.best_heuristic()
    share_head = "/".join(f"w{w}" for w in workers)
    lines = [
        f"| policy | p50 ms | p99 ms (min-max) | p99.9 ms | mean ms | failed % (total) | p99 / best heuristic "
        f"(min-max) | share {share_head} % | proxy CPU % | send lag max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in cmp.policies:
        ms = cmp.runs.get(p.name)
        if not ms:
            continue
        lo, hi = cmp.span(p.name, "p99_ms")
        failed = sum(m.summary.errors for m in ms)
        if best is not None:
            rlo, rhi = cmp.ratio_span(p.name, best)
            ratio = f"{cmp.med(p.name, 'p99_ms') / cmp.med(best, 'p99_ms'):.2f} ({rlo:.2f}-{rhi:.2f})"
        else:
            ratio = "-"
        shares = "/".join(f"{100 * statistics.median(m.shares[i] for m in ms):.0f}" for i in range(len(workers)))
        lines.append(
            f"| {p.name} | {cmp.med(p.name, 'p50_ms'):.1f} | {cmp.med(p.name, 'p99_ms'):.1f} ({lo:.1f}-{hi:.1f}) | "
            f"{cmp.med(p.name, 'p999_ms'):.1f} | {cmp.med(p.name, 'mean_ms'):.1f} | "
            f"{100 * cmp.med(p.name, 'error_rate'):.2f} ({failed}) | {ratio} | {shares} | "
            f"{statistics.median(m.proxy_cpu_pct for m in ms):.0f} | "
            f"{max(m.summary.send_lag_max_ms for m in ms):.1f} |"
        )
    return lines


def per_run_table(cmp: Comparison) -> list[str]:
    lines = [
        "| round | policy | requests | p50 ms | p99 ms | mean ms | failed | timeouts | answered req/s "
        "| send lag p99 / max ms | generator CPU % | share per backend % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted((m for ms in cmp.runs.values() for m in ms), key=lambda m: (m.round, m.policy))
    for m in rows:
        s = m.summary
        lines.append(
            f"| {m.round + 1} | {m.policy} | {s.count} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.mean_ms:.1f} | "
            f"{s.errors} | {s.timeouts} | {s.throughput_rps:.0f} | {s.send_lag_p99_ms:.2f} / "
            f"{s.send_lag_max_ms:.1f} | {m.generator_cpu_pct:.0f} | {'/'.join(f'{100 * x:.0f}' for x in m.shares)} |"
        )
    return lines


def revision() -> str:
    """The checkout's commit, `-dirty` when tracked files differ from it (others' edits included)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,4,8", help="gunicorn sync workers per backend")
    ap.add_argument("--speed", type=float, default=DEFAULT_SPEED, help="service-time divisor of every backend")
    ap.add_argument("--load", type=float, default=0.8, help="offered load, share of the cluster's capacity")
    ap.add_argument("--mix", default="light=0.6,heavy=0.3,static=0.1", help="request classes (loadgen.open_loop)")
    ap.add_argument("--duration-s", type=float, default=30.0, help="seconds of measured arrivals per run")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="seconds of unmeasured arrivals first")
    ap.add_argument("--grace-s", type=float, default=10.0, help="wait for answers past the last send")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1, help="schedule seed of round 1 (round r: seed + r - 1)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated, in table order")
    ap.add_argument("--weights", choices=("none", "workers"), default="none", help="what the proxy is told")
    ap.add_argument("--model", type=Path, default=None, help="model for the dqn policies (default: shipped)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/live_foreign.md")
    ap.add_argument("--note", default="", help="free text for the results file")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    mix = parse_mix(args.mix)
    configs, notes = policy_configs([p.strip() for p in args.policies.split(",") if p.strip()], args.model)
    for note in notes:
        print(note, flush=True)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    with start_foreign_cluster(workers, args.speed, cpu=LOAD_CPU) as cluster, pinned_self(LOAD_CPU):
        capacity = cluster.capacity_rps(mix)
        rate = args.load * capacity
        print(f"cluster workers {workers}: capacity {capacity:.0f} req/s, offered {rate:.0f} req/s", flush=True)
        cmp = compare(
            cluster,
            configs,
            rate,
            mix,
            args.duration_s,
            args.warmup_s,
            args.grace_s,
            args.rounds,
            args.seed,
            notes,
            args.weights == "workers",
        )
        load_after = os.getloadavg()[0]
        gunicorn = version("gunicorn")
    elapsed_s = time.monotonic() - started
    lines = table(cmp, workers)
    print("\n".join(lines))
    best = cmp.best_heuristic()
    all_runs = [m for ms in cmp.runs.values() for m in ms]
    lag_max = max((m.summary.send_lag_max_ms for m in all_runs), default=math.nan)
    lag_p99 = max((m.summary.send_lag_p99_ms for m in all_runs), default=math.nan)
    failed = sum(m.summary.errors for m in all_runs)
    total = sum(m.summary.count for m in all_runs)
    print(f"generator send lag: worst p99 {lag_p99:.2f} ms, max {lag_max:.1f} ms; {failed} of {total} failed")
    print(f"took {elapsed_s / 60:.1f} min")
    cap_share = "/".join(f"{100 * w / sum(workers):.0f}" for w in workers)
    means_ms = " / ".join(
        f"{c} {1e3 * m / args.speed:g}" for c, m in zip(("light", "heavy", "static"), ServiceSpec().mean_s, strict=True)
    )
    trusted = (
        "the generator kept to its schedule"
        if lag_p99 < LAG_TRUSTED_P99_MS
        else f"**over {LAG_TRUSTED_P99_MS:g} ms: the client machine stalled; treat the tails with care**"
    )
    text = [
        "# Routing policies live on foreign backends (gunicorn, unequal capacities), open-loop load",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        # Quoted here: common.command joins the arguments as they are, and a --note has spaces.
        f"- command: `{command([shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])}`",
        f"- code: {revision()}",
        f"- backends: {len(workers)} gunicorn {gunicorn} processes, sync workers {workers} (capacity share "
        f"{cap_share} %), serving backends/foreign_app.py at speed {args.speed:g}: exponential service times, "
        f"means {means_ms} ms; no keep-alive (sync workers close every connection), no service-time headers, "
        "no /health",
        "- proxy: `lbproxy --mode serve --health-interval-s 0`, backends "
        + ("weighted by workers" if args.weights == "workers" else "unweighted (URLs only)")
        + (f"; pinned to CPU {PROXY_CPU}, generator and backends to CPU {LOAD_CPU}" if TASKSET else "; unpinned"),
        f"- load: open loop (loadgen/open_loop.py), Poisson {rate:.0f} req/s = {args.load:g} x capacity "
        f"{capacity:.0f} req/s (sum of workers / mean service time under the mix), mix light/heavy/static "
        f"{'/'.join(f'{w:g}' for w in mix)}; {args.duration_s:g} s measured after a {args.warmup_s:g} s warm-up, "
        f"{args.grace_s:g} s grace (then unanswered = failed timeout); schedule seed {args.seed} + round, the same "
        f"for every policy of a round; {args.rounds} rounds, policy order shuffled per round",
        f"- run time: {elapsed_s / 60:.1f} min; 1-minute load average {load_before:.2f} at the start, "
        f"{load_after:.2f} at the end (2 vCPU shared with other work)",
        *([f"- note: {args.note}"] if args.note else []),
        *(f"- {n}" for n in notes),
        "",
        *lines,
        "",
        f"Best heuristic (lowest median p99): {best or '-'}. Figures are medians over rounds; latency "
        "percentiles count every request (failed ones at their time to failure, timeouts at their age at the "
        "cut-off). Failed = status >= 500, connection errors and timeouts. Share = the proxy's requests to "
        "each backend.",
        "",
        f"Generator send lag (actual minus scheduled send): worst p99 {lag_p99:.2f} ms, worst max {lag_max:.1f} ms "
        f"over all runs ({trusted}). Failed requests: {failed} of {total}.",
        "",
        *SHAPED,
        "",
        "## Every run",
        "",
        *per_run_table(cmp),
    ]
    write_result(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
