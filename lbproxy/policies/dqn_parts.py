"""The parts a dqn runtime (lbproxy/policies/dqn_runtime.py) is built from: the served model, the
devices, the learner with its replay (a thread, a process, or a slot of the supervisor's shared learner),
the shared learner itself, and the ε schedule.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from lbproxy.config import ConfigError, Settings
from lbproxy.observe import feature_dim, learning_width
from lbproxy.rl.batcher import InferenceEngine
from lbproxy.rl.learner_process import LearnerHost
from lbproxy.rl.online import BackgroundLearner
from lbproxy.rl.process_learner import ProcessLearner
from lbproxy.rl.schedule import EpsilonSchedule
from lbproxy.rl.shared_replay import Attachment, Layout
from lbproxy.rl.update_pacer import UpdatePacer

if TYPE_CHECKING:
    import torch

    from lbproxy.rl.network import QNetwork


def load_serving_model(settings: Settings) -> QNetwork:
    """The model to serve: --model, else the shipped default. Missing/mismatched -> ConfigError (one line)."""
    from lbproxy.rl.checkpoint import CheckpointError, default_model_path, load_model

    path = settings.model if settings.model is not None else default_model_path()
    if not path.is_file():
        hint = (
            "pass --model PATH to an existing model"
            if settings.model is not None
            else "train one with `lbproxy --mode train --env sim` or pass --model PATH"
        )
        raise ConfigError(f"model file {str(path)!r} not found; {hint}")
    try:
        net, _meta = load_model(path, device="cpu")
    except CheckpointError as exc:
        raise ConfigError(str(exc) if str(path) in str(exc) else f"cannot load model {str(path)!r}: {exc}") from None
    return net


def devices(settings: Settings) -> tuple[torch.device, torch.device]:
    """(learner device, inference device). `auto`: live inference stays inline on the CPU even beside
    a GPU (the learner takes the GPU): whatever the device's speed, the off-loop round trip costs the
    event loop itself more than the inline NumPy pass does for this model: 4.3 vs 1.5 µs per decision
    at 256 requests per loop iteration, 16 vs 3 at 8 (benchmarks/results/decision_latency.md).
    `--device cuda` asks for both."""
    import torch

    from lbproxy.rl.learner import resolve_device

    device = resolve_device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device auto or --device cpu")
    return device, torch.device("cpu") if settings.device == "auto" else device


def _core(settings: Settings, device: torch.device, init: QNetwork | None, learner_state: dict[str, Any] | None) -> Any:
    """(Learner, DqnConfig): weights from `learner_state`, else `init`, else fresh."""
    from lbproxy.rl.learner import DqnConfig, Learner

    cfg = DqnConfig.from_settings(settings)
    if init is not None:
        cfg = dataclasses.replace(cfg, hidden=init.hidden)
    core = Learner(cfg, device=device)
    if learner_state is not None:
        core.load_state_dict(learner_state)
    elif init is not None:
        core.online.load_state_dict(init.state_dict())
        core.target.load_state_dict(init.state_dict())
    return core, cfg


def _n_params(core: Any) -> int:
    return sum(v.numel() for v in core.online.state_dict().values())


def _pacer(settings: Settings, capacity: int) -> UpdatePacer:
    return UpdatePacer(
        settings.updates_per_decision, settings.learning_starts, batch_size=settings.batch_size, capacity=capacity
    )


def shared_learner_host(
    settings: Settings,
    n_slots: int,
    metrics_dir: str,
    nice: int,
    init: QNetwork | None = None,
    learner_state: dict[str, Any] | None = None,
) -> LearnerHost:
    """The one learner of `--workers N` (lbproxy/workers.py starts it), a replay of --buffer-size rows
    split into one segment per worker. Its weights: with --online the served model's; in live training
    (lbproxy/train/live_workers.py) `learner_state` (--resume), else `init` (--init-model), else fresh.
    Not started. Its start state is built on the CPU: the supervisor never touches a GPU, the process
    moves it to `device`."""
    import torch

    device, _ = devices(settings)
    if settings.mode != "train":
        init = load_serving_model(settings)
    core, cfg = _core(settings, torch.device("cpu"), init, learner_state)
    width = learning_width(max(1, len(settings.backends)))
    layout = Layout(n_slots, max(1, settings.buffer_size // n_slots), feature_dim(width), width, _n_params(core))
    return LearnerHost(
        core,
        cfg,
        layout,
        pacer=_pacer(settings, n_slots * layout.slot_capacity),
        batch_size=settings.batch_size,
        weight_sync_every=settings.weight_sync_every,
        device=device,
        nice=nice,
        metrics_dir=metrics_dir,
    )


def learner_for(
    settings: Settings,
    engine: InferenceEngine,
    width: int,
    device: torch.device,
    init: QNetwork | None,
    learner_state: dict[str, Any] | None,
    attach: Attachment | None = None,
) -> BackgroundLearner | ProcessLearner:
    """The replay buffer and background learner: a thread, a process with --learner-process, or the
    supervisor's process this worker is `attach`ed to; the engine starts from the learner's weights."""
    from lbproxy.rl.network import QNetwork
    from lbproxy.rl.replay import ReplayBuffer

    core, cfg = _core(settings, device, init, learner_state)
    capacity = attach.layout.slot_capacity if attach is not None else settings.buffer_size
    replay = ReplayBuffer(capacity, feature_dim(width), width, seed=settings.seed)
    if attach is not None and (attach.layout.obs_dim, attach.layout.n_actions) != (replay.obs_dim, width):
        raise ConfigError(f"this worker's state ({replay.obs_dim}, {width}) differs from the shared learner's")
    pacer = _pacer(settings, replay.capacity)
    bs, every, publish, prepare = settings.batch_size, settings.weight_sync_every, engine.publish, engine.prepare
    learner: BackgroundLearner | ProcessLearner
    if attach is not None:  # it loads the weights the shared learner serves now into `core`
        learner = ProcessLearner(core, replay, attach=attach, publish=publish, prepare=prepare)
    elif settings.learner_process:
        layout = Layout(1, replay.capacity, replay.obs_dim, width, _n_params(core))
        host = LearnerHost(core, cfg, layout, pacer=pacer, batch_size=bs, weight_sync_every=every, device=device)
        learner = ProcessLearner(core, replay, host=host, publish=publish, prepare=prepare)
    else:
        learner = BackgroundLearner(
            core,
            replay,
            pacer=pacer,
            batch_size=bs,
            weight_sync_every=every,
            publish=publish,
            prepare=prepare,
            device=device,
        )
    serving_net = QNetwork(cfg.hidden)
    serving_net.load_state_dict({k: v.detach().cpu() for k, v in core.online.state_dict().items()})
    # Fresh weights (live training from scratch) are not served: until the learner's first published
    # update the fallback routes (counted as `no_model`) while its transitions fill the replay. Before
    # this, ε decayed while no update had run yet, and a random network routed a growing share of the
    # traffic: the 25 s test read a p99 of 5.7x the fallback's once (2026-12-03). A worker attached to
    # the shared learner serves what that learner serves, unless that is still its fresh start (or
    # its first copy raced a publish: version -1, the worker's own start weights are in `core`).
    if attach is not None:
        assert isinstance(learner, ProcessLearner)
        routable = learner.serving_version >= (1 if attach.untrained else 0)
    else:
        routable = learner_state is not None or init is not None
    engine.load_network(serving_net, routable=routable)
    return learner


def epsilon_schedule(settings: Settings, total_decisions: int | None) -> EpsilonSchedule:
    """Training: from eps_start to eps_end over eps_fraction of `total_decisions`. Online learning
    while serving (None): the fallback-routed share stays at eps_end, and the guardrail's control arm
    is already part of it. An exploring decision is the fallback's pick (DqnPolicy.decide), exactly
    what a control-arm decision is, and both are recorded for learning; so ε adds only what the
    control share lacks: max(0, eps_end - control_share), 0 at the defaults. Each extra point of
    fallback routing took a greedy-quality request away: live on foreign backends (11 tuning rounds,
    benchmarks/results/live_foreign_online_diagnosis.md) --online at ε 0.02 was 1.03x the p99 of
    --online at ε 0, which was 0.975x greedy's."""
    s = settings
    if total_decisions is None:
        eps = max(0.0, s.eps_end - s.control_share)
        return EpsilonSchedule(eps, eps, 1)
    return EpsilonSchedule.for_training(s.eps_start, s.eps_end, s.eps_fraction, total_decisions)
