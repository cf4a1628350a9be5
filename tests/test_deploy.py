"""Static validation of deploy/ (no Docker engine runs here): the compose file, the Dockerfiles it builds,
the Prometheus config and the Grafana provisioning/dashboard agree with each other and with the code —
and every metric the dashboard queries is exported by a really running lbproxy or backend."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support import REPO, Proc, start_backend, start_proxy

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lbproxy.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
PROMQL_NAME = re.compile(r"(?<![\w{$\"'])(?:lbproxy|backend)_[a-zA-Z0-9_:]*")
"""Metric names in a PromQL expression: our two prefixes, not inside a label matcher or a string."""


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _flag(command: list[str], flag: str) -> str | None:
    """The value after `flag` in an exec-form command (also `--flag=value`)."""
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Published container ports ("HOST:CONTAINER" or "CONTAINER") and exposed ports."""
    out = {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}
    out |= {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    return out


def _listen_port(name: str, service: dict[str, Any]) -> int:
    """The port a service's process listens on, read from its command."""
    command = [str(a) for a in service.get("command", [])]
    if name == "prometheus":
        listen = _flag(command, "--web.listen-address") or ":9090"
        return int(listen.rsplit(":", 1)[1])
    value = _flag(command, "--port")
    assert value is not None, f"service {name}: command has no --port"
    return int(value)


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_compose_yaml_parses_and_has_every_service() -> None:
    services = _services()
    assert {"lbproxy", "prometheus", "grafana", "locust"} <= set(services)
    backends = [n for n, s in services.items() if "backends/Dockerfile" in str(s.get("build", {}).get("dockerfile"))]
    assert len(backends) == 4, backends
    speeds = {_flag([str(a) for a in services[b]["command"]], "--speed") for b in backends}
    assert len(speeds) >= 3, f"backends should differ in speed, got {speeds}"
    assert any("--class-speed" in services[b]["command"] for b in backends)
    assert services["locust"].get("profiles") == ["load"], "Locust must be optional (profile 'load')"
    volumes = _compose()["volumes"]
    mounted = {str(v).split(":", 1)[1] for v in services["lbproxy"]["volumes"] if str(v).split(":")[0] in volumes}
    assert {"/data/models", "/data/runs"} <= mounted, "models and runs must be named volumes (survive restarts)"


def test_build_contexts_dockerfiles_and_mounts_exist() -> None:
    for name, service in _services().items():
        build = service.get("build")
        if build is not None:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for line in dockerfile.read_text().splitlines():
                parts = line.split()
                if parts and parts[0] == "COPY" and not any(p.startswith("--from") for p in parts):
                    for src in parts[1:-1]:
                        if not src.startswith("--"):
                            assert (context / src).exists(), f"{name}: {dockerfile.name} copies missing {src}"
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: mounted {source} missing"


def test_lbproxy_ports_match_published_ports_and_backends() -> None:
    services = _services()
    lb = services["lbproxy"]
    command = [str(a) for a in lb["command"]]
    port, admin = int(_flag(command, "--port") or 0), int(_flag(command, "--admin-port") or 0)
    published = {int(str(p).split(":")[-1]) for p in lb["ports"]}
    assert {port, admin} <= published, f"--port {port} / --admin-port {admin} not published: {published}"
    assert lb["environment"]["LBPROXY_ADMIN_HOST"] == "0.0.0.0", "Prometheus must reach the admin port"
    assert lb["environment"]["LBPROXY_HEALTH_PATH"] == "/health"  # what backends/app.py serves
    for spec in lb["environment"]["LBPROXY_BACKENDS"].split(","):
        url = spec.split("=")[0]
        host, backend_port = url.removeprefix("http://").split(":")
        assert host in services, f"backend {url} is not a compose service"
        assert int(backend_port) == _listen_port(host, services[host]) in _container_ports(services[host])


def test_prometheus_targets_are_compose_services_on_their_ports() -> None:
    services = _services()
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "lbproxy:9180" in targets
    backends = {n for n, s in services.items() if "backends/Dockerfile" in str(s.get("build", {}).get("dockerfile"))}
    scraped = set()
    for target in targets:
        host, port = target.split(":")
        assert host in services, f"prometheus target {target}: no such service"
        scraped.add(host)
        if host == "lbproxy":
            assert int(port) == int(_flag([str(a) for a in services[host]["command"]], "--admin-port") or 0)
        else:
            assert int(port) == _listen_port(host, services[host])
    assert backends <= scraped, f"backends not scraped: {backends - scraped}"
    mount = [v for v in services["prometheus"]["volumes"] if str(v).startswith("./prometheus.yml:")]
    config_path = _flag([str(a) for a in services["prometheus"]["command"]], "--config.file")
    assert mount and str(mount[0]).split(":")[1] == config_path


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    services = _services()
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = datasources[0]["url"]
    host, port = url.removeprefix("http://").split(":")
    assert host == "prometheus" and int(port) == _listen_port("prometheus", services["prometheus"])
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "lbproxy.yml").read_text())["providers"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["grafana"]["volumes"]}
    assert mounts[providers[0]["options"]["path"]] == "./grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {datasources[0]["uid"]}


def test_dashboard_has_the_required_panels() -> None:
    exprs = " ".join(_dashboard_exprs())
    for needed in (
        "lbproxy_reward",
        "lbproxy_gini",
        "lbproxy_decision_accuracy",
        "lbproxy_epsilon",
        "lbproxy_request_duration_seconds_bucket",
        "lbproxy_requests_total",
        "lbproxy_decision_duration_seconds_count",
        "lbproxy_inference_batch_size",
        "lbproxy_decision_fallbacks_total",
        "lbproxy_td_loss",
    ):
        assert needed in exprs, f"dashboard lacks a query on {needed}"
    assert "histogram_quantile" in exprs and "by (backend, le)" in exprs


def test_docker_compose_config_accepts_the_file() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian package docker-compose) is not installed")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, cwd=DEPLOY
    )
    assert result.returncode == 0, result.stderr


def test_promtool_accepts_the_prometheus_config() -> None:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    result = subprocess.run([binary, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page exports, including labelled families that have no child yet
    (e.g. fallbacks before the first fallback): a query on them is valid, it just returns nothing."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def live_metrics() -> Iterator[set[str]]:
    """/metrics of a real backend and a real proxy after a few requests (every policy registers every metric)."""
    backend = start_backend()
    proxy: Proc | None = None
    try:
        proxy = start_proxy([backend.url], "--policy", "round_robin")
        for path in ("/api/light", "/api/heavy", "/static/app.js"):
            with urllib.request.urlopen(proxy.url + path, timeout=10) as resp:
                resp.read()
        with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as resp:
            proxy_text = resp.read().decode()
        with urllib.request.urlopen(backend.url + "/metrics", timeout=10) as resp:
            backend_text = resp.read().decode()
        yield exported_names(proxy_text) | exported_names(backend_text)
    finally:
        if proxy is not None:
            proxy.stop()
        backend.stop()


def test_every_dashboard_metric_is_exported(live_metrics: set[str]) -> None:
    used = {name for expr in _dashboard_exprs() for name in PROMQL_NAME.findall(expr)}
    assert len(used) >= 15, used
    missing = sorted(used - live_metrics)
    assert not missing, f"the dashboard queries metrics nothing exports: {missing}"
