"""Which clusters a run trains on, and which ones it is evaluated on.

`--scenario NAME|FILE` trains on that one scenario; `--scenario generated` trains on a new generated
cluster every episode (lbproxy/sim/generator.py). Evaluation suites are lists of scenarios: the
held-out generated clusters (generator split "evaluation", never seen in training), the validation
clusters (split "validation": the only ones to tune on), and every shipped scenario.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from lbproxy.observe import learning_width
from lbproxy.sim.generator import GENERATED, MAX_GENERATED_BACKENDS, Split, generate_scenario
from lbproxy.sim.scenario import Scenario, ScenarioError, list_scenarios, load_scenario

TRAIN_SEED_STRIDE = 2**32
"""Training episode e of a run seeded s uses seed s * 2**32 + e, for the simulator and the generator."""

GENERATOR_VERSION = "generator/2"
"""Changes whenever generate_scenario draws differently: it is part of a run's fingerprint, so a
resume across a generator change is refused instead of silently training on other clusters."""


def train_sim_seed(seed: int, episode: int) -> int:
    """The simulator (and generator) seed of training episode `episode` (0-based) of a run seeded `seed`."""
    return seed * TRAIN_SEED_STRIDE + episode


def scenario_digest(scenario: Scenario) -> str:
    """Hash of what a scenario simulates (every field of the frozen dataclasses), without the file it
    came from or its summary, so a checkout that moved or a reworded summary still resumes."""
    fields = {k: v for k, v in dataclasses.asdict(scenario).items() if k not in ("source", "summary")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingSet:
    """The scenario of each training episode: one fixed scenario, or a generated cluster per episode."""

    name: str
    seed: int
    fixed: Scenario | None = None

    def scenario(self, episode: int) -> Scenario:
        if self.fixed is not None:
            return self.fixed
        return generate_scenario(train_sim_seed(self.seed, episode), "train")

    @property
    def width(self) -> int:
        """Rows of a learning state: room for the largest cluster of the set."""
        n = len(self.fixed.cluster.servers) if self.fixed is not None else MAX_GENERATED_BACKENDS
        return learning_width(n)

    @property
    def digest(self) -> str:
        return scenario_digest(self.fixed) if self.fixed is not None else GENERATOR_VERSION

    @property
    def phase_count(self) -> int:
        return len(self.fixed.phases) if self.fixed is not None else 1


def training_set(name: str | None, seed: int) -> TrainingSet:
    """`--scenario` as a TrainingSet (ScenarioError, one line, for an unknown name or a bad file)."""
    if name == GENERATED:
        return TrainingSet(GENERATED, seed)
    scenario = load_scenario(name)
    return TrainingSet(scenario.name, seed, scenario)


def generated_suite(split: Split, count: int, first: int = 0) -> list[Scenario]:
    return [generate_scenario(first + k, split) for k in range(count)]


def shipped_suite() -> list[Scenario]:
    return [load_scenario(name) for name, _summary in list_scenarios()]


def parse_suite(spec: str) -> list[Scenario]:
    """`evaluation:200`, `validation:50`, `shipped`, or several joined by `+` (e.g. `evaluation:200+shipped`)."""
    out: list[Scenario] = []
    for part in spec.split("+"):
        kind, _, count = part.strip().partition(":")
        if kind == "shipped" and not count:
            out.extend(shipped_suite())
        elif kind in ("evaluation", "validation") and count.isdigit() and int(count) > 0:
            out.extend(generated_suite(kind, int(count)))  # type: ignore[arg-type]
        else:
            raise ScenarioError(
                f"unknown suite part {part!r}; use evaluation:N, validation:N or shipped, joined by '+'"
            )
    return out


def describe(scenario: Scenario) -> dict[str, Any]:
    """A JSON-able one-line identity of a suite member."""
    return {"name": scenario.name, "summary": scenario.summary, "backends": len(scenario.cluster.servers)}
