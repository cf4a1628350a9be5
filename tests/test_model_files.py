"""Hostile and broken model files (SECURITY.md, "Model files"): weights-only loading everywhere; a
pickle carrying code is refused and its code never runs; truncated, foreign, mis-shaped and
wrong-format files each end in one line — at start-up (`lbproxy --mode serve --model F`, exit 2, no
traceback) and at run time (POST /admin/model: 400, counted, logged, the current model keeps serving)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support import REPO, Proc, free_port, running, start_backend, start_proxy
from test_proxy import call

from lbproxy.rl.checkpoint import (
    MODEL_FORMAT,
    CheckpointError,
    default_model_path,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    remove_partial_writes,
    save_checkpoint,
)
from lbproxy.rl.network import QNetwork

MARKER_ENV = "LBPROXY_TEST_MARKER"


class RunsCode:
    """Unpickling this calls os.system: what a hostile "model" does. Pickled by reference to
    `posix.system`, so loading it needs no test module: a loader that ran it would create the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _code_zip(path: Path, marker: Path) -> None:
    torch.save({"format": MODEL_FORMAT, "state_dict": {"x": RunsCode(marker)}}, path)


def _code_pickle(protocol: int) -> Callable[[Path, Path], None]:
    def write(path: Path, marker: Path) -> None:
        path.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=protocol))

    return write


def _truncated(path: Path, marker: Path) -> None:
    data = default_model_path().read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _text(path: Path, marker: Path) -> None:
    path.write_text("this is not a model\n")


def _foreign_zip(path: Path, marker: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "a zip archive, not a torch file")


def _wrong_shape(path: Path, marker: Path) -> None:
    sd = QNetwork(16).state_dict()
    sd["static.weight"] = torch.zeros(3, 3)
    torch.save({"format": MODEL_FORMAT, "arch": {}, "state_dict": sd, "meta": {}}, path)


def _wrong_format(path: Path, marker: Path) -> None:
    torch.save({"format": "someone-else/7", "state_dict": QNetwork(16).state_dict(), "meta": {}}, path)


def _not_weights(path: Path, marker: Path) -> None:
    torch.save({"format": MODEL_FORMAT, "state_dict": [1, 2, 3]}, path)


def _nan_weights(path: Path, marker: Path) -> None:
    sd = {k: torch.full_like(v, float("nan")) for k, v in QNetwork(16).state_dict().items()}
    torch.save({"format": MODEL_FORMAT, "state_dict": sd, "meta": {}}, path)


BAD_FILES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "code_in_torch_zip": (_code_zip, "pickled code"),
    "code_in_pickle_p2": (_code_pickle(2), "pickled code"),
    "code_in_pickle_p5": (_code_pickle(5), "pickled code"),
    "truncated": (_truncated, "truncated"),
    "text": (_text, "not a PyTorch file"),
    "foreign_zip": (_foreign_zip, "not one PyTorch saved"),
    "wrong_shape": (_wrong_shape, "do not fit"),
    "wrong_format": (_wrong_format, "is not 'lbproxy-dqn/2'"),
    "not_weights": (_not_weights, "not a state_dict"),
    "nan_weights": (_nan_weights, "NaN"),
}


def bad_file(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(the file, the marker its code would create)."""
    path, marker = tmp_path / f"{kind}.pth", tmp_path / f"{kind}.ran"
    BAD_FILES[kind][0](path, marker)
    return path, marker


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_is_one_line_and_runs_no_code(tmp_path: Path, kind: str) -> None:
    path, marker = bad_file(tmp_path, kind)
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and BAD_FILES[kind][1] in msg, msg
    assert "weights_only=False" not in msg  # torch's advice is the one thing never to do with such a file
    assert not marker.exists(), "the pickle's code ran"


def test_code_pickle_names_what_it_would_have_called(tmp_path: Path) -> None:
    path, marker = bad_file(tmp_path, "code_in_pickle_p5")
    with pytest.raises(CheckpointError, match=r"\(posix\.system\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_every_truncation_of_a_model_is_a_checkpoint_error(tmp_path: Path) -> None:
    data = default_model_path().read_bytes()
    path = tmp_path / "cut.pth"
    for n in (0, 1, 4, 64, 512, len(data) // 3, len(data) - 23, len(data) - 1):
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as info:
            load_model(path)
        assert "\n" not in str(info.value), n


def test_the_shipped_model_and_a_saved_one_still_load(tmp_path: Path) -> None:
    net, _meta = load_model(default_model_path())
    assert net.arch()["hidden"] >= 4


# --- temp files of an interrupted save ---------------------------------------------------------------
def test_temp_files_are_never_a_checkpoint_and_are_cleaned_up(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(ckpts / "dqn_episode_0003.pth", {"episode": 3})
    # What a SIGKILL in the middle of save_checkpoint leaves: a partly written temp file with a later number.
    partial = ckpts / ".dqn_episode_0004.pth.k2j3h4.tmp"
    partial.write_bytes(b"PK\x03\x04 half a zip")
    (ckpts / "notes.txt").write_text("not ours")
    (ckpts / "old_dqn_episode_0009.pth.bak").write_text("not a checkpoint name either")
    assert latest_checkpoint(tmp_path) == ckpts / "dqn_episode_0003.pth"
    assert remove_partial_writes(tmp_path) == 1
    assert not partial.exists() and (ckpts / "notes.txt").exists()
    assert load_checkpoint(latest_checkpoint(tmp_path) or Path())["episode"] == 3


# --- start-up: `lbproxy --mode serve --model BAD` -----------------------------------------------------
def _serve_argv(model: Path) -> list[str]:
    argv = ["--mode", "serve", "--model", str(model), "--backends", "http://127.0.0.1:9"]
    return [*argv, "--port", str(free_port()), "--admin-port", str(free_port())]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_serve_with_a_bad_model_is_one_line_exit_2(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from lbproxy.cli import main

    path, marker = bad_file(tmp_path, kind)
    assert main(_serve_argv(path)) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbproxy: ") and BAD_FILES[kind][1] in lines[0], err
    assert not out and not marker.exists()


def test_serve_with_a_bad_model_exits_2_without_traceback(tmp_path: Path) -> None:
    """The real command, as a user runs it: a code-carrying pickle and a truncated file (started together:
    each process imports torch)."""
    procs = []
    for kind in ("code_in_torch_zip", "truncated"):
        path, marker = bad_file(tmp_path, kind)
        argv = [sys.executable, "-m", "lbproxy", *_serve_argv(path)]
        popen = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((kind, popen, marker))
    for kind, proc, marker in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (kind, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err and BAD_FILES[kind][1] in lines[0], (kind, err)
        assert not out and not marker.exists(), kind


# --- run time: POST /admin/model ------------------------------------------------------------------------
TOKEN = "model-files-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def backend() -> Iterator[Proc]:
    b = start_backend(workers=8)
    with running(b):
        yield b


def _metric(proxy: Proc, name: str) -> float:
    text = call(proxy.admin_port or 0, "GET", "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _model_version(proxy: Proc) -> int:
    data = json.loads(call(proxy.admin_port or 0, "GET", "/admin/backends")[2])
    return int(data["policy_state"]["model_version"])


def _post_model(proxy: Proc, path: Path | str, headers: dict[str, str] | None = AUTH) -> tuple[int, bytes]:
    body = json.dumps({"path": str(path)}).encode()
    status, _, reply = call(proxy.admin_port or 0, "POST", "/admin/model", headers, body)
    return status, reply


@pytest.mark.slow  # a DQN proxy process and ten loads through it: ~6 s
def test_bad_model_at_run_time_keeps_serving(tmp_path: Path, backend: Proc) -> None:
    env = {"LBPROXY_ADMIN_TOKEN": TOKEN}
    proxy = start_proxy([backend.url], "--policy", "dqn", "--device", "cpu", "--control-share", "0", env=env)
    with running(proxy):
        version = _model_version(proxy)
        assert _post_model(proxy, default_model_path(), headers={})[0] == 401  # token-protected
        for i, kind in enumerate(sorted(BAD_FILES), start=1):
            path, marker = bad_file(tmp_path, kind)
            status, reply = _post_model(proxy, path)
            assert status == 400, (kind, reply)
            assert reply.count(b"\n") == 1 and BAD_FILES[kind][1] in json.loads(reply)["error"], (kind, reply)
            assert not marker.exists(), kind
            assert call(proxy.port, "GET", "/api/light")[0] == 200, kind  # still routing
            assert _metric(proxy, "lbproxy_model_load_failures_total") == i
        assert _post_model(proxy, tmp_path / "missing.pth")[0] == 400
        assert _model_version(proxy) == version  # the served model never changed
        decisions = json.loads(call(proxy.admin_port or 0, "GET", "/admin/backends")[2])["policy_state"]
        assert decisions["fallbacks"]["no_model"] == 0  # routed by the model all along, not by the fallback

        good = tmp_path / "good.pth"
        good.write_bytes(default_model_path().read_bytes())
        status, reply = _post_model(proxy, good)
        assert status == 200, reply
        assert json.loads(reply)["model_version"] == version + 1 == _model_version(proxy)
        for _ in range(10):
            assert call(proxy.port, "GET", "/api/light")[0] == 200
    log = proxy.output()
    refused = [line for line in log.splitlines() if "model reload refused" in line]
    assert len(refused) == len(BAD_FILES) + 1, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.slow  # a DQN proxy process: ~4 s
def test_model_reload_is_refused_while_learning_online(backend: Proc) -> None:
    proxy = start_proxy([backend.url], "--policy", "dqn", "--online", "--device", "cpu")
    with running(proxy):
        status, reply = _post_model(proxy, default_model_path(), headers={})  # loopback, no token configured
        assert status == 409 and b"learner owns the weights" in reply, reply
        status, reply = _post_model(proxy, "", headers={})
        assert status == 400 and reply.count(b"\n") == 1, reply
        assert call(proxy.port, "GET", "/api/light")[0] == 200
