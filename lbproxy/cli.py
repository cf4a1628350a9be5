"""`lbproxy --mode serve|train|evaluate [flags]` and the helper commands `lbproxy plot|demo`.

Flags are generated from the Settings model, so every flag is also `LBPROXY_<NAME>` and a TOML key.
User mistakes end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, get_args, get_origin

from lbproxy.config import ConfigError, Settings, load_settings

EXIT_USAGE = 2

HELPER_COMMANDS = {
    "plot": "lbproxy.plot",
    "demo": "lbproxy.demo",
    "average": "lbproxy.rl.ensemble",
    "distill": "lbproxy.rl.distill",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbproxy",
        description="HTTP load-balancing reverse proxy with an online-trained DQN policy.\n\n"
        "  lbproxy --mode serve --backends http://127.0.0.1:8081,http://127.0.0.1:8082 [--policy p2c]\n"
        "  lbproxy --mode train [--env sim|live] [--episodes N] [--resume] [--run-dir runs/NAME]\n"
        "  lbproxy --mode evaluate [--model dqn_final.pth] [--episodes 50] [--scenario NAME]\n"
        "  lbproxy plot RUN_DIR            learning curves and evaluation chart as PNG\n"
        "  lbproxy demo [--quick]          local cluster + proxy learning live + Locust + report\n"
        "  lbproxy average OUT MODEL...    one model whose Q-values are the models' mean\n"
        "  lbproxy distill OUT MODEL...    a narrow model routing like MODEL or their mean (the shipped one)\n\n"
        "Every flag can also be set as LBPROXY_<FLAG> in the environment or as a key in --config FILE.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--list-scenarios", action="store_true", help="List the shipped simulator scenarios.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        # argparse %-formats help strings: escape literal percent signs ("50%") in descriptions.
        help_text = (field.description or "").replace("%", "%%") + f" [env LBPROXY_{name.upper()}]"
        ann = field.annotation
        if ann is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text + f" (default: {field.default})",
            )
            continue
        choices = None
        if get_origin(ann) is not None and all(isinstance(a, str) for a in get_args(ann)):
            choices = list(get_args(ann))
        default = field.default if field.default_factory is None else "none"
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            choices=choices,
            metavar=None if choices else name.upper(),
            help=help_text + f" (default: {default})",
        )
    return parser


def _run_mode(settings: Settings) -> int:
    runner: Callable[[Settings], int]
    if settings.mode == "serve":
        from lbproxy.serve import run_serve as runner
    elif settings.mode == "train":
        if settings.train_env == "sim":
            from lbproxy.train.sim import run_train_sim as runner
        else:
            from lbproxy.train.live import run_train_live as runner
    else:
        from lbproxy.evaluate import run_evaluate as runner
    return runner(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in HELPER_COMMANDS:
        import importlib

        module = importlib.import_module(HELPER_COMMANDS[args[0]])
        return int(module.main(args[1:]))
    parser = build_parser()
    ns = parser.parse_args(args)
    if ns.list_scenarios:
        from lbproxy.sim.scenario import list_scenarios

        for name, summary in list_scenarios():
            print(f"{name:<16} {summary}")
        return 0
    overrides: dict[str, Any] = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
    try:
        settings = load_settings(overrides)
        return _run_mode(settings)
    except ConfigError as exc:
        print(f"lbproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console()
