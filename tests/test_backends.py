"""The emulated backends (backends/): real `python -m backends` processes on free loopback ports.

Latency checks compare two measurements taken side by side (ratios with generous bounds), never an
absolute duration, because the machine is shared. `X-Service-Time` is measured (the time the
emulated service really slept), so CPU contention only ever adds to it: for the constant service
model the minimum over a few requests is the estimate closest to the configured time.
"""

from __future__ import annotations

import gzip
import http.client
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support import LOOPBACK, REPO, Proc, free_port, running, spawn, start_backend, wait_http_ok

from backends.app import ServiceSampler, WorkerPool
from backends.faults import FaultError, FaultState, Schedule, ScheduledFault, load_schedule, run_schedule
from backends.launcher import Cluster, ClusterError
from lbproxy.cluster import cluster_from_dict

pytestmark = pytest.mark.timing

Reply = tuple[int, dict[str, str], bytes]
CONSTANT_40MS = ("--distribution", "constant", "--light-ms", "40", "--heavy-ms", "40")


def call(port: int, method: str, target: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=20)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.headers.items()), resp.read()
    finally:
        conn.close()


def post_json(port: int, path: str, data: object) -> Reply:
    return call(port, "POST", path, json.dumps(data).encode(), {"Content-Type": "application/json"})


def service_times(port: int, path: str, n: int, concurrency: int = 4) -> list[float]:
    def one(_i: int) -> float:
        status, headers, _ = call(port, "GET", path)
        assert status == 200
        return float(headers["X-Service-Time"])

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def pid_gone(pid: int) -> bool:
    """True once `pid` has exited: gone, or a zombie nobody reaped yet (an orphan's new parent, PID 1 in
    a container, may never reap it)."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(scope="module")
def speed1() -> Iterator[Proc]:
    with running(start_backend(*CONSTANT_40MS, "--name", "speed1", workers=2, speed=1.0)) as (proc,):
        yield proc


@pytest.fixture(scope="module")
def speed2() -> Iterator[Proc]:
    args = (*CONSTANT_40MS, "--name", "speed2", "--class-speed", "heavy=0.25")
    with running(start_backend(*args, workers=2, speed=2.0)) as (proc,):
        yield proc


@pytest.fixture(scope="module")
def wide() -> Iterator[Proc]:
    """Default service model (exponential, 10/50/2 ms), enough workers not to queue."""
    with running(start_backend("--name", "wide", "--seed", "7", workers=16)) as (proc,):
        yield proc


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("speed1", "speed2", "wide"):
        if name in request.fixturenames:
            proc: Proc = request.getfixturevalue(name)
            if proc.popen.poll() is None:
                assert post_json(proc.port, "/admin/reset", {})[0] == 200


# --- in-process units --------------------------------------------------------------------------------
async def test_worker_pool_is_fifo_and_counts() -> None:
    import asyncio

    pool = WorkerPool(1)
    order: list[int] = []
    await pool.acquire()

    async def waiter(i: int) -> None:
        async with pool.slot():
            order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert (pool.busy, pool.queued) == (1, 3)
    tasks[1].cancel()  # a cancelled waiter gives up its place without losing a slot
    await asyncio.sleep(0)
    pool.release()
    await asyncio.gather(tasks[0], tasks[2])
    assert order == [0, 2]
    assert (pool.busy, pool.queued) == (0, 0)


def test_sampler_means() -> None:
    for dist in ("exponential", "lognormal", "constant"):
        s = ServiceSampler(dist, cv=2.0, seed=1)
        mean = statistics.fmean(s.draw(0.01) for _ in range(40_000))
        assert mean == pytest.approx(0.01, rel=0.1), dist
    a, b = ServiceSampler("exponential", 1.0, 5), ServiceSampler("exponential", 1.0, 5)
    assert [a.draw(1.0) for _ in range(5)] == [b.draw(1.0) for _ in range(5)]  # seeded


def test_fault_state_validates_before_changing() -> None:
    state = FaultState(baseline_error_rate=0.1)
    with pytest.raises(FaultError):
        state.apply({"slowdown": 2.0, "error_rate": 3.0})
    assert state.slowdown == 1.0 and state.error_rate == 0.1
    with pytest.raises(FaultError, match="unknown"):
        state.apply({"slow": 2.0})
    assert state.apply({"slowdown": 2.0, "error_rate": 0.5}) is False
    assert state.apply({"crash": True}) is True
    state.reset()
    assert (state.slowdown, state.error_rate, state.paused) == (1.0, 0.1, False)


def test_schedule_filters_by_server(tmp_path: Path) -> None:
    f = tmp_path / "faults.toml"
    f.write_text(
        '[[server]]\nport = 1\n[[fault]]\nat_s = 2.0\nslowdown = 3.0\n[[fault]]\nat_s = 1.0\nserver = "b"\n'
        "crash = true\n[[fault]]\nat_s = 0.5\nserver = 0\npause_s = 1.0\n"
    )
    assert [x.at_s for x in load_schedule(f, "a", 0).faults] == [0.5, 2.0]
    assert [x.at_s for x in load_schedule(f, "b", 1).faults] == [1.0, 2.0]
    f.write_text("[[fault]]\nat_s = 1.0\nslowdonw = 2.0\n")
    with pytest.raises(FaultError, match="slowdonw"):
        load_schedule(f, "a")


def test_schedule_repeats_and_recovers(tmp_path: Path) -> None:
    f = tmp_path / "scenario.toml"
    f.write_text(
        "[scenario]\nrepeat_s = 10.0\n[[fault]]\nat_s = 2.0\ncrash = true\n[[fault]]\nat_s = 5.0\nrecover = true\n"
    )
    sch = load_schedule(f, "x")
    assert sch.repeat_s == 10.0
    times = [t for t, _ in itertools.islice(sch.occurrences(25.0), 4)]
    assert times == [12.0, 15.0, 22.0, 25.0]  # from the cycle before the one containing 25 s
    assert sch.recovers_between(2.0, 5.0) and not sch.recovers_between(5.0, 14.0) and sch.recovers_between(12, 16)
    f.write_text("[scenario]\nrepeat_s = 1.0\n[[fault]]\nat_s = 2.0\ncrash = true\n")
    with pytest.raises(FaultError, match="repeat_s"):
        load_schedule(f, "x")


async def test_run_schedule_resumes_mid_way() -> None:
    """A server (re)started 0.2 s into the schedule: past faults rebuild the state, a past crash is skipped."""
    import asyncio

    sch = Schedule(
        (
            ScheduledFault(at_s=0.0, slowdown=3.0),
            ScheduledFault(at_s=0.05, pause_s=30.0),
            ScheduledFault(at_s=0.1, crash=True),
            ScheduledFault(at_s=0.6, error_rate=0.5),
        )
    )
    state, crashes = FaultState(), []
    task = asyncio.create_task(run_schedule(sch, state, lambda: crashes.append(1), start_s=0.2))
    # One loop pass runs the task's first step, which replays the past faults without awaiting; the
    # next fault is 0.4 s of schedule time away, so a descheduled test process cannot race it.
    await asyncio.sleep(0)
    assert (state.slowdown, state.paused, state.error_rate, crashes) == (3.0, True, 0.0, [])
    await asyncio.wait_for(task, 30.0)
    assert state.error_rate == 0.5 and crashes == []
    state.reset()


# --- one server ----------------------------------------------------------------------------------------
def test_health_metrics_and_state(wide: Proc) -> None:
    status, _, body = call(wide.port, "GET", "/health")
    assert (status, body) == (200, b"ok\n")
    assert call(wide.port, "GET", "/api/light")[0] == 200
    status, headers, body = call(wide.port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in (
        'backend_requests_total{class="light",code="200"}',
        "backend_busy_workers",
        "backend_queue_length",
        "backend_service_seconds_bucket",
        "backend_utilization",
    ):
        assert name in text
    state = json.loads(call(wide.port, "GET", "/admin/state")[2])
    assert state["name"] == "wide" and state["workers"] == 16 and state["paused"] is False
    assert state["pid"] == wide.popen.pid


def test_response_headers(wide: Proc) -> None:
    status, headers, body = call(wide.port, "GET", "/api/light")
    assert status == 200 and json.loads(body)["class"] == "light"
    assert headers["X-Backend"] == "wide"
    assert 0.0 <= float(headers["X-Utilization"]) <= 1.0
    assert float(headers["X-Service-Time"]) >= 0.0 and float(headers["X-Queue-Wait"]) >= 0.0


def test_classes_are_ordered(wide: Proc) -> None:
    heavy = statistics.median(service_times(wide.port, "/api/heavy", 20))
    light = statistics.median(service_times(wide.port, "/api/light", 20))
    static = statistics.median(service_times(wide.port, "/static/app.js", 20))
    # means 50 / 10 / 2 ms (medians ~35 / 7 / 1.4); 1.5x, not 2x, leaves room for wake-up delays
    # that a loaded machine adds to every sleep alike
    assert heavy > 1.5 * light and light > static


def test_speed_factor_halves_service_time(speed1: Proc, speed2: Proc) -> None:
    slow = min(service_times(speed1.port, "/api/light", 6, concurrency=2))
    fast = min(service_times(speed2.port, "/api/light", 6, concurrency=2))
    assert 0.3 < fast / slow < 0.75  # 20 ms vs 40 ms constant


def test_class_speed_flag(speed2: Proc) -> None:
    heavy = min(service_times(speed2.port, "/api/heavy", 4, concurrency=2))
    light = min(service_times(speed2.port, "/api/light", 4, concurrency=2))
    assert heavy / light > 2.5  # heavy=0.25: 80 ms vs 20 ms


def test_latency_grows_when_load_exceeds_workers(speed1: Proc) -> None:
    def latency(_i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        status, headers, _ = call(speed1.port, "GET", "/api/light")
        assert status == 200
        return time.perf_counter() - t0, float(headers["X-Queue-Wait"])

    alone = min(latency(0)[0] for _ in range(3))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(latency, range(8)))  # 8 requests, 2 workers: 4 rounds of 40 ms
    p50 = statistics.median(r[0] for r in results)
    assert p50 > 1.5 * alone
    assert max(r[1] for r in results) > 2 * 0.04 * 0.8  # the last ones waited about 3 rounds


def test_slowdown_error_rate_pause_and_reset(speed1: Proc) -> None:
    base = min(service_times(speed1.port, "/api/light", 2, concurrency=1))
    status, _, body = post_json(speed1.port, "/admin/fault", {"slowdown": 5.0})
    assert status == 200 and json.loads(body)["slowdown"] == 5.0
    slowed = statistics.median(service_times(speed1.port, "/api/light", 2, concurrency=2))
    assert slowed > 3 * base

    assert post_json(speed1.port, "/admin/reset", {})[0] == 200
    assert post_json(speed1.port, "/admin/fault", {"error_rate": 1.0})[0] == 200
    assert {call(speed1.port, "GET", "/api/light")[0] for _ in range(3)} == {500}

    assert post_json(speed1.port, "/admin/fault", {"error_rate": 0.0, "pause": True})[0] == 200
    assert call(speed1.port, "GET", "/health")[0] == 503
    conn = http.client.HTTPConnection(LOOPBACK, speed1.port, timeout=0.5)
    with pytest.raises(TimeoutError):
        conn.request("GET", "/api/light")
        conn.getresponse()
    conn.close()
    assert json.loads(call(speed1.port, "GET", "/admin/state")[2])["paused"] is True
    assert post_json(speed1.port, "/admin/reset", {})[0] == 200
    assert call(speed1.port, "GET", "/health")[0] == 200
    assert call(speed1.port, "GET", "/api/light")[0] == 200


def test_bad_fault_requests_are_400(speed1: Proc) -> None:
    assert post_json(speed1.port, "/admin/fault", {"slowdown": -1})[0] == 400
    assert post_json(speed1.port, "/admin/fault", {"nope": 1})[0] == 400
    assert call(speed1.port, "POST", "/admin/fault", b"not json")[0] == 400


def test_crash_exits_with_code_1() -> None:
    proc = start_backend(workers=1)
    try:
        status, _, body = post_json(proc.port, "/admin/fault", {"crash": True})
        assert status == 200 and json.loads(body)["crashing"] is True
        assert proc.popen.wait(10) == 1
    finally:
        proc.stop()


def test_upload_20mb_is_counted(wide: Proc) -> None:
    block = b"u" * (1 << 20)
    total = 20 * len(block)

    def body() -> Iterator[bytes]:
        for _ in range(20):
            yield block

    status, _, reply = call(wide.port, "POST", "/api/light", body(), {"Content-Length": str(total)})
    assert status == 200 and json.loads(reply)["received_bytes"] == total
    conn = http.client.HTTPConnection(LOOPBACK, wide.port, timeout=20)  # chunked upload, no length
    conn.request("PUT", "/upload", body=(b"c" * 1000 for _ in range(10)), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["received_bytes"] == 10_000
    conn.close()


def test_sized_download_head_and_chunked(wide: Proc) -> None:
    status, headers, body = call(wide.port, "GET", "/api/light?size=5000000")
    assert status == 200 and len(body) == 5_000_000 and headers["Content-Length"] == "5000000"
    status, headers, body = call(wide.port, "HEAD", "/api/light?size=1234")
    assert status == 200 and body == b"" and headers["Content-Length"] == "1234"
    status, headers, body = call(wide.port, "GET", "/chunked")
    assert status == 200 and headers.get("Transfer-Encoding") == "chunked" and body.startswith(b"chunk 0")


def test_gzip_status_and_echo(wide: Proc) -> None:
    status, headers, body = call(wide.port, "GET", "/api/light?size=20000&gzip=1")
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"x" * 20000
    for code in (204, 304):
        status, headers, body = call(wide.port, "GET", f"/api/light?status={code}")
        assert status == code and body == b"" and "Transfer-Encoding" not in headers
    assert call(wide.port, "GET", "/api/light?status=418")[0] == 418
    assert call(wide.port, "GET", "/api/light?status=abc")[0] == 400
    status, _, body = call(wide.port, "GET", "/api/light?echo=headers", headers={"X-Custom": "kept"})
    assert status == 200 and ["X-Custom", "kept"] in json.loads(body)["headers"]


def test_hang_ups_and_sigterm_while_paused_are_clean() -> None:
    """Clients that hang up mid-body are normal (no error logged); SIGTERM stops a paused server promptly."""
    import socket
    import threading

    proc = start_backend(workers=2)
    outcome: list[object] = []

    def hang() -> None:
        try:
            outcome.append(call(proc.port, "GET", "/api/light")[0])
        except (ConnectionError, http.client.HTTPException) as exc:
            outcome.append(exc)

    try:
        for request in (
            b"GET /api/light?size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /api/light HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000,
            b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            with socket.create_connection((LOOPBACK, proc.port), timeout=10) as s:
                s.sendall(request)
                if b"size=" in request:
                    got = 0
                    while got < 1_000_000:
                        got += len(s.recv(65536))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and json.loads(call(proc.port, "GET", "/admin/state")[2])["busy"]:
            time.sleep(0.05)
        assert call(proc.port, "GET", "/api/light")[0] == 200

        assert post_json(proc.port, "/admin/fault", {"pause": True})[0] == 200
        hung = threading.Thread(target=hang, daemon=True)
        hung.start()  # held by the pause until the server stops (the server then drops the connection)
        time.sleep(0.2)
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(8) == 0  # well inside launchers' and tests' stop timeouts
        hung.join(30)
        assert outcome and outcome[0] != 200
    finally:
        proc.stop()
    assert "Traceback" not in proc.output() and "Error handling request" not in proc.output()


def test_imports_stay_within_what_the_dockerfile_copies() -> None:
    """backends/Dockerfile copies only the lbproxy modules the backends import (no torch in the image):
    every lbproxy file they load lies under one of its COPY sources, and neither torch nor pydantic loads."""
    code = (
        "import sys, backends.__main__, backends.app, backends.launcher, backends.faults; "
        "print('\\n'.join(sorted(f'{m} {getattr(sys.modules[m], \"__file__\", \"\")}' for m in sys.modules "
        "if m.split('.')[0] in ('lbproxy', 'torch', 'pydantic'))))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    loaded = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert not [m for m in loaded if m.split(".")[0] != "lbproxy"], loaded
    assert {"lbproxy.cluster", "lbproxy.observe"} <= set(loaded)
    sources = [
        src
        for line in (REPO / "backends" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY lbproxy/")
        for src in line.split()[1:-1]
    ]
    for module, file in loaded.items():
        rel = Path(file).resolve().relative_to(REPO).as_posix()
        assert any(rel == src or (src.endswith("/") and rel.startswith(src)) for src in sources), (module, rel, sources)


def test_fault_schedule_applies_at_start(tmp_path: Path) -> None:
    f = tmp_path / "faults.toml"
    f.write_text('[[fault]]\nat_s = 0.0\nerror_rate = 1.0\n[[fault]]\nat_s = 0.0\nserver = "other"\nslowdown = 9.0\n')
    with running(start_backend("--name", "me", "--fault-schedule", str(f), workers=2)) as (proc,):
        assert call(proc.port, "GET", "/api/light")[0] == 500
        state = json.loads(call(proc.port, "GET", "/admin/state")[2])
        assert state["error_rate"] == 1.0 and state["slowdown"] == 1.0


# --- CLI errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["--port", "abc"],
        [],
        ["--port", "8081", "--speed", "0"],
        ["--port", "8081", "--class-speed", "huge=2"],
        ["--port", "8081", "--distribution", "pareto"],
        ["--port", "8081", "--fault-schedule", "/nonexistent/faults.toml"],
        ["--cluster", "/nonexistent/cluster.toml"],
        ["--cluster", "/nonexistent/cluster.toml", "--port", "8081"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from backends.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backends: error:"), err
    assert out == ""


def test_bad_argument_through_the_real_cli() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "backends", "--port", "8081", "--workers", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "backends: error: argument --workers: expected a positive integer, got '0' (see python -m backends --help)"
    ]


def test_port_in_use_is_one_line() -> None:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "backends", "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and str(port) in res.stderr


# --- launcher ------------------------------------------------------------------------------------------
def two_server_toml(tmp_path: Path, ports: tuple[int, int]) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[service]\ndistribution = "constant"\nlight_ms = 5.0\n'
        f'[[server]]\nname = "one"\nport = {ports[0]}\nworkers = 2\n'
        f'[[server]]\nname = "two"\nport = {ports[1]}\nspeed = 2.0\nclass_speed = {{ heavy = 0.5 }}\n'
    )
    return path


def test_example_cluster_file_is_valid() -> None:
    from lbproxy.cluster import load_cluster

    spec = load_cluster(REPO / "backends" / "cluster.example.toml")
    assert [s.port for s in spec.servers] == [8081, 8082, 8083, 8084]
    assert len({s.mean_service_s(spec.service, 1) for s in spec.servers}) == 4  # heterogeneous heavy work


def test_cluster_api_starts_and_stops_everything(tmp_path: Path) -> None:
    from lbproxy.cluster import load_cluster

    spec = load_cluster(two_server_toml(tmp_path, (free_port(), free_port())))
    with Cluster(spec, seed=3) as cluster:
        pids = cluster.pids()
        assert len(pids) == 2
        for url, name in zip(cluster.urls, ("one", "two"), strict=True):
            port = int(url.rsplit(":", 1)[1])
            status, headers, _ = call(port, "GET", "/api/light")
            assert status == 200 and headers["X-Backend"] == name
        state = json.loads(call(int(cluster.urls[1].rsplit(":", 1)[1]), "GET", "/admin/state")[2])
        assert state["speed"] == 2.0 and state["class_speed"]["heavy"] == 0.5 and state["workers"] == 4
    assert cluster.pids() == []
    assert all(pid_gone(p) for p in pids)


def test_cluster_restarts_a_crashed_server(tmp_path: Path) -> None:
    spec = cluster_from_dict({"server": [{"name": "phoenix", "port": free_port(), "workers": 1}]})
    with Cluster(spec, restart_after_s=0.2) as cluster:
        port = spec.servers[0].port
        first = cluster.pids()[0]
        assert post_json(port, "/admin/fault", {"crash": True})[0] == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and cluster.pids() in ([], [first]):
            time.sleep(0.05)
        wait_http_ok(f"http://{LOOPBACK}:{port}/health", timeout_s=30)
        assert cluster.pids() and cluster.pids()[0] != first


def test_cluster_restarts_a_crashed_server_at_its_scheduled_recover(tmp_path: Path) -> None:
    port = free_port()
    f = tmp_path / "scenario.toml"
    f.write_text(
        "[scenario]\nrepeat_s = 1.5\n"
        f'[[server]]\nname = "phoenix"\nport = {port}\nworkers = 1\n'
        '[[fault]]\nat_s = 1.0\nserver = "phoenix"\nrecover = true\n'
    )
    from lbproxy.cluster import load_cluster

    with Cluster(load_cluster(f), fault_schedule=f) as cluster:  # no restart_after_s: only `recover` revives
        first = cluster.pids()[0]
        assert post_json(port, "/admin/fault", {"crash": True})[0] == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and cluster.pids() in ([], [first]):
            time.sleep(0.05)
        wait_http_ok(f"http://{LOOPBACK}:{port}/health", timeout_s=30)
        assert cluster.pids() and cluster.pids()[0] != first


def test_cluster_port_in_use_names_the_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        s.listen()
        taken = s.getsockname()[1]
        spec = cluster_from_dict({"server": [{"name": "ok", "port": free_port()}, {"name": "clash", "port": taken}]})
        with pytest.raises(ClusterError, match=f"'clash': port {taken}"):
            Cluster(spec).start()
        res = subprocess.run(
            [sys.executable, "-m", "backends", "--cluster", str(two_server_toml(tmp_path, (free_port(), taken)))],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and f"port {taken}" in res.stderr


def test_cluster_cli_runs_until_sigterm(tmp_path: Path) -> None:
    ports = (free_port(), free_port())
    proc = spawn(["-m", "backends", "--cluster", str(two_server_toml(tmp_path, ports))])
    try:
        for port in ports:
            wait_http_ok(f"http://{LOOPBACK}:{port}/health", timeout_s=30, proc=proc)
        pids = [json.loads(call(p, "GET", "/admin/state")[2])["pid"] for p in ports]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        out = proc.stdout.read().decode() if proc.stdout else ""
        assert f"one http://{LOOPBACK}:{ports[0]}" in out and f"two http://{LOOPBACK}:{ports[1]}" in out
        assert all(pid_gone(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_children_exit_when_the_launcher_is_killed(tmp_path: Path) -> None:
    ports = (free_port(),)
    toml = tmp_path / "one.toml"
    toml.write_text(f'[[server]]\nname = "orphan"\nport = {ports[0]}\n')
    proc = spawn(["-m", "backends", "--cluster", str(toml)])
    try:
        for port in ports:
            wait_http_ok(f"http://{LOOPBACK}:{port}/health", timeout_s=30, proc=proc)
        pids = [json.loads(call(p, "GET", "/admin/state")[2])["pid"] for p in ports]
        proc.kill()  # SIGKILL: the launcher cannot clean up; the children notice they were orphaned
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(pid_gone(p) for p in pids):
            time.sleep(0.1)
        assert all(pid_gone(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
