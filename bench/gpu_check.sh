#!/usr/bin/env bash
# One-shot check on a fresh GPU machine (no network): build the extension with its CUDA sources,
# run every GPU test of the repo, run the benchmark, run compute-sanitizer on tiny cases, and
# print a summary table last. Run from the repository root:
#
#     OUT=/some/dir bash bench/gpu_check.sh
#
# Every step runs under its own timeout and a total budget (GPU_CHECK_BUDGET_S, default 540 s),
# and a failing step never stops the later ones: each step's status, exit code, time and log
# (<OUT>/<step>.log) go into the summary (<OUT>/summary.txt, <OUT>/summary.tsv). Exit status: 0
# when every step that ran passed, 1 otherwise.
#
# Knobs (environment): OUT (default ./gpu_check_out), PYTHON, GPU_CHECK_BUDGET_S,
# GPU_CHECK_BENCH_ARGS (one bench/bench_loss.py run with these arguments instead of the plan of
# runs below), TORCH_CUDA_ARCH_LIST (default:
# the arch of GPU 0, so the build compiles one architecture only), MAX_JOBS.
set -euo pipefail

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
START=$(date +%s)
SUMMARY_TSV="$OUT/summary.tsv"
printf 'step\tstatus\trc\tseconds\tlog\n' >"$SUMMARY_TSV"
ANY_FAILED=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# run_step NAME MAX_SECONDS CMD...: run CMD with a timeout of min(MAX_SECONDS, budget left),
# log to $OUT/NAME.log, record the outcome, never abort the script.
run_step() {
  local name="$1" max="$2"
  shift 2
  local log="$OUT/$name.log" left t rc=0 t0 status
  left=$(($(remaining) - 5))
  if ((left < 20)); then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped (budget)" "-" "0" "-" >>"$SUMMARY_TSV"
    echo "== $name: skipped, $left s of the budget left"
    ANY_FAILED=1
    return 0
  fi
  t=$((max < left ? max : left))
  echo "== $name (timeout ${t}s): $(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-160)"
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

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u)"
  echo "python: $PY ($(timeout 30 "$PY" --version 2>&1))"
  timeout 30 nvidia-smi || echo "nvidia-smi failed"
  command -v nvcc >/dev/null && timeout 30 nvcc --version || echo "nvcc not on PATH"
  timeout 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" || true
  timeout 60 "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"
  git rev-parse HEAD 2>/dev/null || true
  git status --short 2>/dev/null | head -50 || true
} >"$OUT/environment.log" 2>&1 || true

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  cap="$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ' || true)"
  if [[ -n "$cap" ]]; then export TORCH_CUDA_ARCH_LIST="$cap"; fi
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- 1. build (C++ + CUDA sources)
run_step build 240 "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .

# Which backends the build and this machine provide (also written to the log for the record).
timeout 60 "$PY" - >"$OUT/backends.log" 2>&1 <<'EOF' || true
import rcl_kernels as rk
print(rk.available_backends())
EOF

# ---------------------------------------------------------------- 2. GPU tests
pytest_args=(-q -m gpu -p no:cacheprovider -rfEs --junitxml "$OUT/pytest-gpu.xml")
if timeout 30 "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  pytest_args+=(--timeout 150)
fi
# Triton kernels with their first config only (autotuning every shape of the suite would cost
# minutes of compiles); tests/test_triton_lse.py runs each autotune config explicitly, and the
# benchmark below runs autotuned.
run_step pytest-gpu 180 env RCL_KERNELS_TRITON_AUTOTUNE=0 "$PY" -m pytest "${pytest_args[@]}"

# ---------------------------------------------------------------- 3. benchmark
# The figures the Triton and CUDA issues ask for, most important first (each run is its own step,
# so a slow one cannot starve the rest of the summary). GPU_CHECK_BENCH_ARGS replaces the plan
# with one run of those arguments.
bench() { # bench NAME MAX_SECONDS ARGS...
  local name="$1" max="$2"
  shift 2
  run_step "bench-$name" "$max" "$PY" bench/bench_loss.py --device cuda --out "$OUT" --tag "$name" "$@"
}
if [[ -n "${GPU_CHECK_BENCH_ARGS:-}" ]]; then
  # shellcheck disable=SC2086  # a list of words on purpose
  bench custom 300 ${GPU_CHECK_BENCH_ARGS}
else
  fused=triton,cuda
  bench bcl-d128-bf16 120 --sizes 8192 32768 --dtypes bfloat16 --modes fwd,bwd,fwdbwd \
    --backends "$fused,reference,flash_sdpa" --repeats 20 --warmup 5
  bench bcl-d128-tf32 60 --sizes 32768 --dtypes float32 --matmul-precision high --modes fwdbwd \
    --backends "$fused" --repeats 10 --warmup 3
  bench bcl-d128-fp32 60 --sizes 32768 --dtypes float32 --matmul-precision highest --modes fwdbwd \
    --backends "$fused" --repeats 5 --warmup 2
  bench bcl-imagenet-lt 60 --sizes 512 --d 1024 --C 1000 --dtypes float32 --modes fwdbwd \
    --backends "$fused,reference" --repeats 20 --warmup 5
  bench bcl-inaturalist 60 --sizes 512 --d 1024 --C 8142 --dtypes float32 --modes fwdbwd \
    --backends "$fused,reference" --repeats 20 --warmup 5
  bench bcl-1m-bf16 90 --sizes 1048576 --dtypes bfloat16 --modes fwdbwd --backends "$fused" \
    --repeats 2 --warmup 1
fi

# ---------------------------------------------------------------- 4. compute-sanitizer
SANITIZER="$(command -v compute-sanitizer || true)"
if [[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]]; then
  SANITIZER=/usr/local/cuda/bin/compute-sanitizer
fi
# Tiny odd-sized cases of the C++/CUDA op (fp32 and bf16, forward and backward, self offset).
CUDA_CASE='
import torch, rcl_kernels  # noqa: F401  (loads rcl_kernels._C, which registers the ops)
op = torch.ops.rcl_kernels
for dtype in (torch.float32, torch.bfloat16):
    for n, m, d, off in ((5, 13, 20, 0), (17, 3, 130, 2), (1, 1, 7, 0)):
        z = torch.randn(n, d, device="cuda", dtype=dtype)
        k = torch.randn(m, d, device="cuda", dtype=dtype)
        rl = torch.randint(0, 3, (n,), device="cuda")
        cl = torch.randint(0, 3, (m,), device="cuda")
        rb = torch.randn(n, device="cuda")
        cb = torch.randn(m, device="cuda")
        lse = op.masked_lse_forward(z, k, rl, cl, rb, cb, off, 0.5, False)
        g = torch.randn(n, device="cuda")
        dz, dk = op.masked_lse_backward(g, z, k, rl, cl, rb, cb, lse, off, 0.5, False)
torch.cuda.synchronize()
print("cuda op ok")
'
# The same through the Triton kernels (one fixed config: no autotuning under the sanitizer).
TRITON_CASE="${CUDA_CASE//op = torch.ops.rcl_kernels/from rcl_kernels import triton_lse as op}"
TRITON_CASE="${TRITON_CASE//cuda op ok/triton ok}"
CUDA_CASE_CHECK='
import sys, torch, rcl_kernels  # noqa: F401
ok = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rcl_kernels::masked_lse_forward", "CUDA")
sys.exit(0 if ok else 1)
'
if [[ -z "$SANITIZER" ]]; then
  note_step sanitizer-cuda "not run" "compute-sanitizer not found"
  note_step sanitizer-triton "not run" "compute-sanitizer not found"
else
  san=("$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check no)
  # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  if timeout 60 "$PY" -c "$CUDA_CASE_CHECK" >/dev/null 2>&1; then
    run_step sanitizer-cuda 60 "${san[@]}" "$PY" -c "$CUDA_CASE"
  else
    note_step sanitizer-cuda "not run" "the CUDA kernels of rcl_kernels::masked_lse_* are not built"
  fi
  if timeout 30 "$PY" -c "import triton" >/dev/null 2>&1; then
    run_step sanitizer-triton 90 env RCL_KERNELS_TRITON_AUTOTUNE=0 "${san[@]}" "$PY" -c "$TRITON_CASE"
  else
    note_step sanitizer-triton "not run" "triton is not importable"
  fi
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

# ---------------------------------------------------------------- summary (printed last)
{
  echo
  echo "gpu_check summary ($(($(date +%s) - START)) s of a ${BUDGET} s budget; logs in $OUT)"
  column -t -s $'\t' "$SUMMARY_TSV" 2>/dev/null || cat "$SUMMARY_TSV"
  if [[ -f "$OUT/pytest-gpu.log" ]]; then
    echo "pytest: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/pytest-gpu.log" | tail -n 1)"
  fi
  echo "backends: $(tail -n 1 "$OUT/backends.log" 2>/dev/null)"
} | tee "$OUT/summary.txt"
exit "$ANY_FAILED"
