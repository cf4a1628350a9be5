"""Backends and the pool that owns the shared `ClusterView`: health, outlier ejection, runtime changes.

Statistics (in-flight, peak-EWMA latency, error rate, service time) live only in the ClusterView and
change only through `view.on_dispatch` / `view.on_complete`, the same calls the simulator makes, so
the DQN sees identical features live and simulated. This module decides *availability*: a backend
is available when it is not removed, passes active health checks and is not ejected. Policies pick
among `view.candidates`, which the pool keeps right, including Envoy's panic mode.
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

from lbproxy.config import BackendSpec, ConfigError
from lbproxy.observe import MAX_BACKENDS, ClusterView, Outcome

MAX_EJECTION_S = 300.0
"""Cap on one ejection (Envoy outlier detection `max_ejection_time` default: 300 s)."""


@dataclass(slots=True)
class Backend:
    """One upstream slot. `index` is its slot in the ClusterView and never changes."""

    spec: BackendSpec
    index: int
    host: str
    port: int
    healthy: bool = True
    removed: bool = False
    consecutive_failures: int = 0
    times_ejected: int = 0
    ejected_until_s: float = 0.0
    """Loop time the current ejection ends; 0 when not ejected."""
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
    def ejected(self) -> bool:
        return self.ejected_until_s > 0.0

    @property
    def available(self) -> bool:
        return not self.removed and self.healthy and not self.ejected


@dataclass(slots=True)
class PoolConfig:
    """The settings the pool acts on (a subset of Settings, so the simulator-free tests can build one)."""

    eject_consecutive_failures: int = 5
    eject_base_s: float = 30.0
    max_ejection_percent: float = 50.0
    panic_threshold_percent: float = 50.0
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
        self.config = config or PoolConfig()
        self.view = ClusterView.create(len(specs), capacity=[s.weight for s in specs])
        self.backends: list[Backend] = []
        for i, spec in enumerate(specs):
            host, port = _host_port(spec.url)
            self.backends.append(Backend(spec=spec, index=i, host=host, port=port))
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
        """Refresh `view.available` and `view.candidates` after any health/ejection/membership change.

        Panic mode (Envoy): when fewer than `panic_threshold_percent` of the (not removed) backends
        are available, route over all of them: overloading a few survivors usually turns a partial
        outage into a total one, and health verdicts are often wrong in bulk.
        """
        view = self.view
        for b in self.backends:
            view.available[b.index] = b.available
        active = [b.index for b in self.backends if not b.removed]
        healthy = [b.index for b in self.backends if b.available]
        threshold = self.config.panic_threshold_percent
        self.panic = bool(active) and len(healthy) * 100.0 < threshold * len(active)
        view.candidates = active if self.panic else healthy

    def _changed(self, b: Backend) -> None:
        self.recompute()
        for fn in self.listeners:
            fn(b)

    # --- passive outlier detection (Envoy consecutive_5xx semantics) ---------------------------------
    def record_result(self, b: Backend, failed: bool, now_s: float) -> bool:
        """Count a 5xx / connect failure / timeout (failed) or a success. Returns True if this ejected b."""
        if not failed:
            b.consecutive_failures = 0
            return False
        b.consecutive_failures += 1
        if b.consecutive_failures < self.config.eject_consecutive_failures or b.ejected or b.removed:
            return False
        return self.eject(b, now_s)

    def eject(self, b: Backend, now_s: float) -> bool:
        active = self.active
        ejected = sum(1 for x in active if x.ejected)
        # Envoy: never exceed max_ejection_percent, but always allow ejecting at least one host.
        if ejected >= 1 and (ejected + 1) * 100.0 > self.config.max_ejection_percent * len(active):
            return False
        b.times_ejected += 1
        duration = min(self.config.eject_base_s * b.times_ejected, max(MAX_EJECTION_S, self.config.eject_base_s))
        b.ejected_until_s = now_s + duration
        b.consecutive_failures = 0
        with contextlib.suppress(RuntimeError):  # no running loop (unit use): `expire` un-ejects
            b._unejector = asyncio.get_running_loop().call_later(duration, self._uneject, b)
        self._changed(b)
        return True

    def expire(self, now_s: float) -> None:
        """Un-eject backends whose ejection ended (safety net for the timers; called once a second)."""
        for b in self.backends:
            if b.ejected and now_s >= b.ejected_until_s:
                if b._unejector is not None:
                    b._unejector.cancel()
                self._uneject(b)

    def _uneject(self, b: Backend) -> None:
        b._unejector = None
        if b.ejected:
            b.ejected_until_s = 0.0
            self._changed(b)

    # --- dispatch / completion ------------------------------------------------------------------
    def on_dispatch(self, i: int) -> None:
        self.view.on_dispatch(i)
        self.backends[i].requests += 1

    def on_complete(self, out: Outcome, now_s: float, failed: bool) -> None:
        self.view.on_complete(out, now_s)
        self.record_result(self.backends[out.backend], failed, now_s)

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
        host, port = _host_port(spec.url)
        b = Backend(spec=spec, index=idx, host=host, port=port)
        self.backends.append(b)
        self._changed(b)
        return b

    def remove(self, name: str) -> Backend:
        """Take a backend out for good; its slot stays (unavailable) so indices never shift."""
        b = self.find(name)
        if b is None:
            raise KeyError(name)
        b.removed = True
        if b._unejector is not None:
            b._unejector.cancel()
            b._unejector = None
        self._changed(b)
        return b

    # --- active health checks -------------------------------------------------------------------
    def start_health_checks(self, session: aiohttp.ClientSession) -> None:
        if self.config.health_interval_s > 0 and self._health_task is None:
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
