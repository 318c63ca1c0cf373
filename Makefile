# Two commands on a fresh machine:  `make demo` runs gradmedic's main job, `make test` the test suite.
# Each creates a virtual environment in .venv (or uses the one that is active) and installs what it
# needs: a CPU build of torch first (so no CUDA wheels are pulled), then gradmedic.
# Override the torch requirement with e.g.  make test TORCH_SPEC="torch==2.13.0+cu128"

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo test lint bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.gradmedic-installed: $(BIN)/python pyproject.toml
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e .
	@touch $@

$(VENV)/.gradmedic-lab-installed: $(VENV)/.gradmedic-installed
	$(PIP) -e ".[lab]"
	@touch $@

$(VENV)/.gradmedic-dev-installed: $(VENV)/.gradmedic-installed
	$(PIP) -e ".[dev]"
	@touch $@

install: $(VENV)/.gradmedic-installed
install-dev: $(VENV)/.gradmedic-dev-installed

demo: $(VENV)/.gradmedic-lab-installed
	$(BIN)/gradmedic demo

test: install-dev
	$(BIN)/python -m ruff check gradmedic tests benchmarks examples
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache gradmedic-demo.html gradmedic-lab.db*
