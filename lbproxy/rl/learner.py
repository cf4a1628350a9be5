"""The Double-DQN learner: online + target Q-networks, Adam, Huber loss, gradient clipping.

The update step follows CleanRL's `dqn.py` (target under no_grad, gather, loss, clip, step, target
sync) with two changes: Double DQN (van Hasselt et al. 2016: the online net picks argmax a', the
target net scores it), and an action mask on s' so that bootstrap never uses a backend that was
unavailable. `update` is called from the simulator loop or from the live proxy's learner thread;
it owns no thread of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lbproxy.observe import ERROR_PENALTY
from lbproxy.rl.action_selection import masked_argmax
from lbproxy.rl.network import QNetwork
from lbproxy.rl.replay import ReplaySamples

if TYPE_CHECKING:
    from lbproxy.config import Settings


@dataclass(slots=True)
class DqnConfig:
    """Hyper-parameters; defaults equal the Settings defaults (lbproxy/config.py), where each is explained."""

    gamma: float = 0.5
    """Discount. Small because routing is nearly a contextual bandit, not 0: a choice also decides the
    queue the next requests meet, and 0.5 beat 0 on the validation clusters (median p99 ratio 0.89 vs
    0.95, benchmarks/results/general_model.md). With gamma = 0 the update skips the bootstrap."""
    lr: float = 1e-3
    """Adam learning rate."""
    batch_size: int = 128
    """Minibatch size per update."""
    buffer_size: int = 100_000
    """Replay capacity (transitions)."""
    learning_starts: int = 1000
    """Transitions collected before the first update (CleanRL: learning_starts)."""
    updates_per_decision: float = 0.1
    """Gradient steps per routed decision (CleanRL's train_frequency=4 is 0.25; 0.1 learned as well on
    generated clusters at 2.5x fewer updates, so a 30-minute training budget covers more clusters)."""
    target_update_every: int = 500
    """Updates between hard target-network syncs."""
    hidden: int = 64
    """Hidden width of the Q-network's per-backend rows (rl/network.py)."""
    grad_clip: float = 10.0
    """Max global gradient norm (CleanRL/SB3 DQN use 10)."""
    eps_start: float = 1.0
    """Initial exploration rate."""
    eps_end: float = 0.02
    """Final exploration rate."""
    eps_fraction: float = 0.3
    """Share of the training decisions over which epsilon decays linearly (CleanRL: exploration_fraction)."""
    seed: int = 0
    """Seeds the network initialisation, replay sampling and exploration."""
    error_penalty: float = ERROR_PENALTY
    """Reward penalty for an error or timeout, in typical latencies (observe.reward); used by the
    agent, not by the update."""

    @classmethod
    def from_settings(cls, s: Settings) -> DqnConfig:
        """Same-named fields of Settings (one name everywhere: flag, env var, TOML key, config)."""
        return cls(**{f.name: getattr(s, f.name) for f in fields(cls)})


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as given."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Learner:
    """Online/target networks and their optimizer. Not thread-safe: one caller at a time (the live
    BackgroundLearner serialises `update` and `state_dict` with its own lock)."""

    def __init__(self, cfg: DqnConfig, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.device = resolve_device(device)
        # Seeded init without disturbing the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.online = QNetwork(cfg.hidden).to(self.device)
            self.target = QNetwork(cfg.hidden).to(self.device)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=cfg.lr)
        self.updates = 0

    @torch.no_grad()
    def td_target(self, batch: ReplaySamples) -> torch.Tensor:
        """r + gamma * Q_target(s', argmax_{valid a'} Q_online(s', a')), no bootstrap past a terminal
        s' or an s' without any valid action (every backend down)."""
        next_a = masked_argmax(self.online(batch.next_obs), batch.next_mask)
        next_q = self.target(batch.next_obs).gather(1, next_a.unsqueeze(1)).squeeze(1)
        bootstrap = (1.0 - batch.dones) * batch.next_mask.any(dim=1).float()
        target: torch.Tensor = batch.rewards + self.cfg.gamma * bootstrap * next_q
        return target

    def update(self, batch: ReplaySamples) -> float:
        """One gradient step on `batch`; returns the Huber TD loss (before the step). With gamma = 0
        (a contextual bandit) the target is the reward itself and s' is never evaluated: half the work."""
        td_target = self.td_target(batch) if self.cfg.gamma > 0.0 else batch.rewards
        q = self.online(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q, td_target)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        torch.nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.grad_clip)
        self.optimizer.step()

        self.updates += 1
        if self.updates % self.cfg.target_update_every == 0:
            self.target.load_state_dict(self.online.state_dict())
        return float(loss.item())

    # --- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors and primitives only (checkpoints load with weights_only=True). Keys: online,
        target, optimizer, updates, arch. The tensors are the live ones (as nn.Module.state_dict):
        deep-copy before handing them to another thread while updates continue."""
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
            "arch": self.online.arch(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        arch = state.get("arch")
        if arch is not None and dict(arch) != self.online.arch():
            raise ValueError(
                f"learner state is for network {dict(arch)}, this learner has {self.online.arch()}; "
                "use the same --hidden"
            )
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
