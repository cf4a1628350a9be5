"""`lbproxy demo`: the one-command local run (no Docker) — watch the DQN learn on live HTTP, then see
how it compares with the heuristics on the same load.

1. starts the heterogeneous emulated cluster of the default scenario (curriculum.toml) on free ports;
2. runs the proxy in live train mode (dqn, initialised from the shipped general model when
   there is one) while Locust plays phases 1–3 (loadgen/phases.py), printing a progress line every few
   seconds (phase, requests/s, p99, reward, ε) read from the proxy's /metrics;
3. replays the same Locust shape and seed against the proxy serving the learned model greedily and
   against round_robin, least_conn, p2c and peak_ewma, one after the other;
4. writes RUN_DIR/report.md (table + charts) and prints where.

Everything it starts runs in its own process group and is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from loadgen import LivePhase, build_schedule, phase_at, total_duration_s

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
SCENARIO = Path(__file__).resolve().parent / "sim" / "scenarios" / "curriculum.toml"
"""The cluster the demo starts (four emulated servers, one class-skewed). The shipped model never saw
it: it was trained on generated clusters (lbproxy/sim/generator.py), like any cluster a user brings."""
LOCUSTFILE = REPO / "loadgen" / "phases.py"
COMPARE_POLICIES = ("dqn", "round_robin", "least_conn", "p2c", "peak_ewma")

TRAIN_S = 180.0
"""Live training at full length: phases 1–3 at their lbproxy.phases durations (3 x 60 s)."""
COMPARE_S = 24.0
"""Each policy's replay; long enough for ~thousands of requests and a stable p99."""
QUICK_TRAIN_S = 30.0
QUICK_COMPARE_S = 5.0
PROGRESS_EVERY_S = 5.0
QUICK_PROGRESS_EVERY_S = 3.0
ASSUMED_RPS = 900.0
"""Rough live throughput through proxy + Locust on a 2-core machine (~900-1200 req/s measured with this
demo on 2026-11-24, machine shared); sets the episode count so that ε decays over the first half of the run."""
EPISODE_DECISIONS = 128
METRICS_EVERY_EPISODES = 5
START_TIMEOUT_S = 60.0
"""Time for a proxy to become ready: importing torch on a busy 2-core machine takes several seconds."""
STOP_TIMEOUT_S = 20.0
"""SIGTERM grace: the live trainer drains, checkpoints and writes dqn_final.pth before exiting."""
LOCUST_GRACE_S = 30.0
"""Beyond the shape's own length: Locust's start-up and its final stop/summary."""
SETTLE_S = 1.0
"""Pause between policies so the backends' queues from the previous run have drained."""


class DemoError(Exception):
    """A user-facing failure: one line, exit code 2."""


@dataclass
class PolicyResult:
    policy: str
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    mean_ms: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    share: dict[str, float] = field(default_factory=dict)
    note: str = ""


# --- child processes --------------------------------------------------------------------------------


class Children:
    """Every process the demo starts, each in its own process group (start_new_session), so a stop
    reaches its whole tree and a terminal Ctrl-C does not hit them before the demo stops them in order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        try:
            popen = subprocess.Popen(
                list(args),
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            log.close()
            raise
        self.procs.append((name, popen, log))
        return popen

    def stop(self, popen: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM to the process group, SIGKILL after `timeout_s`; returns the exit code."""
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        for i, (_name, p, log) in enumerate(self.procs):
            if p is popen:
                log.close()
                del self.procs[i]
                break
        return int(popen.returncode)

    def stop_all(self) -> None:
        for _name, popen, _log in reversed(list(self.procs)):
            self.stop(popen)

    def tail(self, name: str, lines: int = 5) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(ln.strip() for ln in text.splitlines()[-lines:] if ln.strip())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout_s: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        exc.close()
        return None
    except (OSError, ValueError):
        return None


def wait_ready(url: str, popen: subprocess.Popen[bytes], what: str, children: Children, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise DemoError(f"{what} exited with code {popen.returncode}: {children.tail(name, 3)}")
        if _get(url, 1.0) is not None:
            return
        time.sleep(0.1)
    raise DemoError(f"{what} not ready after {START_TIMEOUT_S:.0f} s; see {children.log_dir / (name + '.log')}")


# --- reading the proxy's /metrics -------------------------------------------------------------------


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> (name, labels, value) samples (enough for our own exporters)."""
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        labels: dict[str, str] = {}
        for part in rest.rstrip("}").split('",'):
            if "=" in part:
                k, _, v = part.partition("=")
                labels[k.strip(",")] = v.strip('"')
        try:
            out.append((name, labels, float(value)))
        except ValueError:
            continue
    return out


@dataclass
class Snapshot:
    t: float
    requests: float
    buckets: dict[float, float]
    gauges: dict[str, float]
    per_backend: dict[str, float]


def snapshot(admin_url: str) -> Snapshot | None:
    text = _get(admin_url + "/metrics")
    if text is None:
        return None
    requests = 0.0
    buckets: dict[float, float] = defaultdict(float)
    gauges: dict[str, float] = {}
    per_backend: dict[str, float] = defaultdict(float)
    for name, labels, value in parse_metrics(text):
        if name == "lbproxy_requests_total":
            requests += value
            per_backend[labels.get("backend", "?")] += value
        elif name == "lbproxy_request_duration_seconds_bucket":
            buckets[float(labels["le"])] += value
        elif not labels:
            gauges[name] = value
    return Snapshot(time.monotonic(), requests, dict(buckets), gauges, dict(per_backend))


def quantile_from_buckets(buckets: dict[float, float], q: float) -> float:
    """Histogram quantile as Prometheus computes it (linear within the bucket); NaN without data."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return math.nan
    rank = q * buckets[edges[-1]]
    prev_edge, prev_count = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if math.isinf(edge):
                return prev_edge
            span = count - prev_count
            return prev_edge + (edge - prev_edge) * ((rank - prev_count) / span if span > 0 else 1.0)
        prev_edge, prev_count = edge, count
    return prev_edge


def progress_line(label: str, elapsed_s: float, phase: LivePhase | None, a: Snapshot, b: Snapshot) -> str:
    dt = max(b.t - a.t, 1e-9)
    delta = {le: b.buckets.get(le, 0.0) - a.buckets.get(le, 0.0) for le in b.buckets}
    p99_ms = quantile_from_buckets(delta, 0.99) * 1000
    phase_text = f"phase {phase.number}/3 {phase.name:<6}" if phase else "ending        "
    parts = [
        f"[{elapsed_s:5.0f}s] {label:<5} {phase_text}",
        f"rps {(b.requests - a.requests) / dt:6.0f}",
        f"p99 {p99_ms:6.1f} ms" if math.isfinite(p99_ms) else "p99      - ms",
        f"reward {b.gauges.get('lbproxy_reward', math.nan):7.3f}",
    ]
    if "lbproxy_epsilon" in b.gauges:
        parts.append(f"eps {b.gauges['lbproxy_epsilon']:.2f}")
    if b.gauges.get("lbproxy_learner_updates_total"):
        parts.append(f"updates {b.gauges['lbproxy_learner_updates_total']:.0f}")
    return "  ".join(parts)


# --- the demo -----------------------------------------------------------------------------------------


@dataclass
class Plan:
    run_dir: Path
    train_s: float
    compare_s: float
    progress_every_s: float
    seed: int
    with_prometheus: bool
    init_model: Path | None
    cluster_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cluster_file = self.run_dir / "cluster.toml"


def locust_args(total_s: float, seed: int) -> tuple[list[str], tuple[LivePhase, ...]]:
    """Locust's custom arguments for phases 1–3 squeezed into `total_s`; spawn rates scaled with the
    durations (capped so each phase ramps within a quarter second at most), as otherwise a short
    phase would end before its users started."""
    base = build_schedule()
    scale = total_s / total_duration_s(base)
    spawn = [min(p.spawn_rate / min(scale, 1.0), p.users * 4.0) for p in base]
    args = ["--phase-scale", f"{scale:.6g}", "--phase-spawn-rates", ",".join(f"{s:.6g}" for s in spawn)]
    args += ["--lb-seed", str(seed)]
    schedule = build_schedule(scale, spawn_rates=",".join(str(s) for s in spawn))
    return args, schedule


def write_cluster_file(path: Path) -> Any:
    """The default scenario's cluster on free loopback ports, written where the proxy (--cluster-file) and
    the user can read it."""
    from lbproxy.cluster import CLASS_NAMES, load_cluster

    spec = load_cluster(SCENARIO)
    servers = tuple(replace(s, host=LOOPBACK, port=free_port()) for s in spec.servers)
    spec = replace(spec, servers=servers)
    svc = spec.service
    lines = [
        f"# lbproxy demo cluster: {SCENARIO.name} on free ports ({datetime.now(UTC):%Y-%m-%d %H:%M UTC})",
        "[service]",
        f'distribution = "{svc.distribution}"',
        f"cv = {svc.cv}",
        *(f"{c}_ms = {m * 1000:g}" for c, m in zip(CLASS_NAMES, svc.mean_s, strict=True)),
    ]
    for s in servers:
        class_speed = ", ".join(f"{c} = {v:g}" for c, v in zip(CLASS_NAMES, s.class_speed, strict=True))
        lines += [
            "",
            "[[server]]",
            f'name = "{s.name}"',
            f'host = "{s.host}"',
            f"port = {s.port}",
            f"workers = {s.workers}",
            f"speed = {s.speed:g}",
            f"class_speed = {{ {class_speed} }}",
            f"error_rate = {s.error_rate:g}",
        ]
    path.write_text("\n".join(lines) + "\n")
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
    ]
    popen = children.start(name, full)
    wait_ready(f"http://{LOOPBACK}:{admin_port}/readyz", popen, f"proxy ({name})", children, name)
    return popen


def run_locust(
    children: Children,
    name: str,
    host: str,
    total_s: float,
    seed: int,
    csv_prefix: Path,
    admin_url: str,
    progress_every_s: float,
    label: str,
) -> None:
    """Locust headless with the phase shape; a progress line every `progress_every_s` (0 = quiet)."""
    extra, schedule = locust_args(total_s, seed)
    popen = children.start(
        name,
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--only-summary",
            "--host",
            host,
            "--csv",
            str(csv_prefix),
            *extra,
        ],
    )
    t0 = time.monotonic()
    deadline = t0 + total_s + LOCUST_GRACE_S
    last = snapshot(admin_url)
    next_line = t0 + progress_every_s
    while popen.poll() is None:
        now = time.monotonic()
        if now > deadline:
            children.stop(popen)
            raise DemoError(f"locust ({name}) did not stop by itself; see {children.log_dir / (name + '.log')}")
        if progress_every_s > 0 and now >= next_line:
            snap = snapshot(admin_url)
            if last is not None and snap is not None:
                print(progress_line(label, now - t0, phase_at(schedule, now - t0), last, snap), flush=True)
            last, next_line = snap, now + progress_every_s
        time.sleep(0.2)
    code = children.stop(popen)
    if code not in (0, 1):  # 1 = some requests failed, which the report shows
        raise DemoError(f"locust ({name}) exited with code {code}: {children.tail(name, 3)}")


def read_locust(csv_prefix: Path, policy: str, total_s: float) -> PolicyResult:
    result = PolicyResult(policy)
    stats = Path(f"{csv_prefix}_stats.csv")
    if not stats.exists():
        result.note = "no Locust statistics"
        return result
    with stats.open() as fh:
        for row in csv.DictReader(fh):
            if row["Name"] == "Aggregated":
                result.requests = int(row["Request Count"])
                result.failures = int(row["Failure Count"])
                result.mean_ms = float(row["Average Response Time"] or "nan")
                result.p50_ms = float(row["50%"] or "nan") if row["50%"] != "N/A" else math.nan
                result.p99_ms = float(row["99%"] or "nan") if row["99%"] != "N/A" else math.nan
                result.rps = result.requests / total_s
    return result


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
        snap = snapshot(admin_url)
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


def _fmt(v: float) -> str:
    return f"{v:.1f}" if math.isfinite(v) else "–"


def chart(results: Sequence[PolicyResult], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.policy for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, (label, values) in enumerate(
        (
            ("mean", [r.mean_ms for r in results]),
            ("p50", [r.p50_ms for r in results]),
            ("p99", [r.p99_ms for r in results]),
        )
    ):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax1.bar(xs, [v if math.isfinite(v) else 0 for v in values], width, label=label)
    ax1.set_xticks(range(len(names)), names, rotation=20)
    ax1.set_ylabel("latency (ms)")
    ax1.set_title("Latency on the same replayed load (lower is better)")
    ax1.legend()
    ax2.bar(names, [r.rps for r in results], color="tab:green")
    ax2.set_xticks(range(len(names)), names, rotation=20)
    ax2.set_ylabel("requests/s")
    ax2.set_title("Throughput (closed loop: higher is better)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(plan: Plan, results: Sequence[PolicyResult], model: Path | None, started: datetime) -> Path:
    plots: list[Path] = []
    try:
        plots.append(chart(results, plan.run_dir / "comparison.png"))
    except Exception as exc:  # a report without a chart is still a report
        print(f"demo: could not draw the comparison chart: {exc}")
    train_dir = plan.run_dir / "train"
    if (train_dir / "metrics" / "training_metrics.csv").exists():
        try:
            from lbproxy.plot import make_plots

            plots += make_plots(train_dir, plan.run_dir / "plots")
        except Exception as exc:  # e.g. too few rows for curves in a very short run
            print(f"demo: could not plot the training curves: {exc}")
    backends = sorted({b for r in results for b in r.share})
    lines = [
        "# lbproxy demo report",
        "",
        f"- date: {started:%Y-%m-%d %H:%M UTC}; machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        f"- cluster: `{plan.cluster_file.name}` (scenario {SCENARIO.name}: slow, medium, fast, and skew = fast for "
        "light and slow for heavy requests)",
        f"- live training: {plan.train_s:.3g} s of phases 1–3, "
        + (f"initialised from `{plan.init_model}`" if plan.init_model else "from scratch")
        + (f"; learned model `{model.relative_to(plan.run_dir)}`" if model else "; no learned model"),
        f"- comparison: the same Locust shape and seed ({plan.seed}) for {plan.compare_s:.3g} s per policy, "
        "closed-loop users (a faster policy also serves more requests)",
        "",
        "| policy | requests | req/s | mean ms | p50 ms | p99 ms | failures | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.requests} | {r.rps:.0f} | {_fmt(r.mean_ms)} | {_fmt(r.p50_ms)} | "
            f"{_fmt(r.p99_ms)} | {r.failures} | {r.note} |"
        )
    if backends:
        lines += ["", "Traffic share per backend:", ""]
        lines += ["| policy | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
        for r in results:
            lines.append(f"| {r.policy} | " + " | ".join(f"{r.share.get(b, 0.0):.0%}" for b in backends) + " |")
    lines += ["", "Latency is measured by Locust (client side, end to end); percentiles are Locust's buckets.", ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.relative_to(plan.run_dir)})")
    lines += ["", "Logs of every process: `logs/`. Locust CSVs: `train/locust_*.csv`, `compare/*_stats.csv`."]
    report = plan.run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the demo stops it like Ctrl-C does (the finally blocks stop every child)."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbproxy demo",
        description="Local demo, no Docker: emulated cluster + proxy learning live + Locust + comparison report.",
    )
    parser.add_argument("--quick", action="store_true", help="About one minute in all (30 s training).")
    parser.add_argument("--run-dir", type=Path, default=None, help="Output folder (default runs/demo-<time>).")
    parser.add_argument(
        "--duration-scale", type=float, default=1.0, help="Multiply every duration (tests use < 1; default 1)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of backends, proxy and Locust (default 0).")
    parser.add_argument("--with-prometheus", action="store_true", help="Also start Prometheus (if on PATH).")
    parser.add_argument("--model", type=Path, default=None, help="Initial model (default: the shipped one, if any).")
    parser.add_argument("--from-scratch", action="store_true", help="Ignore the shipped model; learn from zero.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if not args.duration_scale > 0:
        print("lbproxy demo: --duration-scale must be a positive number", file=sys.stderr)
        return EXIT_USAGE
    init_model: Path | None = None
    if not args.from_scratch:
        from lbproxy.rl.checkpoint import default_model_path

        init_model = args.model if args.model is not None else default_model_path()
        if not init_model.is_file():
            if args.model is not None:
                print(f"lbproxy demo: --model {args.model} not found; pass an existing model file", file=sys.stderr)
                return EXIT_USAGE
            init_model = None
    run_dir = args.run_dir or Path("runs") / f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    scale = args.duration_scale
    plan = Plan(
        run_dir=run_dir.resolve(),
        train_s=(QUICK_TRAIN_S if args.quick else TRAIN_S) * scale,
        compare_s=(QUICK_COMPARE_S if args.quick else COMPARE_S) * scale,
        progress_every_s=QUICK_PROGRESS_EVERY_S if args.quick else PROGRESS_EVERY_S,
        seed=args.seed,
        with_prometheus=args.with_prometheus,
        init_model=init_model.resolve() if init_model else None,
    )
    try:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"lbproxy demo: cannot create --run-dir {run_dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _sigterm_as_interrupt():
            return run(plan)
    except DemoError as exc:
        print(f"lbproxy demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lbproxy demo: interrupted; everything it started is stopped; partial output in {plan.run_dir}")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
