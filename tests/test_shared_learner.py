"""`--workers 2 --policy dqn --online` on real processes (lbproxy/shared_learner.py): both workers take
requests and feed the ONE learner process through their shared-memory segments, both serve the weights
it publishes, a killed worker's replacement writes on in its slot, and SIGTERM stops the learner after
the workers and leaves no shared memory behind."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import Proc, running, start_backend, start_proxy
from test_workers import fetch, get_json, is_dead, metric_sum, per_worker, wait_for, worker_requests

pytestmark = pytest.mark.slow  # a 2-worker proxy that learns: ~25 s on 2 busy cores

LEARNING = ("--policy", "dqn", "--online", "--device", "cpu", "--control-share", "0", "--health-interval-s", "0")
PACE = ("--learning-starts", "16", "--batch-size", "8", "--updates-per-decision", "1", "--weight-sync-every", "1")


def learner(proxy: Proc) -> dict[str, Any]:
    return dict(get_json(proxy.admin_url + "/admin/backends")["learner"])


def shm_blocks(pid: int) -> set[str]:
    """The Python shared-memory blocks process `pid` has mapped (torch has its own files there)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return set(re.findall(r"/dev/shm/psm_\w+", maps))


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proc]:
    a, b = start_backend(), start_backend()
    try:
        proc = start_proxy([a.url, b.url], "--workers", "2", *LEARNING, *PACE)
        with running(proc):
            yield proc
    finally:
        a.stop()
        b.stop()


def test_both_workers_feed_one_learner_and_serve_its_weights(proxy: Proc) -> None:
    assert all(fetch(proxy.port) == 200 for _ in range(60))  # fresh connections: both workers get some
    assert all(n > 0 for n in worker_requests(proxy))
    state = learner(proxy)
    assert state["running"] and state["pid"] not in {w["pid"] for w in per_worker(proxy)}

    def learned() -> bool:
        s = learner(proxy)
        return all(f > 0 for f in s["fed_per_slot"]) and s["updates"] > 0 and all(v > 0 for v in s["version_per_slot"])

    wait_for("both slots fed, updates run, new weights served by both workers", learned)
    state = learner(proxy)
    assert len(state["fed_per_slot"]) == 2 and state["replay_size"] == sum(state["fed_per_slot"])
    for w in per_worker(proxy):  # each engine swapped in weights beyond the model it loaded
        assert w["policy_state"]["model_version"] >= 2, w
    # The learner process's own metrics, written when it publishes (after it counted the update).
    assert 0 < metric_sum(proxy.admin_url, "lbproxy_learner_updates") <= learner(proxy)["updates"]
    assert 0 < metric_sum(proxy.admin_url, "lbproxy_learner_weights_version") <= learner(proxy)["weights_version"]


def test_a_killed_worker_is_replaced_and_writes_on_in_its_slot(proxy: Proc) -> None:
    victim = next(w for w in per_worker(proxy) if w["worker"] == 0)
    fed = learner(proxy)["fed_per_slot"][0]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    wait_for("worker 0 dead", lambda: is_dead(int(victim["pid"])))
    wait_for(
        "a new worker 0", lambda: {w["worker"]: w["pid"] for w in per_worker(proxy)}.get(0) not in (None, victim["pid"])
    )
    assert learner(proxy)["running"]

    def slot_grew() -> bool:
        assert all(fetch(proxy.port) == 200 for _ in range(10))
        return int(learner(proxy)["fed_per_slot"][0]) > fed

    wait_for("slot 0 fed by the replacement", slot_grew)


def test_sigterm_stops_the_learner_after_the_workers_and_unlinks_its_memory(proxy: Proc) -> None:
    state = learner(proxy)
    pids = [int(w["pid"]) for w in per_worker(proxy)]
    blocks = shm_blocks(int(state["pid"]))
    assert len(blocks) == 10  # the replay's six fields, head, slots, stats, weights
    proxy.popen.send_signal(signal.SIGTERM)
    assert proxy.popen.wait(30) == 0
    assert all(is_dead(pid) for pid in [*pids, int(state["pid"])])
    assert not [b for b in blocks if Path(b).exists()]
    assert "Traceback" not in proxy.output()
