# Set-up and checks. `make serve` and `make test` each create the virtualenv and install what they need, once:
# a stamp file per install records it, and only a change to a pyproject.toml (or `make clean`) reinstalls.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that lies on this machine's disk; never let a resolver pick another.
TORCH ?= torch==2.13.0
# Installs go through uv (several times faster than pip), with pip's own configuration (indexes, find-links,
# constraints): see .ci/uv_pip.py. `make PIP_INSTALL="$(BIN)/pip install" ...` installs with pip instead.
PIP_INSTALL ?= $(BIN)/python .ci/uv_pip.py $(BIN)/python
# Parallel test processes (pytest-xdist); each test file runs whole on one process, the slowest files first
# (tests/conftest.py, SLOW_FILES).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10

.PHONY: serve test lint bench install install-test browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) --quiet "$(TORCH)" -e ".[dev,bench]" -e "./client[fingerprint,trl,verl,openrlhf,test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Headless Chromium and its driver for the explorer's browser test (tests/e2e/test_explorer_browser.py);
## Debian packages, so this needs root. Screenshots land in test-artifacts/explorer/.
browser:
	command -v chromedriver >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

## Start the service on the embedded SQLite store (./meds-data) at http://127.0.0.1:8000
## (another port: `MEDS_PORT=9000 make serve`; every setting is a MEDS_* variable, see Configuration).
serve: install
	$(BIN)/meds serve

## The full test suite, in parallel: unit and contract tests (single components, real stores) with the
## coverage gate, and at the same time integration, e2e, reliability, client and deploy tests. Redis
## tests start their own redis-server. Both runs finish before make reports the first failure.
test: install-test
	@set -u; \
	$(BIN)/pytest tests/unit tests/contract $(XDIST) --cov=meds_service --cov-report=term \
	    --cov-fail-under=90 -q -p no:cacheprovider > $(VENV)/test-core.log 2>&1 & core=$$!; \
	$(BIN)/pytest tests --ignore=tests/unit --ignore=tests/contract $(XDIST) -q -p no:cacheprovider; rest=$$?; \
	wait $$core; core_status=$$?; \
	echo "---- unit and contract tests (coverage gate) ----"; cat $(VENV)/test-core.log; \
	test $$core_status -eq 0 && test $$rest -eq 0

lint: install-test
	$(BIN)/ruff check service client tests bench harness experiments
	$(BIN)/ruff format --check service client
	$(BIN)/mypy service/meds_service client/meds_client experiments

bench: install-test
	$(BIN)/python -m bench.bench_score

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* test-artifacts

.PHONY: experiment
## GRPO with and without MEDS on a tiny model with planted errors, through TRL and a live service
## (about 19 minutes on 2 idle cores, one process); CSV and plots in experiments/results/
experiment: install-test
	$(BIN)/python -m experiments.run
