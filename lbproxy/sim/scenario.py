"""Simulator scenarios: one TOML file describes the cluster, the traffic phases and what goes wrong when.

The cluster part is exactly lbproxy/cluster.py's schema, so the same file starts real servers with
``python -m backends --cluster FILE`` and trains/evaluates in the simulator with ``--scenario FILE``.
Shipped scenarios live in ``lbproxy/sim/scenarios/`` (``lbproxy --list-scenarios``); SCENARIOS.md
beside this module repeats the schema below with a worked example.

Schema (TOML; every table is optional except ``[[server]]``)::

    [scenario]
    name = "degraded"            # default: the file name without .toml
    summary = "one line"         # shown by `lbproxy --list-scenarios`
    detect_s = 2.0               # seconds from a crash until health checks mark the server
                                 #   unavailable (default 2.0 = one health_interval_s)
    burst_cycle_s = 0.1          # mean on+off cycle of bursty arrivals, seconds (default 0.1)
    repeat_s = 0.0               # > 0: the whole [[fault]] / [[surge]] schedule repeats with this
                                 #   period, so long training runs see faults again (default 0 = once)
    eject_consecutive_failures = 5   # outlier ejection as the live proxy does it: after this many
    eject_base_s = 30.0              #   consecutive errors a server is unavailable for eject_base_s x
    max_ejection_percent = 50.0      #   times ejected, never more than this share of servers at once
                                     #   (defaults = the proxy's Settings defaults; 0 disables)
    reports_service_time = true  # whether servers report their service time to the proxy (ours do,
                                 #   in a header; most web servers do not: false hides it)

    [service]                    # as lbproxy/cluster.py: distribution, cv, light_ms, heavy_ms, static_ms
    [[server]]                   # as lbproxy/cluster.py: name, host, port, workers, speed, class_speed,
                                 #   error_rate; 1..16 tables

    [[phase]]                    # 0..n tables; none = the three standard phases of lbproxy/phases.py.
    name = "steady"              # Every key defaults to the standard phase with the same index
    load = 0.5                   #   (the last standard one past index 2). load: offered load as a
    mix = { light = 0.7, heavy = 0.2, static = 0.1 }   # fraction of cluster capacity; mix: class
    burstiness = 0.0             #   weights (table or [light, heavy, static] array); burstiness 0 =
    users = 16                   #   Poisson, b > 0 = on/off arrivals at (1 + b) x the mean rate while
    spawn_rate = 8               #   on, silent while off (mean preserved). users / spawn_rate /
    duration_s = 60              #   duration_s drive Locust on live HTTP only.

    [[fault]]                    # 0..n tables, applied at simulated time at_s
    at_s = 20.0                  # seconds on the simulated clock (>= 0; < repeat_s if set). A fresh
                                 #   Simulator starts its clock at a seed-drawn point of the schedule
                                 #   (Scenario.schedule_period_s), so short episodes sample all of it
    server = "fast"              # a [[server]] name, or its 0-based index
    slowdown = 5.0               # service time x this from now on (1.0 restores normal speed)
    error_rate = 0.5             # probability a request completes as an error (replaces the
                                 #   server's baseline error_rate; 0.0 restores health)
    crash = true                 # stops: queued and running requests fail at at_s, new ones fail
                                 #   fast (1 ms, connection refused); unavailable after detect_s
    recover = true               # back to baseline (up, idle, slowdown 1, its own error_rate) and
                                 #   available again at once; the same as backends/faults.py
                                 # (one table may combine slowdown and error_rate; crash and recover
                                 #  stand alone)

    [[surge]]                    # 0..n flash crowds
    at_s = 15.0                  # start, seconds
    duration_s = 5.0             # length, seconds
    factor = 2.0                 # arrival rate x factor while it lasts (> 0)

Mistakes raise :class:`ScenarioError` with one line naming the file, the table/key and the fix.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lbproxy.cluster import CLASS_NAMES, ClusterSpec, ClusterSpecError, cluster_from_dict
from lbproxy.phases import PHASES, Phase

DEFAULT_SCENARIO = "curriculum"
DETECT_S = 2.0
"""Crash detection delay: one active health-check interval (Settings.health_interval_s default, 2 s)."""
BURST_CYCLE_S = 0.1
"""Mean on+off period of bursty arrivals. Queue backlog grows with the cycle: at 0.5 s the backlog of
phase 3 (load 0.85, b = 1) on `homogeneous` reached ~1 s mean latency (~30x the service time) for
every policy alike, so arrivals rather than routing decided the outcome; at 0.1 s it is ~130 ms,
bursts of tens of requests build and drain within one 256-decision episode."""

# Outlier ejection: the live proxy's defaults (lbproxy/config.py, which takes them from Envoy).
EJECT_CONSECUTIVE_FAILURES = 5
EJECT_BASE_S = 30.0
MAX_EJECTION_PERCENT = 50.0

_TOP_KEYS = {"scenario", "service", "server", "phase", "fault", "surge"}
_SCENARIO_KEYS = {
    "name",
    "summary",
    "detect_s",
    "burst_cycle_s",
    "repeat_s",
    "eject_consecutive_failures",
    "eject_base_s",
    "max_ejection_percent",
    "reports_service_time",
}
_PHASE_KEYS = {"name", "load", "users", "spawn_rate", "duration_s", "mix", "burstiness"}
_FAULT_KEYS = {"at_s", "server", "slowdown", "error_rate", "crash", "recover"}
_SURGE_KEYS = {"at_s", "duration_s", "factor"}


class ScenarioError(ClusterSpecError):
    """A scenario file is malformed or missing; the one-line message names the file, key and fix.

    Subclasses ClusterSpecError (itself a ValueError) so a caller catching either sees it.
    """


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled change to one server; fields left None/False change nothing."""

    at_s: float
    server: int
    """0-based index into `Scenario.cluster.servers`."""
    slowdown: float | None = None
    error_rate: float | None = None
    crash: bool = False
    recover: bool = False


@dataclass(frozen=True, slots=True)
class Surge:
    """A flash crowd: the arrival rate is multiplied by `factor` during [at_s, at_s + duration_s)."""

    at_s: float
    duration_s: float
    factor: float


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    cluster: ClusterSpec
    phases: tuple[Phase, ...] = PHASES
    faults: tuple[Fault, ...] = ()
    detect_s: float = DETECT_S
    surges: tuple[Surge, ...] = ()
    burst_cycle_s: float = BURST_CYCLE_S
    repeat_s: float = 0.0
    eject_consecutive_failures: int = 5
    eject_base_s: float = 30.0
    max_ejection_percent: float = 50.0
    reports_service_time: bool = True
    """Outcomes carry the service time (as our backends' header does); False: only the latency."""
    source: str = ""
    """Where it was loaded from (file path), for messages."""

    @property
    def schedule_period_s(self) -> float:
        """Length of the fault/surge schedule a fresh Simulator's start time is drawn from.

        repeat_s when the schedule repeats; otherwise twice the time of the last event (crash
        detection and surge ends included), so half of the starts see the cluster after every fault;
        0 when there are no faults or surges.
        """
        if self.repeat_s > 0:
            return self.repeat_s
        ends = [f.at_s + (self.detect_s if f.crash else 0.0) for f in self.faults]
        ends += [s.at_s + s.duration_s for s in self.surges]
        return 2.0 * max(ends) if ends else 0.0


# --- parsing ---------------------------------------------------------------------------------------
def _table_list(data: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    raw = data.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ScenarioError(f"{where}: {key} must be written as [[{key}]] tables")
    return raw


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


def _number(
    table: dict[str, Any],
    key: str,
    default: float | None,
    where: str,
    *,
    minimum: float = 0.0,
    strict: bool = False,
    maximum: float = math.inf,
) -> float:
    """A finite number >= minimum (> minimum when strict) and <= maximum, or a one-line ScenarioError."""
    v = table.get(key, default)
    if v is None:
        raise ScenarioError(f"{where}: {key} is required")
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise ScenarioError(f"{where}: {key} must be a number, got {v!r}")
    if v < minimum or (strict and v == minimum) or v > maximum:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        if maximum < math.inf:
            bound += f" and <= {maximum:g}"
        raise ScenarioError(f"{where}: {key} must be {bound}, got {v!r}")
    return float(v)


def _mix(value: Any, where: str) -> tuple[float, float, float]:
    if isinstance(value, dict):
        bad = set(value) - set(CLASS_NAMES)
        if bad:
            raise ScenarioError(f"{where}: mix keys must be among {', '.join(CLASS_NAMES)}, got {sorted(bad)}")
        values = [value.get(c, 0.0) for c in CLASS_NAMES]
    elif isinstance(value, list | tuple) and len(value) == len(CLASS_NAMES):
        values = list(value)
    else:
        raise ScenarioError(f"{where}: mix must be {{ light = .., heavy = .., static = .. }} or a 3-number array")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values) or sum(values) <= 0:
        raise ScenarioError(f"{where}: mix weights must be non-negative numbers with a positive sum, got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def _phases(data: dict[str, Any], where: str) -> tuple[Phase, ...]:
    tables = _table_list(data, "phase", where)
    if not tables:
        return PHASES
    phases = []
    for k, t in enumerate(tables):
        w = f"{where} [[phase]] #{k + 1}"
        _check_keys(t, _PHASE_KEYS, w)
        base = PHASES[min(k, len(PHASES) - 1)]
        users = t.get("users", base.users)
        if not isinstance(users, int) or isinstance(users, bool) or users < 1:
            raise ScenarioError(f"{w}: users must be a positive integer, got {users!r}")
        phases.append(
            Phase(
                name=str(t.get("name", base.name)),
                load=_number(t, "load", base.load, w, strict=True, maximum=10.0),
                users=users,
                spawn_rate=_number(t, "spawn_rate", base.spawn_rate, w, strict=True),
                duration_s=_number(t, "duration_s", base.duration_s, w, strict=True),
                mix=_mix(t["mix"], w) if "mix" in t else base.mix,
                burstiness=_number(t, "burstiness", base.burstiness, w),
            )
        )
    return tuple(phases)


def _server_index(value: Any, cluster: ClusterSpec, where: str) -> int:
    names = [s.name for s in cluster.servers]
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(names):
            return value
        raise ScenarioError(f"{where}: server index {value} out of range 0..{len(names) - 1}")
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise ScenarioError(f"{where}: server must be one of {', '.join(names)} (or a 0-based index), got {value!r}")


def _faults(data: dict[str, Any], cluster: ClusterSpec, repeat_s: float, where: str) -> tuple[Fault, ...]:
    faults = []
    for k, t in enumerate(_table_list(data, "fault", where)):
        w = f"{where} [[fault]] #{k + 1}"
        _check_keys(t, _FAULT_KEYS, w)
        at_s = _number(t, "at_s", None, w)
        if repeat_s > 0 and at_s >= repeat_s:
            raise ScenarioError(f"{w}: at_s must be < [scenario] repeat_s ({repeat_s:g}), got {at_s:g}")
        if "server" not in t:
            raise ScenarioError(f"{w}: server is required (a [[server]] name or 0-based index)")
        crash, recover = t.get("crash", False), t.get("recover", False)
        if not isinstance(crash, bool) or not isinstance(recover, bool):
            raise ScenarioError(f"{w}: crash and recover must be true or false")
        slowdown = _number(t, "slowdown", None, w, strict=True) if "slowdown" in t else None
        error_rate = _number(t, "error_rate", None, w, maximum=1.0) if "error_rate" in t else None
        if (crash or recover) and (crash + recover + (slowdown is not None) + (error_rate is not None)) > 1:
            raise ScenarioError(f"{w}: crash and recover must stand alone in their [[fault]] table; split it")
        if not (crash or recover) and slowdown is None and error_rate is None:
            raise ScenarioError(f"{w}: needs one of slowdown, error_rate, crash = true or recover = true")
        faults.append(
            Fault(at_s, _server_index(t["server"], cluster, w), slowdown, error_rate, crash=crash, recover=recover)
        )
    faults.sort(key=lambda f: f.at_s)  # stable: same-time faults keep file order
    return tuple(faults)


def _surges(data: dict[str, Any], repeat_s: float, where: str) -> tuple[Surge, ...]:
    surges = []
    for k, t in enumerate(_table_list(data, "surge", where)):
        w = f"{where} [[surge]] #{k + 1}"
        _check_keys(t, _SURGE_KEYS, w)
        s = Surge(
            at_s=_number(t, "at_s", None, w),
            duration_s=_number(t, "duration_s", None, w, strict=True),
            factor=_number(t, "factor", None, w, strict=True),
        )
        if repeat_s > 0 and s.at_s + s.duration_s > repeat_s:
            raise ScenarioError(f"{w}: at_s + duration_s must be <= [scenario] repeat_s ({repeat_s:g})")
        surges.append(s)
    surges.sort(key=lambda s: s.at_s)
    for a, b in itertools.pairwise(surges):
        if b.at_s < a.at_s + a.duration_s:
            raise ScenarioError(f"{where}: [[surge]] at {a.at_s:g} s and {b.at_s:g} s overlap; make them disjoint")
    return tuple(surges)


def scenario_from_dict(data: dict[str, Any], where: str = "scenario", default_name: str = "scenario") -> Scenario:
    """Build a Scenario from parsed TOML; `where` prefixes every error message (usually the path)."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ScenarioError(
            f"{where}: unknown table(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    meta = data.get("scenario", {})
    if not isinstance(meta, dict):
        raise ScenarioError(f"{where}: scenario must be a [scenario] table")
    _check_keys(meta, _SCENARIO_KEYS, f"{where} [scenario]")
    w = f"{where} [scenario]"
    repeat_s = _number(meta, "repeat_s", 0.0, w)
    try:
        cluster = cluster_from_dict(data, where=where)
    except ScenarioError:
        raise
    except ClusterSpecError as exc:
        raise ScenarioError(str(exc)) from None
    eject_n = meta.get("eject_consecutive_failures", EJECT_CONSECUTIVE_FAILURES)
    if not isinstance(eject_n, int) or isinstance(eject_n, bool) or eject_n < 0:
        raise ScenarioError(f"{w}: eject_consecutive_failures must be an integer >= 0 (0 disables), got {eject_n!r}")
    reports = meta.get("reports_service_time", True)
    if not isinstance(reports, bool):
        raise ScenarioError(f"{w}: reports_service_time must be true or false, got {reports!r}")
    return Scenario(
        name=str(meta.get("name", default_name)),
        summary=str(meta.get("summary", "")),
        cluster=cluster,
        phases=_phases(data, where),
        faults=_faults(data, cluster, repeat_s, where),
        detect_s=_number(meta, "detect_s", DETECT_S, w),
        surges=_surges(data, repeat_s, where),
        burst_cycle_s=_number(meta, "burst_cycle_s", BURST_CYCLE_S, w, strict=True),
        repeat_s=repeat_s,
        eject_consecutive_failures=eject_n,
        eject_base_s=_number(meta, "eject_base_s", EJECT_BASE_S, w, strict=True),
        max_ejection_percent=_number(meta, "max_ejection_percent", MAX_EJECTION_PERCENT, w, maximum=100.0),
        reports_service_time=reports,
        source=where,
    )


def _shipped_dir() -> Path:
    return Path(str(resources.files("lbproxy.sim") / "scenarios"))


def scenario_path(name_or_path: str | Path | None) -> Path:
    """Resolve a shipped scenario name (``heterogeneous``) or a file path to a path."""
    if name_or_path is None:
        name_or_path = DEFAULT_SCENARIO
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(".toml"):
        return Path(text)
    path = _shipped_dir() / f"{text}.toml"
    if not path.is_file():
        names = ", ".join(name for name, _ in list_scenarios())
        raise ScenarioError(f"unknown scenario {text!r}; use a shipped name ({names}) or a path to a .toml file")
    return path


def load_scenario(name_or_path: str | Path | None = None) -> Scenario:
    """Load a shipped scenario by name or a TOML file by path; None gives the default curriculum."""
    path = scenario_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {str(path)!r} not found; check the path") from None
    except IsADirectoryError:
        raise ScenarioError(f"scenario path {str(path)!r} is a directory; give a .toml file") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not UTF-8 text; save the scenario as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    return scenario_from_dict(data, where=str(path), default_name=path.stem)


def list_scenarios() -> list[tuple[str, str]]:
    """(name, one-line summary) of every shipped scenario, sorted by name."""
    out = []
    for path in sorted(_shipped_dir().glob("*.toml")):
        try:
            meta = tomllib.loads(path.read_text(encoding="utf-8")).get("scenario", {})
            summary = str(meta.get("summary", "")) if isinstance(meta, dict) else ""
        except (OSError, tomllib.TOMLDecodeError):
            summary = "(unreadable)"
        out.append((path.stem, summary))
    return out
