"""`lbproxy --mode train --env sim --actors N`: simulator training with N Ray rollout workers feeding one
learner.

Ray (https://docs.ray.io) is an optional extra: `pip install 'lbproxy[distributed]'`. Without it,
`--actors N` is a one-line error saying so. Without `--ray-address` a local Ray (N CPUs, no dashboard)
starts and stops with the command; with it the run joins that cluster, whose nodes need the same
lbproxy (and torch) installed. A program that already called `ray.init` keeps its session.

Synchronous rounds. Round r is the episodes e..e+N-1 (a round is cut short at a checkpoint boundary
and at the run's end, train/sim.py `rounds`): the learner puts its online weights into the object
store once, and N rollout tasks of one CPU each simulate episode e+k with them (train/rollout.py:
the single-process trainer's episode e+k, same scenario, simulator seed, phase and ε schedule, with
weights frozen for the round). The learner takes the results in episode order, each episode's
transitions into its replay with the updates the pacer owes (the same ratio and `learning_starts` as
single-process training), then its CSV row and progress as train/sim.py writes them. "Weights
broadcast every K updates": K is the updates of one round, N x episode_decisions x
updates_per_decision (51 for 2 actors at the defaults). The learner runs on `--device` (a GPU when
there is one); each rollout on one CPU thread.

Tasks, not actor processes: an episode is a pure function of (settings, episode, weights), which is
what a Ray task is. Ray reuses a worker process from task to task (each builds the run's
RolloutWorker once), and reruns a task whose worker or node died; a retry returns the same episode, so
a lost node costs time, not exactness. `--actors N` is how many run at once.

Resume. The learner takes episodes in a fixed order, so a run stopped between rounds (checkpoints are
only written there) and resumed continues bit for bit, given the same `--actors` (the rounds depend
on it: it is in the fingerprint, another count is refused in one line) and the same numeric libraries
on every node. The result differs from the single-process trainer's, whose agent refreshes its weights
after every completion that ran updates: within a round, the rollouts act on weights up to K updates
old.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lbproxy.config import ConfigError, Settings
from lbproxy.rl.schedule import EpsilonSchedule
from lbproxy.train.rollout import TransitionFeed, rollout_episode
from lbproxy.train.sim import RAY_TRAIN_FORMAT, SimTrainerBase

RAY_MISSING = "--actors needs Ray: pip install 'lbproxy[distributed]'"


def import_ray() -> Any:
    """The `ray` module, or the one-line ConfigError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


RAY_PROBE_TIMEOUT_S = 3.0
"""How long `--ray-address HOST:PORT` may take to accept a TCP connection before the run refuses it:
Ray itself retries an address nobody answers at for a minute or more before it says so."""


def probe_ray_address(address: str) -> None:
    """ConfigError (one line) when nothing accepts connections at `--ray-address` HOST:PORT or
    ray://HOST:PORT. `auto` and `local` are Ray's to resolve (a missing local cluster fails fast)."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise ConfigError(f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=RAY_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"--ray-address {address}: nothing answers at {host}:{port} ({why}); "
            "start the cluster (`ray start --head`) or fix the address"
        ) from None


class RaySimTrainer(SimTrainerBase):
    """`--env sim --actors N`: rounds of N episodes on N Ray actors, one learner here."""

    FORMAT = RAY_TRAIN_FORMAT

    def __init__(self, settings: Settings) -> None:
        self.ray = import_ray()  # first: without Ray, nothing else is worth building
        if settings.ray_address and not self.ray.is_initialized():
            probe_ray_address(settings.ray_address)
        super().__init__(settings)
        self.actors = settings.actors
        self.fp["actors"] = self.actors
        self.feed = TransitionFeed(self.learner, self.replay, self.cfg)
        cfg = self.cfg
        total = self.episodes * settings.episode_decisions
        self.schedule = EpsilonSchedule.for_training(cfg.eps_start, cfg.eps_end, cfg.eps_fraction, total)
        self.episodes_done = 0
        self.rollout: Any = None
        """The Ray remote function of `rollout_episode` (set in the session)."""
        self.shipped: Any = None
        """The settings, in Ray's object store, that every rollout task gets."""

    @property
    def round_size(self) -> int:
        return self.actors

    @property
    def epsilon(self) -> float:
        return self.schedule.value(self.episodes_done * self.settings.episode_decisions)

    @property
    def last_loss(self) -> float:
        return self.feed.last_loss

    def policy_state(self) -> dict[str, Any]:
        return self.feed.state_dict()

    def load_policy_state(self, state: dict[str, Any]) -> None:
        self.feed.load_state_dict(state)

    def describe(self) -> str:
        where = self.settings.ray_address or "a local Ray"
        return f"learner on {self.device}, {self.actors} Ray rollout workers on {where}"

    @contextmanager
    def session(self) -> Iterator[None]:
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            address = self.settings.ray_address
            try:
                if address:
                    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
                else:
                    ray.init(
                        address="local",
                        num_cpus=self.actors,  # one per rollout; the learner is this process, not a Ray task
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                        log_to_driver=False,
                    )
            except ConnectionError as exc:
                raise ConfigError(f"--ray-address {address}: cannot join that Ray cluster ({exc})") from None
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            if cpus < self.actors:  # the rollouts beyond it would wait for a CPU forever
                raise ConfigError(f"--actors {self.actors}: the Ray cluster has {cpus} CPUs, one is needed per actor")
            self.rollout = ray.remote(num_cpus=1)(rollout_episode)
            # Put once, shared by every task; no secret goes into the object store.
            self.shipped = ray.put(self.settings.model_copy(update={"admin_token": None}))
            yield
        finally:
            if started:
                ray.shutdown()

    def run_round(self, episodes: range) -> Iterator[int]:
        ray = self.ray
        weights = ray.put({k: v.detach().cpu() for k, v in self.learner.online.state_dict().items()})
        pending = [self.rollout.remote(self.shipped, ep, weights) for ep in episodes]
        for ref in pending:  # in episode order; the later rollouts keep simulating meanwhile
            rollout = ray.get(ref)
            self.feed.learn(rollout)
            self.window.add(rollout.summary, self.feed.last_loss)
            self.episodes_done = rollout.episode + 1
            yield rollout.phase
