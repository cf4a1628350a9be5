"""Pool semantics without traffic: availability, Envoy-style ejection and panic mode, health
hysteresis, runtime membership. The live versions (real backends, real faults) are in test_proxy_faults."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from support import LOOPBACK, free_port, running, start_backend

from lbproxy.config import ConfigError
from lbproxy.config_values import BackendSpec
from lbproxy.observe import MAX_BACKENDS, Outcome
from lbproxy.upstream import Pool, PoolConfig


def make_pool(n: int, **cfg: float) -> Pool:
    specs = [BackendSpec(url=f"http://127.0.0.1:{9000 + i}", weight=1.0 + i) for i in range(n)]
    return Pool(specs, PoolConfig(**cfg))  # type: ignore[arg-type]


def fail(pool: Pool, i: int, times: int, now: float = 0.0) -> None:
    for _ in range(times):
        pool.on_dispatch(i)
        pool.on_complete(Outcome(backend=i, req_class=0, latency_s=0.001, error=True), now, failed=True)


def test_view_mirrors_specs() -> None:
    pool = make_pool(3)
    assert pool.view.n == 3
    assert pool.view.capacity == [1.0, 2.0, 3.0]
    assert pool.view.candidates == [0, 1, 2]


def test_no_backends_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no backends configured"):
        Pool([])


def test_duplicate_backend_is_a_config_error() -> None:
    spec = BackendSpec(url="http://127.0.0.1:9000")
    with pytest.raises(ConfigError, match="listed twice"):
        Pool([spec, spec])


def test_consecutive_failures_eject_and_success_resets() -> None:
    pool = make_pool(4, eject_consecutive_failures=3, eject_base_s=10.0)
    fail(pool, 0, 2)
    pool.on_dispatch(0)
    pool.on_complete(Outcome(0, 0, 0.001, False), 0.0, failed=False)  # a success resets the streak
    fail(pool, 0, 2)
    assert pool.view.available[0]
    fail(pool, 0, 1)
    assert not pool.view.available[0]
    assert 0 not in pool.view.candidates
    assert pool.backends[0].ejected_until_s == pytest.approx(10.0)
    assert pool.view.in_flight == [0, 0, 0, 0]


def test_ejection_time_grows_with_times_ejected_and_expires() -> None:
    pool = make_pool(4, eject_consecutive_failures=1, eject_base_s=10.0)
    fail(pool, 1, 1, now=0.0)
    assert pool.backends[1].ejected_until_s == pytest.approx(10.0)
    pool.expire(9.9)
    assert not pool.view.available[1]
    pool.expire(10.0)
    assert pool.view.available[1]
    fail(pool, 1, 1, now=20.0)
    assert pool.backends[1].ejected_until_s == pytest.approx(40.0)  # base x 2nd ejection


def test_max_ejection_percent_caps_ejections_but_one_is_always_allowed() -> None:
    pool = make_pool(4, eject_consecutive_failures=1, max_ejection_percent=50.0, panic_threshold_percent=0.0)
    for i in range(4):
        fail(pool, i, 1)
    assert sum(b.ejected for b in pool.backends) == 2
    pool = make_pool(2, eject_consecutive_failures=1, max_ejection_percent=10.0, panic_threshold_percent=0.0)
    fail(pool, 0, 1)
    fail(pool, 1, 1)
    assert [b.ejected for b in pool.backends] == [True, False]


def test_panic_mode_routes_over_all_backends() -> None:
    pool = make_pool(4, panic_threshold_percent=50.0, health_fall=1)
    pool.apply_health(pool.backends[0], ok=False)
    assert pool.view.candidates == [1, 2, 3] and not pool.panic
    pool.apply_health(pool.backends[1], ok=False)
    assert pool.view.candidates == [2, 3] and not pool.panic  # exactly 50 % available: no panic yet
    pool.apply_health(pool.backends[2], ok=False)
    assert pool.panic
    assert pool.view.candidates == [0, 1, 2, 3]
    assert pool.view.available == [False, False, False, True]  # the feature still tells the truth


def test_health_rise_and_fall_hysteresis() -> None:
    pool = make_pool(2, health_rise=2, health_fall=3, panic_threshold_percent=0.0)
    b = pool.backends[0]
    for _ in range(2):
        pool.apply_health(b, ok=False)
    assert b.healthy
    pool.apply_health(b, ok=True)  # a pass breaks the failing streak
    for _ in range(2):
        pool.apply_health(b, ok=False)
    assert b.healthy
    pool.apply_health(b, ok=False)
    assert not b.healthy and pool.view.candidates == [1]
    pool.apply_health(b, ok=True)
    assert not b.healthy
    pool.apply_health(b, ok=True)
    assert b.healthy and pool.view.candidates == [0, 1]


def test_add_and_remove_at_runtime() -> None:
    pool = make_pool(2)
    changed: list[str] = []
    pool.listeners.append(lambda b: changed.append(b.name))
    b = pool.add(BackendSpec(url="http://127.0.0.1:9100", weight=4))
    assert b.index == 2 and pool.view.n == 3 and pool.view.capacity[2] == 4.0
    assert pool.view.candidates == [0, 1, 2]
    with pytest.raises(ValueError, match="already exists"):
        pool.add(BackendSpec(url="http://127.0.0.1:9100"))
    pool.remove("127.0.0.1:9000")
    assert pool.view.candidates == [1, 2]
    assert pool.view.n == 3  # the slot stays, masked, so indices never shift
    with pytest.raises(KeyError):
        pool.remove("127.0.0.1:9000")
    assert changed == ["127.0.0.1:9100", "127.0.0.1:9000"]


def test_slots_are_limited() -> None:
    pool = make_pool(MAX_BACKENDS)
    pool.remove(pool.backends[0].name)
    with pytest.raises(ValueError, match="slots"):
        pool.add(BackendSpec(url="http://127.0.0.1:9999"))


def test_describe_is_json_ready() -> None:
    pool = make_pool(2, eject_consecutive_failures=1)
    fail(pool, 0, 1, now=5.0)
    rows = pool.describe(now_s=6.0)
    assert rows[0]["available"] is False and rows[0]["ejected_for_s"] == pytest.approx(29.0)
    assert rows[0]["ejected_until"] == pytest.approx(time.time() + 29.0, abs=5.0)
    assert rows[1]["ejected_until"] is None and rows[1]["requests"] == 0
    assert {"name", "url", "weight", "in_flight", "latency_cost_s", "error_rate", "requests"} <= set(rows[0])


async def test_active_health_checks_against_real_backend() -> None:
    """A live backend passes /health; a closed port fails and is marked down after `fall` probes."""
    with running(start_backend()) as (backend,):
        dead = f"http://{LOOPBACK}:{free_port()}"
        pool = Pool(
            [BackendSpec(url=backend.url), BackendSpec(url=dead)],
            PoolConfig(health_interval_s=0.05, health_fall=2, health_rise=1, panic_threshold_percent=0.0),
        )
        async with aiohttp.ClientSession() as session:
            pool.start_health_checks(session)
            try:
                deadline = time.monotonic() + 30
                while pool.backends[1].healthy and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            finally:
                await pool.stop()
        assert pool.backends[0].healthy and not pool.backends[1].healthy
        assert pool.view.candidates == [0]
