"""What an episode of a simulator training run is: a pure function of (settings, episode), which is
what makes `--resume` exact and lets the Ray trainer's actors replay any episode; and the settings
that change a run's result (its fingerprint: a resume with another value is refused)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lbproxy.config import ConfigError, Settings
from lbproxy.observe import WindowSummary
from lbproxy.phases import phase_index_for_episode
from lbproxy.sim.episode import run_episode
from lbproxy.sim.suite import TrainingSet, train_sim_seed

if TYPE_CHECKING:
    from lbproxy.rl.agent import DqnAgent

# Settings that change the result of a run: a resume with any of them different is refused.
FINGERPRINT_FIELDS = (
    "seed",
    "episode_decisions",
    "gamma",
    "lr",
    "batch_size",
    "buffer_size",
    "learning_starts",
    "updates_per_decision",
    "target_update_every",
    "eps_start",
    "eps_end",
    "eps_fraction",
    "hidden",
    "grad_clip",
    "error_penalty",
)


def fingerprint(settings: Settings, train_set: TrainingSet, episodes: int) -> dict[str, Any]:
    fp: dict[str, Any] = {name: getattr(settings, name) for name in FINGERPRINT_FIELDS}
    fp["episodes"] = episodes
    fp["scenario"] = train_set.name
    fp["scenario_digest"] = train_set.digest
    fp["width"] = train_set.width
    return fp


def resolve_training_set(settings: Settings) -> TrainingSet:
    """`--scenario` as a TrainingSet; ConfigError (one line) for an unknown name or a bad file."""
    from lbproxy.sim import ScenarioError
    from lbproxy.sim.suite import training_set

    try:
        return training_set(settings.scenario, settings.seed)
    except ScenarioError as exc:
        raise ConfigError(str(exc)) from None


def run_training_episode(
    agent: DqnAgent, settings: Settings, train_set: TrainingSet, episodes: int, ep: int
) -> tuple[int, WindowSummary]:
    """Training episode `ep` of a run of `episodes`, routed by `agent`: its scenario, simulator seed and
    curriculum phase are functions of (settings, ep) only. Returns its (0-based) phase and summary.
    Both trainers call it: this process's for every episode, the Ray trainer's actors for theirs."""
    phase = min(phase_index_for_episode(ep, episodes), train_set.phase_count - 1)
    summary, _stats = run_episode(
        lambda _sim: agent,
        train_set.scenario(ep),
        train_sim_seed(settings.seed, ep),
        phase,
        settings.episode_decisions,
        first_id=int(agent.decisions),
        error_penalty=settings.error_penalty,
    )
    return phase, summary
