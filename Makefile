# One command for each job; see README.md.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PROTOS := $(wildcard proto/coalition/v1/*.proto)

# The console's browser tests drive the distribution's Chromium (Playwright cannot
# download its own everywhere): CONSOLE_CHROMIUM names another binary.
CHROMIUM := $(or $(CONSOLE_CHROMIUM),/usr/bin/chromium)

.PHONY: all test check browser lint typecheck unit proto proto-check demo bench bench-quick clean pki fuzz
.PHONY: demo-cluster test-cluster demo-federation

all: test

# (Re)create the virtual environment only when pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
	@echo "installing coalition and its dev/bench dependencies into $(VENV) ..."
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,console,cluster]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

proto: $(STAMP)
	@$(PY) scripts/genproto.py

proto-check: $(STAMP)
	@$(PY) scripts/genproto.py --check

lint: $(STAMP)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	@$(VENV)/bin/mypy

unit: $(STAMP)
	@$(VENV)/bin/pytest -q -m "not cluster_long" $(PYTEST_ARGS)

# The cluster fault tests too long for make test (real nats-server and brokers, many
# kills): docs/cluster.md.
test-cluster: $(STAMP)
	@$(VENV)/bin/pytest -q -m cluster_long $(PYTEST_ARGS)

# Chromium for the browser tests: installed from the distribution's packages when
# missing (as root), otherwise a clear failure; never a silent skip.
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium (the console's browser tests drive it) ..."; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && \
		test -x "$(CHROMIUM)" || { echo "chromium installed but $(CHROMIUM) is missing; set CONSOLE_CHROMIUM" >&2; exit 1; }; \
	else \
		echo "The console's browser tests need Chromium at $(CHROMIUM)." >&2; \
		echo "Install it with: sudo apt-get install -y chromium" >&2; \
		echo "(or set CONSOLE_CHROMIUM to a Chromium or Chrome binary)" >&2; \
		exit 1; \
	fi

test: browser proto-check lint typecheck unit

format: $(STAMP)
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

demo: $(STAMP)
	@$(VENV)/bin/coalition-demo $(DEMO_ARGS)

demo-cluster: $(STAMP)
	@$(VENV)/bin/coalition-demo --cluster $(DEMO_ARGS)

demo-federation: $(STAMP)
	@$(VENV)/bin/coalition-demo --federation $(DEMO_ARGS)

bench: $(STAMP)
	@$(PY) -m bench.run $(BENCH_ARGS)

bench-quick: $(STAMP)
	@$(PY) -m bench.run --quick $(BENCH_ARGS)

# Mutated requests on every RPC against a broker process (tests/fuzz.py); FUZZ_N, FUZZ_SEED.
FUZZ_N ?= 200000
fuzz: $(STAMP)
	@$(PY) -m tests.fuzz --n $(FUZZ_N) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

bench-seal: $(STAMP)
	@$(PY) -m bench.seal

# A development PKI in pki/ (git-ignored): CA, broker, five partners, two operators.
pki: $(STAMP)
	@$(VENV)/bin/coalition-keys dev-pki pki

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
