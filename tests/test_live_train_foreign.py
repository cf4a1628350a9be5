"""Live DQN training from scratch on foreign backends (benchmarks/live_train_foreign.py, bounded): under
open-loop load the trainer fails no request, keeps its p99 near the fallback heuristic's on the same
schedule, and on SIGTERM exits 0 with a final model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from support import REPO

from loadgen.open_loop import poisson_schedule

sys.path.insert(0, str(REPO / "benchmarks"))
from foreign_cluster import start_foreign_cluster
from live_compare import measure, pinned_self
from live_train_tables import series, slice_summary
from live_training import FALLBACK, train

pytestmark = pytest.mark.timing

needs_gunicorn = pytest.mark.skipif(
    importlib.util.find_spec("gunicorn") is None, reason="gunicorn is not installed (it is in the dev extra)"
)

WORKERS = (1, 2, 4)
SPEED = 0.5
LOAD = 0.6
"""99 req/s on 7 workers at speed 0.5 (capacity 165 req/s)."""
MIX = (0.6, 0.3, 0.1)
TRAIN_S = 25.0
P99_OVER_FALLBACK_MAX = 3.0
"""Training p99 over peak_ewma's on the same schedule must stay below this (the benchmark's target is 1.5x at
0.8 load over 5 minutes). Observed 0.90, 1.00, 1.28 in three runs on 2026-12-01 morning, 2.17, 1.79 and
(probe runs of the same code) 0.9-1.3 in the evening: a 25-second run's p99 is its 25th-slowest request, and
the worst 5 seconds are when learning starts (after 1000 transitions, ~10 s here), whose first updates
share the proxy's core; that slice's p99 was 656-985 ms against 344-480 ms in the others. Random routing
from scratch, which this guards against, gave ~50x (26 s p99, 11.5 % failed). On 2026-12-03 evening one
fresh-clone CI run read 5.70 (2611 against 458 ms; the second half alone 518 ms, 1.13x): the spike is the
start of learning, and the suite's one rerun passed (1.5x over 5 minutes is the benchmark's claim, this
test's bound is the outage guard)."""


@pytest.mark.slow
@needs_gunicorn
def test_live_training_from_scratch_fails_nothing_and_stays_near_the_fallback(tmp_path: Path) -> None:
    with start_foreign_cluster(WORKERS, SPEED, cpu=1) as cluster, pinned_self(1):
        rate = LOAD * cluster.capacity_rps(MIX)
        schedule = poisson_schedule(rate, TRAIN_S, seed=3, mix=MIX)
        tr = train(cluster, schedule, tmp_path / "run", grace_s=10.0, sample_every_s=1.0)
        fb = measure(cluster, FALLBACK, schedule, warmup_s=0.0, grace_s=10.0)
    t, f = tr.measurement.summary, fb.summary
    assert tr.exit_code == 0, tr.log[-3000:]
    assert "Traceback" not in tr.log, tr.log[-3000:]
    assert tr.model is not None and tr.model == tmp_path / "run" / "dqn_final.pth"
    assert t.errors == 0 and f.errors == 0, (t.line(), f.line())
    assert t.answered == f.answered == len(schedule)
    # ε reached its floor during the run (the network routed the second half), and the learner learned.
    end = tr.measurement.metrics
    assert series(end, "lbproxy_epsilon") == pytest.approx(0.02)
    assert series(end, "lbproxy_learner_updates_total") > 0
    assert tr.samples, "the trainer's /metrics was read during the load"
    assert tr.measurement.result is not None
    late = slice_summary(tr.measurement.result, TRAIN_S / 2, TRAIN_S)
    print(f"train {t.line()}\nfallback {f.line()}\ntrain, second half {late.line()}")
    assert t.p99_ms <= P99_OVER_FALLBACK_MAX * f.p99_ms, (t.line(), f.line())
