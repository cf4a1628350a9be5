"""Balancing policies: the eight heuristic baselines and their registry (the Policy protocol they
implement is lbproxy/policy.py, re-exported here).

The DQN policy needs a network, a batcher and a learner, so it is built by
`lbproxy.policies.dqn_runtime.create_dqn_runtime`, not here.
"""

from __future__ import annotations

from collections.abc import Callable

from lbproxy.policies.c3 import C3
from lbproxy.policies.least_conn import LeastConn
from lbproxy.policies.p2c import PowerOfTwoChoices
from lbproxy.policies.peak_ewma import PeakEwma
from lbproxy.policies.prequal import Prequal
from lbproxy.policies.random_choice import RandomChoice
from lbproxy.policies.round_robin import RoundRobin
from lbproxy.policies.sed import ShortestExpectedDelay
from lbproxy.policy import AsyncPolicy, NoBackendAvailable, Policy

__all__ = [
    "C3",
    "HEURISTICS",
    "AsyncPolicy",
    "LeastConn",
    "NoBackendAvailable",
    "PeakEwma",
    "Policy",
    "PowerOfTwoChoices",
    "Prequal",
    "RandomChoice",
    "RoundRobin",
    "ShortestExpectedDelay",
    "make_policy",
]

_FACTORIES: dict[str, Callable[[int], Policy]] = {
    "round_robin": RoundRobin,
    "random": RandomChoice,
    "least_conn": LeastConn,
    "p2c": PowerOfTwoChoices,
    "peak_ewma": PeakEwma,
    "sed": ShortestExpectedDelay,
    "prequal": Prequal,
    "c3": C3,
}

HEURISTICS: tuple[str, ...] = ("round_robin", "random", "least_conn", "p2c", "peak_ewma", "sed", "prequal", "c3")
"""Every heuristic baseline, in the order evaluation tables list them."""


def make_policy(name: str, seed: int = 0) -> Policy:
    """A fresh heuristic policy; `seed` makes its random choices reproducible."""
    if name == "dqn":
        raise ValueError("the DQN policy is built by lbproxy.policies.dqn_runtime.create_dqn_runtime, not make_policy")
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(HEURISTICS)}")
    return factory(seed)
