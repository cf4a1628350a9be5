"""The guardrail on seeded synthetic traffic: real Guardrail objects, simulated clock, no mocks.

Latencies are lognormal (sigma 0.5: the shape of a backend's service time with some queueing) around a
per-class median; the DQN arm's latencies are the control's times `dqn_factor`, and fail with
probability `dqn_error` (the control's with `control_error`). Each simulated second sends `rate_hz`
requests per class through the guardrail's own coin (`route_by_fallback`) and then calls `evaluate`,
as the policy's 1 s task will.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from lbproxy.guardrail import MAX_HOLD_S, WINDOW_MAX_SAMPLES, WINDOW_TARGET_SAMPLES, Guardrail
from lbproxy.observe import NUM_CLASSES
from lbproxy.telemetry import Metrics

CLASS_MEDIAN_S = (0.02, 0.2, 0.005)
"""Light, heavy, static: 10-40x apart, as the emulated backends' classes are."""
LATENCY_SIGMA = 0.5


def drive(
    g: Guardrail,
    rng: np.random.Generator,
    start_s: float,
    seconds: int,
    rate_hz: int,
    *,
    dqn_factor: float = 1.0,
    dqn_error: float = 0.0,
    control_error: float = 0.0,
    classes: tuple[int, ...] = tuple(range(NUM_CLASSES)),
    every_second: bool = True,
) -> list[tuple[float, bool]]:
    """Up to `seconds` simulated seconds of traffic, one evaluation at the end of each (or only of the
    last): [(time, changed)], ending at the first evaluation that changed the state."""
    events: list[tuple[float, bool]] = []
    for k in range(seconds):
        t0 = start_s + k
        for c in classes:
            times = (t0 + np.sort(rng.random(rate_hz))).tolist()
            lat = rng.lognormal(math.log(CLASS_MEDIAN_S[c]), LATENCY_SIGMA, rate_hz).tolist()
            u = rng.random(rate_hz).tolist()
            for t, x, v in zip(times, lat, u, strict=True):
                if g.route_by_fallback(c):
                    g.record(c, True, x, v < control_error, t)
                else:
                    g.record(c, False, x * dqn_factor, v < dqn_error, t)
        t = t0 + 1.0
        if every_second or k == seconds - 1:
            events.append((t, g.evaluate(t)))
            if events[-1][1]:
                break
    return events


def described(g: Guardrail) -> dict[str, Any]:
    """describe() as the admin endpoint's client sees it (strict JSON: no Infinity or NaN)."""
    return dict(json.loads(json.dumps(g.describe(), allow_nan=False)))


def first_change(events: list[tuple[float, bool]]) -> float | None:
    return next((t for t, changed in events if changed), None)


def trip(g: Guardrail, rng: np.random.Generator, start_s: float, rate_hz: int = 1000) -> float:
    """Drive a 2x slower DQN on the light class until the guardrail trips; the trip time."""
    t = first_change(drive(g, rng, start_s, 10, rate_hz, dqn_factor=2.0, classes=(0,)))
    assert t is not None and g.tripped
    return t


@pytest.mark.parametrize(("margin", "max_trips"), [(0.0, 4), (0.10, 0)])
def test_same_distributions_false_trips(margin: float, max_trips: int) -> None:
    """200 independent windows, both arms from one distribution, 30-125 control samples per class.

    With margin 0 the trip is the bare Bonferroni test at alpha = 0.01 (expected <= 2 of 200; measured 0
    here, 5 in 1000 such windows); with the default margin the latency tests are shifted by 10 % and the
    point estimates must exceed it too (measured 0 here, 1 in 1000)."""
    trips = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        g = Guardrail(margin=margin, seed=seed)
        rate_hz = int(rng.integers(60, 250))  # the control arm: 5 % of 10 s of it, 30-125 requests
        trips += first_change(drive(g, rng, 0.0, 10, rate_hz, every_second=False)) is not None
    assert trips <= max_trips


def test_same_distributions_never_trip_over_a_long_run() -> None:
    """200 consecutive evaluations (overlapping windows) of one guardrail on equal arms."""
    g = Guardrail()
    events = drive(g, np.random.default_rng(7), 0.0, 200, 150)
    assert not any(changed for _t, changed in events)
    assert g.switches == 0 and not g.tripped
    assert all(described(g)["classes"][name]["tested"] for name in ("light", "heavy", "static"))


def test_a_small_difference_on_a_large_sample_does_not_trip() -> None:
    """3 % slower at 2000 requests/s: significant without the margin, far inside it."""
    g = Guardrail()
    events = drive(g, np.random.default_rng(14), 0.0, 40, 2000, dqn_factor=1.03, classes=(0,))
    assert first_change(events) is None
    cmp = g.last[0]
    assert cmp is not None and cmp.control.n > 500 and 0.0 < cmp.effect["median"] < g.margin


def test_equal_error_rates_do_not_trip() -> None:
    g = Guardrail()
    events = drive(g, np.random.default_rng(15), 0.0, 100, 150, dqn_error=0.05, control_error=0.05)
    assert first_change(events) is None
    assert all(c is not None and c.control.error_rate > 0.0 for c in g.last)


def test_slower_dqn_trips_at_the_first_evaluation_with_min_samples(caplog: pytest.LogCaptureFixture) -> None:
    g = Guardrail()
    rng = np.random.default_rng(1)
    tested_before = []
    with caplog.at_level(logging.WARNING, logger="lbproxy.guardrail"):
        for k in range(20):
            ((_t, changed),) = drive(g, rng, float(k), 1, 100, dqn_factor=2.0)
            tested = any(cmp is not None for cmp in g.last)
            if changed:
                break
            tested_before.append(tested)
    assert g.tripped and g.switches == 1
    assert tested and not any(tested_before), "it tripped on the first evaluation that had min_samples"
    lines = [r.getMessage() for r in caplog.records if r.name == "lbproxy.guardrail"]
    assert len(lines) == 1 and "tripped: class" in lines[0] and "p=" in lines[0]
    assert "DQN n=" in lines[0] and "control n=" in lines[0]


def test_erroring_dqn_trips() -> None:
    g = Guardrail()
    t = first_change(drive(g, np.random.default_rng(2), 0.0, 20, 100, dqn_error=0.3))
    assert t is not None and g.tripped


def test_rare_dqn_errors_trip_through_the_error_test(caplog: pytest.LogCaptureFixture) -> None:
    """3 % errors barely move the median or p90: the Fisher test on error counts catches them."""
    g = Guardrail()
    with caplog.at_level(logging.WARNING, logger="lbproxy.guardrail"):
        t = first_change(drive(g, np.random.default_rng(3), 0.0, 20, 600, dqn_error=0.03))
    assert t is not None
    assert "worse on errors" in caplog.records[-1].getMessage()
    cmp = next(c for c in g.last if c is not None and c.p["errors"] < g.last_threshold)
    assert cmp.effect["median"] < g.margin and cmp.effect["p90"] < g.margin


def test_recovery_waits_for_min_trip_s() -> None:
    g = Guardrail(min_trip_s=8.0)
    rng = np.random.default_rng(4)
    t_trip = trip(g, rng, 0.0)
    streaks = []
    recovered = None
    for k in range(30):
        ((t, changed),) = drive(g, rng, t_trip + k, 1, 1000, classes=(0,))
        if changed:
            recovered = t
            break
        streaks.append(described(g)["good_evaluations"])
    assert recovered is not None and not g.tripped and g.switches == 2
    assert recovered - t_trip >= 8.0
    assert max(streaks) >= 3, "3 good evaluations came before the hold ended; the hold held"


def test_recovery_needs_three_consecutive_good_evaluations() -> None:
    g = Guardrail(min_trip_s=0.0)
    rng = np.random.default_rng(5)
    t_trip = trip(g, rng, 0.0)
    streaks: list[object] = []
    for k in range(30):
        ((_t, changed),) = drive(g, rng, t_trip + k, 1, 1000, classes=(0,))
        if changed:
            break
        streaks.append(described(g)["good_evaluations"])
    assert not g.tripped
    assert streaks[-2:] == [1, 2], streaks


def test_a_still_slower_dqn_does_not_recover() -> None:
    g = Guardrail(min_trip_s=1.0)
    rng = np.random.default_rng(6)
    t_trip = trip(g, rng, 0.0)
    events = drive(g, rng, t_trip, 30, 1000, dqn_factor=2.0, classes=(0,))
    assert g.tripped and not any(changed for _t, changed in events)
    light = described(g)["classes"]["light"]
    assert light["tested"] and light["window_n"]["dqn"] > 30


def test_backoff_doubles_on_a_quick_retrip_and_resets_after_a_good_spell() -> None:
    g = Guardrail(min_trip_s=2.0)
    rng = np.random.default_rng(8)
    t = 0.0
    holds = []
    for _ in range(3):
        t = trip(g, rng, t)
        holds.append(g.hold_s)
        recovered = first_change(drive(g, rng, t, 30, 1000, classes=(0,)))
        assert recovered is not None and recovered - t >= g.hold_s
        t = recovered
    assert holds == [2.0, 4.0, 8.0]
    # A DQN that stayed good for longer than QUICK_RETRIP_WINDOWS windows (60 s) starts from min_trip_s.
    assert first_change(drive(g, rng, t, 70, 1000, classes=(0,))) is None
    trip(g, rng, t + 70)
    assert g.hold_s == 2.0


def test_backoff_is_capped() -> None:
    g = Guardrail(min_trip_s=200.0)
    rng = np.random.default_rng(9)
    t = trip(g, rng, 0.0, rate_hz=700)
    recovered = first_change(drive(g, rng, t, 220, 700, classes=(0,)))
    assert recovered is not None and recovered - t >= 200.0
    trip(g, rng, recovered, rate_hz=700)
    assert g.hold_s == MAX_HOLD_S


def test_route_by_fallback_shares_and_reproducibility() -> None:
    n = 200_000
    tolerance = 0.003  # ~6 standard errors of a 5 % share over 200k draws
    g = Guardrail(control_share=0.05, probe_share=0.10, seed=11)
    assert abs(sum(g.route_by_fallback(0) for _ in range(n)) / n - 0.05) < tolerance
    trip(g, np.random.default_rng(10), 0.0)
    assert abs(sum(g.route_by_fallback(1) for _ in range(n)) / n - 0.90) < tolerance
    a, b = Guardrail(seed=3), Guardrail(seed=3)
    assert [a.route_by_fallback(0) for _ in range(1000)] == [b.route_by_fallback(2) for _ in range(1000)]


def test_windows_expire() -> None:
    g = Guardrail(window_s=10.0)
    for i in range(100):
        g.record(0, False, 0.01, False, i * 0.01)
        g.record(0, True, 0.01, False, i * 0.01)
    g.evaluate(5.0)
    assert described(g)["classes"]["light"]["window_n"] == {"dqn": 100, "control": 100}
    assert g.last[0] is not None  # both arms have min_samples
    g.evaluate(10.5)  # samples at 0 .. 0.49 s are older than the 10 s window
    assert described(g)["classes"]["light"]["window_n"] == {"dqn": 50, "control": 50}
    g.evaluate(11.0)
    assert described(g)["classes"]["light"]["window_n"] == {"dqn": 0, "control": 0}
    assert g.last[0] is None


def test_high_traffic_is_thinned_not_truncated() -> None:
    """20k requests/s of one class: the DQN window stays under its caps and still spans the whole window."""
    g = Guardrail(window_s=10.0)
    rate_hz = 20_000
    for k in range(15):
        for i in range(rate_hz):
            g.record(0, False, 0.01, False, k + i / rate_hz)
        g.evaluate(k + 1.0)
    times = g._windows[0][0].times
    assert len(times) <= WINDOW_MAX_SAMPLES
    assert abs(len(times) - WINDOW_TARGET_SAMPLES) < 0.05 * WINDOW_TARGET_SAMPLES
    assert times[0] < 15.0 - 0.95 * g.window_s, "thinning keeps the oldest part of the window"


def test_describe_is_json_serialisable_with_errors_in_the_window() -> None:
    g = Guardrail()
    drive(g, np.random.default_rng(12), 0.0, 12, 100, dqn_error=0.6)
    d = described(g)
    assert d["state"] == "tripped" and d["switches"] == 1
    assert d["settings"]["alpha"] == 0.01
    # The evaluation that tripped is kept: the DQN arm's median is an error (null), p-values are numbers.
    tested = [v for v in d["classes"].values() if v["tested"]]
    assert tested and any(v["dqn"]["median_ms"] is None for v in tested)
    assert all(isinstance(v["p"]["median"], float) for v in tested)


def test_metrics_hooks_update_a_real_registry() -> None:
    metrics = Metrics(CollectorRegistry())
    reg = metrics.registry

    def sample(name: str, labels: dict[str, str] | None = None) -> float | None:
        return reg.get_sample_value(name, labels or {})

    assert sample("lbproxy_guardrail_switches_total", {"to": "fallback"}) == 0.0
    assert sample("lbproxy_guardrail_switches_total", {"to": "dqn"}) == 0.0
    assert sample("lbproxy_guardrail_tripped") == 0.0
    g = Guardrail(min_trip_s=1.0, on_switch=metrics.guardrail_switched)
    rng = np.random.default_rng(13)
    t = trip(g, rng, 0.0)
    assert sample("lbproxy_guardrail_switches_total", {"to": "fallback"}) == 1.0
    assert sample("lbproxy_guardrail_tripped") == 1.0
    assert first_change(drive(g, rng, t, 30, 1000, classes=(0,))) is not None
    assert sample("lbproxy_guardrail_switches_total", {"to": "dqn"}) == 1.0
    assert sample("lbproxy_guardrail_tripped") == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"control_share": 0.0}, {"probe_share": 1.0}, {"alpha": 0.0}, {"min_samples": 1}, {"window_s": 0.0}],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="guardrail"):
        Guardrail(**kwargs)
