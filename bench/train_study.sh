#!/usr/bin/env bash
# The Fashion-MNIST-LT (rho = 100) study on one GPU within 8 minutes of device time: LA-CE, BCL
# and BCL+RCL (rcl-train's defaults: ResNet-8, alpha 2, beta 0.6, temperature 0.1, SGD lr 0.1,
# batch 256 here), 3 seeds each, the longest schedule that fits (target 100 epochs), then
# study.md / study.json (balanced accuracy and many/medium/few, mean ± std) and curves.png in
# $OUT (or $STUDY_OUT, default runs/train_study). First, the loss-backend timing: reference vs the
# fused backend per training step at batch 256 and at the largest batch, with peak memory
# (throughput.md / throughput.json).
#
#   bash bench/train_study.sh prepare   # here, with the network: data + kornia wheels into .study/
#   bash bench/train_study.sh           # on the GPU machine (carry .study), or anywhere
#
# Why the schedule is measured, not fixed: nothing of rcl-train has run on a GPU yet, and its
# step at this size (a ResNet-8 on 768 images of 28x28, three views of 256) is bound by kernel
# launches and kornia's host syncs, not by the GPU's arithmetic, so its time cannot be derived.
# With STUDY_EPOCHS=auto (default on CUDA) the study runs every run for two epochs at the
# planned concurrency, takes the second epoch (and its evaluation) as the cost of an epoch, and
# picks the most epochs, at most STUDY_TARGET_EPOCHS (100), that fit in what is left of the
# budget (rcl_train/study.py: plan_epochs); study.md states the measurements and the choice.
# The 9 runs go at once (STUDY_PARALLEL=9): launch-bound processes share the GPU well, and 16
# CPU cores feed them. STUDY_EPOCHS=N fixes the schedule instead.
#
# Without CUDA (or STUDY_MODE=cpu) the same steps run a reduced schedule on the CPU, for
# testing only: STUDY_CPU_EPOCHS (2) epochs on STUDY_CPU_LIMIT_TRAIN (1500) training and
# STUDY_CPU_LIMIT_TEST (1000) test images, one run after another, no timing table.
#
# Knobs (environment): OUT / STUDY_OUT, FMNIST_DIR (default: .study/fashion-mnist, else
# /usr/share/datasets/fashion-mnist), PYTHON (default .venv/bin/python, else python3), STUDY_MODE (auto|gpu|cpu), STUDY_BUDGET_S (480,
# the whole script on a GPU), STUDY_EPOCHS, STUDY_TARGET_EPOCHS, STUDY_PARALLEL, STUDY_SEEDS
# ("0 1 2"), STUDY_BATCH (256; 128 on the CPU), STUDY_LOSS_BACKEND (triton on a GPU: the fused loss; auto would
# pick the reference at batch 256), STUDY_THROUGHPUT (1 on a GPU: the timing table first, its
# share of the budget STUDY_THROUGHPUT_S, 90, its backends STUDY_THROUGHPUT_BACKENDS,
# reference,triton,cuda), STUDY_WORK (runs' folder, default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-}"
[[ -z "$PY" && -x .venv/bin/python ]] && PY=.venv/bin/python  # the project's venv (make install)
PY="${PY:-$(command -v python3)}"  # the GPU machine: its python3 holds PyTorch
STUDY="$ROOT/.study"

if [[ "${1:-}" == prepare ]]; then
  # Fetch what the GPU machine cannot: the Debian Fashion-MNIST files and kornia's wheels for
  # its Python 3.12; .study/ stays out of git and travels with `carry`.
  mkdir -p "$STUDY/wheels" "$STUDY/fashion-mnist"
  grep -qx '/.study/' .git/info/exclude 2>/dev/null || echo '/.study/' >>.git/info/exclude
  tmp="$(mktemp -d)"
  (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null && dpkg -x dataset-fashion-mnist_*.deb x)
  cp "$tmp"/x/usr/share/datasets/fashion-mnist/*.gz "$STUDY/fashion-mnist/"
  rm -rf "$tmp"
  ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$STUDY/wheels" "kornia==$(ver kornia)" "kornia_rs==$(ver kornia_rs)"
  du -sh "$STUDY"
  echo "prepared; on the GPU machine: bash bench/train_study.sh (carry .study)"
  exit 0
fi

OUT_DIR="${OUT:-${STUDY_OUT:-$ROOT/runs/train_study}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
START=$(date +%s)
BUDGET="${STUDY_BUDGET_S:-480}"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT_DIR/log.txt") 2>&1

if [[ -z "${FMNIST_DIR:-}" ]]; then
  FMNIST_DIR=/usr/share/datasets/fashion-mnist
  [[ -d "$STUDY/fashion-mnist" ]] && FMNIST_DIR="$STUDY/fashion-mnist"
fi

# kornia from the carried wheels when the machine lacks it
if compgen -G "$STUDY/wheels/*.whl" >/dev/null && ! "$PY" -c "import kornia" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/study-site "$STUDY"/wheels/*.whl
  export PYTHONPATH="/tmp/study-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"

MODE="${STUDY_MODE:-auto}"
if [[ "$MODE" == auto ]]; then
  MODE=cpu
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && MODE=gpu
fi

if [[ "$MODE" == gpu ]] && ! "$PY" -c "import rcl_kernels._C" 2>/dev/null; then
  # build the extension for this GPU's architecture only (about 30 s on 16 cores)
  arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  echo "== building rcl_kernels._C for sm $arch"
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e .
fi

SEEDS="${STUDY_SEEDS:-0 1 2}"
COMMON=(--dataset fmnist-lt --imbalance 100 --data-root "$FMNIST_DIR" --threads 1)
if [[ "$MODE" == gpu ]]; then
  COMMON+=(--device cuda --batch-size "${STUDY_BATCH:-256}")
  if [[ "${STUDY_THROUGHPUT:-1}" == 1 ]]; then
    echo "== loss-backend timing (at most ${STUDY_THROUGHPUT_S:-90} s)"
    timeout -k 5 "${STUDY_THROUGHPUT_S:-90}" "$PY" -m rcl_train.throughput --out "$OUT_DIR" \
      --backends "${STUDY_THROUGHPUT_BACKENDS:-reference,triton,cuda}" --batch-sizes 256,max \
      -- "${COMMON[@]}" --loss rcl || echo "   (timing table incomplete: exit $?)"
  fi
  # the fused loss in training is what the study is for (auto picks the reference at batch 256)
  COMMON+=(--loss-backend "${STUDY_LOSS_BACKEND:-triton}")
  left=$((BUDGET - ($(date +%s) - START) - 10))
  STUDY_ARGS=(--epochs "${STUDY_EPOCHS:-auto}" --budget-s "$left"
    --target-epochs "${STUDY_TARGET_EPOCHS:-100}" --parallel "${STUDY_PARALLEL:-9}")
else
  COMMON+=(--device cpu --batch-size "${STUDY_BATCH:-128}"
    --limit-train "${STUDY_CPU_LIMIT_TRAIN:-1500}" --limit-test "${STUDY_CPU_LIMIT_TEST:-1000}")
  STUDY_ARGS=(--epochs "${STUDY_EPOCHS:-${STUDY_CPU_EPOCHS:-2}}" --parallel "${STUDY_PARALLEL:-1}")
fi

echo "== study ($MODE): ${STUDY_ARGS[*]}"
# shellcheck disable=SC2086  # SEEDS is a list of words
"$PY" -m rcl_train.study --out "$OUT_DIR" --work-dir "${STUDY_WORK:-/tmp}/rcl-train-study" \
  --seeds $SEEDS "${STUDY_ARGS[@]}" -- "${COMMON[@]}"
echo "== done in $(($(date +%s) - START)) s: $OUT_DIR"
