"""Helpers shared by the benchmark scripts: one description of the machine, CPU pinning as ANCHORS.md
prescribes, and one wrk run parsed into numbers. Scripts import it as `common` (they run as
`python benchmarks/NAME.py`, so this directory is on sys.path)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WRK = shutil.which("wrk") or "/usr/bin/wrk"
TASKSET = shutil.which("taskset")
CONNECTIONS = 64
"""ANCHORS.md: wrk with 64 connections."""
LOAD_CPU = 1
"""ANCHORS.md pinning: the component measured on CPU 0, wrk and backends on CPU 1."""

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


def write_result(out: Path, lines: list[str]) -> None:
    """Write a results file (blank lines kept, `None` entries dropped) and say where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(line for line in lines if line is not None) + "\n")
    print(f"wrote {out}")


def pinned(cpu: int | str, argv: list[str]) -> list[str]:
    """`argv` pinned to one CPU (or a taskset list such as "0,1") where there is more than one CPU to pin to."""
    return [TASKSET, "-c", str(cpu), *argv] if TASKSET and (os.cpu_count() or 1) > 1 else argv


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
