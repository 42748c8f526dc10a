# One obvious tooling surface: `make run` and `make test` set everything up themselves.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install chromium run test lint format bench chaos clean asyncapi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# The dashboard's browser test drives Debian's chromium; Playwright downloads no browser.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

run: install
	$(BIN)/b24sync run

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

test: lint chromium
	$(BIN)/pytest

# docs/asyncapi.yaml from the message models (tests/contracts/test_asyncapi.py checks it is current).
asyncapi: install
	$(BIN)/python -m b24sync.contracts.asyncapi docs/asyncapi.yaml

bench: install
	$(BIN)/python bench/core_api.py --connections 64
	$(BIN)/python bench/core_api.py --connections 64 --mix mixed
	$(BIN)/python bench/outbox_latency.py
	$(BIN)/python bench/bitrix_throughput.py

# The full fault suite on its own PostgreSQL, Redis and RabbitMQ (tests/chaos/; about 40 minutes).
chaos: install
	$(BIN)/python -m tests.chaos --profile full --report bench/results/chaos.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
