"""The foreign backend (backends/foreign_app.py under gunicorn), its cluster launcher
(benchmarks/foreign_cluster.py) and the live comparison (benchmarks/live_foreign.py): the backend looks
like an ordinary web app, and through lbproxy under open-loop load least_conn beats round robin on
backends of unequal capacity that the proxy knows nothing about."""

from __future__ import annotations

import importlib.util
import io
import statistics
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from support import POLICY_ONLY, REPO, Proc, running, start_proxy

from backends import foreign_app
from loadgen.open_loop import poisson_schedule

sys.path.insert(0, str(REPO / "benchmarks"))
from foreign_cluster import start_foreign_cluster
from live_compare import PolicyConfig, measure, pinned_self, policy_configs

pytestmark = pytest.mark.timing

OUR_HEADERS = ("X-Backend", "X-Utilization", "X-Service-Time", "X-Queue-Wait")
"""What backends/app.py tells the proxy and an ordinary web app does not."""

needs_gunicorn = pytest.mark.skipif(
    importlib.util.find_spec("gunicorn") is None, reason="gunicorn is not installed (it is in the dev extra)"
)


# --- the WSGI app in-process -----------------------------------------------------------------------
def call(path: str) -> tuple[str, dict[str, str], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(foreign_app.app({"PATH_INFO": path, "wsgi.input": io.BytesIO()}, start_response))
    return seen["status"], seen["headers"], body


def test_app_answers_routes_and_404s_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(foreign_app.ENV_SPEED, "1000")  # microsecond sleeps
    monkeypatch.setattr(foreign_app, "_service", None)
    for path, cls in (("/", "light"), ("/api/light", "light"), ("/api/heavy", "heavy"), ("/static/a.css", "static")):
        status, headers, body = call(path)
        assert status == "200 OK" and cls in body.decode()
        assert int(headers["Content-Length"]) == len(body)
        assert not set(headers) & set(OUR_HEADERS)
    assert call("/health")[0] == "404 Not Found"  # ordinary apps have no /health: none is added
    assert call("/metrics")[0] == "404 Not Found"


def test_service_times_follow_the_class_means_and_speed() -> None:
    st = foreign_app.ServiceTimes(speed=2.0, distribution="exponential", cv=1.0)
    n = 20_000
    for req_class, mean_s in enumerate((0.010, 0.050, 0.002)):
        draws = [st.draw(req_class) for _ in range(n)]
        assert sum(draws) / n == pytest.approx(mean_s / 2.0, rel=0.05)
    assert foreign_app.ServiceTimes(1.0, "constant", 1.0).draw(1) == 0.050
    for bad in ((0.0, "exponential", 1.0), (1.0, "pareto", 1.0), (1.0, "lognormal", 0.0)):
        with pytest.raises(ValueError):
            foreign_app.ServiceTimes(*bad)


# --- gunicorn --------------------------------------------------------------------------------------
@needs_gunicorn
def test_foreign_cluster_looks_like_ordinary_web_servers() -> None:
    with start_foreign_cluster(workers=(1, 3), speed=2.0) as cluster:
        assert cluster.capacity_rps((1.0, 0.0, 0.0)) == pytest.approx((1 + 3) * 2.0 / 0.010)
        assert cluster.backends_arg() == ",".join(cluster.urls)
        assert cluster.backends_arg(weighted=True).endswith("=6")
        for url in cluster.urls:
            with urllib.request.urlopen(url + "/api/heavy", timeout=5) as resp:
                assert resp.status == 200
                assert resp.headers["Server"].startswith("gunicorn")
                assert resp.headers["Connection"] == "close"  # sync workers: no keep-alive
                assert not {h.lower() for h in resp.headers} & {h.lower() for h in OUR_HEADERS}
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(url + "/health", timeout=5)
            assert err.value.code == 404
            err.value.close()
        assert cluster.settle(timeout_s=10) == []
    for proc in cluster.procs:
        assert proc.popen.poll() is not None  # all stopped on the way out


def readyz(proxy: Proc) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{proxy.admin_url}/readyz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode()


@needs_gunicorn
def test_default_health_checks_suit_backends_without_a_health_path() -> None:
    """Ordinary web apps serve no /health. By default the proxy probes nothing (Envoy and HAProxy check
    only when told to), so they stay in rotation; told a path they do not serve, the proxy says why
    it routes in panic mode, on /readyz and in its log."""
    fast = ("--health-interval-s", "0.1", "--health-fall", "2")
    with start_foreign_cluster((1, 1), speed=4.0) as cluster:
        with running(start_proxy(cluster.urls, *fast)) as (proxy,):
            time.sleep(1.0)  # ten intervals: a probe, had there been one, would have marked both down
            assert readyz(proxy) == (200, "ready: 2 of 2 backends available\n")
            with urllib.request.urlopen(proxy.url + "/api/light", timeout=5) as resp:
                assert resp.status == 200
        with running(start_proxy(cluster.urls, *fast, "--health-path", "/health")) as (proxy,):
            deadline = time.monotonic() + 10
            while readyz(proxy)[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            code, text = readyz(proxy)
            assert code == 503 and "2 failing active health checks on /health" in text, text
            with urllib.request.urlopen(proxy.url + "/api/light", timeout=5) as resp:
                assert resp.status == 200  # panic mode: still routed over all of them
        assert "panic mode: 2 of 2 backends are unavailable" in proxy.output()
        assert "unset --health-path" in proxy.output()


def test_policy_configs_skip_unknown_policies() -> None:
    configs, notes = policy_configs(["least_conn", "no_such_policy", "dqn", "dqn_online", "p2c_online"], None)
    assert [c.name for c in configs] == ["least_conn", "dqn", "dqn_online"]
    assert configs[2].args == ("--policy", "dqn", "--online") and configs[2].is_dqn
    assert not configs[0].is_dqn
    assert len(notes) == 2 and notes[0].startswith("skipped no_such_policy")


def test_policy_configs_options_become_flags() -> None:
    configs, _ = policy_configs(["dqn_online@lr=0.0001@eps-end=0"], None)
    assert configs[0].name == "dqn_online@lr=0.0001@eps-end=0"
    assert configs[0].args == ("--policy", "dqn", "--online", "--lr", "0.0001", "--eps-end", "0")
    with pytest.raises(SystemExit, match="written @flag=value"):
        policy_configs(["dqn@lr"], None)


# --- through the proxy -----------------------------------------------------------------------------
LIVE_WORKERS = (1, 2, 4, 8)
LIVE_SPEED = 0.5
"""Service times twice the cluster model's: 248 req/s at 0.7 load keeps the 2 shared cores (gunicorn,
client and proxy each cost ~0.3-0.8 ms of CPU per request) from becoming the bottleneck."""
LIVE_LOAD = 0.7
LIVE_DURATION_S = 4.0
P99_MARGIN = 3.0
"""round robin's p99 over least_conn's must exceed this. Observed 10.7 to 17.9 in six runs (11.6, 15.5,
12.6, 17.9, 10.7, 10.7; 2-vCPU machine shared with other work): told only the URLs, round robin gives
the 1-worker backend a quarter of the traffic, 2.6x its capacity, and its queue grows for the whole
run; least_conn sends it ~9 %."""


@pytest.mark.slow
@needs_gunicorn
def test_least_conn_beats_round_robin_on_unequal_foreign_backends() -> None:
    configs = [
        PolicyConfig(c.name, c.args + POLICY_ONLY) for c in policy_configs(["least_conn", "round_robin"], None)[0]
    ]
    with start_foreign_cluster(LIVE_WORKERS, LIVE_SPEED, cpu=1) as cluster, pinned_self(1):
        rate = LIVE_LOAD * cluster.capacity_rps((0.6, 0.3, 0.1))
        schedule = poisson_schedule(rate, LIVE_DURATION_S, seed=10)
        # Long grace: round robin's last requests wait ~8 s behind the 1-worker backend's queue, and
        # the test asserts that none fails, only that they are slow.
        lc, rr = (measure(cluster, p, schedule, warmup_s=1.0, grace_s=30.0) for p in configs)
    assert lc.summary.errors == 0 and rr.summary.errors == 0
    assert lc.summary.answered == rr.summary.answered == len(schedule)
    assert rr.summary.p99_ms > P99_MARGIN * lc.summary.p99_ms, (lc.summary.line(), rr.summary.line())
    # Rotation over 4 backends, restarted by every candidate-set change (a retry's mask, an ejection),
    # so not exactly a quarter: 0.227 was seen once on a slow day of the shared machine.
    assert rr.shares[0] == pytest.approx(0.25, abs=0.04)
    assert lc.shares[0] < 0.15 and lc.shares[3] > 0.3


DQN_BOUND = 1.3
"""The median over rounds of the shipped model's p99 over sed's on the same open-loop load must stay
below this in the bounded test (the benchmark, benchmarks/results/live_foreign.md, measures it at
length against every heuristic: 0.80 and 1.02 on two runs of 2026-12-01; sed had the lowest p99 of
the heuristics in every run of it, least_conn 1.2-1.5x sed's, so the test runs sed alone). One
8-second round's ratio is too noisy to bound: its p99 is the 20th-slowest of 2,000 requests near
saturation, and single rounds ranged 0.94 to 1.36 on the 2-core machines."""
DQN_ROUNDS = 3


@pytest.mark.slow
@needs_gunicorn
def test_the_shipped_model_routes_foreign_backends_like_the_best_heuristics() -> None:
    """Greedy dqn with the shipped general model, on backends it never saw (gunicorn, unequal worker
    counts, no service-time reports), from its first request: no request lost, p99 near the best
    heuristic's (sed) on the same schedules (rounds interleaved, so a slow spell of the shared
    machine falls on both policies)."""
    from lbproxy.rl.checkpoint import default_model_path

    configs, _ = policy_configs(["dqn", "sed"], default_model_path())
    ratios: list[float] = []
    lines: list[str] = []
    with start_foreign_cluster(LIVE_WORKERS, LIVE_SPEED, cpu=1) as cluster, pinned_self(1):
        rate = LIVE_LOAD * cluster.capacity_rps((0.6, 0.3, 0.1))
        for round_index in range(DQN_ROUNDS):
            schedule = poisson_schedule(rate, 2 * LIVE_DURATION_S, seed=11 + round_index)
            dqn, sed = (measure(cluster, p, schedule, warmup_s=0.0, grace_s=30.0) for p in configs)
            for m in (dqn, sed):
                assert m.summary.errors == 0, m.summary.line()
                lines.append(f"round {round_index} {m.policy}: {m.summary.line()}")
            ratios.append(dqn.summary.p99_ms / sed.summary.p99_ms)
    assert statistics.median(ratios) <= DQN_BOUND, (ratios, lines)
