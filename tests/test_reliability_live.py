"""Backend faults under open-loop load, live (issue 11 item 4): benchmarks/reliability.py's timeline,
shortened, with a p2c proxy and a dqn proxy in front of the same four emulated backends at once (each
at half the load), run once for the module; each test reads one property of that run.

A backend SIGKILLed and restarted comes back into rotation and costs no GET; with every backend down
each request gets a fast 502/503, and the proxy recovers by itself once they return; while one
backend answers 500s or hangs, idempotent GETs are retried onto the healthy ones and none is lost.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from live_compare import policy_configs
from reliability_run import FAST_ANSWER_MS, Plan, ReliabilityRun, run_reliability

from lbproxy.config import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timing]

POLICIES = ("p2c", "dqn")
PLAN = Plan(
    load=0.5,
    warmup_s=1.5,
    restart_after_s=2.0,
    error_s=2.0,
    hang_s=3.0,
    down_s=1.5,
    return_wait_s=4.0,
    recover_s=6.0,
    client_timeout_s=2.0,
    grace_s=5.0,
)
"""28 s of load. The client gives up after 2 s, before the hang ends: a GET left on the hung backend
is lost unless the proxy retries it elsewhere. A backend's return is awaited until the all-down event
(the dqn policy sends a re-admitted backend its first request up to ~5 s after its ejection ends). The
recovery window counts from the restart of all four, whose boots take 1-3.5 s here."""
HAS_RETRY = "per_try_timeout_s" in Settings.model_fields
"""Retry on 5xx and per-try timeout (lbproxy/retry.py, issue 11 item 7) are in this proxy."""
PER_TRY_TIMEOUT_S = 0.75
"""Per-try timeout for this run: a hung first try is abandoned well inside the client's 2 s (the
default, 5 s, would outlast it); far above a healthy answer here (p99 0.4-0.5 s under this load)."""
PROXY_ARGS = ("--eject-base-s", "3", *(("--per-try-timeout-s", str(PER_TRY_TIMEOUT_S)) if HAS_RETRY else ()))
"""The default ejection (30 s) would outlast this run's windows; 3 s outlasts the killed backend's
2 s downtime and ends before the next event."""
needs_retry = pytest.mark.xfail(
    not HAS_RETRY,
    strict=True,
    reason="needs retry on 5xx and a per-try timeout (lbproxy/retry.py): without them the 5xx and the "
    "hung first tries reach the client",
)
RECOVERY_GRACE_S = 1.0
"""After the restart of all four, requests sent this much later must all succeed."""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReliabilityRun]:
    configs, notes = policy_configs(POLICIES, None)
    assert not notes
    work: Path = tmp_path_factory.mktemp("reliability")
    yield run_reliability(configs, PLAN, work, PROXY_ARGS)


@pytest.mark.parametrize("policy", POLICIES)
def test_killed_backend_returns_to_rotation(run: ReliabilityRun, policy: str) -> None:
    back = run.row(policy, "kill").back_s
    limit = PLAN.starts()["all_down"] - run.marks["kill"].restored_s
    assert back is not None, f"{policy}: b0 got no traffic in the {limit:.1f} s after its restart"


@pytest.mark.parametrize("policy", POLICIES)
def test_kill_loses_no_get(run: ReliabilityRun, policy: str) -> None:
    row = run.row(policy, "kill")
    # In-flight GETs to the killed backend see a reset and are retried once on another backend.
    assert row.stats.failed == 0, f"{policy}: {row.stats.failed} GETs lost: {row.failures}"


@pytest.mark.parametrize("policy", POLICIES)
def test_all_down_answers_fast_5xx_and_recovers(run: ReliabilityRun, policy: str) -> None:
    result = run.results[policy]
    m = run.marks["all_down"]
    down = (result.sent_s >= m.fault_s) & (result.sent_s < m.restart_s)
    fast = np.isin(result.status, (502, 503)) & (result.latency_s * 1e3 <= FAST_ANSWER_MS)
    slow = [
        f"sent {result.sent_s[i] - m.fault_s:+.3f} s: {result.status[i] or result.errors[i]} after "
        f"{1e3 * result.latency_s[i]:.0f} ms"
        for i in np.nonzero(down & ~fast)[0]
    ]
    assert down.sum() > 0 and not slow, f"{policy}: not a 502/503 within {FAST_ANSWER_MS:g} ms: {slow}"
    later = (result.sent_s >= m.restored_s + RECOVERY_GRACE_S) & (result.sent_s < PLAN.duration_s)
    assert later.sum() > 0
    assert (result.status[later] == 200).all(), f"{policy}: lost after recovery: {run.row(policy, 'recovery').failures}"


@needs_retry
@pytest.mark.parametrize("policy", POLICIES)
def test_backend_answering_500s_loses_no_get(run: ReliabilityRun, policy: str) -> None:
    row = run.row(policy, "errors")
    assert row.stats.failed == 0, f"{policy}: {row.stats.failed} GETs lost while b1 answered 500s: {row.failures}"


@needs_retry
@pytest.mark.parametrize("policy", POLICIES)
def test_hung_backend_loses_no_get(run: ReliabilityRun, policy: str) -> None:
    row = run.row(policy, "hang")
    assert row.stats.failed == 0, f"{policy}: {row.stats.failed} GETs lost while b2 hung: {row.failures}"
