"""Locust as the demo runs it: headless, playing phases 1–3 of loadgen/phases.py squeezed into the
stage's length, with progress lines from the proxy's /metrics while it runs, and its aggregated CSV
row read back as a `PolicyResult`."""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lbproxy.demo.metrics import progress_line, scrape
from lbproxy.demo.processes import REPO, Children, DemoError
from loadgen import LivePhase, build_schedule, phase_at, total_duration_s

LOCUSTFILE = REPO / "loadgen" / "phases.py"
LOCUST_GRACE_S = 30.0
"""Beyond the shape's own length: Locust's start-up and its final stop/summary."""


@dataclass
class PolicyResult:
    """One policy's row of the report: Locust's client-side view, plus the proxy's traffic shares."""

    policy: str
    requests: int = 0
    failures: int = 0
    rps: float = 0.0
    mean_ms: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    share: dict[str, float] = field(default_factory=dict)
    note: str = ""


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
    last = scrape(admin_url)
    next_line = t0 + progress_every_s
    while popen.poll() is None:
        now = time.monotonic()
        if now > deadline:
            children.stop(popen)
            raise DemoError(f"locust ({name}) did not stop by itself; see {children.log_dir / (name + '.log')}")
        if progress_every_s > 0 and now >= next_line:
            snap = scrape(admin_url)
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
