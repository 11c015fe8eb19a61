# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up
# on first use (a venv with torch from the local wheel store, the test tools,
# the extension built against that torch) and reuses the set-up afterwards.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch, from pip's local wheel store (no multi-GB download).
TORCH_SPEC ?= torch==2.13.0
# transformers is a test and benchmark dependency only: the package never imports it.
DEPS   := numpy pytest hypothesis transformers==5.18.0 setuptools wheel
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.h csrc/cuda/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

# The CUDA kernel is compiled (not run: no GPU here) against the CUDA build of
# torch in a second venv, so a change that breaks nvcc turns CI red.
VENV_CUDA ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# `which nvcc` may be a wrapper script outside the toolkit; point at the toolkit.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda) $(patsubst %/bin/nvcc,%,$(realpath $(shell command -v nvcc))))

# The CPU kernel under AddressSanitizer and UndefinedBehaviorSanitizer: a separate
# build, loaded through ROPE_EXT_LIBRARY, with libasan preloaded into Python (and
# libstdc++ right after it, or ASan's __cxa_throw interceptor finds nothing to wrap).
SANITIZE_TESTS ?= tests/test_op.py tests/test_errors.py tests/test_properties.py tests/test_autograd.py \
                  tests/test_fuzz.py tests/test_threads.py tests/test_cuda.py tests/test_any_position.py \
                  tests/test_func.py tests/test_norm_rope.py

.PHONY: demo test build bench bench-call cuda-build sanitize gpu-check gpu-check-quick gpu-wheels clean help

help:
	@echo "make demo   correctness check and benchmark table (sets everything up on first use)"
	@echo "make test   the test suite"
	@echo "make bench  the full CPU benchmark"
	@echo "make cuda-build  compile the CUDA kernel with nvcc (no GPU needed)"
	@echo "make sanitize    the CPU tests against an ASan + UBSan build"
	@echo "make gpu-check   on a GPU machine: build, CUDA tests, compute-sanitizer, GPU benchmark"
	@echo "make gpu-check-quick  on a GPU machine: build, CUDA tests, rope_ext against a copy"
	@echo "make gpu-wheels  fetch the wheels gpu-check carries to the GPU machine (.whl/)"
	@echo "make clean  remove build outputs (keeps the venv)"

$(VENV)/.deps:
	@echo "==> creating $(VENV) with $(TORCH_SPEC) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -q --upgrade pip
	$(PY) -m pip install --progress-bar off "$(TORCH_SPEC)" $(DEPS)
	@touch $@

# --no-build-isolation: compile against the torch in the venv, not a fresh download.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "==> building rope_ext against $$($(PY) -c 'import torch; print(torch.__version__)') (about a minute)"
	$(PY) -m pip install --no-build-isolation --no-deps -q -e .
	@touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) benchmarks/demo.py

# The other RoPE implementations the full benchmark compares with, and matplotlib for its plot.
# torchtune --no-deps: its RoPE module needs nothing beyond torch (the benchmark loads it alone).
$(VENV)/.bench-deps: $(VENV)/.deps
	$(PY) -m pip install --progress-bar off -q matplotlib rotary-embedding-torch einops
	$(PY) -m pip install --progress-bar off -q --no-deps torchtune==0.6.1
	@touch $@

bench: build $(VENV)/.bench-deps
	$(PY) benchmarks/bench_cpu.py
	$(PY) benchmarks/bench_call.py

# The per-call table alone (decode-sized input; ratios to torch.add in the same run).
bench-call: build
	$(PY) benchmarks/bench_call.py

$(VENV_CUDA)/.deps:
	@echo "==> creating $(VENV_CUDA) with $(CUDA_TORCH_SPEC), the CUDA build (several GB, first run only)"
	$(PYTHON) -m venv $(VENV_CUDA)
	$(VENV_CUDA)/bin/python -m pip install --progress-bar off -q "$(CUDA_TORCH_SPEC)" numpy setuptools wheel
	@touch $@

cuda-build: $(VENV_CUDA)/.deps
	@test -n "$(CUDA_HOME)" || { echo "cuda-build: nvcc not found; install the CUDA toolkit or set CUDA_HOME"; exit 1; }
	@echo "==> compiling the CUDA kernel for TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) with $(CUDA_HOME)/bin/nvcc (a few minutes)"
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" ROPE_EXT_CUDA=1 \
	  $(VENV_CUDA)/bin/python setup.py -q build_ext -b build/cuda -t build/cuda/tmp
	cd build/cuda && ../../$(VENV_CUDA)/bin/python ../../.ci/check_cuda_build.py

sanitize: $(VENV)/.deps
	@echo "==> building rope_ext with -fsanitize=address,undefined"
	ROPE_EXT_CUDA=0 ROPE_EXT_SANITIZE=address,undefined $(PY) setup.py -q build_ext -b build/sanitize -t build/sanitize/tmp
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	ROPE_EXT_LIBRARY="$$(ls $(CURDIR)/build/sanitize/rope_ext/_C*.so)" \
	  $(PY) -m pytest -q -x -p no:cacheprovider $(SANITIZE_TESTS)

# On the lent GPU machine (the device tool), with its own python3 and torch: no venv here.
gpu-check:
	bash .ci/gpu_check.sh full

gpu-check-quick:
	bash .ci/gpu_check.sh quick

# The GPU machine has no network: the peers it lacks travel as wheels in .whl/
# (ignored by git; name it in the device call's carry). liger-kernel is pure Python.
GPU_PY_VERSION ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl liger-kernel==0.8.5
	@ls -la .whl

clean:
	rm -rf build rope_ext/*.so rope_ext.egg-info $(VENV)/.built
