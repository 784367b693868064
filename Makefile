# BlueGlass — one entry point per job. Every target installs what it needs on first use.
#   make repro      run the default pipeline (dvc repro) on the embedded toy world
#   make test       run the test suite
#   make benchmark  run the benchmark stage (and whatever it needs) and print the table
#   make report     build reports/index.html from what the stages have written and print its path
#   make ui         MLflow UI on the project's tracking DB (127.0.0.1:5000)
#   make lint       ruff lint + format check

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export OMP_WAIT_POLICY := PASSIVE
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
UI_PORT ?= 5000

.PHONY: install init repro test benchmark report browser ui lint clean-outputs

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing blueglass into $(VENV) (first run: a few minutes)"
	@$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import blueglass, torch, mlflow, dvc" || (echo "install failed" >&2; exit 1)
	@touch $@

install: $(STAMP)

# git + DVC metadata, for a checkout that arrived without them (e.g. an unpacked archive).
init:
	@test -d .git || (git init -q && echo "initialised git")
	@test -d .dvc || (dvc init -q && dvc config core.analytics false && echo "initialised DVC")

repro: install init
	dvc repro

# Headless Chromium for the report's browser test (tests/test_report.py): installed with apt when none is
# on PATH and we are root with apt-get (CI: a clean Debian machine); otherwise a note, and the test skips
# locally (it fails under CI=true).
BROWSERS := chromium-headless-shell chromium chromium-browser google-chrome google-chrome-stable
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null 2>&1 && exit 0; done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium-headless-shell (apt) for the report's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium-headless-shell >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium-headless-shell >/dev/null; } \
	  || echo "warning: could not install chromium-headless-shell; the report's browser test will fail under CI" >&2; \
	else \
	  echo "note: no headless Chromium on PATH; the report's browser test will skip (apt-get install chromium-headless-shell)"; \
	fi

test: install browser
	$(BIN)/python -m pytest

benchmark: install init
	dvc repro benchmark
	@cat reports/benchmark.md

report: install
	@$(BIN)/blueglass report

ui: install
	@echo "MLflow UI on http://127.0.0.1:$(UI_PORT) (Ctrl-C to stop)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" \
	  --default-artifact-root "$(CURDIR)/mlruns" --host 127.0.0.1 --port $(UI_PORT) --workers 1

lint: install
	$(BIN)/ruff check blueglass tests benchmarks
	$(BIN)/ruff format --check blueglass tests benchmarks
