# Quick start on a fresh machine: `make test` creates .venv, installs the pinned dependencies,
# builds the extension (CUDA kernels too when nvcc and a CUDA torch are present; force with
# MOE_KERNELS_CUDA=0|1) and runs the test suite. `make bench` runs the CPU benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: build test bench clean

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
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build moe_kernels/_C*.so
