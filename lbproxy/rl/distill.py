"""`lbproxy distill OUT MODEL... [--init MODEL]`: one narrow network that routes like a wide one.

Why: the mean of two trained models (`lbproxy average`, rl/ensemble.py) routes better than either,
but it is twice as wide, and every live decision pays for that. Two benchmarks/dqn_proxy.py runs in
the same hour: greedy dqn at 0.87x round robin's throughput with hidden 64, 0.78x with the mean's
hidden 128. Distillation keeps about the mean's routing at the narrow network's cost
(benchmarks/results/general_model/distilled/). The student is trained to reproduce the teacher's
Q-values (policy distillation, Rusu et al. 2016) on the states the teacher routes, then on the states
the student itself routes, labelled by the teacher (DAgger, Ross et al. 2011). A student that only
sees the teacher's states drifts into states the teacher never visits and has no labels there.

- States: training episodes on generated clusters of split "train" (sim/suite.training_set). These
  are the clusters training itself draws from, never the validation or evaluation ones. Each state
  is routed greedily by the round's router, with `eps` of the decisions random so that states just
  off that router's path are covered too.
- Loss, over a state's candidate rows only: the squared error of the Q-values centred on their
  candidate mean, which is all the greedy choice depends on, plus `MEAN_WEIGHT` times the squared
  error of that mean, which online TD learning (`--online`) continues from.
- Deterministic for a given (teacher, init, settings): seeded state collection, seeded batch order,
  one torch thread.

The result is a plain QNetwork model file. It is served, evaluated, learns online and checkpoints
like any other.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lbproxy.observe import ClusterView, Outcome, encode_state
from lbproxy.policy import NoBackendAvailable
from lbproxy.rl.agent import greedy_action
from lbproxy.rl.network import NumpyWeights, QNetwork

EXIT_USAGE = 2
MEAN_WEIGHT = 0.1
"""Weight of the candidate-mean term: small, because the choice depends only on the centred part."""
HELD_OUT_SHARE = 0.05
"""Share of the first round's states kept out of training, to report agreement on states not fitted."""
LABEL_CHUNK = 4096


@dataclass(frozen=True)
class DistillConfig:
    """Defaults: the shipped model's settings (chosen on the validation clusters among shorter runs)."""

    episodes: int = 1500
    """Training episodes whose states each round collects (256 decisions each)."""
    dagger: int = 2
    """Rounds after the first that add the student's own states, labelled by the teacher."""
    epochs: int = 6
    lr: float = 1e-3
    batch_size: int = 512
    eps: float = 0.1
    seed: int = 8
    episode_decisions: int = 256
    error_penalty: float = 50.0


class StateRecorder:
    """A simulator Policy that routes by `weights` (greedy, `eps` random) and keeps every state it
    decides on, with the candidate mask."""

    name = "dqn"

    def __init__(self, weights: NumpyWeights, width: int, eps: float, rng: np.random.Generator) -> None:
        self.weights = weights
        self.width = width
        self.eps = eps
        self.rng = rng
        self.states: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        cands = view.candidates
        if not cands:
            raise NoBackendAvailable("no backend is available")
        state = encode_state(view, req_class, now_s, self.width)
        mask = np.zeros(self.width, dtype=bool)
        mask[list(cands)] = True
        self.states.append(state)
        self.masks.append(mask)
        if self.rng.random() < self.eps:
            return cands[int(self.rng.integers(len(cands)))]
        return greedy_action(self.weights, state, view)

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        """Routing only: nothing is learned from outcomes."""


def collect_states(
    router: QNetwork, cfg: DistillConfig, first_episode: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(states, candidate masks) of `cfg.episodes` training episodes from `first_episode`, routed by `router`."""
    from lbproxy.sim.episode import run_episode
    from lbproxy.sim.generator import GENERATED
    from lbproxy.sim.suite import train_sim_seed, training_set

    train_set = training_set(GENERATED, cfg.seed)
    recorder = StateRecorder(NumpyWeights.from_state_dict(router.state_dict()), train_set.width, cfg.eps, rng)
    for ep in range(first_episode, first_episode + cfg.episodes):
        run_episode(
            lambda _sim: recorder,
            train_set.scenario(ep),
            train_sim_seed(cfg.seed, ep),
            0,
            cfg.episode_decisions,
            error_penalty=cfg.error_penalty,
        )
    return np.stack(recorder.states), np.stack(recorder.masks)


def distill_loss(q: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error of the candidate-centred Q-values plus MEAN_WEIGHT x that of the candidate mean."""
    m = mask.to(q.dtype)
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    q_mean = (q * m).sum(dim=1, keepdim=True) / count
    t_mean = (target * m).sum(dim=1, keepdim=True) / count
    centred = (((q - q_mean) - (target - t_mean)) ** 2 * m).sum() / m.sum().clamp_min(1.0)
    return centred + MEAN_WEIGHT * ((q_mean - t_mean) ** 2).mean()


@dataclass(frozen=True)
class Agreement:
    """How the student's choices compare with the teacher's on a set of states."""

    same_choice: float
    """Share of states where both pick the same backend."""
    regret: float
    """Mean teacher Q of the teacher's choice minus that of the student's (0 = same value)."""


def agreement(student: QNetwork, target: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor) -> Agreement:
    with torch.no_grad():
        q = _forward(student, obs).masked_fill(~mask, -math.inf)
    t = target.masked_fill(~mask, -math.inf)
    pick = q.argmax(dim=1)
    best = t.max(dim=1).values
    regret = (best - t.gather(1, pick[:, None])[:, 0]).mean().item()
    return Agreement(float((pick == t.argmax(dim=1)).float().mean().item()), float(regret))


def _forward(net: QNetwork, obs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(obs[i : i + LABEL_CHUNK]) for i in range(0, obs.shape[0], LABEL_CHUNK)])


def fit(
    student: QNetwork,
    obs: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    cfg: DistillConfig,
    round_index: int,
    progress: Callable[[str], None],
) -> None:
    """`cfg.epochs` passes of Adam over the states in a seeded order, the rate annealed to 0 (cosine)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + round_index)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    steps_per_epoch = max(1, obs.shape[0] // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    student.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(obs.shape[0], generator=g)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            loss = distill_loss(student(obs[idx]), target[idx], mask[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            opt.step()
            sched.step()
            total += loss.item()
        progress(f"round {round_index + 1} epoch {epoch + 1}/{cfg.epochs}: loss {total / steps_per_epoch:.4f}")
    student.eval()


def distill(
    teacher: QNetwork, student: QNetwork, cfg: DistillConfig, progress: Callable[[str], None]
) -> dict[str, float | int]:
    """Train `student` in place to route like `teacher`; returns what the model's metadata records."""
    rng = np.random.default_rng(cfg.seed)
    teacher.eval()
    obs_np, mask_np = collect_states(teacher, cfg, 0, rng)
    held = max(1, int(HELD_OUT_SHARE * obs_np.shape[0]))
    perm = rng.permutation(obs_np.shape[0])
    held_obs, held_mask = torch.from_numpy(obs_np[perm[:held]]), torch.from_numpy(mask_np[perm[:held]])
    obs, mask = torch.from_numpy(obs_np[perm[held:]]), torch.from_numpy(mask_np[perm[held:]])
    held_target = _forward(teacher, held_obs)
    before = agreement(student, held_target, held_obs, held_mask)
    progress(
        f"{obs.shape[0]} states of the teacher; held-out states before: same choice {before.same_choice:.3f}, "
        f"regret {before.regret:.4f}"
    )
    target = _forward(teacher, obs)
    for r in range(cfg.dagger + 1):
        if r:
            more_obs, more_mask = collect_states(student, cfg, r * cfg.episodes, rng)
            more = torch.from_numpy(more_obs)
            obs, mask = torch.cat([obs, more]), torch.cat([mask, torch.from_numpy(more_mask)])
            target = torch.cat([target, _forward(teacher, more)])
            progress(f"round {r + 1}: {more.shape[0]} states of the student added, {obs.shape[0]} in all")
        fit(student, obs, target, mask, cfg, r, progress)
        after = agreement(student, held_target, held_obs, held_mask)
        progress(f"round {r + 1}: held-out states: same choice {after.same_choice:.3f}, regret {after.regret:.4f}")
    return {
        "states": int(obs.shape[0]),
        "held_out_states": held,
        "same_choice_before": before.same_choice,
        "same_choice": after.same_choice,
        "regret_before": before.regret,
        "regret": after.regret,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from lbproxy.rl.checkpoint import CheckpointError, save_model
    from lbproxy.rl.ensemble import average_networks, load_member

    d = DistillConfig()
    parser = argparse.ArgumentParser(
        prog="lbproxy distill",
        description="Write a network of --hidden width trained to route like MODEL (or like the mean of "
        "several, as `lbproxy average` builds it): the wide model's choices at the narrow model's cost. "
        "States come from simulated training clusters; about ten minutes on one core with the defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="model file to write (e.g. runs/distilled/dqn_final.pth)")
    parser.add_argument("models", type=Path, nargs="+", help="the teacher: one model, or several to average")
    parser.add_argument(
        "--init", type=Path, help="start the student from this model (e.g. one of the averaged ones); its width wins"
    )
    parser.add_argument("--hidden", type=int, default=64, help="student width without --init")
    parser.add_argument("--episodes", type=int, default=d.episodes, help="episodes of states per round")
    parser.add_argument("--dagger", type=int, default=d.dagger, help="rounds that add the student's own states")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over the states per round")
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    parser.add_argument("--eps", type=float, default=d.eps, help="share of random decisions while collecting")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds the clusters, the collection and the batches")
    args = parser.parse_args(list(argv) if argv is not None else None)
    problems = [
        f"--{name} must be at least {low}"
        for name, low in (("episodes", 1), ("dagger", 0), ("epochs", 1), ("hidden", 1))
        if getattr(args, name) < low
    ]
    if not 0.0 <= args.eps <= 1.0 or not args.lr > 0.0:
        problems.append("--eps must be in [0, 1] and --lr above 0")
    if problems:
        print(f"lbproxy distill: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_USAGE
    torch.set_num_threads(1)  # deterministic, and a single core is what the work can use
    try:
        teachers = [load_member(path)[0] for path in args.models]
        teacher = teachers[0] if len(teachers) == 1 else average_networks(teachers)
        if args.init is not None:
            student = load_member(args.init)[0]
        else:
            torch.manual_seed(args.seed)
            student = QNetwork(args.hidden)
    except (CheckpointError, ValueError) as exc:
        print(f"lbproxy distill: {exc}", file=sys.stderr)
        return EXIT_USAGE
    cfg = DistillConfig(
        episodes=args.episodes, dagger=args.dagger, epochs=args.epochs, lr=args.lr, eps=args.eps, seed=args.seed
    )
    t0 = time.perf_counter()

    def progress(line: str) -> None:
        print(f"lbproxy distill: [{time.perf_counter() - t0:5.0f} s] {line}", file=sys.stderr, flush=True)

    progress(
        f"teacher hidden {teacher.hidden} -> student hidden {student.hidden}, {cfg.episodes} episodes x "
        f"{cfg.dagger + 1} round(s)"
    )
    result = distill(teacher, student, cfg, progress)
    meta = {
        "trained_by": "lbproxy distill",
        "teacher": [str(p) for p in args.models],
        "init": str(args.init) if args.init is not None else None,
        "settings": asdict(cfg),
        **result,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(args.out, student, meta)
    print(
        f"lbproxy distill: wrote {args.out} (hidden {student.hidden}; on held-out states, regret against the "
        f"teacher {result['regret']:.4f}, was {result['regret_before']:.4f}; same choice "
        f"{100 * result['same_choice']:.1f} %, was {100 * result['same_choice_before']:.1f} %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
