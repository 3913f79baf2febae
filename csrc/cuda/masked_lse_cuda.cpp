// CUDA kernels of rcl_kernels::cuda_lse_forward / cuda_lse_backward (schemas and math in
// csrc/ops.cpp). This file validates, allocates outputs and workspaces on the current stream's
// caching allocator, and calls the plain launchers of masked_lse_kernels.cu with the split counts
// it is given (rcl_kernels/planner.py plans them).
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/elem_type.h"
#include "cuda/masked_lse_kernels.cuh"

namespace {

// dtype of row_bias, col_bias, lse and grad_lse for features of dtype t.
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_features(const char* op, const at::Tensor& z, const at::Tensor& k) {
  TORCH_CHECK(z.is_cuda(), op, ": z must be a CUDA tensor, got device ", z.device());
  TORCH_CHECK(k.device() == z.device(), op, ": k must be on z's device ", z.device(), ", got ",
              k.device());
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D [N, d], got shape ", z.sizes());
  TORCH_CHECK(k.dim() == 2, op, ": k must be 2-D [M, d], got shape ", k.sizes());
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": z must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(k.scalar_type() == t, op, ": k must have z's dtype ", t, ", got ", k.scalar_type());
  TORCH_CHECK(k.size(1) == z.size(1), op, ": k must have z's feature dim d=", z.size(1),
              ", got shape ", k.sizes());
  TORCH_CHECK(z.size(1) <= rcl_cuda::kMaxFeatureDim, op, ": feature dim d=", z.size(1),
              " exceeds the supported maximum of ", rcl_cuda::kMaxFeatureDim);
}

void check_vector(const char* op, const char* name, const at::Tensor& v, int64_t len,
                  at::ScalarType dtype, const at::Tensor& z, const char* len_name) {
  TORCH_CHECK(v.device() == z.device(), op, ": ", name, " must be on z's device ", z.device(),
              ", got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len, op, ": ", name, " must have shape [", len_name,
              "] = [", len, "], got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              v.scalar_type());
}

void check_metadata(const char* op, const at::Tensor& z, const at::Tensor& k,
                    const at::Tensor& row_labels, const at::Tensor& col_labels,
                    const at::Tensor& row_bias, const at::Tensor& col_bias) {
  const int64_t n = z.size(0), m = k.size(0);
  const auto acc = acc_dtype(z.scalar_type());
  check_vector(op, "row_labels", row_labels, n, at::kLong, z, "N");
  check_vector(op, "col_labels", col_labels, m, at::kLong, z, "M");
  check_vector(op, "row_bias", row_bias, n, acc, z, "N");
  check_vector(op, "col_bias", col_bias, m, acc, z, "M");
}

// The tensors a problem points into; kept alive (contiguous copies) while the kernels are queued.
struct Inputs {
  at::Tensor z, k, row_labels, col_labels, row_bias, col_bias;
};

rcl_cuda::LseProblem make_problem(const Inputs& in, int64_t self_offset, double scale,
                                  bool allow_tf32) {
  rcl_cuda::LseProblem p;
  p.z = in.z.data_ptr();
  p.k = in.k.data_ptr();
  p.row_labels = in.row_labels.data_ptr<int64_t>();
  p.col_labels = in.col_labels.data_ptr<int64_t>();
  p.row_bias = in.row_bias.data_ptr();
  p.col_bias = in.col_bias.data_ptr();
  p.n = in.z.size(0);
  p.m = in.k.size(0);
  p.d = in.z.size(1);
  p.self_offset = self_offset;
  p.scale = scale;
  p.type = rcl_kernels::elem_type(in.z.scalar_type());
  p.allow_tf32 = allow_tf32;
  return p;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Every check runs before the first CUDA call (device guard, copies, allocations, launches), and
// every error leaves through TORCH_CHECK / C10_CUDA_CHECK here in the binding: the plain
// launchers only return a cudaError_t.
void check_splits(const char* op, const char* name, int64_t splits) {
  TORCH_CHECK(splits >= 1, op, ": ", name, " must be >= 1 (a split count from "
              "rcl_kernels/planner.py), got ", splits);
}

at::Tensor cuda_lse_forward(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                            const at::Tensor& col_labels, const at::Tensor& row_bias,
                            const at::Tensor& col_bias, int64_t self_offset, double scale,
                            bool allow_tf32, int64_t col_splits) {
  constexpr const char* op = "cuda_lse_forward";
  check_features(op, z, k);
  check_metadata(op, z, k, row_labels, col_labels, row_bias, col_bias);
  check_splits(op, "col_splits", col_splits);

  const c10::cuda::CUDAGuard guard(z.device());
  const Inputs in{z.contiguous(),         k.contiguous(),        row_labels.contiguous(),
                  col_labels.contiguous(), row_bias.contiguous(), col_bias.contiguous()};
  at::Tensor lse = at::empty({z.size(0)}, z.options().dtype(acc_dtype(z.scalar_type())));
  if (z.size(0) == 0) return lse;
  const auto problem = make_problem(in, self_offset, scale, allow_tf32);
  const auto plan = rcl_cuda::plan_forward(problem, col_splits);
  const at::Tensor ws = workspace(plan.workspace_bytes, z);
  C10_CUDA_CHECK(rcl_cuda::launch_forward(problem, plan, lse.data_ptr(), ptr_or_null(ws),
                                          c10::cuda::getCurrentCUDAStream()));
  return lse;
}

std::tuple<at::Tensor, at::Tensor> cuda_lse_backward(
    const at::Tensor& grad_lse, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, const at::Tensor& lse, int64_t self_offset, double scale,
    bool allow_tf32, int64_t row_pass_splits, int64_t col_pass_splits) {
  constexpr const char* op = "cuda_lse_backward";
  check_features(op, z, k);
  check_metadata(op, z, k, row_labels, col_labels, row_bias, col_bias);
  const auto acc = acc_dtype(z.scalar_type());
  check_vector(op, "lse", lse, z.size(0), acc, z, "N");
  TORCH_CHECK(grad_lse.device() == z.device(), op, ": grad_lse must be on z's device ",
              z.device(), ", got ", grad_lse.device());
  TORCH_CHECK(grad_lse.dim() == 1 && grad_lse.size(0) == z.size(0), op,
              ": grad_lse must have shape [N] = [", z.size(0), "], got ", grad_lse.sizes());
  TORCH_CHECK(at::isFloatingType(grad_lse.scalar_type()), op,
              ": grad_lse must be a floating tensor, got ", grad_lse.scalar_type());
  check_splits(op, "row_pass_splits", row_pass_splits);
  check_splits(op, "col_pass_splits", col_pass_splits);

  const c10::cuda::CUDAGuard guard(z.device());
  const Inputs in{z.contiguous(),         k.contiguous(),        row_labels.contiguous(),
                  col_labels.contiguous(), row_bias.contiguous(), col_bias.contiguous()};
  // Autograd may hand an expanded (stride-0) or lower-precision gradient: make it dense, in Acc.
  const at::Tensor g = grad_lse.to(acc).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  // In the accumulation dtype, as the schema says (csrc/ops.cpp).
  at::Tensor dz = at::empty(in.z.sizes(), in.z.options().dtype(acc));
  at::Tensor dk = at::empty(in.k.sizes(), in.k.options().dtype(acc));
  if (z.size(1) == 0) return {dz, dk};
  const auto problem = make_problem(in, self_offset, scale, allow_tf32);
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
  m.impl("cuda_lse_forward", &cuda_lse_forward);
  m.impl("cuda_lse_backward", &cuda_lse_backward);
}
