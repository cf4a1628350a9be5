"""`lbproxy distill`: a narrow student learns to route like a wide teacher (rl/distill.py), through the
real CLI, on states from the real simulator; deterministic; bad input is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import REPO

from lbproxy.rl.checkpoint import default_model_path, load_model, save_model
from lbproxy.rl.distill import DistillConfig, agreement, collect_states, distill_loss
from lbproxy.rl.network import QNetwork

TINY = ("--episodes", "8", "--dagger", "1", "--epochs", "40", "--lr", "3e-3", "--hidden", "16", "--seed", "3")


def run_distill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", "distill", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_the_loss_ignores_a_shift_of_every_candidate_and_non_candidates() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 8, generator=g)
    mask = torch.zeros(5, 8, dtype=torch.bool)
    mask[:, :4] = True
    q = t.clone()
    q[:, 4:] += 100.0  # rows that are not candidates do not count
    assert distill_loss(q, t, mask).item() == pytest.approx(0.0, abs=1e-9)
    # A common shift of the candidates changes no choice: only the small mean term sees it.
    shifted = distill_loss(t + 1.0, t, mask).item()
    q2 = t.clone()
    q2[:, 0] += 1.0  # one candidate moved: the choice can change, the centred term sees it
    assert 0.0 < shifted < distill_loss(q2, t, mask).item()


def test_states_come_from_training_clusters_with_their_candidate_masks() -> None:
    teacher, _ = load_model(default_model_path())
    cfg = DistillConfig(episodes=2, seed=5)
    obs, mask = collect_states(teacher, cfg, 0, np.random.default_rng(0))
    assert obs.shape[0] == mask.shape[0] == 2 * cfg.episode_decisions
    assert mask.any(axis=1).all()
    again, _ = collect_states(teacher, cfg, 0, np.random.default_rng(0))
    np.testing.assert_array_equal(obs, again)


@pytest.mark.slow
def test_cli_student_routes_closer_to_the_teacher_and_is_deterministic(tmp_path: Path) -> None:
    teacher, _ = load_model(default_model_path())
    out, out2 = tmp_path / "a" / "student.pth", tmp_path / "b" / "student.pth"
    done = run_distill(str(out), str(default_model_path()), *TINY)
    assert done.returncode == 0, done.stderr
    assert "held-out states" in done.stderr and "wrote" in done.stdout
    student, meta = load_model(out)
    assert (student.hidden, student.summary) == (16, 8)
    assert meta["trained_by"] == "lbproxy distill" and meta["settings"]["dagger"] == 1
    # Agreement on states neither run saw, routed by the teacher (other seed, other episodes).
    obs_np, mask_np = collect_states(teacher, DistillConfig(episodes=4, seed=11), 0, np.random.default_rng(1))
    obs, mask = torch.from_numpy(obs_np), torch.from_numpy(mask_np)
    with torch.no_grad():
        target = teacher(obs)
    torch.manual_seed(3)
    untrained = QNetwork(16).eval()
    before, after = agreement(untrained, target, obs, mask), agreement(student, target, obs, mask)
    assert after.regret < 0.5 * before.regret, (before, after)
    assert after.same_choice > before.same_choice
    assert run_distill(str(out2), str(default_model_path()), *TINY).returncode == 0
    net2, _ = load_model(out2)
    for name, value in student.state_dict().items():
        assert torch.equal(value, net2.state_dict()[name]), name


def test_cli_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    wide, narrow = tmp_path / "wide.pth", tmp_path / "narrow.pth"
    save_model(wide, QNetwork(32), {})
    save_model(narrow, QNetwork(16), {})
    for bad in (
        [str(tmp_path / "missing.pth")],
        [str(wide), str(narrow)],  # a mean of networks of different shapes
        [str(wide), "--epochs", "0"],
        [str(wide), "--eps", "2"],
        [str(wide), "--init", str(tmp_path / "missing.pth")],
    ):
        done = run_distill(str(tmp_path / "x.pth"), *bad)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "x.pth").exists()
