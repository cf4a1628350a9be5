"""The proxy's /metrics as the demo reads it: request totals per backend (the report's traffic
shares), the latency histogram (the progress lines' p99 over the last few seconds) and the unlabelled
gauges (reward, ε, learner updates). Parsed by `prometheus_client.parser`, the library that writes it."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from lbproxy.demo.processes import http_get
from loadgen import LivePhase


@dataclass
class Snapshot:
    t: float
    """time.monotonic() when read."""
    requests: float
    """lbproxy_requests_total over every backend and status code."""
    buckets: dict[float, float]
    """lbproxy_request_duration_seconds cumulative bucket counts by upper bound, summed over backends."""
    gauges: dict[str, float]
    """Every sample without labels, by its name on the page (`lbproxy_epsilon`, `lbproxy_learner_updates_total`)."""
    per_backend: dict[str, float]
    """lbproxy_requests_total by backend."""


def parse_snapshot(text: str, t: float) -> Snapshot:
    """A /metrics page (Prometheus text format) as a `Snapshot` taken at `t`; ValueError if malformed."""
    requests = 0.0
    buckets: dict[float, float] = defaultdict(float)
    gauges: dict[str, float] = {}
    per_backend: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "lbproxy_requests_total":
                requests += value
                per_backend[labels.get("backend", "?")] += value
            elif name == "lbproxy_request_duration_seconds_bucket":
                buckets[float(labels["le"])] += value
            elif not labels:
                gauges[name] = value
    return Snapshot(t, requests, dict(buckets), gauges, dict(per_backend))


def scrape(admin_url: str) -> Snapshot | None:
    """The proxy's /metrics now; None when it does not answer (or answers garbage): a progress line
    is skipped, the demo goes on."""
    text = http_get(admin_url + "/metrics")
    if text is None:
        return None
    try:
        return parse_snapshot(text, time.monotonic())
    except ValueError:
        return None


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
    """One line about the interval between snapshots `a` and `b`: rate and p99 of that interval only,
    reward and ε as the proxy reports them at `b`."""
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
