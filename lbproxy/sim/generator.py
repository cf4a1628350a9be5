"""A seeded cluster generator: the training distribution of the general routing model, and the
held-out evaluation suite drawn from the same distribution with seeds never used in training.

Domain randomisation (Tobin et al. 2017): a policy trained on one cluster learns that cluster (the
flat slot-indexed model of 2026-11 learned "slot 2 is fast"); trained on thousands of clusters that
differ in everything a real deployment can differ in, it has to learn what a fast, busy or failing
backend looks like instead. Each draw varies:

- size: 1-16 backends (2-16 log-uniform, small clusters being common; one backend 5 % of the time);
- speed: per-backend factors spanning up to 20x within a cluster, in a smooth spread or in tiers;
- workers (concurrency): 1-16 per backend, uniform across the cluster or not;
- class skew: some backends fast for light work and slow for heavy work (or the reverse);
- service-time distribution: exponential, lognormal (cv 0.5-3) or constant, and the time scale:
  light requests from ~1 ms to ~1 s, heavy 2-10x that, static a fraction;
- traffic: load 0.2-0.95 of capacity, class mix, on/off bursts, flash crowds;
- faults: slow-downs, error bursts, crashes with recovery, on a repeating schedule;
- observability: whether backends report their service time (ours do; most web servers do not).

Seeds. `generate_scenario(seed, split)` draws from `SeedSequence(seed, spawn_key=(split,))`, so the
"train", "validation" and "evaluation" splits are disjoint streams by construction: training never
sees a validation or evaluation cluster, and tuning happens on validation only.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from lbproxy.cluster import ClusterSpec, ServerSpec, ServiceSpec
from lbproxy.phases import Phase
from lbproxy.sim.scenario import DETECT_S, Fault, Scenario, Surge

Split = Literal["train", "validation", "evaluation"]
_SPLIT_KEY: dict[str, int] = {"train": 11, "validation": 12, "evaluation": 13}

GENERATED = "generated"
"""The --scenario name that trains on (and evaluates over) generated clusters."""

MAX_GENERATED_BACKENDS = 16
ONE_BACKEND_SHARE = 0.05
"""Share of one-backend clusters: they belong to the distribution (a model must not break on them), but
there is nothing to balance, so any policy's ratio is exactly 1.0 there."""
EPISODE_ARRIVALS = 384
"""Arrivals in one training/evaluation episode (warm-up + decisions, trainer defaults): the generator
sizes fault schedules in units of the time they take, so a fault lands inside episodes at any scale."""


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _speeds(rng: np.random.Generator, n: int) -> list[float]:
    spread = _log_uniform(rng, 1.0, 20.0) if rng.random() < 0.85 else 1.0
    if rng.random() < 0.5:  # smooth spread
        logs = rng.uniform(-0.5, 0.5, n) * math.log(spread)
    else:  # tiers: a few distinct machine types
        tiers = rng.uniform(-0.5, 0.5, int(rng.integers(1, 4))) * math.log(spread)
        logs = rng.choice(tiers, n)
    return [float(math.exp(v)) for v in logs]


def _workers(rng: np.random.Generator, n: int) -> list[int]:
    if rng.random() < 0.4:
        return [int(rng.integers(1, 17))] * n
    return [round(_log_uniform(rng, 1.0, 16.0)) for _ in range(n)]


def _class_speed(rng: np.random.Generator) -> tuple[float, float, float]:
    """Light, heavy and static speed factors on top of the backend's speed."""
    if rng.random() < 0.7:
        return (1.0, 1.0, 1.0)
    fast, slow = _log_uniform(rng, 1.5, 4.0), _log_uniform(rng, 0.2, 0.7)
    return (fast, slow, 1.0) if rng.random() < 0.6 else (slow, fast, 1.0)


def _service(rng: np.random.Generator) -> ServiceSpec:
    light = _log_uniform(rng, 0.001, 1.0)
    heavy = light * rng.uniform(2.0, 10.0)
    static = light * rng.uniform(0.1, 0.5)
    u = rng.random()
    if u < 0.45:
        return ServiceSpec("exponential", 1.0, (light, heavy, static))
    if u < 0.85:
        return ServiceSpec("lognormal", float(rng.uniform(0.5, 3.0)), (light, heavy, static))
    return ServiceSpec("constant", 1.0, (light, heavy, static))


def _mix(rng: np.random.Generator) -> tuple[float, float, float]:
    w = rng.dirichlet([2.0, 1.5, 0.7])
    return (float(w[0]), float(w[1]), float(w[2]))


def _faults(rng: np.random.Generator, n: int, period_s: float) -> tuple[Fault, ...]:
    """0-2 incidents on distinct backends, each inside the repeating period, each ending in recovery."""
    if n == 1 or rng.random() < 0.5:
        return ()
    faults: list[Fault] = []
    for server in rng.choice(n, size=min(n - 1, int(rng.integers(1, 3))), replace=False).tolist():
        start = float(rng.uniform(0.0, 0.6)) * period_s
        end = start + float(rng.uniform(0.15, 0.35)) * period_s
        kind = rng.random()
        if kind < 0.4:
            faults.append(Fault(start, server, slowdown=_log_uniform(rng, 2.0, 10.0)))
            faults.append(Fault(end, server, recover=True))
        elif kind < 0.7:
            faults.append(Fault(start, server, error_rate=float(rng.uniform(0.2, 1.0))))
            faults.append(Fault(end, server, recover=True))
        else:
            faults.append(Fault(start, server, crash=True))
            faults.append(Fault(end, server, recover=True))
    return tuple(sorted(faults, key=lambda f: f.at_s))


def generate_scenario(seed: int, split: Split = "train") -> Scenario:
    """One random cluster with its traffic and faults (module docstring); pure function of its arguments."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SPLIT_KEY[split],))))
    # One backend 5 % of the time (every policy routes it alike), else 2-16, log-uniform: small pools are common.
    n = 1 if rng.random() < ONE_BACKEND_SHARE else min(MAX_GENERATED_BACKENDS, round(_log_uniform(rng, 1.51, 16.49)))
    speeds, workers = _speeds(rng, n), _workers(rng, n)
    skews = [_class_speed(rng) for _ in range(n)]
    servers = tuple(
        ServerSpec(name=f"g{i}", port=8081 + i, workers=workers[i], speed=speeds[i], class_speed=skews[i])
        for i in range(n)
    )
    cluster = ClusterSpec(servers=servers, service=_service(rng))
    mix = _mix(rng)
    load = float(rng.uniform(0.2, 0.95))
    burstiness = float(rng.uniform(0.3, 2.0)) if rng.random() < 0.3 else 0.0
    phase = Phase("generated", load=load, users=16, spawn_rate=8, duration_s=60, mix=mix, burstiness=burstiness)
    episode_s = EPISODE_ARRIVALS / (load * cluster.capacity_rps(mix))
    period_s = episode_s * float(rng.uniform(2.0, 6.0))
    faults = _faults(rng, n, period_s)
    surges: tuple[Surge, ...] = ()
    if rng.random() < 0.2:
        dur = period_s * float(rng.uniform(0.05, 0.2))
        surges = (Surge(float(rng.uniform(0.0, period_s - dur)), dur, float(rng.uniform(1.2, 2.0))),)
    reports = bool(rng.random() < 0.5)
    summary = (
        f"{n} backends, speeds {min(speeds):.2g}-{max(speeds):.2g}, workers {min(workers)}-{max(workers)}, "
        f"{cluster.service.distribution} light {cluster.service.mean_s[0] * 1e3:.3g} ms, load {load:.2f}"
        f"{', bursty' if burstiness else ''}{f', {len(faults) // 2} incident(s)' if faults else ''}"
        f"{', surge' if surges else ''}{'' if reports else ', no service-time reports'}"
    )
    return Scenario(
        name=f"{GENERATED}-{split}-{seed}",
        summary=summary,
        cluster=cluster,
        phases=(phase,),
        faults=faults,
        detect_s=DETECT_S,
        surges=surges,
        burst_cycle_s=max(1e-3, episode_s / 4.0),
        repeat_s=period_s if faults or surges else 0.0,
        reports_service_time=reports,
        source=f"generator seed {seed} ({split})",
    )
