"""A bounded soak: lbproxy learning live in front of four emulated backends, under phased open-loop load,
with one backend SIGKILLed and restarted on its port every `--kill-every-s`; the proxy process is sampled
throughout (RSS, open fds, threads, asyncio tasks, replay size) and judged flat or not.

    .venv/bin/python benchmarks/soak.py [--duration-s 600] [--mode train|online] [--write]
    .venv/bin/python benchmarks/soak.py --duration-s 30          # the CI version (tests/test_soak.py)

`--mode train` runs `lbproxy --mode train --backends ...` (ε schedule, episodes, checkpoints, CSV rows);
`--mode online` runs `lbproxy --mode serve --policy dqn --online` (the shipped model learning while it
serves). Either way the replay buffer is sized to fill within the first ~35 % of the run, so the second
half measures a proxy whose buffer, decision table and connection pools are all at their bound.

Load: Poisson arrivals (loadgen/open_loop.py) cycling through `--loads` (shares of the cluster's
capacity, default 0.3 -> 0.7 -> 0.5), each phase `--phase-s` long, so the first half holds at least
one whole cycle and the halves compare like with like. Kills rotate over the backends; each backend
comes back `--restart-after-s` later on the same port.

Verdict (each rule printed with its numbers; exit code 1 when one fails):
- RSS: the Theil-Sen slope over the second half is at most `--rss-slope-mb-per-min`, or the rise it
  projects over that half is at most `--rss-slack-mb` (on a 15 s half, allocator noise alone is a few MB);
- open fds: once the load has ended, the fds that no live connection explains (all but the pooled
  keep-alive connections to backends, which expire after 30 s; fault_harness.fd_census) are at most
  as many as before the load plus `--fd-slack`. Under load the count follows concurrency (client and
  upstream connections, peaks after a kill), so a comparison of fds under load measures the load;
- asyncio tasks (when the proxy exports them): at rest at most the count before the load plus a slack;
- threads: the second half's maximum at most the first half's plus a slack;
- in flight: zero once the load has ended;
- replay: the buffer filled and stayed at its capacity;
- lost requests: none failed except those in flight at a kill (within `KILL_TOLERANCE_S`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from common import command, machine, write_result  # noqa: E402
from fault_harness import (  # noqa: E402
    TASKS_METRIC,
    Clock,
    FdCensus,
    LoadPhase,
    ProcSample,
    Sampler,
    counters,
    emulated_cluster,
    fd_census,
    in_flight_at,
    phased_schedule,
    run_with_driver,
    sample_process,
    start_lbproxy,
    theil_sen_slope,
)
from live_foreign import revision  # noqa: E402

from loadgen.open_loop import DEFAULT_MIX, RunResult, is_failure  # noqa: E402

KILL_TOLERANCE_S = 0.05
"""A failed request counts as "in flight at a kill" when its send-to-answer span comes this close to
the kill (the driver thread's clock and the generator's agree within a millisecond; the kill itself,
SIGKILL plus reaping, takes a few)."""
BUFFER_FILL_SHARE = 0.35
"""The replay buffer holds this share of the run's expected requests: full well before the second half."""
SETTLE_S = 1.5
"""After the load, the proxy's in-flight gauges (refreshed once a second) are read after this pause."""
RESTART_BOOT_S = 2.0
"""Allowance for a restarted backend's boot (0.4-1.5 s on a busy 2-vCPU machine)."""
PROXY_STOP_S = 60.0
"""Train mode writes a checkpoint and the final model on SIGTERM."""


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    mode: str = "train"
    loads: tuple[float, ...] = (0.3, 0.7, 0.5)
    phase_s: float | None = None
    """Default: min(40, duration / 6): five cycles in 10 min, two in 30 s."""
    kill_every_s: float | None = None
    """Default: half a load cycle (1.5 phases, capped at 60 s): kills then alternate between two
    phases of the cycle, and each half of the run gets kills in the same phases (60 s in 10 min,
    7.5 s in 30 s)."""
    restart_after_s: float = 1.0
    sample_every_s: float | None = None
    """Default: duration / 120 within [1, 5] s."""
    eject_base_s: float | None = None
    """Default: kill interval / 6, at least restart_after_s + RESTART_BOOT_S. The proxy's default
    (30 s, Envoy's) exceeds the CI version's 7.5 s kill interval, and each ejection of a backend lasts
    base x its ejection count (10, 20, 30 s for the third kill of one backend in 10 min): shorter than
    the interval, at most one backend is out at a time and the load stays below the three survivors'
    capacity. Longer than the restart, a killed backend is not re-admitted while it is still down
    (that is the reliability benchmark's subject, not the soak's)."""
    buffer_size: int | None = None
    seed: int = 1
    grace_s: float = 10.0
    rss_slope_mb_per_min: float = 1.0
    rss_slack_mb: float = 8.0
    fd_slack: int = 4
    thread_slack: int = 2
    task_slack: int = 8

    def resolved(self) -> SoakConfig:
        d = self.duration_s
        phase = self.phase_s or min(40.0, d / 6)
        kill = self.kill_every_s or min(60.0, 1.5 * phase)
        return SoakConfig(
            **{
                **self.__dict__,
                "phase_s": phase,
                "kill_every_s": kill,
                "sample_every_s": self.sample_every_s or min(5.0, max(1.0, d / 120)),
                "eject_base_s": self.eject_base_s or max(kill / 6, self.restart_after_s + RESTART_BOOT_S),
            }
        )


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    ok: bool
    detail: str


@dataclass
class SoakRun:
    config: SoakConfig
    capacity_rps: float
    phases: list[LoadPhase]
    buffer_size: int
    proxy_args: list[str]
    samples: list[ProcSample]
    idle: ProcSample | None
    census_start: FdCensus | None = None
    """The proxy's fds before the load (after its boot)."""
    census_rest: FdCensus | None = None
    """... and SETTLE_S after the last answer."""
    kills: list[tuple[float, int]] = field(default_factory=list)
    """(time from the load's zero, backend index) of each SIGKILL."""
    restarts: list[tuple[float, int]] = field(default_factory=list)
    result: RunResult | None = None
    counters: str = ""
    """The proxy's retry/ejection/error counters after the load (fault_harness.counters)."""
    elapsed_s: float = 0.0

    @property
    def half_s(self) -> float:
        return self.config.duration_s / 2

    def _failed(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.result is not None
        failed = is_failure(self.result.status)
        at_kill = in_flight_at(self.result, [t for t, _ in self.kills], KILL_TOLERANCE_S)
        return failed & at_kill, failed & ~at_kill

    def lost(self) -> tuple[int, int]:
        """(failed requests in flight at a kill, other failed requests)."""
        at_kill, other = self._failed()
        return int(at_kill.sum()), int(other.sum())

    def lost_outside_kills(self) -> list[str]:
        """Each failed request not in flight at a kill: when, how, and how long after the last kill."""
        assert self.result is not None
        r = self.result
        out = []
        for i in np.nonzero(self._failed()[1])[0]:
            t = float(r.sent_s[i])
            since = [t - k for k, _ in self.kills if k <= t]
            after = f", {min(since):.3f} s after a kill" if since else ""
            out.append(f"sent at {t:.3f} s: {r.status[i] or r.errors[i]} after {1e3 * r.latency_s[i]:.0f} ms{after}")
        return out


def soak_phases(cfg: SoakConfig, capacity_rps: float) -> list[LoadPhase]:
    assert cfg.phase_s is not None
    phases: list[LoadPhase] = []
    t, k = 0.0, 0
    while t < cfg.duration_s - 1e-9:
        length = min(cfg.phase_s, cfg.duration_s - t)
        phases.append(LoadPhase(length, cfg.loads[k % len(cfg.loads)] * capacity_rps, DEFAULT_MIX))
        t += length
        k += 1
    return phases


def proxy_args(cfg: SoakConfig, expected_requests: int, buffer_size: int, run_dir: Path) -> tuple[str, list[str]]:
    """(lbproxy --mode, flags) for the soak's proxy."""
    learning = ["--buffer-size", str(buffer_size), "--learning-starts", str(min(1000, buffer_size // 2))]
    common = ["--seed", str(cfg.seed), "--eject-base-s", f"{cfg.eject_base_s:g}", *learning]
    if cfg.mode == "online":
        return "serve", ["--policy", "dqn", "--online", *common]
    episode = 256
    # Enough episodes that the run never ends training early (retries are not decisions; 1.5x covers
    # a Poisson count far in its tail); ~5 checkpoints per run, so checkpoint writes are soaked too.
    episodes = max(10, math.ceil(1.5 * expected_requests / episode))
    every = max(1, expected_requests // episode // 5)
    flags = ["--episodes", str(episodes), "--episode-decisions", str(episode), "--checkpoint-every", str(every)]
    flags += ["--metrics-every", str(max(1, every // 2)), "--run-dir", str(run_dir)]
    return "train", [*flags, *common]


def run_soak(cfg: SoakConfig, work_dir: Path) -> SoakRun:
    cfg = cfg.resolved()
    assert cfg.kill_every_s is not None and cfg.sample_every_s is not None
    started = time.monotonic()
    with emulated_cluster() as cluster:
        capacity = cluster.capacity_rps(DEFAULT_MIX)
        phases = soak_phases(cfg, capacity)
        schedule = phased_schedule(phases, cfg.seed)
        buffer_size = cfg.buffer_size or max(500, int(BUFFER_FILL_SHARE * len(schedule)))
        mode, args = proxy_args(cfg, len(schedule), buffer_size, work_dir / "run")
        proxy = start_lbproxy(cluster.urls, args, work_dir / "proxy.log", mode=mode)
        run = SoakRun(cfg, capacity, phases, buffer_size, [f"--mode {mode}", *args], [], None)
        run.census_start = fd_census(proxy.popen.pid, cluster.ports)
        samplers: list[Sampler] = []
        try:

            def drive(clock: Clock) -> None:
                sampler = Sampler(proxy, clock.t0, cfg.sample_every_s or 5.0)
                samplers.append(sampler)
                sampler.sample()
                sampler.start()
                kill_every = cfg.kill_every_s or 60.0
                k = 1
                while k * kill_every < cfg.duration_s - cfg.restart_after_s:
                    victim = (k - 1) % cluster.n
                    clock.until(k * kill_every)
                    run.kills.append((clock.now(), victim))
                    cluster.kill(victim)
                    time.sleep(cfg.restart_after_s)
                    cluster.restart(victim)
                    run.restarts.append((clock.now(), victim))
                    k += 1

            (run.result,) = run_with_driver([(proxy.url, schedule)], drive, cfg.grace_s)
            for s in samplers:
                s.stop()
            t_end = time.perf_counter()
            time.sleep(SETTLE_S)
            if proxy.popen.poll() is None:
                t0 = samplers[0].t0 if samplers else t_end
                run.idle = sample_process(proxy, time.perf_counter() - t0)
                run.census_rest = fd_census(proxy.popen.pid, cluster.ports)
                run.counters = counters(proxy.admin_url)
            run.samples = samplers[0].samples if samplers else []
        finally:
            proxy.stop(PROXY_STOP_S)
        _check_stopped(proxy.popen.returncode, work_dir / "proxy.log")
    run.elapsed_s = time.monotonic() - started
    return run


def _check_stopped(code: int | None, log: Path) -> None:
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"lbproxy exited with {code} (expected 0 after SIGTERM):\n{tail}")


# --- the verdict ---------------------------------------------------------------------------------------
def _halves(run: SoakRun) -> tuple[list[ProcSample], list[ProcSample]]:
    during = [s for s in run.samples if s.t_s <= run.config.duration_s]
    return [s for s in during if s.t_s < run.half_s], [s for s in during if s.t_s >= run.half_s]


def _peak_rule(name: str, first: list[float], second: list[float], slack: float) -> Rule:
    if not first or not second:
        return Rule(name, False, "no samples")
    a, b = max(first), max(second)
    return Rule(name, b <= a + slack, f"max {b:g} in the second half vs {a:g} in the first (slack {slack:g})")


def _fd_rule(run: SoakRun) -> Rule:
    a, b = run.census_start, run.census_rest
    if a is None or b is None:
        return Rule("open fds", False, "not measured (proxy gone before the rest sample)")
    unexplained = (b.total - b.upstream_idle) - (a.total - a.upstream_idle)
    peak = max((s.fds for s in run.samples), default=0)
    detail = (
        f"{unexplained:+d} unexplained at rest (slack {run.config.fd_slack}): {b.total} fds at rest, "
        f"{b.upstream_idle} of them pooled connections to backends, {b.close_wait} in CLOSE_WAIT, {b.files} "
        f"not sockets; {a.total} before the load ({a.upstream_idle} pooled, {a.files} not sockets); "
        f"{peak} at most under load"
    )
    return Rule("open fds", unexplained <= run.config.fd_slack, detail)


def verdict(run: SoakRun) -> list[Rule]:
    cfg = run.config
    first, second = _halves(run)
    rules: list[Rule] = []
    if len(second) >= 3:
        slope = theil_sen_slope([s.t_s / 60 for s in second], [s.rss_mb for s in second])
        half_min = (second[-1].t_s - second[0].t_s) / 60
        rise = slope * half_min
        ok = slope <= cfg.rss_slope_mb_per_min or rise <= cfg.rss_slack_mb
        rules.append(
            Rule(
                "RSS flat",
                ok,
                f"slope {slope:+.2f} MB/min over the second half ({half_min:.1f} min, projected rise {rise:+.1f} MB; "
                f"limits {cfg.rss_slope_mb_per_min:g} MB/min or {cfg.rss_slack_mb:g} MB); RSS "
                f"{first[-1].rss_mb if first else math.nan:.1f} MB at half time, {second[-1].rss_mb:.1f} MB at the end",
            )
        )
    else:
        rules.append(Rule("RSS flat", False, f"only {len(second)} samples in the second half"))
    rules.append(_fd_rule(run))
    rules.append(_peak_rule("threads", [s.threads for s in first], [s.threads for s in second], cfg.thread_slack))
    idle = run.idle
    start_tasks = run.samples[0].tasks if run.samples else None
    if start_tasks is not None and idle is not None and idle.tasks is not None:
        ok = idle.tasks <= start_tasks + cfg.task_slack
        detail = f"{idle.tasks:g} at rest vs {start_tasks:g} before the load (slack {cfg.task_slack}); "
        detail += f"max {max(s.tasks or 0 for s in run.samples):g} under load"
        rules.append(Rule("asyncio tasks", ok, detail))
    else:
        rules.append(Rule("asyncio tasks", True, f"not measured: the proxy exports no {TASKS_METRIC} gauge"))
    if idle is not None and idle.in_flight is not None:
        rules.append(Rule("in flight after the load", idle.in_flight == 0, f"{idle.in_flight:g} requests"))
    else:
        rules.append(Rule("in flight after the load", False, "not measured (proxy gone or metric missing)"))
    replay = [s.replay for s in second if s.replay is not None]
    if replay:
        ok = min(replay) == run.buffer_size and max(replay) == run.buffer_size
        detail = f"{min(replay):g}-{max(replay):g} transitions in the second half, capacity {run.buffer_size}"
        rules.append(Rule("replay buffer full and bounded", ok, detail))
    at_kill, other = run.lost()
    n = len(run.result.schedule) if run.result else 0
    detail = f"{other} failed outside kills, {at_kill} in flight at one of {len(run.kills)} kills, of {n} requests"
    if other:
        detail += " (first: " + "; ".join(run.lost_outside_kills()[:5]) + ")"
    rules.append(Rule(LOST_RULE, other == 0, detail))
    return rules


# --- the report ----------------------------------------------------------------------------------------
def _phase_at(run: SoakRun, t_s: float) -> str:
    t = 0.0
    for ph in run.phases:
        if t <= t_s < t + ph.duration_s:
            return f"{ph.rate_rps / run.capacity_rps:.1f}"
        t += ph.duration_s
    return "-"


def sample_table(run: SoakRun, every_s: float) -> list[str]:
    lines = [
        "| t s | load | RSS MB | fds | threads | tasks | replay | in flight | proxy CPU % | events |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(run.samples) + ([run.idle] if run.idle is not None else [])
    shown: list[tuple[ProcSample, ProcSample | None]] = []
    next_t = -1.0
    last_shown: ProcSample | None = None
    for i, s in enumerate(rows):
        if s.t_s >= next_t or i == len(rows) - 1:
            shown.append((s, last_shown))
            last_shown = s
            next_t = s.t_s + every_s - 1e-6
    for s, before in shown:
        cpu = (
            f"{100 * (s.cpu_s - before.cpu_s) / (s.t_s - before.t_s):.0f}"
            if before is not None and s.t_s > before.t_s
            else "-"
        )
        lo = before.t_s if before is not None else -1.0
        events = [f"kill b{i}" for t, i in run.kills if lo < t <= s.t_s]
        events += [f"b{i} back" for t, i in run.restarts if lo < t <= s.t_s]
        is_idle = s is run.idle
        lines.append(
            f"| {s.t_s:.0f} | {'idle' if is_idle else _phase_at(run, s.t_s)} | {s.rss_mb:.1f} | {s.fds} | "
            f"{s.threads} | {_opt(s.tasks)} | {_opt(s.replay)} | {_opt(s.in_flight)} | {cpu} | "
            f"{', '.join(events)} |"
        )
    return lines


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def report(run: SoakRun, rules: list[Rule], argv: Sequence[str], table_every_s: float) -> list[str]:
    cfg = run.config
    assert run.result is not None
    s = run.result.summary
    at_kill, other = run.lost()
    loads = " -> ".join(f"{x:g}" for x in cfg.loads)
    return [
        "# Soak: live learning under phased load with periodic backend kills",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command([shlex.quote(a) for a in argv])}`",
        f"- code: {revision()}",
        f"- proxy: `lbproxy {' '.join(run.proxy_args)} --backends <4 URLs>` (replay buffer {run.buffer_size} "
        f"transitions: full within the first ~{100 * BUFFER_FILL_SHARE:.0f} % of the requests)",
        "- backends: 4 x `python -m backends --workers 2 --speed 0.5` (fault_harness.py), capacity "
        f"{run.capacity_rps:.0f} req/s at the mix light/heavy/static {'/'.join(f'{w:g}' for w in DEFAULT_MIX)}",
        f"- load: open loop, Poisson, {cfg.duration_s:g} s cycling {loads} x capacity in {cfg.phase_s:g} s "
        f"phases; {s.count} requests",
        f"- faults: SIGKILL of one backend every {cfg.kill_every_s:g} s (rotating), restarted on its port "
        f"{cfg.restart_after_s:g} s later: {len(run.kills)} kills",
        f"- sampling: every {cfg.sample_every_s:g} s, RSS = VmRSS and fds = /proc/PID/fd of the proxy process, "
        f"tasks = {TASKS_METRIC} when exported",
        f"- run time: {run.elapsed_s / 60:.1f} min",
        "",
        f"## Verdict: {headline(rules)}",
        "",
        *(f"- {'ok' if r.ok else 'FAIL'} {r.name}: {r.detail}" for r in rules),
        "",
        f"Requests: {s.line()}. Failed: {at_kill} in flight at a kill, {other} otherwise.",
        "",
        f"Proxy counters after the load: {run.counters}.",
        "",
        "## Samples",
        "",
        *sample_table(run, table_every_s),
        "",
        "load = offered share of capacity in the phase at the sample; the last row (idle) is taken "
        f"{SETTLE_S:g} s after the last answer.",
    ]


LOST_RULE = "no lost requests"


def headline(rules: list[Rule]) -> str:
    """Resources (every rule but the lost-requests one) flat or not, and the lost-requests rule."""
    resources = [r for r in rules if r.name != LOST_RULE]
    bad = [r.name for r in resources if not r.ok]
    lost = next((r for r in rules if r.name == LOST_RULE), None)
    text = "resources FLAT" if not bad else f"resources NOT FLAT ({', '.join(bad)})"
    if lost is not None:
        text += "; no request lost outside kills" if lost.ok else "; requests lost outside kills"
    return text


def print_verdict(rules: list[Rule]) -> None:
    print(f"soak verdict: {headline(rules)}", flush=True)
    for r in rules:
        print(f"  {'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration-s", type=float, default=600.0, help="seconds of load (30 for the CI version)")
    ap.add_argument("--mode", choices=("train", "online"), default="train", help="live training or serve --online")
    ap.add_argument("--loads", default="0.3,0.7,0.5", help="phase loads, shares of capacity, cycled")
    ap.add_argument("--phase-s", type=float, default=None, help="seconds per phase (default min(40, duration/6))")
    ap.add_argument("--kill-every-s", type=float, default=None, help="default 1.5 phases, at most 60 s")
    ap.add_argument("--restart-after-s", type=float, default=1.0)
    ap.add_argument("--sample-every-s", type=float, default=None, help="default duration/120 within [1, 5]")
    ap.add_argument("--eject-base-s", type=float, default=None, help="default kill interval/6, >= restart + 2 s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write --out")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/soak.md")
    ap.add_argument("--table-every-s", type=float, default=None, help="rows of the samples table (default 30 s)")
    args = ap.parse_args(argv)
    cfg = SoakConfig(
        duration_s=args.duration_s,
        mode=args.mode,
        loads=tuple(float(x) for x in args.loads.split(",")),
        phase_s=args.phase_s,
        kill_every_s=args.kill_every_s,
        restart_after_s=args.restart_after_s,
        sample_every_s=args.sample_every_s,
        eject_base_s=args.eject_base_s,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="lbproxy-soak-") as tmp:
        run = run_soak(cfg, Path(tmp))
    rules = verdict(run)
    assert run.result is not None
    print(run.result.summary.line(), flush=True)
    rss = [s.rss_mb for s in run.samples]
    if rss:
        print(f"RSS MB: min {min(rss):.1f}, median {statistics.median(rss):.1f}, max {max(rss):.1f}", flush=True)
    print_verdict(rules)
    if args.write:
        every = args.table_every_s or (30.0 if cfg.duration_s >= 300 else run.config.resolved().sample_every_s or 1)
        write_result(args.out, report(run, rules, sys.argv[1:] if argv is None else argv, every))
    return 0 if all(r.ok for r in rules) else 1


if __name__ == "__main__":
    sys.exit(main())
