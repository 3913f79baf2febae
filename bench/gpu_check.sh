#!/usr/bin/env bash
# One GPU session's device check, for a bare machine (torch + triton + nvcc; no network), run from
# the repository root:
#
#     bash bench/gpu_check.sh             # about 8 minutes at most
#     bash bench/gpu_check.sh --dry-run   # on any machine: check every script, flag, shape and
#                                         # candidate name below, run nothing
#
# Ordered by what decides something, so a run cut short still has the most important answers:
#   0. wheels   pytest, pytest-timeout, ninja, hypothesis from bench/wheels/ (bench/fetch_wheels.sh
#               downloads them; the device tool carries the ignored folder), installed offline
#   1. build    the extension with its CUDA sources for this GPU's architecture only
#   2. selftest every candidate against the float64 oracle, each in its own process
#               (python -m rcl_kernels.selftest; its verdicts decide what auto may time)
#   3. untimed  the candidates no GPU has timed, at N = 32,768 bf16 d = 128 and at BCL's shapes
#   4. timed    the timed candidates at the same shapes, then the crossover of the algorithms
#   5. table    auto's choice tuned at the crossover shapes: the tuning table shipped for this GPU
#   6. sanitize compute-sanitizer memcheck/racecheck on tiny odd cases
# Each step has its own budget (seconds, below) within GPU_CHECK_BUDGET_S (default 480). A plan is
# printed first and the budget left after each step. Plotting is never part of a step's status
# (rows are written with --plot none; plots are drawn at the end where matplotlib is installed).
#
# Output: bench/results/gpu-check-<UTC date>-<gpu>/ (OUT overrides it) with environment.log, each
# step's log, summary.{txt,tsv}, the benchmark rows <gpu>-gc-<step>.{json,csv}, selftest.json, and
# tuning/<model>.json, also copied to rcl_kernels/tuning/ where auto reads it. Exit status 0 when
# every step that ran passed, 1 otherwise.
#
# Knobs (environment): OUT, PYTHON, GPU_CHECK_BUDGET_S, WHEELS_DIR (default bench/wheels),
# TORCH_CUDA_ARCH_LIST (default: GPU 0's), MAX_JOBS (default nproc).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --dry-run or --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
WHEELS="${WHEELS_DIR:-bench/wheels}"
STAMP="$(date -u +%Y-%m-%dT%H%MZ)"
GPU_SLUG="$( (timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo nogpu) | head -n 1 | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')"
OUT="${OUT:-bench/results/gpu-check-$STAMP-$GPU_SLUG}"

# The shapes and candidates every step uses (bench/cases.py's syntax); --dry-run checks them all.
UNTIMED="triton:exp2,triton:exp2-lean,triton:exp2-lean-resident,triton:forward-all,triton:forward-all-grouped,triton:one-pass,triton:one-pass-atomic,triton:3xtf32,cuda:mma,cuda:tiled"
TIMED="triton:default,cuda:wmma,auto,reference"
BIG_SHAPE="32768:128:1000"
BCL_SHAPES="512:1024:1000 512:1024:8142 512:128:100"
CROSSOVER_SIZES="256 512 1024 2048 4096 8192 16384"
CROSSOVER_D="128 1024"
TABLE_SHAPES="256:128:1000 1024:128:1000 4096:128:1000 16384:128:1000 512:1024:1000 2048:1024:1000 8192:1024:1000"

# name|seconds|command: the steps in order. bench_loss steps write rows only (--plot none).
BENCH="$PY bench/bench_loss.py --device cuda --isolation env --case-timeout 100 --plot none --modes fwdbwd"
STEPS=(
  "wheels|20|$PY -m pip install --no-index --find-links $WHEELS --quiet pytest pytest-timeout ninja hypothesis"
  "build|110|$PY -m pip install --no-index --no-build-isolation --no-deps -e ."
  "selftest|75|$PY -m rcl_kernels.selftest --device cuda --jobs 8 --timeout 70 --json OUT/selftest.json"
  "untimed-n32k|35|$BENCH --out OUT --tag gc-untimed-n32k --shapes $BIG_SHAPE --dtypes bf16 --backends $UNTIMED"
  "untimed-bcl|35|$BENCH --out OUT --tag gc-untimed-bcl --shapes $BCL_SHAPES --dtypes fp32 bf16 --backends $UNTIMED"
  "timed-n32k|25|$BENCH --out OUT --tag gc-timed-n32k --shapes $BIG_SHAPE --dtypes bf16 --backends $TIMED,flash_sdpa"
  "timed-bcl|25|$BENCH --out OUT --tag gc-timed-bcl --shapes $BCL_SHAPES --dtypes fp32 bf16 --backends $TIMED"
  "crossover|60|$BENCH --out OUT --tag gc-crossover --sizes $CROSSOVER_SIZES --d $CROSSOVER_D --C 1000 --dtypes bf16 fp32 --rep-ms 50 --backends cuda:streaming,cuda:tiled,triton,auto,reference"
  "table|45|$PY -m rcl_kernels.autotune --device cuda --dtypes bfloat16 float32 --table OUT/tuning/TABLE.json --shapes $TABLE_SHAPES"
  "sanitize|45|bash bench/gpu_sanitize.sh OUT"
)

plan_total=0
echo "gpu_check plan ($( ((DRY_RUN)) && echo 'dry run, nothing runs' || echo "budget ${BUDGET} s"); output $OUT):"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name seconds command <<<"$step"
  plan_total=$((plan_total + seconds))
  printf '  %-13s %4s s  %s\n' "$name" "$seconds" "$(cut -c1-150 <<<"$command")"
done
echo "  total         ${plan_total} s of ${BUDGET} s"

# ---------------------------------------------------------------- --dry-run: check, run nothing
if ((DRY_RUN)); then
  failed=0
  ((plan_total <= BUDGET)) || { echo "error: the steps' budgets add to ${plan_total} s, over ${BUDGET} s"; failed=1; }
  for script in bench/bench_loss.py bench/cases.py bench/gpu_sanitize.sh bench/fetch_wheels.sh \
    rcl_kernels/selftest.py rcl_kernels/autotune.py rcl_kernels/info.py setup.py; do
    [[ -f "$script" ]] || { echo "error: $script does not exist"; failed=1; }
  done
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name seconds command <<<"$step"
    read -ra words <<<"${command//OUT/$OUT}"
    case "${words[1]}" in
      bench/bench_loss.py)
        "$PY" - "${words[@]:2}" <<'EOF' || { echo "error: step $name"; failed=1; }
import sys
sys.path.insert(0, "bench")
import bench_loss, cases
from rcl_kernels import dispatch
args = bench_loss.parse_args(sys.argv[1:])
shapes = bench_loss.grid(args, "cuda")
for text in cases.split_list(args.backends):
    impl = cases.parse_impl(text)
    if impl.backend in cases.RK_BACKENDS and impl.backend != "auto":
        dispatch.resolve(impl.backend + (f":{impl.algorithm}" if impl.algorithm else ""))
print(f"  ok: bench_loss {len(shapes)} shapes, {len(cases.split_list(args.backends))} implementations")
EOF
        ;;
      -m)
        case "${words[2]}" in
          rcl_kernels.selftest) "$PY" -m rcl_kernels.selftest "${words[@]:3}" --check-args ;;
          rcl_kernels.autotune) "$PY" -m rcl_kernels.autotune "${words[@]:3}" --dry-run ;;
          pip) "$PY" -m pip --version >/dev/null && echo "  ok: pip ($name)" ;;
          *) false ;;
        esac || { echo "error: step $name: ${words[*]:0:4}"; failed=1; }
        ;;
      *)
        [[ -f "${words[1]}" ]] && echo "  ok: ${words[1]}" || { echo "error: step $name: ${words[1]} missing"; failed=1; }
        ;;
    esac
  done
  if [[ -d "$WHEELS" ]]; then
    echo "  wheels: $(du -sm "$WHEELS" | cut -f1) MiB in $WHEELS"
  else
    echo "  note: $WHEELS is missing; run bash bench/fetch_wheels.sh before carrying the tree to a GPU"
  fi
  ((failed)) && echo "gpu_check --dry-run: FAILED" || echo "gpu_check --dry-run: ok"
  exit "$failed"
fi

# ---------------------------------------------------------------- the run
mkdir -p "$OUT/tuning"
START=$(date +%s)
SUMMARY_TSV="$OUT/summary.tsv"
printf 'step\tstatus\trc\tseconds\tlog\n' >"$SUMMARY_TSV"
ANY_FAILED=0
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 RCL_KERNELS_CACHE_DIR="$OUT/cache"
remaining() { echo $((BUDGET - ($(date +%s) - START))); }

{
  echo "date: $(date -u)"
  echo "python: $PY ($("$PY" --version 2>&1))"
  timeout 30 nvidia-smi || echo "nvidia-smi failed"
  command -v nvcc >/dev/null && timeout 30 nvcc --version || echo "nvcc not on PATH"
  lscpu | grep -i 'model name' || true
  git log -1 --format='commit %H %s' 2>/dev/null || true
  git status --short 2>/dev/null | head -50 || true
} >"$OUT/environment.log" 2>&1
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  cap="$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ' || true)"
  [[ -n "$cap" ]] && export TORCH_CUDA_ARCH_LIST="$cap"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

for step in "${STEPS[@]}"; do
  IFS='|' read -r name seconds command <<<"$step"
  left=$(remaining)
  log="$OUT/$name.log"
  if ((left < 10)); then
    printf '%s\tskipped (budget)\t-\t0\t-\n' "$name" >>"$SUMMARY_TSV"
    echo "== $name: skipped, ${left} s of the budget left"
    ANY_FAILED=1
    continue
  fi
  if [[ "$name" == wheels && ! -d "$WHEELS" ]]; then
    printf '%s\tnot run\t-\t0\t-\n' "$name" >>"$SUMMARY_TSV"
    echo "== wheels: $WHEELS missing (bash bench/fetch_wheels.sh); pytest, ninja may be absent"
    continue
  fi
  if [[ "$name" == table ]]; then
    model_slug="$("$PY" -c 'import torch; from rcl_kernels import autotune; print(autotune.slug(autotune.device_model(torch.device("cuda"))))' 2>/dev/null || echo unknown)"
    command="${command//TABLE/$model_slug}"
  fi
  t=$((seconds < left ? seconds : left))
  read -ra words <<<"${command//OUT/$OUT}"
  echo "== $name (timeout ${t} s): $(cut -c1-160 <<<"${words[*]}")"
  t0=$(date +%s)
  rc=0
  timeout -k 10 "$t" "${words[@]}" >"$log" 2>&1 || rc=$?
  case "$rc" in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  [[ "$status" == ok ]] || ANY_FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$log" >>"$SUMMARY_TSV"
  echo "   -> $status (rc $rc) in $(($(date +%s) - t0)) s; $(remaining) s of the budget left"
  tail -n 4 "$log" | sed 's/^/   | /'
done

# The table auto reads: shipped with the package for this GPU model.
shopt -s nullglob
for table in "$OUT"/tuning/*.json; do
  cp "$table" rcl_kernels/tuning/ && echo "tuning table: rcl_kernels/tuning/$(basename "$table")"
done
{
  echo
  echo "gpu_check summary ($(($(date +%s) - START)) s of a ${BUDGET} s budget; logs in $OUT)"
  column -t -s $'\t' "$SUMMARY_TSV" 2>/dev/null || cat "$SUMMARY_TSV"
  rows=("$OUT"/*-gc-*.json)
  if ((${#rows[@]})); then
    echo
    timeout 60 "$PY" bench/bench_loss.py --report "${rows[@]}" --plot none
  fi
} 2>&1 | tee "$OUT/summary.txt"
# Plots only where matplotlib is installed, and never part of the status.
if "$PY" -c "import matplotlib" >/dev/null 2>&1 && ((${#rows[@]})); then
  timeout 60 "$PY" bench/bench_loss.py --report "${rows[@]}" --out "$OUT" --tag gc-all >/dev/null 2>&1 ||
    echo "(plotting failed; rows are in $OUT)"
fi
exit "$ANY_FAILED"
