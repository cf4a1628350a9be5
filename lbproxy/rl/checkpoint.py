"""Checkpoints and model files: state_dicts and primitives only, written atomically, loaded with
`torch.load(weights_only=True)`.

Two kinds of file share this code:
- a training checkpoint (`checkpoints/*.pth`): whatever payload the trainer assembles (learner,
  replay, agent, episode counters) — only tensors, ndarrays-as-tensors, str/int/float/bool/None,
  lists, tuples and dicts, so loading never executes pickled code (SB3 does the same);
- a model (`dqn_final.pth`, the shipped `dqn_default.pth`): `{"format": MODEL_FORMAT, "arch",
  "state_dict", "meta"}`, everything serving needs and nothing else.

Writes go to a temp file in the same directory, are fsynced, then `os.replace`d over the target (and
the directory fsynced), so a crash mid-save leaves the previous file intact, never a torn one. The
temp names (`.NAME.XXXX.tmp`) never match :data:`CHECKPOINT_RE`, so a SIGKILL mid-save can leave one
behind but `latest_checkpoint` never picks it up; `remove_partial_writes` deletes such leftovers.

Loading is hostile-input safe: a file carrying pickled code (a `__reduce__` payload), a truncated
file, a non-torch file or one of another shape or format each end in a one-line CheckpointError,
and the code in a pickle never runs (the weights-only unpickler refuses every global it does not know).
Every training run and every serving path loads through `load_checkpoint`.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lbproxy.observe import ROW_FEATURES
from lbproxy.rl.network import ARCH_NAME, QNetwork

MAX_HIDDEN = 4096
"""Widest layer a model file may ask for: a hostile file must not make the loader allocate gigabytes
(the shipped model is 64 wide)."""

MODEL_FORMAT = "lbproxy-dqn/2"
"""/2: the permutation-equivariant network of rl/network.py (any backend count). /1 was the flat,
slot-indexed MLP of 2026-11; its files are refused with a one-line hint to retrain."""


CHECKPOINT_RE = re.compile(r"dqn_episode_(\d+)\.pth")
"""Training checkpoints, `RUN_DIR/checkpoints/dqn_episode_XXXX.pth` (sim and live training alike);
matched against the whole file name, so `save_checkpoint`'s temp files are never taken for one."""

_PARTIAL_RE = re.compile(r"\..+\.pth\..+\.tmp")
"""`save_checkpoint`'s temp files (`.NAME.pth.XXXXXXXX.tmp`), left behind only by a process killed mid-save."""


class CheckpointError(Exception):
    """A checkpoint/model file that cannot be used; the message is one line: file, problem, fix."""


_SAFE_LEAVES = (torch.Tensor, str, bytes, int, float, bool, type(None), torch.Size, torch.dtype)


def check_payload(obj: Any, where: str = "payload") -> None:
    """Raise TypeError naming the first value `torch.load(weights_only=True)` would refuse.

    Checked at save time so that a NumPy array slipped into a payload fails the run that wrote it,
    not the resume weeks later (weights_only rejects ndarrays and NumPy scalars)."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"checkpoint {where} has a {type(k).__name__} key; use str or int keys")
            check_payload(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple | set):
        for i, v in enumerate(obj):
            check_payload(v, f"{where}[{i}]")
        return
    hint = " (torch.from_numpy / .item())" if type(obj).__module__.startswith("numpy") else ""
    raise TypeError(
        f"checkpoint {where} holds a {type(obj).__module__}.{type(obj).__qualname__}; store tensors and "
        f"primitives only{hint} so it loads with weights_only=True"
    )


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Atomically write `payload` (tensors and primitives only, checked first) to `path`."""
    check_payload(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def checkpoint_path(run_dir: Path, episode: int) -> Path:
    """Where the checkpoint taken after `episode` episodes goes (sim and live training)."""
    return Path(run_dir) / "checkpoints" / f"dqn_episode_{episode:04d}.pth"


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.fullmatch(p.name)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest episode number in RUN_DIR/checkpoints, if any. Only complete
    files carry that name (atomic rename), so this is the last checkpoint that was fully written."""
    found = _checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (a simulator checkpoint holds the replay buffer)."""
    for _, path in _checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def remove_partial_writes(run_dir: Path) -> int:
    """Delete temp files a killed save left in RUN_DIR/checkpoints (never visible as checkpoints, but
    each can be as large as one); returns how many went. Call before training starts writing."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.iterdir():
        if _PARTIAL_RE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _one_line(text: str, limit: int = 160) -> str:
    return " ".join(text.split())[:limit]


_ZIP_MAGIC = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP_TAIL_BYTES = 22 + 65_535
"""The zip end-of-central-directory record sits in the last 22 bytes plus at most a 64 KiB comment."""
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_SCAN_MAX_BYTES = 256 << 20
_CODE_OPS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST"})
_SAFE_MODULES = ("torch", "collections", "builtins", "_codecs")
"""Globals torch's own (legacy-format) files name; anything else in a pickle is someone's code."""


def _pickled_global(path: Path) -> str | None:
    """The first global a raw pickle imports that is not torch's own, found by reading its opcodes
    (pickletools never executes them); "" when the stream ends early, None when it names none."""
    import pickletools

    strings: list[str] = []
    try:
        with path.open("rb") as f:
            for op, arg, _pos in pickletools.genops(f):
                if isinstance(arg, str):
                    strings = [*strings[-1:], arg]
                if op.name not in _CODE_OPS:
                    continue
                name = ".".join(strings) if op.name == "STACK_GLOBAL" else str(arg).replace(" ", ".")
                if not str(name).startswith(_SAFE_MODULES):
                    return str(name)
    except (ValueError, EOFError, OSError):
        return ""
    return None


def _load_failure(path: Path, exc: BaseException) -> str:
    """Why torch.load refused a file, in words a user can act on (torch's own message is several
    lines and suggests `weights_only=False`, which is exactly what must not be done with such a file).
    Looks at the file's bytes, never unpickles them."""
    code = "refused: it carries pickled code or objects ({}), not only weights; lbproxy never runs code from a file"
    if isinstance(exc, pickle.UnpicklingError) and (m := _GLOBAL_RE.search(str(exc))):
        return code.format(m.group(1))
    try:
        with path.open("rb") as f:
            head = f.read(4)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _ZIP_TAIL_BYTES))
            tail = f.read()
    except OSError as err:
        return f"cannot be read ({err.strerror or type(err).__name__})"
    if not head:
        return "the file is empty"
    if head == _ZIP_MAGIC:
        end = tail.rfind(_ZIP_END)
        comment_len = int.from_bytes(tail[end + 20 : end + 22], "little") if end >= 0 else 0
        if end < 0 or len(tail) - end < 22 + comment_len:
            return "truncated (its zip archive has no end record: the file ends early)"
        return f"a zip archive, but not one PyTorch saved ({_one_line(str(exc), 100)})"
    if head[:1] == b"\x80" and size <= _SCAN_MAX_BYTES:  # a raw pickle (protocol 2+)
        name = _pickled_global(path)
        if name:
            return code.format(name)
        if name == "":
            return "truncated (the pickle stream ends early)"
    if head[:1] == b"\x80":
        return f"not a PyTorch file saved by lbproxy ({_one_line(str(exc), 100) or type(exc).__name__})"
    return "not a PyTorch file (neither a zip archive nor a pickle)"


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a payload written by `save_checkpoint`/`save_model`; any problem -> CheckpointError.

    `weights_only=True`: only tensors, primitives and containers are unpickled; any other global
    (os.system, a class, a function) is refused before it is called."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; check the path (or train a model first)")
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": on a foreign file; the one-line error below says it all.
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, zip errors, ...
        raise CheckpointError(
            f"{path}: not a usable lbproxy checkpoint: {_load_failure(path, exc)}; delete it or point to another file"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path}: holds a {type(payload).__name__}, not an lbproxy checkpoint dict; point to a file lbproxy saved"
        )
    return payload


def save_model(path: Path, net: QNetwork, meta: Mapping[str, Any]) -> None:
    """Write a servable model: architecture, CPU weights and free-form primitive metadata."""
    state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
    save_checkpoint(Path(path), {"format": MODEL_FORMAT, "arch": net.arch(), "state_dict": state, "meta": dict(meta)})


def _find_weights(path: Path, payload: dict[str, Any]) -> Mapping[str, torch.Tensor]:
    """The online network's weights in a model file or in a full training checkpoint: a mapping of
    names to finite float tensors, else CheckpointError."""
    sd: Any = None
    if "state_dict" in payload:  # a model file
        sd = payload["state_dict"]
    else:
        learner = payload.get("learner", payload)  # a trainer payload, or a bare Learner.state_dict()
        if isinstance(learner, Mapping) and "online" in learner:
            sd = learner["online"]
    if sd is None:
        raise CheckpointError(
            f"{path}: contains no DQN weights (neither 'state_dict' nor a learner's 'online' network); "
            "pass a dqn_final.pth model or a training checkpoint"
        )
    named_tensors = isinstance(sd, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    )
    if not named_tensors:
        raise CheckpointError(f"{path}: its weights are not a state_dict of named tensors; pass a model lbproxy saved")
    for k, v in sd.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: weight {k!r} is {v.dtype}, not floating point; pass a model lbproxy saved")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(
                f"{path}: weight {k!r} holds NaN or inf (a diverged training run?); retrain the model"
            )
    weights: Mapping[str, torch.Tensor] = sd
    return weights


def arch_from_state_dict(path: Path, sd: Mapping[str, torch.Tensor]) -> dict[str, int | str]:
    """Infer QNetwork's shape from its weights, so old or foreign payloads are checked on shape."""
    if "body.0.weight" in sd:
        raise CheckpointError(
            f"{path}: a slot-indexed model of the old format (lbproxy-dqn/1), which does not generalise to "
            "other clusters; train a new one with `lbproxy --mode train --env sim --scenario generated`"
        )
    try:
        return {
            "name": ARCH_NAME,
            "hidden": int(sd["row_x.weight"].shape[0]),
            "summary": int(sd["static.weight"].shape[0]),
            "row_features": int(sd["row_x.weight"].shape[1]),
        }
    except (KeyError, AttributeError, IndexError, TypeError):
        raise CheckpointError(
            f"{path}: weights are not an lbproxy QNetwork (keys {sorted(sd)[:4]}...); pass a model lbproxy saved"
        ) from None


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[QNetwork, dict[str, Any]]:
    """(network in eval mode on `device`, meta). Accepts a model file or a full training checkpoint
    (its online network). Weights of another shape -> CheckpointError naming the problem."""
    path = Path(path)
    payload = load_checkpoint(path)
    fmt = payload.get("format")
    if "state_dict" in payload and fmt not in (None, MODEL_FORMAT):
        raise CheckpointError(f"{path}: model format {fmt!r} is not {MODEL_FORMAT!r}; retrain or convert the model")
    sd = _find_weights(path, payload)
    arch = arch_from_state_dict(path, sd)
    if not all(1 <= int(arch[k]) <= MAX_HIDDEN for k in ("hidden", "summary")):
        raise CheckpointError(f"{path}: network widths {arch} are outside 1..{MAX_HIDDEN}; pass a model lbproxy saved")
    if arch["row_features"] != ROW_FEATURES:
        raise CheckpointError(
            f"{path}: model reads {arch['row_features']} features per backend, this lbproxy encodes {ROW_FEATURES}; "
            "retrain the model with this version"
        )
    net = QNetwork(int(arch["hidden"]), int(arch["summary"]))
    try:
        net.load_state_dict(sd)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = _one_line(str(exc))
        raise CheckpointError(f"{path}: weights do not fit the network ({reason}); retrain the model") from None
    net.to(device).eval()
    meta = payload.get("meta", {})
    return net, dict(meta) if isinstance(meta, Mapping) else {}


def default_model_path() -> Path:
    """The shipped model (package data, produced by sim training). May not exist in a fresh tree."""
    return Path(__file__).resolve().parent.parent / "models" / "dqn_default.pth"
