// CUDA kernels of the masked, biased log-sum-exp op (see wmma_lse_kernels.cuh and csrc/ops.cpp).
// No torch headers: `nvcc -c` compiles this file alone (make check-cuda).
//
// One tile scheme for every dtype, parameterised by a "policy" that supplies the two block-level
// matrix products (S = Z_tile · K_tileᵀ, O += P · V) and the tile sizes:
//   WmmaPolicy<__nv_bfloat16 | __half | float(TF32)>: tensor cores through nvcuda::wmma
//       (m16n16k16 for 16-bit inputs, m16n16k8 TF32), fp32 accumulators.
//   FmaPolicy<float | double>: CUDA-core FMA register micro-tiles (full-fp32 and fp64 paths).
// S lands in shared memory as fp32 (fp64 for double), where plain threads apply scale, the label
// bias, the self/out-of-range mask, the online LSE (forward) or P = g·exp(t − lse) (backward).
//
// Forward: grid (row tiles, column splits); each block keeps a running (max, sum) per row over its
// column tiles; with several splits, partial (max, sum) pairs go to a workspace and a merge kernel
// combines them in a fixed order.
// Backward (recomputation from z, k, lse): the row pass (grid: row tiles × d chunks × column
// splits) accumulates dz = s·(g⊙P)·K, the column pass (grid: column tiles × d chunks × row splits)
// accumulates dk = s·(g⊙P)ᵀ·Z. Split partials are summed in a fixed order: deterministic.
#include "wmma_lse_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

// RCL_HOST_EMULATION: a test harness compiles this file as host C++ with threads standing in for
// a block (only the CUDA-core policies; see csrc/cuda/README.md). Normal builds use CUDA proper.
#include "launch.cuh"
#ifndef RCL_HOST_EMULATION
#include <mma.h>
#define RCL_HAVE_WMMA 1
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace rcl_cuda {
namespace {

#ifdef RCL_HAVE_WMMA
using namespace nvcuda;
#endif

constexpr int kThreads = 256;  // 8 warps per block in every kernel of this file

// ----------------------------------------------------------------------------------------------
// Scalar helpers (explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ etc.)

__device__ __forceinline__ void put(float& dst, float x) { dst = x; }
__device__ __forceinline__ void put(double& dst, double x) { dst = x; }
__device__ __forceinline__ void put(__half& dst, float x) { dst = __float2half_rn(x); }
__device__ __forceinline__ void put(__nv_bfloat16& dst, float x) { dst = __float2bfloat16_rn(x); }

template <typename T>
__device__ __forceinline__ T zero_value();
template <>
__device__ __forceinline__ float zero_value<float>() { return 0.0f; }
template <>
__device__ __forceinline__ double zero_value<double>() { return 0.0; }
template <>
__device__ __forceinline__ __half zero_value<__half>() { return __float2half_rn(0.0f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_value<__nv_bfloat16>() {
  return __float2bfloat16_rn(0.0f);
}

template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <>
__device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }

template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return CUDART_NAN_F; }
template <>
__device__ __forceinline__ double quiet_nan<double>() { return CUDART_NAN; }

// exp of an already shifted (≤ 0 up to rounding) argument. exp2 keeps full range under fast math.
__device__ __forceinline__ float acc_exp(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
// max that ignores NaN (NaN is tracked separately with a flag).
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ----------------------------------------------------------------------------------------------
// Policies

#ifdef RCL_HAVE_WMMA
template <typename T>
struct WmmaKind;
template <>
struct WmmaKind<__half> {
  using Frag = __half;
  static constexpr int kK = 16;
  static constexpr bool kTf32 = false;
};
template <>
struct WmmaKind<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr bool kTf32 = false;
};
template <>
struct WmmaKind<float> {
  using Frag = wmma::precision::tf32;
  static constexpr int kK = 8;
  static constexpr bool kTf32 = true;
};

// Tensor-core policy. Block tile 64 rows × 64 columns, d consumed in chunks of 32, outputs in
// chunks of 128 feature columns. Shared-memory leading dimensions are padded by 16 bytes (bank
// spread) and every fragment pointer stays 32-byte aligned as wmma requires.
template <typename T>
struct WmmaPolicy {
  using In = T;
  using Acc = float;
  using Op = T;  // element type of the shared-memory operand tiles
  static constexpr int BM = 64, BN = 64, BK = 32, DV = 128;
  static constexpr bool kVecLoad = true;
  static constexpr int kPad = 16 / int(sizeof(T));
  static constexpr int LDT = BK + kPad;  // Z / K chunk tiles [64][LDT]
  static constexpr int LDS = BN + 4;     // S tile (fp32) [BM][LDS]
  static constexpr int LDP = BN + kPad;  // P tile [BM][LDP]
  static constexpr int LDV = DV + kPad;  // V tile [BN][LDV]
  static constexpr int LDO = DV + 4;     // output staging (fp32) [BM][LDO]
  static constexpr size_t kStagingBytes = size_t(BM) * LDO * sizeof(float);
  static constexpr int KF = WmmaKind<T>::kK;
  using FragT = typename WmmaKind<T>::Frag;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, KF, float>;
  // S (4 × 4 fragments): warp w owns fragment row w / 2, fragment columns 2·(w % 2) + {0, 1}.
  struct SAcc {
    AccFrag f[2];
  };
  // O (BM × DV = 4 × 8 fragments): warp w owns fragment row w / 2, columns 4·(w % 2) + {0..3}.
  static constexpr int kOutFrags = DV / 16 / 2;
  struct OAcc {
    AccFrag f[kOutFrags];
  };
  static_assert(BM == 64 && BN == 64 && kThreads == 256, "warp layout assumes 8 warps, 64x64");

  template <typename Frag>
  static __device__ __forceinline__ void fix(Frag& f) {
    if constexpr (WmmaKind<T>::kTf32) {
#pragma unroll
      for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
    }
  }

  static __device__ __forceinline__ void s_init(SAcc& s) {
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(s.f[c], 0.0f);
  }
  static __device__ __forceinline__ void s_chunk(SAcc& s, const Op* zs, const Op* ks) {
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2, fc = (warp % 2) * 2;
#pragma unroll
    for (int kk = 0; kk < BK; kk += KF) {
      wmma::fragment<wmma::matrix_a, 16, 16, KF, FragT, wmma::row_major> a;
      wmma::load_matrix_sync(a, zs + fr * 16 * LDT + kk, LDT);
      fix(a);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        // Kᵀ as a column-major B: element (kk, n) sits at ks[n * LDT + kk].
        wmma::fragment<wmma::matrix_b, 16, 16, KF, FragT, wmma::col_major> b;
        wmma::load_matrix_sync(b, ks + (fc + c) * 16 * LDT + kk, LDT);
        fix(b);
        wmma::mma_sync(s.f[c], a, b, s.f[c]);
      }
    }
  }
  static __device__ __forceinline__ void s_store(const SAcc& s, float* ss) {
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2, fc = (warp % 2) * 2;
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(ss + fr * 16 * LDS + (fc + c) * 16, s.f[c], LDS, wmma::mem_row_major);
  }

  static __device__ __forceinline__ void o_init(OAcc& o) {
#pragma unroll
    for (int c = 0; c < kOutFrags; ++c) wmma::fill_fragment(o.f[c], 0.0f);
  }
  // O += P · V (kTransP = false, rows of O = rows of P) or O += Pᵀ · V (kTransP = true).
  template <bool kTransP>
  static __device__ __forceinline__ void o_mma(OAcc& o, const Op* ps, const Op* vs) {
    using Layout = std::conditional_t<kTransP, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2, fc = (warp % 2) * kOutFrags;
#pragma unroll
    for (int kk = 0; kk < BN; kk += KF) {
      wmma::fragment<wmma::matrix_a, 16, 16, KF, FragT, Layout> a;
      // Pᵀ as a column-major A: element (r, kk) of Pᵀ is P[kk][r] = ps[kk * LDP + r].
      const Op* pa = kTransP ? ps + fr * 16 + kk * LDP : ps + fr * 16 * LDP + kk;
      wmma::load_matrix_sync(a, pa, LDP);
      fix(a);
#pragma unroll
      for (int c = 0; c < kOutFrags; ++c) {
        wmma::fragment<wmma::matrix_b, 16, 16, KF, FragT, wmma::row_major> b;
        wmma::load_matrix_sync(b, vs + kk * LDV + (fc + c) * 16, LDV);
        fix(b);
        wmma::mma_sync(o.f[c], a, b, o.f[c]);
      }
    }
  }
  // Writes scale · row_scale[r] · O (row_scale: shared memory, may be null) for the valid
  // [nrows, ncols] corner to out (row stride ld), staged through the start of shared memory.
  // Caller guarantees every thread is past its last read of the operand tiles.
  static __device__ __forceinline__ void o_store(OAcc& o, float scale, const float* row_scale,
                                                 char* smem, float* out, int64_t nrows,
                                                 int64_t ncols, int64_t ld) {
    float* os = reinterpret_cast<float*>(smem);
    const int warp = threadIdx.x / 32;
    const int fr = warp / 2, fc = (warp % 2) * kOutFrags;
#pragma unroll
    for (int c = 0; c < kOutFrags; ++c)
      wmma::store_matrix_sync(os + fr * 16 * LDO + (fc + c) * 16, o.f[c], LDO, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * DV; idx += kThreads) {
      const int r = idx / DV, c = idx % DV;
      if (r < nrows && c < ncols)
        out[r * ld + c] = os[r * LDO + c] * (row_scale ? scale * row_scale[r] : scale);
    }
  }
};

#endif  // RCL_HAVE_WMMA

// CUDA-core policy: fp32 without TF32, and fp64. 16 × 16 thread grid, each thread a TM × TN
// register micro-tile of S (rows ty·TM + r, columns tx + 16·c) and TM × TO of O.
template <typename T>
struct FmaPolicy {
  using In = T;
  using Acc = T;
  using Op = T;
  static constexpr bool kDouble = sizeof(T) == 8;
  static constexpr int BM = kDouble ? 32 : 64, BN = BM, BK = 32, DV = kDouble ? 64 : 128;
  static constexpr bool kVecLoad = false;
  static constexpr int LDT = BK + 1, LDS = BN + 1, LDP = BN + 1, LDV = DV + 1;
  static constexpr size_t kStagingBytes = 0;
  static constexpr int TM = BM / 16, TN = BN / 16, TO = DV / 16;
  struct SAcc {
    Acc v[TM][TN];
  };
  struct OAcc {
    Acc v[TM][TO];
  };
  static_assert(kThreads == 256, "16 x 16 thread grid");

  static __device__ __forceinline__ void s_init(SAcc& s) {
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) s.v[r][c] = Acc(0);
  }
  static __device__ __forceinline__ void s_chunk(SAcc& s, const Op* zs, const Op* ks) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 8
    for (int k = 0; k < BK; ++k) {
      Acc a[TM], b[TN];
#pragma unroll
      for (int r = 0; r < TM; ++r) a[r] = zs[(ty * TM + r) * LDT + k];
#pragma unroll
      for (int c = 0; c < TN; ++c) b[c] = ks[(tx + 16 * c) * LDT + k];
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TN; ++c) s.v[r][c] = fma(a[r], b[c], s.v[r][c]);
    }
  }
  static __device__ __forceinline__ void s_store(const SAcc& s, Acc* ss) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) ss[(ty * TM + r) * LDS + tx + 16 * c] = s.v[r][c];
  }

  static __device__ __forceinline__ void o_init(OAcc& o) {
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TO; ++c) o.v[r][c] = Acc(0);
  }
  template <bool kTransP>
  static __device__ __forceinline__ void o_mma(OAcc& o, const Op* ps, const Op* vs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
    for (int n = 0; n < BN; ++n) {
      Acc a[TM], b[TO];
#pragma unroll
      for (int r = 0; r < TM; ++r)
        a[r] = kTransP ? ps[n * LDP + ty * TM + r] : ps[(ty * TM + r) * LDP + n];
#pragma unroll
      for (int c = 0; c < TO; ++c) b[c] = vs[n * LDV + tx + 16 * c];
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TO; ++c) o.v[r][c] = fma(a[r], b[c], o.v[r][c]);
    }
  }
  static __device__ __forceinline__ void o_store(OAcc& o, Acc scale, const Acc* row_scale,
                                                 char* /*smem*/, Acc* out, int64_t nrows,
                                                 int64_t ncols, int64_t ld) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int r = 0; r < TM; ++r) {
      const int rr = ty * TM + r;
      const Acc f = row_scale ? scale * row_scale[rr] : scale;
#pragma unroll
      for (int c = 0; c < TO; ++c) {
        const int cc = tx + 16 * c;
        if (rr < nrows && cc < ncols) out[rr * ld + cc] = o.v[r][c] * f;
      }
    }
  }
};

// ----------------------------------------------------------------------------------------------
// Shared-memory layout (byte offsets, each region 128-byte aligned)

constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

template <class P, bool kBackward>
struct Layout {
  using Op = typename P::Op;
  using Acc = typename P::Acc;
  static_assert(P::BM == P::BN, "the column pass reads P transposed in place");
  static constexpr size_t zs = 0;
  static constexpr size_t ks = zs + align128(sizeof(Op) * P::BM * P::LDT);
  static constexpr size_t ss = ks + align128(sizeof(Op) * P::BN * P::LDT);
  static constexpr size_t ps = ss + align128(sizeof(Acc) * P::BM * P::LDS);
  static constexpr size_t vs = ps + (kBackward ? align128(sizeof(Op) * P::BM * P::LDP) : 0);
  static constexpr size_t meta = vs + (kBackward ? align128(sizeof(Op) * P::BN * P::LDV) : 0);
  // metadata: row labels [BM], col labels [BN] (int64); row bias, row lse, row g [BM], col bias
  // [BN] (Acc).
  static constexpr size_t row_lab = meta;
  static constexpr size_t col_lab = row_lab + sizeof(int64_t) * P::BM;
  static constexpr size_t row_bias = col_lab + sizeof(int64_t) * P::BN;
  static constexpr size_t row_lse = row_bias + sizeof(Acc) * P::BM;
  static constexpr size_t row_g = row_lse + sizeof(Acc) * P::BM;
  static constexpr size_t col_bias = row_g + sizeof(Acc) * P::BM;
  static constexpr size_t end = col_bias + sizeof(Acc) * P::BN;
  static constexpr size_t bytes = align128(end);
  // o_store stages the output tile from offset 0 while reading row g from the metadata.
  static_assert(!kBackward || P::kStagingBytes <= meta, "staging would overwrite metadata");
};

template <class Acc>
struct KParams {
  const void* z;
  const void* k;
  const int64_t* row_labels;
  const int64_t* col_labels;
  const Acc* row_bias;
  const Acc* col_bias;
  int64_t n, m, d, self_offset;
  Acc scale;
  int vec_ok;           // 16-byte vector loads of z and k are legal
  int tiles_per_split;  // column tiles (forward, row pass) or row tiles (column pass) per split
};

// Copies rows [row0, row0 + ROWS) × columns [col0, col0 + COLS) of a row-major [nrows, ld] array
// into dst (leading dimension LD), zero-filling everything outside [nrows, ld).
template <class P, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(typename P::Op* dst, const typename P::In* src,
                                          int64_t row0, int64_t nrows, int64_t col0, int64_t ld,
                                          int vec_ok) {
  using T = typename P::In;
  if constexpr (P::kVecLoad) {
    constexpr int VEC = 16 / int(sizeof(T));
    static_assert(COLS % VEC == 0 && (LD * sizeof(T)) % 16 == 0, "vector tile layout");
    if (vec_ok) {
      constexpr int VPR = COLS / VEC;
      for (int idx = threadIdx.x; idx < ROWS * VPR; idx += kThreads) {
        const int r = idx / VPR, c = (idx % VPR) * VEC;
        const int64_t gr = row0 + r, gc = col0 + c;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        // ld % VEC == 0 and gc % VEC == 0, so gc < ld means the whole vector is in range.
        if (gr < nrows && gc < ld) v = *reinterpret_cast<const uint4*>(src + gr * ld + gc);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = v;
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += kThreads) {
    const int r = idx / COLS, c = idx % COLS;
    const int64_t gr = row0 + r, gc = col0 + c;
    T v = zero_value<T>();
    if (gr < nrows && gc < ld) v = src[gr * ld + gc];
    dst[r * LD + c] = v;
  }
}

// S = Z[row0 : row0+BM] · K[col0 : col0+BN]ᵀ over all of d, stored to shared memory.
template <class P, bool kBackward>
__device__ __forceinline__ void compute_s(const KParams<typename P::Acc>& kp, char* smem,
                                          int64_t row0, int64_t col0) {
  using L = Layout<P, kBackward>;
  using Op = typename P::Op;
  using In = typename P::In;
  Op* zs = reinterpret_cast<Op*>(smem + L::zs);
  Op* ks = reinterpret_cast<Op*>(smem + L::ks);
  typename P::SAcc s;
  P::s_init(s);
  for (int64_t d0 = 0; d0 < kp.d; d0 += P::BK) {
    __syncthreads();  // previous chunk's fragments are loaded before the tiles are overwritten
    load_tile<P, P::BM, P::BK, P::LDT>(zs, static_cast<const In*>(kp.z), row0, kp.n, d0, kp.d,
                                       kp.vec_ok);
    load_tile<P, P::BN, P::BK, P::LDT>(ks, static_cast<const In*>(kp.k), col0, kp.m, d0, kp.d,
                                       kp.vec_ok);
    __syncthreads();
    P::s_chunk(s, zs, ks);
  }
  P::s_store(s, reinterpret_cast<typename P::Acc*>(smem + L::ss));
}

template <class P, bool kBackward>
__device__ __forceinline__ void load_row_meta(const KParams<typename P::Acc>& kp, char* smem,
                                              int64_t row0, const typename P::Acc* g,
                                              const typename P::Acc* lse,
                                              typename P::Acc g_mul = typename P::Acc(1)) {
  using L = Layout<P, kBackward>;
  using Acc = typename P::Acc;
  int64_t* lab = reinterpret_cast<int64_t*>(smem + L::row_lab);
  Acc* bias = reinterpret_cast<Acc*>(smem + L::row_bias);
  Acc* lse_s = reinterpret_cast<Acc*>(smem + L::row_lse);
  Acc* g_s = reinterpret_cast<Acc*>(smem + L::row_g);
  for (int r = threadIdx.x; r < P::BM; r += kThreads) {
    const int64_t gi = row0 + r;
    const bool ok = gi < kp.n;
    lab[r] = ok ? kp.row_labels[gi] : int64_t(-1);
    bias[r] = ok ? kp.row_bias[gi] : Acc(0);
    if (kBackward) {
      lse_s[r] = ok ? lse[gi] : neg_inf<Acc>();
      g_s[r] = ok ? g[gi] * g_mul : Acc(0);
    }
  }
}

template <class P, bool kBackward>
__device__ __forceinline__ void load_col_meta(const KParams<typename P::Acc>& kp, char* smem,
                                              int64_t col0) {
  using L = Layout<P, kBackward>;
  using Acc = typename P::Acc;
  int64_t* lab = reinterpret_cast<int64_t*>(smem + L::col_lab);
  Acc* bias = reinterpret_cast<Acc*>(smem + L::col_bias);
  for (int c = threadIdx.x; c < P::BN; c += kThreads) {
    const int64_t gj = col0 + c;
    const bool ok = gj < kp.m;
    lab[c] = ok ? kp.col_labels[gj] : int64_t(-2);
    bias[c] = ok ? kp.col_bias[gj] : Acc(0);
  }
}

// ----------------------------------------------------------------------------------------------
// Forward

template <class P>
__global__ void __launch_bounds__(kThreads)
    lse_forward_kernel(KParams<typename P::Acc> kp, typename P::Acc* lse,
                       typename P::Acc* ws_max, typename P::Acc* ws_sum) {
  using Acc = typename P::Acc;
  using L = Layout<P, false>;
  constexpr int TPR = kThreads / P::BM;  // threads per row
  constexpr int CPT = P::BN / TPR;       // columns per thread per tile
  static_assert(TPR >= 1 && TPR <= 32 && (32 % TPR) == 0, "row groups must sit inside a warp");
  RCL_DYNAMIC_SMEM(smem);

  const int64_t row0 = int64_t(blockIdx.x) * P::BM;
  const int split = blockIdx.y;
  const int64_t col_tiles = (kp.m + P::BN - 1) / P::BN;
  const int64_t t_begin = int64_t(split) * kp.tiles_per_split;
  const int64_t t_end = min64(col_tiles, t_begin + kp.tiles_per_split);

  load_row_meta<P, false>(kp, smem, row0, nullptr, nullptr);
  const int er = threadIdx.x / TPR, es = threadIdx.x % TPR;
  const int64_t gi = row0 + er;
  const int64_t self_col = gi + kp.self_offset;
  const Acc* ss = reinterpret_cast<const Acc*>(smem + L::ss);
  const int64_t* row_lab = reinterpret_cast<const int64_t*>(smem + L::row_lab);
  const int64_t* col_lab = reinterpret_cast<const int64_t*>(smem + L::col_lab);
  const Acc* row_bias = reinterpret_cast<const Acc*>(smem + L::row_bias);
  const Acc* col_bias = reinterpret_cast<const Acc*>(smem + L::col_bias);

  Acc run_max = neg_inf<Acc>(), run_sum = Acc(0);
  bool saw_nan = false;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * P::BN;
    load_col_meta<P, false>(kp, smem, col0);
    compute_s<P, false>(kp, smem, row0, col0);
    __syncthreads();
    const int64_t my_lab = row_lab[er];
    const Acc my_bias = row_bias[er];
    Acc tv[CPT];
    Acc tile_max = neg_inf<Acc>();
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int j = es + TPR * c;
      const int64_t gj = col0 + j;
      const Acc logit = kp.scale * ss[er * P::LDS + j] + (col_lab[j] == my_lab ? my_bias : col_bias[j]);
      const bool valid = gj < kp.m && gj != self_col;
      saw_nan |= valid && isnan(logit);
      tv[c] = valid ? logit : neg_inf<Acc>();
      tile_max = acc_max(tile_max, tv[c]);
    }
    if (tile_max > neg_inf<Acc>()) {
      const Acc new_max = acc_max(run_max, tile_max);
      Acc sum = run_sum * acc_exp(run_max - new_max);
#pragma unroll
      for (int c = 0; c < CPT; ++c) sum += acc_exp(tv[c] - new_max);
      run_max = new_max;
      run_sum = sum;
    }
    __syncthreads();  // S and column metadata are rewritten by the next tile
  }

  // Merge the TPR partial (max, sum) pairs of each row (consecutive lanes of one warp).
#pragma unroll
  for (int off = 1; off < TPR; off <<= 1) {
    const Acc o_max = __shfl_xor_sync(0xffffffffu, run_max, off);
    const Acc o_sum = __shfl_xor_sync(0xffffffffu, run_sum, off);
    const int o_nan = __shfl_xor_sync(0xffffffffu, int(saw_nan), off);
    const Acc new_max = acc_max(run_max, o_max);
    if (new_max > neg_inf<Acc>())
      run_sum = run_sum * acc_exp(run_max - new_max) + o_sum * acc_exp(o_max - new_max);
    run_max = new_max;
    saw_nan |= (o_nan != 0);
  }
  if (es == 0 && gi < kp.n) {
    if (ws_max == nullptr) {
      lse[gi] = saw_nan ? quiet_nan<Acc>()
                        : (run_max == neg_inf<Acc>() ? neg_inf<Acc>() : run_max + acc_log(run_sum));
    } else {
      ws_max[int64_t(split) * kp.n + gi] = saw_nan ? quiet_nan<Acc>() : run_max;
      ws_sum[int64_t(split) * kp.n + gi] = run_sum;
    }
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    lse_merge_kernel(const Acc* ws_max, const Acc* ws_sum, int splits, int64_t n, Acc* lse) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  Acc mx = neg_inf<Acc>();
  bool saw_nan = false;
  for (int s = 0; s < splits; ++s) {
    const Acc v = ws_max[int64_t(s) * n + i];
    saw_nan |= isnan(v);
    mx = acc_max(mx, v);
  }
  Acc out;
  if (saw_nan) {
    out = quiet_nan<Acc>();
  } else if (mx == neg_inf<Acc>()) {
    out = neg_inf<Acc>();
  } else {
    Acc sum = Acc(0);
    for (int s = 0; s < splits; ++s)
      sum += ws_sum[int64_t(s) * n + i] * acc_exp(ws_max[int64_t(s) * n + i] - mx);
    out = mx + acc_log(sum);
  }
  lse[i] = out;
}

// ----------------------------------------------------------------------------------------------
// Backward

// P[r][j] = exp(t_rj − lse_r), times g_r unless kRowPass (the row pass applies g_r to its output
// rows in fp32 instead), for the current (row tile, column tile); 0 where masked.
template <class P, bool kRowPass>
__device__ __forceinline__ void compute_p(const KParams<typename P::Acc>& kp, char* smem,
                                          int64_t row0, int64_t col0) {
  using Acc = typename P::Acc;
  using Op = typename P::Op;
  using L = Layout<P, true>;
  constexpr int TPR = kThreads / P::BM;
  constexpr int CPT = P::BN / TPR;
  const int er = threadIdx.x / TPR, es = threadIdx.x % TPR;
  const int64_t gi = row0 + er;
  const int64_t self_col = gi + kp.self_offset;
  const Acc* ss = reinterpret_cast<const Acc*>(smem + L::ss);
  Op* ps = reinterpret_cast<Op*>(smem + L::ps);
  const int64_t my_lab = reinterpret_cast<const int64_t*>(smem + L::row_lab)[er];
  const Acc my_bias = reinterpret_cast<const Acc*>(smem + L::row_bias)[er];
  const Acc my_lse = reinterpret_cast<const Acc*>(smem + L::row_lse)[er];
  const Acc my_g = reinterpret_cast<const Acc*>(smem + L::row_g)[er];
  const int64_t* col_lab = reinterpret_cast<const int64_t*>(smem + L::col_lab);
  const Acc* col_bias = reinterpret_cast<const Acc*>(smem + L::col_bias);
  const bool row_live = gi < kp.n && !(my_lse == neg_inf<Acc>());
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    const int j = es + TPR * c;
    const int64_t gj = col0 + j;
    Acc p = Acc(0);
    if (row_live && gj < kp.m && gj != self_col) {
      const Acc logit =
          kp.scale * ss[er * P::LDS + j] + (col_lab[j] == my_lab ? my_bias : col_bias[j]);
      p = acc_exp(logit - my_lse);
      if (!kRowPass) p *= my_g;
    }
    put(ps[er * P::LDP + j], p);
  }
}

// One block of a backward pass: an output tile of DV features by BM rows of dz (kRowPass: V = K,
// summed over column tiles) or BN columns of dk (V = Z, summed over row tiles), accumulated over
// the tiles [t_begin, t_end) of its split; out = ws + split · (n or m) · d. Both passes recompute
// S and P of a (row tile, column tile) alike; they differ in the side held fixed, the operand
// read as V, whether P is read transposed and where g goes: the row pass scales its fp32 output
// rows by g, the column pass folds g into P.
// g_absmax (column pass; device scalar, or null): max_i |g_i|. With 16-bit operands g is divided
// by it before g·p is rounded to the input dtype (so that tiny g, e.g. a mean over many anchors,
// does not underflow float16) and multiplied back in fp32 at the end.
template <class P, bool kRowPass>
__device__ __forceinline__ void backward_pass(const KParams<typename P::Acc>& kp,
                                              const typename P::Acc* g,
                                              const typename P::Acc* lse,
                                              const typename P::Acc* g_absmax,
                                              typename P::Acc* out) {
  using Acc = typename P::Acc;
  using Op = typename P::Op;
  using In = typename P::In;
  using L = Layout<P, true>;
  RCL_DYNAMIC_SMEM(smem);
  constexpr int kOwnTile = kRowPass ? P::BM : P::BN;  // the output tile's rows (dz) or columns (dk)
  constexpr int kSumTile = kRowPass ? P::BN : P::BM;  // the tiles summed over
  const int64_t own_count = kRowPass ? kp.n : kp.m;
  const int64_t sum_count = kRowPass ? kp.m : kp.n;
  const int64_t own0 = int64_t(blockIdx.x) * kOwnTile;
  const int64_t dv0 = int64_t(blockIdx.y) * P::DV;
  const int split = blockIdx.z;
  const int64_t sum_tiles = (sum_count + kSumTile - 1) / kSumTile;
  const int64_t t_begin = int64_t(split) * kp.tiles_per_split;
  const int64_t t_end = min64(sum_tiles, t_begin + kp.tiles_per_split);
  Op* vs = reinterpret_cast<Op*>(smem + L::vs);
  const Op* ps = reinterpret_cast<const Op*>(smem + L::ps);

  Acc g_norm = Acc(1);
  if constexpr (kRowPass) {
    load_row_meta<P, true>(kp, smem, own0, g, lse);
  } else {
    if (sizeof(Op) == 2 && g_absmax != nullptr) {
      const Acc gm = *g_absmax;
      if (gm > Acc(0) && !isinf(gm)) g_norm = gm;  // NaN / 0 / inf: leave g as it is
    }
    load_col_meta<P, true>(kp, smem, own0);
  }
  typename P::OAcc o;
  P::o_init(o);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t sum0 = t * kSumTile;
    const int64_t row0 = kRowPass ? own0 : sum0;
    const int64_t col0 = kRowPass ? sum0 : own0;
    if constexpr (kRowPass) {
      load_col_meta<P, true>(kp, smem, col0);
    } else {
      load_row_meta<P, true>(kp, smem, row0, g, lse, Acc(1) / g_norm);
    }
    compute_s<P, true>(kp, smem, row0, col0);
    // V = K[col0 : col0+BN, dv0 : dv0+DV] (row pass) or Z[row0 : row0+BM, dv0 : dv0+DV]
    load_tile<P, kSumTile, P::DV, P::LDV>(vs, static_cast<const In*>(kRowPass ? kp.k : kp.z),
                                          sum0, sum_count, dv0, kp.d, kp.vec_ok);
    __syncthreads();
    compute_p<P, kRowPass>(kp, smem, row0, col0);
    __syncthreads();
    P::template o_mma<!kRowPass>(o, ps, vs);
    __syncthreads();
  }
  __syncthreads();
  Acc* dst = out + int64_t(split) * own_count * kp.d + own0 * kp.d + dv0;
  if constexpr (kRowPass) {
    P::o_store(o, kp.scale, reinterpret_cast<const Acc*>(smem + L::row_g), smem, dst,
               min64(kOwnTile, own_count - own0), min64(P::DV, kp.d - dv0), kp.d);
  } else {
    P::o_store(o, kp.scale * g_norm, static_cast<const Acc*>(nullptr), smem, dst,
               min64(kOwnTile, own_count - own0), min64(P::DV, kp.d - dv0), kp.d);
  }
}

// dz partial: grid (row tiles, d chunks, column splits); out = ws + split · n · d.
template <class P>
__global__ void __launch_bounds__(kThreads)
    lse_backward_rows_kernel(KParams<typename P::Acc> kp, const typename P::Acc* g,
                             const typename P::Acc* lse, typename P::Acc* out) {
  backward_pass<P, true>(kp, g, lse, nullptr, out);
}

// dk partial: grid (column tiles, d chunks, row splits); out = ws + split · m · d.
template <class P>
__global__ void __launch_bounds__(kThreads)
    lse_backward_cols_kernel(KParams<typename P::Acc> kp, const typename P::Acc* g,
                             const typename P::Acc* lse, const typename P::Acc* g_absmax,
                             typename P::Acc* out) {
  backward_pass<P, false>(kp, g, lse, g_absmax, out);
}

// out[i] = Σ_s ws[s · count + i], summed in split order (deterministic).
template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const Acc* ws, int splits, int64_t count, Acc* out) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < count; i += stride) {
    Acc s = ws[i];
    for (int sp = 1; sp < splits; ++sp) s += ws[int64_t(sp) * count + i];
    out[i] = s;
  }
}

// ----------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class P>
struct Tag {
  using type = P;
};

// Calls f(Tag<Policy>{}) for the policy that serves p's dtype and TF32 setting.
template <class F>
auto dispatch(const LseProblem& p, F&& f) {
  switch (p.type) {
#ifdef RCL_HAVE_WMMA
    case ElemType::kBFloat16:
      return f(Tag<WmmaPolicy<__nv_bfloat16>>{});
    case ElemType::kFloat16:
      return f(Tag<WmmaPolicy<__half>>{});
#endif
    case ElemType::kFloat64:
      return f(Tag<FmaPolicy<double>>{});
    case ElemType::kFloat32:
    default:
#ifdef RCL_HAVE_WMMA
      if (p.allow_tf32) return f(Tag<WmmaPolicy<float>>{});
#endif
      return f(Tag<FmaPolicy<float>>{});
  }
}

template <class P>
KParams<typename P::Acc> make_params(const LseProblem& p, const Split& split) {
  using Acc = typename P::Acc;
  KParams<Acc> kp;
  kp.z = p.z;
  kp.k = p.k;
  kp.row_labels = p.row_labels;
  kp.col_labels = p.col_labels;
  kp.row_bias = static_cast<const Acc*>(p.row_bias);
  kp.col_bias = static_cast<const Acc*>(p.col_bias);
  kp.n = p.n;
  kp.m = p.m;
  kp.d = p.d;
  kp.self_offset = p.self_offset;
  kp.scale = static_cast<Acc>(p.scale);
  constexpr int vec = 16 / int(sizeof(typename P::In));
  kp.vec_ok = (p.d % vec == 0) && (reinterpret_cast<uintptr_t>(p.z) % 16 == 0) &&
              (reinterpret_cast<uintptr_t>(p.k) % 16 == 0);
  // ≤ the tiles of one dimension: fits an int for any n, m below 2^36.
  kp.tiles_per_split = int(split.tiles_per_split);
  return kp;
}

// Splits are the grid's y (forward) or z (backward) index.
constexpr int64_t kMaxGridYZ = 65535;

template <typename K>
cudaError_t set_smem(K kernel, size_t bytes) {
#ifdef RCL_HOST_EMULATION
  (void)kernel;
  (void)bytes;
  return cudaSuccess;
#else
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
#endif
}

template <class P>
cudaError_t forward_impl(const LseProblem& p, const ForwardPlan& plan, void* lse_out,
                         void* workspace, cudaStream_t stream) {
  using Acc = typename P::Acc;
  if (p.n == 0) return cudaSuccess;
  const int64_t row_tiles = ceil_div(p.n, P::BM);
  const int splits = plan.cols.count;
  auto kp = make_params<P>(p, plan.cols);
  Acc* lse = static_cast<Acc*>(lse_out);
  Acc* ws_max = nullptr;
  Acc* ws_sum = nullptr;
  if (splits > 1) {
    ws_max = static_cast<Acc*>(workspace);
    ws_sum = ws_max + int64_t(splits) * p.n;
  }
  constexpr size_t smem = Layout<P, false>::bytes;
  RCL_RETURN_IF_ERROR(set_smem(lse_forward_kernel<P>, smem));
  const dim3 grid{unsigned(row_tiles), unsigned(splits), 1u};
  RCL_LAUNCH(lse_forward_kernel<P>, grid, kThreads, smem, stream, kp, lse, ws_max, ws_sum);
  RCL_RETURN_IF_ERROR(cudaGetLastError());
  if (splits > 1) {
    RCL_LAUNCH(lse_merge_kernel<Acc>, dim3(unsigned(ceil_div(p.n, kThreads))), kThreads, 0,
               stream, ws_max, ws_sum, splits, p.n, lse);
    RCL_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

// dz and dk are returned in Acc (the caller adds further Acc gradients before rounding), so a
// single split writes its result in place and several are summed from the workspace into out.
template <typename Acc>
cudaError_t sum_splits(const Acc* ws, int splits, int64_t count, Acc* out, cudaStream_t stream) {
  if (splits == 1 || count == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(count, kThreads), 8192);
  auto* kernel = &sum_splits_kernel<Acc>;
  RCL_LAUNCH(kernel, dim3(unsigned(blocks)), kThreads, 0, stream, ws, splits, count, out);
  return cudaGetLastError();
}

template <class P>
cudaError_t backward_impl(const LseProblem& p, const BackwardPlan& plan, const void* grad_lse,
                          const void* grad_absmax, const void* lse_in, void* dz, void* dk, void* dz_ws, void* dk_ws,
                          cudaStream_t stream) {
  using Acc = typename P::Acc;
  if (p.d == 0) return cudaSuccess;
  const Acc* g = static_cast<const Acc*>(grad_lse);
  const Acc* lse = static_cast<const Acc*>(lse_in);
  const int64_t row_tiles = ceil_div(p.n, P::BM);
  const int64_t col_tiles = ceil_div(p.m, P::BN);
  const int64_t d_chunks = ceil_div(p.d, P::DV);
  constexpr size_t smem = Layout<P, true>::bytes;

  if (p.n > 0) {  // dz (with m == 0 the kernel writes zeros)
    const int splits = plan.row_pass.count;
    auto kp = make_params<P>(p, plan.row_pass);
    Acc* out = splits == 1 ? static_cast<Acc*>(dz) : static_cast<Acc*>(dz_ws);
    RCL_RETURN_IF_ERROR(set_smem(lse_backward_rows_kernel<P>, smem));
    const dim3 grid{unsigned(row_tiles), unsigned(d_chunks), unsigned(splits)};
    RCL_LAUNCH(lse_backward_rows_kernel<P>, grid, kThreads, smem, stream, kp, g, lse, out);
    RCL_RETURN_IF_ERROR(cudaGetLastError());
    RCL_RETURN_IF_ERROR(sum_splits<Acc>(out, splits, p.n * p.d, static_cast<Acc*>(dz), stream));
  }
  if (p.m > 0) {  // dk (with n == 0 the kernel writes zeros)
    const int splits = plan.col_pass.count;
    auto kp = make_params<P>(p, plan.col_pass);
    Acc* out = splits == 1 ? static_cast<Acc*>(dk) : static_cast<Acc*>(dk_ws);
    RCL_RETURN_IF_ERROR(set_smem(lse_backward_cols_kernel<P>, smem));
    const dim3 grid{unsigned(col_tiles), unsigned(d_chunks), unsigned(splits)};
    RCL_LAUNCH(lse_backward_cols_kernel<P>, grid, kThreads, smem, stream, kp, g, lse,
               static_cast<const Acc*>(grad_absmax), out);
    RCL_RETURN_IF_ERROR(cudaGetLastError());
    RCL_RETURN_IF_ERROR(sum_splits<Acc>(out, splits, p.m * p.d, static_cast<Acc*>(dk), stream));
  }
  return cudaSuccess;
}

}  // namespace

ForwardPlan plan_forward(const LseProblem& p, int64_t col_splits) {
  return dispatch(p, [&](auto tag) {
    using P = typename decltype(tag)::type;
    ForwardPlan plan;
    plan.cols = split_reduction(ceil_div(p.m, P::BN), col_splits, kMaxGridYZ);
    if (plan.cols.count > 1)
      plan.workspace_bytes = 2 * size_t(plan.cols.count) * size_t(p.n) * sizeof(typename P::Acc);
    return plan;
  });
}

BackwardPlan plan_backward(const LseProblem& p, int64_t row_pass_splits, int64_t col_pass_splits) {
  return dispatch(p, [&](auto tag) {
    using P = typename decltype(tag)::type;
    using Acc = typename P::Acc;
    BackwardPlan plan;
    plan.row_pass = split_reduction(ceil_div(p.m, P::BN), row_pass_splits, kMaxGridYZ);
    plan.col_pass = split_reduction(ceil_div(p.n, P::BM), col_pass_splits, kMaxGridYZ);
    if (plan.row_pass.count > 1)
      plan.dz_workspace_bytes = size_t(plan.row_pass.count) * size_t(p.n * p.d) * sizeof(Acc);
    if (plan.col_pass.count > 1)
      plan.dk_workspace_bytes = size_t(plan.col_pass.count) * size_t(p.m * p.d) * sizeof(Acc);
    return plan;
  });
}

cudaError_t launch_forward(const LseProblem& p, const ForwardPlan& plan, void* lse,
                           void* workspace, cudaStream_t stream) {
  return dispatch(p, [&](auto tag) {
    using P = typename decltype(tag)::type;
    return forward_impl<P>(p, plan, lse, workspace, stream);
  });
}

cudaError_t launch_backward(const LseProblem& p, const BackwardPlan& plan, const void* grad_lse,
                            const void* grad_absmax, const void* lse, void* dz, void* dk, void* dz_workspace,
                            void* dk_workspace, cudaStream_t stream) {
  return dispatch(p, [&](auto tag) {
    using P = typename decltype(tag)::type;
    return backward_impl<P>(p, plan, grad_lse, grad_absmax, lse, dz, dk, dz_workspace, dk_workspace, stream);
  });
}

}  // namespace rcl_cuda
