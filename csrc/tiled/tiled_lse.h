// The tiled algorithm of the masked log-sum-exp op (math and schemas: csrc/ops.cpp), written once
// for every device: for a block of anchor rows, one GEMM writes the scores S = Z_b·Kᵀ into a
// bounded workspace, one device-specific epilogue reads them (bias, self mask, log-sum-exp,
// probabilities), and two GEMMs give dz and dk. Nothing is recomputed for the gradient when it is
// asked for together with the forward (`forward_backward`), and no N x M buffer exists: the
// workspace holds `block_rows` rows of S (the Python planner sizes it from a memory budget).
//
// The GEMMs are ATen's (MKL/oneDNN on the CPU, cuBLAS on CUDA); only the epilogue is device code.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace rcl_kernels::tiled {

// One call's arguments as the device prepared them.
struct Problem {
  at::Tensor z, k;                    // [N, d], [M, d]: the GEMM operands ("operand dtype")
  at::Tensor row_labels, col_labels;  // [N], [M] (int32 on the CPU, int64 on CUDA)
  at::Tensor row_bias, col_bias;      // [N], [M] in the accumulation dtype
  int64_t self_offset = 0;
  double scale = 1.0;
  at::ScalarType acc = at::kFloat;    // dtype of scores, lse and gradients
};

// The device part: one pass over a block of scores.
//   scores [rows, M] (acc dtype) holds S for anchors r0 .. r0 + rows − 1 and may be overwritten.
//   compute_lse: write lse [rows] (acc dtype) of the block; otherwise read it from `lse`.
//   probabilities: when defined, write p = exp(t − lse) in the operand dtype ([rows, M]; it may be
//   `scores` itself), 0 for the masked self column and for rows whose lse is −inf.
using Epilogue = void (*)(const Problem& problem, int64_t r0, at::Tensor& scores, at::Tensor& lse,
                          bool compute_lse, at::Tensor& probabilities);

// The argument contract of the tiled ops (csrc/ops.cpp), checked before any device work.
void check_arguments(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                     const at::Tensor& col_labels, const at::Tensor& row_bias,
                     const at::Tensor& col_bias, int64_t block_rows);

// lse [N] of every anchor.
at::Tensor forward(const Problem& problem, Epilogue epilogue, int64_t block_rows);

// (dz [N, d], dk [M, d]) in the accumulation dtype for per-anchor weights w (the gradient of the
// loss with respect to lse): dz = scale·diag(w)·P·K, dk = scale·Pᵀ·diag(w)·Z.
std::tuple<at::Tensor, at::Tensor> backward(const Problem& problem, Epilogue epilogue,
                                            const at::Tensor& lse, const at::Tensor& weights,
                                            int64_t block_rows);

// (lse, dz, dk) in one pass over the scores: the forward when the weights of the gradient are
// known up front (a mean or sum of the per-anchor losses).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward(const Problem& problem,
                                                                 Epilogue epilogue,
                                                                 const at::Tensor& weights,
                                                                 int64_t block_rows);

// The op wrappers every device registers (csrc/ops.cpp schemas), from its way of preparing the
// problem and its epilogue. Below autograd: the ops are registered for device keys.
using MakeProblem = Problem (*)(const at::Tensor& z, const at::Tensor& k,
                                const at::Tensor& row_labels, const at::Tensor& col_labels,
                                const at::Tensor& row_bias, const at::Tensor& col_bias,
                                int64_t self_offset, double scale, int64_t block_rows);

// A per-anchor vector beside z (lse, its gradient, the gradient weights): N entries on z's device.
// The CUDA epilogue reads it through a raw pointer, so a host tensor there would be a bad address.
inline void check_per_anchor(const char* op, const char* name, const at::Tensor& vector,
                             const at::Tensor& z) {
  TORCH_CHECK(vector.numel() == z.size(0), op, ": ", name, " must have N = ", z.size(0),
              " entries, got ", vector.numel());
  TORCH_CHECK(vector.device() == z.device(), op, ": ", name, " must be on z's device ", z.device(),
              ", got ", vector.device());
}

template <MakeProblem make_problem, Epilogue epilogue>
at::Tensor forward_op(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                      const at::Tensor& col_labels, const at::Tensor& row_bias,
                      const at::Tensor& col_bias, int64_t self_offset, double scale,
                      int64_t block_rows) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return forward(make_problem(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale,
                              block_rows),
                 epilogue, block_rows);
}

template <MakeProblem make_problem, Epilogue epilogue>
std::tuple<at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_lse, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, const at::Tensor& lse, int64_t self_offset, double scale,
    int64_t block_rows) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(z, k, row_labels, col_labels, row_bias, col_bias, self_offset,
                                 scale, block_rows);
  check_per_anchor("tiled_lse_backward", "grad_lse", grad_lse, z);
  check_per_anchor("tiled_lse_backward", "lse", lse, z);
  return backward(p, epilogue, lse, grad_lse, block_rows);
}

template <MakeProblem make_problem, Epilogue epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward_op(
    const at::Tensor& weights, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, int64_t self_offset, double scale, int64_t block_rows) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(z, k, row_labels, col_labels, row_bias, col_bias, self_offset,
                                 scale, block_rows);
  check_per_anchor("tiled_lse_forward_backward", "weights", weights, z);
  return forward_backward(p, epilogue, weights, block_rows);
}

}  // namespace rcl_kernels::tiled
