# One obvious tooling surface: `make run` and `make test` set everything up themselves.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench chaos clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/b24sync run

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/core_api.py
	$(BIN)/python bench/outbox_latency.py
	$(BIN)/python bench/bitrix_throughput.py

# The full fault suite on its own PostgreSQL, Redis and RabbitMQ (tests/chaos/; about 40 minutes).
chaos: install
	$(BIN)/python -m tests.chaos --profile full --report bench/results/chaos.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
