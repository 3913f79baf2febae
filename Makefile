# The README's commands. Everything installs into ./.venv, so a fresh clone needs only python3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned CPU build lies on the developer/CI machines' disk; a bare "torch" would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
NVCC ?= $(shell command -v nvcc 2>/dev/null)
# check-cuda compiles for sm_80 and sm_90 only, to keep CI short: setup.py ships 8.0;9.0;10.0;12.0+PTX,
# but the kernels have no per-arch code (no __CUDA_ARCH__ branches), so sm_100/sm_120 would compile
# the same code again (minutes per file on 2 cores). Check every shipped arch with
# CUDA_ARCHS="80 90 100 120".
CUDA_ARCHS ?= 80 90
export PIP_DISABLE_PIP_VERSION_CHECK := 1

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
CU_SOURCES := $(wildcard csrc/cuda/*.cu)

.PHONY: install test demo bench check-cuda check-sass clean

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

# The main job: a short BCL+RCL training on Fashion-MNIST-LT (rho=100) on the CPU, then its report.
# The real data comes from Debian's package; install it when missing (needs root, as on CI).
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
demo: install
	@test -d $(FMNIST_DIR) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(BIN)/python -m rcl_train.demo --data-root $(FMNIST_DIR)

# The pytest-benchmark suite of the timing cases (bench/test_speed.py; GPU cases only where a GPU
# is), compared with the latest run saved in bench/results/pytest-benchmark. Save a run with
# BENCH_ARGS=--benchmark-save=NAME; fail on a slowdown with
# BENCH_ARGS=--benchmark-compare-fail=median:10%. Memory, baselines and plots come from the
# standalone runner, bench/bench_loss.py; on a GPU machine run bench/gpu_check.sh.
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m pytest bench/ --benchmark-only --benchmark-storage=bench/results/pytest-benchmark \
	  --benchmark-compare $(BENCH_ARGS)

# Compile-only check of every CUDA source for each architecture (no GPU needed), with the
# defines PyTorch's CUDAExtension passes to nvcc. The torch bindings (csrc/cuda/*.cpp) are
# syntax-checked against the venv's torch headers, as C++20 (torch >= 2.14 requires it) and as
# C++17 where those headers still allow it; a CPU-only torch wheel lacks
# c10/cuda/impl/cuda_cmake_macros.h (a CMake-generated, effectively empty header), so an empty
# stand-in is put on the include path after the real ones. Last, the kernels run on the host under
# a thread-per-CUDA-thread emulation (wmma with its documented semantics; mma.sync, ldmatrix and
# cp.async with the PTX ISA's per-lane layouts) against a dense formula.
NVCC_TORCH_DEFS := -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
CUDA_BINDINGS := $(wildcard csrc/cuda/*.cpp)
HOST_EMU_TESTS := wmma_lse_test tiled_epilogue_test mma_lse_test
CHECK_STUB := build/check-cuda-stub
check-cuda:
	@test -n "$(NVCC)" || { echo "check-cuda: nvcc not found"; exit 1; }
	@for f in $(CU_SOURCES); do \
	  echo "nvcc $(foreach a,$(CUDA_ARCHS),sm_$(a)) $$f"; \
	  $(NVCC) -std=c++20 -O3 --use_fast_math $(NVCC_TORCH_DEFS) --threads 0 \
	    $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	    -Icsrc -c $$f -o /dev/null || exit 1; \
	done
	@if [ -n "$(CUDA_BINDINGS)" ]; then \
	  inc=$$($(BIN)/python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))" 2>/dev/null) || \
	    { echo "check-cuda: torch not importable from $(BIN)/python; bindings not checked"; exit 0; }; \
	  mkdir -p $(CHECK_STUB)/c10/cuda/impl && echo '#pragma once' > $(CHECK_STUB)/c10/cuda/impl/cuda_cmake_macros.h; \
	  first=$${inc%% *}; aten=$${first#-I}/ATen/ATen.h; \
	  stds="c++20"; grep -q 'C++20 or later' $$aten || stds="c++17 c++20"; \
	  for f in $(CUDA_BINDINGS); do for std in $$stds; do \
	    echo "nvcc (host syntax check, torch headers, $$std) $$f"; \
	    $(NVCC) -std=$$std -DRCL_WITH_CUDA -Xcompiler -fsyntax-only -Xcompiler -Wno-c++20-extensions \
	      $$inc -I$(CHECK_STUB) -Icsrc -c $$f -o /dev/null || exit 1; \
	  done; done; \
	fi
	@echo "host emulation of the CUDA kernels (csrc/cuda/host_emu): every dtype path vs a dense formula"
	@mkdir -p build && for t in $(HOST_EMU_TESTS); do \
	  $(NVCC) -std=c++20 -O2 -Xcompiler -pthread -Icsrc csrc/cuda/host_emu/$$t.cpp -o build/$$t && \
	  build/$$t || exit 1; \
	done

# Compile-only checks of the Triton kernels' machine code for sm_90 (pipelined loops, no register
# spills in the configs that run untuned): minutes on 2 cores, so not part of `make test`
# (tests/test_kernel_sass.py runs its quick CUDA check there and skips these).
check-sass: install
	RCL_TEST_SASS=1 $(BIN)/python -m pytest -q tests/test_kernel_sass.py

clean:
	rm -rf build dist *.egg-info rcl_kernels/*.so rcl_kernels/_build_info.json $(VENV)
