"""`--workers N` on real processes (lbproxy/workers.py, lbproxy/proxy/admin_workers.py): two workers on one
port both take connections, the one admin listener adds their metrics up exactly and its changes reach
both, a SIGKILLed worker is restarted, counted and given the admin changes made before it started, SIGTERM
drains every worker and the whole tree exits 0, and live training with workers is refused in one line
(--online with workers: tests/test_shared_learner.py)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import LOOPBACK, REPO, Proc, running, start_backend, start_proxy
from test_proxy_faults import _accepts

from lbproxy.config_values import MAX_WORKERS, parse_workers, usable_cpus

WAIT_S = 20.0
"""Longest wait for a worker to be restarted or a count to show up (a busy 2-core machine)."""
TOKEN = "workers-test-admin-token-0123456789"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def send(
    method: str, url: str, body: dict[str, Any] | bytes | None = None, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(json.loads(exc.read()))


def fetch(port: int, path: str = "/api/light") -> int:
    """One request on a fresh connection (SO_REUSEPORT spreads connections, not requests)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def metric_sum(admin_url: str, family: str) -> float:
    with urllib.request.urlopen(admin_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
        if not s.name.endswith("_created")
    )


def per_worker(proxy: Proc) -> list[dict[str, Any]]:
    return list(get_json(proxy.admin_url + "/admin/backends")["per_worker"])


def worker_requests(proxy: Proc) -> list[int]:
    return [sum(int(b["requests"]) for b in w["backends"]) for w in per_worker(proxy)]


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def is_dead(pid: int) -> bool:
    """Reaped by the supervisor. Not "a zombie": a killed process's main thread turns zombie while its
    other threads still hold its file table, listening socket included."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Proc, Proc, Proc]]:
    """(proxy with 2 workers over backend a and an admin token, backend a, backend b: not in the pool at first)."""
    a, b = start_backend(), start_backend()
    try:
        proxy = start_proxy([a.url], "--workers", "2", "--health-interval-s", "0", env={"LBPROXY_ADMIN_TOKEN": TOKEN})
        with running(proxy):
            yield proxy, a, b
    finally:
        a.stop()
        b.stop()


def test_workers_setting() -> None:
    assert parse_workers("auto") == min(usable_cpus(), MAX_WORKERS) == min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    assert parse_workers(" 3 ") == 3 and parse_workers(1) == 1
    for bad in ("0", "-1", "two", 2.5, True, MAX_WORKERS + 1):
        with pytest.raises(ValueError, match="from 1 to"):
            parse_workers(bad)


def test_two_workers_take_requests_and_metrics_add_up(cluster: tuple[Proc, Proc, Proc]) -> None:
    proxy, _, _ = cluster
    before_total = metric_sum(proxy.admin_url, "lbproxy_requests")
    before = worker_requests(proxy)
    sent = 60  # connections: the chance that the kernel gives every one to one worker is 2 ** -59
    assert all(fetch(proxy.port) == 200 for _ in range(sent))
    after = worker_requests(proxy)
    gained = [x - y for x, y in zip(after, before, strict=True)]
    assert len(gained) == 2 and all(g > 0 for g in gained) and sum(gained) == sent, gained
    assert metric_sum(proxy.admin_url, "lbproxy_requests") - before_total == sent  # exact: flushed first
    assert metric_sum(proxy.admin_url, "lbproxy_workers") == 2
    state = get_json(proxy.admin_url + "/admin/backends")
    assert state["workers"] == 2 and state["policy"] == "round_robin"
    assert [b["index"] for b in state["backends"]] == list(range(len(state["backends"])))  # as one proxy's
    with urllib.request.urlopen(proxy.admin_url + "/readyz", timeout=10) as resp:
        assert "2 of 2 workers ready" in resp.read().decode()


def test_admin_changes_reach_every_worker(cluster: tuple[Proc, Proc, Proc]) -> None:
    proxy, _, b = cluster
    status, body = send("POST", proxy.admin_url + "/admin/backends", {"url": b.url, "name": "added"})
    assert status == 201 and body["name"] == "added"
    for w in per_worker(proxy):
        assert [x["name"] for x in w["backends"] if not x["removed"]][-1] == "added", w
    status, body = send("POST", proxy.admin_url + "/admin/backends", {"url": b.url, "name": "added"})
    assert status == 409 and "already exists" in str(body["error"])  # judged once, by the first worker
    status, body = send("POST", proxy.admin_url + "/admin/backends", {"url": "ftp://x"})
    assert status == 400 and "error" in body
    status, body = send("POST", proxy.admin_url + "/admin/backends", b"{" + b" " * 70_000 + b"}")
    assert status == 413 and "request body over" in body["error"]
    denied = metric_sum(proxy.admin_url, "lbproxy_admin_denied")
    status, body = send("DELETE", proxy.admin_url + "/admin/backends/added", token=None)
    assert status == 401 and "admin token required" in body["error"]
    assert metric_sum(proxy.admin_url, "lbproxy_admin_denied") == denied + 1  # refused once, not per worker
    status, _ = send("DELETE", proxy.admin_url + "/admin/backends/added")
    assert status == 200
    for w in per_worker(proxy):
        assert [x["removed"] for x in w["backends"] if x["name"] == "added"] == [True], w


def test_killed_worker_is_restarted_counted_and_given_the_changes(cluster: tuple[Proc, Proc, Proc]) -> None:
    proxy, _, b = cluster
    assert send("POST", proxy.admin_url + "/admin/backends", {"url": b.url, "name": "gone"})[0] == 201
    assert send("DELETE", proxy.admin_url + "/admin/backends/gone")[0] == 200
    assert send("POST", proxy.admin_url + "/admin/backends", {"url": b.url, "name": "late"})[0] == 201
    restarts = metric_sum(proxy.admin_url, "lbproxy_worker_restarts")
    victim, survivor = (int(w["pid"]) for w in per_worker(proxy))
    os.kill(victim, signal.SIGKILL)
    wait_for(f"worker {victim} dead", lambda: is_dead(victim))
    assert all(fetch(proxy.port) == 200 for _ in range(20))  # the survivor serves meanwhile

    def replaced() -> bool:
        pids = [int(w["pid"]) for w in per_worker(proxy)]
        return len(pids) == 2 and victim not in pids and survivor in pids

    wait_for("a new worker 0", replaced)
    assert metric_sum(proxy.admin_url, "lbproxy_worker_restarts") == restarts + 1
    assert metric_sum(proxy.admin_url, "lbproxy_workers") == 2
    for w in per_worker(proxy):  # the replacement got the changes made before it started
        names = [(x["name"], x["removed"]) for x in w["backends"]]
        assert ("late", False) in names and ("gone", True) in names, w
    assert all(fetch(proxy.port) == 200 for _ in range(20))


def test_sigterm_drains_every_worker_and_the_tree_exits_zero() -> None:
    slow = start_backend("--heavy-ms", "1500", "--distribution", "constant", workers=16)
    try:
        proxy = start_proxy([slow.url], "--workers", "2", "--health-interval-s", "0")
        with running(proxy):
            pids = [int(w["pid"]) for w in per_worker(proxy)]
            results: list[int] = []
            clients = [
                threading.Thread(target=lambda: results.append(fetch(proxy.port, "/api/heavy"))) for _ in range(6)
            ]
            for t in clients:
                t.start()

            def in_flight() -> int:
                rows = get_json(proxy.admin_url + "/admin/backends")["backends"]
                return sum(int(r["in_flight"]) for r in rows)

            wait_for("6 requests in flight", lambda: in_flight() == 6)
            proxy.popen.send_signal(signal.SIGTERM)
            wait_for("the port refusing connections", lambda: not _accepts(proxy.port), timeout_s=5)
            assert not results  # stopped accepting while the responses are still on their way
            for t in clients:
                t.join(30)
            assert results == [200] * 6  # every in-flight response completed
            assert proxy.popen.wait(30) == 0
            assert all(is_dead(pid) for pid in pids)
        assert "Traceback" not in proxy.output()
    finally:
        slow.stop()


def test_simulator_training_with_workers_is_refused_in_one_line() -> None:
    argv = [sys.executable, "-m", "lbproxy", "--workers", "2", "--mode", "train", "--env", "sim"]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "lbproxy: invalid setting --workers: simulator training runs in parallel with --actors N\n"
