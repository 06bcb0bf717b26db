# One command for each job; see README.md.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PROTOS := $(wildcard proto/coalition/v1/*.proto)

.PHONY: all test check lint typecheck unit proto proto-check demo bench bench-quick clean pki fuzz

all: test

# (Re)create the virtual environment only when pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
	@echo "installing coalition and its dev/bench dependencies into $(VENV) ..."
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
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
	@$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: proto-check lint typecheck unit

format: $(STAMP)
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

demo: $(STAMP)
	@$(VENV)/bin/coalition-demo $(DEMO_ARGS)

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
