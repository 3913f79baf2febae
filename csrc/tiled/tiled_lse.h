// The tiled algorithm of the masked log-sum-exp op (math and schemas: csrc/ops.cpp), written once
// for every device: for a block of anchor rows, one GEMM writes the scores S = Z_b·Kᵀ into a
// bounded workspace, one device-specific epilogue reads them (bias, self mask, log-sum-exp,
// probabilities), and two GEMMs give dz and dk. No N x M buffer exists: the workspace holds
// `block_rows` rows of S (the Python planner sizes it from a memory budget).
//
// With the forward, the pass can also give the whole loss's gradient (`loss_forward_backward`):
// the epilogue then writes G = diag(w)·scale·(P − Y) with Y_ij = [j ∈ Pos(i)] / |Pos(i)| (the
// softmax minus the positives' uniform target, the gradient of lse_i − mean_{j∈Pos(i)} t_ij with
// respect to the scores) and the positives' score sums, so the GEMMs dz = G·K and dk = Gᵀ·Z carry
// every gradient term and the caller needs no segment sums. The row factor w·scale is folded into
// G, so no pass scales dz or dk afterwards (for 16-bit operands G is divided by max|w|, which
// the result gets back in one multiplication).
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
  // How a block's work is cut for the CPU's threads (tiled_lse.cpp): panels of `panel` anchor
  // rows (scores, epilogue, dz) and of `panel` score columns (dk), pulled by the threads from a
  // shared counter. 0: the block is one task, run in stream order (GPU).
  int64_t panel = 0;
};

// One block of rows as the epilogue sees it (anchors r0 .. r0 + rows − 1).
struct Block {
  int64_t r0 = 0;
  at::Tensor scores;         // [rows, M] acc: S on entry, may be overwritten
  at::Tensor lse;            // [rows] acc: written when compute_lse, otherwise read
  bool compute_lse = true;
  at::Tensor probabilities;  // [rows, M] operand dtype (may alias scores), or undefined: none
  at::Tensor row_factor;     // [N] acc: p_ij is multiplied by row_factor[i] (defined with p)
  at::Tensor positive_sum;   // [rows] acc, or undefined. Defined (with compute_lse and p): write
                             // Σ_{j∈Pos(i)} S_ij, and subtract [j ∈ Pos(i)] / |Pos(i)| from p_ij
                             // before the row factor. Pos(i): the columns with the anchor's label
                             // other than its self column.
};

// The device part: one pass over a block of scores. p_ij = exp(t_ij − lse_i) is 0 for the masked
// self column and for rows whose lse is −inf; values below the accumulation dtype's normal range
// may be flushed to 0 (they keep denormals out of the GEMMs).
using Epilogue = void (*)(const Problem& problem, Block& block);

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

// (lse, positive_sum, dz, dk) in one pass over the scores, for a weighted sum of the per-anchor
// losses L_i = lse_i − mean_{j∈Pos(i)} t_ij with weights w known up front (a mean or a sum):
// positive_sum_i = Σ_{j∈Pos(i)} S_ij (the caller adds the biases), and (dz, dk) the gradient of
// Σ_i w_i·L_i with respect to z and k.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_forward_backward(
    const Problem& problem, Epilogue epilogue, const at::Tensor& weights, int64_t block_rows);

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
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_forward_backward_op(
    const at::Tensor& weights, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, int64_t self_offset, double scale, int64_t block_rows) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Problem p = make_problem(z, k, row_labels, col_labels, row_bias, col_bias, self_offset,
                                 scale, block_rows);
  check_per_anchor("tiled_loss_forward_backward", "weights", weights, z);
  return loss_forward_backward(p, epilogue, weights, block_rows);
}

}  // namespace rcl_kernels::tiled
