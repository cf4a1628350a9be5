"""`lbproxy average`: K models as one network whose Q-values are their mean (rl/ensemble.py), exact on
every state and in both forward implementations, served and learning online through the real CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
from support import REPO, running, start_backend, start_proxy

from lbproxy.observe import F_VALID, ROW_FEATURES, feature_dim
from lbproxy.rl.checkpoint import load_model, save_model
from lbproxy.rl.ensemble import average_networks
from lbproxy.rl.network import NumpyWeights, QNetwork, numpy_q

WIDTH = 16


def random_net(seed: int, hidden: int = 16) -> QNetwork:
    """Random weights, biases included (a freshly built network's are small; these must matter)."""
    torch.manual_seed(seed)
    net = QNetwork(hidden)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net.eval()


def states(count: int, seed: int) -> torch.Tensor:
    """Valid encodings: k candidate rows (F_VALID = 1) of random features, zero padding below."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(count, feature_dim(WIDTH), generator=g) * 3.0
    rows = x[:, : WIDTH * ROW_FEATURES].reshape(count, WIDTH, ROW_FEATURES)
    for i in range(count):
        k = 1 + i % WIDTH
        rows[i, :, F_VALID] = 1.0
        rows[i, k:, :] = 0.0
    return x


def test_the_average_scores_every_state_as_the_members_mean() -> None:
    members = [random_net(s) for s in (1, 2, 3)]
    avg = average_networks(members)
    assert (avg.hidden, avg.summary) == (48, 24)
    x = states(40, seed=7)
    with torch.no_grad():
        mean = torch.stack([m(x) for m in members]).mean(dim=0)
        got = avg(x)
    torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-4)
    # The NumPy forward (live inference, the simulator agent) reads the same function off the weights.
    q = numpy_q(NumpyWeights.from_state_dict(avg.state_dict()), x.numpy())
    for i in range(x.shape[0]):
        k = 1 + i % WIDTH
        np.testing.assert_allclose(q[i, :k], mean[i, :k].numpy(), rtol=1e-5, atol=1e-4)
    # Not a trivial mean: the members disagree on the best backend of some states.
    picks = torch.stack([m(x) for m in members]).argmax(dim=-1)
    assert bool((picks != picks[0]).any())


def test_the_average_of_one_model_is_that_model() -> None:
    net = random_net(4)
    x = states(8, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(average_networks([net])(x), net(x))


def run_average(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", "average", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_a_loadable_model_and_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    a, b, wide = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "wide.pth"
    save_model(a, random_net(1), {"seed": 1})
    save_model(b, random_net(2), {"seed": 2})
    save_model(wide, random_net(3, hidden=32), {})
    out = tmp_path / "avg" / "dqn_final.pth"
    done = run_average(str(out), str(a), str(b))
    assert done.returncode == 0, done.stderr
    net, meta = load_model(out)
    assert net.hidden == 32 and [m["seed"] for m in meta["members"]] == [1, 2]
    for bad in ([str(a), str(wide)], [str(a), str(tmp_path / "missing.pth")]):
        done = run_average(str(tmp_path / "x.pth"), *bad)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "x.pth").exists()


async def _drive(url: str, requests: int) -> list[int]:
    async with aiohttp.ClientSession() as s:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> int:
            async with sem, s.get(f"{url}/api/{'heavy' if i % 5 == 0 else 'light'}") as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one(i) for i in range(requests))))


@pytest.mark.slow
async def test_an_averaged_model_serves_and_learns_online(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    save_model(a, random_net(1), {})
    save_model(b, random_net(2), {})
    avg = tmp_path / "avg.pth"
    assert run_average(str(avg), str(a), str(b)).returncode == 0
    learn = ("--learning-starts", "32", "--batch-size", "16", "--updates-per-decision", "0.5")
    with running(start_backend(workers=4), start_backend(workers=4)) as backends:
        urls = [p.url for p in backends]
        with running(start_proxy(urls, "--policy", "dqn", "--model", str(avg), "--online", *learn)) as (proxy,):
            statuses = await _drive(proxy.url, 400)
            async with aiohttp.ClientSession() as s, s.get(proxy.admin_url + "/metrics") as r:
                text = await r.text()
    assert statuses.count(200) == len(statuses)
    updates = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("lbproxy_learner_updates_total")]
    assert updates and updates[0] > 0, text[-2000:]
