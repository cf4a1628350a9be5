#!/usr/bin/env bash
# Fetch, HERE, the wheels that the GPU machine lacks (it cannot reach PyPI): run once before
# benchmarks/gpu_check.sh goes to the device with `.whl` carried. Versions are the ones this
# checkout's venv tested with; the device's Python is 3.12 (x86_64). .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_SHOW=".venv/bin/pip"
[ -x "$PIP_SHOW" ] || { echo "gpu_wheels: run 'make venv' first (versions are read from .venv)" >&2; exit 2; }
version() { "$PIP_SHOW" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
rm -rf .whl && mkdir -p .whl
for pkg in typing-extensions pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types pytest-asyncio; do
  v=$(version "$pkg")
  [ -n "$v" ] || { echo "gpu_wheels: $pkg is not installed in .venv" >&2; exit 2; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg==$v"
done
ls -1 .whl
