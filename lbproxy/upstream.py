"""Backends and the pool that owns the shared `ClusterView`: health checks, ejection timers, runtime changes.

Statistics (in-flight, peak-EWMA latency, error rate, service time) live only in the ClusterView and
change only through `view.on_dispatch` / `view.on_complete`, the same calls the simulator makes, so
the DQN sees identical features live and simulated. This module decides *availability*: a backend
is available when it is not removed, passes active health checks and is not ejected. Policies pick
among `view.candidates`, which the pool keeps right. The rules themselves (outlier ejection by errors
and by latency, panic mode, slow start) are lbproxy/outlier.py's, shared with the simulator; this
module applies them to live backends and owns what they leave to the caller: timers, health probes,
listeners, the admin view.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from lbproxy.config import ConfigError
from lbproxy.config_values import BackendSpec
from lbproxy.observe import MAX_BACKENDS, ClusterView, Outcome
from lbproxy.outlier import OutlierConfig, OutlierDetector, SlowStart, route_candidates
from lbproxy.retry import PER_TRY_TIMEOUT_S, RETRY_BUDGET_PERCENT, RETRY_MIN_CONCURRENCY


@dataclass(slots=True)
class Backend:
    """One upstream slot. `index` is its slot in the ClusterView and never changes."""

    spec: BackendSpec
    index: int
    host: str
    port: int
    outlier: OutlierDetector = field(repr=False)
    """The pool's detector, which holds this slot's ejection state."""
    healthy: bool = True
    removed: bool = False
    health_passes: int = 0
    health_fails: int = 0
    requests: int = 0
    _unejector: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def consecutive_failures(self) -> int:
        return self.outlier.consecutive_failures[self.index]

    @property
    def times_ejected(self) -> int:
        return self.outlier.times_ejected[self.index]

    @property
    def ejected_until_s(self) -> float:
        """Loop time the current ejection ends; 0 when not ejected."""
        return self.outlier.ejected_until_s[self.index]

    @property
    def ejected(self) -> bool:
        return self.outlier.ejected[self.index]

    @property
    def available(self) -> bool:
        return not self.removed and self.healthy and not self.ejected


@dataclass(slots=True)
class PoolConfig(OutlierConfig):
    """The settings the pool acts on (a subset of Settings, so the simulator-free tests can build one):
    the outlier rules, active health checks, and the cluster's retry settings, which the forwarder
    reads from here (Envoy configures the retry budget per upstream cluster too)."""

    retry_budget_percent: float = RETRY_BUDGET_PERCENT
    retry_min_concurrency: int = RETRY_MIN_CONCURRENCY
    per_try_timeout_s: float = PER_TRY_TIMEOUT_S
    health_interval_s: float = 2.0
    health_path: str = "/health"
    health_rise: int = 2
    health_fall: int = 3
    health_timeout_s: float = 2.0


def _host_port(url: str) -> tuple[str, int]:
    p = urlsplit(url)
    return p.hostname or "127.0.0.1", p.port or 80


class Pool:
    """The live set of backends. Owns the `ClusterView` every policy reads."""

    def __init__(self, specs: Sequence[BackendSpec], config: PoolConfig | None = None) -> None:
        if not specs:
            raise ConfigError("no backends configured; pass --backends URL[,URL] or --cluster-file FILE")
        cfg = self.config = config or PoolConfig()
        self.view = ClusterView.create(len(specs), capacity=[s.weight for s in specs])
        self.outlier = OutlierDetector(cfg, self.view.available)
        self.slow_start = SlowStart(
            cfg.slow_start_window_s, cfg.slow_start_aggression, cfg.slow_start_min_weight_percent
        )
        self._slow_since = self.slow_start.since_s  # the hot path tests this dict (empty: nothing to do)
        self.clock: Callable[[], float] = time.monotonic
        """Slow start's clock (its calls carry no loop time)."""
        self._base: list[int] = []
        """The candidates before slow start takes its share out."""
        self.backends: list[Backend] = []
        for i, spec in enumerate(specs):
            host, port = _host_port(spec.url)
            self.backends.append(Backend(spec=spec, index=i, host=host, port=port, outlier=self.outlier))
        self._check_unique_names()
        self.panic = False
        self.listeners: list[Callable[[Backend], None]] = []
        """Called with a backend whose availability (or existence) changed: metrics, logs."""
        self._health_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.recompute()

    def _check_unique_names(self) -> None:
        seen: set[str] = set()
        for b in self.backends:
            if b.name in seen:
                raise ConfigError(f"backend {b.name!r} is listed twice; give each backend a distinct URL")
            seen.add(b.name)

    # --- availability ---------------------------------------------------------------------------
    @property
    def active(self) -> list[Backend]:
        return [b for b in self.backends if not b.removed]

    def recompute(self) -> None:
        """Refresh `view.available` and `view.candidates` after any health/ejection/membership change:
        the available backends (all of them in panic mode), less slow start's share (outlier.py)."""
        view = self.view
        for b in self.backends:
            view.available[b.index] = b.available
        present = [not b.removed for b in self.backends]
        base, self.panic = route_candidates(view.available, present, self.config.panic_threshold_percent)
        self._base = base
        view.candidates = base if self.panic else self.slow_start.candidates(base, view.capacity)

    def _changed(self, b: Backend) -> None:
        if not b.available:
            self.slow_start.end(b.index)  # Envoy: a backend that fails leaves slow start
        self.recompute()
        for fn in self.listeners:
            fn(b)

    # --- passive outlier detection (the rules: lbproxy/outlier.py) ------------------------------------
    def eject(self, b: Backend, now_s: float) -> bool:
        """Eject b unless the max_ejection_percent cap refuses; True if it did."""
        duration = self.outlier.eject(b.index, now_s)
        if duration is None:
            return False
        with contextlib.suppress(RuntimeError):  # no running loop (unit use): `expire` un-ejects
            b._unejector = asyncio.get_running_loop().call_later(duration, self._uneject, b)
        self._changed(b)
        return True

    def expire(self, now_s: float) -> None:
        """Un-eject backends whose ejection ended (safety net for the timers; called once a second)."""
        for i in self.outlier.expired(now_s):
            b = self.backends[i]
            if b._unejector is not None:
                b._unejector.cancel()
            self._uneject(b)

    def _uneject(self, b: Backend) -> None:
        b._unejector = None
        if b.ejected:
            self.outlier.uneject(b.index)
            self._changed(b)

    # --- dispatch / completion ------------------------------------------------------------------
    def on_dispatch(self, i: int) -> None:
        self.view.on_dispatch(i)
        self.backends[i].requests += 1
        if self._slow_since and self.slow_start.on_dispatch(i, self.clock()) and not self.panic:
            self.view.candidates = self.slow_start.candidates(self._base, self.view.capacity)

    def on_complete(self, out: Outcome, now_s: float, failed: bool) -> None:
        """Statistics, then the outlier rules: a 5xx / connect failure / timeout (failed) or a success."""
        self.view.on_complete(out, now_s)
        if self.outlier.record(out.backend, out.req_class, out.latency_s, failed):
            self.eject(self.backends[out.backend], now_s)

    # --- runtime membership ---------------------------------------------------------------------
    def find(self, name: str) -> Backend | None:
        for b in self.backends:
            if not b.removed and (b.name == name or b.url == name):
                return b
        return None

    def add(self, spec: BackendSpec) -> Backend:
        """Add a backend in a new slot. Raises ValueError (shown to the admin caller) when impossible."""
        if self.find(spec.name) is not None or self.find(spec.url) is not None:
            raise ValueError(f"backend {spec.name!r} already exists")
        if self.view.n >= MAX_BACKENDS:
            raise ValueError(f"all {MAX_BACKENDS} backend slots are used (removed slots are not reused)")
        idx = self.view.add_backend(spec.weight)
        self.outlier.add_slot()
        host, port = _host_port(spec.url)
        b = Backend(spec=spec, index=idx, host=host, port=port, outlier=self.outlier)
        self.backends.append(b)
        self.slow_start.begin(idx, self.clock())
        self._changed(b)
        return b

    def remove(self, name: str) -> Backend:
        """Take a backend out for good; its slot stays (unavailable) so indices never shift."""
        b = self.find(name)
        if b is None:
            raise KeyError(name)
        b.removed = True
        self.outlier.remove(b.index)
        if b._unejector is not None:
            b._unejector.cancel()
            b._unejector = None
        self._changed(b)
        return b

    # --- active health checks -------------------------------------------------------------------
    def start_health_checks(self, session: aiohttp.ClientSession) -> None:
        if self.config.health_interval_s > 0 and self.config.health_path and self._health_task is None:
            self._session = session
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def stop(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for b in self.backends:
            if b._unejector is not None:
                b._unejector.cancel()
                b._unejector = None

    async def _health_loop(self) -> None:
        interval = self.config.health_interval_s
        while True:
            await asyncio.sleep(interval)
            targets = self.active
            results = await asyncio.gather(*(self.check(b) for b in targets))
            for b, ok in zip(targets, results, strict=True):
                self.apply_health(b, ok)

    async def check(self, b: Backend) -> bool:
        """One probe: GET health_path answering 2xx within the timeout passes."""
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(
            total=min(self.config.health_timeout_s, max(self.config.health_interval_s, 0.1))
        )
        try:
            async with self._session.get(b.url + self.config.health_path, timeout=timeout) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def apply_health(self, b: Backend, ok: bool) -> None:
        """Rise/fall hysteresis: `health_fall` failures in a row mark down, `health_rise` passes mark up."""
        if ok:
            b.health_fails = 0
            b.health_passes += 1
            if not b.healthy and b.health_passes >= self.config.health_rise:
                b.healthy = True
                self.outlier.readmit(b.index)
                self.slow_start.begin(b.index, self.clock())
                self._changed(b)
        else:
            b.health_passes = 0
            b.health_fails += 1
            if b.healthy and b.health_fails >= self.config.health_fall:
                b.healthy = False
                self._changed(b)

    # --- reporting ------------------------------------------------------------------------------
    def describe(self, now_s: float) -> list[dict[str, object]]:
        """JSON-able state of each slot, for GET /admin/backends."""
        v = self.view
        clock = self.clock()
        out: list[dict[str, object]] = []
        for b in self.backends:
            i = b.index
            out.append(
                {
                    "name": b.name,
                    "url": b.url,
                    "index": i,
                    "weight": b.spec.weight,
                    "available": b.available,
                    "candidate": i in v.candidates,
                    "healthy": b.healthy,
                    "removed": b.removed,
                    # wall-clock (Unix) end of the current ejection, and the seconds left of it
                    "ejected_until": round(time.time() + b.ejected_until_s - now_s, 3) if b.ejected else None,
                    "ejected_for_s": round(b.ejected_until_s - now_s, 3) if b.ejected else None,
                    "times_ejected": b.times_ejected,
                    "consecutive_failures": b.consecutive_failures,
                    # share of its fair share slow start allows now (lbproxy/outlier.py); None: not ramping
                    "slow_start_factor": round(f, 3) if (f := self.slow_start.factor(i, clock)) < 1.0 else None,
                    "in_flight": v.in_flight[i],
                    "latency_cost_s": _finite(v.decayed_cost(i, now_s)),
                    "error_rate": _finite(v.error_rate[i]),
                    "service_time_s": _finite(v.service_time_s[i]),
                    "requests": b.requests,
                }
            )
        return out


def _finite(x: float) -> float:
    return round(x, 6) if math.isfinite(x) else 0.0


def pool_config_from(settings: object) -> PoolConfig:
    """PoolConfig from a Settings object (attribute names match)."""
    kw = {name: getattr(settings, name) for name in PoolConfig.__dataclass_fields__ if hasattr(settings, name)}
    if hasattr(settings, "connect_timeout_s"):
        kw.setdefault("health_timeout_s", max(1.0, float(settings.connect_timeout_s)))
    return PoolConfig(**kw)
