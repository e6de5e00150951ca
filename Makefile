# Set-up and checks. `make serve` and `make test` each create the virtualenv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that lies on this machine's disk; never let a resolver pick another.
TORCH ?= torch==2.13.0

.PHONY: serve test test-fast lint bench install install-test browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,bench]" -e "./client[fingerprint,trl,verl,openrlhf,test]"

## Headless Chromium and its driver for the explorer's browser test (tests/e2e/test_explorer_browser.py);
## Debian packages, so this needs root. Screenshots land in test-artifacts/explorer/.
browser:
	command -v chromedriver >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

## Start the service on the embedded SQLite store (./meds-data) at http://127.0.0.1:8000
serve: install
	$(BIN)/meds serve

## The full test suite: unit and contract tests (single components, real stores) with the coverage gate,
## then integration, e2e, reliability, client and deploy tests. Redis tests start their own redis-server.
test: install-test
	$(BIN)/pytest tests/unit tests/contract --cov=meds_service --cov-report=term --cov-fail-under=90 -q
	$(BIN)/pytest tests --ignore=tests/unit --ignore=tests/contract -q

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
## (20-25 minutes of CPU, one process); CSV and plots in experiments/results/
experiment: install-test
	$(BIN)/python -m experiments.run
