"""Experience replay: a preallocated ring buffer of (s, a, r, s', mask', done) in NumPy arrays.

Modelled on Stable-Baselines3's `ReplayBuffer` (common/buffers.py): fixed-size arrays allocated
once, a write position that wraps, and typed samples (`ReplaySamples`) converted to torch tensors
only at sample time. Unlike SB3 we also store the next state's action mask, because Double DQN's
argmax over s' must not pick a backend that was unavailable then.

Thread-safety: in live mode `add` runs on the event-loop thread while `sample` runs in the learner
thread. Both hold `self._lock` only for the row copy / the fancy-index gather (microseconds), so the
loop never waits on a gradient step, and a sample never sees a half-written row.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch


class ReplaySamples(NamedTuple):
    """One minibatch, as tensors on the learner's device."""

    obs: torch.Tensor  # (B, obs_dim) float32
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32
    next_obs: torch.Tensor  # (B, obs_dim) float32
    next_mask: torch.Tensor  # (B, n_actions) bool: valid actions in s'
    dones: torch.Tensor  # (B,) float32: 1.0 where s' is terminal (no bootstrap)


class TransitionBatch(NamedTuple):
    """k non-terminal transitions: rows of `obs` with their actions and rewards; `next_obs` and
    `next_mask` are k rows, or one row that all k share (the live join's s')."""

    obs: np.ndarray
    actions: Sequence[int]
    rewards: Sequence[float]
    next_obs: np.ndarray
    next_mask: np.ndarray


class ReplayBuffer:
    """Fixed-capacity FIFO of transitions; uniform sampling (with replacement, as SB3) over the
    rows written so far."""

    def __init__(self, capacity: int, obs_dim: int, n_actions: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_mask = np.zeros((capacity, n_actions), dtype=bool)
        self.dones = np.zeros(capacity, dtype=np.float32)
        self.pos = 0
        self.size = 0
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray,
        action: int,
        reward: float,
        next_obs: np.ndarray,
        next_mask: np.ndarray,
        done: bool = False,
    ) -> None:
        with self._lock:
            i = self.pos
            self.obs[i] = obs
            self.actions[i] = action
            self.rewards[i] = reward
            self.next_obs[i] = next_obs
            self.next_mask[i] = next_mask
            self.dones[i] = 1.0 if done else 0.0
            self.pos = (i + 1) % self.capacity
            if self.size < self.capacity:
                self.size += 1

    def add_batch(self, batch: TransitionBatch) -> None:
        """k transitions at once: slice writes under one lock (the live proxy adds a loop iteration's
        joined outcomes together; ~0.3 µs a row instead of ~1.5 µs for `add`)."""
        obs, actions, rewards, next_obs, next_mask = batch
        k = obs.shape[0]
        if k == 0:
            return
        drop = max(0, k - self.capacity)  # only the newest `capacity` rows would survive anyway
        if drop:
            obs, actions, rewards = obs[drop:], actions[drop:], rewards[drop:]
            if next_obs.ndim == 2:
                next_obs = next_obs[drop:]
            if next_mask.ndim == 2:
                next_mask = next_mask[drop:]
            k = self.capacity
        with self._lock:
            i = (self.pos + drop) % self.capacity
            first = min(k, self.capacity - i)  # rows before the ring wraps
            for lo, hi, dst in ((0, first, i), (first, k, 0)):
                if hi <= lo:
                    continue
                rows = slice(dst, dst + hi - lo)
                self.obs[rows] = obs[lo:hi]
                self.actions[rows] = actions[lo:hi]
                self.rewards[rows] = rewards[lo:hi]
                self.next_obs[rows] = next_obs if next_obs.ndim == 1 else next_obs[lo:hi]
                self.next_mask[rows] = next_mask if next_mask.ndim == 1 else next_mask[lo:hi]
                self.dones[rows] = 0.0
            self.pos = (i + k) % self.capacity
            self.size = min(self.capacity, self.size + k)

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> ReplaySamples:
        """Uniform minibatch over the rows written so far."""
        return self.gather(self.draw(batch_size), device)

    def draw(self, batch_size: int) -> np.ndarray:
        """`batch_size` uniform row indices in [0, size), with replacement."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer; add transitions first")
        with self._lock:
            return self._rng.integers(0, self.size, size=batch_size)

    def gather(self, idx: np.ndarray, device: torch.device | str = "cpu") -> ReplaySamples:
        """The rows `idx` as tensors on `device`. The gather (fancy indexing copies) happens under the
        lock; the tensor conversion and device transfer happen outside it."""
        with self._lock:
            obs = self.obs[idx]
            actions = self.actions[idx]
            rewards = self.rewards[idx]
            next_obs = self.next_obs[idx]
            next_mask = self.next_mask[idx]
            dones = self.dones[idx]
        dev = torch.device(device)
        return ReplaySamples(
            obs=torch.from_numpy(obs).to(dev),
            actions=torch.from_numpy(actions).to(dev),
            rewards=torch.from_numpy(rewards).to(dev),
            next_obs=torch.from_numpy(next_obs).to(dev),
            next_mask=torch.from_numpy(next_mask).to(dev),
            dones=torch.from_numpy(dones).to(dev),
        )

    # --- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Only the filled rows (a fresh buffer checkpoint stays small), the position and the RNG
        state; tensors and primitives only, so `torch.load(weights_only=True)` accepts it."""
        with self._lock:
            n = self.size
            return {
                "capacity": self.capacity,
                "obs_dim": self.obs_dim,
                "n_actions": self.n_actions,
                "pos": self.pos,
                "size": n,
                "obs": torch.from_numpy(self.obs[:n].copy()),
                "actions": torch.from_numpy(self.actions[:n].copy()),
                "rewards": torch.from_numpy(self.rewards[:n].copy()),
                "next_obs": torch.from_numpy(self.next_obs[:n].copy()),
                "next_mask": torch.from_numpy(self.next_mask[:n].copy()),
                "dones": torch.from_numpy(self.dones[:n].copy()),
                "rng": rng_state_to_primitives(self._rng),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (int(state["capacity"]), int(state["obs_dim"]), int(state["n_actions"]))
        if shape != (self.capacity, self.obs_dim, self.n_actions):
            raise ValueError(
                f"replay state has (capacity, obs_dim, n_actions) = {shape}, this buffer has "
                f"{(self.capacity, self.obs_dim, self.n_actions)}; create the buffer with the same settings"
            )
        n = int(state["size"])
        with self._lock:
            for name in ("obs", "actions", "rewards", "next_obs", "next_mask", "dones"):
                arr: np.ndarray = getattr(self, name)
                arr[:n] = _as_numpy(state[name])
                arr[n:] = 0
            self.size = n
            self.pos = int(state["pos"])
            rng_state_from_primitives(self._rng, state["rng"])


def _as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def rng_state_to_primitives(rng: np.random.Generator) -> dict[str, Any]:
    """A PCG64 generator's state as str/int only. Its 128-bit integers are stored as decimal
    strings: plain and safe for `weights_only=True` loading whatever the pickle int opcode."""
    st = rng.bit_generator.state
    return {
        "bit_generator": str(st["bit_generator"]),
        "state": str(st["state"]["state"]),
        "inc": str(st["state"]["inc"]),
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def rng_state_from_primitives(rng: np.random.Generator, st: dict[str, Any]) -> None:
    rng.bit_generator.state = {
        "bit_generator": st["bit_generator"],
        "state": {"state": int(st["state"]), "inc": int(st["inc"])},
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }
