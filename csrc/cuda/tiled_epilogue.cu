// The CUDA epilogue of the tiled algorithm (interface and math: tiled_epilogue.cuh). One block per
// row reads the row's scores once for an online (max, sum) per thread, merges the 256 pairs in a
// fixed order (deterministic), and, when asked, reads the row again (from L2) to write the
// probabilities in the GEMM operand dtype. No torch headers: `nvcc -c` compiles it alone, and the
// host emulation (host_emu/) runs it on the CPU.
#include "tiled_epilogue.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "launch.cuh"

namespace rcl_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float neg_inf(float) { return -CUDART_INF_F; }
__device__ __forceinline__ double neg_inf(double) { return -CUDART_INF; }
// exp of an argument ≤ 0 (up to rounding); exp2 keeps full range under fast math.
__device__ __forceinline__ float exp_acc(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ void put(float& dst, float x) { dst = x; }
__device__ __forceinline__ void put(double& dst, double x) { dst = x; }
__device__ __forceinline__ void put(__half& dst, float x) { dst = __float2half_rn(x); }
__device__ __forceinline__ void put(__nv_bfloat16& dst, float x) { dst = __float2bfloat16_rn(x); }

// (max, sum of exp(t − max)) pairs merged; −inf max means an empty pair, whose sum is 0, or NaN
// after a NaN logit: sum·0 keeps that NaN through every merge.
template <typename Acc>
__device__ __forceinline__ void merge(Acc& max, Acc& sum, Acc other_max, Acc other_sum) {
  const Acc m = other_max > max ? other_max : max;
  if (m == neg_inf(Acc())) {
    sum += other_sum;
    return;
  }
  sum = (max == neg_inf(Acc()) ? sum * Acc(0) : sum * exp_acc(max - m)) +
        (other_max == neg_inf(Acc()) ? other_sum * Acc(0) : other_sum * exp_acc(other_max - m));
  max = m;
}

// Σ over the block of one value per thread, in a fixed order (deterministic); every thread gets
// the total. `slots` holds kWarps values of shared memory.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* slots) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = value;
  __syncthreads();
  T total = slots[0];
  for (int w = 1; w < kWarps; ++w) total += slots[w];
  __syncthreads();  // the slots may be reused
  return total;
}

template <typename Acc, typename Op>
__global__ void __launch_bounds__(kThreads) tiled_epilogue_kernel(TiledEpilogue a) {
  RCL_DYNAMIC_SMEM(smem);
  Acc* warp_max = reinterpret_cast<Acc*>(smem);
  Acc* warp_sum = warp_max + kWarps;
  int* warp_count = reinterpret_cast<int*>(warp_sum + kWarps);
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x;
  const int64_t i = a.r0 + r;
  const Acc* s = static_cast<const Acc*>(a.scores) + r * a.m;
  const int64_t label = a.row_labels[i];
  const Acc same_bias = static_cast<const Acc*>(a.row_bias)[i];
  const Acc* col_bias = static_cast<const Acc*>(a.col_bias);
  const Acc scale = static_cast<Acc>(a.scale);
  const int64_t self = i + a.self_offset;
  const bool positives = a.positive_sum != nullptr;
  auto positive = [&](int64_t j) { return j != self && a.col_labels[j] == label; };
  auto logit = [&](int64_t j) -> Acc {
    if (j == self) return neg_inf(Acc());
    return scale * s[j] + (a.col_labels[j] == label ? same_bias : col_bias[j]);
  };
  Acc* lse_out = static_cast<Acc*>(a.lse);
  Acc lse;
  Acc target = Acc(0);  // 1 / |Pos(i)| with positive_sum
  if (a.compute_lse) {
    // Online (max, sum) per thread; a NaN logit skips the max and poisons the sum for good.
    Acc max = neg_inf(Acc()), sum = Acc(0), positive_sum = Acc(0);
    int positive_count = 0;
    for (int64_t j = tid; j < a.m; j += kThreads) {
      const Acc t = logit(j);
      if (t > max) {
        sum = (max == neg_inf(Acc()) ? sum * Acc(0) : sum * exp_acc(max - t)) + Acc(1);
        max = t;
      } else if (t != neg_inf(Acc())) {
        sum += exp_acc(t - max);
      }
      if (positives && positive(j)) {
        positive_sum += s[j];
        ++positive_count;
      }
    }
    if (positives) {
      // Before the max/sum merge, which reuses warp_max[0] to broadcast the lse.
      positive_sum = block_sum(positive_sum, warp_sum);
      positive_count = block_sum(positive_count, warp_count);
      if (tid == 0) static_cast<Acc*>(a.positive_sum)[r] = positive_sum;
      target = positive_count > 0 ? Acc(1) / Acc(positive_count) : Acc(0);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const Acc other_max = __shfl_xor_sync(0xffffffffu, max, offset);
      const Acc other_sum = __shfl_xor_sync(0xffffffffu, sum, offset);
      merge(max, sum, other_max, other_sum);
    }
    if (tid % 32 == 0) {
      warp_max[tid / 32] = max;
      warp_sum[tid / 32] = sum;
    }
    __syncthreads();
    if (tid == 0) {
      Acc row_max = warp_max[0], row_sum = warp_sum[0];
      for (int w = 1; w < kWarps; ++w) merge(row_max, row_sum, warp_max[w], warp_sum[w]);
      // Every logit NaN (a NaN scale): the max stays −inf, the sum is NaN, and so is the lse.
      const Acc value = row_max == neg_inf(Acc()) ? (row_sum == row_sum ? row_max : row_sum)
                                                  : row_max + log_acc(row_sum);
      lse_out[r] = value;
      warp_max[0] = value;  // broadcast
    }
    __syncthreads();
    lse = warp_max[0];
  } else {
    lse = lse_out[r];
  }
  if (a.probabilities == nullptr) return;
  const Acc factor = a.row_factor != nullptr ? static_cast<const Acc*>(a.row_factor)[i] : Acc(1);
  Op* p = static_cast<Op*>(a.probabilities) + r * a.m;
  for (int64_t j = tid; j < a.m; j += kThreads) {
    Acc value = lse == neg_inf(Acc()) ? Acc(0) : exp_acc(logit(j) - lse);
    if (positives && positive(j)) value -= target;
    put(p[j], value * factor);
  }
}

template <typename Acc, typename Op>
cudaError_t launch(const TiledEpilogue& a, cudaStream_t stream) {
  RCL_LAUNCH((tiled_epilogue_kernel<Acc, Op>), dim3(unsigned(a.rows)), kThreads,
             2 * kWarps * sizeof(Acc) + kWarps * sizeof(int), stream, a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tiled_epilogue(const TiledEpilogue& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  switch (a.type) {
    case ElemType::kFloat32:
      return launch<float, float>(a, stream);
    case ElemType::kFloat64:
      return launch<double, double>(a, stream);
    case ElemType::kBFloat16:
      return launch<float, __nv_bfloat16>(a, stream);
    case ElemType::kFloat16:
      return launch<float, __half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rcl_cuda
