// Torch binding of the mma.sync kernels: rcl_kernels::mma_lse_forward / _backward (schemas
// and math in csrc/ops.cpp, kernels in mma_lse_kernels.cu). Validates every argument (TORCH_CHECK
// naming it) before the first CUDA call, then the device (compute capability, shared memory),
// allocates outputs and workspaces on the current stream's caching allocator and calls the plain
// launchers with the caller's split counts (rcl_kernels/kernels/planner.py plans them).
//
//   mma_lse_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
//                   allow_tf32, col_splits) -> lse
//   mma_lse_backward(grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse,
//                    self_offset, scale, allow_tf32, splits) -> (dz, dk)
// col_splits: blocks that share one row tile's columns (merged in split order); splits: blocks
// that share one column tile's rows (dk added in split order). float32 without allow_tf32 runs
// 3xTF32 products.
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/lse_binding.h"
#include "cuda/mma_lse_kernels.cuh"

namespace {

using namespace rcl_cuda_binding;

constexpr int64_t kAnyD = -1;  // the mma.sync launchers take any d

// After the argument checks, the device: mma.sync on bf16 / TF32 and cp.async need sm_80, and a
// block's shared memory (per pass and dtype path) must fit.
void check_device(const char* op, const at::Tensor& z, bool allow_tf32,
                  size_t (*smem_bytes)(const rcl_cuda::LseProblem&)) {
  rcl_cuda::LseProblem kind;
  kind.type = elem_type(z.scalar_type());
  kind.allow_tf32 = allow_tf32;
  const size_t needed = smem_bytes(kind);
  const int dev = z.device().index();
  int major = 0, minor = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(major >= 8, op, ": needs a GPU of compute capability 8.0 or newer, ", z.device(),
              " is ", major, ".", minor);
  TORCH_CHECK(size_t(smem_optin) >= needed, op, ": needs ", needed,
              " bytes of shared memory per block for ", z.scalar_type(), ", ", z.device(),
              " allows ", smem_optin);
}

at::Tensor mma_lse_forward(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                           const at::Tensor& col_labels, const at::Tensor& row_bias,
                           const at::Tensor& col_bias, int64_t self_offset, double scale,
                           bool allow_tf32, int64_t col_splits) {
  constexpr const char* op = "mma_lse_forward";
  check_inputs(op, z, k, row_labels, col_labels, row_bias, col_bias, kAnyD);
  check_splits(op, "col_splits", col_splits);
  return run_forward(
      z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale, allow_tf32,
      [&] { check_device(op, z, allow_tf32, &rcl_cuda::mma_forward_smem_bytes); },
      [&](const rcl_cuda::LseProblem& problem, void* lse, cudaStream_t stream) {
        const auto plan = rcl_cuda::plan_mma_forward(problem, col_splits);
        const at::Tensor ws = workspace(plan.workspace_bytes, z);
        return rcl_cuda::launch_mma_forward(problem, plan, lse, ptr_or_null(ws), stream);
      });
}

std::tuple<at::Tensor, at::Tensor> mma_lse_backward(
    const at::Tensor& grad_lse, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, const at::Tensor& lse, int64_t self_offset, double scale,
    bool allow_tf32, int64_t splits) {
  constexpr const char* op = "mma_lse_backward";
  check_inputs(op, z, k, row_labels, col_labels, row_bias, col_bias, kAnyD);
  check_backward_inputs(op, grad_lse, z, lse);
  check_splits(op, "splits", splits);
  // The kernels write every element of dz and dk.
  return run_backward(
      grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
      allow_tf32, [&] { check_device(op, z, allow_tf32, &rcl_cuda::mma_backward_smem_bytes); },
      [&](const rcl_cuda::LseProblem& problem, const BackwardBuffers& b, cudaStream_t stream) {
        const auto plan = rcl_cuda::plan_mma_backward(problem, splits);
        const at::Tensor ws = workspace(plan.workspace_bytes, z);
        return rcl_cuda::launch_mma_backward(problem, plan, b.grad_lse, b.grad_absmax, b.lse,
                                             b.dz, b.dk, ptr_or_null(ws), stream);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_kernels, CUDA, m) {
  m.impl("mma_lse_forward", &mma_lse_forward);
  m.impl("mma_lse_backward", &mma_lse_backward);
}
