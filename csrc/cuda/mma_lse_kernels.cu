// mma.sync kernels of the masked, biased log-sum-exp op (interface: mma_lse_kernels.cuh; math:
// csrc/ops.cpp; design: csrc/cuda/README.md). No torch headers: `nvcc -c` compiles this file
// alone (make check-cuda), and host_emu/mma_lse_test.cpp compiles it as host C++ with
// host_emu/mma_host_emu.h standing in for the PTX wrappers of mma_ptx.cuh.
//
// Forward (one kernel): a block owns FWD_ROWS anchor rows (16 per warp) and walks the column tiles
// of its split. Z chunks stay resident in shared memory when d fits (⌈d / DK⌉ ≤ kStages),
// otherwise they stream with the K chunks through the same cp.async ring. S = Z·Kᵀ accumulates
// in mma fragments; an online (max, sum) in base 2 (logits pre-scaled by scale·log2 e, exp2)
// runs on the fragments; split partials are merged in split order behind a semaphore.
//
// Backward (one kernel, one pass): a block owns BWD_COLS columns (16 per warp) and one d chunk of
// DK features, and walks the row tiles of its split. Per row tile it computes Sᵀ = K·Zᵀ over all of
// d (its own d chunk last, so that chunk's Z and K are in shared memory afterwards), forms
// Pᵀ = exp2(t − lse) in the accumulator fragments and
//   dk (registers, [16 × DK] per warp) += (g/max|g| ⊙ Pᵀ)·Z_chunk   — Pᵀ stays in registers: the
//       accumulator layout of one mma is the A-operand layout of the next (FlashAttention-2);
//   dz rows (fp32, global)            += (P·K_chunk)·g·scale      — P through shared memory,
// the dz additions of the column tiles in column-tile order (a semaphore per row tile and chunk)
// and dk additions of the row splits in split order: deterministic, no partial buffers.
// Blocks take work items from a counter in the order they start, so a block only ever waits for
// work items taken before its own: no deadlock, whatever order the hardware starts blocks in.
#include "mma_lse_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "launch.cuh"
#ifndef RCL_HOST_EMULATION
#include "mma_ptx.cuh"
#endif

namespace rcl_cuda {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ----------------------------------------------------------------------------------------------
// Dtype paths

enum class Kind { kHalf, kTf32, kTf32x3, kF64 };

// Tile sizes of one path. Every shared-memory operand row is 16 bytes past a multiple of 128, so
// the 8 rows an ldmatrix (or a fragment load) touches fall in distinct banks.
template <typename T, Kind K>
struct Cfg {
  using In = T;
  using Acc = std::conditional_t<K == Kind::kF64, double, float>;
  using Op = std::conditional_t<K == Kind::kHalf, T, Acc>;  // P in shared memory (dz operand)
  static constexpr Kind kind = K;
  static constexpr int kWarps = K == Kind::kF64 ? 4 : 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = 2;                      // cp.async ring depth
  static constexpr int DK = 256 / int(sizeof(T));        // d chunk: 256 bytes of a row
  static constexpr int LDK = DK + 16 / int(sizeof(T));   // 272-byte rows
  static constexpr int FWD_ROWS = 16 * kWarps, FWD_COLS = 64;
  static constexpr int BWD_COLS = 16 * kWarps, BWD_ROWS = K == Kind::kF64 ? 32 : 64;
  static constexpr int LDP = BWD_ROWS + 16 / int(sizeof(Op));
  // The dz product [BWD_ROWS × DK] is shared by the warps as DZ_WM × DZ_WN blocks of
  // [16 × 8·DZ_NT].
  static constexpr int DZ_WM = BWD_ROWS / 16, DZ_WN = kWarps / DZ_WM, DZ_NT = DK / 8 / DZ_WN;
  static_assert(DZ_WM * DZ_WN == kWarps && DZ_NT * 8 * DZ_WN == DK, "dz warp tiling");
  static_assert((LDK * sizeof(T)) % 128 == 16 && (LDP * sizeof(Op)) % 128 == 16,
                "padded rows: conflict-free ldmatrix and fragment loads");
  static_assert(FWD_COLS % 16 == 0 && BWD_ROWS % 16 == 0, "pairs of n-tiles per ldmatrix.x4");
};

using CfgBf16 = Cfg<__nv_bfloat16, Kind::kHalf>;
using CfgF16 = Cfg<__half, Kind::kHalf>;
using CfgTf32 = Cfg<float, Kind::kTf32>;
using CfgTf32x3 = Cfg<float, Kind::kTf32x3>;
using CfgF64 = Cfg<double, Kind::kF64>;

// ----------------------------------------------------------------------------------------------
// Scalars (explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ etc.)

template <typename A>
__device__ __forceinline__ A inf_v() {
  if constexpr (sizeof(A) == 8) return __builtin_huge_val();
  else return __builtin_huge_valf();
}
template <typename A>
__device__ __forceinline__ A nan_v() {
  if constexpr (sizeof(A) == 8) return __builtin_nan("");
  else return __builtin_nanf("");
}
__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }
// max that ignores NaN (NaN is tracked with a flag).
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

template <typename To, typename From>
__device__ __forceinline__ To bit_cast_to(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To y;
  memcpy(&y, &x, sizeof y);
  return y;
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return bit_cast_to<uint32_t>(__floats2bfloat162_rn(lo, hi));
  } else {
    return bit_cast_to<uint32_t>(__floats2half2_rn(lo, hi));
  }
}

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float lo, float hi) {
  if constexpr (sizeof(T) == 2) {
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(lo, hi);
  } else {
    dst[0] = lo;
    dst[1] = hi;
  }
}
__device__ __forceinline__ void store_pair(double* dst, double lo, double hi) {
  dst[0] = lo;
  dst[1] = hi;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Number of 8-wide groups of [0, extent) that start below `limit` (0 … cap).
__device__ __forceinline__ int groups_of_8(int64_t limit, int cap) {
  return int(min64(cap, max64(0, ceil_div64(limit, 8))));
}

// ----------------------------------------------------------------------------------------------
// Fragments. Lane l = 4·g + t (g = groupID, t = threadID_in_group in the PTX ISA's words).

__device__ __forceinline__ int lane_id() { return int(threadIdx.x) & 31; }

// Byte offset of this lane's row address for an ldmatrix.x4 whose matrix q lies (q & 1)·8 rows
// and (q >> 1)·16 bytes from the first, and for one whose matrix q lies (q >> 1)·8 rows and
// (q & 1)·16 bytes from it.
__device__ __forceinline__ int ldsm_rows_first(int ld_bytes) {
  const int l = lane_id();
  return (((l >> 3) & 1) * 8 + (l & 7)) * ld_bytes + (l >> 4) * 16;
}
__device__ __forceinline__ int ldsm_cols_first(int ld_bytes) {
  const int l = lane_id();
  return ((l >> 4) * 8 + (l & 7)) * ld_bytes + ((l >> 3) & 1) * 16;
}

template <class C>
__device__ __forceinline__ void mma_half(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<typename C::In, __nv_bfloat16>) {
    rcl_mma::mma_16816_bf16(d, a, b0, b1);
  } else {
    rcl_mma::mma_16816_f16(d, a, b0, b1);
  }
}

// N fp32 operand values prepared for TF32 products: the TF32 parts, and for 3xTF32 the TF32
// parts of the remainders (x − hi is exact in fp32; rounding it drops bits of order 2^-22·|x|).
template <class C, int N>
struct Tf32Frag {
  uint32_t hi[N];
  uint32_t lo[C::kind == Kind::kTf32x3 ? N : 1];
  __device__ __forceinline__ explicit Tf32Frag(const float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) hi[i] = rcl_mma::to_tf32(x[i]);
    if constexpr (C::kind == Kind::kTf32x3) {
#pragma unroll
      for (int i = 0; i < N; ++i) lo[i] = rcl_mma::to_tf32(x[i] - bit_cast_to<float>(hi[i]));
    }
  }
};
// One TF32 product, or three for 3xTF32 (a_lo·b_hi + a_hi·b_lo + a_hi·b_hi, small terms first;
// products of TF32 parts are exact in fp32).
template <class C>
__device__ __forceinline__ void mma_tf32(float (&d)[4], const Tf32Frag<C, 4>& a,
                                         const Tf32Frag<C, 2>& b) {
  if constexpr (C::kind == Kind::kTf32x3) {
    rcl_mma::mma_1688_tf32(d, a.lo, b.hi[0], b.hi[1]);
    rcl_mma::mma_1688_tf32(d, a.hi, b.lo[0], b.lo[1]);
  }
  rcl_mma::mma_1688_tf32(d, a.hi, b.hi[0], b.hi[1]);
}

// acc[NT][4] += A·Bᵀ over one d chunk (its first k_valid columns; the rest of the chunk is zero):
// A = 16 rows at `a`, B = 8·NT rows at `b`, both shared with row stride LDK. The accumulator
// layout: acc[n][e] is (row g + 8·(e >> 1), column 8n + 2t + (e & 1)). Only the first n_valid
// n-tiles are computed (the caller masks the others).
template <class C, int NT>
__device__ __forceinline__ void s_chunk(typename C::Acc (&acc)[NT][4], const typename C::In* a,
                                        const typename C::In* b, int n_valid, int k_valid) {
  using In = typename C::In;
  constexpr int LDB = C::LDK * int(sizeof(In));
  if constexpr (C::kind == Kind::kF64) {
    // m8n8k4: A (g, t), B (t, g), C (g, 2t + i); rows g and g + 8 as two products.
    const int l = lane_id(), g = l >> 2, t = l & 3;
    for (int k0 = 0; k0 < k_valid; k0 += 4) {
      const double a0 = a[g * C::LDK + k0 + t], a1 = a[(g + 8) * C::LDK + k0 + t];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (n < n_valid) {
          const double bv = b[(8 * n + g) * C::LDK + k0 + t];
          rcl_mma::mma_884_f64(acc[n][0], acc[n][1], a0, bv);
          rcl_mma::mma_884_f64(acc[n][2], acc[n][3], a1, bv);
        }
      }
    }
  } else {
    // 32 bytes of k per step (16 halves: m16n8k16; 8 floats: m16n8k8). ldmatrix of 32-bit data
    // hands lane (g, t) the float at (row g, column t) of an 8 × 4 block: the TF32 layouts.
    const char* pa = reinterpret_cast<const char*>(a) + ldsm_rows_first(LDB);
    const char* pb = reinterpret_cast<const char*>(b) + ldsm_cols_first(LDB);
    constexpr int KE = 32 / int(sizeof(In));
    for (int k0 = 0; k0 < k_valid; k0 += KE) {
      const int kb = k0 * int(sizeof(In));
      uint32_t af[4];
      rcl_mma::ldmatrix_x4(af, pa + kb);
      if constexpr (C::kind == Kind::kHalf) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          if (2 * np < n_valid) {
            uint32_t bf[4];
            rcl_mma::ldmatrix_x4(bf, pb + np * 16 * LDB + kb);
            mma_half<C>(acc[2 * np], af, bf[0], bf[1]);
            mma_half<C>(acc[2 * np + 1], af, bf[2], bf[3]);
          }
        }
      } else {
        const Tf32Frag<C, 4> fa({bit_cast_to<float>(af[0]), bit_cast_to<float>(af[1]),
                                 bit_cast_to<float>(af[2]), bit_cast_to<float>(af[3])});
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          if (2 * np < n_valid) {
            uint32_t bf[4];
            rcl_mma::ldmatrix_x4(bf, pb + np * 16 * LDB + kb);
            mma_tf32<C>(acc[2 * np], fa,
                        Tf32Frag<C, 2>({bit_cast_to<float>(bf[0]), bit_cast_to<float>(bf[1])}));
            mma_tf32<C>(acc[2 * np + 1], fa,
                        Tf32Frag<C, 2>({bit_cast_to<float>(bf[2]), bit_cast_to<float>(bf[3])}));
          }
        }
      }
    }
  }
}

// o[NO][4] += P·V with P in registers: p is an s_chunk accumulator (16 rows × 8·NK columns) and
// serves as the A operand as it is; V = shared [8·NK rows][LDK] (rows = P's columns). k_valid:
// leading n-tiles of p that are not all zero; n_valid: leading n-tiles of o worth computing.
template <class C, int NK, int NO>
__device__ __forceinline__ void pv_regs(typename C::Acc (&o)[NO][4],
                                        const typename C::Acc (&p)[NK][4],
                                        const typename C::In* v, int k_valid, int n_valid) {
  using In = typename C::In;
  constexpr int LDB = C::LDK * int(sizeof(In));
  const int l = lane_id(), g = l >> 2, t = l & 3;
  if constexpr (C::kind == Kind::kHalf) {
    // m16n8k16 A = {(g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)}: the accumulators
    // of n-tiles 2kk and 2kk + 1, packed in pairs. B from row-major V by ldmatrix.trans.
    const char* pv = reinterpret_cast<const char*>(v) + ldsm_rows_first(LDB);
#pragma unroll
    for (int kk = 0; kk < NK / 2; ++kk) {
      if (2 * kk < k_valid) {
        const uint32_t a[4] = {pack2<In>(p[2 * kk][0], p[2 * kk][1]),
                               pack2<In>(p[2 * kk][2], p[2 * kk][3]),
                               pack2<In>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack2<In>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int np = 0; np < NO / 2; ++np) {
          if (2 * np < n_valid) {
            uint32_t b[4];
            rcl_mma::ldmatrix_x4_trans(b, pv + kk * 16 * LDB + np * 32);
            mma_half<C>(o[2 * np], a, b[0], b[1]);
            mma_half<C>(o[2 * np + 1], a, b[2], b[3]);
          }
        }
      }
    }
  } else if constexpr (C::kind == Kind::kF64) {
    // m8n8k4 A (g, t) takes the accumulator at (g, 2t) in one product and (g, 2t + 1) in a
    // second: the k index t stands for V row 2t, then 2t + 1.
#pragma unroll
    for (int j = 0; j < NK; ++j) {
      if (j < k_valid) {
        const double* vr = v + (8 * j + 2 * t) * C::LDK + g;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          if (n < n_valid) {
            const double be = vr[8 * n], bo = vr[C::LDK + 8 * n];
            rcl_mma::mma_884_f64(o[n][0], o[n][1], p[j][0], be);
            rcl_mma::mma_884_f64(o[n][0], o[n][1], p[j][1], bo);
            rcl_mma::mma_884_f64(o[n][2], o[n][3], p[j][2], be);
            rcl_mma::mma_884_f64(o[n][2], o[n][3], p[j][3], bo);
          }
        }
      }
    }
  } else {
    // m16n8k8 TF32 A = {(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)}: k index t stands for
    // column 2t of the accumulator and t + 4 for 2t + 1, so A = {p0, p2, p1, p3}; B takes V rows
    // 2t and 2t + 1 to match.
#pragma unroll
    for (int j = 0; j < NK; ++j) {
      if (j < k_valid) {
        const Tf32Frag<C, 4> a({p[j][0], p[j][2], p[j][1], p[j][3]});
        const float* vr = v + (8 * j + 2 * t) * C::LDK + g;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          if (n < n_valid) mma_tf32<C>(o[n], a, Tf32Frag<C, 2>({vr[8 * n], vr[C::LDK + 8 * n]}));
        }
      }
    }
  }
}

// o[NO][4] += P·V with P read transposed from shared memory: element (row r, column k) of P at
// pt[k·LDP + r] (16 rows), V = shared [k][LDK]; k_valid columns of P.
template <class C, int NO>
__device__ __forceinline__ void pv_smem(typename C::Acc (&o)[NO][4], const typename C::Op* pt,
                                        const typename C::In* v, int k_valid, int n_valid) {
  using In = typename C::In;
  constexpr int LDB = C::LDK * int(sizeof(In));
  constexpr int LDPB = C::LDP * int(sizeof(typename C::Op));
  const int l = lane_id(), g = l >> 2, t = l & 3;
  if constexpr (C::kind == Kind::kHalf) {
    // A from Pᵀ by ldmatrix.trans: matrix q covers rows (q & 1)·8, columns (q >> 1)·8 of A.
    const char* pa = reinterpret_cast<const char*>(pt) + ldsm_cols_first(LDPB);
    const char* pb = reinterpret_cast<const char*>(v) + ldsm_rows_first(LDB);
    for (int k0 = 0; k0 < k_valid; k0 += 16) {
      uint32_t a[4];
      rcl_mma::ldmatrix_x4_trans(a, pa + k0 * LDPB);
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        if (2 * np < n_valid) {
          uint32_t b[4];
          rcl_mma::ldmatrix_x4_trans(b, pb + k0 * LDB + np * 32);
          mma_half<C>(o[2 * np], a, b[0], b[1]);
          mma_half<C>(o[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
  } else if constexpr (C::kind == Kind::kF64) {
    for (int k0 = 0; k0 < k_valid; k0 += 4) {
      const double* pr = pt + (k0 + t) * C::LDP + g;
      const double a0 = pr[0], a1 = pr[8];
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        if (n < n_valid) {
          const double bv = v[(k0 + t) * C::LDK + 8 * n + g];
          rcl_mma::mma_884_f64(o[n][0], o[n][1], a0, bv);
          rcl_mma::mma_884_f64(o[n][2], o[n][3], a1, bv);
        }
      }
    }
  } else {
    // TF32: k index t stands for column 2t, t + 4 for 2t + 1 (as in pv_regs).
    for (int k0 = 0; k0 < k_valid; k0 += 8) {
      const float* pr = pt + (k0 + 2 * t) * C::LDP + g;
      const Tf32Frag<C, 4> a({pr[0], pr[8], pr[C::LDP], pr[C::LDP + 8]});
      const float* vr = v + (k0 + 2 * t) * C::LDK + g;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        if (n < n_valid) mma_tf32<C>(o[n], a, Tf32Frag<C, 2>({vr[8 * n], vr[C::LDK + 8 * n]}));
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Kernel arguments and shared memory

template <typename Acc>
struct Common {
  LseProblem p;   // pointers and sizes as the caller gave them (biases in Acc)
  Acc scale;
  Acc scale2;     // scale·log2(e): logits in base-2 units, exp2 throughout
  int vec_bytes;  // cp.async width for rows of z and k (16, 8, 4), 0: synchronous copies
};

template <typename Acc>
struct FwdArgs {
  Common<Acc> c;
  Acc* lse;
  Acc* ws_max;  // [n] running max (base 2) of the splits merged so far
  Acc* ws_sum;  // [n] running sum
  int* sems;    // [row_tiles] splits merged so far
  int* counter;
  int64_t row_tiles;
  int splits;
  int64_t tiles_per_split;
};

template <typename Acc>
struct BwdArgs {
  Common<Acc> c;
  const Acc* g;
  const Acc* g_absmax;
  const Acc* lse;
  Acc* dz;
  Acc* dk;
  int* dz_sems;  // [row_tiles × d_chunks] column tiles added so far
  int* dk_sems;  // [col_tiles × d_chunks] row splits added so far
  int* counter;
  int64_t col_tiles, d_chunks, row_tiles;
  int splits;
  int64_t tiles_per_split;
};

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Shared memory of a block (byte offsets): kStages slots of its own operand's chunk (OWN_ROWS rows
// of LDK) and of the streamed operand's (STREAM_ROWS rows), kStages slots of the streamed tile's
// metadata, P (P_BYTES, backward only) and the work-item slot.
template <class C, int OWN_ROWS, int STREAM_ROWS, size_t META_BYTES, size_t P_BYTES>
struct Layout {
  using In = typename C::In;
  static constexpr int own_elems = OWN_ROWS * C::LDK;
  static constexpr int stream_elems = STREAM_ROWS * C::LDK;
  static constexpr size_t meta_slot = align_up(META_BYTES, 128);
  static constexpr size_t own = 0;
  static constexpr size_t stream = own + C::kStages * size_t(own_elems) * sizeof(In);
  static constexpr size_t meta = stream + C::kStages * size_t(stream_elems) * sizeof(In);
  static constexpr size_t ps = meta + C::kStages * meta_slot;
  static constexpr size_t work = ps + align_up(P_BYTES, 128);
  static constexpr size_t bytes = align_up(work + 16, 128);
};
// Forward: Z chunks own, K chunks streamed; column metadata = labels [FWD_COLS] (int64), then
// biases [FWD_COLS] (Acc).
template <class C>
using FwdLayout = Layout<C, C::FWD_ROWS, C::FWD_COLS,
                         C::FWD_COLS * (sizeof(int64_t) + sizeof(typename C::Acc)), 0>;
// Backward: K chunks own, Z chunks streamed; row metadata = labels [BWD_ROWS] (int64), then bias,
// lse, g [BWD_ROWS] (Acc); P [BWD_COLS][LDP] (Op).
template <class C>
using BwdLayout = Layout<C, C::BWD_COLS, C::BWD_ROWS,
                         C::BWD_ROWS * (sizeof(int64_t) + 3 * sizeof(typename C::Acc)),
                         size_t(C::BWD_COLS) * C::LDP * sizeof(typename C::Op)>;

// Zero of BYTES bytes at dst (shared memory, aligned to BYTES).
template <int BYTES>
__device__ __forceinline__ void store_zero(void* dst) {
  if constexpr (BYTES == 16) {
    *static_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  } else if constexpr (BYTES == 8) {
    *static_cast<uint2*>(dst) = make_uint2(0u, 0u);
  } else {
    *static_cast<uint32_t*>(dst) = 0u;
  }
}

// dst (shared [ROWS][LDK]) = src[row0 : row0 + ROWS, col0 : col0 + DK] of a row-major [nrows, d]
// array, zero outside it: cp.async of V bytes (V divides d·sizeof(In) and the base is V-aligned,
// so a copy lies wholly inside or outside a row), or plain copies when V = 0. Zeros are plain
// stores, like the plain copies visible after the __syncthreads that precedes their use.
template <class C, int ROWS, int V>
__device__ __forceinline__ void copy_chunk(typename C::In* dst, const typename C::In* src,
                                           int64_t row0, int64_t nrows, int64_t col0, int64_t d) {
  using In = typename C::In;
  if constexpr (V == 0) {
    for (int idx = threadIdx.x; idx < ROWS * C::DK; idx += C::kThreads) {
      const int r = idx / C::DK, col = idx % C::DK;
      const int64_t gr = row0 + r, gc = col0 + col;
      In v{};
      if (gr < nrows && gc < d) v = src[gr * d + gc];
      dst[r * C::LDK + col] = v;
    }
  } else if constexpr (V >= int(sizeof(In))) {
    constexpr int E = V / int(sizeof(In));
    constexpr int UNITS = C::DK / E;
    for (int idx = threadIdx.x; idx < ROWS * UNITS; idx += C::kThreads) {
      const int r = idx / UNITS, u = idx % UNITS;
      const int64_t gr = row0 + r, gc = col0 + int64_t(u) * E;
      In* to = dst + r * C::LDK + u * E;
      if (gr < nrows && gc < d) {
        rcl_mma::cp_async<V>(to, src + gr * d + gc);
      } else {
        store_zero<V>(to);
      }
    }
  }
}

template <class C, int ROWS>
__device__ __forceinline__ void load_chunk(typename C::In* dst, const typename C::In* src,
                                           int64_t row0, int64_t nrows, int64_t col0, int64_t d,
                                           int vec_bytes) {
  switch (vec_bytes) {
    case 16: copy_chunk<C, ROWS, 16>(dst, src, row0, nrows, col0, d); break;
    case 8: copy_chunk<C, ROWS, 8>(dst, src, row0, nrows, col0, d); break;
    case 4: copy_chunk<C, ROWS, 4>(dst, src, row0, nrows, col0, d); break;
    default: copy_chunk<C, ROWS, 0>(dst, src, row0, nrows, col0, d); break;
  }
}

// Element i of a [len] array into shared memory by cp.async, zero past its end.
template <typename T>
__device__ __forceinline__ void copy_meta(T* dst, const T* src, int64_t i, int64_t len) {
  if (i < len) {
    rcl_mma::cp_async<int(sizeof(T))>(dst, src + i);
  } else {
    store_zero<int(sizeof(T))>(dst);
  }
}

template <typename A, int N>
__device__ __forceinline__ void zero(A (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = A(0);
}

// The cp.async ring of a block: stage q's loads are issued kStages - 1 stages before its use;
// issue(q) fills slot q % kStages, use(q) runs once stage q is visible to the whole block.
template <class C, class Issue, class Use>
__device__ __forceinline__ void pipeline(int64_t stages, Issue&& issue, Use&& use) {
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < stages) issue(int64_t(s));
    rcl_mma::cp_async_commit();
  }
  for (int64_t q = 0; q < stages; ++q) {
    rcl_mma::cp_async_wait<C::kStages - 2>();
    __syncthreads();  // stage q visible to all; everyone is done with the slot refilled next
    if (q + C::kStages - 1 < stages) issue(q + C::kStages - 1);
    rcl_mma::cp_async_commit();
    use(q);
  }
  rcl_mma::cp_async_wait<0>();
}

// Index, label and base-2 bias of this lane's two accumulator rows: g and g + 8 of the 16 its warp
// owns from `first` on (label -1, bias 0 past len; such rows are masked).
template <typename Acc>
struct LaneRows {
  int64_t idx[2], lab[2];
  Acc bias2[2];
};
template <typename Acc>
__device__ __forceinline__ LaneRows<Acc> lane_rows(int64_t first, int64_t len,
                                                   const int64_t* labels, const void* bias) {
  LaneRows<Acc> r;
  const int g = lane_id() >> 2;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    r.idx[h] = first + g + 8 * h;
    const bool ok = r.idx[h] < len;
    r.lab[h] = ok ? labels[r.idx[h]] : int64_t(-1);
    r.bias2[h] = ok ? static_cast<const Acc*>(bias)[r.idx[h]] * Acc(kLog2e) : Acc(0);
  }
  return r;
}

// This block's work item, from the counter in the order blocks start (see the file comment).
__device__ __forceinline__ int64_t take_work_item(char* slot, int* counter) {
  if (threadIdx.x == 0) *reinterpret_cast<int*>(slot) = rcl_mma::take_work(counter);
  __syncthreads();
  return *reinterpret_cast<const int*>(slot);
}

// body() by the whole block once *sem == turn, then *sem = turn + 1 (when `ordered`).
template <class F>
__device__ __forceinline__ void in_turn(int* sem, int turn, bool ordered, F&& body) {
  if (ordered) {
    if (threadIdx.x == 0) rcl_mma::sem_wait(sem, turn);
    __syncthreads();
  }
  body();
  if (ordered) {
    __syncthreads();  // every thread's writes precede the release
    if (threadIdx.x == 0) rcl_mma::sem_release(sem, turn + 1);
  }
}

// f(h, n) for h < 2 and n < NT, unrolled: an accumulator fragment's two rows and its NT pairs of
// adjacent columns.
template <int NT, class F>
__device__ __forceinline__ void for_each_fragment_pair(F&& f) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int n = 0; n < NT; ++n) f(h, n);
  }
}

// out[rows[h], col + 8n + e] = v[n][2h + e]·f[h] (+ its current value when `accumulate`), for
// h, e < 2 and n < NT: an accumulator fragment's two rows and NT pairs of adjacent columns, where
// col = the first column of the fragment + 2t. Elements at rows ≥ n_rows or columns ≥ n_cols are
// skipped. Called in a block's turn: every load of the other blocks' sums is issued before the
// first add and store, as pairs (8 or 16 bytes) where the fragment lies inside the matrix, so the
// turn costs one load latency, not one per element.
template <typename Acc, int NT>
__device__ __forceinline__ void add_fragment(Acc* out, int64_t n_cols, const int64_t (&rows)[2],
                                             int64_t n_rows, int64_t col,
                                             const Acc (&v)[NT][4], const Acc (&f)[2],
                                             bool accumulate) {
  const bool inside = rows[0] < n_rows && rows[1] < n_rows && col + 8 * (NT - 1) + 2 <= n_cols &&
                      n_cols % 2 == 0;  // even row length: every pair is 2·sizeof(Acc)-aligned
  Acc cur[2][NT][2];
  if (inside) {
    if (accumulate) {
      for_each_fragment_pair<NT>([&](int h, int n) {
        rcl_mma::ldcg_pair(out + rows[h] * n_cols + col + 8 * n, cur[h][n][0], cur[h][n][1]);
      });
    }
    for_each_fragment_pair<NT>([&](int h, int n) {
      Acc x = v[n][2 * h] * f[h], y = v[n][2 * h + 1] * f[h];
      if (accumulate) x += cur[h][n][0], y += cur[h][n][1];
      rcl_mma::st_pair(out + rows[h] * n_cols + col + 8 * n, x, y);
    });
    return;
  }
  // A fragment on the matrix's edge: element by element, still all loads first.
  for_each_fragment_pair<NT>([&](int h, int n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool ok = rows[h] < n_rows && col + 8 * n + e < n_cols;
      cur[h][n][e] = accumulate && ok ? rcl_mma::ldcg(out + rows[h] * n_cols + col + 8 * n + e)
                                      : Acc(0);
    }
  });
  for_each_fragment_pair<NT>([&](int h, int n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const Acc x = v[n][2 * h + e] * f[h];
      if (rows[h] < n_rows && col + 8 * n + e < n_cols)
        out[rows[h] * n_cols + col + 8 * n + e] = accumulate ? cur[h][n][e] + x : x;
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Forward

template <typename Acc>
__device__ __forceinline__ Acc finish_lse(Acc mx, Acc sum) {
  if (isnan(mx)) return nan_v<Acc>();
  if (mx == -inf_v<Acc>()) return -inf_v<Acc>();
  return (mx + log2_acc(sum)) * Acc(kLn2);
}

// (mx, sum) := (prev_max, prev_sum) ⊕ (mx, sum); a NaN max marks a NaN row.
template <typename Acc>
__device__ __forceinline__ void merge_lse(Acc prev_max, Acc prev_sum, Acc& mx, Acc& sum) {
  if (isnan(prev_max) || isnan(mx)) {
    mx = nan_v<Acc>();
    sum = Acc(0);
    return;
  }
  const Acc top = max_acc(prev_max, mx);
  if (top == -inf_v<Acc>()) {
    sum = Acc(0);
  } else {
    sum = prev_sum * exp2_acc(prev_max - top) + sum * exp2_acc(mx - top);
  }
  mx = top;
}

template <class C>
__global__ void __launch_bounds__(C::kThreads) mma_lse_forward_kernel(FwdArgs<typename C::Acc> a) {
  using In = typename C::In;
  using Acc = typename C::Acc;
  using L = FwdLayout<C>;
  constexpr int NT = C::FWD_COLS / 8;
  RCL_DYNAMIC_SMEM(smem);
  const LseProblem& p = a.c.p;
  const Acc* col_bias = static_cast<const Acc*>(p.col_bias);
  const int tid = threadIdx.x, warp = tid >> 5, t = lane_id() & 3;
  const Acc ninf = -inf_v<Acc>();

  // Split s of a row tile merges after split s - 1: take work items in start order.
  const int64_t w = a.splits > 1 ? take_work_item(smem + L::work, a.counter) : blockIdx.x;
  const int64_t rt = w % a.row_tiles;
  const int split = int(w / a.row_tiles);
  const int64_t row0 = rt * C::FWD_ROWS;
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = min64(ceil_div64(p.m, C::FWD_COLS), t_begin + a.tiles_per_split);
  const int nd = int(max64(1, ceil_div64(p.d, C::DK)));
  const bool resident = nd <= C::kStages;  // Z chunk ci stays in slot ci for the whole block

  const In* z = static_cast<const In*>(p.z);
  const In* k = static_cast<const In*>(p.k);
  In* own = reinterpret_cast<In*>(smem + L::own);
  In* stream = reinterpret_cast<In*>(smem + L::stream);

  auto issue = [&](int64_t q) {
    const int ci = int(q % nd), slot = int(q % C::kStages);
    const int64_t col0 = (t_begin + q / nd) * C::FWD_COLS;
    load_chunk<C, C::FWD_COLS>(stream + slot * L::stream_elems, k, col0, p.m,
                               int64_t(ci) * C::DK, p.d, a.c.vec_bytes);
    if (!resident || q < nd) {
      load_chunk<C, C::FWD_ROWS>(own + (resident ? ci : slot) * L::own_elems, z, row0, p.n,
                                 int64_t(ci) * C::DK, p.d, a.c.vec_bytes);
    }
    if (ci == nd - 1) {  // the tile's column metadata, read after its last chunk
      char* ms = smem + L::meta + slot * L::meta_slot;
      for (int j = tid; j < 2 * C::FWD_COLS; j += C::kThreads) {
        if (j < C::FWD_COLS) {
          copy_meta(reinterpret_cast<int64_t*>(ms) + j, p.col_labels, col0 + j, p.m);
        } else {
          const int jj = j - C::FWD_COLS;
          copy_meta(reinterpret_cast<Acc*>(ms + C::FWD_COLS * sizeof(int64_t)) + jj, col_bias,
                    col0 + jj, p.m);
        }
      }
    }
  };

  const auto rows = lane_rows<Acc>(row0 + warp * 16, p.n, p.row_labels, p.row_bias);
  const bool warp_live = row0 + warp * 16 < p.n;

  Acc acc[NT][4];
  zero(acc);
  Acc run_max[2] = {ninf, ninf}, run_sum[2] = {Acc(0), Acc(0)};
  int saw_nan[2] = {0, 0};

  pipeline<C>(max64(0, t_end - t_begin) * nd, issue, [&](int64_t q) {
    const int ci = int(q % nd), slot = int(q % C::kStages);
    const int64_t col0 = (t_begin + q / nd) * C::FWD_COLS;
    if (warp_live) {
      s_chunk<C, NT>(acc, own + (resident ? ci : slot) * L::own_elems + warp * 16 * C::LDK,
                     stream + slot * L::stream_elems, groups_of_8(p.m - col0, NT),
                     int(min64(C::DK, p.d - int64_t(ci) * C::DK)));
    }
    if (ci != nd - 1) return;

    // Tile done: logits in base 2, masked, folded into the running (max, sum) of each row.
    const char* ms = smem + L::meta + slot * L::meta_slot;
    const int64_t* clab = reinterpret_cast<const int64_t*>(ms);
    const Acc* cbias = reinterpret_cast<const Acc*>(ms + C::FWD_COLS * sizeof(int64_t));
    Acc tile_max[2] = {ninf, ninf};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, jl = 8 * n + 2 * t + (e & 1);
        const int64_t j = col0 + jl;
        const bool valid = j < p.m && j != rows.idx[h] + p.self_offset;
        Acc x = acc[n][e] * a.c.scale2 +
                (clab[jl] == rows.lab[h] ? rows.bias2[h] : cbias[jl] * Acc(kLog2e));
        saw_nan[h] |= int(valid && isnan(x));
        x = valid ? x : ninf;
        acc[n][e] = x;
        tile_max[h] = max_acc(tile_max[h], x);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the 4 lanes of a row share its max
      tile_max[h] = max_acc(tile_max[h], rcl_mma::shfl_xor(tile_max[h], 1));
      tile_max[h] = max_acc(tile_max[h], rcl_mma::shfl_xor(tile_max[h], 2));
      const Acc top = max_acc(run_max[h], tile_max[h]);
      if (top > ninf) {  // exp2 only ever sees x - top <= 0
        Acc sum = run_sum[h] * exp2_acc(run_max[h] - top);
#pragma unroll
        for (int n = 0; n < NT; ++n)
          sum += exp2_acc(acc[n][2 * h] - top) + exp2_acc(acc[n][2 * h + 1] - top);
        run_sum[h] = sum;
        run_max[h] = top;
      }
    }
    zero(acc);
  });

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    run_sum[h] += rcl_mma::shfl_xor(run_sum[h], 1);
    run_sum[h] += rcl_mma::shfl_xor(run_sum[h], 2);
    saw_nan[h] |= rcl_mma::shfl_xor(saw_nan[h], 1);
    saw_nan[h] |= rcl_mma::shfl_xor(saw_nan[h], 2);
  }
  in_turn(a.splits > 1 ? a.sems + rt : nullptr, split, a.splits > 1, [&] {  // in split order
    if (t != 0) return;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = rows.idx[h];
      if (i >= p.n) continue;
      Acc mx = saw_nan[h] ? nan_v<Acc>() : run_max[h], sum = run_sum[h];
      if (split > 0) merge_lse(rcl_mma::ldcg(a.ws_max + i), rcl_mma::ldcg(a.ws_sum + i), mx, sum);
      if (split == a.splits - 1) {
        a.lse[i] = finish_lse(mx, sum);
      } else {
        a.ws_max[i] = mx;
        a.ws_sum[i] = sum;
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Backward

template <class C>
__global__ void __launch_bounds__(C::kThreads)
    mma_lse_backward_kernel(BwdArgs<typename C::Acc> a) {
  using In = typename C::In;
  using Acc = typename C::Acc;
  using Op = typename C::Op;
  using L = BwdLayout<C>;
  constexpr int NT = C::BWD_ROWS / 8;  // n-tiles of Sᵀ: the rows of a row tile
  constexpr int NO = C::DK / 8;        // n-tiles of dk: the d chunk
  RCL_DYNAMIC_SMEM(smem);
  const LseProblem& p = a.c.p;
  const int tid = threadIdx.x, warp = tid >> 5, g = lane_id() >> 2, t = lane_id() & 3;
  const Acc ninf = -inf_v<Acc>();

  // Work items in start order: dz waits for lower column tiles, dk for lower splits.
  const int64_t w = take_work_item(smem + L::work, a.counter);
  const int64_t ct = w % a.col_tiles;
  const int ch = int((w / a.col_tiles) % a.d_chunks);
  const int split = int(w / a.col_tiles / a.d_chunks);
  const int64_t col0 = ct * C::BWD_COLS, dv0 = int64_t(ch) * C::DK;
  const int64_t t_begin = split * a.tiles_per_split;
  const int64_t t_end = min64(a.row_tiles, t_begin + a.tiles_per_split);
  const int nd = int(a.d_chunks);
  const bool resident = nd <= C::kStages;  // K chunk ci stays in slot ci for the whole block
  // Each row tile walks its d chunks from ch + 1 round to ch, so that chunk ch of Z (stream
  // slot) and of K (own slot) are in shared memory when S is complete.
  const int first = (ch + 1) % nd;

  const In* z = static_cast<const In*>(p.z);
  const In* k = static_cast<const In*>(p.k);
  In* own = reinterpret_cast<In*>(smem + L::own);
  In* stream = reinterpret_cast<In*>(smem + L::stream);
  Op* ps = reinterpret_cast<Op*>(smem + L::ps);

  auto issue = [&](int64_t q) {
    const int ci = int((first + q % nd) % nd), slot = int(q % C::kStages);
    const int64_t row0 = (t_begin + q / nd) * C::BWD_ROWS;
    load_chunk<C, C::BWD_ROWS>(stream + slot * L::stream_elems, z, row0, p.n,
                               int64_t(ci) * C::DK, p.d, a.c.vec_bytes);
    if (!resident || q < nd) {
      load_chunk<C, C::BWD_COLS>(own + (resident ? ci : slot) * L::own_elems, k, col0, p.m,
                                 int64_t(ci) * C::DK, p.d, a.c.vec_bytes);
    }
    if (q % nd == nd - 1) {  // the row tile's metadata, read after its last chunk
      char* ms = smem + L::meta + slot * L::meta_slot;
      Acc* accs = reinterpret_cast<Acc*>(ms + C::BWD_ROWS * sizeof(int64_t));
      for (int j = tid; j < 4 * C::BWD_ROWS; j += C::kThreads) {
        const int what = j / C::BWD_ROWS, r = j % C::BWD_ROWS;
        if (what == 0) {
          copy_meta(reinterpret_cast<int64_t*>(ms) + r, p.row_labels, row0 + r, p.n);
        } else {
          const Acc* src = what == 1 ? static_cast<const Acc*>(p.row_bias) : what == 2 ? a.lse : a.g;
          copy_meta(accs + (what - 1) * C::BWD_ROWS + r, src, row0 + r, p.n);
        }
      }
    }
  };

  // This lane's columns (the rows of Sᵀ).
  const auto cols = lane_rows<Acc>(col0 + warp * 16, p.m, p.col_labels, p.col_bias);
  const bool warp_live = col0 + warp * 16 < p.m;
  // With 16-bit operands g·p is rounded to the input dtype: divide g by max|g| first (a tiny g,
  // e.g. a mean over many anchors, would underflow float16) and multiply it back in Acc.
  Acc g_norm = Acc(1);
  if (a.g_absmax != nullptr) {
    const Acc gm = *a.g_absmax;
    if (gm > Acc(0) && !isinf(gm)) g_norm = gm;
  }
  const Acc g_inv = Acc(1) / g_norm;

  Acc dk[NO][4], s[NT][4];
  zero(dk);
  zero(s);

  pipeline<C>(max64(0, t_end - t_begin) * nd, issue, [&](int64_t q) {
    const int ci = int((first + q % nd) % nd), slot = int(q % C::kStages);
    const int64_t tile = t_begin + q / nd, row0 = tile * C::BWD_ROWS;
    const In* kc = own + (resident ? ci : slot) * L::own_elems;
    const In* zc = stream + slot * L::stream_elems;
    const int row_groups = groups_of_8(p.n - row0, NT);
    if (warp_live) {
      s_chunk<C, NT>(s, kc + warp * 16 * C::LDK, zc, row_groups,
                     int(min64(C::DK, p.d - int64_t(ci) * C::DK)));
    }
    if (q % nd != nd - 1) return;

    // Sᵀ of this row tile is complete, and ci == ch. Pᵀ in the accumulators:
    // s[n][e] = p(row 8n + 2t + (e & 1), column g + 8·(e >> 1) of the warp's 16).
    const char* ms = smem + L::meta + slot * L::meta_slot;
    const int64_t* rlab = reinterpret_cast<const int64_t*>(ms);
    const Acc* rbias = reinterpret_cast<const Acc*>(ms + C::BWD_ROWS * sizeof(int64_t));
    const Acc* rlse = rbias + C::BWD_ROWS;
    const Acc* rg = rlse + C::BWD_ROWS;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, rl = 8 * n + 2 * t + (e & 1);
        const int64_t i = row0 + rl, j = cols.idx[h];
        const Acc lse = rlse[rl];
        const bool valid = i < p.n && j < p.m && j != i + p.self_offset && !(lse == ninf);
        const Acc x =
            s[n][e] * a.c.scale2 + (cols.lab[h] == rlab[rl] ? rbias[rl] * Acc(kLog2e) : cols.bias2[h]);
        s[n][e] = valid ? exp2_acc(x - lse * Acc(kLog2e)) : Acc(0);
      }
    }
    // P (without g, in [0, 1]) to shared memory for dz, as Pᵀ [column][row].
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        store_pair(ps + (warp * 16 + g + 8 * h) * C::LDP + 8 * n + 2 * t, s[n][2 * h],
                   s[n][2 * h + 1]);
    }
    // dk += (g/max|g| ⊙ Pᵀ)·Z[rows, chunk ch], straight from the registers.
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= rg[8 * n + 2 * t + (e & 1)] * g_inv;
    }
    if (warp_live) pv_regs<C, NT, NO>(dk, s, zc, row_groups, groups_of_8(p.d - dv0, NO));
    __syncthreads();  // P complete in shared memory

    // dz[rows, chunk ch] += scale·g ⊙ (P·K[columns, chunk ch]), in column-tile order.
    const int m0 = (warp % C::DZ_WM) * 16, n0 = (warp / C::DZ_WM) * C::DZ_NT * 8;
    Acc o[C::DZ_NT][4];
    zero(o);
    if (row0 + m0 < p.n) {
      pv_smem<C, C::DZ_NT>(o, ps + m0, kc + n0, int(min64(C::BWD_COLS, max64(0, p.m - col0))),
                           groups_of_8(p.d - dv0 - n0, C::DZ_NT));
    }
    const int64_t rows[2] = {row0 + m0 + g, row0 + m0 + g + 8};
    const Acc f[2] = {rg[m0 + g] * a.c.scale, rg[m0 + g + 8] * a.c.scale};
    in_turn(a.dz_sems + tile * nd + ch, int(ct), true, [&] {
      add_fragment(a.dz, p.d, rows, p.n, dv0 + n0 + 2 * t, o, f, ct != 0);
    });
    zero(s);
  });

  // dk[columns, chunk ch], the row splits in split order.
  const Acc f = a.c.scale * g_norm;
  const Acc fs[2] = {f, f};
  in_turn(a.dk_sems + ct * nd + ch, split, a.splits > 1,
          [&] { add_fragment(a.dk, p.d, cols.idx, p.m, dv0 + 2 * t, dk, fs, split != 0); });
}

// ----------------------------------------------------------------------------------------------
// Host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <class C>
struct Tag {
  using type = C;
};

// Calls f(Tag<Cfg>{}) for the path that serves p's dtype and TF32 setting.
template <class F>
auto dispatch(ElemType type, bool allow_tf32, F&& f) {
  switch (type) {
    case ElemType::kBFloat16:
      return f(Tag<CfgBf16>{});
    case ElemType::kFloat16:
      return f(Tag<CfgF16>{});
    case ElemType::kFloat64:
      return f(Tag<CfgF64>{});
    case ElemType::kFloat32:
    default:
      return allow_tf32 ? f(Tag<CfgTf32>{}) : f(Tag<CfgTf32x3>{});
  }
}

// The most splits of a 1-D grid of blocks_per_split blocks each (mma_lse_kernels.cuh): 65535, and
// fewer than 2^31 blocks in all.
int64_t max_splits(int64_t blocks_per_split) {
  return std::min<int64_t>(65535,
                          std::max<int64_t>(1, INT_MAX / std::max<int64_t>(1, blocks_per_split)));
}

template <class C>
int vec_bytes(const LseProblem& p) {
  const size_t row = size_t(p.d) * sizeof(typename C::In);
  for (const size_t v : {size_t(16), size_t(8), size_t(4)}) {
    if (v >= sizeof(typename C::In) && row % v == 0 && reinterpret_cast<uintptr_t>(p.z) % v == 0 &&
        reinterpret_cast<uintptr_t>(p.k) % v == 0)
      return int(v);
  }
  return 0;
}

template <class C>
Common<typename C::Acc> make_common(const LseProblem& p) {
  using Acc = typename C::Acc;
  return Common<Acc>{p, static_cast<Acc>(p.scale), static_cast<Acc>(p.scale * kLog2e),
                     vec_bytes<C>(p)};
}

size_t align16(size_t x) { return align_up(x, 16); }

template <class C>
MmaForwardPlan plan_forward_impl(const LseProblem& p, int64_t col_splits) {
  MmaForwardPlan plan;
  plan.row_tiles = ceil_div(p.n, C::FWD_ROWS);
  const Split s =
      split_reduction(ceil_div(p.m, C::FWD_COLS), col_splits, max_splits(plan.row_tiles));
  plan.splits = s.count;
  plan.tiles_per_split = s.tiles_per_split;
  if (plan.splits > 1) {
    plan.workspace_bytes = align16(2 * size_t(p.n) * sizeof(typename C::Acc)) +
                           align16(sizeof(int) * size_t(plan.row_tiles + 1));
  }
  return plan;
}

template <class C>
MmaBackwardPlan plan_backward_impl(const LseProblem& p, int64_t row_splits) {
  MmaBackwardPlan plan;
  plan.col_tiles = ceil_div(p.m, C::BWD_COLS);
  plan.d_chunks = ceil_div(p.d, C::DK);
  plan.row_tiles = ceil_div(p.n, C::BWD_ROWS);
  const Split s = split_reduction(plan.row_tiles, row_splits,
                                  max_splits(plan.col_tiles * plan.d_chunks));
  plan.splits = s.count;
  plan.tiles_per_split = s.tiles_per_split;
  if (plan.col_tiles > 0 && plan.d_chunks > 0) {
    plan.workspace_bytes =
        align16(sizeof(int) * size_t((plan.row_tiles + plan.col_tiles) * plan.d_chunks + 1));
  }
  return plan;
}

template <class C>
cudaError_t forward_impl(const LseProblem& p, const MmaForwardPlan& plan, void* lse,
                         void* workspace, cudaStream_t stream) {
  using Acc = typename C::Acc;
  using L = FwdLayout<C>;
  if (p.n == 0) return cudaSuccess;
  FwdArgs<Acc> a{};
  a.c = make_common<C>(p);
  a.lse = static_cast<Acc*>(lse);
  a.row_tiles = plan.row_tiles;
  a.splits = plan.splits;
  a.tiles_per_split = plan.tiles_per_split;
  if (plan.splits > 1) {
    char* ws = static_cast<char*>(workspace);
    a.ws_max = reinterpret_cast<Acc*>(ws);
    a.ws_sum = a.ws_max + p.n;
    const size_t ints = align16(2 * size_t(p.n) * sizeof(Acc));
    a.sems = reinterpret_cast<int*>(ws + ints);
    a.counter = a.sems + plan.row_tiles;
    RCL_RETURN_IF_ERROR(
        rcl_mma::memset_async(a.sems, sizeof(int) * size_t(plan.row_tiles + 1), stream));
  }
  RCL_RETURN_IF_ERROR(rcl_mma::set_max_dynamic_smem(mma_lse_forward_kernel<C>, L::bytes));
  const dim3 grid{unsigned(plan.row_tiles * plan.splits), 1u, 1u};
  RCL_LAUNCH(mma_lse_forward_kernel<C>, grid, C::kThreads, L::bytes, stream, a);
  return rcl_mma::last_launch_error();
}

template <class C>
cudaError_t backward_impl(const LseProblem& p, const MmaBackwardPlan& plan, const void* g,
                          const void* g_absmax, const void* lse, void* dz, void* dk,
                          void* workspace, cudaStream_t stream) {
  using Acc = typename C::Acc;
  using L = BwdLayout<C>;
  if (p.d == 0) return cudaSuccess;  // dz and dk are empty
  if (p.m == 0) return rcl_mma::memset_async(dz, sizeof(Acc) * size_t(p.n * p.d), stream);
  BwdArgs<Acc> a{};
  a.c = make_common<C>(p);
  a.g = static_cast<const Acc*>(g);
  a.g_absmax = static_cast<const Acc*>(g_absmax);
  a.lse = static_cast<const Acc*>(lse);
  a.dz = static_cast<Acc*>(dz);
  a.dk = static_cast<Acc*>(dk);
  a.col_tiles = plan.col_tiles;
  a.d_chunks = plan.d_chunks;
  a.row_tiles = plan.row_tiles;
  a.splits = plan.splits;
  a.tiles_per_split = plan.tiles_per_split;
  a.dz_sems = static_cast<int*>(workspace);
  a.dk_sems = a.dz_sems + plan.row_tiles * plan.d_chunks;
  a.counter = a.dk_sems + plan.col_tiles * plan.d_chunks;
  RCL_RETURN_IF_ERROR(rcl_mma::memset_async(workspace, plan.workspace_bytes, stream));
  RCL_RETURN_IF_ERROR(rcl_mma::set_max_dynamic_smem(mma_lse_backward_kernel<C>, L::bytes));
  const dim3 grid{unsigned(plan.col_tiles * plan.d_chunks * plan.splits), 1u, 1u};
  RCL_LAUNCH(mma_lse_backward_kernel<C>, grid, C::kThreads, L::bytes, stream, a);
  return rcl_mma::last_launch_error();
}

}  // namespace

MmaTiles mma_tiles(ElemType type, bool allow_tf32) {
  return dispatch(type, allow_tf32, [](auto tag) {
    using C = typename decltype(tag)::type;
    return MmaTiles{C::FWD_ROWS, C::FWD_COLS, C::BWD_COLS, C::BWD_ROWS, C::DK, C::kThreads};
  });
}

MmaForwardPlan plan_mma_forward(const LseProblem& p, int64_t col_splits) {
  return dispatch(p.type, p.allow_tf32, [&](auto tag) {
    return plan_forward_impl<typename decltype(tag)::type>(p, col_splits);
  });
}

MmaBackwardPlan plan_mma_backward(const LseProblem& p, int64_t row_splits) {
  return dispatch(p.type, p.allow_tf32, [&](auto tag) {
    return plan_backward_impl<typename decltype(tag)::type>(p, row_splits);
  });
}

size_t mma_forward_smem_bytes(const LseProblem& p) {
  return dispatch(p.type, p.allow_tf32,
                  [](auto tag) { return FwdLayout<typename decltype(tag)::type>::bytes; });
}

size_t mma_backward_smem_bytes(const LseProblem& p) {
  return dispatch(p.type, p.allow_tf32,
                  [](auto tag) { return BwdLayout<typename decltype(tag)::type>::bytes; });
}

cudaError_t launch_mma_forward(const LseProblem& p, const MmaForwardPlan& plan, void* lse,
                               void* workspace, cudaStream_t stream) {
  return dispatch(p.type, p.allow_tf32, [&](auto tag) {
    return forward_impl<typename decltype(tag)::type>(p, plan, lse, workspace, stream);
  });
}

cudaError_t launch_mma_backward(const LseProblem& p, const MmaBackwardPlan& plan,
                                const void* grad_lse, const void* grad_absmax, const void* lse,
                                void* dz, void* dk, void* workspace, cudaStream_t stream) {
  return dispatch(p.type, p.allow_tf32, [&](auto tag) {
    return backward_impl<typename decltype(tag)::type>(p, plan, grad_lse, grad_absmax, lse, dz, dk,
                                                       workspace, stream);
  });
}

}  // namespace rcl_cuda
