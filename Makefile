# Quick start: `make run` (set up, then the main job: the resolution sweep on whatever device is present)
#              `make test` (set up, then the test suite but its slow tests, which `make test-slow` runs).
#              `make gate` (regression gates: FLOPs and kernel resources exactly, then CPU kernel timings
#              against this machine's stored baseline, or without one against the merge-base with main).
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/vimbench: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.PHONY: run test test-slow gate
run: $(BIN)/vimbench
	$(BIN)/vimbench scaling

test: $(BIN)/vimbench
	$(BIN)/pytest -q -n auto --maxprocesses 4 -m "not noisy and not slow"

test-slow: $(BIN)/vimbench
	$(BIN)/pytest -q -n auto --maxprocesses 4 -m "slow and not noisy"

gate: $(BIN)/vimbench
	$(BIN)/vimbench gate --deterministic
	$(BIN)/vimbench gate --device cpu
	$(BIN)/pytest -q -m noisy tests/gate
