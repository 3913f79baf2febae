// Argument checks, problem setup and the forward/backward skeleton shared by the torch bindings
// of the CUDA streaming LSE kernels (schemas and math in csrc/ops.cpp). Every check raises a
// TORCH_CHECK error naming the argument and what was expected; a binding runs them all before its
// first CUDA call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/elem_type.h"
#include "cuda/wmma_lse_kernels.cuh"

namespace rcl_cuda_binding {

using rcl_kernels::elem_type;

// dtype of row_bias, col_bias, lse and grad_lse for features of dtype t.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_features(const char* op, const at::Tensor& z, const at::Tensor& k) {
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
}

inline void check_vector(const char* op, const char* name, const at::Tensor& v, int64_t len,
                         at::ScalarType dtype, const at::Tensor& z, const char* len_name) {
  TORCH_CHECK(v.device() == z.device(), op, ": ", name, " must be on z's device ", z.device(),
              ", got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == len, op, ": ", name, " must have shape [", len_name,
              "] = [", len, "], got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              v.scalar_type());
}

// max_feature_dim: the launchers' largest d, or -1 where they take any d.
inline void check_feature_dim(const char* op, const at::Tensor& z, int64_t max_feature_dim) {
  TORCH_CHECK(max_feature_dim < 0 || z.size(1) <= max_feature_dim, op, ": feature dim d=",
              z.size(1), " exceeds the supported maximum of ", max_feature_dim);
}

inline void check_metadata(const char* op, const at::Tensor& z, const at::Tensor& k,
                           const at::Tensor& row_labels, const at::Tensor& col_labels,
                           const at::Tensor& row_bias, const at::Tensor& col_bias) {
  const int64_t n = z.size(0), m = k.size(0);
  const auto acc = acc_dtype(z.scalar_type());
  check_vector(op, "row_labels", row_labels, n, at::kLong, z, "N");
  check_vector(op, "col_labels", col_labels, m, at::kLong, z, "M");
  check_vector(op, "row_bias", row_bias, n, acc, z, "N");
  check_vector(op, "col_bias", col_bias, m, acc, z, "M");
}

inline void check_grad_lse(const char* op, const at::Tensor& grad_lse, const at::Tensor& z) {
  TORCH_CHECK(grad_lse.device() == z.device(), op, ": grad_lse must be on z's device ",
              z.device(), ", got ", grad_lse.device());
  TORCH_CHECK(grad_lse.dim() == 1 && grad_lse.size(0) == z.size(0), op,
              ": grad_lse must have shape [N] = [", z.size(0), "], got ", grad_lse.sizes());
  TORCH_CHECK(at::isFloatingType(grad_lse.scalar_type()), op,
              ": grad_lse must be a floating tensor, got ", grad_lse.scalar_type());
}

inline void check_splits(const char* op, const char* name, int64_t splits) {
  TORCH_CHECK(splits >= 1, op, ": ", name, " must be >= 1 (a split count from "
              "rcl_kernels/kernels/planner.py), got ", splits);
}

// The checks of every forward and backward op, in this order: z and k, d against the launchers'
// limit, then labels and biases. A backward adds check_backward_inputs, then the split counts.
inline void check_inputs(const char* op, const at::Tensor& z, const at::Tensor& k,
                         const at::Tensor& row_labels, const at::Tensor& col_labels,
                         const at::Tensor& row_bias, const at::Tensor& col_bias,
                         int64_t max_feature_dim) {
  check_features(op, z, k);
  check_feature_dim(op, z, max_feature_dim);
  check_metadata(op, z, k, row_labels, col_labels, row_bias, col_bias);
}

inline void check_backward_inputs(const char* op, const at::Tensor& grad_lse,
                                  const at::Tensor& z, const at::Tensor& lse) {
  check_vector(op, "lse", lse, z.size(0), acc_dtype(z.scalar_type()), z, "N");
  check_grad_lse(op, grad_lse, z);
}

// The tensors a problem points into; kept alive (contiguous copies) while the kernels are queued.
struct Inputs {
  at::Tensor z, k, row_labels, col_labels, row_bias, col_bias;

  Inputs(const at::Tensor& z_, const at::Tensor& k_, const at::Tensor& row_labels_,
         const at::Tensor& col_labels_, const at::Tensor& row_bias_, const at::Tensor& col_bias_)
      : z(z_.contiguous()),
        k(k_.contiguous()),
        row_labels(row_labels_.contiguous()),
        col_labels(col_labels_.contiguous()),
        row_bias(row_bias_.contiguous()),
        col_bias(col_bias_.contiguous()) {}

  rcl_cuda::LseProblem problem(int64_t self_offset, double scale, bool allow_tf32) const {
    return rcl_cuda::lse_problem(z.data_ptr(), k.data_ptr(), row_labels.data_ptr<int64_t>(),
                                 col_labels.data_ptr<int64_t>(), row_bias.data_ptr(),
                                 col_bias.data_ptr(), z.size(0), k.size(0), z.size(1),
                                 self_offset, scale, elem_type(z.scalar_type()), allow_tf32);
  }
};

inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

inline void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A forward op once its arguments are checked: on z's device, check_device() (the variant's
// device requirements), the inputs made contiguous, lse [N] in Acc and, when N > 0,
// launch(problem, lse, stream), which plans, allocates its workspace and queues the kernels.
template <class CheckDevice, class Launch>
at::Tensor run_forward(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                       const at::Tensor& col_labels, const at::Tensor& row_bias,
                       const at::Tensor& col_bias, int64_t self_offset, double scale,
                       bool allow_tf32, CheckDevice&& check_device, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(z.device());
  check_device();
  const Inputs in(z, k, row_labels, col_labels, row_bias, col_bias);
  at::Tensor lse = at::empty({z.size(0)}, z.options().dtype(acc_dtype(z.scalar_type())));
  if (z.size(0) == 0) return lse;
  C10_CUDA_CHECK(launch(in.problem(self_offset, scale, allow_tf32), lse.data_ptr(),
                        c10::cuda::getCurrentCUDAStream()));
  return lse;
}

// What a backward launcher reads and writes besides the problem.
struct BackwardBuffers {
  const void* grad_lse;     // [N] Acc, dense
  const void* grad_absmax;  // device scalar max_i |grad_lse_i| for 16-bit inputs, else null
  const void* lse;          // [N] Acc
  void* dz;                 // [N, d] Acc
  void* dk;                 // [M, d] Acc
};

// A backward op once its arguments are checked: as run_forward, with dz and dk in Acc (as the
// schema says, csrc/ops.cpp) and, when d > 0, launch(problem, buffers, stream).
template <class CheckDevice, class Launch>
std::tuple<at::Tensor, at::Tensor> run_backward(
    const at::Tensor& grad_lse, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, const at::Tensor& lse, int64_t self_offset, double scale,
    bool allow_tf32, CheckDevice&& check_device, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(z.device());
  check_device();
  const Inputs in(z, k, row_labels, col_labels, row_bias, col_bias);
  const auto acc = acc_dtype(z.scalar_type());
  // Autograd may hand an expanded (stride-0) or lower-precision gradient: make it dense, in Acc.
  const at::Tensor g = grad_lse.to(acc).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dz = at::empty(in.z.sizes(), in.z.options().dtype(acc));
  at::Tensor dk = at::empty(in.k.sizes(), in.k.options().dtype(acc));
  if (z.size(1) == 0) return {dz, dk};
  // max|g| for the 16-bit kernels (g·p is rounded to the input dtype); a 0-dim device tensor, no
  // sync.
  const bool half_ops = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  const at::Tensor g_absmax = half_ops && g.numel() > 0 ? g.abs().amax() : at::Tensor();
  const BackwardBuffers buffers{g.data_ptr(), ptr_or_null(g_absmax), lse_c.data_ptr(),
                                dz.data_ptr(), dk.data_ptr()};
  C10_CUDA_CHECK(launch(in.problem(self_offset, scale, allow_tf32), buffers,
                        c10::cuda::getCurrentCUDAStream()));
  return {dz, dk};
}

}  // namespace rcl_cuda_binding
