"""The demo's stages, in order: the emulated cluster on free ports, live training of the DQN under
Locust, then every policy on the same replayed load; `run` chains them with the report and stops
everything it started on any exit. Also the processes the stages start: a proxy per stage (and per
policy), and Prometheus when asked for."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lbproxy.demo.locust_runs import PolicyResult, read_locust, run_locust
from lbproxy.demo.metrics import scrape
from lbproxy.demo.plan import COMPARE_POLICIES, SCENARIO, Plan
from lbproxy.demo.processes import LOOPBACK, Children, DemoError, free_port, wait_ready
from lbproxy.demo.report import write_report

if TYPE_CHECKING:
    from lbproxy.cluster import ClusterSpec

HEALTH_PATH = "/health"
"""The emulated backends' health endpoint (backends/app.py): the demo turns active checks on with it."""
ASSUMED_RPS = 900.0
"""Rough live throughput through proxy + Locust on a 2-core machine (~900-1200 req/s measured with this
demo on 2026-11-24, machine shared); sets the episode count so that ε decays over the first half of the run."""
EPISODE_DECISIONS = 128
METRICS_EVERY_EPISODES = 5
SETTLE_S = 1.0
"""Pause between policies so the backends' queues from the previous run have drained."""


def write_cluster_file(path: Path) -> ClusterSpec:
    """The default scenario's cluster on free loopback ports, written where the proxy (--cluster-file) and
    the user can read it."""
    from lbproxy.cluster import cluster_to_toml, load_cluster  # numpy, via observe: not for `--help`

    spec = load_cluster(SCENARIO)
    servers = tuple(replace(s, host=LOOPBACK, port=free_port()) for s in spec.servers)
    spec = replace(spec, servers=servers)
    comment = f"lbproxy demo cluster: {SCENARIO.name} on free ports ({datetime.now(UTC):%Y-%m-%d %H:%M UTC})"
    path.write_text(cluster_to_toml(spec, comment))
    return spec


def start_prometheus(children: Children, plan: Plan, admin_ports: Sequence[int], backend_urls: Sequence[str]) -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        print("demo: --with-prometheus: no prometheus binary on PATH (Debian: apt install prometheus); continuing")
        return ""
    port = free_port()
    config = plan.run_dir / "prometheus.yml"
    proxies = ", ".join(f"'{LOOPBACK}:{p}'" for p in admin_ports)
    backends = ", ".join("'" + u.removeprefix("http://") + "'" for u in backend_urls)
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: lbproxy\n    static_configs:\n      - targets: [{proxies}]\n"
        f"  - job_name: backends\n    static_configs:\n      - targets: [{backends}]\n"
    )
    popen = children.start(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={plan.run_dir / 'prometheus'}",
            f"--web.listen-address={LOOPBACK}:{port}",
        ],
    )
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(url + "/-/ready", popen, "prometheus", children, "prometheus")
    print(f"prometheus: {url} (scraping the proxy admin ports and the backends every 1 s)")
    return url


def start_proxy(
    children: Children, plan: Plan, name: str, args: Sequence[str], port: int, admin_port: int
) -> subprocess.Popen[bytes]:
    full = [
        sys.executable,
        "-m",
        "lbproxy",
        *args,
        "--cluster-file",
        str(plan.cluster_file),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--seed",
        str(plan.seed),
        "--health-path",
        HEALTH_PATH,  # our backends serve it, so the demo keeps active checks (off by default)
    ]
    popen = children.start(name, full)
    wait_ready(f"http://{LOOPBACK}:{admin_port}/readyz", popen, f"proxy ({name})", children, name)
    return popen


def train(children: Children, plan: Plan, port: int, admin_port: int) -> Path | None:
    """Live training under the phase shape; returns the learned model (RUN_DIR/train/dqn_final.pth)."""
    train_dir = plan.run_dir / "train"
    expected = ASSUMED_RPS * plan.train_s
    # Enough episodes that the trainer never stops before Locust does; ε decays over the first half of
    # the expected decisions (a pre-trained model starts at a low ε: it needs to refine, not explore).
    episodes = max(10, math.ceil(3 * expected / EPISODE_DECISIONS))
    eps_fraction = min(1.0, 0.5 * expected / (episodes * EPISODE_DECISIONS))
    args = [
        "--mode",
        "train",
        "--env",
        "live",
        "--policy",
        "dqn",
        "--run-dir",
        str(train_dir),
        "--episodes",
        str(episodes),
        "--episode-decisions",
        str(EPISODE_DECISIONS),
        "--metrics-every",
        str(METRICS_EVERY_EPISODES),
        "--eps-fraction",
        f"{eps_fraction:.6g}",
        "--learning-starts",
        "500",
    ]
    if plan.init_model is not None:
        args += ["--init-model", str(plan.init_model), "--eps-start", "0.1"]
    popen = start_proxy(children, plan, "proxy-train", args, port, admin_port)
    source = f"initialised from {plan.init_model}" if plan.init_model else "from scratch (no shipped model)"
    print(f"training the DQN live for {plan.train_s:.3g} s, {source}; proxy http://{LOOPBACK}:{port}", flush=True)
    run_locust(
        children,
        "locust-train",
        f"http://{LOOPBACK}:{port}",
        plan.train_s,
        plan.seed,
        train_dir / "locust",
        f"http://{LOOPBACK}:{admin_port}",
        plan.progress_every_s,
        "train",
    )
    code = children.stop(popen)  # SIGTERM: drain, checkpoint, write dqn_final.pth
    model = train_dir / "dqn_final.pth"
    if code != 0 or not model.exists():
        print(f"demo: live training ended with code {code} and no model: {children.tail('proxy-train', 3)}")
        return None
    return model


def compare(children: Children, plan: Plan, model: Path | None, ports: Sequence[tuple[int, int]]) -> list[PolicyResult]:
    """Each policy against the same replayed load (same Locust shape and seed), one after another."""
    results: list[PolicyResult] = []
    print(f"comparing {', '.join(COMPARE_POLICIES)} on the same load, {plan.compare_s:.3g} s each", flush=True)
    for policy, (port, admin_port) in zip(COMPARE_POLICIES, ports, strict=True):
        if policy == "dqn" and model is None:
            results.append(PolicyResult(policy, note="no learned model (live training failed; see logs/)"))
            continue
        args = ["--mode", "serve", "--policy", policy]
        if policy == "dqn":
            args += ["--model", str(model)]
        popen = start_proxy(children, plan, f"proxy-{policy}", args, port, admin_port)
        prefix = plan.run_dir / "compare" / policy
        admin_url = f"http://{LOOPBACK}:{admin_port}"
        run_locust(
            children,
            f"locust-{policy}",
            f"http://{LOOPBACK}:{port}",
            plan.compare_s,
            plan.seed,
            prefix,
            admin_url,
            progress_every_s=0.0,
            label=policy,
        )
        result = read_locust(prefix, policy, plan.compare_s)
        snap = scrape(admin_url)
        if snap is not None and snap.requests > 0:
            result.share = {b: n / snap.requests for b, n in sorted(snap.per_backend.items())}
        children.stop(popen)
        results.append(result)
        print(
            f"  {policy:<12} {result.requests:6d} requests  mean {result.mean_ms:6.1f} ms  "
            f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  failures {result.failures}",
            flush=True,
        )
        time.sleep(SETTLE_S)
    return results


def run(plan: Plan) -> int:
    from backends.launcher import Cluster, ClusterError

    started = datetime.now(UTC)
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "compare").mkdir(exist_ok=True)
    children = Children(plan.run_dir / "logs")
    spec = write_cluster_file(plan.cluster_file)
    ports = [(free_port(), free_port()) for _ in range(1 + len(COMPARE_POLICIES))]
    cluster = Cluster(spec, seed=plan.seed)
    print(f"demo run directory: {plan.run_dir}")
    try:
        try:
            cluster.start()
        except ClusterError as exc:
            raise DemoError(str(exc)) from None
        for s in spec.servers:
            print(f"backend {s.name:<7} {s.url}  workers {s.workers}  speed {s.speed:g}")
        if plan.with_prometheus:
            start_prometheus(children, plan, [a for _, a in ports], cluster.urls)
        model = train(children, plan, *ports[0])
        results = compare(children, plan, model, ports[1:])
    finally:
        children.stop_all()
        cluster.stop()
    report = write_report(plan, results, model, started)
    print(f"report: {report}")
    return 0
