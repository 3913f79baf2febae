#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs offline on a bare GPU machine (torch, triton and
# nvcc there; Python 3.12, x86_64, no network) into bench/wheels/ (git-ignored; the device tool
# carries it with the working tree, 64 MiB at most). Run on a machine with network:
#
#     bash bench/fetch_wheels.sh            # or: make gpu-wheels
#
# pytest and pytest-timeout run the GPU tests, ninja compiles the CUDA sources in parallel,
# hypothesis is imported by the tests. matplotlib is left out (about 40 MiB with numpy, pillow and
# fonttools): gpu_check.sh writes its rows with --plot none and plots only where matplotlib is.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${WHEELS_DIR:-bench/wheels}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
PACKAGES=(pytest pytest-timeout ninja hypothesis)
LIMIT_MIB=60
mkdir -p "$DEST"
"$PY" -m pip download --quiet --dest "$DEST" --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi none --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  "${PACKAGES[@]}"
total=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "wheels: ${total} MiB in $DEST (limit ${LIMIT_MIB} MiB)"
if ((total > LIMIT_MIB)); then
  echo "error: $DEST is ${total} MiB, over the ${LIMIT_MIB} MiB the device tool carries" >&2
  exit 1
fi
