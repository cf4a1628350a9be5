"""`lbproxy plot RUN_DIR [--out DIR]`: learning curves and the evaluation chart as PNG files.

Reads what training and evaluation already wrote (RUN_DIR/metrics/training_metrics.csv and, when
present, RUN_DIR/eval/evaluation.json), so plots can be redrawn at any time, even mid-run, without
touching the model. matplotlib's Agg backend is forced: this runs on headless servers and in CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
CURVES_FILE = "learning_curves.png"
EVAL_FILE = "evaluation.png"

# (CSV column, panel title, y-axis label); the column names are lbproxy.train.report.METRIC_FIELDS.
PANELS: tuple[tuple[str, str, str], ...] = (
    ("mean_reward", "Mean reward per request", "reward"),
    ("gini", "Gini of load / capacity", "Gini"),
    ("accuracy", "Decision accuracy vs SED oracle", "share"),
    ("p99_ms", "p99 latency", "ms"),
    ("loss", "TD loss (Huber)", "loss"),
    ("epsilon", "Exploration rate ε", "ε"),
)
PHASE_COLOURS = ("#dbe9f6", "#fde9d3", "#e3f1dc", "#efe1f3")


class PlotError(Exception):
    """A missing or unreadable input: reported as one line, exit code 2."""


def _float(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_metrics(path: Path) -> dict[str, list[float]]:
    """Columns of the training metrics CSV as float lists (blank cells become NaN)."""
    if not path.is_file():
        raise PlotError(f"no training metrics at {path}; train first (lbproxy --mode train --run-dir RUN_DIR)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "episode" not in reader.fieldnames:
            raise PlotError(f"{path} is empty or has no 'episode' column; train first or pass the right RUN_DIR")
        rows = list(reader)
    if not rows:
        raise PlotError(
            f"{path} has no rows yet; wait for the first metrics row (--metrics-every) or pass another RUN_DIR"
        )
    return {name: [_float(r.get(name, "")) for r in rows] for name in reader.fieldnames}


def _shade_phases(ax: Any, episodes: Sequence[float], phases: Sequence[float]) -> None:
    """Shade each contiguous run of one phase; a CSV row covers the episodes up to its own."""
    if not episodes:
        return
    start = 0.0
    current = phases[0]
    for k in range(1, len(episodes) + 1):
        if k == len(episodes) or phases[k] != current:
            end = episodes[k - 1]
            colour = PHASE_COLOURS[int(current) % len(PHASE_COLOURS)] if not math.isnan(current) else "white"
            ax.axvspan(start, end, color=colour, alpha=0.8, lw=0, zorder=0)
            if k < len(episodes):
                start, current = end, phases[k]


def plot_learning_curves(metrics: dict[str, list[float]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from lbproxy.phases import PHASES

    episodes = metrics["episode"]
    # The CSV numbers phases from 1 (as the README and the progress line do); colours index from 0.
    phases = [p - 1 for p in metrics.get("phase", [1.0] * len(episodes))]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    for ax, (col, panel_title, ylabel) in zip(axes.flat, PANELS, strict=True):
        _shade_phases(ax, episodes, phases)
        ys = metrics.get(col)
        if ys is not None:
            ax.plot(episodes, ys, color="#1f4e79", lw=1.2)
        else:
            ax.text(0.5, 0.5, f"no '{col}' column", transform=ax.transAxes, ha="center")
        if col == "loss" and ys and any(y > 0 for y in ys if not math.isnan(y)):
            ax.set_yscale("log")
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("episode")
    seen = sorted({int(p) for p in phases if not math.isnan(p)})
    handles = [
        Patch(color=PHASE_COLOURS[p % len(PHASE_COLOURS)], label=f"phase {p + 1}: {PHASES[p].name}")
        for p in seen
        if p < len(PHASES)
    ]
    if handles:
        fig.legend(handles=handles, loc="upper right", ncol=len(handles))
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_evaluation(report: dict[str, Any], out: Path) -> Path:
    """Grouped bars of mean and p99 latency per policy (lower is better), DQN highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["policies"]
    names = [r["policy"] for r in rows]
    means = [r["mean_ms"] for r in rows]
    p99s = [r["p99_ms"] for r in rows]
    xs = range(len(names))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names)), 5))
    ax.bar([x - width / 2 for x in xs], means, width, label="mean", color="#7fa7cf")
    ax.bar([x + width / 2 for x in xs], p99s, width, label="p99", color="#1f4e79")
    for x, (m, p) in enumerate(zip(means, p99s, strict=True)):
        ax.annotate(f"{m:.1f}", (x - width / 2, m), ha="center", va="bottom", fontsize=8)
        ax.annotate(f"{p:.0f}", (x + width / 2, p), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=20)
    for label in ax.get_xticklabels():
        if label.get_text() == "dqn":  # the learned policy stands out from the baselines
            label.set_color("#c0392b")
            label.set_fontweight("bold")
    ax.set_ylabel("latency (ms)")
    scen = report.get("scenario", "?")
    eps = report.get("episodes", "?")
    ax.set_title(f"Evaluation on '{scen}' ({eps} held-out episodes, same traffic for every policy)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def make_plots(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write every plot the run directory has data for; returns the files written."""
    if not run_dir.is_dir():
        raise PlotError(f"run directory {run_dir} does not exist; pass the --run-dir used for training")
    out_dir = out_dir if out_dir is not None else run_dir / "plots"
    metrics = read_metrics(run_dir / "metrics" / "training_metrics.csv")
    written = [plot_learning_curves(metrics, out_dir / CURVES_FILE, f"Training: {run_dir}")]
    eval_json = run_dir / "eval" / "evaluation.json"
    if eval_json.is_file():
        try:
            report = json.loads(eval_json.read_text())
            report["policies"][0]["p99_ms"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PlotError(
                f"{eval_json} is not an lbproxy evaluation report; re-run lbproxy --mode evaluate"
            ) from None
        written.append(plot_evaluation(report, out_dir / EVAL_FILE))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbproxy plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory written by lbproxy --mode train")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        for path in make_plots(args.run_dir, args.out):
            print(path)
    except PlotError as exc:
        print(f"lbproxy plot: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
