"""loadgen/open_loop.py: the schedule is Poisson, seeded and independent of the answers; a run against
real backends (ours and gunicorn) answers everything, and an overloaded backend shows its queue as
growing latency while the requests still leave on schedule."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import REPO, Proc, start_backend

from loadgen import ScheduleError
from loadgen.open_loop import CLASS_PATHS, main, parse_mix, poisson_schedule, run

sys.path.insert(0, str(REPO / "benchmarks"))
from foreign_cluster import start_foreign_cluster

pytestmark = pytest.mark.timing

LAG_P50_MAX_MS = 20.0
"""Median send lag bound: generous, the 2 cores are shared with other work (its p99/max can be far
worse during a stall of the whole machine, which is why only the median is asserted)."""


# --- the schedule ----------------------------------------------------------------------------------
def test_parse_mix_forms() -> None:
    assert parse_mix("light=0.6,heavy=0.3,static=0.1") == (0.6, 0.3, 0.1)
    assert parse_mix("heavy=1") == (0.0, 1.0, 0.0)
    assert parse_mix("0.5/0.4/0.1") == (0.5, 0.4, 0.1)
    assert parse_mix("mixed") == (0.5, 0.4, 0.1)  # lbproxy.phases
    for bad in ("light=0.6,huge=0.4", "0.5/0.5", "light=-1", "light=0", "nonsense"):
        with pytest.raises(ScheduleError, match="--mix"):
            parse_mix(bad)


def test_schedule_is_poisson_at_the_rate() -> None:
    rate, duration = 400.0, 25.0
    s = poisson_schedule(rate, duration, seed=3)
    expected = rate * duration
    assert abs(len(s) - expected) < 5 * math.sqrt(expected)
    assert (np.diff(s.times_s) >= 0).all() and s.times_s[0] >= 0 and s.times_s[-1] < duration
    gaps = np.diff(s.times_s)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: CV 1
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.02)  # P(gap > mean) = 1/e
    counts = np.histogram(s.times_s, bins=int(duration), range=(0, duration))[0]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.5)  # Poisson counts: dispersion 1


def test_same_seed_same_schedule_and_mix_only_changes_classes() -> None:
    a = poisson_schedule(200, 5, seed=7, mix=(0.6, 0.3, 0.1))
    b = poisson_schedule(200, 5, seed=7, mix=(0.6, 0.3, 0.1))
    np.testing.assert_array_equal(a.times_s, b.times_s)
    np.testing.assert_array_equal(a.classes, b.classes)
    c = poisson_schedule(200, 5, seed=8, mix=(0.6, 0.3, 0.1))
    assert len(c) != len(a) or not np.array_equal(c.times_s, a.times_s)
    d = poisson_schedule(200, 5, seed=7, mix=(0.1, 0.1, 0.8))
    np.testing.assert_array_equal(d.times_s, a.times_s)
    assert not np.array_equal(d.classes, a.classes)


def test_classes_follow_the_mix() -> None:
    s = poisson_schedule(1000, 20, seed=1, mix=(0.6, 0.3, 0.1))
    n = len(s)
    for c, p in enumerate((0.6, 0.3, 0.1)):
        assert abs((s.classes == c).sum() - p * n) < 5 * math.sqrt(n * p * (1 - p))


def test_bad_schedule_arguments() -> None:
    with pytest.raises(ScheduleError):
        poisson_schedule(0, 1, seed=1)
    with pytest.raises(ScheduleError):
        poisson_schedule(10, 1, seed=1, mix=(0, 0, 0))


# --- live runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend() -> Iterator[Proc]:
    """Our own backend, roomy: 32 workers at ~10 ms (light) serve far more than the tests send."""
    proc = start_backend(workers=32)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def one_worker() -> Iterator[Proc]:
    """A 1-worker backend with a constant 10 ms service: exactly 100 req/s of capacity."""
    proc = start_backend("--distribution", "constant", "--light-ms", "10", workers=1)
    yield proc
    proc.stop()


def test_every_request_answered(backend: Proc, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    assert main(["--url", backend.url, "--rate", "150", "--duration-s", "2", "--seed", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    summary, requests = data["summary"], data["requests"]
    assert summary["count"] == len(requests["status"]) == len(poisson_schedule(150, 2, seed=1)) > 200
    assert summary["errors"] == 0 and summary["answered"] == summary["count"]
    assert set(requests["status"]) == {200} and set(requests["error"]) == {""}
    assert set(requests["path"]) == set(CLASS_PATHS)
    assert summary["send_lag_p50_ms"] < LAG_P50_MAX_MS
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["p999_ms"] <= summary["max_ms"]


def test_foreign_backend_answered() -> None:
    with start_foreign_cluster(workers=(4,)) as cluster:
        result = run(cluster.urls[0], poisson_schedule(60, 2, seed=2))
    assert result.summary.errors == 0 and (result.status == 200).all()
    assert result.summary.count == len(result.schedule) > 60


@pytest.mark.slow
def test_overload_shows_a_growing_queue_not_a_throttled_send_rate(one_worker: Proc) -> None:
    """200 req/s into 100 req/s of capacity: the queue grows by ~100 requests a second. A closed-loop
    client would slow down to 100 req/s; this one keeps sending at 200 and the latency grows."""
    schedule = poisson_schedule(200, 2.0, seed=4, mix=(1.0, 0.0, 0.0))
    result = run(one_worker.url, schedule, grace_s=10)
    assert result.summary.errors == 0
    sent = result.sent_s
    assert len(schedule) / (sent.max() - sent.min()) == pytest.approx(200, rel=0.15)
    assert float(np.median(result.send_lag_s)) * 1e3 < LAG_P50_MAX_MS
    t = schedule.times_s
    early = result.latency_s[t < 0.25].mean()
    late = result.latency_s[t > 1.5].mean()
    assert late > 0.5 and late > 3 * early


def test_hard_stop_counts_unanswered_requests_as_timeouts() -> None:
    # Its own backend: the ~200 requests left queued there must not delay another test.
    proc = start_backend("--distribution", "constant", "--light-ms", "10", workers=1)
    try:
        schedule = poisson_schedule(300, 1.0, seed=5, mix=(1.0, 0.0, 0.0))
        t0 = time.monotonic()
        result = run(proc.url, schedule, grace_s=0.3)
        elapsed = time.monotonic() - t0
    finally:
        proc.stop()
    s = result.summary
    assert elapsed < 1.0 + 0.3 + 1.0  # bounded: duration + grace (+ setup and teardown)
    assert s.timeouts > 50 and s.errors == s.timeouts and s.answered + s.timeouts == s.count
    cut = np.array([e == "timeout" for e in result.errors])
    assert (result.status[cut] == 0).all()
    # A cut-off request's latency is its age at the cut-off: at least the grace period, less however
    # late it was sent (the cut-off counts from the schedule's end; a busy machine sends late).
    assert (result.latency_s[cut] >= 0.3 - 0.02 - result.send_lag_s[cut]).all()
    assert s.p99_ms >= 300.0
