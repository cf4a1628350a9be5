"""Where a failed or abandoned try is retried, and the per-try timeout's sweep (Envoy `per_try_timeout`).

The budget that bounds retries is lbproxy/retry.py; the forwarding loop that makes them is
lbproxy/proxy/forward.py. A first try that could be retried is registered here with its deadline;
one timer sweeps the registered tries in deadline order and abandons (cancels) those past it, after
choosing the backend of their retry and taking its budget slot, so an abandoned try always has its
retry (never a 504 for a request that was only slow).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from lbproxy.observe import ClusterView
from lbproxy.policy import NoBackendAvailable, Policy
from lbproxy.proxy.errors import UNSENT
from lbproxy.retry import RetryBudget
from lbproxy.telemetry import Metrics
from lbproxy.upstream import PoolConfig

SLOT_WAIT_S = 1.0
"""How long a request whose try was cut off (the backend reset or closed the connection, e.g. it was
killed) waits for a retry-budget slot when every slot is taken, instead of being answered 502 at once.
A killed backend cuts off all the requests it held in the same instant; the budget's floor (3 slots)
is often fewer, and each slot frees as soon as its retry is answered (milliseconds), so the others
wait their turn and are retried too. The budget still bounds how many retries run at once; in a
cluster-wide failure a request gives up after this wait."""


class RetrySweep:
    """Retry targets within the `RetryBudget`, and the deadline-ordered sweep of watched first tries.

    The forwarder pops a finished try from `first_tries` and `awaiting_budget` itself: that runs on
    every watched request, where a method call would cost more than the two dict operations."""

    def __init__(
        self,
        view: ClusterView,
        sync_policy: Policy | None,
        metrics: Metrics,
        config: PoolConfig,
        active: Callable[[], int],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.view = view
        self._sync_policy = sync_policy
        """The policy when it chooses synchronously; None for an async one (least-loaded other instead)."""
        self.metrics = metrics
        self._active = active
        """Requests in progress (the budget is a share of them)."""
        self.loop = loop
        self.budget = RetryBudget(config.retry_budget_percent, config.retry_min_concurrency)
        self.per_try_timeout_s = config.per_try_timeout_s
        self.abandoned: dict[asyncio.Task[Any], int] = {}
        """Handler tasks whose first try the sweep cancelled (told apart from any other cancel), with
        the backend their retry goes to: chosen, and its budget slot taken, before the cancel."""
        self.first_tries: dict[asyncio.Task[Any], tuple[float, int, int]] = {}
        """First tries under the per-try timeout: handler task -> (deadline, backend, class). Insertion order is
        deadline order (one timeout for all), so a sweep stops at the first one not yet due: no timer
        per request (a call_later and its cancel cost ~2 µs, paid by every GET)."""
        self.awaiting_budget: dict[asyncio.Task[Any], tuple[int, int]] = {}
        """First tries past their deadline that found no retry (no budget slot, no other candidate yet):
        offered a retry again on every sweep until they end, so a hung backend's requests are not left
        to the read timeout just because many expired at once."""
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        """Cut-off requests waiting for a retry-budget slot (`retry_when_allowed`), oldest first."""
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every_s = min(0.25, max(0.01, self.per_try_timeout_s / 10))

    # --- retry targets ------------------------------------------------------------------------------
    def _choose_other(self, failed: int, cls: int, now: float) -> int | None:
        """Retry target: the policy's choice with the failed backend masked out (Envoy's
        previous_hosts retry predicate); async policies get the least-loaded other candidate."""
        view = self.view
        saved = view.candidates
        others = [i for i in saved if i != failed]
        if not others:
            return None
        if self._sync_policy is not None:
            view.candidates = others
            try:
                idx = int(self._sync_policy.choose(cls, view, now))
            except NoBackendAvailable:
                return None
            finally:
                view.candidates = saved
            return idx if idx in others else others[0]
        return min(others, key=lambda i: view.in_flight[i] / max(view.capacity[i], 1e-9))

    def retry_to(self, failed: int, cls: int, kind: str) -> int | None:
        """Where to retry a request that failed on `failed`, if anywhere: another backend (the same one
        only after a stale keep-alive disconnect), and only with a slot in the retry budget (unless
        nothing was sent: `UNSENT`)."""
        budgeted = kind not in UNSENT
        if budgeted and not self.budget.allows(self._active()):
            return None
        other = self._choose_other(failed, cls, self.loop.time())
        if other is None and kind == "disconnect":
            # A keep-alive connection the backend closed as we reused it: with no other backend, the
            # same one on a fresh connection is the safe retry.
            other = failed
        if other is None or (budgeted and not self.budget.try_acquire(self._active())):
            return None
        self.metrics.retries.inc()
        return other

    async def retry_when_allowed(self, failed: int, cls: int, kind: str) -> int | None:
        """`retry_to`, waiting up to SLOT_WAIT_S for a budget slot when the budget alone stands in the
        way (never when there is no other backend): for tries cut off mid-exchange, which have no
        answer to relay."""
        deadline: float | None = None
        while True:
            other = self.retry_to(failed, cls, kind)
            if other is not None or kind in UNSENT or self.budget.allows(self._active()):
                return other  # a retry, or none for want of another backend
            now = self.loop.time()
            if deadline is None:
                deadline = now + SLOT_WAIT_S
            if now >= deadline:
                return None
            slot = self.loop.create_future()
            self._slot_waiters.append(slot)
            try:
                async with asyncio.timeout(deadline - now):
                    await slot
            except TimeoutError:
                self._pass_on(slot)
                return None
            except asyncio.CancelledError:  # the client went away
                self._pass_on(slot)
                raise
            finally:
                if not slot.done():
                    slot.cancel()
                if slot.cancelled():  # never woken (woken ones left the queue in _wake_one)
                    with contextlib.suppress(ValueError):
                        self._slot_waiters.remove(slot)  # a handful at most: cut-off requests waiting now

    def release(self) -> None:
        """A retry ended: its budget slot goes back, and the longest-waiting cut-off request may take it."""
        self.budget.release()
        self._wake_one()

    def _pass_on(self, slot: asyncio.Future[None]) -> None:
        """A waiter woken in the same instant it gave up hands its wake-up to the next one."""
        if slot.done() and not slot.cancelled():
            self._wake_one()

    def _wake_one(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            slot = waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return

    # --- the per-try timeout ------------------------------------------------------------------------
    def watch(self, task: asyncio.Task[Any], now: float, idx: int, cls: int) -> None:
        """Put the first try `task` is making (to backend `idx`) under the per-try timeout."""
        self.first_tries[task] = (now + self.per_try_timeout_s, idx, cls)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep)

    def abandoned_retry(self, task: asyncio.Task[Any]) -> int | None:
        """The retry backend of `task`, cancelled now, if the sweep abandoned its try and nobody else
        cancelled it too (then the budget slot goes back and the cancel must go through)."""
        other = self.abandoned.pop(task, None)
        if other is not None and task.uncancel():
            self.release()
            return None
        return other

    def _sweep(self) -> None:
        """Expire the first tries past their deadline (to within `_sweep_every_s`), oldest first."""
        self._sweeper = None
        now = self.loop.time()
        waiting = self.awaiting_budget
        for task, (idx, cls) in list(waiting.items()):
            if self._expired(task, idx, cls):
                del waiting[task]
        tries = self.first_tries
        while tries:
            task = next(iter(tries))
            deadline, idx, cls = tries[task]
            if deadline > now:
                break
            del tries[task]
            if not self._expired(task, idx, cls):
                waiting[task] = (idx, cls)
        if tries or waiting:
            self._sweeper = self.loop.call_later(self._sweep_every_s, self._sweep)

    def _expired(self, task: asyncio.Task[Any], idx: int, cls: int) -> bool:
        """A first try outlived the per-try timeout: abandon it if its retry can happen now (another
        candidate, room in the budget: both taken here) and say so; if not, the sweep offers it again."""
        if not any(i != idx for i in self.view.candidates):
            return False
        other = self.retry_to(idx, cls, "per_try_timeout")
        if other is None:
            return False
        self.abandoned[task] = other
        task.cancel()
        return True

    def close(self) -> None:
        """Stop the sweep (the server is closing; handlers still running finish on their own)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
