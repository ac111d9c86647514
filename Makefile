# Two commands for a newcomer (see README.md):
#   make run    install into .venv and start the broker with the embedded default config
#   make test   install the test dependencies into .venv and run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/tidegate serve $(ARGS)

test: $(VENV)/.test-installed
	@{ command -v mosquitto_sub && command -v amqp-publish; } >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients amqp-tools >/dev/null; } || echo "mosquitto-clients/amqp-tools missing: the interop tests that need them will be skipped (they fail under CI=true); apt-get install mosquitto-clients amqp-tools"
	$(BIN)/ruff check core adapters gateway tests interop
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check core adapters gateway tests interop

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
