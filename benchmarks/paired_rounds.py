"""Pool the paired rounds of committed live comparisons (benchmarks/live_foreign.py results) and test
one policy against another on them.

Each round of a live comparison runs every policy on the same arrival schedule, so a round's p99 ratio
(candidate ÷ reference) is a paired measurement; the schedules of different result files are
different seeds, so their rounds pool. A single file's five rounds cannot tell a 3 % difference
from the round-to-round spread (sed's own p99 moved 383-594 ms over one file's rounds); pooling
files is how "online is no worse than greedy" gets a test at all. It reports the median ratio with
a bootstrap interval, a two-sided Wilcoxon signed-rank test of "no difference", and a one-sided
non-inferiority test of "the candidate is more than MARGIN worse" (log ratios shifted by the
margin), which is the claim a target like "no worse than" needs.

    python benchmarks/paired_rounds.py --candidate dqn_online --reference dqn FILE.md [FILE.md ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from scipy.stats import wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bootstrap_median_interval

EVERY_RUN = "## Every run"


def round_p99s(path: Path) -> dict[tuple[int, str], float]:
    """(round, policy) -> p99 ms from a result file's "Every run" table (its columns by header name)."""
    lines = path.read_text().splitlines()
    try:
        start = lines.index(EVERY_RUN)
    except ValueError:
        raise SystemExit(f"{path}: no '{EVERY_RUN}' table; pass a live_foreign.py result file") from None
    rows = [ln for ln in lines[start + 1 :] if ln.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    col = {name: i for i, name in enumerate(header)}
    out: dict[tuple[int, str], float] = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        out[(int(cells[col["round"]]), cells[col["policy"]])] = float(cells[col["p99 ms"]])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="live_foreign.py result files (.md)")
    ap.add_argument("--candidate", default="dqn_online", help="policy name in the tables")
    ap.add_argument("--reference", default="dqn", help="policy name in the tables")
    ap.add_argument("--margin", type=float, default=0.05, help="non-inferiority margin (0.05 = 5 %% worse)")
    args = ap.parse_args(argv)
    ratios: list[float] = []
    for path in args.files:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
        p99 = round_p99s(path)
        rounds = sorted({r for r, _ in p99})
        paired = [r for r in rounds if (r, args.candidate) in p99 and (r, args.reference) in p99]
        if not paired:
            raise SystemExit(f"{path}: no round has both {args.candidate} and {args.reference}")
        for r in paired:
            ratio = p99[(r, args.candidate)] / p99[(r, args.reference)]
            ratios.append(ratio)
            print(f"{path.name} round {r}: {args.candidate} ÷ {args.reference} p99 {ratio:.3f}")
    logs = [math.log(x) for x in ratios]
    lo, hi = bootstrap_median_interval(ratios)
    better = sum(x < 1 for x in ratios)
    print(
        f"{len(ratios)} paired rounds: median ratio {statistics.median(ratios):.3f} (90 % bootstrap interval"
        f" {lo:.3f}-{hi:.3f}), geometric mean {math.exp(statistics.fmean(logs)):.3f};"
        f" {args.candidate} lower in {better}, higher in {len(ratios) - better}"
    )
    if len(ratios) >= 6:
        p_two = wilcoxon(logs).pvalue
        shifted = [x - math.log1p(args.margin) for x in logs]
        p_ni = wilcoxon(shifted, alternative="less").pvalue
        print(
            f"Wilcoxon signed-rank (no difference): p = {p_two:.3f};"
            f" non-inferiority at a {args.margin:.0%} margin ({args.candidate} not more than"
            f" {args.margin:.0%} worse): p = {p_ni:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
