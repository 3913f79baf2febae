// The device-generic driver of the tiled algorithm (see tiled_lse.h).
#include "tiled/tiled_lse.h"

#include <algorithm>

namespace rcl_kernels::tiled {
namespace {

// out = a·bᵀ in the accumulation dtype (ATen's mixed-dtype GEMM when the operands are 16-bit).
void gemm_abt(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b.t());
  } else {
    at::mm_out(out, a, b.t(), out.scalar_type());
  }
}

// out += aᵀ·b in the accumulation dtype.
void add_gemm_atb(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a.t(), b);
  } else {
    at::addmm_out(out, out, a.t(), b, out.scalar_type());
  }
}

// out = a·b in the accumulation dtype.
void gemm_ab(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, out.scalar_type());
  }
}

struct Workspace {
  at::Tensor scores, probabilities;  // [block_rows, M]; probabilities aliases scores when the
                                     // operands are in the accumulation dtype
};

Workspace make_workspace(const Problem& p, int64_t block_rows, bool with_probabilities) {
  const int64_t m = p.k.size(0);
  Workspace w;
  w.scores = at::empty({block_rows, m}, p.z.options().dtype(p.acc));
  if (with_probabilities) {
    w.probabilities = p.z.scalar_type() == p.acc ? w.scores : at::empty({block_rows, m}, p.z.options());
  }
  return w;
}

// One pass over every row block; `weights` defined: also the gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const Problem& p, Epilogue epilogue,
                                                   at::Tensor lse, bool compute_lse,
                                                   const at::Tensor& weights, int64_t block_rows) {
  const int64_t n = p.z.size(0), m = p.k.size(0);
  const bool gradient = weights.defined();
  block_rows = std::max<int64_t>(1, std::min(block_rows, n));
  Workspace ws = make_workspace(p, block_rows, gradient);
  at::Tensor dz, dk, w, w_scaled, w_max;
  if (gradient) {
    dz = at::empty({n, p.z.size(1)}, p.z.options().dtype(p.acc));
    dk = at::zeros({m, p.k.size(1)}, p.k.options().dtype(p.acc));
    w = weights.to(p.acc).unsqueeze(1);
    // For dk the row weights are divided by max|w| (a device scalar: no sync), so that w·z stays
    // within |z| when rounded to a 16-bit operand dtype; max|w| goes back in at full precision.
    w_max = n > 0 ? w.abs().amax() : at::ones({}, w.options());  // amax refuses an empty tensor
    w_max = at::where(w_max > 0, w_max, at::ones_like(w_max));
    w_scaled = w / w_max;
  }
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t r1 = std::min(n, r0 + block_rows), rows = r1 - r0;
    at::Tensor scores = ws.scores.narrow(0, 0, rows);
    at::Tensor lse_rows = lse.narrow(0, r0, rows);
    at::Tensor probabilities = gradient ? ws.probabilities.narrow(0, 0, rows) : at::Tensor();
    const at::Tensor z_rows = p.z.narrow(0, r0, rows);
    gemm_abt(scores, z_rows, p.k);
    epilogue(p, r0, scores, lse_rows, compute_lse, probabilities);
    if (!gradient) continue;
    // dz rows: (P·K) scaled by scale·w in the accumulation dtype.
    at::Tensor dz_rows = dz.narrow(0, r0, rows);
    gemm_ab(dz_rows, probabilities, p.k);
    dz_rows.mul_(w.narrow(0, r0, rows) * p.scale);
    // dk += Pᵀ·(w/max|w| ⊙ Z): the rows of this block, summed in block order (deterministic).
    const at::Tensor weighted_z =
        (z_rows.to(p.acc) * w_scaled.narrow(0, r0, rows)).to(p.z.scalar_type());
    add_gemm_atb(dk, probabilities, weighted_z);
  }
  if (gradient) dk.mul_(w_max * p.scale);
  return {lse, dz, dk};
}

}  // namespace

void check_arguments(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                     const at::Tensor& col_labels, const at::Tensor& row_bias,
                     const at::Tensor& col_bias, int64_t block_rows) {
  TORCH_CHECK(z.dim() == 2 && k.dim() == 2 && z.size(1) == k.size(1),
              "tiled_lse: z [N, d] and k [M, d] must share d, got ", z.sizes(), " and ", k.sizes());
  TORCH_CHECK(z.scalar_type() == k.scalar_type() && at::isFloatingType(z.scalar_type()),
              "tiled_lse: z and k must share a floating dtype, got ", z.scalar_type(), " and ",
              k.scalar_type());
  TORCH_CHECK(row_labels.numel() == z.size(0) && row_bias.numel() == z.size(0),
              "tiled_lse: row_labels and row_bias must have N = ", z.size(0), " entries");
  TORCH_CHECK(col_labels.numel() == k.size(0) && col_bias.numel() == k.size(0),
              "tiled_lse: col_labels and col_bias must have M = ", k.size(0), " entries");
  // int64 labels, as the streaming ops take them: a label is compared, never converted here.
  TORCH_CHECK(row_labels.scalar_type() == at::kLong && col_labels.scalar_type() == at::kLong,
              "tiled_lse: row_labels and col_labels must be int64, got ", row_labels.scalar_type(),
              " and ", col_labels.scalar_type());
  for (const at::Tensor* t : {&k, &row_labels, &col_labels, &row_bias, &col_bias}) {
    TORCH_CHECK(t->device() == z.device(), "tiled_lse: every argument must be on z's device ",
                z.device(), ", got one on ", t->device());
  }
  TORCH_CHECK(block_rows >= 1, "tiled_lse: block_rows must be >= 1, got ", block_rows);
}

at::Tensor forward(const Problem& p, Epilogue epilogue, int64_t block_rows) {
  at::Tensor lse = at::empty({p.z.size(0)}, p.z.options().dtype(p.acc));
  return std::get<0>(run(p, epilogue, lse, /*compute_lse=*/true, at::Tensor(), block_rows));
}

std::tuple<at::Tensor, at::Tensor> backward(const Problem& p, Epilogue epilogue,
                                            const at::Tensor& lse, const at::Tensor& weights,
                                            int64_t block_rows) {
  auto result = run(p, epilogue, lse.to(p.acc).contiguous(), /*compute_lse=*/false, weights,
                    block_rows);
  return {std::get<1>(result), std::get<2>(result)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_backward(const Problem& p,
                                                                 Epilogue epilogue,
                                                                 const at::Tensor& weights,
                                                                 int64_t block_rows) {
  at::Tensor lse = at::empty({p.z.size(0)}, p.z.options().dtype(p.acc));
  return run(p, epilogue, lse, /*compute_lse=*/true, weights, block_rows);
}

}  // namespace rcl_kernels::tiled
