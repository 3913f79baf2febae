#!/usr/bin/env bash
# compute-sanitizer on tiny odd cases through the public API, forward and backward, fp32 and bf16:
# memcheck on the CUDA and Triton candidates, racecheck on the CUDA ones (bench/gpu_check.sh's last
# step). Usage: bash bench/gpu_sanitize.sh OUT_DIR. Exit status 1 when a check failed, 0 when all
# passed or compute-sanitizer is missing (said in the log).
set -uo pipefail
OUT="${1:?usage: gpu_sanitize.sh OUT_DIR}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
SANITIZER="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
if [[ -z "$SANITIZER" ]]; then
  echo "compute-sanitizer not found: not run"
  exit 0
fi
CASE='
import sys, torch, torch.nn.functional as F, rcl_kernels as rk
for dtype in (torch.float32, torch.bfloat16):
    for n, c, d in ((5, 3, 20), (17, 2, 130), (1, 1, 7)):
        f = F.normalize(torch.randn(n, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
        p = F.normalize(torch.randn(c, d, device="cuda"), dim=-1).to(dtype).requires_grad_()
        y = torch.randint(0, c, (n,), device="cuda")
        rk.bcl_loss(f, y, p, backend=sys.argv[1]).backward()
torch.cuda.synchronize()
print(sys.argv[1], "ok")
'
# Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 RCL_KERNELS_TRITON_AUTOTUNE=0
failed=0
for check in memcheck:cuda:wmma memcheck:cuda:mma memcheck:cuda:tiled memcheck:triton:default \
  memcheck:triton:one-pass racecheck:cuda:wmma racecheck:cuda:mma; do
  tool="${check%%:*}" candidate="${check#*:}"
  extra=()
  [[ "$tool" == memcheck ]] && extra=(--leak-check no)
  if timeout -k 5 40 "$SANITIZER" --tool "$tool" --error-exitcode 1 "${extra[@]}" "$PY" -c "$CASE" "$candidate" \
    >"$OUT/sanitize-$tool-${candidate//:/-}.log" 2>&1; then
    echo "$tool $candidate: ok"
  else
    echo "$tool $candidate: FAILED (rc $?, $OUT/sanitize-$tool-${candidate//:/-}.log)"
    failed=1
  fi
done
exit "$failed"
