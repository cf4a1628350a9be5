"""The update pacer every learner loop uses (rl/update_pacer.py)."""

from __future__ import annotations

from lbproxy.rl.update_pacer import UpdatePacer


def run(pacer: UpdatePacer, fed: int, replay_size: int) -> int:
    """What a learner loop does: run what is owed, one update at a time."""
    n = 0
    while pacer.owed(fed, replay_size) > 0:
        pacer.ran()
        n += 1
    return n


def test_ratio_is_exact_and_warm_up_earns_nothing() -> None:
    pacer = UpdatePacer(0.1, 50, batch_size=8, capacity=1000)
    updates = [run(pacer, fed, min(fed, 1000)) for fed in range(1, 251)]
    assert sum(updates[:49]) == 0, "below learning_starts"
    # From the 50th transition on, one update per 10 transitions fed, with no float drift: 250 // 10 - 4.
    assert sum(updates) == 21 and set(updates) == {0, 1}
    assert [i + 1 for i, u in enumerate(updates) if u] == list(range(50, 251, 10))


def test_debt_beyond_the_cap_is_forgiven() -> None:
    pacer = UpdatePacer(1.0, 10, batch_size=1, capacity=100, max_debt=32)
    assert run(pacer, 9, 9) == 0
    assert run(pacer, 10, 10) == 1
    assert run(pacer, 1010, 100) == 32, "a burst of 1000 transitions owes 32 updates, not 1000"
    assert run(pacer, 1015, 100) == 5
    state = pacer.state_dict()
    again = UpdatePacer(1.0, 10, batch_size=1, capacity=100)
    again.load_state_dict(state)
    assert run(again, 1020, 100) == run(pacer, 1020, 100) == 5


def test_learning_starts_after_one_batch_and_within_the_buffer() -> None:
    assert UpdatePacer(0.1, 0, batch_size=128, capacity=10_000).learning_starts == 128
    assert UpdatePacer(0.1, 5000, batch_size=128, capacity=1000).learning_starts == 1000
    assert UpdatePacer(0.1, 0, batch_size=0, capacity=10).learning_starts == 1
