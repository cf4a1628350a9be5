"""Open-loop HTTP load: Poisson arrivals from a fixed seed, each request fired at its scheduled time.

    python -m loadgen.open_loop --url http://127.0.0.1:8080 --rate 600 --duration-s 30 --seed 1 \\
        [--mix light=0.6,heavy=0.3,static=0.1] [--grace-s 10] [--json out.json]

Why open loop: Locust users (loadgen/phases.py) are a closed loop, each waiting for its answer before
the next request, so a policy that builds a queue slows its own offered load down and the queue stays
out of the figures. Here the whole schedule (arrival times and request classes) is drawn up front
from the seed and never looks at a response: a slow policy's queue shows up as latency, in full.

The client must never be the bottleneck, so every request is its own task on a connector that allows
CONNECTION_LIMIT connections, and the generator measures its own lag (actual send time minus
scheduled time): a run whose lag is small measured the server, not the client. The run is bounded:
requests still unanswered `grace_s` after the last scheduled send are cut off and counted as failed
(timeouts), with their age at the cut-off as latency, so a queue cannot hide by never answering.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from lbproxy.cluster import CLASS_NAMES
from lbproxy.phases import PHASES
from loadgen import ScheduleError

CLASS_PATHS = ("/api/light", "/api/heavy", "/static/app.js")
"""One path per request class (lbproxy.observe.RequestClass order), the paths loadgen/phases.py's
Locust users request (its PATHS; not imported: importing that module imports Locust, which
monkey-patches the standard library with gevent)."""
DEFAULT_MIX = (0.6, 0.3, 0.1)
"""Light/heavy/static weights when no --mix is given."""
CONNECTION_LIMIT = 10_000
"""Client connections allowed at once: far above any queue a test builds, so requests never wait for
a connection in the client (that wait would be the client throttling the offered load)."""
START_LEAD_S = 0.05
"""The schedule's zero is this long after setup, so the first sends are not late by setup work."""
DEFAULT_GRACE_S = 10.0
"""How long unanswered requests are waited for after the last scheduled send."""
NOFILE_WANTED = CONNECTION_LIMIT + 1024


# --- the schedule --------------------------------------------------------------------------------
def parse_mix(text: str) -> tuple[float, float, float]:
    """Class weights from `light=0.6,heavy=0.3,static=0.1` (missing classes weigh 0), from
    `0.6/0.3/0.1` (loadgen's --phase-mixes form) or from a phase name of lbproxy.phases."""
    text = text.strip()
    for phase in PHASES:
        if text == phase.name:
            return phase.mix
    try:
        if "=" in text:
            weights = dict.fromkeys(CLASS_NAMES, 0.0)
            for part in text.split(","):
                key, value = part.split("=")
                if key.strip() not in weights:
                    raise ValueError(key)
                weights[key.strip()] = float(value)
            w = tuple(weights[c] for c in CLASS_NAMES)
        else:
            w = tuple(float(v) for v in text.split("/"))
    except ValueError:
        w = ()
    if len(w) != 3 or any(not v >= 0 for v in w) or sum(w) <= 0:
        names = ", ".join(p.name for p in PHASES)
        raise ScheduleError(
            f"--mix must be light=W,heavy=W,static=W, LIGHT/HEAVY/STATIC or a phase name ({names}), got {text!r}"
        )
    return (w[0], w[1], w[2])


@dataclass(frozen=True)
class Schedule:
    """Every request of a run, drawn before the first is sent."""

    rate_rps: float
    duration_s: float
    seed: int
    mix: tuple[float, float, float]
    times_s: np.ndarray
    """Send times (float64, seconds from the run's zero), increasing, all below duration_s."""
    classes: np.ndarray
    """Request class of each send (int8, index into CLASS_PATHS)."""

    def __len__(self) -> int:
        return len(self.times_s)


def poisson_schedule(rate_rps: float, duration_s: float, seed: int, mix: Sequence[float] = DEFAULT_MIX) -> Schedule:
    """Poisson arrivals at `rate_rps` over [0, duration_s) with classes drawn from `mix`.

    Arrival times and classes come from two independent streams of one SeedSequence, so the same
    seed gives the same arrival times whatever the mix."""
    if not rate_rps > 0 or not duration_s > 0:
        raise ScheduleError(f"rate and duration must be positive, got {rate_rps!r} req/s for {duration_s!r} s")
    weights = np.asarray(mix, dtype=float)
    if weights.shape != (3,) or (weights < 0).any() or weights.sum() <= 0:
        raise ScheduleError(f"mix must be 3 non-negative weights, got {list(mix)!r}")
    arrivals, classes = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    expected = rate_rps * duration_s
    chunk = int(expected + 6 * math.sqrt(expected) + 16)  # one draw suffices but for a 6-sigma tail
    times = np.cumsum(arrivals.exponential(1.0 / rate_rps, chunk))
    while times[-1] < duration_s:
        times = np.concatenate([times, times[-1] + np.cumsum(arrivals.exponential(1.0 / rate_rps, chunk))])
    times = times[times < duration_s]
    cls = classes.choice(3, size=len(times), p=weights / weights.sum()).astype(np.int8)
    return Schedule(float(rate_rps), float(duration_s), int(seed), (mix[0], mix[1], mix[2]), times, cls)


# --- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Summary:
    """One run in numbers. Latency percentiles are over every scheduled request: answered ones (any
    status), connection errors (time to the error) and cut-off ones (age at the cut-off)."""

    url: str
    rate_rps: float
    duration_s: float
    seed: int
    count: int
    """Requests scheduled (all were sent unless the run was cut off while still sending)."""
    answered: int
    """Requests that got an HTTP response, whatever its status."""
    errors: int
    """Failed requests: status >= 500, connection errors and timeouts."""
    timeouts: int
    """Requests unanswered at the hard stop (included in errors)."""
    error_rate: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    throughput_rps: float
    """Successful (status < 500) responses per second, from the run's zero to the last answer."""
    send_lag_p50_ms: float
    send_lag_p99_ms: float
    send_lag_max_ms: float
    """How late the worst request was sent versus its schedule: the generator's own lag."""

    def line(self) -> str:
        return (
            f"{self.count} requests at {self.rate_rps:.0f} req/s for {self.duration_s:g} s: "
            f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, p99.9 {self.p999_ms:.1f} ms, "
            f"mean {self.mean_ms:.1f} ms, errors {self.errors} ({100 * self.error_rate:.2f} %, "
            f"{self.timeouts} timeouts), {self.throughput_rps:.0f} req/s answered, "
            f"send lag p99 {self.send_lag_p99_ms:.2f} ms / max {self.send_lag_max_ms:.2f} ms"
        )


@dataclass
class RunResult:
    """The schedule, what happened to each request (arrays indexed like the schedule) and the summary."""

    schedule: Schedule
    sent_s: np.ndarray
    """Actual send time (s from the run's zero); NaN if never sent."""
    latency_s: np.ndarray
    """Send to last body byte, error or cut-off (s); NaN if never sent."""
    status: np.ndarray
    """HTTP status; 0 for a connection error or timeout."""
    errors: list[str]
    """Empty string, or the error of a request that got no response."""
    summary: Summary

    @property
    def send_lag_s(self) -> np.ndarray:
        return self.sent_s - self.schedule.times_s

    def as_json(self, raw: bool = True) -> dict[str, Any]:
        """The summary, and with `raw` one entry per request (for plots and reanalysis)."""
        out: dict[str, Any] = {"summary": asdict(self.summary)}
        if raw:
            out["requests"] = {
                "scheduled_s": self.schedule.times_s.round(6).tolist(),
                "path": [CLASS_PATHS[c] for c in self.schedule.classes],
                "sent_s": [None if math.isnan(v) else round(v, 6) for v in self.sent_s.tolist()],
                "latency_s": [None if math.isnan(v) else round(v, 6) for v in self.latency_s.tolist()],
                "status": self.status.tolist(),
                "error": self.errors,
            }
        return out


def is_failure(status: np.ndarray) -> np.ndarray:
    """Failed: no response (status 0) or a server error (>= 500)."""
    return (status == 0) | (status >= 500)


def summarize(
    url: str, schedule: Schedule, sent_s: np.ndarray, latency_s: np.ndarray, status: np.ndarray, errors: list[str]
) -> Summary:
    n = len(schedule)
    failed = is_failure(status)
    timeouts = sum(1 for e in errors if e == "timeout")
    lat_ms = latency_s[~np.isnan(latency_s)] * 1e3
    lag_ms = (sent_s - schedule.times_s)[~np.isnan(sent_s)] * 1e3
    ok = ~failed
    end_s = float(np.nanmax(sent_s + latency_s)) if n and not np.isnan(sent_s).all() else schedule.duration_s

    def pct(xs: np.ndarray, q: float) -> float:
        return float(np.percentile(xs, q)) if len(xs) else math.nan

    return Summary(
        url=url,
        rate_rps=schedule.rate_rps,
        duration_s=schedule.duration_s,
        seed=schedule.seed,
        count=n,
        answered=int((status > 0).sum()),
        errors=int(failed.sum()),
        timeouts=timeouts,
        error_rate=float(failed.mean()) if n else 0.0,
        mean_ms=float(lat_ms.mean()) if len(lat_ms) else math.nan,
        p50_ms=pct(lat_ms, 50),
        p99_ms=pct(lat_ms, 99),
        p999_ms=pct(lat_ms, 99.9),
        max_ms=float(lat_ms.max()) if len(lat_ms) else math.nan,
        throughput_rps=float(ok.sum()) / max(end_s, 1e-9),
        send_lag_p50_ms=pct(lag_ms, 50),
        send_lag_p99_ms=pct(lag_ms, 99),
        send_lag_max_ms=float(lag_ms.max()) if len(lag_ms) else math.nan,
    )


# --- the run ---------------------------------------------------------------------------------------
def raise_nofile_limit(wanted: int = NOFILE_WANTED) -> None:
    """Lift the soft open-files limit towards `wanted` (up to the hard limit): each open request is a
    socket, and a 1024 soft limit would turn a long queue into client-side errors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run_open_loop(
    url: str, schedule: Schedule, grace_s: float = DEFAULT_GRACE_S, timeout_s: float | None = None
) -> RunResult:
    """Send `schedule` to `url` (base URL; each request's path comes from its class) and wait for the
    answers, at most `grace_s` past the last scheduled send. `timeout_s` bounds each request
    (None: only the hard stop does)."""
    base = url.rstrip("/")
    n = len(schedule)
    times = schedule.times_s
    urls = [base + p for p in CLASS_PATHS]
    sent = np.full(n, math.nan)
    latency = np.full(n, math.nan)
    status = np.zeros(n, dtype=np.int32)
    errors = [""] * n
    perf = time.perf_counter
    connector = aiohttp.TCPConnector(limit=CONNECTION_LIMIT, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()) as s:
        t0 = perf() + START_LEAD_S

        async def one(i: int) -> None:
            start = perf()
            sent[i] = start - t0
            try:
                async with s.get(urls[schedule.classes[i]]) as resp:
                    await resp.read()
                    status[i] = resp.status
            except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
                errors[i] = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            latency[i] = perf() - start

        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        hard_stop = t0 + schedule.duration_s + grace_s
        sleep = asyncio.sleep
        for i in range(n):
            delay = t0 + times[i] - perf()
            if delay > 0:
                await sleep(delay)
            elif perf() > hard_stop:
                break  # so far behind that the run is over: the rest are never sent (counted failed)
            tasks.append(loop.create_task(one(i)))
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, hard_stop - perf()))
        cut = perf()
        for i, task in enumerate(tasks):
            if not task.done():
                task.cancel()
                errors[i] = "timeout"
                latency[i] = cut - t0 - sent[i]
        for i in range(len(tasks), n):
            errors[i] = "not sent"
        await asyncio.gather(*tasks, return_exceptions=True)
    summary = summarize(url, schedule, sent, latency, status, errors)
    return RunResult(schedule, sent, latency, status, errors, summary)


def run(url: str, schedule: Schedule, grace_s: float = DEFAULT_GRACE_S, timeout_s: float | None = None) -> RunResult:
    """`run_open_loop` in a fresh event loop (uvloop when installed, as the proxy uses)."""
    raise_nofile_limit()
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_open_loop(url, schedule, grace_s, timeout_s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadgen.open_loop", description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--rate", type=float, required=True, help="mean arrivals per second (Poisson)")
    ap.add_argument("--duration-s", type=float, required=True, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=1, help="seed of the arrival times and classes")
    ap.add_argument("--mix", default="light=0.6,heavy=0.3,static=0.1", help="class weights (see parse_mix)")
    ap.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S, help="wait for answers past the last send")
    ap.add_argument("--timeout-s", type=float, default=None, help="per-request timeout (default: hard stop only)")
    ap.add_argument("--json", type=Path, default=None, help="write the summary and every request here")
    args = ap.parse_args(argv)
    try:
        schedule = poisson_schedule(args.rate, args.duration_s, args.seed, parse_mix(args.mix))
    except ScheduleError as exc:
        print(f"open_loop: {exc}", file=sys.stderr)
        return 2
    result = run(args.url, schedule, args.grace_s, args.timeout_s)
    print(result.summary.line())
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_json()) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
