# Quick start on a fresh machine: `make train` trains a small MoE language model with loss-free
# balancing on real text (the CPU by default, a few minutes) and prints its validation loss and
# MaxVio_global; `make test` creates .venv, installs the pinned dependencies,
# builds the extension (CUDA kernels too when nvcc and a CUDA torch are present; force with
# MOE_KERNELS_CUDA=0|1) and runs the test suite; `make test-asan` runs the CUDA kernels' tests on
# the emulator under AddressSanitizer and UBSan. `make bench` runs the CPU benchmarks (about 25 minutes);
# `make lint` checks formatting (ruff, clang-format) and `make format` applies it.
# `make gpu-check` builds, tests, sanitizes and benchmarks the CUDA side on a machine with a GPU
# and torch installed (QUICK=1: under 4 minutes); DRY_RUN=1 walks its stages on the CPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: build train test test-asan bench gpu-check lint format clean

$(DEPS): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(DEPS)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@cat build/summary.txt

train: build
	$(PY) -m moe_kernels.train --preset tiny --balancing loss_free --out runs/tiny

test: build
	$(PY) -m pytest python_tests

# The CUDA kernels on the CPU emulator, built with AddressSanitizer and UBSan's shift and bounds
# checks: an out-of-bounds access, or a shift past a type's width, in a kernel fails the test
# that made it (compute-sanitizer's memcheck, without a GPU). Python is not linked with ASan, so its runtime
# and libstdc++ are preloaded. --capture=sys: a sanitizer reports on file descriptor 2 as the
# process dies, so pytest must not be capturing that descriptor.
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so)
test-asan: $(DEPS)
	MOE_KERNELS_CUDA=0 MOE_KERNELS_SANITIZE=address,shift,bounds $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
		$(PY) -m pytest -q --capture=sys -k "emu or cuda" python_tests

bench: build
	$(PY) benchmarks/bench_ops.py --dtype fp32
	$(PY) benchmarks/bench_ops.py --dtype bf16
	$(PY) benchmarks/bench_grouped_gemm.py --dtype bf16
	$(PY) benchmarks/bench_layer.py --dtype fp32
	$(PY) benchmarks/bench_layer.py --dtype bf16
	$(PY) benchmarks/bench_layer.py --dtype fp32 --keep-freed-memory
	$(PY) benchmarks/bench_layer.py --dtype bf16 --keep-freed-memory
	$(PY) benchmarks/bench_dispatch.py
	$(PY) benchmarks/bench_transformers.py --dtype fp32
	$(PY) benchmarks/bench_transformers.py --dtype bf16

# The GPU machine has its torch and no network: the check uses that Python as it is, no venv.
ifdef DRY_RUN
gpu-check: build
	$(PY) benchmarks/gpu_check.py --dry-run
else
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(QUICK),--quick)
endif

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
	rm -rf build runs moe_kernels/_C*.so
