"""Retries, the retry budget, slow start and latency ejection on real processes (loopback): four
emulated backends with constant service times, faults injected through their admin endpoint, counts
read from the proxy's /metrics and GET /admin/backends. Assertions are on counts, never on timings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
from support import Proc, running, start_backend, start_proxy
from test_proxy import call
from test_proxy_faults import backend_rows, fault, metric, reset

pytestmark = pytest.mark.timing

QUIET = ["--policy", "round_robin", "--health-interval-s", "0"]
"""Deterministic rotation; no active checks (the faults below would fail them too)."""
NO_EJECTION = ["--eject-consecutive-failures", "1000", "--latency-eject-factor", "0"]


@pytest.fixture(scope="module")
def quad() -> Iterator[tuple[Proc, ...]]:
    # light = 10 ms of constant service at speed 1; 16 workers so concurrent requests never queue
    backends = [start_backend("--distribution", "constant", workers=16) for _ in range(4)]
    with running(*backends) as procs:
        yield procs


@pytest.fixture(autouse=True)
def _reset_faults(quad: tuple[Proc, ...]) -> Iterator[None]:
    yield
    for b in quad:
        if b.popen.poll() is None:
            reset(b)


def gets(proxy: Proc, n: int, target: str = "/api/light") -> list[int]:
    return [call(proxy.port, "GET", target)[0] for _ in range(n)]


def test_5xx_answers_are_retried_on_another_backend(quad: tuple[Proc, ...]) -> None:
    fault(quad[0], error_rate=1.0)
    with running(start_proxy([b.url for b in quad], *QUIET, *NO_EJECTION)) as (proxy,):
        assert gets(proxy, 40) == [200] * 40  # none lost: every 500 was retried elsewhere
        assert metric(proxy, "lbproxy_retries_total") >= 5
        # a request with a body is never replayed: the 500s of those routed to quad[0] reach the client
        codes = [call(proxy.port, "POST", "/api/light", body=b"x" * 10)[0] for _ in range(8)]
        assert 500 in codes and 200 in codes


def test_a_hanging_backend_costs_one_per_try_timeout(quad: tuple[Proc, ...]) -> None:
    hung = quad[1]
    fault(hung, pause=True)
    args = [*QUIET, *NO_EJECTION, "--per-try-timeout-s", "0.3", "--read-timeout-s", "30"]
    with running(start_proxy([b.url for b in quad], *args)) as (proxy,):
        assert gets(proxy, 12) == [200] * 12  # the 30 s read timeout never came into play
        name = backend_rows(proxy)[hung.url]["name"]
        abandoned = metric(proxy, f'lbproxy_upstream_errors_total{{backend="{name}",kind="per_try_timeout"}}')
        assert abandoned >= 2
        assert metric(proxy, "lbproxy_retries_total") == abandoned


async def _concurrent_gets(port: int, n: int) -> list[int]:
    async with aiohttp.ClientSession() as session:

        async def one() -> int:
            async with session.get(f"http://127.0.0.1:{port}/api/light") as resp:
                await resp.read()
                return resp.status

        return await asyncio.gather(*(one() for _ in range(n)))


def test_first_tries_beyond_the_budget_wait_instead_of_failing(quad: tuple[Proc, ...]) -> None:
    """Twenty concurrent GETs over two backends, ten stuck on a hung one when the per-try timeout
    fires: the budget (at its floor of three concurrent retries) lets some be retried; the others are
    not abandoned (no 504 for a request that was only slow), they wait for the backend, which resumes
    2 s later. All twenty succeed."""
    hung = quad[0]
    fault(hung, pause=True)
    args = [*QUIET, *NO_EJECTION, "--per-try-timeout-s", "0.5", "--retry-budget-percent", "1"]

    async def scenario(port: int) -> list[int]:
        gets = asyncio.ensure_future(_concurrent_gets(port, 20))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(reset, hung)
        return await gets

    with running(start_proxy([quad[0].url, quad[1].url], *args)) as (proxy,):
        assert asyncio.run(scenario(proxy.port)) == [200] * 20
        assert metric(proxy, "lbproxy_retries_total") >= 3  # --retry-min-concurrency's floor at least


def test_requests_cut_off_by_a_killed_backend_wait_for_a_retry_slot(quad: tuple[Proc, ...]) -> None:
    """Twenty concurrent GETs over two backends, ten of them in flight on one that is then SIGKILLed:
    the kill cuts all ten off at once, the budget (at its floor of three concurrent retries) lets three
    be retried at a time, and the other seven wait for a slot instead of being answered 502. All twenty
    succeed, each of the ten after exactly one retry."""
    doomed = start_backend("--distribution", "constant", workers=16)
    with running(doomed):
        fault(doomed, slowdown=100.0)  # 1 s per request: the ten are still in flight at the kill
        args = [*QUIET, *NO_EJECTION, "--retry-budget-percent", "1"]

        async def scenario(port: int) -> list[int]:
            gets = asyncio.ensure_future(_concurrent_gets(port, 20))
            await asyncio.sleep(0.5)
            doomed.popen.kill()
            return await gets

        with running(start_proxy([doomed.url, quad[0].url], *args)) as (proxy,):
            assert asyncio.run(scenario(proxy.port)) == [200] * 20
            assert metric(proxy, "lbproxy_retries_total") == 10


def test_the_retry_budget_caps_retries_when_every_backend_fails(quad: tuple[Proc, ...]) -> None:
    """40 concurrent requests, every backend answering 500 after 200 ms: the first 500s all arrive
    while the 40 are in flight, so 20 % of them (8) may be retried, not 40."""
    for b in quad:
        fault(b, error_rate=1.0, slowdown=20.0)
    retries = {}
    for budget in ("20", "100"):
        args = [*QUIET, *NO_EJECTION, "--retry-budget-percent", budget]
        with running(start_proxy([b.url for b in quad], *args)) as (proxy,):
            codes = asyncio.run(_concurrent_gets(proxy.port, 40))
            assert codes == [500] * 40
            retries[budget] = metric(proxy, "lbproxy_retries_total")
    assert 3 <= retries["20"] <= 12
    assert retries["100"] == 40  # without the cap every request doubles


def test_a_backend_added_at_runtime_ramps_up(quad: tuple[Proc, ...]) -> None:
    first, new = quad[:3], quad[3]
    args = [*QUIET, *NO_EJECTION, "--slow-start-window-s", "4"]
    with running(start_proxy([b.url for b in first], *args)) as (proxy,):
        status, _, body = call(
            proxy.admin_port or 0,
            "POST",
            "/admin/backends",
            {"Content-Type": "application/json"},
            json.dumps({"url": new.url}).encode(),
        )
        assert status == 201 and json.loads(body)["slow_start_factor"] == pytest.approx(0.25, abs=0.05)
        assert gets(proxy, 60) == [200] * 60
        ramping = backend_rows(proxy)[new.url]["requests"]
        assert isinstance(ramping, int)
        assert 1 <= ramping <= 60 / 4 * 0.6  # a fair share would be 15; the ramp starts at 25 % of it
        deadline = time.monotonic() + 30
        while backend_rows(proxy)[new.url]["slow_start_factor"] is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gets(proxy, 60) == [200] * 60
        after = backend_rows(proxy)[new.url]["requests"]
        assert isinstance(after, int) and after - ramping >= 13  # its full turn in the rotation


def test_a_backend_20x_slower_than_its_peers_is_ejected(quad: tuple[Proc, ...]) -> None:
    slow = quad[2]
    fault(slow, slowdown=20.0)
    args = [*QUIET, "--latency-eject-min-samples", "5", "--latency-eject-completions", "3"]
    with running(start_proxy([b.url for b in quad], *args)) as (proxy,):
        assert gets(proxy, 60) == [200] * 60
        rows = backend_rows(proxy)
        assert rows[slow.url]["times_ejected"] == 1 and rows[slow.url]["available"] is False
        assert all(rows[b.url]["times_ejected"] == 0 for b in quad if b is not slow)
        assert metric(proxy, "lbproxy_ejections_total") == 1
