"""The Policy protocol that every balancing algorithm implements, heuristics and the DQN alike."""

from __future__ import annotations

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


@runtime_checkable
class AsyncPolicy(Protocol):
    """A policy whose decision may wait (the DQN's batched inference). The proxy awaits `decide`."""

    name: str

    async def decide(self, req_class: int, view: ClusterView, now_s: float) -> tuple[int, int]:
        """Returns (backend index, decision id); the id is passed back in `Outcome.decision_id`."""
        ...

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None: ...
