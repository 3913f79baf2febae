// The torch dtype of the CUDA kernels' inputs as the torch-free kernels name it (host code of the
// bindings only).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cuda/wmma_lse_kernels.cuh"

namespace rcl_kernels {

inline rcl_cuda::ElemType elem_type(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return rcl_cuda::ElemType::kFloat32;
    case c10::kDouble:
      return rcl_cuda::ElemType::kFloat64;
    case c10::kBFloat16:
      return rcl_cuda::ElemType::kBFloat16;
    case c10::kHalf:
      return rcl_cuda::ElemType::kFloat16;
    default:
      TORCH_CHECK(false, "the CUDA kernels take float32, float64, bfloat16 or float16, got ", t);
  }
}

}  // namespace rcl_kernels
