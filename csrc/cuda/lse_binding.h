// Argument checks and problem setup shared by the torch bindings of the CUDA LSE kernels
// (schemas and math in csrc/ops.cpp). Every check raises a TORCH_CHECK error naming the argument
// and what was expected; a binding runs them all before its first CUDA call.
#pragma once

#include <cstddef>
#include <cstdint>

#include <ATen/ATen.h>

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

}  // namespace rcl_cuda_binding
