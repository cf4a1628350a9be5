"""The reliability benchmark's timeline and what it measures (benchmarks/reliability.py describes both):
four events on fixed windows (a SIGKILLed backend, one answering 500s, one hanging, all four down),
driven in a thread beside open-loop load through one proxy per policy, then each window's figures
per policy.

Used by benchmarks/reliability.py and tests/test_reliability_live.py (which put benchmarks/ on sys.path).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from common import admin_backends, scrape_metrics  # noqa: E402
from emulated_backends import EmulatedCluster, emulated_cluster  # noqa: E402
from fault_harness import (  # noqa: E402
    Clock,
    backend_names,
    backend_ok,
    counters,
    run_with_driver,
    start_lbproxies,
)
from live_compare import PolicyConfig  # noqa: E402
from request_windows import WindowStats, held_at, sent_between, window, window_mask  # noqa: E402
from support import Proc  # noqa: E402

from loadgen.open_loop import DEFAULT_MIX, RunResult, is_failure, poisson_schedule  # noqa: E402

EVENTS = ("kill", "errors", "hang", "all_down", "recovery")
"""Table rows per policy; "recovery" is the all-down event's second half (after the restart)."""
FAST_ANSWER_MS = 1000.0
"""While every backend is down, an answer slower than this is not "fast" (a connect attempt to a dead
loopback port is refused in microseconds; a second is already a client's patience running out)."""
AFTER_RESTORE_S = 1.0
"""The errors and hang windows end this long after the backend recovers (requests it held end then)."""
GAP_S = 1.0
"""A window ends this long before the next event starts, so none of its requests meets that event (a
backend applies a fault to the requests it has queued, too)."""
POLL_S = 0.2
"""How often the driver reads each proxy's /metrics while waiting for a backend to come back."""
PROXY_STOP_S = 5.0


@dataclass(frozen=True)
class Plan:
    load: float = 0.5
    """Offered load, share of the cluster's capacity, split evenly over the proxies run together."""
    warmup_s: float = 5.0
    restart_after_s: float = 3.0
    error_s: float = 6.0
    hang_s: float = 15.0
    down_s: float = 3.0
    return_wait_s: float = 40.0
    """Window after each recovery, before the next event: the proxy's default ejection (30 s, Envoy's)
    fits in it, so the events do not overlap. The wait for a backend's return goes on in the background
    until the all-down event (the events in between concern other backends)."""
    recover_s: float = 20.0
    client_timeout_s: float = 10.0
    """Per-request client timeout: shorter than `hang_s`, so a request left waiting on the hung backend
    counts as lost instead of succeeding when the backend resumes, and longer than the proxy's default
    per-try timeout (5 s, lbproxy/retry.py) plus a retry, so a retried request can still succeed."""
    grace_s: float = 10.0
    seed: int = 1

    def starts(self) -> dict[str, float]:
        """Start of each event's window, from the load's zero."""
        kill = self.warmup_s
        errors = kill + self.restart_after_s + self.return_wait_s
        hang = errors + self.error_s + self.return_wait_s
        down = hang + self.hang_s + self.return_wait_s
        return {"kill": kill, "errors": errors, "hang": hang, "all_down": down}

    @property
    def duration_s(self) -> float:
        return self.starts()["all_down"] + self.down_s + self.recover_s


@dataclass
class Marks:
    """When the driver acted (seconds from the load's zero) and when each proxy had the backend back."""

    fault_s: float = math.nan
    restart_s: float = math.nan
    """When the recovery began (restart spawned, or the fault reset)."""
    restored_s: float = math.nan
    """When it was done (the backends answer /health again)."""
    back_s: dict[str, float | None] = field(default_factory=dict)
    """Per policy: seconds from `restored_s` to the first new 2xx from the backend (None: not in the window)."""
    available: dict[str, int] = field(default_factory=dict)
    """Per policy: backends the proxy held available (not ejected) at `restored_s`."""


@dataclass(frozen=True, slots=True)
class EventRow:
    policy: str
    event: str
    stats: WindowStats
    failed_in_flight_at_fault: int
    back_s: float | None
    fast_5xx: tuple[int, int] | None = None
    """All-down window: (answered 502/503 within FAST_ANSWER_MS, requests)."""
    recovered_s: float | None = None
    """Recovery window: from all four answering /health until the last failed request sent after the
    restart began ended (0: none ended later)."""
    failures: tuple[str, ...] = ()
    """Each failed request of the window: sent at (s from the fault), status or error, latency."""
    available: int | None = None
    """Recovery window: backends available (not ejected) in the proxy when all four were up again."""


@dataclass
class ReliabilityRun:
    plan: Plan
    policies: list[PolicyConfig]
    proxy_args: list[str]
    capacity_rps: float
    rate_rps: float
    """Per proxy."""
    marks: dict[str, Marks]
    results: dict[str, RunResult]
    rows: list[EventRow] = field(default_factory=list)
    counters: dict[str, str] = field(default_factory=dict)
    """Per policy: the proxy's retry/ejection/error counters at the end (fault_harness.counters)."""
    elapsed_s: float = 0.0

    def row(self, policy: str, event: str) -> EventRow:
        return next(r for r in self.rows if r.policy == policy and r.event == event)


def _victim_state(proxy: Proc, name: str) -> float:
    """2xx relayed from backend `name` plus its requests in flight now: the count that new traffic must
    exceed (held requests answered when a hung backend resumes are not new traffic)."""
    in_flight = next(int(b["in_flight"]) for b in admin_backends(proxy.admin_url) if b["name"] == name)
    return backend_ok(scrape_metrics(proxy.admin_url), name) + in_flight


def _wait_back(
    clock: Clock, proxies: dict[str, Proc], names: dict[str, list[str]], i: int, marks: Marks, end_s: float
) -> threading.Thread:
    """Note in `marks.back_s` when each proxy relays a new 2xx from backend i, polling until `end_s`
    in a thread of its own: the next events (on other backends) go on meanwhile."""
    base = {p: _victim_state(proxy, names[p][i]) for p, proxy in proxies.items()}
    thread = threading.Thread(target=_poll_back, args=(clock, proxies, names, i, marks, end_s, base), daemon=True)
    thread.start()
    return thread


def _poll_back(
    clock: Clock,
    proxies: dict[str, Proc],
    names: dict[str, list[str]],
    i: int,
    marks: Marks,
    end_s: float,
    base: dict[str, float],
) -> None:
    waiting = dict(proxies)
    while waiting and clock.now() < end_s - POLL_S:
        time.sleep(POLL_S)
        for p, proxy in list(waiting.items()):
            if backend_ok(scrape_metrics(proxy.admin_url), names[p][i]) > base[p]:
                marks.back_s[p] = clock.now() - marks.restored_s
                del waiting[p]
    for p in waiting:
        marks.back_s[p] = None


def _event(
    clock: Clock, m: Marks, start_s: float, hold_s: float, fault: Callable[[], None], restore: Callable[[], None]
) -> None:
    """Apply `fault` at `start_s`, `restore` `hold_s` later, and note the times in `m`."""
    clock.until(start_s)
    fault()
    m.fault_s = clock.now()  # in force from here
    clock.until(start_s + hold_s)
    m.restart_s = clock.now()
    restore()
    m.restored_s = clock.now()


def drive_events(clock: Clock, cluster: EmulatedCluster, proxies: dict[str, Proc], plan: Plan) -> dict[str, Marks]:
    """The four events on the plan's timeline (runs in the driver thread beside the load)."""
    names = {p: backend_names(proxy.admin_url) for p, proxy in proxies.items()}
    starts = plan.starts()
    marks = {e: Marks() for e in ("kill", "errors", "hang", "all_down")}
    one_at_a_time = (
        ("kill", 0, plan.restart_after_s, lambda: cluster.kill(0), lambda: cluster.restart(0)),
        ("errors", 1, plan.error_s, lambda: cluster.fault(1, error_rate=1.0), lambda: cluster.reset(1)),
        ("hang", 2, plan.hang_s, lambda: cluster.fault(2, pause=True), lambda: cluster.reset(2)),
    )
    pollers = []
    for event, victim, hold_s, fault, restore in one_at_a_time:
        _event(clock, marks[event], starts[event], hold_s, fault, restore)
        pollers.append(_wait_back(clock, proxies, names, victim, marks[event], starts["all_down"] - GAP_S))
    for poller in pollers:
        poller.join()
    every = range(cluster.n)
    _event(
        clock,
        marks["all_down"],
        starts["all_down"],
        plan.down_s,
        lambda: cluster.kill(*every),
        lambda: cluster.restart(*every),
    )
    for p, proxy in proxies.items():
        marks["all_down"].available[p] = sum(1 for b in admin_backends(proxy.admin_url) if b["available"])
    return marks


def event_rows(policy: str, result: RunResult, marks: dict[str, Marks], plan: Plan) -> list[EventRow]:
    starts = plan.starts()
    failed = is_failure(result.status)

    def row(
        event: str,
        m: Marks,
        from_s: float,
        to_s: float,
        fast_5xx: tuple[int, int] | None = None,
        recovered_s: float | None = None,
    ) -> EventRow:
        mask = window_mask(result, from_s, to_s) & failed
        failures = tuple(
            f"sent {result.sent_s[i] - m.fault_s:+.3f} s: {result.status[i] or result.errors[i]} "
            f"after {1e3 * result.latency_s[i]:.0f} ms"
            for i in np.nonzero(mask)[0]
        )
        held = int((failed & held_at(result, m.fault_s)).sum()) if event != "recovery" else 0
        back = m.back_s.get(policy) if event in ("kill", "errors", "hang") else None
        available = m.available.get(policy) if event == "recovery" else None
        stats = window(result, from_s, to_s)
        return EventRow(policy, event, stats, held, back, fast_5xx, recovered_s, failures, available)

    m = marks["kill"]
    rows = [row("kill", m, m.fault_s, starts["errors"] - GAP_S)]
    for event, nxt in (("errors", "hang"), ("hang", "all_down")):
        m = marks[event]
        rows.append(row(event, m, m.fault_s, min(m.restored_s + AFTER_RESTORE_S, starts[nxt] - GAP_S)))
    m = marks["all_down"]
    # Down: until the first restart is spawned (a backend that boots early answers 200s before the rest).
    down = sent_between(result, m.fault_s, m.restart_s)
    fast = down & np.isin(result.status, (502, 503)) & (result.latency_s * 1e3 <= FAST_ANSWER_MS)
    rows.append(row("all_down", m, m.fault_s, m.restart_s, fast_5xx=(int(fast.sum()), int(down.sum()))))
    after = sent_between(result, m.restart_s, plan.duration_s) & failed
    ends = (result.sent_s + result.latency_s)[after]
    recovered = float(max(0.0, ends.max() - m.restored_s)) if after.any() else 0.0
    rows.append(row("recovery", m, m.restored_s, plan.duration_s, recovered_s=recovered))
    return rows


def run_reliability(
    policies: Sequence[PolicyConfig], plan: Plan, work_dir: Path, proxy_args: Sequence[str] = ()
) -> ReliabilityRun:
    """One cluster, one proxy per policy (all under load together, the load split evenly), one timeline."""
    started = time.monotonic()
    with emulated_cluster() as cluster:
        capacity = cluster.capacity_rps(DEFAULT_MIX)
        rate = plan.load * capacity / len(policies)
        proxies: dict[str, Proc] = {}
        try:
            runs = [
                (cluster.urls, [*p.args, "--seed", str(plan.seed), *proxy_args], work_dir / f"proxy-{p.name}.log")
                for p in policies
            ]
            proxies = {p.name: proc for p, proc in zip(policies, start_lbproxies(runs), strict=True)}
            targets = [
                (proxies[p.name].url, poisson_schedule(rate, plan.duration_s, plan.seed + k, DEFAULT_MIX))
                for k, p in enumerate(policies)
            ]
            holder: dict[str, dict[str, Marks]] = {}

            def drive(clock: Clock) -> None:
                holder["marks"] = drive_events(clock, cluster, proxies, plan)

            results = run_with_driver(targets, drive, plan.grace_s, plan.client_timeout_s)
            final = {name: counters(proxy.admin_url) for name, proxy in proxies.items()}
        finally:
            for proxy in proxies.values():
                proxy.stop(PROXY_STOP_S)
    run = ReliabilityRun(
        plan,
        list(policies),
        list(proxy_args),
        capacity,
        rate,
        holder["marks"],
        {p.name: r for p, r in zip(policies, results, strict=True)},
        counters=final,
    )
    for p in policies:
        run.rows.extend(event_rows(p.name, run.results[p.name], run.marks, plan))
    run.elapsed_s = time.monotonic() - started
    return run
