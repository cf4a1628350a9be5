"""Helpers shared by the benchmark scripts: one description of the machine and of the run (command,
revision), CPU pinning as ANCHORS.md prescribes, a process's CPU time, one wrk run parsed into numbers,
and the proxy's admin pages (/metrics, /admin/backends) read into values. Scripts import it as `common`
(they run as `python benchmarks/NAME.py`, so this directory is on sys.path)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent

WRK = shutil.which("wrk") or "/usr/bin/wrk"
TASKSET = shutil.which("taskset")
CONNECTIONS = 64
"""ANCHORS.md: wrk with 64 connections."""
PROXY_CPU = 0
LOAD_CPU = 1
"""ANCHORS.md pinning: the component measured on CPU 0 (PROXY_CPU), wrk and backends on CPU 1."""
ADMIN_TIMEOUT_S = 5.0
"""Longest wait for one read of the proxy's admin port."""

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def machine() -> str:
    """CPU model, cores, OS and Python; NumPy/torch versions (and torch threads, GPU) when the script
    imported them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        cpu,
        f"{os.cpu_count()} vCPU",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
    ]
    np = sys.modules.get("numpy")
    if np is not None:
        parts.append(f"numpy {np.__version__}")
    torch = sys.modules.get("torch")
    if torch is not None:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads), GPU: {gpu}")
    return ", ".join(parts)


def command(argv: list[str] | None) -> str:
    """The command line that reproduces this run, for the results file."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])


def quoted_command(argv: Sequence[str] | None) -> str:
    """`command` with each argument shell-quoted (a --note or --proxy-args value has spaces)."""
    return command([shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])


def utc_now() -> str:
    """The results files' date line: now, to the minute, in UTC."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def revision() -> str:
    """The checkout's commit, `-dirty` when tracked files differ from it (others' edits included)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def write_result(out: Path, lines: list[str]) -> None:
    """Write a results file (blank lines kept, `None` entries dropped) and say where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(line for line in lines if line is not None) + "\n")
    print(f"wrote {out}")


def pinned(cpu: int | str, argv: list[str]) -> list[str]:
    """`argv` pinned to one CPU (or a taskset list such as "0,1") where there is more than one CPU to pin to."""
    return [TASKSET, "-c", str(cpu), *argv] if TASKSET and (os.cpu_count() or 1) > 1 else argv


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, its threads and its live child processes (the
    `--learner-process` learner, nginx's worker) so far; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in task.read_text().split():
                total += cpu_s(int(child))
    return total


def bootstrap_median_interval(xs: list[float], level: float = 0.90, draws: int = 4000) -> tuple[float, float]:
    """Percentile bootstrap interval of the median (seeded): how far the per-round median could move
    on a rerun, which on a shared machine is the honest width of the headline ratio."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    tail = (1.0 - level) / 2.0
    return meds[int(tail * draws)], meds[min(draws - 1, int((1.0 - tail) * draws))]


def to_ms(text: str) -> float:
    """A wrk duration ("812.00us", "3.41ms", "1.02s") in milliseconds; NaN if unreadable."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(m.group(1)) * _UNITS_MS[m.group(2)] if m else float("nan")


@dataclass(frozen=True, slots=True)
class WrkRun:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int
    """Non-2xx/3xx responses plus socket errors (connect, read, write, timeout)."""

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def run_wrk(
    url: str, duration_s: float, connections: int = CONNECTIONS, cpu: int | str = LOAD_CPU, threads: int = 1
) -> WrkRun:
    """One `wrk -t{threads} --latency` run on `cpu` (a CPU or a taskset list), parsed."""
    out = subprocess.run(
        pinned(cpu, [WRK, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency", url]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    # Anchored: "76.50%" in the thread-stats table must not be read as the 50th percentile.
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return WrkRun(
        rps=rps,
        requests=requests,
        p50_ms=to_ms(p50.group(1)) if p50 else float("nan"),
        p99_ms=to_ms(p99.group(1)) if p99 else float("nan"),
        errors=errors,
    )


def load_routing_network(hidden: int = 64) -> Any:
    """A QNetwork (rl/network.py) with weights set by hand so that it routes like least in-flight:
    Q_b = -log1p(in-flight of b) (the F_LOG_IN_FLIGHT column of b's row), nothing else read.

    A random network tends to send everything to one backend, which changes the backends' cost, not
    the proxy's (and on the off-loop path makes every snapshot run out after a few decisions); spreading
    load keeps a benchmark about the proxy. The pass costs the same whatever the weights. Not F_EXPECTED
    (the queueing model's expected latency): it is flat while in-flight is below a backend's observed
    concurrency, so on the benchmarks' many-worker backends every backend would tie and the argmax
    would send everything to the first. Hidden unit 0 carries the column: the column is >= 0, so the
    ReLUs pass it through; everything else, the cluster summary and the value head included, is zero.
    """
    import torch

    from lbproxy.observe import F_LOG_IN_FLIGHT
    from lbproxy.rl.network import QNetwork

    net = QNetwork(hidden)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.row_x.weight[0, F_LOG_IN_FLIGHT] = 1.0  # h1_0 = log1p(in-flight)
        net.row2.weight[0, 0] = 1.0  # h2_0 = h1_0
        net.score.weight[0, 0] = -1.0  # A_b = -log1p(in-flight); V = 0
    return net.eval()


# --- the proxy's admin port ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MetricsPage:
    """A /metrics page as its samples, read by `prometheus_client.parser`, the library that writes it
    (lbproxy/demo/metrics.py reads the page with the same parser)."""

    samples: tuple[tuple[str, dict[str, str], float], ...] = ()
    """(sample name as on the page, e.g. `lbproxy_retries_total`; its labels; its value)."""

    @classmethod
    def parse(cls, text: str) -> MetricsPage:
        """Prometheus text format; ValueError if malformed."""
        return cls(
            tuple(
                (s.name, dict(s.labels), float(s.value))
                for family in text_string_to_metric_families(text)
                for s in family.samples
            )
        )

    def total(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """Sum of the samples called `name` whose labels include `labels` (every series of the
        metric when none are given); None when the page has no such sample."""
        values = [v for n, ls, v in self._select(name, labels)]
        return sum(values) if values else None

    def by_label(self, name: str, label: str, labels: Mapping[str, str] | None = None) -> dict[str, float]:
        """The samples called `name` (with `labels`) summed per value of `label`."""
        out: dict[str, float] = {}
        for _, ls, v in self._select(name, labels):
            key = ls.get(label, "")
            out[key] = out.get(key, 0.0) + v
        return out

    def _select(self, name: str, labels: Mapping[str, str] | None) -> list[tuple[str, dict[str, str], float]]:
        want = (labels or {}).items()
        return [s for s in self.samples if s[0] == name and all(s[1].get(k) == v for k, v in want)]


def scrape_metrics(admin_url: str, timeout_s: float = ADMIN_TIMEOUT_S) -> MetricsPage:
    """The proxy's /metrics now (OSError when it does not answer, ValueError when the page is malformed)."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=timeout_s) as resp:
        return MetricsPage.parse(resp.read().decode())


def admin_backends(admin_url: str, timeout_s: float = ADMIN_TIMEOUT_S) -> list[dict[str, Any]]:
    """The proxy's /admin/backends rows (name, index, requests, in_flight, available, ...) in --backends order."""
    with urllib.request.urlopen(admin_url + "/admin/backends", timeout=timeout_s) as resp:
        data = json.loads(resp.read())
    rows = data["backends"] if isinstance(data, dict) else data
    return sorted(rows, key=lambda b: b["index"])
