"""`lbproxy --mode serve`: run the proxy with one policy until SIGINT/SIGTERM, then drain and exit 0.

Stop: the listener closes first (new connections are refused), requests in flight get
DRAIN_TIMEOUT_S to finish, responses streaming included, then the process exits 0.
With `--policy dqn` and no learning, POST /admin/model swaps the served model at run time
(lbproxy/proxy/admin.py); a bad file leaves the current one serving.
`--workers N` above 1 runs N of these processes on one port under a supervisor (lbproxy/workers.py);
with 1 (the default) this process is the whole proxy, as it always was.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from lbproxy.config import ConfigError, Settings
from lbproxy.telemetry import Metrics

if TYPE_CHECKING:
    from lbproxy.policies.dqn_runtime import DqnRuntime
    from lbproxy.proxy import ProxyServer
    from lbproxy.train.live_workers import WorkerPlan
    from lbproxy.worker_process import WorkerLink

DRAIN_TIMEOUT_S = 10.0
"""In-flight requests get this long to finish after a stop signal (Kubernetes' default grace is 30 s)."""

GC_THRESHOLD_GEN0 = 50_000
"""gen-0 collection threshold (CPython default 700): the proxy allocates many short-lived objects per
request; collecting every 700 allocations costs throughput and, with torch's heap, p99 (DESIGN note)."""


def tune_gc() -> None:
    """Freeze everything allocated at start-up (imports, torch) out of the collector's reach and make
    young-generation collections rarer. A full pass over torch's heap took ~80 ms and wrecked p99."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD_GEN0, g1, g2)


def new_event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when installed (not on Windows), else the default loop (uvicorn's `auto` choice)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_async(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=new_event_loop_factory()) as runner:
        return runner.run(main)


def build_policy(
    settings: Settings, metrics: Metrics, link: WorkerLink | None = None
) -> tuple[Any, list[Any], list[Any]]:
    """The policy object, the lifespans it needs (the DQN's learner/gauges) and its admin routes
    (the DQN's POST /admin/model); heuristics need neither. `link`: one of N workers, which may feed
    the supervisor's learner and, in live training, send it its episodes."""
    if settings.policy == "dqn":
        from lbproxy.policies.dqn_runtime import create_dqn_runtime
        from lbproxy.proxy.admin import model_routes

        attach = link.learner if link is not None else None
        plan = link.training if link is not None else None
        if link is None or plan is None:
            rt = create_dqn_runtime(settings, None, metrics, attach=attach)
        else:
            rt = _training_worker_runtime(settings, metrics, link, plan)
        return rt.policy, [rt.lifespan], model_routes(rt.reload_model if rt.learner is None else None)
    from lbproxy.policies import make_policy

    return make_policy(settings.policy, settings.seed), [], []


def _training_worker_runtime(settings: Settings, metrics: Metrics, link: WorkerLink, plan: WorkerPlan) -> DqnRuntime:
    """A live-training worker of `--workers N` (lbproxy/train/live_workers.py): learning into the
    supervisor's learner, its finished episodes sent to the supervisor as they end."""
    from lbproxy.live_episodes import EpisodeTracker
    from lbproxy.policies.dqn_runtime import create_dqn_runtime

    weights = [b.weight for b in settings.backends]
    tracker = EpisodeTracker(len(settings.backends), settings.episode_decisions, settings.error_penalty, weights)
    rt = create_dqn_runtime(
        settings,
        None,
        metrics,
        train=True,
        total_decisions=plan.total_decisions,
        epsilon_start_step=plan.start_step,
        tracker=tracker,
        attach=link.learner,
    )
    fallbacks_sent = 0

    def send() -> None:
        nonlocal fallbacks_sent
        fallbacks = sum(rt.policy.fallback_counts.values())
        link.send_episodes(tracker, fallbacks - fallbacks_sent)
        fallbacks_sent = fallbacks

    tracker.on_episode = send
    return rt


def check_serve_settings(settings: Settings) -> None:
    """ConfigError (one line) for no backends or an exposed admin listener without a token."""
    from lbproxy.proxy.admin import admin_token

    if not settings.backends:
        raise ConfigError("no backends configured; pass --backends URL[,URL] or --cluster-file FILE")
    admin_token(settings)


def build_server(settings: Settings, metrics: Metrics, link: WorkerLink | None = None) -> ProxyServer:
    """The serve-mode ProxyServer (not started): its policy with the policy's lifespans and admin routes.
    ConfigError (one line) for no backends or an exposed admin listener without a token, checked
    before a model is loaded."""
    from lbproxy.proxy import ProxyServer

    check_serve_settings(settings)
    policy, lifespans, routes = build_policy(settings, metrics, link)
    server = ProxyServer(settings, policy, metrics)
    server.lifespans.extend(lifespans)
    server.admin_routes.extend(routes)
    return server


async def serve(settings: Settings, link: WorkerLink | None = None) -> int:
    """Serve until SIGINT/SIGTERM, then drain. As one of N workers (`link`): share the port, take the
    supervisor's admin changes before accepting, report in, and also drain when the supervisor asks or
    is gone."""
    if settings.access_log:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    server = build_server(settings, Metrics(), link)
    server.reuse_port = link is not None
    await server.start(None if link is None else lambda: link.admitted(server))
    tune_gc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if link is not None:
        link.serving(server, on_stop=stop.set)
    else:
        print_serving(settings, server.port, server.policy_name, server.admin_port)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(DRAIN_TIMEOUT_S)
    return 0


def print_serving(settings: Settings, port: int, policy_name: str, admin_port: int, workers: str = "") -> None:
    """The start-up line on stderr: where, which policy, which backends, where the admin listener is."""
    names = ", ".join(f"{b.url}" + (f"={b.weight:g}" if b.weight != 1.0 else "") for b in settings.backends)
    print(
        f"lbproxy: serving http://{settings.host}:{port} with policy {policy_name} over "
        f"{len(settings.backends)} backends ({names}){workers}; admin http://{settings.admin_host}:{admin_port}",
        file=sys.stderr,
        flush=True,
    )


def run_serve(settings: Settings) -> int:
    if settings.workers > 1:
        from lbproxy.workers import run_supervisor

        return run_supervisor(settings)
    return run_async(serve(settings))
