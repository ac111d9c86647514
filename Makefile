# Two commands for a newcomer (see README.md):
#   make run    install into .venv and start the broker with the embedded default config
#   make test   install the test dependencies into .venv and run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The optional compiled accelerator (setup.py) needs a C compiler and Python's headers at install time; as root on
# Debian they are installed here, elsewhere the install falls back to pure Python with one notice.
BUILD_DEPS_CHECK = command -v cc >/dev/null && [ -e "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]
ENSURE_BUILD_DEPS = { $(BUILD_DEPS_CHECK); } || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev python3-dev >/dev/null; } || echo "no C compiler or Python headers: installing without the compiled accelerator (pure Python; apt-get install gcc python3-dev)"
ACCELERATOR_SOURCES := setup.py core/storage/_record_speedups.pyx core/storage/_crc32c.h adapters/mqtt/_mqtt_speedups.pyx
# The storage and MQTT hot-path tests run a second time against the pure-Python twins of the accelerated functions.
PURE_PYTHON_TESTS := tests/storage/test_storage_record.py tests/storage/test_append_fast.py \
	tests/storage/test_storage_queueindex.py tests/storage/test_storage_recovery.py tests/storage/test_large_records.py \
	tests/storage/test_record_speedups.py tests/storage/test_msg_id_speedup.py tests/mqtt/test_mqtt_speedups.py tests/mqtt/test_receive_batch.py \
	tests/mqtt/test_hotpath_mqtt.py tests/mqtt/test_hotpath_reads.py tests/mqtt/test_protocol.py \
	tests/mqtt/test_qos0_credit_bonus.py

.PHONY: run test lint bench clean loadgen

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(ACCELERATOR_SOURCES) | $(BIN)/python
	@$(ENSURE_BUILD_DEPS)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml $(ACCELERATOR_SOURCES) | $(BIN)/python
	@$(ENSURE_BUILD_DEPS)
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/tidegate serve $(ARGS)

test: $(VENV)/.test-installed
	@{ command -v mosquitto_sub && command -v amqp-publish; } >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients amqp-tools >/dev/null; } || echo "mosquitto-clients/amqp-tools missing: the interop tests that need them will be skipped (they fail under CI=true); apt-get install mosquitto-clients amqp-tools"
	$(BIN)/ruff check core adapters gateway tests interop
	$(BIN)/pytest $(PYTEST_ARGS)
	TIDEGATE_NO_EXTENSIONS=1 $(BIN)/pytest -q $(PURE_PYTHON_TESTS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check core adapters gateway tests interop

# The C MQTT load generator that interop/bench_mqtt_compare.py runs (raw sockets: only a C compiler, no library);
# the script and the interop test also build it themselves, into a temp dir. Never committed (build/ is ignored).
loadgen: build/loadgen/mqtt_loadgen

build/loadgen/mqtt_loadgen: interop/loadgen/mqtt_loadgen.c
	@mkdir -p $(@D)
	$(CC) -O2 -Wall -Wextra -o $@ $<

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache core/storage/_record_speedups.c core/storage/*.so \
	adapters/mqtt/_mqtt_speedups.c adapters/mqtt/*.so
