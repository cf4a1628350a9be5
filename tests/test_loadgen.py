"""loadgen: the phase schedule (pure functions) and a real headless Locust run of loadgen/phases.py
against a real lbproxy and real backends, checked through Locust's CSV output."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from lbproxy.phases import PHASES
from loadgen import ScheduleError, build_schedule, phase_at, schedule_from_env, total_duration_s
from tests.support import REPO, running, start_backend, start_proxy

pytestmark = pytest.mark.timing

LOCUSTFILE = REPO / "loadgen" / "phases.py"
LOCUST_LIMIT_S = 90.0
"""Kill switch for the Locust child: the shape stops it after ~11 s; this only bounds a hang."""


def test_schedule_is_lbproxy_phases_scaled() -> None:
    schedule = build_schedule(scale=0.5)
    assert [p.name for p in schedule] == [p.name for p in PHASES]
    assert [p.number for p in schedule] == [1, 2, 3]
    for live, phase in zip(schedule, PHASES, strict=True):
        assert live.duration_s == phase.duration_s * 0.5
        assert (live.users, live.spawn_rate, live.mix, live.burstiness) == (
            phase.users,
            phase.spawn_rate,
            phase.mix,
            phase.burstiness,
        )


def test_overrides_and_phase_lookup() -> None:
    schedule = build_schedule(
        scale=0.1, durations="10,20,30", users="1,2,3", spawn_rates="5,5,5", mixes="1/0/0,0/1/0,0/0/1"
    )
    assert [p.duration_s for p in schedule] == pytest.approx([1.0, 2.0, 3.0])
    assert [p.users for p in schedule] == [1, 2, 3]
    assert schedule[2].mix == (0.0, 0.0, 1.0)
    assert total_duration_s(schedule) == pytest.approx(6.0)
    assert [phase_at(schedule, t).number for t in (0.0, 0.99, 1.0, 2.9, 3.0, 5.99)] == [1, 1, 2, 2, 3, 3]  # type: ignore[union-attr]
    assert phase_at(schedule, 6.0) is None


def test_schedule_from_env() -> None:
    schedule = schedule_from_env({"PHASE_SCALE": "0.01", "PHASE_USERS": "4,5,6"})
    assert [p.users for p in schedule] == [4, 5, 6]
    assert schedule[0].duration_s == pytest.approx(PHASES[0].duration_s * 0.01)


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"scale": 0.0}, "--phase-scale"),
        ({"durations": "1,2"}, "--phase-durations"),
        ({"users": "a,b,c"}, "--phase-users"),
        ({"spawn_rates": "1,-1,1"}, "--phase-spawn-rates"),
        ({"mixes": "1/1,1/1/1,1/1/1"}, "--phase-mixes"),
        ({"mixes": "0/0/0,1/1/1,1/1/1"}, "--phase-mixes"),
    ],
)
def test_bad_overrides_name_the_option(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ScheduleError, match=option):
        build_schedule(**kwargs)  # type: ignore[arg-type]


def _locust(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=LOCUST_LIMIT_S,
    )


def test_bad_override_exits_2_with_one_line(tmp_path: Path) -> None:
    result = _locust(["--host", "http://127.0.0.1:9", "--phase-users", "1,2"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "loadgen: --phase-users must be 3" in result.stderr


@pytest.mark.slow
def test_headless_run_covers_all_three_phases_without_failures(tmp_path: Path) -> None:
    backends = [start_backend(speed=1.0), start_backend(speed=2.0), start_backend("--class-speed", "heavy=0.25")]
    with running(*backends):
        proxy = start_proxy([b.url for b in backends], "--policy", "p2c")
        with running(proxy):
            # Durations by flag, scale and seed by environment: both ways of configuring are exercised.
            result = _locust(
                [
                    "--host",
                    proxy.url,
                    "--csv",
                    str(tmp_path / "run"),
                    "--csv-full-history",
                    "--phase-durations",
                    "60,60,60",
                ],
                REPO,
                env={"PHASE_SCALE": "0.06", "LB_SEED": "7"},
            )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    per_phase: dict[int, int] = defaultdict(int)
    failures = 0
    with (tmp_path / "run_stats.csv").open() as fh:
        for row in csv.DictReader(fh):
            failures += int(row["Failure Count"])
            if row["Name"].startswith("phase"):
                per_phase[int(row["Name"][5])] += int(row["Request Count"])
    assert failures == 0, f"requests failed: {(tmp_path / 'run_failures.csv').read_text()}"
    assert all(per_phase[n] > 0 for n in (1, 2, 3)), dict(per_phase)

    # The history (one row per name and second) shows the phases in order: phase 3 only after phase 1.
    first_seen: dict[int, float] = {}
    with (tmp_path / "run_stats_history.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["Name"].startswith("phase") and int(row["Total Request Count"]) > 0:
                first_seen.setdefault(int(row["Name"][5]), float(row["Timestamp"]))
    assert set(first_seen) == {1, 2, 3}
    assert first_seen[1] <= first_seen[2] <= first_seen[3]
