"""A training run's directory, the same for both trainers (`--env sim`: train/sim.py, `--env live`:
train/live.py):

    RUN_DIR/checkpoints/dqn_episode_XXXX.pth   every checkpoint_every episodes (rl/checkpoint.py:
                                               atomic, state_dicts and primitives, weights_only)
    RUN_DIR/metrics/training_metrics.csv       a row every metrics_every episodes (train/report.py)
    RUN_DIR/logs/training_errors.log           the run's warnings and errors, appended (:class:`RunLog`)
    RUN_DIR/dqn_final.pth                      the model at the end (rl/checkpoint.save_model)

:meth:`RunDir.open` is the start of every run: `--resume` loads the newest checkpoint (one-line errors
when there is none, it does not load, or another trainer wrote it) and drops the CSV rows written
after it; a new run refuses a directory that already holds one. Either way the temp files of a save
cut short by SIGKILL are removed. What a trainer checks beyond that (the simulator's fingerprint,
the live network's shape) is its own.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from lbproxy.config import ConfigError
from lbproxy.rl.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_writes,
    save_checkpoint,
    save_model,
)
from lbproxy.rl.network import QNetwork
from lbproxy.telemetry import CsvMetricsWriter
from lbproxy.train.report import METRIC_FIELDS

ERROR_LOG = Path("logs") / "training_errors.log"
"""Where in RUN_DIR the warnings and errors of a run are kept (the prototype's Models/logs/training_errors.log)."""


class RunDir:
    """Paths and checkpoint bookkeeping of one training run (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.metrics_csv = self.root / "metrics" / "training_metrics.csv"
        self.final_model = self.root / "dqn_final.pth"
        self.log = RunLog(self.root / ERROR_LOG)

    def open(self, *, resume: bool, fmt: str, trainer: str) -> tuple[Path, dict[str, Any]] | None:
        """Start a run: with `resume`, the newest checkpoint and its payload (written by the trainer of
        format `fmt`, named `trainer` in errors), its later CSV rows dropped; without, None (a directory
        that holds a run is refused). ConfigError (one line) for every problem."""
        found = None
        if resume:
            path = latest_checkpoint(self.root)
            if path is None:
                raise ConfigError(f"--resume: no checkpoint in {self.checkpoints}; run without --resume to start")
            try:
                payload = load_checkpoint(path)
            except CheckpointError as exc:
                raise ConfigError(str(exc)) from None
            found_fmt = str(payload.get("format"))
            if found_fmt != fmt:
                older = found_fmt.split("/")[0] == fmt.split("/")[0]
                why = f"was written by an older lbproxy ({found_fmt})" if older else f"is not a {trainer} checkpoint"
                raise ConfigError(f"--resume: {path} {why}; this one resumes {fmt}: start a new --run-dir")
            self.truncate_csv(int(payload.get("episode", 0)))
            found = path, payload
        elif latest_checkpoint(self.root) is not None or self.final_model.exists():
            raise ConfigError(
                f"{self.root} already holds a training run; pass --resume to continue it or choose another --run-dir"
            )
        else:
            self.truncate_csv(0)  # rows of a run killed before its first checkpoint: not this run's
        remove_partial_writes(self.root)  # a save cut by SIGKILL: never a checkpoint, only litter
        return found

    @staticmethod
    @contextmanager
    def restoring(path: Path) -> Iterator[None]:
        """Around restoring the objects of a resumed run from `path`'s payload: a missing key or a
        state that does not fit becomes the one-line ConfigError that says what to do."""
        try:
            yield
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:120]
            raise ConfigError(
                f"{path} is an incomplete or incompatible training checkpoint ({type(exc).__name__}: {reason}); "
                "delete it to resume from an older one, or start a new --run-dir"
            ) from None

    def save_checkpoint(self, episode: int, payload: Mapping[str, Any], keep: int = 0) -> Path:
        """The checkpoint after `episode` episodes; with `keep` > 0 only the newest `keep` stay."""
        path = checkpoint_path(self.root, episode)
        save_checkpoint(path, payload)
        if keep > 0:
            prune_checkpoints(self.root, keep)
        return path

    def save_final(self, net: QNetwork, meta: Mapping[str, Any]) -> Path:
        save_model(self.final_model, net, meta)
        return self.final_model

    def metrics_writer(self) -> CsvMetricsWriter:
        return CsvMetricsWriter(self.metrics_csv, METRIC_FIELDS)

    def truncate_csv(self, last_episode: int) -> None:
        """Drop rows written after the checkpoint of `last_episode` (they will be written again), a row
        cut short by a SIGKILL included. Rewritten atomically: a kill meanwhile keeps the old file."""
        path = self.metrics_csv
        if not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        if not lines:
            return
        kept = [lines[0]]
        for line in lines[1:]:
            head = line.split(",", 1)[0]
            if head.isdigit() and int(head) <= last_episode and line.endswith("\n"):
                kept.append(line)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as fh:
            fh.write("".join(kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


class RunLog:
    """The warnings and errors of a run: on stderr as always, and appended with a timestamp to
    RUN_DIR/logs/training_errors.log, so a long run that hit trouble can be read afterwards. While
    `capturing()`, the `lbproxy` loggers' warnings and errors (guardrail switches, panic mode, ...) and
    Python warnings go there too. The file is created by the first entry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def warning(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        self.write("WARNING", message)

    def error(self, message: str, exc: BaseException | None = None) -> None:
        """`message` on stderr; in the file with `exc`'s traceback (for whoever reads it later)."""
        print(message, file=sys.stderr, flush=True)
        self.write("ERROR", message, exc)

    def write(self, level: str, message: str, exc: BaseException | None = None) -> None:
        """Append one entry to the file only."""
        text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {message}\n"
        if exc is not None:
            text += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(text)

    @contextmanager
    def capturing(self) -> Iterator[RunLog]:
        handler = _LogHandler(self)
        logger = logging.getLogger("lbproxy")
        # Before, with no handler anywhere, logging's last resort printed these records on stderr;
        # a handler of our own would silence it, so print them the same way meanwhile.
        console = None if logging.getLogger().handlers or logger.handlers else _console()
        for h in (handler, console):
            if h is not None:
                logger.addHandler(h)
        shown = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            self.write("WARNING", warnings.formatwarning(message, category, filename, lineno, line).strip())
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield self
        finally:
            warnings.showwarning = shown
            for h in (handler, console):
                if h is not None:
                    logger.removeHandler(h)


class _LogHandler(logging.Handler):
    def __init__(self, log: RunLog) -> None:
        super().__init__(logging.WARNING)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc = record.exc_info[1] if record.exc_info else None
            self._log.write(record.levelname, f"{record.name}: {record.getMessage()}", exc)
        except Exception:
            self.handleError(record)


def _console() -> logging.Handler:
    h = logging.StreamHandler(sys.stderr)
    h.setLevel(logging.WARNING)
    h.setFormatter(logging.Formatter("%(message)s"))
    return h


# --- global RNG state: captured once per simulator checkpoint --------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The global Python/NumPy/torch RNG states as primitives and tensors (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [str(np_name), [int(k) for k in np_keys], int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
