"""A real Prometheus (the Debian binary) scrapes a real lbproxy: the learning/quality gauges arrive
through Prometheus's HTTP API with sane values, and every dashboard query is valid PromQL there."""

from __future__ import annotations

import http.client
import json
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LOOPBACK, REPO, free_port, start_backend, start_proxy, wait_http_ok

PROMETHEUS_BIN = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
SCRAPE_WAIT_S = 30.0
"""ANCHORS.md: the first sample is queryable ~6 s after start with a 1 s scrape interval; 5x margin for a
busy shared machine."""
TRAFFIC_LIMIT_S = 40.0
"""Upper bound on the background request loop (it normally stops as soon as the test has its samples)."""

pytestmark = [
    pytest.mark.timing,
    pytest.mark.slow,  # the first scraped sample takes ~6 s
    pytest.mark.skipif(PROMETHEUS_BIN is None, reason="prometheus binary not installed (Debian: prometheus)"),
]


def _query(base: str, expr: str) -> dict[str, object]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:  # 400 = bad PromQL: return the error body for the assertion
        body = dict(json.loads(exc.read()))
        exc.close()
        return body


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A backend, a proxy with traffic flowing through it, and Prometheus scraping its admin port every 1 s.
    Yields the Prometheus base URL."""
    tmp = tmp_path_factory.mktemp("prometheus")
    backend_a = start_backend(speed=1.0)
    backend_b = start_backend(speed=4.0)
    proxy = start_proxy([backend_a.url, backend_b.url], "--policy", "p2c")
    stop = threading.Event()

    def traffic() -> None:
        # One keep-alive connection, closed explicitly: urllib can leave a socket to the garbage
        # collector when a request fails mid-response, a ResourceWarning (an error under filterwarnings).
        deadline = time.monotonic() + TRAFFIC_LIMIT_S
        conn = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=5)
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                for path in ("/api/light", "/api/heavy", "/static/app.js"):
                    try:
                        conn.request("GET", path)
                        conn.getresponse().read()
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        conn = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=5)
                time.sleep(0.01)
        finally:
            conn.close()

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: lbproxy\n    static_configs:\n"
        f"      - targets: ['{LOOPBACK}:{proxy.admin_port}']\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [
            str(PROMETHEUS_BIN),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address={LOOPBACK}:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp,
    )
    base = f"http://{LOOPBACK}:{port}"
    try:
        try:
            wait_http_ok(f"{base}/-/ready", timeout_s=20.0)
        except (TimeoutError, RuntimeError):
            log.flush()
            pytest.fail(f"prometheus did not become ready:\n{(tmp / 'prometheus.log').read_text()[-2000:]}")
        yield base
    finally:
        stop.set()
        thread.join(timeout=10)
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()
        proxy.stop()
        backend_a.stop()
        backend_b.stop()


def _wait_for_samples(base: str, expr: str) -> list[dict[str, object]]:
    deadline = time.monotonic() + SCRAPE_WAIT_S
    while time.monotonic() < deadline:
        body = _query(base, expr)
        assert body.get("status") == "success", body
        result = body["data"]["result"]  # type: ignore[index]
        if result:
            return list(result)
        time.sleep(0.5)
    pytest.fail(f"no sample for {expr} through Prometheus after {SCRAPE_WAIT_S}s")


def test_quality_gauges_arrive_through_prometheus(scraped: str) -> None:
    # Wait until a scrape saw a published window with completed requests (reward < 0), then read the gauges.
    _wait_for_samples(scraped, "lbproxy_reward < 0")
    values: dict[str, float] = {}
    for name in ("lbproxy_reward", "lbproxy_gini", "lbproxy_decision_accuracy"):
        result = _wait_for_samples(scraped, name)
        values[name] = float(result[0]["value"][1])  # type: ignore[index]
        assert math.isfinite(values[name]), values
    assert values["lbproxy_reward"] <= 0.0, "reward is -latency/scale - penalty: never positive"
    assert 0.0 <= values["lbproxy_gini"] <= 1.0
    assert 0.0 <= values["lbproxy_decision_accuracy"] <= 1.0
    # Latency histogram per backend made it too: both backends took traffic.
    result = _wait_for_samples(scraped, "sum by (backend) (lbproxy_request_duration_seconds_count)")
    assert len(result) == 2


def test_every_dashboard_query_is_valid_promql(scraped: str) -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "lbproxy.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        body = _query(scraped, expr)
        assert body.get("status") == "success", f"{expr}: {body}"
