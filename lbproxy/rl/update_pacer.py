"""How many learner updates are owed: one rule for every learner loop (simulator agent, learner
thread, learner process).

`ratio` updates per transition fed (`updates_per_decision`), counted from the moment the replay holds
`learning_starts` transitions: what came in before is warm-up and earns nothing. Integer accounting
(`int(fed * ratio)` less the updates run and those forgiven), so the count never drifts. At most
`max_debt` are owed at once: after a burst, or while a live learner was starved of CPU, the rest is
forgiven rather than run back to back on stale data.
"""

from __future__ import annotations

MAX_UPDATE_DEBT = 32
"""Updates the learner may owe before the debt is forgiven (the simulator, which updates right after
each transition, never gets near it)."""


class UpdatePacer:
    """The update debt of one learner. `owed(fed, replay_size)` then, per update run, `ran()`.

    Threading (the live learner thread): `fed` is the loop thread's counter, read by the caller BEFORE
    the replay size, so every transition counted as fed while the replay was short of
    `learning_starts` is warm-up; `consumed` and `forgiven` are written by the learner only.
    """

    __slots__ = ("consumed", "forgiven", "learning_starts", "max_debt", "ratio")

    def __init__(
        self,
        ratio: float,
        learning_starts: int,
        *,
        batch_size: int,
        capacity: int,
        max_debt: int = MAX_UPDATE_DEBT,
    ) -> None:
        self.ratio = ratio
        # At least one minibatch before sampling; never more than the buffer holds (it would never start).
        self.learning_starts = max(1, min(max(learning_starts, batch_size), capacity))
        self.max_debt = max_debt
        self.consumed = 0
        self.forgiven = 0

    def owed(self, fed: int, replay_size: int) -> int:
        """Updates to run now, given `fed` transitions so far and the replay's size."""
        earned = int(fed * self.ratio) - self.consumed
        if replay_size < self.learning_starts:
            self.forgiven = max(self.forgiven, earned)  # warm-up earns nothing
            return 0
        owed = earned - self.forgiven
        if owed > self.max_debt:
            self.forgiven += owed - self.max_debt
            owed = self.max_debt
        return owed

    def ran(self) -> None:
        self.consumed += 1

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed, "forgiven": self.forgiven}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
        self.forgiven = int(state["forgiven"])
