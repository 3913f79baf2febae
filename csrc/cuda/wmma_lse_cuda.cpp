// CUDA kernels of rcl_kernels::wmma_lse_forward / wmma_lse_backward (schemas and math in
// csrc/ops.cpp). This file validates, allocates outputs and workspaces on the current stream's
// caching allocator, and calls the plain launchers of wmma_lse_kernels.cu with the split counts
// it is given (rcl_kernels/kernels/planner.py plans them).
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/lse_binding.h"
#include "cuda/wmma_lse_kernels.cuh"

namespace {

using namespace rcl_cuda_binding;

// The wmma launchers accept d up to kMaxFeatureDim (wmma_lse_kernels.cuh). There is no device check
// of their own: a device the build has no code for fails at the launch, with CUDA's error.
constexpr int64_t kMaxD = rcl_cuda::kMaxFeatureDim;
constexpr auto any_device = [] {};

at::Tensor wmma_lse_forward(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                            const at::Tensor& col_labels, const at::Tensor& row_bias,
                            const at::Tensor& col_bias, int64_t self_offset, double scale,
                            bool allow_tf32, int64_t col_splits) {
  constexpr const char* op = "wmma_lse_forward";
  check_inputs(op, z, k, row_labels, col_labels, row_bias, col_bias, kMaxD);
  check_splits(op, "col_splits", col_splits);
  return run_forward(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                     allow_tf32, any_device,
                     [&](const rcl_cuda::LseProblem& problem, void* lse, cudaStream_t stream) {
                       const auto plan = rcl_cuda::plan_forward(problem, col_splits);
                       const at::Tensor ws = workspace(plan.workspace_bytes, z);
                       return rcl_cuda::launch_forward(problem, plan, lse, ptr_or_null(ws), stream);
                     });
}

std::tuple<at::Tensor, at::Tensor> wmma_lse_backward(
    const at::Tensor& grad_lse, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, const at::Tensor& lse, int64_t self_offset, double scale,
    bool allow_tf32, int64_t row_pass_splits, int64_t col_pass_splits) {
  constexpr const char* op = "wmma_lse_backward";
  check_inputs(op, z, k, row_labels, col_labels, row_bias, col_bias, kMaxD);
  check_backward_inputs(op, grad_lse, z, lse);
  check_splits(op, "row_pass_splits", row_pass_splits);
  check_splits(op, "col_pass_splits", col_pass_splits);
  return run_backward(
      grad_lse, z, k, row_labels, col_labels, row_bias, col_bias, lse, self_offset, scale,
      allow_tf32, any_device,
      [&](const rcl_cuda::LseProblem& problem, const BackwardBuffers& b, cudaStream_t stream) {
        const auto plan = rcl_cuda::plan_backward(problem, row_pass_splits, col_pass_splits);
        const at::Tensor dz_ws = workspace(plan.dz_workspace_bytes, z);
        const at::Tensor dk_ws = workspace(plan.dk_workspace_bytes, z);
        return rcl_cuda::launch_backward(problem, plan, b.grad_lse, b.grad_absmax, b.lse, b.dz,
                                         b.dk, ptr_or_null(dz_ws), ptr_or_null(dk_ws), stream);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_kernels, CUDA, m) {
  m.impl("wmma_lse_forward", &wmma_lse_forward);
  m.impl("wmma_lse_backward", &wmma_lse_backward);
}
