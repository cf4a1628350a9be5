"""A foreign backend: a tiny, ordinary WSGI application meant to be served by gunicorn, a server this
project did not write.

    FOREIGN_SPEED=0.5 python -m gunicorn -w 4 -b 127.0.0.1:8091 backends.foreign_app:app

Why it exists: backends/app.py emulates servers for the proxy and tells it things no ordinary web app
tells a load balancer (`X-Service-Time`, `X-Utilization`, `X-Queue-Wait`, `X-Backend`, a `/health`
route, a FIFO queue of our own). Policies validated only against it could lean on those signals
without anyone noticing. This app looks like any other web app: a home page, two API routes and
static files, `200` with a small body, `404` elsewhere, and no headers beyond what gunicorn adds.
Its capacity comes from gunicorn itself: with sync workers (the default) each worker process serves
one request at a time, so `-w W` is a concurrency of W and the waiting room is the kernel's accept
queue (`--backlog`), not code of ours.

Per request it sleeps a service time drawn for the path's class (lbproxy.observe.classify_path) with
the cluster model's class means (lbproxy.cluster.ServiceSpec: light 10 ms, heavy 50 ms, static 2 ms),
divided by a speed factor. Environment (read once per worker process):

    FOREIGN_SPEED         service-time divisor, > 0 (default 1.0; 0.5 = twice as slow)
    FOREIGN_DISTRIBUTION  exponential (default) | lognormal | constant
    FOREIGN_CV            coefficient of variation of the lognormal (default 1.0)
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from lbproxy.cluster import CLASS_NAMES, ServiceSpec
from lbproxy.observe import classify_path

ENV_SPEED = "FOREIGN_SPEED"
ENV_DISTRIBUTION = "FOREIGN_DISTRIBUTION"
ENV_CV = "FOREIGN_CV"
DISTRIBUTIONS = ("exponential", "lognormal", "constant")

ROUTE_PREFIXES = ("/api/light", "/api/heavy", "/static/")
"""Paths that exist (besides `/`); each is served with the class classify_path gives it."""

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class ServiceTimes:
    """Service-time draws of one worker process.

    Seeded from the OS, on purpose: which request reaches which worker depends on the policy and on
    timing, so no seed could make a run's service times repeat; independent streams per worker
    (created lazily, after gunicorn forks) are what matters, and `--preload` must not hand every
    worker the same stream."""

    def __init__(self, speed: float, distribution: str, cv: float) -> None:
        if not speed > 0:
            raise ValueError(f"{ENV_SPEED} must be a positive number, got {speed!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"{ENV_DISTRIBUTION} must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
        if not cv > 0:
            raise ValueError(f"{ENV_CV} must be a positive number, got {cv!r}")
        self.mean_s = tuple(m / speed for m in ServiceSpec().mean_s)
        self.distribution = distribution
        # Lognormal with mean m and coefficient of variation cv: sigma^2 = ln(1 + cv^2), mu = ln m - sigma^2/2.
        self.sigma = math.sqrt(math.log1p(cv * cv))
        self.rng = random.Random()

    @classmethod
    def from_env(cls) -> ServiceTimes:
        env = os.environ
        try:
            speed = float(env.get(ENV_SPEED, "1.0"))
            cv = float(env.get(ENV_CV, "1.0"))
        except ValueError as exc:
            raise ValueError(f"{ENV_SPEED} and {ENV_CV} must be numbers: {exc}") from None
        return cls(speed, env.get(ENV_DISTRIBUTION, "exponential"), cv)

    def draw(self, req_class: int) -> float:
        mean = self.mean_s[req_class]
        if self.distribution == "constant":
            return mean
        if self.distribution == "lognormal":
            return self.rng.lognormvariate(math.log(mean) - self.sigma * self.sigma / 2, self.sigma)
        return self.rng.expovariate(1.0 / mean)


_service: tuple[int, ServiceTimes] | None = None


def service_times() -> ServiceTimes:
    """This process's sampler, built on first use in each worker (see ServiceTimes on why per pid)."""
    global _service
    pid = os.getpid()
    if _service is None or _service[0] != pid:
        _service = (pid, ServiceTimes.from_env())
    return _service[1]


def _answer(start_response: StartResponse, status: str, body: bytes, content_type: str) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point: sleep one service time for the path's class, answer 200; 404 elsewhere."""
    path = environ.get("PATH_INFO", "/") or "/"
    if path != "/" and not path.startswith(ROUTE_PREFIXES):
        return _answer(start_response, "404 Not Found", b"not found\n", "text/plain; charset=utf-8")
    req_class = int(classify_path(path))
    time.sleep(service_times().draw(req_class))
    body = f'{{"ok":true,"class":"{CLASS_NAMES[req_class]}"}}\n'.encode()
    return _answer(start_response, "200 OK", body, "application/json")
