"""The configuration reference, generated from the Settings model so the README never drifts from the code.

python -m lbproxy.docgen                 # print the markdown table
python -m lbproxy.docgen --write README.md   # replace the block between the config-reference markers
python -m lbproxy.docgen --check README.md   # exit 1 if that block is out of date (CI)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic.fields import FieldInfo

from lbproxy.config import Settings

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"
EXIT_USAGE = 2


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None or value == []:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Enum):
        value = value.value
    return f"`{value}`"


def _choices(field: FieldInfo) -> str:
    ann = field.annotation
    if get_origin(ann) is not None and all(isinstance(a, str) for a in get_args(ann)):
        return " One of: " + ", ".join(f"`{a}`" for a in get_args(ann)) + "."
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def reference_table() -> str:
    """One row per setting, in model order: flag, environment variable, default, description."""
    lines = [
        "| Flag | Environment | Default | Description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            flag += " / --no-" + name.replace("_", "-")
        description = _cell((field.description or "") + _choices(field))
        lines.append(f"| `{flag}` | `LBPROXY_{name.upper()}` | {_cell(_default(field))} | {description} |")
    lines.append("")
    lines.append(
        "Every setting is also a key of the TOML file given with `--config` (same name, underscores). "
        "Precedence: flag > environment > TOML file > default."
    )
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """`text` with everything between the markers replaced by `table`; ValueError if the markers are missing."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"markers {START_MARKER} ... {END_MARKER} not found")
    return text[: start + len(START_MARKER)] + "\n" + table + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lbproxy.docgen", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="Replace the marked block of FILE in place.")
    group.add_argument("--check", type=Path, metavar="FILE", help="Exit 1 if the marked block of FILE is stale.")
    args = parser.parse_args(argv)
    table = reference_table()
    target: Path | None = args.write or args.check
    if target is None:
        sys.stdout.write(table)
        return 0
    try:
        text = target.read_text()
        updated = replace_block(text, table)
    except (OSError, ValueError) as exc:
        print(f"docgen: cannot update {target}: {exc}; add the two marker lines to it first", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        if updated != text:
            print(f"docgen: {target} configuration reference is stale; run python -m lbproxy.docgen --write {target}")
            return 1
        return 0
    if updated != text:
        target.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
