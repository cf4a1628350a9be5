"""The simulator's traffic: arrival times, request classes and the per-request random numbers.

Everything a request brings with it is drawn here, before any policy sees it, from streams that
depend only on the seed and the phase sequence. That is what makes comparisons fair (common random
numbers): two Simulators with the same scenario and seed hand every policy the same arrival times,
the same classes, the same unit-mean service-time draw (scaled by the chosen server's mean for the
class, so a request is "the same amount of work" wherever it goes) and the same error draw.

Arrivals are a Poisson process whose rate is piecewise constant in time: the phase rate, times
(1 + burstiness) or 0 while an on/off burst modulation (MMPP with two states) is on or off, times a
flash-crowd factor inside a [[surge]] window. Times are generated in NumPy blocks by inverting the
cumulative intensity: unit-rate exponential gaps are summed and mapped segment by segment to time.
Each stream is consumed exactly once per arrival, so the same traffic comes out whether it is drawn
as one block or many (bit-identical draws; times equal up to float rounding).
"""

from __future__ import annotations

import math

import numpy as np

from lbproxy.cluster import ServiceSpec
from lbproxy.sim.scenario import Surge

# One SeedSequence child per stream, in this order (changing it changes every seeded result).
_STREAMS = ("gaps", "classes", "service", "errors", "bursts")


class ArrivalStream:
    """Draws blocks of arrivals; keeps the time of the last arrival and the burst state between blocks."""

    def __init__(
        self,
        seed: int,
        service: ServiceSpec,
        surges: tuple[Surge, ...] = (),
        repeat_s: float = 0.0,
        burst_cycle_s: float = 0.1,
    ) -> None:
        children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
        gens = [np.random.Generator(np.random.PCG64(c)) for c in children]
        self._g_gaps, self._g_classes, self._g_service, self._g_errors, self._g_bursts = gens
        self._service = service
        if service.distribution == "lognormal":
            # unit mean: E[exp(N(mu, s^2))] = exp(mu + s^2/2) = 1 with s^2 = ln(1 + cv^2)
            self._ln_sigma = math.sqrt(math.log1p(service.cv * service.cv))
            self._ln_mu = -0.5 * self._ln_sigma * self._ln_sigma
        self._surges = surges
        self._repeat_s = repeat_s
        self._burst_cycle_s = burst_cycle_s
        self.t_s = 0.0
        """Time of the last arrival drawn (0 before the first)."""
        self.rate_rps = 0.0
        self._cum_mix = np.array([1.0, 1.0, 1.0])
        self._burstiness = 0.0
        self._on = True
        self._switch_s = math.inf

    # --- configuration ------------------------------------------------------------------------------
    def set_traffic(self, rate_rps: float, mix: tuple[float, float, float], burstiness: float) -> None:
        """Applies from the next arrival on (the gap to it is drawn fresh: Poisson is memoryless)."""
        if rate_rps <= 0:
            raise ValueError(f"arrival rate must be positive, got {rate_rps}")
        self.rate_rps = rate_rps
        cum = np.cumsum(np.asarray(mix, dtype=float))
        self._cum_mix = cum / cum[-1]
        if burstiness <= 0.0:
            self._on, self._switch_s = True, math.inf
        elif self._burstiness <= 0.0:
            self._on = True
            self._burstiness = burstiness
            self._switch_s = self.t_s + self._sojourn()
        self._burstiness = burstiness

    def _sojourn(self) -> float:
        """Length of the next on (or off) period: on for 1/(1+b) of the cycle, off for b/(1+b)."""
        b = self._burstiness
        share = 1.0 / (1.0 + b) if self._on else b / (1.0 + b)
        return float(self._g_bursts.standard_exponential()) * self._burst_cycle_s * share

    # --- piecewise-constant intensity -----------------------------------------------------------------
    def _surge_at(self, t: float) -> tuple[float, float]:
        """(factor in force at t, time the factor next changes)."""
        if not self._surges:
            return 1.0, math.inf
        period = self._repeat_s
        base = math.floor(t / period) * period if period > 0 else 0.0
        local = t - base
        for s in self._surges:
            if local < s.at_s:
                return 1.0, base + s.at_s
            if local < s.at_s + s.duration_s:
                return s.factor, base + s.at_s + s.duration_s
        return 1.0, base + period if period > 0 else math.inf

    def _segment(self, t: float) -> tuple[float, float]:
        """(rate from t on, end of that constant-rate segment)."""
        factor, surge_end = self._surge_at(t)
        rate = self.rate_rps * factor
        if self._burstiness > 0.0:
            rate = rate * (1.0 + self._burstiness) if self._on else 0.0
        return rate, min(surge_end, self._switch_s)

    def _advance_bursts(self, t: float) -> None:
        while self._switch_s <= t:
            self._on = not self._on
            self._switch_s += self._sojourn()

    # --- drawing ------------------------------------------------------------------------------------
    def draw(self, n: int) -> tuple[list[float], list[int], list[float], list[float]]:
        """The next n arrivals: (times_s, classes, unit-mean service draws, uniform error draws).

        Python lists, not arrays: the engine indexes them once per request, and list indexing is
        several times cheaper than NumPy scalar indexing.
        """
        cum = np.cumsum(self._g_gaps.standard_exponential(n))
        times = np.empty(n)
        k, t, mass = 0, self.t_s, 0.0
        while k < n:
            rate, end = self._segment(t)
            if end <= t:  # a boundary lost to float rounding: step past it
                t = math.nextafter(t, math.inf)
                self._advance_bursts(t)
                continue
            if rate > 0.0:
                mass_end = mass + rate * (end - t)  # inf when the segment never ends
                k1 = int(np.searchsorted(cum, mass_end, side="right"))
                if k1 > k:
                    times[k:k1] = t + (cum[k:k1] - mass) / rate
                if k1 >= n:
                    break
                k, mass = k1, mass_end
            t = end
            self._advance_bursts(t)
        self.t_s = float(times[-1])
        classes = np.searchsorted(self._cum_mix, self._g_classes.random(n), side="right")
        np.minimum(classes, len(self._cum_mix) - 1, out=classes)
        dist = self._service.distribution
        if dist == "exponential":
            units = self._g_service.standard_exponential(n)
        elif dist == "lognormal":
            units = self._g_service.lognormal(self._ln_mu, self._ln_sigma, n)
        else:
            units = np.ones(n)
        errors = self._g_errors.random(n)
        return times.tolist(), classes.tolist(), units.tolist(), errors.tolist()
