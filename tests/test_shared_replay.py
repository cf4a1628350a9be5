"""The learner process's shared memory (lbproxy/rl/shared_replay.py): each producer writes its own
segment and a successor picks it up where it was left; the learner samples the filled rows of every
segment uniformly and nothing else."""

from __future__ import annotations

import numpy as np

from lbproxy.rl.replay import ReplayBuffer, TransitionBatch
from lbproxy.rl.shared_replay import S_FED, S_POS, S_SIZE, Attachment, Layout, SegmentedReplay, Shm, attach_segment


def _batch(rewards: list[float], obs_dim: int = 3, n_actions: int = 2) -> TransitionBatch:
    k = len(rewards)
    obs = np.zeros((k, obs_dim), np.float32)
    return TransitionBatch(obs, [0] * k, rewards, np.zeros(obs_dim, np.float32), np.ones(n_actions, bool))


def _feed(replay: ReplayBuffer, shm: Shm, slot: int, rewards: list[float]) -> None:
    """What a ProcessLearner's add_transitions does for its slot."""
    replay.add_batch(_batch(rewards))
    row = shm.arrays["slots"][slot]
    row[S_POS], row[S_SIZE], row[S_FED] = replay.pos, replay.size, row[S_FED] + len(rewards)


def test_segments_are_sampled_uniformly_over_their_filled_rows_only() -> None:
    layout = Layout(n_slots=3, slot_capacity=4, obs_dim=3, n_actions=2, n_params=5)
    owner = Shm(layout.specs())
    try:
        producers = [ReplayBuffer(4, 3, 2) for _ in range(3)]
        for slot, r in enumerate(producers):
            attach_segment(r, owner, slot)
        _feed(producers[0], owner, 0, [1.0, 2.0, 3.0, 4.0, 5.0])  # wrapped: 2, 3, 4, 5 are left
        _feed(producers[2], owner, 2, [30.0, 31.0])  # slot 1 never fed
        learner = SegmentedReplay(owner, layout, seed=0)
        assert learner.size() == 6
        drawn = learner.sample(6000, "cpu").rewards.numpy()
        values, counts = np.unique(drawn, return_counts=True)
        assert values.tolist() == [2.0, 3.0, 4.0, 5.0, 30.0, 31.0]
        assert counts.min() > 850  # ~1000 each
    finally:
        owner.close()


def test_a_successor_writes_on_where_its_slot_was_left() -> None:
    layout = Layout(n_slots=2, slot_capacity=4, obs_dim=3, n_actions=2, n_params=5)
    owner = Shm(layout.specs())
    try:
        first = ReplayBuffer(4, 3, 2)
        attach_segment(first, owner, 1)
        _feed(first, owner, 1, [1.0, 2.0, 3.0])
        attach = Attachment.from_json(Attachment(owner.names, layout, 1).to_json())
        seen = Shm(attach.layout.specs(), attach.names)  # this process: the owner's resource tracker
        successor = ReplayBuffer(4, 3, 2)
        assert attach_segment(successor, seen, attach.slot) == 3  # its fed count goes on from here
        assert (successor.size, successor.pos) == (3, 3)
        _feed(successor, seen, 1, [4.0, 5.0])
        assert owner.arrays["rewards"][1].tolist() == [5.0, 2.0, 3.0, 4.0]
        assert owner.arrays["slots"][1][S_FED] == 5 and not owner.arrays["rewards"][0].any()
        seen.close()
    finally:
        owner.close()
