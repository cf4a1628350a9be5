"""Prometheus metrics (one registry per process) and the CSV metrics writer.

Names follow Prometheus conventions (base units, `_total` for counters). The Grafana dashboard in
deploy/ queries exactly these names, and a test checks that each one it queries is exported.
Per-backend children are resolved once per backend (`labels()` costs ~1 µs; not on every request).

With `--workers N` above 1 every worker runs in prometheus_client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by lbproxy/workers.py) and the supervisor's /metrics adds them up:
counters and histograms sum over workers (dead ones included, so totals never go back); each gauge
says how it combines the live workers' values (`multiprocess_mode`; ignored in one process).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Decision latency buckets in seconds, spanning 1 µs .. 10 ms (the deadline default is 500 µs).
DECISION_BUCKETS_S = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
REQUEST_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class LearnerMetrics:
    """The learner's metrics: defined by Metrics for the proxy, and alone by the learner process of
    `--workers N --online` (rl/learner_process.py), which is the one process that sets them there."""

    def __init__(self, r: CollectorRegistry) -> None:
        learner: Final = "livemax"  # unset in the workers (0): the learner process's value
        self.td_loss = Gauge(
            "lbproxy_td_loss", "Mean Huber TD loss of recent learner updates", registry=r, multiprocess_mode=learner
        )
        self.learner_updates = Counter("lbproxy_learner_updates", "Gradient updates applied", registry=r)
        self.replay_size = Gauge(
            "lbproxy_replay_size", "Transitions in the replay buffer", registry=r, multiprocess_mode=learner
        )
        self.weights_version = Gauge(
            "lbproxy_learner_weights_version",
            "Version of the weights the learner published last (0: the ones it started from)",
            registry=r,
            multiprocess_mode=learner,
        )

    def published(self, updates: int, mean_loss: float, replay_size: int, version: int) -> None:
        """After the learner process published weights: the updates and mean loss since the last time."""
        self.learner_updates.inc(updates)
        self.td_loss.set(mean_loss)
        self.replay_size.set(replay_size)
        self.weights_version.set(version)


class Metrics:
    """All of lbproxy's metrics on one registry, so tests can create isolated instances."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Defined group by group, in this order (the order /metrics lists them in).
        self._define_traffic(self.registry)
        self._define_learning(self.registry)
        self._define_faults(self.registry)
        self._define_guardrail(self.registry)

    def _define_traffic(self, r: CollectorRegistry) -> None:
        """Requests, backends and routing decisions."""
        self.requests = Counter(
            "lbproxy_requests", "Requests answered, by backend and status code", ["backend", "code"], registry=r
        )
        self.request_duration = Histogram(
            "lbproxy_request_duration_seconds",
            "End-to-end request latency at the proxy, by backend",
            ["backend"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            "lbproxy_backend_in_flight",
            "Requests in flight, by backend",
            ["backend"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # Workers judge health and outliers each on their own traffic: 0 as soon as one of them ejects it.
        self.available = Gauge(
            "lbproxy_backend_available",
            "1 if the backend is healthy and not ejected",
            ["backend"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.upstream_errors = Counter(
            "lbproxy_upstream_errors", "Upstream failures by backend and kind", ["backend", "kind"], registry=r
        )
        self.retries = Counter("lbproxy_retries", "Requests retried on another backend", registry=r)
        self.ejections = Counter("lbproxy_ejections", "Passive outlier ejections, by backend", ["backend"], registry=r)
        self.decision_duration = Histogram(
            "lbproxy_decision_duration_seconds",
            "Time to choose a backend, by policy",
            ["policy"],
            buckets=DECISION_BUCKETS_S,
            registry=r,
        )
        self.fallbacks = Counter(
            "lbproxy_decision_fallbacks", "Decisions routed by the fallback policy, by reason", ["reason"], registry=r
        )

    def _define_learning(self, r: CollectorRegistry) -> None:
        """Routing quality (every policy) and the DQN learner."""
        # Learning / quality gauges: measured for every policy, over the last reporting window; with
        # workers, each worker's window (a `pid` label), since a mean of ratios is not the ratio of sums.
        window: Final = "liveall"
        self.reward = Gauge(
            "lbproxy_reward", "Mean reward per request over the last window", registry=r, multiprocess_mode=window
        )
        self.gini = Gauge(
            "lbproxy_gini",
            "Capacity-normalised Gini of load over the last window",
            registry=r,
            multiprocess_mode=window,
        )
        self.accuracy = Gauge(
            "lbproxy_decision_accuracy",
            "Share of decisions matching the shortest-expected-delay oracle",
            registry=r,
            multiprocess_mode=window,
        )
        # One learner: the one process's value (LearnerMetrics), any live worker's for ε and episode.
        learner: Final = "livemax"
        self.epsilon = Gauge(
            "lbproxy_epsilon", "Exploration rate of the DQN policy", registry=r, multiprocess_mode=learner
        )
        lm = LearnerMetrics(r)
        self.td_loss, self.learner_updates, self.replay_size = lm.td_loss, lm.learner_updates, lm.replay_size
        self.weights_version = lm.weights_version
        self.batch_size = Histogram(
            "lbproxy_inference_batch_size", "Decisions per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.episode = Gauge("lbproxy_episode", "Current training episode", registry=r, multiprocess_mode=learner)

    def _define_faults(self, r: CollectorRegistry) -> None:
        """Faults that leave the proxy serving, and the event loop's task count."""
        # Faults that leave the proxy serving (SECURITY.md): alert on any increase.
        self.learner_failures = Counter(
            "lbproxy_learner_failures",
            "Background learner thread/process deaths; routing goes on with the last published weights",
            registry=r,
        )
        self.model_load_failures = Counter(
            "lbproxy_model_load_failures",
            "Model files refused at run time (POST /admin/model); the current model keeps serving",
            registry=r,
        )
        self.event_loop_tasks = Gauge(
            "lbproxy_event_loop_tasks",
            "asyncio tasks alive on the proxy's event loop (one per open client connection and request, "
            "plus a few fixed ones): a steady climb at steady load is a task leak",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.admin_denied = Counter(
            "lbproxy_admin_denied", "Admin requests refused for a missing or wrong bearer token", registry=r
        )

    def _define_guardrail(self, r: CollectorRegistry) -> None:
        """The DQN guardrail's switches and state."""
        # Guardrail (lbproxy/guardrail.py): both `to` children exist from the start, so rate() and
        # increase() see a 0 -> 1 step on the first switch instead of a series that appears from nowhere.
        self.guardrail_switches = Counter(
            "lbproxy_guardrail_switches", "DQN guardrail state changes, by the arm routing next", ["to"], registry=r
        )
        self._guardrail_to = {
            True: self.guardrail_switches.labels(to="fallback"),
            False: self.guardrail_switches.labels(to="dqn"),
        }
        self.guardrail_tripped = Gauge(
            "lbproxy_guardrail_tripped",
            "1 while the guardrail routes everything (but a probe) by the fallback",
            registry=r,
            multiprocess_mode="livemax",  # each worker has its own guardrail: 1 while any one is tripped
        )

    def guardrail_switched(self, tripped: bool) -> None:
        """`Guardrail(on_switch=metrics.guardrail_switched)`: count the switch and set the gauge."""
        self._guardrail_to[tripped].inc()
        self.guardrail_tripped.set(1.0 if tripped else 0.0)


TRAINING_METRIC_FIELDS = (
    "episode",
    "phase",
    "mean_reward",
    "gini",
    "accuracy",
    "mean_ms",
    "p50_ms",
    "p99_ms",
    "error_rate",
    "loss",
    "epsilon",
    "updates",
    "wall_s",
)
"""Columns of RUN_DIR/metrics/training_metrics.csv, written by the simulator trainer and by live training
alike (phase = "live" there), so `lbproxy plot` reads both."""


class CsvMetricsWriter:
    """Appends rows to a CSV, writing the header once; flushed and fsynced per row so a crash loses
    nothing that was reported. Re-opening an existing file (on --resume) keeps its rows."""

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self.path = path
        self.fields = list(fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self._fh = path.open("a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields)
        if new:
            self._writer.writeheader()

    def write(self, row: Mapping[str, object]) -> None:
        self._writer.writerow({k: row.get(k, "") for k in self.fields})
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
