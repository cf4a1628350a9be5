# Quick start: `make demo` runs the main job (local cluster + proxy learning live + Locust + report),
# `make test` runs the test suite. Both create .venv themselves on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned: a CPU wheel is found locally and no CUDA packages are pulled in.
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	# Bytecode on every core (22 s here; pip compiles one file at a time, +51 s). Needed, not optional:
	# where PYTHONDONTWRITEBYTECODE is set (these machines set it) nothing is ever cached on import,
	# and every process the tests start would compile torch again (+2.5 s each). A file that does not
	# compile (torch ships one in Python 3.12 syntax) is skipped, not an install failure.
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib lbproxy backends loadgen || true
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lbproxy demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict lbproxy/rl lbproxy/policies
	# Two passes: what does not time real processes runs on every core (whole files per worker, so a
	# module's fixture starts once); the `timing` tests then run one at a time on a quiet machine. A
	# timing test that fails is run once more on its own (--lf): on a shared 2-vCPU machine a neighbour's
	# burst can distort one p99 ratio; a regression fails twice and fails the suite.
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not timing"
	$(BIN)/python -m pytest -q -m timing || $(BIN)/python -m pytest -q -m timing --lf --lfnf=none

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lbproxy
	$(BIN)/mypy --strict lbproxy/rl lbproxy/policies

clean:
	rm -rf $(VENV) build *.egg-info
