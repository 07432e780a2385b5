# Quick start on a fresh machine: `make train` trains a small MoE language model with loss-free
# balancing on real text (the CPU by default, a few minutes) and prints its validation loss and
# MaxVio_global; `make test` creates .venv, installs the pinned dependencies,
# builds the extension (CUDA kernels too when nvcc and a CUDA torch are present; force with
# MOE_KERNELS_CUDA=0|1) and runs the test suite; `make test-asan` runs the CUDA kernels' tests on
# the emulator under AddressSanitizer and UBSan. `make bench` runs the CPU benchmarks (about 25 minutes);
# `make lint` checks formatting (ruff, clang-format) and `make format` applies it.
# `make gpu-check` builds, tests, sanitizes and benchmarks the CUDA side on a machine with a GPU
# and torch installed (QUICK=1: under 4 minutes; STAGES="..." a subset); DRY_RUN=1 walks its
# stages on the CPU. `make gpu-prebuild` builds its module here for the GPU machine, to carry.
# `make gpu-study` builds there and runs the balance study's GPU preset (under 8 minutes).
# `make test-gpu-machine` builds and tests against that machine's software (Python 3.12, torch
# 2.11, transformers 5.17) in .venv-gpu-machine, as CI does on every submission.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: build train test test-asan bench gpu-check gpu-study lint format clean

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
	$(PY) -m pytest python_tests $(PYTEST_ARGS)

# The CUDA kernels on the CPU emulator, built with AddressSanitizer and UBSan's shift and bounds
# checks: an out-of-bounds access, or a shift past a type's width, in a kernel fails the test
# that made it (compute-sanitizer's memcheck, without a GPU). Python is not linked with ASan, so its runtime
# and libstdc++ are preloaded. --capture=sys: a sanitizer reports on file descriptor 2 as the
# process dies, so pytest must not be capturing that descriptor. One schedule, the adversarial
# one: a kernel touches the same addresses under either, and the other doubles the time. The
# tests marked slow (the transformers families' battery) only drive the kernels the others test.
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so)
test-asan: $(DEPS)
	MOE_KERNELS_CUDA=0 MOE_KERNELS_SANITIZE=address,shift,bounds $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
		$(PY) -m pytest -q --capture=sys -m "not slow" -k "(emu or cuda) and not emu-forward" \
		python_tests

bench: build
	$(PY) benchmarks/bench_ops.py --dtype fp32
	$(PY) benchmarks/bench_ops.py --dtype bf16
	$(PY) benchmarks/bench_grouped_gemm.py --dtype bf16
	$(PY) benchmarks/bench_layer.py --dtype fp32
	$(PY) benchmarks/bench_layer.py --dtype bf16
	$(PY) benchmarks/bench_layer.py --dtype fp32 --keep-freed-memory
	$(PY) benchmarks/bench_layer.py --dtype bf16 --keep-freed-memory
	$(PY) benchmarks/bench_dispatch.py
	$(PY) benchmarks/bench_compile.py --dtype fp32
	$(PY) benchmarks/bench_transformers.py --dtype fp32
	$(PY) benchmarks/bench_transformers.py --dtype bf16

# The GPU machine has its torch and no network: the check uses that Python as it is, no venv.
ifdef DRY_RUN
gpu-check: build
	$(PY) benchmarks/gpu_check.py --dry-run
gpu-study: build
	$(PY) benchmarks/gpu_check.py --dry-run --stages build study
else
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(QUICK),--quick) $(if $(STAGES),--stages $(STAGES))
gpu-study:
	$(PYTHON) benchmarks/gpu_check.py --stages build study
endif

# The GPU machine's environment (Python 3.12, torch 2.11.0, transformers 5.17; nothing installs
# there), in a venv of its own: the CUDA variant, the one that machine builds, compiled against
# it (its sources are the CPU variant's and more), then a subset of the suite that fits CI's
# time: ops on the CPU and on one emulator schedule (the other doubles the time), build,
# compile, opcheck, the layer and token capacity, the transformers patch, Trainer and export,
# a short training run, 2 Gloo ranks, FSDP2 and its sharded checkpoints, and the NCCL paths
# of the rank tests.
PYTHON312 ?= /root/.pyenv/versions/3.12.1/bin/python3
GM_VENV ?= .venv-gpu-machine
GM_PY := $(GM_VENV)/bin/python
GM_DEPS := $(GM_VENV)/.deps-installed
GM_TESTS := $(addprefix python_tests/,test_routing.py test_permute.py test_grouped_gemm.py \
	test_grouped_gemm_backends.py \
	test_histogram_bias.py test_transpose_segments.py test_errors.py test_build.py \
	test_compile.py test_opcheck.py test_emulator.py test_emulator_tensor_core.py \
	test_layer.py test_balance.py test_readme.py test_capacity.py test_layer_capacity.py \
	test_transformers_patch.py test_transformers_balancing.py test_export_transformers.py \
	test_fsdp.py test_overlap.py test_transformers_coverage.py \
	test_train.py::test_loss_falls_and_the_outputs_are_written \
	test_dispatch.py::test_bad_calls_raise_on_every_rank \
	"test_dispatch.py::test_dispatch_and_combine_match_all_to_all_single[2-8-cpu]" \
	test_expert_parallel.py::test_the_direct_nccl_transport_is_an_opt_in \
	"test_expert_parallel.py::test_a_step_equals_one_process_on_the_global_batch[2-2]")

.PHONY: test-gpu-machine gpu-prebuild

# The CUDA variant for Hopper (9.0a) built here, in place, against the GPU machine's torch:
# moe_kernels/_C.cpython-312-x86_64-linux-gnu.so, to carry there and spare the lease the build
# (`make gpu-check STAGES="tests benchmarks sanitizer"`; build there if it does not import).
gpu-prebuild: $(GM_DEPS)
	MOE_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a $(GM_PY) setup.py build_ext --inplace

$(GM_DEPS): requirements-gpu-machine.txt pyproject.toml
	test -x $(GM_PY) || $(PYTHON312) -m venv $(GM_VENV)
	$(GM_PY) -m pip install --quiet -r requirements-gpu-machine.txt
	touch $@

test-gpu-machine: $(GM_DEPS)
	MOE_KERNELS_CUDA=1 $(GM_PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@cat build/summary.txt
	$(GM_PY) -m pytest -q -k "not emu-forward" $(GM_TESTS)

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
