"""The simulator: determinism, common random numbers, queueing sanity, faults, scenarios, errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from lbproxy import cli
from lbproxy.cluster import load_cluster
from lbproxy.observe import ClusterView, Outcome, is_accurate
from lbproxy.sim import (
    EpisodeResult,
    Fault,
    Scenario,
    ScenarioError,
    SedOracle,
    Simulator,
    list_scenarios,
    load_scenario,
)
from lbproxy.sim.arrivals import ArrivalStream
from lbproxy.sim.scenario import scenario_path

SHIPPED = ("curriculum", "homogeneous", "heterogeneous", "class_skew", "bursty", "degraded", "failure", "flash_crowd")


class RoundRobin:
    """Load-blind rotation (a test fixture: keeps sending to a sick server, which fault tests need)."""

    name = "rr"

    def __init__(self) -> None:
        self.k = 0

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        self.k += 1
        return view.candidates[self.k % len(view.candidates)]

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        pass


class LeastLoaded:
    """Fewest in flight, lowest index on ties (a second, load-aware fixture policy)."""

    name = "ll"

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        return min(view.candidates, key=lambda i: view.in_flight[i])

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        pass


@dataclass
class Recorder:
    """Wraps a policy and records what the simulator showed it."""

    inner: object
    name: str = "recorder"
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    in_system_at_arrival: list[int] = field(default_factory=list)
    outcomes: dict[int, tuple[Outcome, float]] = field(default_factory=dict)
    in_flight_at_observe: list[int] = field(default_factory=list)

    def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
        self.arrivals.append((now_s, req_class))
        self.in_system_at_arrival.append(view.total_in_flight)
        i = self.inner.choose(req_class, view, now_s)  # type: ignore[attr-defined]
        self.chosen.append(i)
        return i

    def observe(self, outcome: Outcome, view: ClusterView, now_s: float) -> None:
        assert outcome.decision_id not in self.outcomes
        self.outcomes[outcome.decision_id] = (outcome, now_s)
        self.in_flight_at_observe.append(view.total_in_flight)
        self.inner.observe(outcome, view, now_s)  # type: ignore[attr-defined]


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- determinism and common random numbers --------------------------------------------------------
def test_same_seed_same_results_different_seed_differs() -> None:
    sc = load_scenario("curriculum")

    def episode(seed: int) -> list[EpisodeResult]:
        sim = Simulator(sc, seed)
        out = [sim.run(SedOracle(sim), 300)]
        sim.set_phase(2)
        out.append(sim.run(LeastLoaded(), 300))
        return out

    a, b, c = episode(7), episode(7), episode(8)
    assert [r.summary for r in a] == [r.summary for r in b]
    assert [r.sim_time_s for r in a] == [r.sim_time_s for r in b]
    assert [r.summary for r in a] != [r.summary for r in c]


def test_common_random_numbers_across_policies() -> None:
    sc = load_scenario("heterogeneous")
    rec_a, rec_b = Recorder(RoundRobin()), Recorder(LeastLoaded())
    sim_a, sim_b = Simulator(sc, 3), Simulator(sc, 3)
    for phase in (0, 1):
        sim_a.set_phase(phase)
        sim_b.set_phase(phase)
        sim_a.run(rec_a, 400)
        sim_b.run(rec_b, 400)
    assert rec_a.arrivals == rec_b.arrivals
    assert rec_a.chosen != rec_b.chosen
    # The same unit-mean service draw per request, scaled by the chosen server's class mean.
    base = sim_a.servers.base_mean
    for d in range(800):
        (oa, _), (ob, _) = rec_a.outcomes[d], rec_b.outcomes[d]
        ua = oa.service_time_s / base[oa.req_class][oa.backend]  # type: ignore[operator]
        ub = ob.service_time_s / base[ob.req_class][ob.backend]  # type: ignore[operator]
        assert ua == pytest.approx(ub, rel=1e-12)


def test_arrival_stream_does_not_depend_on_block_size() -> None:
    sc = load_scenario("bursty")
    one = ArrivalStream(5, sc.cluster.service, burst_cycle_s=0.5)
    many = ArrivalStream(5, sc.cluster.service, burst_cycle_s=0.5)
    for s in (one, many):
        s.set_traffic(1000.0, (0.5, 0.4, 0.1), 2.0)
    t1, c1, u1, e1 = one.draw(3000)
    t2: list[float] = []
    c2: list[int] = []
    u2: list[float] = []
    e2: list[float] = []
    for n in (1, 999, 1000, 1000):
        t, c, u, e = many.draw(n)
        t2 += t
        c2 += c
        u2 += u
        e2 += e
    assert c1 == c2 and u1 == u2 and e1 == e2
    assert t1 == pytest.approx(t2, rel=1e-9)


def test_decision_ids_and_event_order() -> None:
    """Each decision is observed exactly once, by id, after view.on_complete has run."""
    sc = load_scenario("curriculum")
    sim = Simulator(sc, 1)
    rec = Recorder(RoundRobin())
    dispatched_before: list[int] = []
    r1 = sim.run(rec, 500)
    dispatched_before.append(500)
    r2 = sim.run(rec, 700)
    assert r1.decisions == 500 and r2.decisions == 700
    assert sorted(rec.outcomes) == list(range(1200))
    assert sim.decisions == 1200
    for d, (out, now) in rec.outcomes.items():
        t_arrival = rec.arrivals[d][0]
        assert now == pytest.approx(t_arrival + out.latency_s)
        assert out.backend == rec.chosen[d]


@pytest.mark.parametrize(("name", "start_s", "runs"), [("curriculum", None, 12), ("failure", 0.0, 14)])
def test_view_in_flight_is_physical_across_runs(name: str, start_s: float | None, runs: int) -> None:
    """At every arrival the view's in-flight count equals the requests really in the servers, also
    right after a run boundary, where the previous run's completions were reported ahead of time."""
    sc = load_scenario(name)
    sim = Simulator(sc, 2, phase=2, start_s=start_s)
    rec = Recorder(LeastLoaded())
    for k in range(runs):
        sim.set_phase(k % len(sc.phases))
        sim.run(rec, 600)
    arrivals = np.array([t for t, _ in rec.arrivals])
    finishes = np.array([rec.outcomes[d][1] for d in range(len(arrivals))])
    physical = [int((finishes[:k] > arrivals[k]).sum()) for k in range(len(arrivals))]
    assert rec.in_system_at_arrival == physical
    assert sim.view.total_in_flight == int((finishes > sim.now_s).sum()) == sum(sim.view.in_flight)


# --- queueing sanity --------------------------------------------------------------------------------
MG1 = """
[scenario]
name = "mg1"
[service]
distribution = "{dist}"
cv = {cv}
light_ms = 10.0
[[server]]
port = 8081
workers = 1
speed = 1.0
[[phase]]
name = "half"
load = 0.5
mix = {{ light = 1.0 }}
burstiness = 0.0
"""


@pytest.mark.parametrize(("dist", "cv2"), [("exponential", 1.0), ("constant", 0.0), ("lognormal", 0.5**2)])
def test_mg1_mean_latency_matches_pollaczek_khinchine(tmp_path: Path, dist: str, cv2: float) -> None:
    """One server, one worker, load 0.5: W = s + rho s (1 + cv^2) / (2 (1 - rho)); M/M/1 gives 2 s."""
    sc = load_scenario(_write(tmp_path, MG1.format(dist=dist, cv=math.sqrt(cv2) if cv2 else 1.0)))
    sim = Simulator(sc, 11)
    res = sim.run(RoundRobin(), 60_000, record=False)
    s, rho = 0.010, 0.5
    expected = s + rho * s * (1 + cv2) / (2 * (1 - rho))
    assert res.summary.mean_latency_s == pytest.approx(expected, rel=0.1)
    assert res.decisions / res.sim_time_s == pytest.approx(rho / s, rel=0.05)


def test_littles_law() -> None:
    """Mean number in system seen by Poisson arrivals (PASTA) = throughput x mean latency."""
    sim = Simulator(load_scenario("heterogeneous"), 4, phase=1)
    rec = Recorder(LeastLoaded())
    results = [sim.run(rec, 1000) for _ in range(30)]  # episode boundaries must not bias the view
    mean_in_system = sum(rec.in_system_at_arrival) / len(rec.in_system_at_arrival)
    throughput = sum(r.decisions for r in results) / sum(r.sim_time_s for r in results)
    mean_latency = sum(r.summary.mean_latency_s for r in results) / len(results)
    assert mean_in_system == pytest.approx(throughput * mean_latency, rel=0.08)


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_utilisation_tracks_offered_load(phase: int) -> None:
    sc = load_scenario("homogeneous")
    sim = Simulator(sc, 2, phase=phase)
    rec = Recorder(RoundRobin())
    res = sim.run(rec, 30_000, record=False)
    busy_s = sum(out.service_time_s for out, _ in rec.outcomes.values())  # type: ignore[misc]
    total_workers = sum(s.workers for s in sc.cluster.servers)
    assert busy_s / (res.sim_time_s * total_workers) == pytest.approx(sc.phases[phase].load, rel=0.06)


def test_bursty_preserves_mean_rate() -> None:
    sc = load_scenario("bursty")
    sim = Simulator(sc, 9, phase=2)
    res = sim.run(RoundRobin(), 40_000, record=False)
    ph = sc.phases[2]
    expected = ph.load * sc.cluster.capacity_rps(ph.mix)
    assert res.decisions / res.sim_time_s == pytest.approx(expected, rel=0.1)


# --- accuracy and the oracle ------------------------------------------------------------------------
def test_inline_accuracy_matches_observe_and_oracle_is_accurate() -> None:
    sc = load_scenario("class_skew")
    sim = Simulator(sc, 5, phase=1)

    class Checked(LeastLoaded):
        hits = 0

        def choose(self, req_class: int, view: ClusterView, now_s: float) -> int:
            i = super().choose(req_class, view, now_s)
            Checked.hits += is_accurate(i, view.in_flight, sim.true_rates[req_class], view.candidates)
            return i

    res = sim.run(Checked(), 2000)
    assert res.summary.accuracy == pytest.approx(Checked.hits / 2000)
    assert 0.0 < res.summary.accuracy < 1.0
    assert sim.run(SedOracle(sim), 2000).summary.accuracy == 1.0
    fast = sim.run(LeastLoaded(), 500, record=False)
    assert math.isnan(fast.summary.accuracy)


# --- faults -----------------------------------------------------------------------------------------
def _run_until(sim: Simulator, policy: object, until_s: float, step: int = 2000) -> None:
    for _ in range(200):  # bounded: 400k decisions at most
        if sim.now_s >= until_s:
            return
        sim.run(policy, step, record=False)  # type: ignore[arg-type]
    raise AssertionError("simulated time did not advance")


def test_degraded_server_slows_after_fault() -> None:
    sc = load_scenario("degraded")
    sim = Simulator(sc, 1, start_s=0.0)
    rec = Recorder(RoundRobin())
    _run_until(sim, rec, 20.0)
    slowed = next(f for f in sc.faults if f.slowdown == 5.0)
    before: list[float] = []
    after: list[float] = []
    for d, (out, _) in rec.outcomes.items():
        if out.backend != slowed.server:
            continue
        t = rec.arrivals[d][0]
        (before if t < slowed.at_s else after).append(out.latency_s)
    assert before and after
    assert sum(after) / len(after) > 3 * sum(before) / len(before)


def test_failure_errors_then_unavailable_then_recovers() -> None:
    """Health-check path (outlier ejection off): errors, fail-fast after the crash, unavailable after
    detect_s, available again at recovery."""
    sc = dataclasses.replace(load_scenario("failure"), eject_consecutive_failures=0)
    sim = Simulator(sc, 1, start_s=0.0)
    rec = Recorder(RoundRobin())
    b = sc.faults[0].server
    error_rate = sc.faults[0].error_rate
    assert error_rate
    t_err, t_crash, t_recover = 4.0, 8.0, 14.0
    _run_until(sim, rec, t_crash + sc.detect_s + 1.0)
    assert not sim.view.available[b]
    _run_until(sim, rec, 20.0)
    assert sim.view.available[b]

    def window(lo: float, hi: float) -> list[tuple[Outcome, float]]:
        return [(out, rec.arrivals[d][0]) for d, (out, _) in rec.outcomes.items() if lo <= rec.arrivals[d][0] < hi]

    healthy = [o for o, _ in window(0, t_err) if o.backend == b]
    erroring = [o for o, _ in window(t_err, t_crash) if o.backend == b]
    refused = [o for o, _ in window(t_crash, t_crash + sc.detect_s) if o.backend == b]
    detected = [o for o, _ in window(t_crash + sc.detect_s + 0.01, t_recover) if o.backend == b]
    recovered = [o for o, _ in window(t_recover, 20.0) if o.backend == b]
    assert healthy and not any(o.error for o in healthy)
    assert sum(o.error for o in erroring) / len(erroring) == pytest.approx(error_rate, abs=0.1)
    assert refused and all(o.error and o.latency_s == pytest.approx(0.001) for o in refused)
    assert detected == []  # unavailable: the policy no longer sees it
    assert recovered and not any(o.error for o in recovered)
    # requests in flight at the crash fail at the crash time
    killed = [
        (o, t)
        for o, t in window(t_crash - 0.5, t_crash)
        if o.backend == b and t + o.latency_s == pytest.approx(t_crash)
    ]
    assert killed


def test_outlier_ejection_stops_the_black_hole() -> None:
    """A crashed server fails fast, so to least_conn it looks idle and it draws the traffic; the proxy's
    consecutive-failure ejection (modelled by default) takes it out within a few requests, for
    eject_base_s, and never more than max_ejection_percent of the servers at once."""
    base = load_scenario("failure")
    b = base.faults[0].server
    crash, detect = 8.0, 8.0 + base.detect_s

    def crash_window_errors(sc: Scenario) -> tuple[int, Simulator]:
        sim = Simulator(sc, 4, start_s=7.0)  # after the errors began, before the crash
        rec = Recorder(LeastLoaded())
        _run_until(sim, rec, detect, step=200)
        refused = [o for d, (o, _) in rec.outcomes.items() if o.backend == b and crash <= rec.arrivals[d][0] < detect]
        return len(refused), sim

    without, _ = crash_window_errors(dataclasses.replace(base, eject_consecutive_failures=0))
    with_ejection, sim = crash_window_errors(base)
    assert without > 200  # the black hole: least_conn keeps choosing the "idle" crashed server
    assert with_ejection <= base.eject_consecutive_failures
    assert sim._ejected[b] and not sim.view.available[b]

    # max_ejection_percent: with 50 % of 4 servers, a third failing server is not ejected
    sc = dataclasses.replace(
        base,
        faults=tuple(Fault(0.0, i, error_rate=1.0) for i in range(3)),
        repeat_s=0.0,
        eject_base_s=1.0,
    )
    sim = Simulator(sc, 0, start_s=0.0)
    sim.run(RoundRobin(), 300)
    assert sum(sim._ejected) == 2 and len(sim.view.candidates) == 2
    # ejection ends after eject_base_s x times ejected (here 1 s); a server still failing returns to the
    # candidates and is ejected again, for longer
    rec = Recorder(RoundRobin())
    _run_until(sim, rec, 3.0, step=200)
    assert max(sim._times_ejected) >= 2


def test_flash_crowd_raises_arrival_rate() -> None:
    sc = load_scenario("flash_crowd")
    sim = Simulator(sc, 1, start_s=0.0)
    rec = Recorder(LeastLoaded())
    _run_until(sim, rec, 10.0)
    s = sc.surges[0]
    times = [t for t, _ in rec.arrivals]
    base = sum(1 for t in times if 0 <= t < s.at_s) / s.at_s
    surge = sum(1 for t in times if s.at_s <= t < s.at_s + s.duration_s) / s.duration_s
    assert surge / base == pytest.approx(s.factor, rel=0.1)


# --- scenarios ----------------------------------------------------------------------------------------
def test_shipped_scenarios_are_listed_and_load() -> None:
    names = [n for n, _ in list_scenarios()]
    assert set(SHIPPED) <= set(names)
    for name, summary in list_scenarios():
        sc = load_scenario(name)
        assert sc.name == name and summary and len(sc.phases) >= 1
        assert [s.port for s in sc.cluster.servers] == list(range(8081, 8081 + len(sc.cluster.servers)))
    assert load_scenario(None).name == "curriculum"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_scenario_runs_every_policy(name: str) -> None:
    import lbproxy.policies as policies_mod

    # The heuristics are written in parallel with the simulator; until they land, the fixtures stand in.
    make_policy = getattr(policies_mod, "make_policy", None)
    heuristics = list(getattr(policies_mod, "HEURISTICS", ())) if make_policy is not None else []
    sc = load_scenario(name)
    for phase in range(len(sc.phases)):
        sim = Simulator(sc, 0, phase=phase)
        fixtures: list[object] = [RoundRobin(), LeastLoaded(), SedOracle(sim)]
        for policy in [*(make_policy(h, 0) for h in heuristics), *fixtures]:  # type: ignore[misc]
            res = sim.run(policy, 500)  # type: ignore[arg-type]
            s = res.summary
            assert res.decisions == 500 and s.decisions == 500
            assert sum(res.load) == 500
            assert math.isfinite(s.mean_latency_s) and s.mean_latency_s > 0
            assert 0.0 <= s.gini <= 1.0 and 0.0 <= s.accuracy <= 1.0 and 0.0 <= s.error_rate <= 1.0


BAD = {
    "toml syntax": ("[[server]\nport = 1", "not valid TOML"),
    "no servers": ("[scenario]\nname = 'x'", "[[server]]"),
    "unknown table": ("[[server]]\nport = 8081\n[[faults]]\nat_s = 1", "unknown table(s) faults"),
    "unknown scenario key": ("[scenario]\nspeed = 2\n[[server]]\nport = 8081", "unknown key(s) speed"),
    "bad server key": ("[[server]]\nport = 8081\nsped = 2", "unknown key(s) sped"),
    "fault server": ("[[server]]\nport = 8081\n[[fault]]\nat_s = 1\nserver = 'zz'\ncrash = true", "server must be"),
    "fault empty": ("[[server]]\nport = 8081\n[[fault]]\nat_s = 1\nserver = 0", "needs one of"),
    "fault mixed": (
        "[[server]]\nport = 8081\n[[fault]]\nat_s = 1\nserver = 0\ncrash = true\nslowdown = 2",
        "stand alone",
    ),
    "negative load": ("[[server]]\nport = 8081\n[[phase]]\nload = -1", "load must be"),
    "bad mix": ("[[server]]\nport = 8081\n[[phase]]\nmix = { medium = 1 }", "mix keys"),
    "surge factor": ("[[server]]\nport = 8081\n[[surge]]\nat_s = 1\nduration_s = 1\nfactor = 0", "factor must be"),
    "fault past repeat": (
        "[scenario]\nrepeat_s = 5\n[[server]]\nport = 8081\n[[fault]]\nat_s = 6\nserver = 0\nslowdown = 2",
        "repeat_s",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenario_files_give_one_line_errors(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    path = _write(tmp_path, text, "bad.toml")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg and expected in msg and "bad.toml" in msg


def test_missing_and_unknown_scenarios(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "nope.toml")
    with pytest.raises(ScenarioError, match=r"unknown scenario 'nope'.*curriculum"):
        load_scenario("nope")
    assert isinstance(ScenarioError("x"), ValueError)


def test_scenario_file_is_also_a_cluster_file() -> None:
    """`python -m backends --cluster` reads the same file through lbproxy.cluster."""
    for name in SHIPPED:
        assert load_cluster(scenario_path(name)) == load_scenario(name).cluster


def test_scenario_faults_are_also_a_backend_fault_schedule() -> None:
    """`python -m backends --fault-schedule` applies the same [[fault]] tables to the real servers."""
    from backends.faults import load_schedule

    for name in SHIPPED:
        sc = load_scenario(name)
        for i, server in enumerate(sc.cluster.servers):
            schedule = load_schedule(scenario_path(name), server.name, i)
            assert schedule.repeat_s == sc.repeat_s
            sim = [f for f in sc.faults if f.server == i]
            assert [(f.at_s, f.slowdown, f.error_rate, f.crash, f.recover) for f in schedule.faults] == [
                (f.at_s, f.slowdown, f.error_rate, f.crash, f.recover) for f in sim
            ]


def test_list_scenarios_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list-scenarios"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED)


def test_record_false_changes_only_accuracy() -> None:
    sc = load_scenario("curriculum")
    a, b = Simulator(sc, 3, phase=2), Simulator(sc, 3, phase=2)
    ra, rb = a.run(LeastLoaded(), 3000), b.run(LeastLoaded(), 3000, record=False)
    assert math.isnan(rb.summary.accuracy) and not math.isnan(ra.summary.accuracy)
    rb.summary.accuracy = ra.summary.accuracy
    assert ra.summary == rb.summary and ra.load == rb.load


def test_phase_bounds_and_rates() -> None:
    sc = load_scenario("heterogeneous")
    sim = Simulator(sc, 0)
    with pytest.raises(ValueError, match=r"phase must be in 0\.\.2"):
        sim.set_phase(3)
    # true rates: workers x speed / class mean
    assert sim.true_rates[1] == pytest.approx([4 * s.speed / 0.050 for s in sc.cluster.servers])


def test_default_start_samples_the_fault_schedule() -> None:
    """Fresh Simulators (one per episode, as training and evaluation use them) land all over the schedule."""
    sc = load_scenario("failure")
    starts = [Simulator(sc, seed).start_s for seed in range(200)]
    assert starts == [Simulator(sc, seed).start_s for seed in range(200)]
    assert min(starts) >= 0.0 and max(starts) < sc.repeat_s
    assert Simulator(load_scenario("heterogeneous"), 3).start_s == 0.0
    b = sc.faults[0].server
    down = [Simulator(sc, seed) for seed in range(200)]
    # crash at 8 s, detected at 10 s, recovered at 14 s (period 40 s): ~10 % of starts see it unavailable
    unavailable = [s for s in down if not s.view.available[b]]
    assert all(10.0 <= s.start_s < 14.0 for s in unavailable)
    assert 5 <= len(unavailable) <= 40
    degraded = Simulator(load_scenario("degraded"), 0, start_s=20.0)
    assert degraded.true_rates[0][3] == pytest.approx(degraded.true_rates[0][2] / 5)
    res = degraded.run(RoundRobin(), 200)
    assert res.sim_time_s > 0 and degraded.now_s > 20.0
