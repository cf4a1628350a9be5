"""The `lbproxy` command as a user runs it: one-line errors with exit code 2 and no traceback,
a startup line, and a clean exit 0 after SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support import LOOPBACK, REPO, free_port, spawn, wait_http_ok

EXIT_USAGE = 2


def run_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LBPROXY_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lbproxy: ")
    for needle in needles:
        assert needle in lines[0]


def serve_args(backends: str, port: int, admin_port: int, *extra: str) -> list[str]:
    return [
        "--mode",
        "serve",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--backends",
        backends,
        "--health-interval-s",
        "0",
        *extra,
    ]


def test_no_backends() -> None:
    proc = run_cli("--mode", "serve", "--port", str(free_port()), "--admin-port", str(free_port()))
    assert_one_line_error(proc, "no backends configured", "--backends URL[,URL]", "--cluster-file FILE")


def test_unknown_policy() -> None:
    proc = run_cli("--mode", "serve", "--policy", "fastest", "--backends", "http://127.0.0.1:1")
    assert_one_line_error(proc, "--policy", "unknown policy 'fastest'", "round_robin")


def test_malformed_backend_url() -> None:
    proc = run_cli("--mode", "serve", "--backends", "localhost:8081")
    assert_one_line_error(proc, "--backends", "malformed backend URL")


def test_unknown_policy_from_env() -> None:
    proc = run_cli("--mode", "serve", "--backends", "http://127.0.0.1:1", env={"LBPROXY_POLICY": "nope"})
    assert_one_line_error(proc, "LBPROXY_POLICY", "unknown policy")


def test_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("policy = [\n")
    assert_one_line_error(run_cli("--config", str(bad)), "cannot read configuration")


def test_unknown_toml_key(tmp_path: Path) -> None:
    bad = tmp_path / "typo.toml"
    bad.write_text('backend = "http://127.0.0.1:8081"\n')
    assert_one_line_error(run_cli("--config", str(bad)), "unknown setting 'backend'")


@pytest.mark.parametrize("which", ["--port", "--admin-port"])
def test_port_in_use(which: str) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port, admin = (busy, free_port()) if which == "--port" else (free_port(), busy)
        proc = run_cli(*serve_args(f"http://{LOOPBACK}:{free_port()}", port, admin))
    assert_one_line_error(proc, which, str(busy), "already in use")


def test_startup_line_and_sigterm_exit_zero() -> None:
    port, admin = free_port(), free_port()
    p = spawn(["-m", "lbproxy", *serve_args(f"http://{LOOPBACK}:{free_port()}=2", port, admin, "--policy", "p2c")])
    try:
        wait_http_ok(f"http://{LOOPBACK}:{admin}/healthz", proc=p)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = out.decode()
    assert p.returncode == 0, text
    assert "Traceback" not in text
    assert f"serving http://{LOOPBACK}:{port} with policy p2c" in text
    assert f"admin http://{LOOPBACK}:{admin}" in text


def test_help_lists_every_setting() -> None:
    import subprocess
    import sys

    from lbproxy.config import Settings

    proc = subprocess.run([sys.executable, "-m", "lbproxy", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in proc.stdout
    assert "lbproxy demo" in proc.stdout and "Traceback" not in proc.stderr
