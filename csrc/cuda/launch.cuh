// How the kernels of csrc/cuda declare dynamic shared memory and launch: real CUDA here, and a
// thread-per-CUDA-thread emulation when the host-emulation tests define RCL_HOST_EMULATION and
// include host_emu/cuda_host_emu.h first (it defines both macros its own way).
#pragma once

#ifndef RCL_HOST_EMULATION
#define RCL_DYNAMIC_SMEM(name) extern __shared__ __align__(128) char name[]
#define RCL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
