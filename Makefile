# forecast-peft: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FPEFT := $(VENV)/bin/fpeft
# torch is pinned to the release whose CPU wheel is on disk here; a newer or unpinned
# torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install check-python test test-slow test-gpu test-min-deps demo lint bench bench-data bench-cli bench-forecasts bench-kernels bench-deploy bench-gpu clean

install: $(STAMP)

# PYTHON= given (make test PYTHON=python3.12): an environment already in VENV made by another
# Python stops with a line that says so, rather than the work going on in that other Python
ifneq ($(origin PYTHON),file)
$(STAMP): | check-python
endif
VERSION_OF := -c 'import sys; print("%d.%d" % sys.version_info[:2])'
check-python:
	@test ! -x $(PY) || { \
	  want=$$($(PYTHON) $(VERSION_OF) 2>/dev/null) || { \
	    echo "make: PYTHON=$(PYTHON) does not run" >&2; exit 1; }; \
	  have=$$($(PY) $(VERSION_OF)); \
	  test "$$have" = "$$want" || { echo "make: $(VENV) holds Python $$have, not $(PYTHON)'s $$want: add" \
	    "VENV=.venv-$$want for an environment of its own, or remove $(VENV)" >&2; exit 1; }; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the test suite in TEST_PROCS processes (pytest-xdist; each takes the next test as it finishes
# one, and the cores' share of torch threads: tests/conftest.py); TEST_PROCS=0 runs it in this one
TEST_PROCS ?= 2
test: install
	$(PY) -m pytest -q -x -n $(TEST_PROCS) --dist worksteal --durations=10

# the long checks, in TEST_PROCS processes too; a compile on a cold cache can pass 8 minutes, so the
# stacks of a test that seems to hang are printed after 15 (pyproject.toml: 8 for make test)
test-slow: install
	$(PY) -m pytest -q -m slow -n $(TEST_PROCS) --dist worksteal --durations=10 -o faulthandler_timeout=900

# the test suite against the lowest version of every dependency that pyproject.toml allows (and of
# tensorboardX, which the tests import), in a virtual environment of its own (.venv-min; 1-3 minutes
# to install from the registry), in TEST_PROCS processes as make test runs it
MIN := .venv-min
test-min-deps:
	rm -rf $(MIN)
	$(PYTHON) -m venv $(MIN)
	$(MIN)/bin/python -m pip install -q --upgrade pip
	$(MIN)/bin/python -m pip install -q $(TORCH)
	$(MIN)/bin/python tests/min_versions.py > $(MIN)/lowest.txt
	$(MIN)/bin/python -m pip install -q -r $(MIN)/lowest.txt 'pytest>=8' 'pytest-xdist>=3.5'
	$(MIN)/bin/python -m pip install -q --no-deps -e .
	$(MIN)/bin/python -m pip check
	$(MIN)/bin/python -m pip freeze | grep -i -E "^($$(sed 's/==.*//' $(MIN)/lowest.txt | paste -sd'|'))=="
	$(MIN)/bin/python -m pytest -q -x -n $(TEST_PROCS) --dist worksteal

# CUDA correctness checks (tests/test_gpu.py); they skip where torch sees no CUDA device
test-gpu: install
	$(PY) -m pytest -q -m gpu -rs

demo: install
	$(FPEFT) demo

lint: install
	$(VENV)/bin/ruff check forecast_peft tests benchmarks
	$(VENV)/bin/ruff format --check forecast_peft tests benchmarks

# CPU throughput of the published-size models (batch 8; the GPU numbers come from the same
# script on a GPU machine: make bench-gpu there, see benchmarks/results/README.md).
bench: install bench-data
	$(PY) -m benchmarks.bench_train --device cpu --batches 8 --steps 2 --warmup 1 --out benchmarks/results/cpu.json

bench-data: install
	$(PY) -m benchmarks.bench_data --sample ../shared/av2_sample --out benchmarks/results/data_cpu.json

# how long fpeft takes to answer by hand-typed commands and their mistakes (fresh processes, ~2 min)
bench-cli: install
	$(PY) -m benchmarks.bench_cli --out benchmarks/results/cli_cpu.json

# how long eval --forecasts reads a whole AV2 validation split's forecasts (25k scenarios), as a
# submission and as predict's .csv.gz table, and how long writing them takes (~1 minute)
bench-forecasts: install
	$(PY) -m benchmarks.bench_forecasts --out benchmarks/results/forecasts_cpu.json

# the kernels one compiled published-size inference pass launches, adapters folded and not (~3 min)
bench-kernels: install
	$(PY) -m benchmarks.kernel_count --out benchmarks/results/cpu_kernel_count.json

# fpeft deploy's files against the eager network: export and AOTInductor compile times, ms per
# batch of each (published size, CPU; about 2 minutes, 1 of them compiling)
bench-deploy: install
	$(PY) -m benchmarks.bench_deploy --model forecast_mae --batches 1,32 --precisions 32,bf16 --out benchmarks/results/deploy_cpu.json

bench-gpu:
	python3 -m benchmarks.bench_attention --out benchmarks/results/attention.json
	python3 -m benchmarks.bench_train --device cuda --compile --out benchmarks/results/gpu.json
	python3 -m benchmarks.check_bf16 --out benchmarks/results/bf16_check.json

clean:
	rm -rf $(VENV) $(MIN) build *.egg-info
