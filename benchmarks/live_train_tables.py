"""live_train_foreign's tables: training against the fallback heuristic per slice of the schedule, the
two phases side by side, and the trainer's counters as /metrics reported them.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import MetricsPage  # noqa: E402
from live_compare import Measurement  # noqa: E402
from live_training import Sample, TrainRun  # noqa: E402

from loadgen.open_loop import RunResult, Summary, summarize  # noqa: E402

TO_FALLBACK = {"to": "fallback"}


def series(metrics: MetricsPage, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of `name`'s samples with `labels` (MetricsPage.total); NaN if none, for the tables."""
    value = metrics.total(name, labels)
    return math.nan if value is None else value


# --- per-slice figures --------------------------------------------------------------------------------
def slice_summary(result: RunResult, start_s: float, end_s: float) -> Summary:
    """The requests scheduled in [start_s, end_s), summarised as open_loop summarises a run (times
    counted from start_s)."""
    s = result.schedule
    sel = (s.times_s >= start_s) & (s.times_s < end_s)
    sub = replace(s, duration_s=end_s - start_s, times_s=s.times_s[sel] - start_s, classes=s.classes[sel])
    errors = [e for e, keep in zip(result.errors, sel, strict=True) if keep]
    return summarize("", sub, result.sent_s[sel] - start_s, result.latency_s[sel], result.status[sel], errors)


def slice_bounds(duration_s: float, slice_s: float) -> list[tuple[float, float]]:
    n = max(1, math.ceil(duration_s / slice_s - 1e-9))
    return [(k * slice_s, min(duration_s, (k + 1) * slice_s)) for k in range(n)]


def _at_end(samples: list[Sample], end_s: float) -> Sample | None:
    before = [x for x in samples if x.t_s < end_s]
    return before[-1] if before else None


def per_slice_table(tr: TrainRun, fallback: Measurement, slice_s: float) -> list[str]:
    lines = [
        "| slice s | requests | train p50 ms | train p99 ms | train mean ms | train failed | peak_ewma p99 ms "
        "| train / peak_ewma p99 | ε at end | guardrail tripped (share of samples) | switches to fallback "
        "| learner updates at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    assert tr.measurement.result is not None and fallback.result is not None
    prev: Sample | None = None
    for a, b in slice_bounds(tr.measurement.result.schedule.duration_s, slice_s):
        t, f = slice_summary(tr.measurement.result, a, b), slice_summary(fallback.result, a, b)
        inside = [x for x in tr.samples if a <= x.t_s < b]
        end = _at_end(tr.samples, b)
        if inside and end is not None:
            tripped = statistics.fmean(series(x.metrics, "lbproxy_guardrail_tripped") for x in inside)
            sw = series(end.metrics, "lbproxy_guardrail_switches_total", TO_FALLBACK)
            sw_before = series(prev.metrics, "lbproxy_guardrail_switches_total", TO_FALLBACK) if prev else 0.0
            state = (
                f"{series(end.metrics, 'lbproxy_epsilon'):.3f} | {tripped:.2f} | {sw - sw_before:.0f} | "
                f"{series(end.metrics, 'lbproxy_learner_updates_total'):.0f}"
            )
            prev = end
        else:
            state = "- | - | - | -"
        lines.append(
            f"| {a:.0f}-{b:.0f} | {t.count} | {t.p50_ms:.1f} | {t.p99_ms:.1f} | {t.mean_ms:.1f} | {t.errors} | "
            f"{f.p99_ms:.1f} | {t.p99_ms / f.p99_ms:.2f} | {state} |"
        )
    return lines


def phase_table(rows: list[tuple[str, Measurement]], workers: list[int]) -> list[str]:
    share_head = "/".join(f"w{w}" for w in workers)
    lines = [
        f"| phase | requests | p50 ms | p99 ms | p99.9 ms | max ms | mean ms | failed (5xx / no answer / timeout) "
        f"| send lag p99 / max ms | proxy CPU % | share {share_head} % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        s = m.summary
        lines.append(
            f"| {name} | {s.count} | {s.p50_ms:.1f} | {s.p99_ms:.1f} | {s.p999_ms:.1f} | {s.max_ms:.1f} | "
            f"{s.mean_ms:.1f} | {s.errors} ({failure_kinds(m)}) | {s.send_lag_p99_ms:.2f} / {s.send_lag_max_ms:.1f} | "
            f"{m.proxy_cpu_pct:.0f} | {'/'.join(f'{100 * x:.0f}' for x in m.shares)} |"
        )
    return lines


def failure_kinds(m: Measurement) -> str:
    """Failed requests split as 5xx responses / connection errors / timeouts."""
    r = m.result
    if r is None:
        return "-"
    server = int((r.status >= 500).sum())
    timeouts = m.summary.timeouts
    return f"{server} / {m.summary.errors - server - timeouts} / {timeouts}"


TRAINER_SERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("lbproxy_guardrail_tripped", {}),
    ("lbproxy_guardrail_switches_total", TO_FALLBACK),
    ("lbproxy_guardrail_switches_total", {"to": "dqn"}),
    ("lbproxy_decision_fallbacks_total", {"reason": "deadline"}),
    ("lbproxy_decision_fallbacks_total", {"reason": "no_model"}),
    ("lbproxy_decision_fallbacks_total", {"reason": "unavailable"}),
    ("lbproxy_learner_updates_total", {}),
    ("lbproxy_epsilon", {}),
    ("lbproxy_episode", {}),
)


def metrics_lines(metrics: MetricsPage) -> list[str]:
    out = []
    for name, labels in TRAINER_SERIES:
        value = series(metrics, name, labels)
        shown = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out.append(f"- `{name}{'{' + shown + '}' if shown else ''}`: {'absent' if math.isnan(value) else f'{value:g}'}")
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"
