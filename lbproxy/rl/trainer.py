"""`lbproxy --mode train --env sim`: the simulator training workflow, resumable bit for bit.

Episodes. An episode is `episode_decisions` routed decisions in a *fresh* Simulator seeded from
(seed, episode) (:func:`train_sim_seed`), after a short warm-up in the same simulator run, routed by
the SED oracle and neither recorded nor learned from (:class:`WarmupThen`): it fills the backends'
queues and the view's latency estimates, so an episode does not start from an idle, unmeasured
cluster. Making every episode's traffic a pure function of (seed, episode) is what makes `--resume`
exact: only the agent, learner, replay buffer and RNG states must be saved, as state_dicts. The phase of episode `ep` is
`lbproxy.phases.phase_index_for_episode(ep, episodes)`: the run is a three-phase curriculum
(steady -> mixed -> peak, see lbproxy/phases.py) over equal thirds.

Outputs under RUN_DIR: `metrics/training_metrics.csv` (a row every `metrics_every` episodes, the
columns are :data:`METRIC_FIELDS`), `checkpoints/dqn_episode_XXXX.pth` every `checkpoint_every`
episodes (atomic; state_dicts and primitives only, loaded with weights_only=True) and
`dqn_final.pth` (the online network, lbproxy.rl.checkpoint.save_model format) at the end. Only the
newest `keep_checkpoints` checkpoints are kept: each holds the replay buffer (~70 MB by default).

Cost: the default run (6000 episodes x 256 decisions, 0.25 updates per decision at batch 128, one torch
thread) took 491 CPU-seconds (~8.5 min of one core) on a 2-vCPU EPYC guest (2026-11-24); measured with
`/usr/bin/time`, see lbproxy/models/dqn_default.json.

Stopping. Ctrl-C (SIGINT) and SIGTERM are handled between episodes: the first one finishes the
running episode (well under a second at the default size), saves a checkpoint of it and exits with
the command that resumes: 130 after SIGINT, 143 (128 + SIGTERM) after SIGTERM, the shell's codes
for "stopped by that signal", so a supervisor (Kubernetes, systemd, a batch queue) sees an
unfinished run, not a finished one. A second signal aborts at once. A SIGKILL at any moment loses
only the episodes after the last checkpoint: `--resume` continues from it (writes are atomic, a
temp file cut short is never taken for a checkpoint, and the CSV rows after it are dropped).
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from lbproxy.config import ConfigError, Settings
from lbproxy.observe import (
    ERROR_PENALTY,
    ClusterView,
    Outcome,
    WindowStats,
    WindowSummary,
    feature_dim,
    is_accurate,
)
from lbproxy.phases import phase_index_for_episode
from lbproxy.rl.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_writes,
    save_checkpoint,
    save_model,
)
from lbproxy.sim.suite import TrainingSet, train_sim_seed
from lbproxy.telemetry import TRAINING_METRIC_FIELDS, CsvMetricsWriter

TRAIN_FORMAT = "lbproxy-train/1"
EXIT_INTERRUPTED = 130
"""Exit code after SIGINT (Ctrl-C): checkpoint saved, run unfinished."""
EXIT_TERMINATED = 128 + int(signal.SIGTERM)
"""Exit code after SIGTERM (143): checkpoint saved, run unfinished; `--resume` continues it."""
WARMUP_DECISIONS = 128
"""Decisions the SED oracle routes before each episode (not recorded, not learned from): enough for
every backend of a 16-slot cluster to complete a few requests, so the latency features are warm and
the queues are at their working level when the policy takes over."""

PROGRESS_MIN_INTERVAL_S = 5.0
"""At most one progress line per this many wall seconds (plus the first and the last)."""

METRIC_FIELDS = TRAINING_METRIC_FIELDS
"""Columns of metrics/training_metrics.csv; each row averages the per-episode statistics of the
`metrics_every` episodes it closes (loss: mean of the episodes' last losses, NaN before learning)."""

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


class WarmupThen:
    """A Policy for one episode's Simulator: the SED oracle routes the first `warmup` decisions (not
    recorded, not learned from), then `policy` routes the rest, which are recorded in `stats`.

    Warm-up and episode run in ONE `Simulator.run`, so the view's in-flight counts stay exact at the
    hand-over (a separate warm-up run would drain its completions from the view but leave their work
    on the servers). Decision ids are shifted so that `policy` sees its own lifetime numbering: each
    episode's Simulator counts from 0, the agent keeps counting across episodes.
    Accuracy (vs the SED oracle with true rates) and Gini use lbproxy.observe, as the simulator does.
    """

    def __init__(self, sim: Any, policy: Any, warmup: int, first_id: int, stats: WindowStats) -> None:
        from lbproxy.sim import SedOracle

        self.name = policy.name
        self._warm = SedOracle(sim)
        self._policy = policy
        self._warmup = warmup
        self._offset = first_id - warmup
        self._rates = sim.true_rates  # live [class][server] lists
        self._k = 0
        self.stats = stats

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        k = self._k
        self._k = k + 1
        if k < self._warmup:
            return self._warm.choose(req_class, view, now_s)
        action = int(self._policy.choose(req_class, view, now_s))
        ok = is_accurate(action, view.in_flight, self._rates[req_class], view.candidates)
        self.stats.record_decision(action, ok)
        return action

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        if outcome.decision_id < self._warmup:
            return
        self.stats.record_outcome(outcome, view.typical_all_s)
        out = Outcome(
            outcome.backend,
            outcome.req_class,
            outcome.latency_s,
            outcome.error,
            outcome.decision_id + self._offset,
            outcome.service_time_s,
        )
        self._policy.observe(out, view, now_s)


def run_episode(
    make_policy: Callable[[Any], Any],
    scenario: Any,
    sim_seed: int,
    phase: int,
    decisions: int,
    *,
    first_id: int = 0,
    error_penalty: float = ERROR_PENALTY,
) -> tuple[WindowSummary, WindowStats]:
    """One episode on a fresh Simulator(scenario, sim_seed): SED-oracle warm-up, then `decisions`
    routed by `make_policy(sim)`. Returns the episode's summary and its raw window (for pooling)."""
    from lbproxy.sim import Simulator

    sim = Simulator(scenario, sim_seed, phase=phase, error_penalty=error_penalty)
    stats = WindowStats(n=sim.n, error_penalty=error_penalty)
    sim.run(
        WarmupThen(sim, make_policy(sim), WARMUP_DECISIONS, first_id, stats), WARMUP_DECISIONS + decisions, record=False
    )
    return stats.summary(capacity=sim.capacity_rps(), candidates=sim.view.candidates), stats


@dataclass
class _Window:
    """Per-episode statistics of the metrics row being accumulated (saved in checkpoints)."""

    rows: list[dict[str, float]] = field(default_factory=list)

    def add(self, **values: float) -> None:
        self.rows.append(values)

    def mean(self, key: str) -> float:
        vals = [r[key] for r in self.rows if not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else math.nan


def _rng_state() -> dict[str, Any]:
    """Global Python/NumPy/torch RNG states as primitives and tensors (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [str(np_name), [int(k) for k in np_keys], int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


class _StopLatch:
    """The first SIGINT/SIGTERM sets a flag checked between episodes; a second one raises
    KeyboardInterrupt (abort now)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.signum == signal.SIGTERM else EXIT_INTERRUPTED

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        what = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
        print(f"\nlbproxy: {what}: finishing this episode and saving a checkpoint ...", file=sys.stderr, flush=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stop_latch() -> Iterator[_StopLatch]:
    latch = _StopLatch()
    try:
        previous = {sig: signal.signal(sig, latch) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread (e.g. called from a worker): no graceful stop
        yield latch
        return
    try:
        yield latch
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _truncate_csv(path: Path, last_episode: int) -> None:
    """On resume, drop rows written after the checkpoint (they will be written again, identically),
    a row cut short by a SIGKILL included. Rewritten atomically: a kill meanwhile keeps the old file."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]]
    for line in lines[1:]:
        head = line.split(",", 1)[0]
        if head.isdigit() and int(head) <= last_episode and line.endswith("\n"):
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as fh:
        fh.write("".join(kept))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _resolve_training_set(settings: Settings) -> TrainingSet:
    from lbproxy.sim import ScenarioError
    from lbproxy.sim.suite import training_set

    try:
        return training_set(settings.scenario, settings.seed)
    except ScenarioError as exc:
        raise ConfigError(str(exc)) from None


def run_train_sim(settings: Settings, *, stop_after: int | None = None) -> int:
    """Train the DQN in the simulator; returns the exit code. `stop_after` (tests only) stops after
    that many episodes as if Ctrl-C had been pressed, so a run can be split and resumed exactly."""
    from lbproxy.rl.agent import DqnAgent
    from lbproxy.rl.learner import DqnConfig, Learner, resolve_device
    from lbproxy.rl.replay import ReplayBuffer

    if settings.seed < 0:
        raise ConfigError(f"invalid setting --seed: must be >= 0 for simulator training, got {settings.seed}")
    train_set = _resolve_training_set(settings)
    episodes = settings.resolved_episodes()
    run_dir = settings.run_dir
    fp = fingerprint(settings, train_set, episodes)
    device = resolve_device(settings.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one core: the MLP is small and the default run is sized for one core

    width = train_set.width
    cfg = DqnConfig.from_settings(settings)
    random.seed(settings.seed)
    np.random.seed(settings.seed % 2**32)
    torch.manual_seed(settings.seed)
    learner = Learner(cfg, device=device)
    replay = ReplayBuffer(cfg.buffer_size, feature_dim(width), width, seed=settings.seed)
    agent = DqnAgent(
        learner,
        replay,
        cfg,
        total_decisions=episodes * settings.episode_decisions,
        seed=settings.seed,
        width=width,
    )

    start_episode = 0
    window = _Window()
    wall_before = 0.0
    ckpt_dir = run_dir / "checkpoints"
    csv_path = run_dir / "metrics" / "training_metrics.csv"
    if settings.resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start training")
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        if state.get("format") != TRAIN_FORMAT:
            raise ConfigError(f"{path} is not a training checkpoint ({TRAIN_FORMAT}); delete it or use another run dir")
        saved_fp = state.get("fingerprint", {})
        diff = [k for k in sorted(set(fp) | set(saved_fp)) if fp.get(k) != saved_fp.get(k)]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"--resume: {path} was trained with {k}={saved_fp.get(k)!r}, now {k}={fp.get(k)!r}; "
                f"resume with the same settings ({', '.join(diff)} differ) or start a new --run-dir"
            )
        try:
            learner.load_state_dict(state["learner"])
            replay.load_state_dict(state["replay"])
            agent.load_state_dict(state["agent"])
            _set_rng_state(state["rng"])
            start_episode = int(state["episode"])
            window = _Window(rows=[dict(r) for r in state["window"]])
            wall_before = float(state["wall_s"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:120]
            raise ConfigError(
                f"{path} is an incomplete or incompatible training checkpoint ({type(exc).__name__}: {reason}); "
                "delete it to resume from an older one, or start a new --run-dir"
            ) from None
        _truncate_csv(csv_path, start_episode)
        print(f"lbproxy: resuming {run_dir} from episode {start_episode} ({path.name})", file=sys.stderr)
    elif latest_checkpoint(run_dir) is not None or (run_dir / "dqn_final.pth").exists():
        raise ConfigError(
            f"{run_dir} already holds a training run; pass --resume to continue it or choose another --run-dir"
        )
    else:
        _truncate_csv(csv_path, 0)  # rows of a run killed before its first checkpoint: not this run's
    remove_partial_writes(run_dir)  # a save cut by SIGKILL: never a checkpoint, only litter
    final = run_dir / "dqn_final.pth"

    def write_final(wall: float) -> None:
        meta = {
            "trained_by": "lbproxy --mode train --env sim",
            "episodes": episodes,
            "wall_s": round(wall, 1),
            "device": str(device),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in fp.items()},
        }
        save_model(final, learner.online, meta)

    if start_episode >= episodes:
        if not final.exists():  # killed between the last checkpoint and the final model
            write_final(wall_before)
        print(f"lbproxy: {run_dir} already finished {episodes} episodes; model {final}", file=sys.stderr)
        return 0

    def save(episode_done: int) -> Path:
        path = checkpoint_path(run_dir, episode_done)
        payload = {
            "format": TRAIN_FORMAT,
            "episode": episode_done,
            "fingerprint": fp,
            "learner": learner.state_dict(),
            "replay": replay.state_dict(),
            "agent": agent.state_dict(),
            "rng": _rng_state(),
            "window": [dict(r) for r in window.rows],
            "wall_s": wall_before + (time.perf_counter() - t0),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, payload)
        if settings.keep_checkpoints > 0:
            prune_checkpoints(run_dir, settings.keep_checkpoints)
        return path

    writer = CsvMetricsWriter(csv_path, METRIC_FIELDS)
    t0 = time.perf_counter()
    last_print = -math.inf
    print(
        f"lbproxy: training {episodes} episodes x {settings.episode_decisions} decisions on scenario "
        f"{train_set.name!r}, device {device}, run dir {run_dir}",
        file=sys.stderr,
    )
    try:
        with _stop_latch() as latch:
            for ep in range(start_episode, episodes):
                phase = min(phase_index_for_episode(ep, episodes), train_set.phase_count - 1)
                s, _stats = run_episode(
                    lambda _sim: agent,
                    train_set.scenario(ep),
                    train_sim_seed(settings.seed, ep),
                    phase,
                    settings.episode_decisions,
                    first_id=int(agent.decisions),
                    error_penalty=settings.error_penalty,
                )
                window.add(
                    phase=float(phase),
                    mean_reward=s.mean_reward,
                    gini=s.gini,
                    accuracy=s.accuracy,
                    mean_ms=s.mean_latency_s * 1e3,
                    p50_ms=s.p50_s * 1e3,
                    p99_ms=s.p99_s * 1e3,
                    error_rate=s.error_rate,
                    loss=float(agent.last_loss),
                )
                done = ep + 1
                elapsed = time.perf_counter() - t0
                if done % settings.metrics_every == 0 or done == episodes:
                    writer.write(
                        {
                            "episode": done,
                            "phase": phase + 1,
                            **{k: f"{window.mean(k):.6g}" for k in METRIC_FIELDS[2:10]},
                            "epsilon": f"{agent.epsilon:.4f}",
                            "updates": learner.updates,
                            "wall_s": f"{wall_before + elapsed:.1f}",
                        }
                    )
                    if time.perf_counter() - last_print >= PROGRESS_MIN_INTERVAL_S or done == episodes:
                        last_print = time.perf_counter()
                        rate = (done - start_episode) / max(elapsed, 1e-9)
                        print(
                            f"episode {done}/{episodes}  phase {phase + 1}  reward {window.mean('mean_reward'):.3f}  "
                            f"p99 {window.mean('p99_ms'):.1f} ms  acc {window.mean('accuracy'):.2f}  "
                            f"eps {agent.epsilon:.3f}  loss {window.mean('loss'):.4g}  "
                            f"{rate:.1f} ep/s  ETA {_format_eta((episodes - done) / rate)}",
                            file=sys.stderr,
                        )
                    window = _Window()
                stopping = latch.requested or (stop_after is not None and done >= stop_after)
                if done % settings.checkpoint_every == 0 or (stopping and done < episodes):
                    save(done)
                if stopping and done < episodes:
                    resume_cmd = f"lbproxy --mode train --env sim --resume --run-dir {run_dir}"
                    print(
                        f"lbproxy: stopped after episode {done}; checkpoint saved. Resume with: {resume_cmd}",
                        file=sys.stderr,
                    )
                    return latch.exit_code
    finally:
        writer.close()

    wall = wall_before + (time.perf_counter() - t0)
    write_final(wall)
    print(f"lbproxy: done: {episodes} episodes in {_format_eta(wall)}; model {final}", file=sys.stderr)
    return 0
