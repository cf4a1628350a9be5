"""Stopping a simulator training run: the first SIGINT/SIGTERM finishes what is running (an episode,
or a round of the Ray trainer's), saves a checkpoint and exits with the shell's code for "stopped by
that signal"; a second one aborts at once (train/sim.py's module docstring says why)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_INTERRUPTED = 130
"""Exit code after SIGINT (Ctrl-C): checkpoint saved, run unfinished."""
EXIT_TERMINATED = 128 + int(signal.SIGTERM)
"""Exit code after SIGTERM (143): checkpoint saved, run unfinished; `--resume` continues it."""


class StopLatch:
    """The first SIGINT/SIGTERM sets a flag checked between episodes; a second one raises
    KeyboardInterrupt (abort now)."""

    def __init__(self, unit: str = "episode") -> None:
        self.signum: int | None = None
        self.unit = unit
        """What is finished before stopping (an episode, or a round of the Ray trainer's episodes)."""

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_TERMINATED if self.signum == signal.SIGTERM else EXIT_INTERRUPTED

    @property
    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "stop requested"

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        what = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
        print(f"\nlbproxy: {what}: finishing this {self.unit} and saving a checkpoint ...", file=sys.stderr, flush=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_latch(unit: str) -> Iterator[StopLatch]:
    """The latch installed as the SIGINT/SIGTERM handler meanwhile (none outside the main thread)."""
    latch = StopLatch(unit)
    try:
        previous = {sig: signal.signal(sig, latch) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread (e.g. called from a worker): no graceful stop
        yield latch
        return
    try:
        yield latch
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
