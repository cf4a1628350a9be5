"""Retry limits: Envoy's retry budget and per-try timeout, as pure state the forwarder consults.

The forwarder (lbproxy/proxy/forward.py) retries an idempotent request without a body once, on another
backend, after a connect error, a stale keep-alive disconnect, a 5xx response (Envoy `retry_on: 5xx`)
or a per-try timeout. Every retry must first get a slot from the `RetryBudget`, so that when a whole
cluster fails, retries add at most `budget_percent` to the load instead of doubling it.

(A top-level module rather than lbproxy/proxy/: `PoolConfig` and `Settings` take their defaults from
here, and importing anything under lbproxy.proxy loads the whole data plane, which imports them.)
"""

from __future__ import annotations

RETRY_BUDGET_PERCENT = 20.0
"""Envoy `retry_budget.budget_percent` default: concurrent retries up to 20 % of active requests."""
RETRY_MIN_CONCURRENCY = 3
"""Envoy `retry_budget.min_retry_concurrency` default: 3 concurrent retries are always allowed, so a
lightly loaded proxy still retries (20 % of 2 active requests would be none)."""
PER_TRY_TIMEOUT_S = 5.0
"""Envoy has no per-try timeout by default (the route's 15 s covers all tries). Without one, every
request a hung backend holds waits out the 30 s read timeout before its retry; 5 s is far beyond a
normal response of the web applications this proxy fronts (the emulated heavy class: 50 ms) and
leaves room for the retry inside the read timeout. It bounds only the wait for the response head of a
first try that could be retried; 0 disables."""


class RetryBudget:
    """Envoy's retry budget: a retry may start while active retries < max(min_concurrency,
    budget_percent % of active requests). `try_acquire` takes a slot, `release` gives it back."""

    __slots__ = ("active", "budget_percent", "min_concurrency")

    def __init__(
        self, budget_percent: float = RETRY_BUDGET_PERCENT, min_concurrency: int = RETRY_MIN_CONCURRENCY
    ) -> None:
        self.budget_percent = budget_percent
        self.min_concurrency = min_concurrency
        self.active = 0
        """Retries in progress."""

    def allows(self, active_requests: int) -> bool:
        limit = self.budget_percent * active_requests / 100.0
        return self.active < (limit if limit > self.min_concurrency else self.min_concurrency)

    def try_acquire(self, active_requests: int) -> bool:
        """Take a retry slot if the budget allows one with `active_requests` requests in progress."""
        if self.allows(active_requests):
            self.active += 1
            return True
        return False

    def release(self) -> None:
        if self.active > 0:
            self.active -= 1
