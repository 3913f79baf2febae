// How the kernels of csrc/cuda declare dynamic shared memory and launch: real CUDA here, and a
// thread-per-CUDA-thread emulation when the host-emulation tests define RCL_HOST_EMULATION and
// include host_emu/cuda_host_emu.h first (it defines both macros its own way). Also the
// launchers' early return of the first CUDA error.
#pragma once

#define RCL_RETURN_IF_ERROR(expr)                   \
  do {                                              \
    const cudaError_t rcl_err_ = (expr);            \
    if (rcl_err_ != cudaSuccess) return rcl_err_;   \
  } while (0)

#ifndef RCL_HOST_EMULATION
#define RCL_DYNAMIC_SMEM(name) extern __shared__ __align__(128) char name[]
#define RCL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
