"""The Policy protocol that every balancing algorithm implements, heuristics and the DQN alike.

It sits below the algorithms (lbproxy/policies/), the learning code (lbproxy/rl/) and the simulator
(lbproxy/sim/), which all meet through it: nothing here imports any of them."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

from lbproxy.observe import ClusterView, Outcome


class NoBackendAvailable(RuntimeError):
    """Raised by a policy when `view.candidates` is empty (the proxy answers 503)."""


@runtime_checkable
class Policy(Protocol):
    """Chooses a backend slot for one request.

    `choose` is synchronous on purpose: heuristics answer in well under a microsecond, and wrapping
    them in a coroutine would cost more than the decision (DESIGN.md says "awaitable"; only the DQN
    needs that, see `AsyncPolicy`). A policy must return an index from `view.candidates`; `now_s` is
    the caller's clock (loop time live, simulated time in the simulator).
    """

    name: str

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int: ...

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None: ...


Decision = tuple[int, int]
"""(backend index, decision id); the id comes back in `Outcome.decision_id` (-1: none)."""


@runtime_checkable
class AsyncPolicy(Protocol):
    """A policy whose decision may have to wait (the DQN's off-loop inference on a GPU).

    `decide` returns the `Decision` itself when it has it without waiting, else an awaitable of it;
    callers await only the latter (`resolve` does that). On the DQN's inline CPU path nearly every decision is
    answered at once, and a coroutine per request would cost more than the rest of the decision.
    """

    name: str

    def decide(self, req_class: int, view: ClusterView, now_s: float) -> Decision | Awaitable[Decision]: ...

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None: ...


async def resolve(decision: Decision | Awaitable[Decision]) -> Decision:
    """The decision an `AsyncPolicy.decide` call gave, waiting for it if it has to."""
    return decision if isinstance(decision, tuple) else await decision
