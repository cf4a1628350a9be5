"""The soak's verdict: each rule (RSS flat, open fds, threads, asyncio tasks, in flight, replay bound,
lost requests) judged on a finished run, with its numbers (benchmarks/soak.py lists the rules).

Used by benchmarks/soak.py and tests/test_soak.py (which put benchmarks/ on sys.path).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from proxy_process import TASKS_METRIC, ProcSample  # noqa: E402
from soak_run import SoakRun  # noqa: E402

LOST_RULE = "no lost requests"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    ok: bool
    detail: str


def _halves(run: SoakRun) -> tuple[list[ProcSample], list[ProcSample]]:
    during = [s for s in run.samples if s.t_s <= run.config.duration_s]
    return [s for s in during if s.t_s < run.half_s], [s for s in during if s.t_s >= run.half_s]


def _peak_rule(name: str, first: list[float], second: list[float], slack: float) -> Rule:
    if not first or not second:
        return Rule(name, False, "no samples")
    a, b = max(first), max(second)
    return Rule(name, b <= a + slack, f"max {b:g} in the second half vs {a:g} in the first (slack {slack:g})")


def _fd_rule(run: SoakRun) -> Rule:
    a, b = run.census_start, run.census_rest
    if a is None or b is None:
        return Rule("open fds", False, "not measured (proxy gone before the rest sample)")
    unexplained = (b.total - b.upstream_idle) - (a.total - a.upstream_idle)
    peak = max((s.fds for s in run.samples), default=0)
    detail = (
        f"{unexplained:+d} unexplained at rest (slack {run.config.fd_slack}): {b.total} fds at rest, "
        f"{b.upstream_idle} of them pooled connections to backends, {b.close_wait} in CLOSE_WAIT, {b.files} "
        f"not sockets; {a.total} before the load ({a.upstream_idle} pooled, {a.files} not sockets); "
        f"{peak} at most under load"
    )
    return Rule("open fds", unexplained <= run.config.fd_slack, detail)


def verdict(run: SoakRun) -> list[Rule]:
    cfg = run.config
    first, second = _halves(run)
    rules: list[Rule] = []
    if len(second) >= 3:
        slope = theil_sen_slope([s.t_s / 60 for s in second], [s.rss_mb for s in second])
        half_min = (second[-1].t_s - second[0].t_s) / 60
        rise = slope * half_min
        ok = slope <= cfg.rss_slope_mb_per_min or rise <= cfg.rss_slack_mb
        rules.append(
            Rule(
                "RSS flat",
                ok,
                f"slope {slope:+.2f} MB/min over the second half ({half_min:.1f} min, projected rise {rise:+.1f} MB; "
                f"limits {cfg.rss_slope_mb_per_min:g} MB/min or {cfg.rss_slack_mb:g} MB); RSS "
                f"{first[-1].rss_mb if first else math.nan:.1f} MB at half time, {second[-1].rss_mb:.1f} MB at the end",
            )
        )
    else:
        rules.append(Rule("RSS flat", False, f"only {len(second)} samples in the second half"))
    rules.append(_fd_rule(run))
    rules.append(_peak_rule("threads", [s.threads for s in first], [s.threads for s in second], cfg.thread_slack))
    idle = run.idle
    start_tasks = run.samples[0].tasks if run.samples else None
    if start_tasks is not None and idle is not None and idle.tasks is not None:
        ok = idle.tasks <= start_tasks + cfg.task_slack
        detail = f"{idle.tasks:g} at rest vs {start_tasks:g} before the load (slack {cfg.task_slack}); "
        detail += f"max {max(s.tasks or 0 for s in run.samples):g} under load"
        rules.append(Rule("asyncio tasks", ok, detail))
    else:
        rules.append(Rule("asyncio tasks", True, f"not measured: the proxy exports no {TASKS_METRIC} gauge"))
    if idle is not None and idle.in_flight is not None:
        rules.append(Rule("in flight after the load", idle.in_flight == 0, f"{idle.in_flight:g} requests"))
    else:
        rules.append(Rule("in flight after the load", False, "not measured (proxy gone or metric missing)"))
    replay = [s.replay for s in second if s.replay is not None]
    if replay:
        ok = min(replay) == run.buffer_size and max(replay) == run.buffer_size
        detail = f"{min(replay):g}-{max(replay):g} transitions in the second half, capacity {run.buffer_size}"
        rules.append(Rule("replay buffer full and bounded", ok, detail))
    at_kill, other = run.lost()
    n = len(run.result.schedule) if run.result else 0
    detail = f"{other} failed outside kills, {at_kill} in flight at one of {len(run.kills)} kills, of {n} requests"
    if other:
        detail += " (first: " + "; ".join(run.lost_outside_kills()[:5]) + ")"
    rules.append(Rule(LOST_RULE, other == 0, detail))
    return rules


def headline(rules: list[Rule]) -> str:
    """Resources (every rule but the lost-requests one) flat or not, and the lost-requests rule."""
    resources = [r for r in rules if r.name != LOST_RULE]
    bad = [r.name for r in resources if not r.ok]
    lost = next((r for r in rules if r.name == LOST_RULE), None)
    text = "resources FLAT" if not bad else f"resources NOT FLAT ({', '.join(bad)})"
    if lost is not None:
        text += "; no request lost outside kills" if lost.ok else "; requests lost outside kills"
    return text


def theil_sen_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Median of the pairwise slopes (Theil-Sen): a trend that one spike or one step cannot set."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx > 0
    return float(np.median((y[j] - y[i])[ok] / dx[ok])) if ok.any() else 0.0
