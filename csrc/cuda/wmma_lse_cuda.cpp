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

// The wmma launchers accept d up to kMaxFeatureDim (wmma_lse_kernels.cuh); the mma.sync binding
// has no such limit, so this check is this binding's own. It runs right after check_features.
void check_feature_dim(const char* op, const at::Tensor& z) {
  TORCH_CHECK(z.size(1) <= rcl_cuda::kMaxFeatureDim, op, ": feature dim d=", z.size(1),
              " exceeds the supported maximum of ", rcl_cuda::kMaxFeatureDim);
}

at::Tensor wmma_lse_forward(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                            const at::Tensor& col_labels, const at::Tensor& row_bias,
                            const at::Tensor& col_bias, int64_t self_offset, double scale,
                            bool allow_tf32, int64_t col_splits) {
  constexpr const char* op = "wmma_lse_forward";
  check_features(op, z, k);
  check_feature_dim(op, z);
  check_metadata(op, z, k, row_labels, col_labels, row_bias, col_bias);
  check_splits(op, "col_splits", col_splits);

  const c10::cuda::CUDAGuard guard(z.device());
  const Inputs in(z, k, row_labels, col_labels, row_bias, col_bias);
  at::Tensor lse = at::empty({z.size(0)}, z.options().dtype(acc_dtype(z.scalar_type())));
  if (z.size(0) == 0) return lse;
  const auto problem = in.problem(self_offset, scale, allow_tf32);
  const auto plan = rcl_cuda::plan_forward(problem, col_splits);
  const at::Tensor ws = workspace(plan.workspace_bytes, z);
  C10_CUDA_CHECK(rcl_cuda::launch_forward(problem, plan, lse.data_ptr(), ptr_or_null(ws),
                                          c10::cuda::getCurrentCUDAStream()));
  return lse;
}

std::tuple<at::Tensor, at::Tensor> wmma_lse_backward(
    const at::Tensor& grad_lse, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, const at::Tensor& lse, int64_t self_offset, double scale,
    bool allow_tf32, int64_t row_pass_splits, int64_t col_pass_splits) {
  constexpr const char* op = "wmma_lse_backward";
  check_features(op, z, k);
  check_feature_dim(op, z);
  check_metadata(op, z, k, row_labels, col_labels, row_bias, col_bias);
  const auto acc = acc_dtype(z.scalar_type());
  check_vector(op, "lse", lse, z.size(0), acc, z, "N");
  check_grad_lse(op, grad_lse, z);
  check_splits(op, "row_pass_splits", row_pass_splits);
  check_splits(op, "col_pass_splits", col_pass_splits);

  const c10::cuda::CUDAGuard guard(z.device());
  const Inputs in(z, k, row_labels, col_labels, row_bias, col_bias);
  // Autograd may hand an expanded (stride-0) or lower-precision gradient: make it dense, in Acc.
  const at::Tensor g = grad_lse.to(acc).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  // In the accumulation dtype, as the schema says (csrc/ops.cpp).
  at::Tensor dz = at::empty(in.z.sizes(), in.z.options().dtype(acc));
  at::Tensor dk = at::empty(in.k.sizes(), in.k.options().dtype(acc));
  if (z.size(1) == 0) return {dz, dk};
  const auto problem = in.problem(self_offset, scale, allow_tf32);
  const auto plan = rcl_cuda::plan_backward(problem, row_pass_splits, col_pass_splits);
  const at::Tensor dz_ws = workspace(plan.dz_workspace_bytes, z);
  const at::Tensor dk_ws = workspace(plan.dk_workspace_bytes, z);
  // max|g| for the 16-bit kernels (see launch_backward); a 0-dim device tensor, no sync.
  const bool half_ops = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  const at::Tensor g_absmax = half_ops && g.numel() > 0 ? g.abs().amax() : at::Tensor();
  C10_CUDA_CHECK(rcl_cuda::launch_backward(problem, plan, g.data_ptr(), ptr_or_null(g_absmax),
                                           lse_c.data_ptr(), dz.data_ptr(), dk.data_ptr(),
                                           ptr_or_null(dz_ws), ptr_or_null(dk_ws),
                                           c10::cuda::getCurrentCUDAStream()));
  return {dz, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_kernels, CUDA, m) {
  m.impl("wmma_lse_forward", &wmma_lse_forward);
  m.impl("wmma_lse_backward", &wmma_lse_backward);
}
