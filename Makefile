# Quick start on a fresh machine: `make test` creates .venv, installs the pinned dependencies,
# builds the extension (CUDA kernels too when nvcc and a CUDA torch are present; force with
# MOE_KERNELS_CUDA=0|1) and runs the test suite. `make bench` runs the CPU benchmarks;
# `make lint` checks formatting (ruff, clang-format) and `make format` applies it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: build test bench lint format clean

$(DEPS): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@cat build/summary.txt

test: build
	$(PY) -m pytest python_tests

bench: build
	$(PY) benchmarks/bench_ops.py --dtype fp32
	$(PY) benchmarks/bench_ops.py --dtype bf16

PY_SOURCES := moe_kernels python_tests benchmarks setup.py
CXX_SOURCES = $(shell git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

lint: $(DEPS)
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: $(DEPS)
	$(VENV)/bin/ruff check --fix $(PY_SOURCES)
	$(VENV)/bin/ruff format $(PY_SOURCES)
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build moe_kernels/_C*.so
