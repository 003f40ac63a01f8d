# Two commands on a fresh clone: `make demo` (install + run the embedded pipeline) and
# `make test` (install + lint + the whole test suite). Both install idempotently into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
CORES ?= 2

.PHONY: install demo test lint unit e2e bench clean

install: $(STAMP)

# requirements.lock pins the whole tree (pip freeze of a working install) so every machine
# resolves the same versions; pyproject.toml pins what the numbers depend on.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
	@touch $(STAMP)

demo: install
	snakemake --cores $(CORES) all
	@echo
	@cat results/tables/zeroshot.md
	@echo "Results table: $(abspath results/tables/zeroshot.md) (all metrics: results/all_metrics.parquet)"

lint: install
	snakemake --lint
	snakefmt --check .

test: lint
	pytest

unit: install
	pytest -m "not e2e"

e2e: install
	pytest -m e2e

bench: install
	python benchmarks/demo_time.py

clean:
	rm -rf .snakemake data models results/metrics results/tables results/*.parquet results/*.json logs mlflow.db mlartifacts .robustify
