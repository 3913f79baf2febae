// The PTX instructions of the mma.sync kernels (mma_lse_kernels.cu), one small wrapper each, so
// that the host emulation (host_emu/mma_host_emu.h) can stand in for every one of them with the
// PTX ISA's documented per-lane semantics. sm_80 or newer.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace rcl_mma {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A·B + D, fp32 accumulators. A: 4 registers of two 16-bit elements (T: bf16 or f16), B: 2.
#define RCL_MMA_16816(T)                                                                   \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." T "." T                             \
               ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"              \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
__device__ __forceinline__ void mma_16816_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  RCL_MMA_16816("bf16");
}
__device__ __forceinline__ void mma_16816_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
  RCL_MMA_16816("f16");
}
#undef RCL_MMA_16816
// A and B hold TF32 bit patterns (see to_tf32).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_884_f64(double& d0, double& d1, double a, double b) {
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(d0), "+d"(d1)
               : "d"(a), "d"(b));
}

// Round to TF32 (nearest, ties away from zero), as cvt.rna.tf32.f32 does.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// Four 8x8 matrices of 16-bit elements; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

// cp.async of BYTES (4, 8 or 16) bytes from global to shared memory (both aligned to BYTES).
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "n"(BYTES));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// Work counter of the dynamic block order: blocks take work items in the order they start.
__device__ __forceinline__ int take_work(int* counter) { return atomicAdd(counter, 1); }

// Semaphores of the ordered accumulations: one thread waits (acquire) until *sem == value; one
// thread publishes (release) after the block's writes (the caller puts __syncthreads around).
// No fence before the release: in the PTX memory model the barrier orders every thread's writes
// before thread 0's st.release.gpu (causality order is transitive), and the reader's
// ld.acquire.gpu then observes them all — the pattern of CUTLASS's semaphore.
__device__ __forceinline__ void sem_wait(const int* sem, int value) {
  int v;
  while (true) {
    asm volatile("ld.global.acquire.gpu.b32 %0, [%1];\n" : "=r"(v) : "l"(sem) : "memory");
    if (v == value) break;
    __nanosleep(64);
  }
}
__device__ __forceinline__ void sem_release(int* sem, int value) {
  asm volatile("st.global.release.gpu.b32 [%0], %1;\n" ::"l"(sem), "r"(value) : "memory");
}

// Loads of partial sums another block wrote: through L2, never a stale L1 line.
__device__ __forceinline__ float ldcg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double ldcg(const double* p) { return __ldcg(p); }
// The same for two adjacent elements, one 8- or 16-byte load (p aligned to twice the element).
__device__ __forceinline__ void ldcg_pair(const float* p, float& x, float& y) {
  const float2 v = __ldcg(reinterpret_cast<const float2*>(p));
  x = v.x;
  y = v.y;
}
__device__ __forceinline__ void ldcg_pair(const double* p, double& x, double& y) {
  const double2 v = __ldcg(reinterpret_cast<const double2*>(p));
  x = v.x;
  y = v.y;
}
// Two adjacent elements, one store (p aligned to twice the element).
__device__ __forceinline__ void st_pair(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void st_pair(double* p, double x, double y) {
  *reinterpret_cast<double2*>(p) = make_double2(x, y);
}

// Host side.
template <typename K>
inline cudaError_t set_max_dynamic_smem(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}
inline cudaError_t memset_async(void* p, size_t bytes, cudaStream_t stream) {
  return cudaMemsetAsync(p, 0, bytes, stream);
}
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

}  // namespace rcl_mma
