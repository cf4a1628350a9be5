"""Fault injection for one emulated backend: the live fault state, the admin-endpoint JSON and the
`--fault-schedule` TOML file that applies faults at fixed times after start.

The schedule file uses the `[[fault]]` tables of the simulator's scenario files (lbproxy/sim/scenario.py),
so one scenario file drives both the simulator and the real servers (`python -m backends --cluster F
--fault-schedule F`); `[scenario] repeat_s` repeats the schedule with that period as in the simulator,
other tables (`[[server]]`, `[[phase]]`, ...) are ignored here. Keys::

    [[fault]]
    at_s = 5.0          # seconds after the server started (required, >= 0)
    server = "fast"     # optional: only the server with this --name (or this 0-based index) applies it
    slowdown = 5.0      # service time x this from now on (1.0 restores)
    error_rate = 0.3    # probability of an injected 500 (replaces the baseline; 0.0 restores)
    pause_s = 2.0       # stop answering (requests hang, /health 503) for this many seconds
    crash = true        # exit at once with code 1
    recover = true      # back to the baseline: slowdown 1, baseline error rate, not paused; a launcher
                        #   restarts a crashed server at this time (the process cannot revive itself)

Times count from the schedule's epoch: the server's start, or the launcher's start for every server of
a cluster (so all servers share one clock and a restarted server resumes the schedule mid-way).
"""

from __future__ import annotations

import asyncio
import math
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAULT_KEYS = frozenset({"at_s", "server", "slowdown", "error_rate", "pause_s", "crash", "recover"})
ADMIN_KEYS = frozenset({"slowdown", "error_rate", "pause", "crash"})


class FaultError(ValueError):
    """A malformed fault request or schedule file; the message is one line naming the key and the fix."""


@dataclass(slots=True)
class FaultState:
    """What is currently wrong with this server. Mutated by admin requests and the schedule."""

    baseline_error_rate: float = 0.0
    slowdown: float = 1.0
    error_rate: float = 0.0
    paused: bool = False
    _unpaused: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.error_rate = self.baseline_error_rate

    @property
    def unpaused(self) -> asyncio.Event:
        # Created lazily so the Event binds to the running loop, not to the one alive at construction.
        if self._unpaused is None:
            self._unpaused = asyncio.Event()
            if not self.paused:
                self._unpaused.set()
        return self._unpaused

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        if paused:
            self.unpaused.clear()
        else:
            self.unpaused.set()

    async def wait_unpaused(self) -> None:
        """Hold a request while the server is paused (the client's own timeout ends the wait)."""
        if self.paused:
            await self.unpaused.wait()

    def reset(self) -> None:
        self.slowdown = 1.0
        self.error_rate = self.baseline_error_rate
        self.set_paused(False)

    def apply(self, spec: dict[str, Any]) -> bool:
        """Apply an admin `POST /admin/fault` body. Returns True when the caller must crash the process."""
        if not isinstance(spec, dict) or not spec:
            raise FaultError('fault body must be a JSON object such as {"slowdown": 5.0}')
        unknown = set(spec) - ADMIN_KEYS
        if unknown:
            raise FaultError(f"unknown fault key(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(ADMIN_KEYS))}")
        slowdown = _positive(spec, "slowdown") if "slowdown" in spec else None
        error_rate = _probability(spec, "error_rate") if "error_rate" in spec else None
        pause = _flag(spec, "pause") if "pause" in spec else None
        crash = _flag(spec, "crash") if "crash" in spec else False
        # Validate everything before changing anything: a bad request leaves the state as it was.
        if slowdown is not None:
            self.slowdown = slowdown
        if error_rate is not None:
            self.error_rate = error_rate
        if pause is not None:
            self.set_paused(pause)
        return crash

    def as_dict(self) -> dict[str, Any]:
        return {"slowdown": self.slowdown, "error_rate": self.error_rate, "paused": self.paused}


@dataclass(frozen=True, slots=True)
class ScheduledFault:
    """One `[[fault]]` table, already filtered to this server."""

    at_s: float
    slowdown: float | None = None
    error_rate: float | None = None
    pause_s: float | None = None
    crash: bool = False
    recover: bool = False


def _positive(table: dict[str, Any], key: str, where: str = "fault") -> float:
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise FaultError(f"{where}: {key} must be a positive number, got {v!r}")
    return float(v)


def _probability(table: dict[str, Any], key: str, where: str = "fault") -> float:
    v = table[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
        raise FaultError(f"{where}: {key} must be a number in [0, 1], got {v!r}")
    return float(v)


def _flag(table: dict[str, Any], key: str, where: str = "fault") -> bool:
    v = table[key]
    if not isinstance(v, bool):
        raise FaultError(f"{where}: {key} must be true or false, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class Schedule:
    """The faults of one server, sorted by time, and the period they repeat with (0 = once)."""

    faults: tuple[ScheduledFault, ...] = ()
    repeat_s: float = 0.0

    def occurrences(self, from_s: float) -> Iterator[tuple[float, ScheduledFault]]:
        """(time, fault) in time order, from the cycle before the one containing `from_s`: replaying that
        cycle rebuilds the state a server started at `from_s` would be in. Endless when repeating."""
        if not self.faults:
            return
        if self.repeat_s <= 0:
            yield from ((f.at_s, f) for f in self.faults)
            return
        cycle = max(0, int(from_s // self.repeat_s) - 1)
        while True:
            for f in self.faults:
                yield cycle * self.repeat_s + f.at_s, f
            cycle += 1

    def recovers_between(self, from_s: float, to_s: float) -> bool:
        """Whether a `recover` fault falls in (from_s, to_s]: a launcher restarts a crashed server then."""
        for t, f in self.occurrences(from_s):
            if t > to_s:
                return False
            if f.recover and t > from_s:
                return True
        return False


def load_schedule(path: Path, name: str, index: int | None = None) -> Schedule:
    """Read the `[[fault]]` tables of `path` that apply to server `name` (or `index`), sorted by time."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FaultError(f"fault schedule {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FaultError(f"fault schedule {str(path)!r} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FaultError(f"{path}: not valid TOML: {exc}") from None
    meta = data.get("scenario", {})
    repeat = meta.get("repeat_s", 0.0) if isinstance(meta, dict) else 0.0
    if isinstance(repeat, bool) or not isinstance(repeat, int | float) or repeat < 0:
        raise FaultError(f"{path}: [scenario] repeat_s must be a number >= 0, got {repeat!r}")
    raw = data.get("fault", [])
    if not isinstance(raw, list):
        raise FaultError(f"{path}: faults must be [[fault]] tables")
    out = []
    for i, t in enumerate(raw):
        where = f"{path} [[fault]] #{i + 1}"
        unknown = set(t) - FAULT_KEYS
        if unknown:
            raise FaultError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(FAULT_KEYS))}"
            )
        if "at_s" not in t:
            raise FaultError(f"{where}: at_s (seconds after start) is required")
        at = t["at_s"]
        if isinstance(at, bool) or not isinstance(at, int | float) or at < 0:
            raise FaultError(f"{where}: at_s must be a number >= 0, got {at!r}")
        target = t.get("server")
        if target is not None and not isinstance(target, str | int):
            raise FaultError(f"{where}: server must be a server name or a 0-based index, got {target!r}")
        fault = ScheduledFault(
            at_s=float(at),
            slowdown=_positive(t, "slowdown", where) if "slowdown" in t else None,
            error_rate=_probability(t, "error_rate", where) if "error_rate" in t else None,
            pause_s=_positive(t, "pause_s", where) if "pause_s" in t else None,
            crash=_flag(t, "crash", where) if "crash" in t else False,
            recover=_flag(t, "recover", where) if "recover" in t else False,
        )
        if repeat and fault.at_s >= repeat:
            raise FaultError(f"{where}: at_s must be < [scenario] repeat_s ({repeat}), got {fault.at_s}")
        if target is None or target == name or (isinstance(target, int) and target == index):
            out.append(fault)
    return Schedule(tuple(sorted(out, key=lambda f: f.at_s)), float(repeat))


async def run_schedule(schedule: Schedule, state: FaultState, crash: Callable[[], None], start_s: float = 0.0) -> None:
    """Apply each fault at its time; the schedule's clock reads `start_s` now. Faults already past are
    replayed at once to rebuild the state (slowdown, error rate, a pause still running), except crashes.
    `crash()` ends the process. Runs as a background task for the server's lifetime."""
    loop = asyncio.get_running_loop()
    epoch = loop.time() - start_s
    for at, fault in schedule.occurrences(start_s):
        now_s = loop.time() - epoch
        past = at < now_s
        if not past:
            await asyncio.sleep(at - now_s)
        if fault.recover:
            state.reset()
        if fault.slowdown is not None:
            state.slowdown = fault.slowdown
        if fault.error_rate is not None:
            state.error_rate = fault.error_rate
        if fault.pause_s is not None:
            left_s = at + fault.pause_s - (loop.time() - epoch)
            if left_s > 0:
                state.set_paused(True)
                loop.call_later(left_s, state.set_paused, False)
        if fault.crash and not past:
            crash()
