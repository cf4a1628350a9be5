"""RUN_DIR/report.md: the comparison table, each policy's traffic share per backend, and the charts
(the comparison drawn here, the training curves by `lbproxy.plot`). A chart that cannot be drawn
costs its picture, never the report."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from lbproxy.demo.locust_runs import PolicyResult
from lbproxy.demo.plan import SCENARIO, Plan


def _fmt(v: float) -> str:
    return f"{v:.1f}" if math.isfinite(v) else "–"


def chart(results: Sequence[PolicyResult], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.policy for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, (label, values) in enumerate(
        (
            ("mean", [r.mean_ms for r in results]),
            ("p50", [r.p50_ms for r in results]),
            ("p99", [r.p99_ms for r in results]),
        )
    ):
        xs = [i + (k - 1) * width for i in range(len(names))]
        ax1.bar(xs, [v if math.isfinite(v) else 0 for v in values], width, label=label)
    ax1.set_xticks(range(len(names)), names, rotation=20)
    ax1.set_ylabel("latency (ms)")
    ax1.set_title("Latency on the same replayed load (lower is better)")
    ax1.legend()
    ax2.bar(names, [r.rps for r in results], color="tab:green")
    ax2.set_xticks(range(len(names)), names, rotation=20)
    ax2.set_ylabel("requests/s")
    ax2.set_title("Throughput (closed loop: higher is better)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(plan: Plan, results: Sequence[PolicyResult], model: Path | None, started: datetime) -> Path:
    plots: list[Path] = []
    try:
        plots.append(chart(results, plan.run_dir / "comparison.png"))
    except Exception as exc:  # a report without a chart is still a report
        print(f"demo: could not draw the comparison chart: {exc}")
    train_dir = plan.run_dir / "train"
    if (train_dir / "metrics" / "training_metrics.csv").exists():
        try:
            from lbproxy.plot import make_plots

            plots += make_plots(train_dir, plan.run_dir / "plots")
        except Exception as exc:  # e.g. too few rows for curves in a very short run
            print(f"demo: could not plot the training curves: {exc}")
    backends = sorted({b for r in results for b in r.share})
    lines = [
        "# lbproxy demo report",
        "",
        f"- date: {started:%Y-%m-%d %H:%M UTC}; machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
        f"- cluster: `{plan.cluster_file.name}` (scenario {SCENARIO.name}: slow, medium, fast, and skew = fast for "
        "light and slow for heavy requests)",
        f"- live training: {plan.train_s:.3g} s of phases 1–3, "
        + (f"initialised from `{plan.init_model}`" if plan.init_model else "from scratch")
        + (f"; learned model `{model.relative_to(plan.run_dir)}`" if model else "; no learned model"),
        f"- comparison: the same Locust shape and seed ({plan.seed}) for {plan.compare_s:.3g} s per policy, "
        "closed-loop users (a faster policy also serves more requests)",
        "",
        "| policy | requests | req/s | mean ms | p50 ms | p99 ms | failures | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.requests} | {r.rps:.0f} | {_fmt(r.mean_ms)} | {_fmt(r.p50_ms)} | "
            f"{_fmt(r.p99_ms)} | {r.failures} | {r.note} |"
        )
    if backends:
        lines += ["", "Traffic share per backend:", ""]
        lines += ["| policy | " + " | ".join(backends) + " |", "|---|" + "---:|" * len(backends)]
        for r in results:
            lines.append(f"| {r.policy} | " + " | ".join(f"{r.share.get(b, 0.0):.0%}" for b in backends) + " |")
    lines += ["", "Latency is measured by Locust (client side, end to end); percentiles are Locust's buckets.", ""]
    for p in plots:
        lines.append(f"![{p.stem}]({p.relative_to(plan.run_dir)})")
    lines += ["", "Logs of every process: `logs/`. Locust CSVs: `train/locust_*.csv`, `compare/*_stats.csv`."]
    report = plan.run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
