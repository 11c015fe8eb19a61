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
SOURCES := setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo test build bench clean help

help:
	@echo "make demo   correctness check and benchmark table (sets everything up on first use)"
	@echo "make test   the test suite"
	@echo "make bench  the full CPU benchmark"
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

bench: build
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf build rope_ext/*.so rope_ext.egg-info $(VENV)/.built
