# The README's commands. Everything installs into ./.venv, so a fresh clone needs only python3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned CPU build lies on the developer/CI machines' disk; a bare "torch" would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCHS ?= 80 90
export PIP_DISABLE_PIP_VERSION_CHECK := 1

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
CU_SOURCES := $(wildcard csrc/cuda/*.cu)

.PHONY: install test demo bench check-cuda clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@

# --no-build-isolation: compile against the PyTorch in the venv instead of fetching another one.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

test: install
ifneq ($(NVCC),)
	$(MAKE) check-cuda
endif
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m rcl_kernels.demo

bench: install
	$(BIN)/python bench/bench_loss.py

# Compile-only check of every CUDA source for each architecture (no GPU needed).
check-cuda:
	@test -n "$(NVCC)" || { echo "check-cuda: nvcc not found"; exit 1; }
	@for f in $(CU_SOURCES); do for a in $(CUDA_ARCHS); do \
	  echo "nvcc sm_$$a $$f"; \
	  $(NVCC) -std=c++17 -arch=sm_$$a -Icsrc -c $$f -o /dev/null || exit 1; \
	done; done

clean:
	rm -rf build *.egg-info rcl_kernels/*.so $(VENV)
