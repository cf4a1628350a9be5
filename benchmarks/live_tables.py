"""The live comparisons' tables (benchmarks/live_foreign.py, benchmarks/live_train_foreign.py): medians
per policy against the best heuristic, every run, the generator's send lag and what shaped the numbers.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from live_compare import Comparison, Measurement  # noqa: E402

LAG_TRUSTED_P99_MS = 5.0
"""A run whose send lag p99 stays below this sent on schedule; above, the client was starved."""


SHAPED = [
    "## What shaped these numbers",
    "",
    "- gunicorn's sync workers close the connection after every response, so the proxy opens a new upstream "
    "connection per request (no keep-alive reuse, no stale-connection retries). A request beyond a backend's "
    "workers waits in the kernel's accept queue (gunicorn --backlog 2048, somaxconn 4096), where neither "
    "gunicorn nor the proxy sees it except as a request still in flight.",
    "- The proxy allows 512 connections per backend (lbproxy/proxy/app.py CONNECTIONS_PER_BACKEND); with one "
    "connection per request, a policy that queues more than 512 requests at one backend queues the rest inside "
    "the proxy. Both count as in flight, so the in-flight policies see them either way.",
    "- Told only the URLs, round robin and random give each backend the same share, so the 1-worker backend "
    "gets several times its capacity at 0.8 load and its queue grows for the whole run: their p99 is bounded "
    "by the run length and the grace period, not a steady state. `--weights workers` tells the proxy the "
    "worker counts; then round robin is stable too.",
    "- After each run the proxy is stopped and a backend still holding a queue (dead connections it would "
    "serve anyway) is restarted, so no run starts behind the previous one's queue.",
    "- Active health checks are off unless `--health-path` is set (they were on, probing `/health`, before "
    "2026-12-01: every foreign backend answered 404 and was marked down within ~6 s, so the proxy routed in "
    "panic mode). These runs also pass `--health-interval-s 0`, which keeps them comparable with earlier ones.",
]


def table(cmp: Comparison, workers: Sequence[int]) -> list[str]:
    best = cmp.best_heuristic()
    share_head = "/".join(f"w{w}" for w in workers)
    lines = [
        f"| policy | p50 ms | p99 ms (min-max) | p99.9 ms | mean ms | failed % (total) | p99 / best heuristic "
        f"(min-max) | share {share_head} % | proxy CPU % | send lag max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in cmp.policies:
        ms = cmp.runs.get(p.name)
        if not ms:
            continue
        lo, hi = cmp.span(p.name, "p99_ms")
        failed = sum(m.summary.errors for m in ms)
        if best is not None:
            rlo, rhi = cmp.ratio_span(p.name, best)
            ratio = f"{cmp.med(p.name, 'p99_ms') / cmp.med(best, 'p99_ms'):.2f} ({rlo:.2f}-{rhi:.2f})"
        else:
            ratio = "-"
        shares = "/".join(f"{100 * statistics.median(m.shares[i] for m in ms):.0f}" for i in range(len(workers)))
        lines.append(
            f"| {p.name} | {cmp.med(p.name, 'p50_ms'):.1f} | {cmp.med(p.name, 'p99_ms'):.1f} ({lo:.1f}-{hi:.1f}) | "
            f"{cmp.med(p.name, 'p999_ms'):.1f} | {cmp.med(p.name, 'mean_ms'):.1f} | "
            f"{100 * cmp.med(p.name, 'error_rate'):.2f} ({failed}) | {ratio} | {shares} | "
            f"{statistics.median(m.proxy_cpu_pct for m in ms):.0f} | "
            f"{max(m.summary.send_lag_max_ms for m in ms):.1f} |"
        )
    return lines


def per_run_table(cmp: Comparison) -> list[str]:
    lines = [
        "| round | policy | requests | p50 ms | p99 ms | mean ms | failed | timeouts | answered req/s "
        "| send lag p99 / max ms | generator CPU % | share per backend % | ejections |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted((m for ms in cmp.runs.values() for m in ms), key=lambda m: (m.round, m.policy))
    for m in rows:
        s = m.summary
        lines.append(
            f"| {m.round + 1} | {m.policy} | {s.count} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.mean_ms:.1f} | "
            f"{s.errors} | {s.timeouts} | {s.throughput_rps:.0f} | {s.send_lag_p99_ms:.2f} / "
            f"{s.send_lag_max_ms:.1f} | {m.generator_cpu_pct:.0f} | {'/'.join(f'{100 * x:.0f}' for x in m.shares)} | "
            f"{ejections(m)} |"
        )
    return lines


def ejections(m: Measurement) -> str:
    """Passive outlier ejections in the run, all backends (the proxy's lbproxy_ejections_total)."""
    return f"{m.metrics.total('lbproxy_ejections_total') or 0:.0f}"


@dataclass(frozen=True, slots=True)
class SendLag:
    """The generator's send lag (actual minus scheduled send) over a set of runs."""

    p99_ms: float
    """The worst run's p99."""
    max_ms: float

    @property
    def trusted(self) -> str:
        return (
            "the generator kept to its schedule"
            if self.p99_ms < LAG_TRUSTED_P99_MS
            else f"**over {LAG_TRUSTED_P99_MS:g} ms: the client machine stalled; treat the tails with care**"
        )


def send_lag(runs: Iterable[Measurement]) -> SendLag:
    summaries = [m.summary for m in runs]
    return SendLag(
        max((s.send_lag_p99_ms for s in summaries), default=math.nan),
        max((s.send_lag_max_ms for s in summaries), default=math.nan),
    )
