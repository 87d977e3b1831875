# forecast-peft: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FPEFT := $(VENV)/bin/fpeft
# torch is pinned to the release whose CPU wheel is on disk here; a newer or unpinned
# torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo lint bench bench-data bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -x --durations=10

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(FPEFT) demo

lint: install
	$(VENV)/bin/ruff check forecast_peft tests benchmarks
	$(VENV)/bin/ruff format --check forecast_peft tests benchmarks

bench: install bench-data
	$(PY) benchmarks/bench_train.py --device cpu --out benchmarks/results/cpu.json

bench-data: install
	$(PY) benchmarks/bench_data.py --sample ../shared/av2_sample --out benchmarks/results/data_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info
