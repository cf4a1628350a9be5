"""Simulator training on Ray: experience throughput with 0 (single process), 1 and 2 actors, and the
wall time of a training run with and without actors.

Usage: .venv/bin/python benchmarks/ray_training.py [--episodes 8] [--rounds 5] [--wall-episodes 200]
       [--out PATH]

Throughput. Three trainers with the shipped model's settings (`--scenario generated`, the defaults
otherwise; lbproxy/models/dqn_default.json) live side by side in one process and one local Ray: the
single-process trainer (train/sim.py), and the Ray trainer (train/ray_sim.py) with 1 and with 2
actors. Each first runs 8 unmeasured episodes (the actors' processes start and import torch, and
the replay passes `learning_starts`, so every measured episode also pays its learner updates), then
in each of `--rounds` rounds, taken in turn, the next `--episodes` episodes of each: transitions
learned from per second of wall time (episodes x episode_decisions / wall), the product's own
episode loop (`run_round`) without CSV rows or checkpoints. Median and range over the rounds.

Where the time goes. In this process, per episode: simulating it (train/rollout.py RolloutWorker.run,
learning off) and learning from it (TransitionFeed.learn: the replay adds and the owed updates), median
over the measured episodes; and the rollout side alone on Ray: the same rollout tasks the trainer
submits, in waves of 1 or 2 at a time, nothing learned (what the actors can deliver).

Wall time. `lbproxy --mode train --env sim --scenario generated --episodes W` as a command, with and
without `--actors 2`, start-up (and Ray's) included: W episodes of the shipped model's run (5000),
whose ε schedule is then W's.
Writes benchmarks/results/ray_training.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from common import command, machine, write_result

from lbproxy.config import Settings
from lbproxy.train.ray_sim import RaySimTrainer, import_ray
from lbproxy.train.sim import SimTrainer, SimTrainerBase

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "ray_training.md"
WARMUP_EPISODES = 8
SHIPPED_EPISODES = 5000
ACTOR_COUNTS = (0, 1, 2)


def settings(run_dir: Path, actors: int, episodes: int = SHIPPED_EPISODES) -> Settings:
    fields: dict[str, Any] = {
        "mode": "train",
        "env": "sim",
        "scenario": "generated",
        "episodes": episodes,
        "device": "cpu",
        "checkpoint_every": 10**6,
        "run_dir": run_dir,
        "actors": actors,
    }
    return Settings(**fields)


def run_episodes(trainer: SimTrainerBase, first: int, count: int) -> float:
    """Wall seconds of episodes first..first+count-1, in the trainer's rounds."""
    t0 = time.perf_counter()
    ep = first
    while ep < first + count:
        end = min(ep + trainer.round_size, first + count)
        for _phase in trainer.run_round(range(ep, end)):
            pass
        ep = end
    return time.perf_counter() - t0


def throughput(episodes: int, rounds: int, tmp: Path) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Per trainer and round: transitions/s of training (learning included); and, per Ray trainer, of its
    rollout tasks alone."""
    rates: dict[int, list[float]] = {n: [] for n in ACTOR_COUNTS}
    alone: dict[int, list[float]] = {n: [] for n in ACTOR_COUNTS if n}
    with ExitStack() as stack:
        trainers: dict[int, SimTrainerBase] = {}
        for n in ACTOR_COUNTS:
            s = settings(tmp / f"tp{n}", n)
            trainer: SimTrainerBase = RaySimTrainer(s) if n else SimTrainer(s)
            stack.enter_context(trainer.session())
            run_episodes(trainer, 0, WARMUP_EPISODES)
            trainers[n] = trainer
        ep = WARMUP_EPISODES
        for r in range(rounds):
            for n, trainer in trainers.items():
                wall = run_episodes(trainer, ep, episodes)
                rates[n].append(episodes * trainer.settings.episode_decisions / wall)
                print(f"round {r + 1}/{rounds}: actors {n}: {rates[n][-1]:,.0f} transitions/s", file=sys.stderr)
            ep += episodes
            ray_trainers = {n: t for n, t in trainers.items() if isinstance(t, RaySimTrainer)}
            for n, rate in rollout_only(ray_trainers, episodes, ep).items():
                alone[n].append(rate)
    return rates, alone


def time_split(episodes: int, tmp: Path) -> tuple[float, float]:
    """Median seconds per episode of simulating it and of learning from it, in this process."""
    from lbproxy.train.rollout import RolloutWorker, TransitionFeed

    s = settings(tmp / "split", 0)
    trainer, worker = SimTrainer(s), RolloutWorker(s)
    feed = TransitionFeed(trainer.learner, trainer.replay, trainer.cfg)
    sim_s, learn_s = [], []
    for ep in range(WARMUP_EPISODES + episodes):
        weights = {k: v.detach().clone() for k, v in trainer.learner.online.state_dict().items()}
        t0 = time.perf_counter()
        rollout = worker.run(ep, weights)
        t1 = time.perf_counter()
        feed.learn(rollout)
        if ep >= WARMUP_EPISODES:
            sim_s.append(t1 - t0)
            learn_s.append(time.perf_counter() - t1)
    return statistics.median(sim_s), statistics.median(learn_s)


def rollout_only(trainers: dict[int, RaySimTrainer], episodes: int, first: int) -> dict[int, float]:
    """Transitions/s the rollout tasks deliver in waves of `actors`, nothing learned."""
    ray = import_ray()
    out = {}
    for n, trainer in trainers.items():
        weights = ray.put({k: v.detach().cpu() for k, v in trainer.learner.online.state_dict().items()})
        t0 = time.perf_counter()
        for ep in range(first, first + episodes, n):
            waves = [
                trainer.rollout.remote(trainer.shipped, e, weights) for e in range(ep, min(ep + n, first + episodes))
            ]
            ray.get(waves)
        out[n] = episodes * trainer.settings.episode_decisions / (time.perf_counter() - t0)
    return out


def wall_run(episodes: int, actors: int, tmp: Path) -> float:
    args = [sys.executable, "-m", "lbproxy", "--mode", "train", "--env", "sim", "--scenario", "generated"]
    args += ["--episodes", str(episodes), "--device", "cpu", "--run-dir", str(tmp / f"wall{actors}")]
    if actors:
        args += ["--actors", str(actors)]
    t0 = time.perf_counter()
    subprocess.run(args, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": ""})
    return time.perf_counter() - t0


def throughput_lines(
    args: argparse.Namespace,
    argv: list[str] | None,
    ray_version: str,
    started: str,
    loads: tuple[float, float],
    rates: dict[int, list[float]],
) -> list[str]:
    """The header and the experience-throughput table."""
    load_before, load_after = loads
    base = statistics.median(rates[0])
    lines = [
        "# Simulator training on Ray: experience throughput and wall time",
        "",
        f"- Date: {started}",
        f"- Machine: {machine()}, Ray {ray_version}",
        f"- Command: `{command(argv)}`",
        f"- Load average (1 min): {load_before:.2f} at the start, {load_after:.2f} at the end (a shared machine).",
        "- Settings: the shipped model's (`--scenario generated`, 256 decisions an episode, 0.1 updates a "
        "decision at batch 128, learner on the CPU with one torch thread; each actor one CPU thread).",
        f"- What limits it: {os.cpu_count()} vCPUs shared with other work; with N rollouts and the learner, N + 1 "
        "busy processes share them, and Ray's own processes (raylet, GCS) take some too.",
        "",
        "## Experience throughput",
        "",
        f"Transitions learned from per second of wall time, over {args.episodes} episodes x {args.rounds} rounds "
        f"per trainer, taken in turn, after {WARMUP_EPISODES} unmeasured episodes (learning on): median and range.",
        "",
        "| trainer | transitions/s (median) | range | vs single process |",
        "|---|---:|---:|---:|",
    ]
    for n in ACTOR_COUNTS:
        name = "single process (`--actors 0`)" if n == 0 else f"Ray, `--actors {n}`"
        med = statistics.median(rates[n])
        lines.append(f"| {name} | {med:,.0f} | {min(rates[n]):,.0f} – {max(rates[n]):,.0f} | {med / base:.2f}x |")
    return lines


def time_split_lines(
    args: argparse.Namespace, sim_s: float, learn_s: float, alone: dict[int, list[float]]
) -> list[str]:
    """Where an episode's time goes, and the rollout side alone."""
    lines: list[str] = []
    lines += [
        "",
        "## Where the time goes",
        "",
        f"Per episode of 256 decisions, in one process (median of {args.episodes * args.rounds} episodes after "
        f"{WARMUP_EPISODES}): simulating it {sim_s * 1e3:.0f} ms, learning from it {learn_s * 1e3:.0f} ms "
        f"(~{256 * 0.1:.1f} updates at batch 128 and the replay adds): the learner is "
        f"{learn_s / (sim_s + learn_s):.0%} of single-process training, so training here runs at most "
        f"{256 / learn_s:,.0f} transitions/s whatever the number of rollouts, unless the learner is faster "
        "(a GPU) or does fewer updates a decision.",
        "",
        "The rollout side alone (the trainer's rollout tasks in waves of N, nothing learned; median and range "
        "over the rounds):",
        "",
        "| rollouts at once | transitions/s (median) | range |",
        "|---|---:|---:|",
        f"| 1 process, in-process (RolloutWorker.run) | {256 / sim_s:,.0f} | |",
    ]
    for n, xs in alone.items():
        med = statistics.median(xs)
        lines.append(f"| Ray, {n} | {med:,.0f} | {min(xs):,.0f} – {max(xs):,.0f} |")
    if len(alone) == 2:
        one, two = (statistics.median(alone[n]) for n in sorted(alone))
        lines += [
            "",
            f"Two rollouts at once deliver {two / one:.2f}x the experience of one (two vCPUs, the driver idle); "
            "a Ray rollout costs more than one in this process (the task, the weights and the result through "
            "the object store). Training gains nothing from that here: the rounds wait for the learner.",
        ]
    return lines


def wall_lines(args: argparse.Namespace, walls: dict[int, float]) -> list[str]:
    """The wall time of a whole training command, with and without actors."""
    lines: list[str] = []
    if walls:
        lines += [
            "",
            "## Wall time of a training run",
            "",
            f"`lbproxy --mode train --env sim --scenario generated --episodes {args.wall_episodes}` (the shipped "
            f"model's settings; its run is {SHIPPED_EPISODES} episodes), the whole command: start-up, Ray's "
            "included.",
            "",
            "| command | wall (s) | per 1000 episodes (s) |",
            "|---|---:|---:|",
        ]
        for n, wall in walls.items():
            name = "without actors" if n == 0 else f"`--actors {n}`"
            lines.append(f"| {name} | {wall:.1f} | {wall / args.wall_episodes * 1000:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=8, help="measured episodes per trainer and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wall-episodes", type=int, default=200, help="episodes of the timed commands (0: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ray = import_ray()
    load_before = os.getloadavg()[0]
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="ray_training_") as tmp_name:
        tmp = Path(tmp_name)
        ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
        try:
            rates, alone = throughput(args.episodes, args.rounds, tmp)
        finally:
            ray.shutdown()
        sim_s, learn_s = time_split(args.episodes * args.rounds, tmp)
        walls = {n: wall_run(args.wall_episodes, n, tmp) for n in (0, 2)} if args.wall_episodes else {}
    load_after = os.getloadavg()[0]
    lines = throughput_lines(args, argv, ray.__version__, started, (load_before, load_after), rates)
    lines += time_split_lines(args, sim_s, learn_s, alone)
    lines += wall_lines(args, walls)
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
