// Plain-C++ interface (no torch) of the mma.sync masked-LSE kernels, used by mma_lse_cuda.cpp.
// Same op as wmma_lse_kernels.cuh (the math is in csrc/ops.cpp); the problem description is
// shared with it (LseProblem). Differences: one kernel per pass (the backward computes S and P
// once per tile for both dz and dk), no upper limit on d, and dz / dk / the split-column merge
// are accumulated in a fixed order through semaphores instead of partial buffers.
//
// Dtype paths: bfloat16 / float16 on mma.m16n8k16, float32 with allow_tf32 on mma.m16n8k8.tf32,
// float32 without it as 3xTF32 on the same instruction (each operand as a sum of two TF32 parts,
// three products), float64 on mma.m8n8k4.f64. Tile sizes per path: mma_tiles() and
// csrc/cuda/README.md. Needs sm_80 or newer.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "wmma_lse_kernels.cuh"

namespace rcl_cuda {

// Tile shapes of one dtype path (for the caller's split planner).
struct MmaTiles {
  int fwd_rows;  // forward: anchor rows per block (the parallel dimension)
  int fwd_cols;  // forward: columns per tile (the reduction a split cuts)
  int bwd_cols;  // backward: columns per block (the parallel dimension)
  int bwd_rows;  // backward: anchor rows per tile (the reduction a split cuts)
  int d_chunk;   // feature columns per chunk; the backward has ⌈d / d_chunk⌉ blocks per column tile
  int threads;   // threads per block
};
MmaTiles mma_tiles(ElemType type, bool allow_tf32);

struct MmaForwardPlan {
  int64_t row_tiles = 0;        // blocks per split: ⌈n / fwd_rows⌉
  int splits = 1;               // column splits, merged in split order
  int64_t tiles_per_split = 1;  // column tiles per split (the last may hold fewer)
  size_t workspace_bytes = 0;   // 0 when splits == 1; the launcher zeroes what it needs
};
struct MmaBackwardPlan {
  int64_t col_tiles = 0;        // ⌈m / bwd_cols⌉
  int64_t d_chunks = 0;         // ⌈d / d_chunk⌉
  int64_t row_tiles = 0;        // ⌈n / bwd_rows⌉
  int splits = 1;               // row splits: blocks per (column tile, d chunk)
  int64_t tiles_per_split = 1;  // row tiles per split (the last may hold fewer)
  size_t workspace_bytes = 0;   // semaphores and the work counter (int32), zeroed by the launcher
};

// A requested count (>= 1: the binding checks) goes through split_reduction
// (wmma_lse_kernels.cuh), at most 65535 and so that the grid stays below 2^31 blocks.
MmaForwardPlan plan_mma_forward(const LseProblem& p, int64_t col_splits);
MmaBackwardPlan plan_mma_backward(const LseProblem& p, int64_t row_splits);

// Dynamic shared memory per block of each pass (the binding checks it against the device).
size_t mma_forward_smem_bytes(const LseProblem& p);
size_t mma_backward_smem_bytes(const LseProblem& p);

// lse: [n] Acc. workspace: plan.workspace_bytes (16-byte aligned). Returns the first error.
cudaError_t launch_mma_forward(const LseProblem& p, const MmaForwardPlan& plan, void* lse,
                               void* workspace, cudaStream_t stream);

// grad_lse, lse: [n] Acc; grad_absmax: device scalar max_i |grad_lse_i| (Acc) or null (used by
// the 16-bit paths to keep g·p in range before rounding it to the input dtype). dz [n, d] and
// dk [m, d] in Acc, written in full (no zeroing needed). workspace: plan.workspace_bytes.
cudaError_t launch_mma_backward(const LseProblem& p, const MmaBackwardPlan& plan,
                                const void* grad_lse, const void* grad_absmax, const void* lse,
                                void* dz, void* dk, void* workspace, cudaStream_t stream);

}  // namespace rcl_cuda
