// Plain-C++ interface (no torch headers) of the CUDA epilogue of the tiled algorithm
// (csrc/tiled/tiled_lse.h): one pass over a block of scores S = Z_b·Kᵀ. For every row r of the
// block (anchor i = r0 + r):
//   t_j   = scale·S[r, j] + (col_labels[j] == row_labels[i] ? row_bias[i] : col_bias[j]),
//           −inf on the self column j = i + self_offset;
//   lse_r = log Σ_j exp(t_j)                     (written when compute_lse, otherwise read);
//   with positive_sum (and compute_lse): positive_sum_r = Σ_{j∈Pos(i)} S[r, j], Pos(i) the
//           columns of label row_labels[i] other than the self column;
//   p_rj  = (exp(t_j − lse_r) − y_rj)·f_i, written when probabilities is not null: 0 when
//           lse_r = −inf and on the self column, y_rj = [j ∈ Pos(i)] / |Pos(i)| with
//           positive_sum (the loss's gradient), 0 without it, and the row factor
//           f_i = row_factor[i] (1 without it): the gradient's weights, folded in so that the
//           GEMMs need no pass;
//   a NaN logit anywhere in a row (a NaN scale included) makes lse_r NaN.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "wmma_lse_kernels.cuh"  // ElemType

namespace rcl_cuda {

struct TiledEpilogue {
  const void* scores = nullptr;         // [rows, m] Acc (float, double for kFloat64)
  void* lse = nullptr;                  // [rows] Acc
  void* probabilities = nullptr;        // [rows, m] of `type`, or null
  const int64_t* row_labels = nullptr;  // [N]
  const int64_t* col_labels = nullptr;  // [m]
  const void* row_bias = nullptr;       // [N] Acc
  const void* col_bias = nullptr;       // [m] Acc
  const void* row_factor = nullptr;     // [N] Acc, or null
  void* positive_sum = nullptr;         // [rows] Acc, or null
  int64_t rows = 0, m = 0, r0 = 0, self_offset = 0;
  double scale = 1.0;
  bool compute_lse = true;
  ElemType type = ElemType::kFloat32;   // the GEMM operand dtype (that of the probabilities)
};

// One block of 256 threads per row. Returns the launch error (cudaSuccess otherwise).
cudaError_t launch_tiled_epilogue(const TiledEpilogue& args, cudaStream_t stream);

}  // namespace rcl_cuda
