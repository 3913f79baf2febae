// CUDA side of the tiled algorithm (csrc/tiled/tiled_lse.h): the problem in the input dtype (the
// cuBLAS GEMMs take bf16/fp16 operands with fp32 output), the epilogue kernel of
// tiled_epilogue.cu on the current stream, and the registrations of the tiled ops for CUDA tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/elem_type.h"
#include "cuda/tiled_epilogue.cuh"
#include "tiled/tiled_lse.h"

namespace rcl_kernels {
namespace {

void cuda_epilogue(const tiled::Problem& p, tiled::Block& block) {
  const c10::cuda::CUDAGuard guard(block.scores.device());
  auto pointer = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  rcl_cuda::TiledEpilogue args;
  args.scores = block.scores.data_ptr();
  args.lse = block.lse.data_ptr();
  args.probabilities = pointer(block.probabilities);
  args.row_labels = p.row_labels.data_ptr<int64_t>();
  args.col_labels = p.col_labels.data_ptr<int64_t>();
  args.row_bias = p.row_bias.data_ptr();
  args.col_bias = p.col_bias.data_ptr();
  args.row_factor = pointer(block.row_factor);
  args.positive_sum = pointer(block.positive_sum);
  args.rows = block.scores.size(0);
  args.m = block.scores.size(1);
  args.r0 = block.r0;
  args.self_offset = p.self_offset;
  args.scale = p.scale;
  args.compute_lse = block.compute_lse;
  args.type = elem_type(p.z.scalar_type());
  C10_CUDA_CHECK(rcl_cuda::launch_tiled_epilogue(args, c10::cuda::getCurrentCUDAStream()));
}

tiled::Problem cuda_problem(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                            const at::Tensor& col_labels, const at::Tensor& row_bias,
                            const at::Tensor& col_bias, int64_t self_offset, double scale,
                            int64_t block_rows) {
  tiled::check_arguments(z, k, row_labels, col_labels, row_bias, col_bias, block_rows);
  TORCH_CHECK(z.is_cuda(), "tiled_lse (CUDA): z must be a CUDA tensor, got ", z.device());
  elem_type(z.scalar_type());  // refuses other dtypes before any work
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  tiled::Problem p;
  p.z = z.detach().contiguous();
  p.k = k.detach().contiguous();
  p.row_labels = row_labels.to(at::kLong).contiguous();
  p.col_labels = col_labels.to(at::kLong).contiguous();
  p.row_bias = row_bias.detach().to(acc).contiguous();
  p.col_bias = col_bias.detach().to(acc).contiguous();
  p.self_offset = self_offset;
  p.scale = scale;
  p.acc = acc;
  return p;
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_kernels, CUDA, m) {
  m.impl("tiled_lse_forward", &tiled::forward_op<&cuda_problem, &cuda_epilogue>);
  m.impl("tiled_lse_backward", &tiled::backward_op<&cuda_problem, &cuda_epilogue>);
  m.impl("tiled_loss_forward_backward",
         &tiled::loss_forward_backward_op<&cuda_problem, &cuda_epilogue>);
}

}  // namespace rcl_kernels
