// Schemas of the kernel ops and the Python module stub for rcl_kernels._C.
//
// The ops compute only the part of the loss that needs N x M tiles: a masked, biased log-sum-exp
// per anchor row ("attention whose output is the LSE"). The positive terms of the loss are
// O((N+M)·d) segment sums done in PyTorch by rcl_kernels/fused.py, shared by every backend.
//
//   t_ij  = scale·<z_i, k_j> + (col_labels[j] == row_labels[i] ? row_bias[i] : col_bias[j])
//   lse_i = log Σ_{j ≠ i + self_offset} exp(t_ij)            (−inf when no column is left)
//   p_ij  = exp(t_ij − lse_i)                                  (0 for the self column, or lse = −inf)
//   dz    = scale · (g ⊙ P) · K        dk = scale · (g ⊙ P)ᵀ · Z     (g = grad_lse)
//
// Shapes and dtypes: z [N, d] and k [M, d] of one floating dtype (float32, float64, bfloat16,
// float16); labels int64; row_bias [N], col_bias [M] and lse [N] in the accumulation dtype
// (float32, or float64 for float64 inputs). dz and dk come back in the accumulation dtype too:
// the caller adds the positive-term gradients before the one rounding to the input dtype (two
// half-precision gradients of opposite sign would cancel badly).
//
// One pair of ops per candidate, named after the variant that runs it (its source files carry the
// same name), so that the candidate chosen in Python (rcl_kernels/dispatch.py) names the kernel it
// runs and the dispatcher has nothing left to pick:
//   streaming_lse_* the CPU streaming kernel, candidate cpu:streaming
//               (csrc/cpu/streaming_lse_cpu.cpp);
//   wmma_lse_*  the CUDA streaming kernels on wmma tiles, candidate cuda:wmma
//               (csrc/cuda/wmma_lse_*), with the split counts of rcl_kernels/kernels/planner.py;
//               allow_tf32 asks for TF32 tensor-core products on float32 inputs (float32 matmul
//               precision "high"/"medium");
//   mma_lse_*   the CUDA streaming kernels on mma.sync, candidate cuda:mma
//               (csrc/cuda/mma_lse_*): one kernel per pass, any d, one backward split count;
//               fp32 without allow_tf32 runs 3xTF32 (untimed);
//   tiled_lse_* the tiled algorithm (csrc/tiled/): ATen GEMMs into a workspace of block_rows rows
//               of scores and one device epilogue per block, for CPU and CUDA tensors alike. Its
//               GEMMs follow PyTorch's float32 matmul precision themselves.
//               tiled_loss_forward_backward(w, ...) returns (lse, positive_sum, dz, dk) from one
//               pass: positive_sum_i = Σ_{j∈Pos(i)} <z_i, k_j> (Pos(i): the columns of the
//               anchor's label but its self column) and (dz, dk) the gradient of the loss
//               Σ_i w_i·(lse_i − mean_{j∈Pos(i)} t_ij), i.e. G = scale·diag(w)·(P − Y) with
//               Y_ij = [j ∈ Pos(i)] / |Pos(i)|: dz = G·K, dk = Gᵀ·Z.
// The Triton pair (triton_lse_*) is a Python custom op with the arguments of wmma_lse_*, a
// variant name in place of the split counts (rcl_kernels/kernels/triton/__init__.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import rcl_kernels._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rcl_kernels, m) {
  m.def(
      "streaming_lse_forward(Tensor z, Tensor k, Tensor row_labels, Tensor col_labels, "
      "Tensor row_bias, Tensor col_bias, int self_offset, float scale) -> Tensor");
  m.def(
      "streaming_lse_backward(Tensor grad_lse, Tensor z, Tensor k, Tensor row_labels, "
      "Tensor col_labels, Tensor row_bias, Tensor col_bias, Tensor lse, int self_offset, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "wmma_lse_forward(Tensor z, Tensor k, Tensor row_labels, Tensor col_labels, "
      "Tensor row_bias, Tensor col_bias, int self_offset, float scale, bool allow_tf32, "
      "int col_splits) -> Tensor");
  m.def(
      "wmma_lse_backward(Tensor grad_lse, Tensor z, Tensor k, Tensor row_labels, "
      "Tensor col_labels, Tensor row_bias, Tensor col_bias, Tensor lse, int self_offset, "
      "float scale, bool allow_tf32, int row_pass_splits, int col_pass_splits) -> (Tensor, Tensor)");
  m.def(
      "mma_lse_forward(Tensor z, Tensor k, Tensor row_labels, Tensor col_labels, "
      "Tensor row_bias, Tensor col_bias, int self_offset, float scale, bool allow_tf32, "
      "int col_splits) -> Tensor");
  m.def(
      "mma_lse_backward(Tensor grad_lse, Tensor z, Tensor k, Tensor row_labels, "
      "Tensor col_labels, Tensor row_bias, Tensor col_bias, Tensor lse, int self_offset, "
      "float scale, bool allow_tf32, int splits) -> (Tensor, Tensor)");
  m.def(
      "tiled_lse_forward(Tensor z, Tensor k, Tensor row_labels, Tensor col_labels, "
      "Tensor row_bias, Tensor col_bias, int self_offset, float scale, int block_rows) -> Tensor");
  m.def(
      "tiled_lse_backward(Tensor grad_lse, Tensor z, Tensor k, Tensor row_labels, "
      "Tensor col_labels, Tensor row_bias, Tensor col_bias, Tensor lse, int self_offset, "
      "float scale, int block_rows) -> (Tensor, Tensor)");
  m.def(
      "tiled_loss_forward_backward(Tensor weights, Tensor z, Tensor k, Tensor row_labels, "
      "Tensor col_labels, Tensor row_bias, Tensor col_bias, int self_offset, float scale, "
      "int block_rows) -> (Tensor, Tensor, Tensor, Tensor)");
}
