"""The DQN core: replay ring, Double-DQN learner, checkpoints and the simulator agent (CPU, real
torch, real files; no mocks)."""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import torch
from nets import column_net

from lbproxy.config import Settings
from lbproxy.observe import F_LOG_IN_FLIGHT, F_VALID, ROW_FEATURES, ClusterView, Outcome, encode_state, feature_dim
from lbproxy.policies.dqn_parts import epsilon_schedule
from lbproxy.policy import NoBackendAvailable, Policy
from lbproxy.rl.action_selection import masked_argmax
from lbproxy.rl.agent import DqnAgent, GreedyDqn
from lbproxy.rl.checkpoint import (
    MODEL_FORMAT,
    CheckpointError,
    default_model_path,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from lbproxy.rl.learner import DqnConfig, Learner, resolve_device
from lbproxy.rl.network import NumpyWeights, QNetwork, numpy_q
from lbproxy.rl.replay import ReplayBuffer, ReplaySamples, TransitionBatch
from lbproxy.rl.schedule import EpsilonSchedule

N_ACTIONS = 16
OBS_DIM = feature_dim(N_ACTIONS)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny networks gain nothing from intra-op threads, and on a busy 2-core machine torch's OpenMP
    threads spin against other processes: measured here, the bandit test took 0.9 s with one thread
    and up to 22 s with two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(**kw: object) -> DqnConfig:
    """Small and fast: the tests check behaviour, not the production sizes."""
    base: dict[str, object] = {
        "hidden": 32,
        "batch_size": 32,
        "learning_starts": 64,
        "updates_per_decision": 0.5,
        "target_update_every": 50,
        "eps_fraction": 0.5,
        "lr": 3e-3,
    }
    base.update(kw)
    return DqnConfig(**base)  # type: ignore[arg-type]


def fill(buf: ReplayBuffer, start: int, count: int) -> None:
    """Row k has obs = k everywhere, action k % n, reward k, next_obs = k + 0.5, mask bit k % n."""
    for k in range(start, start + count):
        mask = np.zeros(buf.n_actions, dtype=bool)
        mask[k % buf.n_actions] = True
        obs = np.full(buf.obs_dim, float(k), np.float32)
        buf.add(obs, k % buf.n_actions, float(k), obs + 0.5, mask, done=k % 2 == 0)


# --- replay --------------------------------------------------------------------------------------
def test_replay_ring_wraps_and_samples_only_written_rows() -> None:
    buf = ReplayBuffer(5, obs_dim=3, n_actions=4, seed=1)
    fill(buf, 0, 3)
    assert len(buf) == 3
    s = buf.sample(200)
    assert set(s.rewards.tolist()) <= {0.0, 1.0, 2.0}  # never the zero-filled rows 3, 4
    fill(buf, 3, 4)  # 7 rows into capacity 5: rows 0 and 1 are overwritten
    assert len(buf) == 5 and buf.pos == 2
    s = buf.sample(500)
    assert set(s.rewards.tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}
    # every field of a sampled row belongs to the same transition
    k = s.rewards.long()
    assert torch.equal(s.obs[:, 0], s.rewards) and torch.equal(s.next_obs[:, 1], s.rewards + 0.5)
    assert torch.equal(s.actions, k % 4)
    assert torch.equal(s.next_mask.float().argmax(dim=1), k % 4)
    assert torch.equal(s.dones, (k % 2 == 0).float())
    assert s.obs.dtype == torch.float32 and s.actions.dtype == torch.int64 and s.next_mask.dtype == torch.bool


def test_replay_add_batch_matches_row_by_row_adds_across_the_wrap() -> None:
    """`add_batch` (the live join: one shared s' row, or one per transition) leaves the ring exactly as
    the same transitions added one by one would, wrapping included, and keeps only the newest rows
    of a batch larger than the buffer."""
    rng = np.random.default_rng(3)
    one, batch = ReplayBuffer(7, obs_dim=3, n_actions=4), ReplayBuffer(7, obs_dim=3, n_actions=4)
    for k, shared in ((4, True), (5, False), (2, True), (9, False)):  # 4 + 5 wraps; 9 > capacity
        obs = rng.random((k, 3), dtype=np.float32)
        actions = rng.integers(0, 4, k).tolist()
        rewards = rng.random(k).tolist()
        next_obs = rng.random(3, dtype=np.float32) if shared else rng.random((k, 3), dtype=np.float32)
        next_mask = rng.random(4) < 0.5 if shared else rng.random((k, 4)) < 0.5
        for i in range(k):
            nxt, nmask = (next_obs, next_mask) if shared else (next_obs[i], next_mask[i])
            one.add(obs[i], actions[i], rewards[i], nxt, nmask)
        batch.add_batch(TransitionBatch(obs, actions, rewards, next_obs, next_mask))
        assert (batch.pos, batch.size) == (one.pos, one.size)
        for field in ("obs", "actions", "rewards", "next_obs", "next_mask", "dones"):
            np.testing.assert_array_equal(getattr(batch, field), getattr(one, field), err_msg=field)


def test_replay_empty_sample_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4, 2, 2).sample(1)


def test_replay_state_dict_round_trip_gives_identical_future_samples(tmp_path: Path) -> None:
    a = ReplayBuffer(50, obs_dim=4, n_actions=3, seed=7)
    fill(a, 0, 80)
    a.sample(16)  # advance the RNG
    save_checkpoint(tmp_path / "replay.pth", {"replay": a.state_dict()})
    b = ReplayBuffer(50, obs_dim=4, n_actions=3, seed=999)
    b.load_state_dict(load_checkpoint(tmp_path / "replay.pth")["replay"])
    assert (len(b), b.pos) == (len(a), a.pos)
    for _ in range(3):
        sa, sb = a.sample(32), b.sample(32)
        for x, y in zip(sa, sb, strict=True):
            assert torch.equal(x, y)
    fill(a, 80, 3)
    fill(b, 80, 3)
    assert torch.equal(a.sample(64).obs, b.sample(64).obs)
    with pytest.raises(ValueError, match="same settings"):
        ReplayBuffer(49, obs_dim=4, n_actions=3).load_state_dict(a.state_dict())


def test_replay_concurrent_add_and_sample_never_tear_rows() -> None:
    """Live mode: the loop thread adds while the learner thread samples (the lock covers the copy)."""
    buf = ReplayBuffer(64, obs_dim=256, n_actions=4, seed=0)
    fill(buf, 0, 1)
    stop = threading.Event()
    errors: list[str] = []

    def sampler() -> None:
        for _ in range(300):
            s = buf.sample(32)
            same_row = torch.all(s.obs == s.obs[:, :1]) and torch.all(s.next_obs == s.obs + 0.5)
            if not bool(same_row) or not torch.equal(s.obs[:, 0], s.rewards):
                errors.append("torn row")
                break
        stop.set()

    t = threading.Thread(target=sampler)
    t.start()
    k = 1
    while not stop.is_set() and k < 200_000:
        fill(buf, k, 1)
        k += 1
    t.join(timeout=30)
    assert not t.is_alive() and not errors


# --- learner -------------------------------------------------------------------------------------
def tiny_batch(n: int = 32, seed: int = 0) -> ReplaySamples:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, N_ACTIONS, generator=g) > 0.3
    mask[:, 0] = True
    return ReplaySamples(
        obs=torch.rand(n, OBS_DIM, generator=g),
        actions=torch.randint(0, N_ACTIONS, (n,), generator=g),
        rewards=-torch.rand(n, generator=g) * 3,
        next_obs=torch.rand(n, OBS_DIM, generator=g),
        next_mask=mask,
        dones=torch.zeros(n),
    )


def test_learner_update_reduces_td_loss_on_a_fixed_batch() -> None:
    learner = Learner(small_cfg(target_update_every=10_000))
    batch = tiny_batch()
    first = learner.update(batch)
    for _ in range(150):
        last = learner.update(batch)
    assert learner.updates == 151
    assert last < 0.1 * first


def test_td_target_is_double_dqn_over_valid_actions_only() -> None:
    learner = Learner(small_cfg(gamma=0.5))
    batch = tiny_batch(n=4)
    # Rows whose only non-zero feature is F_VALID = 1 and a slot-index column: Q(a') = +a' for the
    # online network, -a' for the target (a score that is +-1 times that column).
    obs = torch.zeros(4, OBS_DIM)
    rows = obs[:, : N_ACTIONS * ROW_FEATURES].view(4, N_ACTIONS, ROW_FEATURES)
    rows[:, :, F_VALID] = 1.0
    rows[:, :, F_LOG_IN_FLIGHT] = torch.arange(N_ACTIONS, dtype=torch.float32)
    for net, sign in ((learner.online, 1.0), (learner.target, -1.0)):
        column_net(F_LOG_IN_FLIGHT, sign, net=net)
    batch = batch._replace(next_obs=obs)
    mask = torch.zeros(4, N_ACTIONS, dtype=torch.bool)
    mask[0, [1, 5]] = True  # online picks 5 (15 is masked out), target scores it -5
    mask[1, :] = True  # picks 15 -> -15
    mask[2, 0] = True  # only 0 -> 0
    # row 3: no valid action at all -> reward only
    batch = batch._replace(next_mask=mask, rewards=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    expected = torch.tensor([1.0 - 0.5 * 5, 1.0 - 0.5 * 15, 1.0, 1.0])
    assert torch.allclose(learner.td_target(batch), expected)
    done = batch._replace(dones=torch.ones(4))
    assert torch.allclose(learner.td_target(done), torch.ones(4))


def test_target_syncs_every_k_updates() -> None:
    learner = Learner(small_cfg(target_update_every=3))
    batch = tiny_batch()

    def same() -> bool:
        o, t = learner.online.state_dict(), learner.target.state_dict()
        return all(torch.equal(o[k], t[k]) for k in o)

    assert same()
    learner.update(batch)
    learner.update(batch)
    assert not same()
    learner.update(batch)
    assert same()
    learner.update(batch)
    assert not same()


def test_learner_is_seeded_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a = Learner(small_cfg(seed=3))
    assert torch.equal(torch.get_rng_state(), before)
    b = Learner(small_cfg(seed=3))
    c = Learner(small_cfg(seed=4))
    assert torch.equal(a.online.row_x.weight, b.online.row_x.weight)
    assert not torch.equal(a.online.row_x.weight, c.online.row_x.weight)


def test_learner_state_dict_round_trip_continues_identically(tmp_path: Path) -> None:
    cfg = small_cfg(target_update_every=4)
    a = Learner(cfg)
    for s in range(5):
        a.update(tiny_batch(seed=s))
    save_checkpoint(tmp_path / "l.pth", {"learner": a.state_dict()})
    b = Learner(small_cfg(target_update_every=4, seed=11))
    b.load_state_dict(load_checkpoint(tmp_path / "l.pth")["learner"])
    assert b.updates == 5
    for s in range(5, 9):
        assert a.update(tiny_batch(seed=s)) == b.update(tiny_batch(seed=s))
    with pytest.raises(ValueError, match="hidden"):
        Learner(small_cfg(hidden=16)).load_state_dict(a.state_dict())


def test_dqn_config_from_settings_and_device() -> None:
    s = Settings.model_validate({"gamma": 0.9, "hidden": 48, "eps_end": 0.05, "seed": 5})
    cfg = DqnConfig.from_settings(s)
    assert (cfg.gamma, cfg.hidden, cfg.eps_end, cfg.seed) == (0.9, 48, 0.05, 5)
    assert cfg.batch_size == s.batch_size and cfg.error_penalty == s.error_penalty
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_epsilon_schedule() -> None:
    sch = EpsilonSchedule.for_training(1.0, 0.1, 0.5, 200)
    assert sch.decay_decisions == 100
    assert sch.value(0) == 1.0 and sch.value(50) == pytest.approx(0.55) and sch.value(100) == pytest.approx(0.1)
    assert sch.value(10_000) == 0.1


def test_online_serving_explores_only_what_the_control_arm_does_not_route_by_the_fallback() -> None:
    def serving_eps(**kw: float) -> float:
        sch = epsilon_schedule(Settings.model_validate(kw), None)
        assert sch.start == sch.end
        return sch.end

    assert serving_eps() == 0.0  # defaults: eps_end 0.02 within the 0.05 control arm
    assert serving_eps(control_share=0.0) == pytest.approx(0.02)  # no guardrail: ε is eps_end
    assert serving_eps(eps_end=0.1, control_share=0.05) == pytest.approx(0.05)
    training = epsilon_schedule(Settings.model_validate({}), 1000)
    assert (training.start, training.end) == (1.0, 0.02)  # training keeps its schedule


# --- masked argmax and the NumPy forward ----------------------------------------------------------
def test_masked_argmax_never_picks_a_masked_action() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2000, N_ACTIONS, generator=g)
    mask = torch.rand(2000, N_ACTIONS, generator=g) > 0.7
    mask[torch.arange(2000), torch.randint(0, N_ACTIONS, (2000,), generator=g)] = True  # >= 1 valid
    a = masked_argmax(q, mask)
    assert bool(mask[torch.arange(2000), a].all())
    assert torch.equal(q.masked_fill(~mask, -1e9).max(dim=1).values, q[torch.arange(2000), a])


def test_agent_never_chooses_an_unavailable_backend() -> None:
    """Greedy and exploring alike choose among `view.candidates` only, even where Q prefers another."""
    learner = Learner(small_cfg())
    column_net(F_LOG_IN_FLIGHT, 1.0, net=learner.online)  # prefers the busiest backend
    view = ClusterView.create(4)
    for _ in range(3):
        view.on_dispatch(2)
    greedy = GreedyDqn(NumpyWeights.from_state_dict(learner.online.state_dict()), N_ACTIONS)
    assert greedy.choose(0, view, 0.0) == 2
    view.set_available(2, False)
    explore = DqnAgent(learner, ReplayBuffer(100, OBS_DIM, N_ACTIONS), small_cfg(), total_decisions=10, seed=0)
    for agent in (greedy, explore):
        assert {agent.choose(k % 3, view, 0.0) for k in range(300)} <= {0, 1, 3}
    for i in (0, 1, 3):
        view.set_available(i, False)
    with pytest.raises(NoBackendAvailable):
        greedy.choose(0, view, 0.0)


# --- checkpoints ---------------------------------------------------------------------------------
def test_model_round_trip_weights_identical(tmp_path: Path) -> None:
    net = QNetwork(hidden=32)
    path = tmp_path / "dqn_final.pth"
    save_model(path, net, {"episodes": 3, "env": "sim"})
    raw = torch.load(path, weights_only=True)  # loadable without executing pickled code
    assert raw["format"] == MODEL_FORMAT and raw["arch"] == net.arch()
    loaded, meta = load_model(path)
    assert meta == {"episodes": 3, "env": "sim"} and loaded.arch() == net.arch() and not loaded.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_load_model_accepts_a_training_checkpoint(tmp_path: Path) -> None:
    learner = Learner(small_cfg())
    learner.update(tiny_batch())
    save_checkpoint(tmp_path / "ckpt.pth", {"episode": 4, "learner": learner.state_dict()})
    net, meta = load_model(tmp_path / "ckpt.pth")
    assert meta == {}
    assert torch.equal(net.row_x.weight, learner.online.row_x.weight)


def test_atomic_save_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.pth"
    save_checkpoint(path, {"a": torch.ones(3), "n": 1})
    save_checkpoint(path, {"a": torch.zeros(3), "n": 2})
    assert [p.name for p in path.parent.iterdir()] == ["c.pth"]

    class Unpicklable(dict):  # passes the payload check, then fails inside torch.save
        def __reduce_ex__(self, protocol: object) -> NoReturn:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"bad": Unpicklable(a=1)})
    assert [p.name for p in path.parent.iterdir()] == ["c.pth"]
    assert load_checkpoint(path)["n"] == 2


def test_payload_that_weights_only_would_refuse_is_rejected_at_save(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['replay'\]\['obs'\] holds a numpy.ndarray.*torch.from_numpy"):
        save_checkpoint(tmp_path / "c.pth", {"replay": {"obs": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"numpy\.float32"):
        save_checkpoint(tmp_path / "c.pth", {"x": [1, np.float32(2)]})
    assert list(tmp_path.iterdir()) == []


def test_corrupt_truncated_missing_and_unsafe_files_give_checkpoint_error(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    save_model(good, QNetwork(hidden=32), {})
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"obj": Outcome(0, 0, 0.1, False)}, unsafe)  # an arbitrary object: refused by weights_only
    for path in (garbage, truncated, tmp_path / "missing.pth", unsafe):
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg


def test_old_slot_indexed_and_mismatched_models_are_one_line_errors(tmp_path: Path) -> None:
    old = tmp_path / "old.pth"
    save_checkpoint(old, {"format": MODEL_FORMAT, "state_dict": {"body.0.weight": torch.zeros(128, 84)}})
    with pytest.raises(CheckpointError, match=r"old format.*--scenario generated"):
        load_model(old)
    wrong = tmp_path / "wrong.pth"
    sd = QNetwork(hidden=32).state_dict()
    sd["row_x.weight"] = torch.zeros(32, ROW_FEATURES + 1)
    save_checkpoint(wrong, {"format": MODEL_FORMAT, "state_dict": sd})
    with pytest.raises(CheckpointError, match="features per backend") as info:
        load_model(wrong)
    assert "\n" not in str(info.value)


def test_default_model_path_is_package_data() -> None:
    p = default_model_path()
    assert p.name == "dqn_default.pth" and p.parent.name == "models" and p.parent.parent.name == "lbproxy"


# --- the agent -----------------------------------------------------------------------------------
class Bandit:
    """Two backends; backend 1 always answers 10x slower. Completions come back `delay` decisions
    later, so decisions are pending across observe calls as in the simulator."""

    def __init__(self, seed: int, delay: int = 3) -> None:
        self.view = ClusterView.create(2)
        self.rng = np.random.default_rng(seed)
        self.queue: deque[Outcome] = deque()
        self.delay = delay
        self.t = 0.0
        self.did = 0

    def step(self, agent: DqnAgent | GreedyDqn) -> int:
        self.t += 0.01
        c = int(self.rng.integers(3))
        i = agent.choose(c, self.view, self.t)
        self.view.on_dispatch(i)
        st = 0.01 if i == 0 else 0.1
        self.queue.append(Outcome(i, c, st, False, decision_id=self.did, service_time_s=st, queued_behind=0))
        self.did += 1
        while len(self.queue) > self.delay:
            out = self.queue.popleft()
            self.view.on_complete(out, self.t)
            agent.observe(out, self.view, self.t)
        return i


def make_agent(seed: int = 0, total: int = 3000, **kw: object) -> DqnAgent:
    cfg = small_cfg(seed=seed, **kw)
    learner = Learner(cfg)
    replay = ReplayBuffer(5000, OBS_DIM, N_ACTIONS, seed=seed)
    return DqnAgent(learner, replay, cfg, total_decisions=total, seed=seed, width=N_ACTIONS)


def test_agent_is_a_policy_and_learns_a_contextual_bandit() -> None:
    agent = make_agent()
    assert isinstance(agent, Policy) and agent.name == "dqn"
    env = Bandit(seed=1)
    for _ in range(3000):
        env.step(agent)
    assert agent.learner.updates > 1000 and agent.epsilon == pytest.approx(agent.cfg.eps_end)
    assert agent.dropped == 0 and agent.transitions == 3000 - env.delay
    greedy = GreedyDqn(NumpyWeights.from_state_dict(agent.learner.online.state_dict()), N_ACTIONS)
    picks = [env.step(greedy) for _ in range(400)]
    assert picks.count(0) / len(picks) >= 0.95


def test_agent_state_dict_round_trip_gives_identical_actions(tmp_path: Path) -> None:
    a = make_agent(seed=2, total=1000)
    env_a = Bandit(seed=3)
    for _ in range(300):  # past learning_starts: updates have run, epsilon mid-decay, records pending
        env_a.step(a)
    assert a.learner.updates > 0 and 0.1 < a.epsilon < 1.0 and len(a.join.table)
    assert a.replay is not None
    payload = {"agent": a.state_dict(), "learner": a.learner.state_dict(), "replay": a.replay.state_dict()}
    save_checkpoint(tmp_path / "resume.pth", payload)
    env_b = copy.deepcopy(env_a)

    loaded = load_checkpoint(tmp_path / "resume.pth")
    b = make_agent(seed=77, total=1000)
    b.learner.load_state_dict(loaded["learner"])
    assert b.replay is not None
    b.replay.load_state_dict(loaded["replay"])
    b.load_state_dict(loaded["agent"])
    assert (b.decisions, b.explorer.step, b.epsilon) == (a.decisions, a.explorer.step, a.epsilon)

    actions_a = [env_a.step(a) for _ in range(300)]
    actions_b = [env_b.step(b) for _ in range(300)]
    assert actions_a == actions_b
    assert a.learner.updates == b.learner.updates and a.last_loss == b.last_loss
    assert torch.equal(a.learner.online.row_x.weight, b.learner.online.row_x.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_agent_on_cuda_keeps_its_host_copy_current(tmp_path: Path) -> None:
    cfg = small_cfg(seed=4)
    learner = Learner(cfg, device="cuda")
    replay = ReplayBuffer(2000, OBS_DIM, N_ACTIONS, seed=4)
    agent = DqnAgent(learner, replay, cfg, total_decisions=400, seed=4, width=N_ACTIONS)
    env = Bandit(seed=5)
    for _ in range(400):
        env.step(agent)
    assert learner.updates > 0
    x = np.stack([encode_state(env.view, c, env.t, N_ACTIONS) for c in range(3)])
    with torch.inference_mode():
        ref = learner.online(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_allclose(numpy_q(agent._weights, x), ref, rtol=1e-4, atol=1e-4)
    save_model(tmp_path / "m.pth", learner.online, {})
    net, _ = load_model(tmp_path / "m.pth", device="cuda")
    assert next(net.parameters()).device.type == "cuda"
