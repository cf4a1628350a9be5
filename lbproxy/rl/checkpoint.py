"""Checkpoints and model files: state_dicts and primitives only, written atomically, loaded with
`torch.load(weights_only=True)`.

Two kinds of file share this code:
- a training checkpoint (`checkpoints/*.pth`): whatever payload the trainer assembles (learner,
  replay, agent, episode counters) — only tensors, ndarrays-as-tensors, str/int/float/bool/None,
  lists, tuples and dicts, so loading never executes pickled code (SB3 does the same);
- a model (`dqn_final.pth`, the shipped `dqn_default.pth`): `{"format": MODEL_FORMAT, "arch",
  "state_dict", "meta"}`, everything serving needs and nothing else.

Writes go to a temp file in the same directory, are fsynced, then `os.replace`d over the target (and
the directory fsynced), so a crash mid-save leaves the previous file intact, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lbproxy.observe import ROW_FEATURES
from lbproxy.rl.network import ARCH_NAME, QNetwork

MODEL_FORMAT = "lbproxy-dqn/2"
"""/2: the permutation-equivariant network of rl/network.py (any backend count). /1 was the flat,
slot-indexed MLP of 2026-11; its files are refused with a one-line hint to retrain."""


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


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a payload written by `save_checkpoint`/`save_model`; any problem -> CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; check the path (or train a model first)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, zip errors, ...
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable lbproxy checkpoint (corrupt, truncated or not saved by lbproxy: {reason}); "
            "delete it or point to another file"
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
    """The online network's weights in a model file or in a full training checkpoint."""
    if "state_dict" in payload:  # a model file
        return payload["state_dict"]
    learner = payload.get("learner", payload)  # a trainer payload, or a bare Learner.state_dict()
    if isinstance(learner, Mapping) and "online" in learner:
        return learner["online"]
    raise CheckpointError(
        f"{path}: contains no DQN weights (neither 'state_dict' nor a learner's 'online' network); "
        "pass a dqn_final.pth model or a training checkpoint"
    )


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
    except (KeyError, AttributeError, IndexError):
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
    if arch["row_features"] != ROW_FEATURES:
        raise CheckpointError(
            f"{path}: model reads {arch['row_features']} features per backend, this lbproxy encodes {ROW_FEATURES}; "
            "retrain the model with this version"
        )
    net = QNetwork(int(arch["hidden"]), int(arch["summary"]))
    try:
        net.load_state_dict(sd)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"{path}: weights do not fit the network ({reason}); retrain the model") from None
    net.to(device).eval()
    meta = payload.get("meta", {})
    return net, dict(meta) if isinstance(meta, Mapping) else {}


def default_model_path() -> Path:
    """The shipped model (package data, produced by sim training). May not exist in a fresh tree."""
    return Path(__file__).resolve().parent.parent / "models" / "dqn_default.pth"
