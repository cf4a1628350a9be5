"""`python -m backends`: one emulated server, or a whole cluster with `--cluster FILE`.

    python -m backends --port 8081 [--host 127.0.0.1] [--speed 1.0] [--workers 4] [--name NAME]
        [--light-ms 10] [--heavy-ms 50] [--static-ms 2] [--class-speed heavy=0.25,light=1]
        [--distribution exponential|lognormal|constant] [--cv 1.0] [--error-rate 0.0] [--seed N]
        [--fault-schedule FILE]
    python -m backends --cluster cluster.toml [--fault-schedule FILE] [--restart-after-s S] [--seed N]

A simulator scenario file is both a cluster file and a fault schedule, so
`python -m backends --cluster F --fault-schedule F` replays its [[fault]] tables on real servers (one
clock for the whole cluster; a crashed server is restarted at its `recover` time).

Mistakes print one line and exit with code 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from backends.faults import FaultError, Schedule, load_schedule
from lbproxy.cluster import CLASS_NAMES, ServiceSpec

USAGE_EXIT_CODE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; the project's contract is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see python -m backends --help)")


def fail(message: str) -> NoReturn:
    print(f"backends: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT_CODE)


def _number(cast: Callable[[str], float], lo: float, hi: float, what: str) -> Callable[[str], float]:
    """An argparse `type` that accepts a finite `cast(text)` in [lo, hi] and otherwise says `what`."""

    def parse(text: str) -> float:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_float = _number(float, math.ulp(0.0), math.inf, "a positive number")
_probability = _number(float, 0.0, 1.0, "a number in [0, 1]")
_port = _number(int, 1, 65535, "a port number 1-65535")
_workers = _number(int, 1, math.inf, "a positive integer")


def parse_class_speed(text: str) -> tuple[float, float, float]:
    """`heavy=0.25,light=1` -> per-class factors in (light, heavy, static) order; unnamed classes 1.0."""
    speeds = dict.fromkeys(CLASS_NAMES, 1.0)
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in speeds:
            raise argparse.ArgumentTypeError(
                f"expected CLASS=FACTOR[,CLASS=FACTOR] with CLASS in {', '.join(CLASS_NAMES)}, got {text!r}"
            )
        speeds[key] = _positive_float(value.strip())
    return (speeds["light"], speeds["heavy"], speeds["static"])


def build_parser() -> argparse.ArgumentParser:
    defaults = ServiceSpec()  # class means and distribution: the cluster schema's defaults
    p = OneLineParser(prog="python -m backends", description="Emulated web-application backend(s) for lbproxy.")
    p.add_argument("--cluster", type=Path, help="start every [[server]] of this cluster TOML (lbproxy/cluster.py)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, help="listen port (required without --cluster)")
    p.add_argument("--name", default="", help="name in the X-Backend header (default host:port)")
    p.add_argument("--workers", type=_workers, default=4, help="concurrent requests served; more queue (default 4)")
    p.add_argument("--speed", type=_positive_float, default=1.0, help="service time is divided by this (default 1)")
    p.add_argument(
        "--class-speed", type=parse_class_speed, default=(1.0, 1.0, 1.0), help="per-class factor, e.g. heavy=0.25"
    )
    p.add_argument(
        "--light-ms",
        type=_positive_float,
        default=defaults.mean_s[0] * 1000,
        help="mean /api/light ms at speed 1 (default %(default)s)",
    )
    p.add_argument(
        "--heavy-ms",
        type=_positive_float,
        default=defaults.mean_s[1] * 1000,
        help="mean /api/heavy ms at speed 1 (default %(default)s)",
    )
    p.add_argument(
        "--static-ms",
        type=_positive_float,
        default=defaults.mean_s[2] * 1000,
        help="mean /static/ ms at speed 1 (default %(default)s)",
    )
    p.add_argument("--distribution", choices=("exponential", "lognormal", "constant"), default=defaults.distribution)
    p.add_argument("--cv", type=_positive_float, default=defaults.cv, help="coefficient of variation (lognormal)")
    p.add_argument("--error-rate", type=_probability, default=0.0, help="baseline probability of a 500")
    p.add_argument("--seed", type=int, default=None, help="RNG seed for service times and errors")
    p.add_argument("--fault-schedule", type=Path, help="TOML with [[fault]] tables applied at at_s after start")
    p.add_argument("--server-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--exit-with-parent", type=int, default=None, help=argparse.SUPPRESS)  # launcher's pid
    p.add_argument("--schedule-epoch", type=float, default=None, help=argparse.SUPPRESS)  # launcher's start
    p.add_argument(
        "--restart-after-s",
        type=_positive_float,
        default=None,
        help="with --cluster: restart a crashed server after this many seconds (default: leave it down)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cluster is not None:
        from backends.launcher import ClusterError, run_cluster

        if args.port is not None:
            fail("--port and --cluster exclude each other: ports come from the cluster file")
        try:
            return run_cluster(args.cluster, args.fault_schedule, args.restart_after_s, args.seed or 0)
        except ClusterError as exc:
            fail(str(exc))
    if args.port is None:
        fail("--port is required (or --cluster FILE to start a whole cluster)")
    if args.restart_after_s is not None:
        fail("--restart-after-s needs --cluster (a single server cannot restart itself)")

    from backends.app import BackendConfig, run

    name = args.name or f"{args.host}:{args.port}"
    schedule = Schedule()
    if args.fault_schedule is not None:
        try:
            schedule = load_schedule(args.fault_schedule, name, args.server_index)
        except FaultError as exc:
            fail(str(exc))
    config = BackendConfig(
        port=args.port,
        host=args.host,
        name=name,
        workers=args.workers,
        speed=args.speed,
        class_speed=args.class_speed,
        mean_s=(args.light_ms / 1000, args.heavy_ms / 1000, args.static_ms / 1000),
        distribution=args.distribution,
        cv=args.cv,
        error_rate=args.error_rate,
        seed=args.seed,
        schedule=schedule,
        parent_pid=args.exit_with_parent,
        schedule_epoch=args.schedule_epoch,
    )
    return run(config)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the server installed its own handler: no traceback
        sys.exit(130)
