// Plain-C++ interface of the wmma masked-LSE kernels (no torch headers), used by
// wmma_lse_cuda.cpp. The math is in the header comment of csrc/ops.cpp:
//
//   t_ij  = scale·<z_i, k_j> + (col_labels[j] == row_labels[i] ? row_bias[i] : col_bias[j])
//   lse_i = log Σ_{j ≠ i + self_offset} exp(t_ij)            (−inf when no column is left)
//   p_ij  = exp(t_ij − lse_i)                                  (0 for the self column, or lse = −inf)
//   dz    = scale · (g ⊙ P) · K        dk = scale · (g ⊙ P)ᵀ · Z
//
// All pointers are device pointers to contiguous row-major arrays. "Acc" below is float for the
// float32 / bfloat16 / float16 inputs and double for float64 inputs (biases, lse, grad_lse).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace rcl_cuda {

enum class ElemType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Largest feature dimension the launchers accept (the kernels loop over d in chunks, so this is a
// sanity limit, not a shared-memory one).
constexpr int64_t kMaxFeatureDim = 4096;

struct LseProblem {
  const void* z = nullptr;              // [n, d] ElemType
  const void* k = nullptr;              // [m, d] ElemType
  const int64_t* row_labels = nullptr;  // [n]
  const int64_t* col_labels = nullptr;  // [m]
  const void* row_bias = nullptr;       // [n] Acc
  const void* col_bias = nullptr;       // [m] Acc
  int64_t n = 0, m = 0, d = 0;
  int64_t self_offset = 0;
  double scale = 1.0;
  ElemType type = ElemType::kFloat32;
  bool allow_tf32 = false;  // float32 only: TF32 tensor cores instead of fp32 FMA
};

// The problem over row-major z [n, d] and k [m, d] of `type`, labels and biases as above (the
// arguments in the order of the members).
inline LseProblem lse_problem(const void* z, const void* k, const int64_t* row_labels,
                              const int64_t* col_labels, const void* row_bias,
                              const void* col_bias, int64_t n, int64_t m, int64_t d,
                              int64_t self_offset, double scale, ElemType type, bool allow_tf32) {
  return LseProblem{z, k, row_labels, col_labels, row_bias, col_bias, n, m, d, self_offset, scale,
                    type, allow_tf32};
}

// How the work is split. The split counts come from the caller (rcl_kernels/kernels/planner.py, shared
// with the Triton kernels); a plan only clamps them and sizes the workspaces, which the caller
// allocates (bytes, may be 0) before launching.
struct Split {
  int count = 1;                // blocks that share one reduction; partials summed in a fixed order
  int64_t tiles_per_split = 1;  // tiles of the reduction per split (the last may hold fewer)
};

// `requested` (>= 1) splits of a reduction over `tiles` tiles, at most the tiles and max_splits,
// each of ⌈tiles / splits⌉ whole tiles, lowered so that no split is left empty: 11 tiles asked in
// 7 splits run as 6 splits of 2. The one clamping rule of the wmma and the mma.sync plans.
inline Split split_reduction(int64_t tiles, int64_t requested, int64_t max_splits) {
  const int64_t s = std::min({requested, std::max<int64_t>(tiles, 1), max_splits});
  Split split;
  split.tiles_per_split = std::max<int64_t>(1, (tiles + s - 1) / s);
  split.count = int(std::max<int64_t>(
      1, (tiles + split.tiles_per_split - 1) / split.tiles_per_split));
  return split;
}
struct ForwardPlan {
  Split cols;                  // column tiles per row block, merged by a partial-LSE kernel
  size_t workspace_bytes = 0;  // 2 · cols.count · n · sizeof(Acc) when cols.count > 1
};
struct BackwardPlan {
  Split row_pass;                 // dz: column tiles per row block
  Split col_pass;                 // dk: row tiles per column block
  size_t dz_workspace_bytes = 0;  // row_pass.count · n · d · sizeof(Acc) when row_pass.count > 1
  size_t dk_workspace_bytes = 0;  // col_pass.count · m · d · sizeof(Acc) when col_pass.count > 1
};

// Each requested count (>= 1: the binding checks) goes through split_reduction, at most the
// grid's y/z limit (65535).
// The tile sizes of each dtype path: the table in csrc/cuda/README.md.
ForwardPlan plan_forward(const LseProblem& p, int64_t col_splits);
BackwardPlan plan_backward(const LseProblem& p, int64_t row_pass_splits, int64_t col_pass_splits);

// lse: [n] Acc. Returns the first launch error (cudaSuccess otherwise).
cudaError_t launch_forward(const LseProblem& p, const ForwardPlan& plan, void* lse,
                           void* workspace, cudaStream_t stream);

// grad_lse, lse: [n] Acc. grad_absmax: device scalar max_i |grad_lse_i| (Acc), or null; used by
// the bfloat16 / float16 kernels to keep g·p in range before rounding it to the input dtype.
// dz: [n, d], dk: [m, d], both in the accumulation type (float, double for kFloat64). Workspaces per the plan.
cudaError_t launch_backward(const LseProblem& p, const BackwardPlan& plan, const void* grad_lse,
                            const void* grad_absmax, const void* lse, void* dz, void* dk, void* dz_workspace,
                            void* dk_workspace, cudaStream_t stream);

}  // namespace rcl_cuda
