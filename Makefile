# Quick start: `make run` (set up, then the main job: the resolution sweep on whatever device is present)
#              `make test` (set up, then the test suite).
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/vimbench: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.PHONY: run test
run: $(BIN)/vimbench
	$(BIN)/vimbench scaling

test: $(BIN)/vimbench
	$(BIN)/pytest -q
