# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up
# on first use (a venv with torch from the local wheel store, the test tools,
# the extension built against that torch) and reuses the set-up afterwards.
#
# `make wheel` builds a binary wheel into dist/ (the torch it is built for in its
# version: rope_ext-0.1.0+torch2.13.cpu-...whl). With TEST_FROM=wheel (the default
# when CI=true), `make test` and `make bench-call` run against that wheel installed
# in a fresh venv of its own ($(VENV_WHEEL)) instead of the editable build in $(VENV).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch, from pip's local wheel store (no multi-GB download).
TORCH_SPEC ?= torch==2.13.0
# transformers is a test and benchmark dependency only: the package never imports it.
DEPS   := numpy pytest pytest-xdist hypothesis transformers==5.18.0 accelerate==1.16.0 diffusers==0.42.1 setuptools wheel
# torchtitan and torchtune, for the tests of their drop-ins, without their own dependencies
# (datasets, wandb, tensorboard, torchao: none of them is on the paths the tests use).
NODEPS_TEST_DEPS := torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 \
                    typeguard==4.6.1 torchtune==0.6.1
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
# The tests import rope_ext from the source tree; where no editable build has left its
# rope_ext/_build_info.py there (CI builds a wheel instead), this build's goes there.
SANITIZE_TESTS ?= tests/test_op.py tests/test_errors.py tests/test_properties.py tests/test_autograd.py \
                  tests/test_fuzz.py tests/test_threads.py tests/test_cuda.py tests/test_any_position.py \
                  tests/test_func.py tests/test_norm_rope.py

# What `make test` and `make bench-call` run against: `source`, the editable build in
# $(VENV); or `wheel`, the wheel installed in $(VENV_WHEEL), tested from a copy of tests/
# where the source tree's rope_ext/ is not importable. CI tests the wheel: the package users
# install is what is tested, and it is built once (an editable build would be a second compile).
TEST_FROM ?= $(if $(filter true 1,$(CI)),wheel,source)

# The suite runs in PYTEST_WORKERS processes (pytest-xdist; one per core on the 2-core CI
# machine) where the venv has xdist: a venv made before it was a dependency runs serially.
PYTEST_WORKERS ?= 2
export PYTEST_WORKERS
xdist = $$($(1) -c "import xdist" >/dev/null 2>&1 && echo "--numprocesses=$(PYTEST_WORKERS)")

# The wheel: built with $(VENV)'s torch, or with ROPE_EXT_CUDA=1 with the CUDA build of
# torch in $(VENV_CUDA) (the kernel compiled for TORCH_CUDA_ARCH_LIST). Each kind is built
# in a folder of its own and copied to dist/.
WHEEL_CUDA  := $(filter 1,$(ROPE_EXT_CUDA))
WHEEL_VENV  := $(if $(WHEEL_CUDA),$(VENV_CUDA),$(VENV))
WHEEL_BUILD := build/wheel-$(if $(WHEEL_CUDA),cuda,cpu)
WHEEL_ENV    = $(if $(WHEEL_CUDA),CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)")
PY_SOURCES  := $(filter-out rope_ext/_build_info.py,$(wildcard rope_ext/*.py rope_ext/*/*.py))
# A clean venv holding the torch the CPU wheel is built for and the test tools; no
# build: the wheel goes in as a user would install it.
VENV_WHEEL ?= .venv-wheel
TEST_DEPS  := numpy pytest pytest-xdist hypothesis transformers==5.18.0 accelerate==1.16.0 diffusers==0.42.1
# Where the suite runs against the installed wheel: tests/, README.md (tests/test_readme.py
# runs its code blocks) and pyproject.toml (pytest's settings), copied; no rope_ext/.
WHEEL_TEST_DIR ?= build/wheel-test

.PHONY: demo test test-wheel build wheel bench bench-call cuda-build sanitize gpu-check gpu-check-quick gpu-wheels clean help hf-families test-hf-latest

help:
	@echo "make demo   correctness check and benchmark table (sets everything up on first use)"
	@echo "make test   the test suite (TEST_FROM=wheel: against the installed wheel; CI does this)"
	@echo "make wheel  a binary wheel in dist/ (ROPE_EXT_CUDA=1: with the CUDA kernel)"
	@echo "make test-wheel  the test suite against the wheel installed in a fresh venv"
	@echo "make bench  the full CPU benchmark"
	@echo "make cuda-build  compile the CUDA kernel with nvcc (no GPU needed)"
	@echo "make sanitize    the CPU tests against an ASan + UBSan build"
	@echo "make gpu-check   on a GPU machine: build, CUDA tests, compute-sanitizer, GPU benchmark"
	@echo "make gpu-check-quick  on a GPU machine: build, CUDA tests, rope_ext against a copy"
	@echo "make gpu-wheels  fetch the wheels gpu-check carries to the GPU machine (.whl/)"
	@echo "make hf-families  rewrite docs/hf_families.md (what rope_ext.hf patches) from rope_ext.hf.report()"
	@echo "make test-hf-latest  the Hugging Face tests against the newest transformers on PyPI"
	@echo "make clean  remove build outputs (keeps the venv)"

$(VENV)/.deps:
	@echo "==> creating $(VENV) with $(TORCH_SPEC) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -q --upgrade pip
	$(PY) -m pip install --progress-bar off "$(TORCH_SPEC)" $(DEPS)
	$(PY) -m pip install --progress-bar off -q --no-deps $(NODEPS_TEST_DEPS)
	@touch $@

# --no-build-isolation: compile against the torch in the venv, not a fresh download.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "==> building rope_ext against $$($(PY) -c 'import torch; print(torch.__version__)') (about a minute)"
	$(PY) -m pip install --no-build-isolation --no-deps -q -e .
	@touch $@

build: $(VENV)/.built

ifeq ($(TEST_FROM),wheel)
test: test-wheel
else
test: build
	$(PY) -m pytest -q $(call xdist,$(PY)) tests
endif

# A fresh build (no library left in build/lib.* by the other kind: build_ext would reuse a
# library newer than its sources), then pip's own wheel build against the venv's torch.
$(WHEEL_BUILD)/.built: $(WHEEL_VENV)/.deps $(SOURCES) $(PY_SOURCES) pyproject.toml
	@$(if $(WHEEL_CUDA),test -n "$(CUDA_HOME)" || { echo "wheel: ROPE_EXT_CUDA=1 but nvcc not found; install the CUDA toolkit or set CUDA_HOME"; exit 1; })
	@echo "==> building the rope_ext wheel against $$($(WHEEL_VENV)/bin/python -c 'import torch; print(torch.__version__)')$(if $(WHEEL_CUDA), for TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)) (a few minutes)"
	rm -rf $(WHEEL_BUILD) build/lib.* build/temp.* build/bdist.*
	$(WHEEL_ENV) $(WHEEL_VENV)/bin/python -m pip wheel --no-build-isolation --no-deps -q -w $(WHEEL_BUILD) .
	mkdir -p dist && cp $(WHEEL_BUILD)/rope_ext-*.whl dist/
	@touch $@

wheel: $(WHEEL_BUILD)/.built
	@cd $(WHEEL_BUILD) && ls -l rope_ext-*.whl | awk '{print "==> dist/" $$NF ", " $$5 " bytes"}'

$(VENV_WHEEL)/.deps:
	@echo "==> creating $(VENV_WHEEL) with $(TORCH_SPEC) and the test tools, for the wheel"
	$(PYTHON) -m venv $(VENV_WHEEL)
	$(VENV_WHEEL)/bin/python -m pip install --progress-bar off -q --upgrade pip
	$(VENV_WHEEL)/bin/python -m pip install --progress-bar off -q "$(TORCH_SPEC)" $(TEST_DEPS)
	$(VENV_WHEEL)/bin/python -m pip install --progress-bar off -q --no-deps $(NODEPS_TEST_DEPS)
	@touch $@

# --force-reinstall: a rebuilt wheel keeps its version; --no-deps, then pip check: torch
# must be there already (pip would otherwise fetch one, not necessarily this build of it).
$(VENV_WHEEL)/.installed: $(VENV_WHEEL)/.deps build/wheel-cpu/.built
	$(VENV_WHEEL)/bin/python -m pip install --progress-bar off -q --force-reinstall --no-deps build/wheel-cpu/rope_ext-*.whl
	@# torchtitan and torchtune are installed without their dependencies (NODEPS_TEST_DEPS):
	@# their missing ones are expected; anything else pip check finds fails.
	@broken=$$($(VENV_WHEEL)/bin/python -m pip check 2>&1 | grep -v -E '^(torchtitan|torchtune) [^ ]+ requires|^No broken'); \
	  if [ -n "$$broken" ]; then echo "$$broken"; exit 1; fi
	@touch $@

# The process that runs the suite imports rope_ext first, and it must come from the venv's
# site-packages; the tests' subprocesses see the same sys.path (cwd: the copy, no rope_ext/).
define WHEEL_TEST_PY
import importlib.metadata, os, sys, sysconfig
import pytest, rope_ext
site = os.path.realpath(sysconfig.get_paths()["platlib"]) + os.sep
for f in (rope_ext.__file__, sys.modules["rope_ext._C"].__file__):
    assert os.path.realpath(f).startswith(site), f"{f} is not in {site}: not the installed wheel"
print(f"==> testing the installed rope_ext {importlib.metadata.version('rope_ext')}: "
      f"{rope_ext.__file__}", flush=True)
try:
    import xdist  # noqa: F401
    workers = ["--numprocesses=" + os.environ.get("PYTEST_WORKERS", "2")]
except ImportError:
    workers = []
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *workers, "tests"]))
endef
export WHEEL_TEST_PY

# docs/hf_families.md is generated (tests/test_hf_dropin.py checks it is current).
hf-families: build
	$(PY) -m rope_ext.hf > docs/hf_families.md

# The Hugging Face tests against the newest transformers release on PyPI: a venv of its own
# with the same torch and test tools, testing the source tree's package (the build of
# $(VENV) leaves its library there), so nothing is compiled again.
VENV_HF_LATEST ?= .venv-hf-latest
HF_TESTS := tests/test_hf_dropin.py tests/test_hf_fused.py tests/test_hf_hooks.py tests/test_hf_families.py
test-hf-latest: build
	test -f $(VENV_HF_LATEST)/.deps || { $(PYTHON) -m venv $(VENV_HF_LATEST) && \
	  $(VENV_HF_LATEST)/bin/python -m pip install --progress-bar off -q "$(TORCH_SPEC)" \
	    $(filter-out transformers==%,$(TEST_DEPS)) && touch $(VENV_HF_LATEST)/.deps; }
	$(VENV_HF_LATEST)/bin/python -m pip install --progress-bar off -q --upgrade transformers
	@$(VENV_HF_LATEST)/bin/python -c "import transformers; print('==> transformers', transformers.__version__)"
	PYTHONPATH=$(abspath .) $(VENV_HF_LATEST)/bin/python -m pytest -q $(call xdist,$(VENV_HF_LATEST)/bin/python) \
	  $(HF_TESTS) --deselect tests/test_hf_dropin.py::test_families_document_is_the_report

test-wheel: $(VENV_WHEEL)/.installed
	rm -rf $(WHEEL_TEST_DIR) && mkdir -p $(WHEEL_TEST_DIR)
	cp -r tests docs README.md pyproject.toml $(WHEEL_TEST_DIR)/
	cd $(WHEEL_TEST_DIR) && $(abspath $(VENV_WHEEL))/bin/python -c "$$WHEEL_TEST_PY"

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
ifeq ($(TEST_FROM),wheel)
bench-call: $(VENV_WHEEL)/.installed
	$(VENV_WHEEL)/bin/python benchmarks/bench_call.py
else
bench-call: build
	$(PY) benchmarks/bench_call.py
endif

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
	test -f rope_ext/_build_info.py || cp build/sanitize/rope_ext/_build_info.py rope_ext/
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	ROPE_EXT_LIBRARY="$$(ls $(CURDIR)/build/sanitize/rope_ext/_C*.so)" \
	  $(PY) -m pytest -q -x -p no:cacheprovider $(call xdist,$(PY)) $(SANITIZE_TESTS)

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
	rm -rf build dist rope_ext/*.so rope_ext.egg-info $(VENV)/.built $(VENV_WHEEL)/.installed
