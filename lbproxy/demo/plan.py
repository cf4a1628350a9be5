"""What one demo run does: its durations, seed, model and output folder (`Plan`), and the fixed parts
every run shares (the cluster scenario, the policies compared). The command line builds the plan; the
stages and the report only read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SCENARIO = Path(__file__).resolve().parents[1] / "sim" / "scenarios" / "curriculum.toml"
"""The cluster the demo starts (four emulated servers, one class-skewed). The shipped model never saw
it: it was trained on generated clusters (lbproxy/sim/generator.py), like any cluster a user brings."""
COMPARE_POLICIES = ("dqn", "round_robin", "least_conn", "p2c", "peak_ewma")

TRAIN_S = 180.0
"""Live training at full length: phases 1–3 at their lbproxy.phases durations (3 x 60 s)."""
COMPARE_S = 24.0
"""Each policy's replay; long enough for ~thousands of requests and a stable p99."""
QUICK_TRAIN_S = 30.0
QUICK_COMPARE_S = 5.0
PROGRESS_EVERY_S = 5.0
QUICK_PROGRESS_EVERY_S = 3.0


@dataclass
class Plan:
    run_dir: Path
    train_s: float
    compare_s: float
    progress_every_s: float
    seed: int
    with_prometheus: bool
    init_model: Path | None
    cluster_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cluster_file = self.run_dir / "cluster.toml"
