"""The README's configuration reference is exactly what lbproxy.docgen generates from Settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lbproxy.config import Settings
from lbproxy.docgen import END_MARKER, START_MARKER, main, reference_table
from tests.support import REPO


def test_table_has_every_setting_with_flag_and_env() -> None:
    table = reference_table()
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}" in table
        assert f"`LBPROXY_{name.upper()}`" in table


def test_readme_block_is_current() -> None:
    text = (REPO / "README.md").read_text()
    assert START_MARKER in text and END_MARKER in text
    block = text[text.index(START_MARKER) + len(START_MARKER) : text.index(END_MARKER)]
    assert block == "\n" + reference_table(), "stale: run `python -m lbproxy.docgen --write README.md`"


def test_write_replaces_only_the_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n{START_MARKER}\nold table\n{END_MARKER}\ntail\n")
    assert main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(f"# title\n{START_MARKER}\n| Flag |") and text.endswith(f"{END_MARKER}\ntail\n")
    assert "old table" not in text
    assert main(["--check", str(doc)]) == 0


def test_missing_markers_is_a_one_line_error(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("no markers\n")
    result = subprocess.run(
        [sys.executable, "-m", "lbproxy.docgen", "--write", str(doc)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
