#!/usr/bin/env bash
# One GPU session's check (no network; about 9 minutes of a 15-minute lease): build the extension
# with its CUDA sources, benchmark the must-show rows of issues 11-13 with the protocol of
# shared/gpu-runs/2026-11-26-h100.md (BCL preset, forward+backward, features [N/2, 2, d]
# normalized, long-tailed labels, the flash-attention proxy), run the GPU tests, the crossover
# sweep of the algorithms, the per-config Triton timings, compute-sanitizer on tiny cases, and
# print a summary with every benchmark row last (Inf-CL rows where inf_cl is installed). Run from
# the repository root:
#
#     OUT=/some/dir bash bench/gpu_check.sh
#
# Steps run in order of value, so a run cut short still has the most important results: build;
# the must-show rows (N = 32,768 and 8,192 bf16, BCL's training shapes, fp32/TF32, N = 131,072);
# the GPU tests; the crossover sweep; N = 1,048,576; the Triton configs; compute-sanitizer; the
# torch.compile baselines at BCL's shapes. Each step has its own timeout within a total budget
# (GPU_CHECK_BUDGET_S, default 540 s); a failing or crashing step never stops the later ones.
# Each step's status, exit code, time and log (<OUT>/<step>.log) go into <OUT>/summary.txt and
# <OUT>/summary.tsv; the benchmark rows into <OUT>/<gpu>-gc-<step>.{json,csv,png}. Exit status:
# 0 when every step that ran passed, 1 otherwise.
#
# Knobs (environment):
#   OUT                  results folder (default ./gpu_check_out)
#   PYTHON               interpreter (default: python, else python3)
#   GPU_CHECK_BUDGET_S   total seconds (default 540)
#   GPU_CHECK_FUSED      fused implementations benchmarked (default
#                        triton,cuda,cuda:streaming,cuda:tiled,auto; bench/cases.py's syntax)
#   GPU_CHECK_VARIANTS   the untimed kernel variants benchmarked beside them, chosen by
#                        environment variables (default: the Triton presets forward-all, one-pass
#                        and 3xtf32 through RCL_KERNELS_TRITON_VARIANT, and the cuda backend's
#                        mma.sync kernels through RCL_KERNELS_CUDA_VARIANT=mma; empty: none)
#   GPU_CHECK_TRITON_CONFIGS_ARGS  more arguments of bench/triton_configs.py
#   GPU_CHECK_ARCHIVE    also pack <OUT> into this .tar.gz, a path outside OUT (for a machine
#                        that hands back few files)
#   TORCH_CUDA_ARCH_LIST (default: the arch of GPU 0, so the build compiles one architecture)
#   MAX_JOBS             build parallelism (default: nproc)
set -uo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
FUSED="${GPU_CHECK_FUSED:-triton,cuda,cuda:streaming,cuda:tiled,auto}"
UNTIMED_VARIANTS="triton{RCL_KERNELS_TRITON_VARIANT=forward-all},triton{RCL_KERNELS_TRITON_VARIANT=one-pass},triton{RCL_KERNELS_TRITON_VARIANT=3xtf32},cuda{RCL_KERNELS_CUDA_VARIANT=mma}"
VARIANTS="${GPU_CHECK_VARIANTS-$UNTIMED_VARIANTS}"
[[ -n "$VARIANTS" ]] && FUSED="$FUSED,$VARIANTS"
START=$(date +%s)
SUMMARY_TSV="$OUT/summary.tsv"
printf 'step\tstatus\trc\tseconds\tlog\n' >"$SUMMARY_TSV"
ANY_FAILED=0
export PYTHONUNBUFFERED=1

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# run_step NAME MAX_SECONDS CMD...: run CMD with a timeout of min(MAX_SECONDS, budget left),
# log to $OUT/NAME.log, record the outcome, never abort the script.
run_step() {
  local name="$1" max="$2"
  shift 2
  local log="$OUT/$name.log" left t rc=0 t0 status
  left=$(($(remaining) - 15)) # keep time for the summary
  if ((left < 20)); then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped (budget)" "-" "0" "-" >>"$SUMMARY_TSV"
    echo "== $name: skipped, $left s of the budget left"
    ANY_FAILED=1
    return 0
  fi
  t=$((max < left ? max : left))
  echo "== $name (timeout ${t}s): $(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-200)"
  t0=$(date +%s)
  timeout -k 10 "$t" "$@" >"$log" 2>&1 || rc=$?
  case "$rc" in
    0) status="ok" ;;
    124 | 137) status="timeout" ;;
    *) status="failed" ;;
  esac
  [[ "$status" == ok ]] || ANY_FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$log" >>"$SUMMARY_TSV"
  echo "   -> $status (rc $rc), last lines:"
  tail -n 5 "$log" | sed 's/^/   | /' || true
  return 0
}

note_step() { # note_step NAME STATUS MESSAGE: a step that did not run, with why
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "-" "0" "-" >>"$SUMMARY_TSV"
  echo "== $1: $2 ($3)"
  echo "$3" >"$OUT/$1.log"
}

# bench NAME MAX_SECONDS ARGS...: one bench/bench_loss.py run, rows in $OUT/<gpu>-gc-NAME.*.
# One worker per environment (not per case): each start costs seconds of the lease.
bench() {
  local name="$1" max="$2"
  shift 2
  run_step "bench-$name" "$max" "$PY" bench/bench_loss.py --device cuda --out "$OUT" \
    --tag "gc-$name" --isolation env --case-timeout 100 "$@"
}

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u)"
  echo "python: $PY ($(timeout 30 "$PY" --version 2>&1))"
  timeout 30 nvidia-smi || echo "nvidia-smi failed"
  command -v nvcc >/dev/null && timeout 30 nvcc --version || echo "nvcc not on PATH"
  timeout 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" || true
  timeout 60 "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"
  lscpu | grep -i 'model name' || true
  git log -1 --format='commit %H %s' 2>/dev/null || true
  git status --short 2>/dev/null | head -50 || true
} >"$OUT/environment.log" 2>&1

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  cap="$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ' || true)"
  [[ -n "$cap" ]] && export TORCH_CUDA_ARCH_LIST="$cap"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- 1. build (C++ + CUDA sources)
# Its time is issue 13's build-time figure (one architecture).
run_step build 240 "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
timeout 60 "$PY" -c "import rcl_kernels as rk; print(rk.available_backends())" >"$OUT/backends.log" 2>&1

# ---------------------------------------------------------------- 2. the must-show rows
# Issues 11 and 13: N = 32,768 bf16 d = 128 (each pass, against the flash proxy and eager).
bench n32k-bf16 120 --shapes 32768:128:1000 --dtypes bf16 --modes fwd,bwd,fwdbwd \
  --backends "$FUSED,reference,flash_sdpa,infcl"
# Issue 11: N = 8,192 (against torch.compile of the formula) and issue 12's last row.
bench n8k-bf16 120 --shapes 8192:128:1000 --dtypes bf16 --modes fwdbwd \
  --backends "$FUSED,reference,reference_compile,flash_sdpa,infcl"
# Issue 12: BCL's training shapes (ImageNet-LT, iNaturalist, CIFAR-100), fp32 "highest" and bf16.
bench bcl-shapes 120 --shapes 512:1024:1000 512:1024:8142 512:128:100 --dtypes fp32 bf16 \
  --modes fwdbwd --backends "$FUSED,reference"
# Issues 11 and 13: fp32 at TF32 and "highest", N = 32,768.
bench n32k-fp32 90 --shapes 32768:128:1000 --dtypes tf32 fp32 --modes fwdbwd \
  --backends "$FUSED,reference"
# Issues 11 and 13: N = 131,072 bf16.
bench n131k-bf16 90 --shapes 131072:128:1000 --dtypes bf16 --modes fwdbwd \
  --backends "$FUSED,flash_sdpa,infcl"

# ---------------------------------------------------------------- 3. GPU tests
# Triton kernels with their first config only (autotuning every shape of the suite would cost
# minutes of compiles). With pytest-xdist a crashing test (a segfault) takes down one worker,
# which is replaced, instead of the whole run.
pytest_args=(-q -m gpu -p no:cacheprovider -rfEs --junitxml "$OUT/pytest-gpu.xml")
if timeout 30 "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  pytest_args+=(--timeout 120)
fi
if timeout 30 "$PY" -c "import xdist" >/dev/null 2>&1; then
  pytest_args+=(-n 4) # 16 cores compile the Triton kernels; the tests are small for the GPU
fi
run_step pytest-gpu 180 env RCL_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m pytest "${pytest_args[@]}"

# ---------------------------------------------------------------- 4. crossover sweep
# Issue 12: time against N for each algorithm at fixed d, C and dtype, for auto's crossovers.
bench crossover 150 --sizes 256 512 1024 2048 4096 8192 16384 --d 128 1024 --C 1000 \
  --dtypes bf16 fp32 --modes fwdbwd --rep-ms 100 --plot crossover \
  --backends "cuda:streaming,cuda:tiled,triton,auto,reference"

# ---------------------------------------------------------------- 5. N = 1,048,576
# Issue 11's largest row: one warm-up call; do_bench's own estimate and repeat calls are the rest.
bench n1m-bf16 120 --shapes 1048576:128:1000 --dtypes bf16 --modes fwdbwd --warmup 1 \
  --rep-ms 1 --backends "triton,cuda"

# ---------------------------------------------------------------- 6. Triton configs
# Issue 11: each autotune config's time per kernel and variant at N = 32,768 bf16
# (bench/triton_configs.py; its whole plan takes 8-10 minutes, a session of its own:
# --budget-s 600); GPU_CHECK_TRITON_CONFIGS_ARGS adds arguments.
# shellcheck disable=SC2086  # a list of words on purpose
run_step triton-configs 90 "$PY" bench/triton_configs.py --out "$OUT/triton-configs.json" \
  --budget-s 75 --shapes bcl-n32768-d128 --dtypes bf16 \
  --variants default forward-all one-pass one-pass-atomic ${GPU_CHECK_TRITON_CONFIGS_ARGS:-}

# ---------------------------------------------------------------- 7. compute-sanitizer
SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
# Tiny odd sizes through the public API, forward and backward, fp32 and bf16, each algorithm the
# backend takes (an algorithm it refuses is reported and skipped).
SANITIZER_CASE='
import sys
import torch
import torch.nn.functional as F
import rcl_kernels as rk
backend = sys.argv[1]
for algorithm in (None, "streaming", "tiled"):
    kw = {} if algorithm is None else {"algorithm": algorithm}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for n, c, d in ((5, 3, 20), (17, 2, 130), (1, 1, 7)):
                f = F.normalize(torch.randn(n, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
                p = F.normalize(torch.randn(c, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
                y = torch.randint(0, c, (n,), device="cuda")
                rk.bcl_loss(f, y, p, backend=backend, **kw).backward()
        torch.cuda.synchronize()
        print(backend, algorithm or "default", "ok")
    except (TypeError, ValueError) as error:
        if algorithm is None or "algorithm" not in str(error):
            raise
        print(backend, algorithm, "not offered:", error)
'
if [[ -z "$SANITIZER" ]]; then
  note_step sanitizer "not run" "compute-sanitizer not found"
else
  # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for backend in cuda triton; do
    if timeout 60 "$PY" -c "import sys, rcl_kernels as rk; sys.exit(rk.available_backends()['$backend'] is not None)"; then
      run_step "memcheck-$backend" 75 env RCL_KERNELS_TRITON_AUTOTUNE=0 "$SANITIZER" --tool memcheck \
        --error-exitcode 1 --leak-check no "$PY" -c "$SANITIZER_CASE" "$backend"
    else
      note_step "memcheck-$backend" "not run" "backend $backend unavailable (see backends.log)"
    fi
  done
  if timeout 60 "$PY" -c "import sys, rcl_kernels as rk; sys.exit(rk.available_backends()['cuda'] is not None)"; then
    run_step racecheck-cuda 75 "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" -c "$SANITIZER_CASE" cuda
    # The untimed variants (issue 13: the mma.sync kernels; issue 11: Triton's one-pass backward).
    run_step memcheck-cuda-mma 75 env RCL_KERNELS_CUDA_VARIANT=mma "$SANITIZER" --tool memcheck \
      --error-exitcode 1 --leak-check no "$PY" -c "$SANITIZER_CASE" cuda
    run_step racecheck-cuda-mma 75 env RCL_KERNELS_CUDA_VARIANT=mma "$SANITIZER" --tool racecheck \
      --error-exitcode 1 "$PY" -c "$SANITIZER_CASE" cuda
  fi
  if timeout 60 "$PY" -c "import sys, rcl_kernels as rk; sys.exit(rk.available_backends()['triton'] is not None)"; then
    run_step memcheck-triton-one-pass 75 env RCL_KERNELS_TRITON_AUTOTUNE=0 RCL_KERNELS_TRITON_VARIANT=one-pass \
      "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no "$PY" -c "$SANITIZER_CASE" triton
  fi
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

# ---------------------------------------------------------------- 8. torch.compile at BCL's shapes
# Issue 12's context (earlier: about 1.0 ms fp32 and 0.79 ms bf16 at N = 512, d = 1024); each
# case compiles for tens of seconds, so last.
bench compile-bcl 90 --shapes 512:1024:1000 --dtypes fp32 bf16 --modes fwdbwd \
  --backends reference_compile

# ---------------------------------------------------------------- summary (printed last)
{
  echo
  echo "gpu_check summary ($(($(date +%s) - START)) s of a ${BUDGET} s budget; logs in $OUT)"
  column -t -s $'\t' "$SUMMARY_TSV" 2>/dev/null || cat "$SUMMARY_TSV"
  if [[ -f "$OUT/pytest-gpu.log" ]]; then
    echo "pytest: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/pytest-gpu.log" | tail -n 1)"
  fi
  echo "backends: $(tail -n 1 "$OUT/backends.log" 2>/dev/null)"
  shopt -s nullglob
  rows=("$OUT"/*-gc-*.json)
  if ((${#rows[@]})); then
    echo
    echo "benchmark rows (median ms / peak MB above inputs)"
    timeout 60 "$PY" bench/bench_loss.py --report "${rows[@]}" --plot none
  fi
} 2>&1 | tee "$OUT/summary.txt"
if [[ -n "${GPU_CHECK_ARCHIVE:-}" ]]; then
  tar czf "$GPU_CHECK_ARCHIVE" -C "$OUT" . && echo "packed $OUT into $GPU_CHECK_ARCHIVE"
fi
exit "$ANY_FAILED"
