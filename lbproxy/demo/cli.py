"""`lbproxy demo [--quick] ...`: the command line, turned into a `Plan` and run. User mistakes end
with one line on stderr and exit code 2; Ctrl-C and SIGTERM stop every child and exit 130."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from lbproxy.demo.plan import (
    COMPARE_S,
    PROGRESS_EVERY_S,
    QUICK_COMPARE_S,
    QUICK_PROGRESS_EVERY_S,
    QUICK_TRAIN_S,
    TRAIN_S,
    Plan,
)
from lbproxy.demo.processes import DemoError
from lbproxy.demo.stages import run
from lbproxy.train.stop import EXIT_INTERRUPTED

EXIT_USAGE = 2


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the demo stops it like Ctrl-C does (the finally blocks stop every child)."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbproxy demo",
        description="Local demo, no Docker: emulated cluster + proxy learning live + Locust + comparison report.",
    )
    parser.add_argument("--quick", action="store_true", help="About one minute in all (30 s training).")
    parser.add_argument("--run-dir", type=Path, default=None, help="Output folder (default runs/demo-<time>).")
    parser.add_argument(
        "--duration-scale", type=float, default=1.0, help="Multiply every duration (tests use < 1; default 1)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of backends, proxy and Locust (default 0).")
    parser.add_argument("--with-prometheus", action="store_true", help="Also start Prometheus (if on PATH).")
    parser.add_argument("--model", type=Path, default=None, help="Initial model (default: the shipped one, if any).")
    parser.add_argument("--from-scratch", action="store_true", help="Ignore the shipped model; learn from zero.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if not args.duration_scale > 0:
        print("lbproxy demo: --duration-scale must be a positive number", file=sys.stderr)
        return EXIT_USAGE
    init_model: Path | None = None
    if not args.from_scratch:
        from lbproxy.rl.checkpoint import default_model_path

        init_model = args.model if args.model is not None else default_model_path()
        if not init_model.is_file():
            if args.model is not None:
                print(f"lbproxy demo: --model {args.model} not found; pass an existing model file", file=sys.stderr)
                return EXIT_USAGE
            init_model = None
    run_dir = args.run_dir or Path("runs") / f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    scale = args.duration_scale
    plan = Plan(
        run_dir=run_dir.resolve(),
        train_s=(QUICK_TRAIN_S if args.quick else TRAIN_S) * scale,
        compare_s=(QUICK_COMPARE_S if args.quick else COMPARE_S) * scale,
        progress_every_s=QUICK_PROGRESS_EVERY_S if args.quick else PROGRESS_EVERY_S,
        seed=args.seed,
        with_prometheus=args.with_prometheus,
        init_model=init_model.resolve() if init_model else None,
    )
    try:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"lbproxy demo: cannot create --run-dir {run_dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _sigterm_as_interrupt():
            return run(plan)
    except DemoError as exc:
        print(f"lbproxy demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lbproxy demo: interrupted; everything it started is stopped; partial output in {plan.run_dir}")
        return EXIT_INTERRUPTED
