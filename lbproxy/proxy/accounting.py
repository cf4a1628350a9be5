"""Per-request accounting of the data plane: one exchange's outcome recorded everywhere it counts (pool,
quality window, policy, Prometheus), with per-backend metric children resolved once per key."""

from __future__ import annotations

import asyncio
from typing import Any

from lbproxy.observe import Outcome
from lbproxy.policy import AsyncPolicy, Policy
from lbproxy.proxy.batched_metrics import BatchedCounter, BatchedHistogram
from lbproxy.proxy.quality import QualityWindow
from lbproxy.telemetry import Metrics
from lbproxy.upstream import Pool


class Accounting:
    """What the forwarder and the relay call when an exchange ends (`complete`), fails (`error`) or is
    refused before it reached a backend (`count` with backend -1)."""

    def __init__(
        self,
        pool: Pool,
        policy: Policy | AsyncPolicy,
        metrics: Metrics,
        quality: QualityWindow,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.pool = pool
        self.view = pool.view
        self.policy = policy
        self.metrics = metrics
        self.quality = quality
        self.loop = loop
        self.decisions = BatchedHistogram(metrics.decision_duration.labels(policy.name))
        self._requests: dict[tuple[int, int], BatchedCounter] = {}
        self._durations: dict[int, BatchedHistogram] = {}
        self._errors: dict[tuple[int, str], Any] = {}

    def _label(self, idx: int) -> str:
        return self.pool.backends[idx].name if idx >= 0 else "none"

    def count(self, idx: int, code: int) -> None:
        key = (idx, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = BatchedCounter(self.metrics.requests.labels(self._label(idx), str(code)))
        child.inc()

    def error(self, idx: int, kind: str) -> None:
        key = (idx, kind)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = self.metrics.upstream_errors.labels(self._label(idx), kind)
        child.inc()

    def flush(self) -> None:
        """Push the locally counted per-request metrics to Prometheus (called once per tick)."""
        self.decisions.flush()
        for c in self._requests.values():
            c.flush()
        for h in self._durations.values():
            h.flush()

    def complete(
        self,
        idx: int,
        did: int,
        cls: int,
        t_start: float,
        code: int,
        failed: bool,
        service_time_s: float | None,
        queued: int,
    ) -> None:
        now = self.loop.time()
        out = Outcome(idx, cls, now - t_start, failed, did, service_time_s, queued)
        self.pool.on_complete(out, now, failed)
        self.quality.record_outcome(out)
        self.policy.observe(out, self.view, now)
        dur = self._durations.get(idx)
        if dur is None:
            dur = self._durations[idx] = BatchedHistogram(self.metrics.request_duration.labels(self._label(idx)))
        dur.observe(out.latency_s)
        self.count(idx, code)
