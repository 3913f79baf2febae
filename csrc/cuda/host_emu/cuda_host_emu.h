// Host emulation of the few CUDA device features wmma_lse_kernels.cu uses, so its kernels (wmma
// included, emulated below) and all of its host-side planning can run on a machine without a GPU:
// a block is 256 std::threads with a std::barrier for __syncthreads, blocks run one after another.
// Used only by wmma_lse_test.cpp (make check-cuda); not part of the extension.
#pragma once

#include <cuda_runtime.h>  // dim3, cudaError_t, __device__ and friends (empty for g++)

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof d);
  return d;
}
using std::isinf;
using std::isnan;

namespace emu {
inline thread_local dim3 thread_idx, block_idx, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline char* block_smem = nullptr;
inline uint64_t exchange[1024];

inline void sync() { block_barrier->arrive_and_wait(); }

template <typename T>
T shfl_xor(T v, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a scalar");
  const unsigned t = thread_idx.x;
  std::memcpy(&exchange[t], &v, sizeof v);
  sync();
  T r;
  std::memcpy(&r, &exchange[t ^ unsigned(offset)], sizeof r);
  sync();
  return r;
}

// Runs fn() as every thread of every block of grid (1-D blocks of `threads`). The same threads
// run the blocks one after another, meeting at a barrier between blocks (a block's shared memory
// is the next one's garbage), which costs far less than starting 256 threads per block.
inline void launch(dim3 grid, unsigned threads, size_t smem_bytes, const std::function<void()>& fn) {
  std::vector<char> smem(smem_bytes + 128, char(0x7f));  // garbage-filled, like real shared memory
  block_smem = smem.data() + (128 - reinterpret_cast<uintptr_t>(smem.data()) % 128) % 128;
  std::barrier<> bar(threads);
  block_barrier = &bar;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      thread_idx = dim3(t, 0, 0);
      grid_dim = grid;
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = dim3(bx, by, bz);
            fn();
            sync();
          }
    });
  for (auto& th : pool) th.join();
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define __syncthreads() emu::sync()
#define __shfl_xor_sync(mask, v, off) emu::shfl_xor((v), (off))
#ifndef __launch_bounds__
#define __launch_bounds__(x)
#endif
#define RCL_DYNAMIC_SMEM(name) char* name = emu::block_smem
#define RCL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu::launch(dim3(grid), unsigned(block), size_t(smem), [&] { kernel(__VA_ARGS__); })
// No device here: the runtime would report cudaErrorNoDevice; emulated launches cannot fail.
#define cudaGetLastError() cudaSuccess

// ------------------------------------------------------------------------------------------------
// nvcuda::wmma with the documented semantics (not the hardware's register layout): every lane of a
// warp holds the whole fragment, elementwise code on `x[]` stays valid, stores come from lane 0.
// Checks the documented preconditions: 256-bit aligned pointers, ldm a multiple of 16 bytes.
#include <cassert>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = typename storage<T>::type;
  element_type x[num_elements];
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check_ptr(const void* p, unsigned ldm, size_t elem) {
  assert(reinterpret_cast<uintptr_t>(p) % 32 == 0 && "wmma pointer must be 256-bit aligned");
  assert((ldm * elem) % 16 == 0 && "wmma ldm must be a multiple of 16 bytes");
  (void)p; (void)ldm; (void)elem;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  check_ptr(p, ldm, sizeof(P));
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] =
          std::is_same<Layout, col_major>::value ? p[r + size_t(c) * ldm] : p[size_t(r) * ldm + c];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  check_ptr(p, ldm, sizeof(float));
  assert(layout == mem_row_major);
  (void)layout;
  if (emu::thread_idx.x % 32 != 0) return;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) p[size_t(r) * ldm + c] = f.x[r * F::cols + c];
}

template <int M, int N, int K>
void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  // Operands widened once (host half conversions are slow), then an fp32 product.
  float fa[M * K], fb[K * N], out[M * N];
  for (int i = 0; i < M * K; ++i) fa[i] = as_float(a.x[i]);
  for (int i = 0; i < K * N; ++i) fb[i] = as_float(b.x[i]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int kk = 0; kk < K; ++kk) s += fa[i * K + kk] * fb[kk * N + j];
      out[i * N + j] = s;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

// Round to 10 explicit mantissa bits (nearest; ties away), as TF32 conversion does.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace wmma
}  // namespace nvcuda
#define RCL_HAVE_WMMA 1
