# The two quickstart commands: `make train` (set up, then train the default recipe and write its report)
# and `make test` (set up, then lint and run the whole test suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
# torch 2.13.0 is pinned because the project's machine image ships its CPU wheel. Elsewhere a plain pip install pulls
# the CUDA build: on CPU-only machines set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (README).
TORCH ?= torch==2.13.0
# Where the data lives: $CIFARLAB_DATA, else the shared copy beside the checkout, else the default cache
# (which downloads the official archive when online).
DATA ?= $(or $(CIFARLAB_DATA),$(wildcard ../shared/data))
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)" -e '.[test]'
	touch $@

.PHONY: setup train test lint
setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/cifarlab train $(if $(DATA),--data-dir $(DATA)) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src

# One pytest-xdist worker per core, each pinned to its core (tests/conftest.py); worksteal keeps a module's tests
# (and its module-scoped runs and reports) on one worker until another worker runs out of work.
# Bytecode is written even where the environment says not to (PYTHONDONTWRITEBYTECODE=1 on some images): else every
# worker and every `cifarlab` subprocess the tests start compiles the package and rewrites the tests' asserts again.
test: lint
	PYTHONDONTWRITEBYTECODE= $(VENV)/bin/pytest -q -n auto --dist worksteal
