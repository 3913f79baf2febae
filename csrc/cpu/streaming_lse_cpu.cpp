// Fused masked log-sum-exp on the CPU (schema and math: csrc/ops.cpp).
//
// Rows are cut into tiles of kRowTile anchors and columns into tiles of kColTile; one tile of
// logits (kRowTile x kColTile accumulator floats) is the only N x M-shaped memory, per thread.
// Products run through ATen's GEMM on the tile, the bias/mask/exp passes on the tile stay in cache.
//   forward:  parallel over row tiles, online LSE across column tiles.
//   backward: recompute P from z, k and lse. dz is a row-parallel pass, dk a column-parallel
//             pass; each output tile is owned by one task and summed in a fixed order, so results
//             are bitwise reproducible run to run whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace rcl_kernels {
namespace {

constexpr int64_t kRowTile = 128;
constexpr int64_t kColTile = 512;

int64_t num_tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// OpenMP worker threads start with fresh dispatcher state; without this guard the ATen calls on
// tiles inside at::parallel_for would go through autograd again (the calling thread is already
// below it, since this kernel is registered for the CPU key).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// The op's inputs, converted once to the accumulation dtype (float, or double for float64).
struct Problem {
  at::Tensor z, k, row_labels, col_labels, row_bias, col_bias;
  int64_t self_offset;
  double scale;
};

Problem make_problem(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                     const at::Tensor& col_labels, const at::Tensor& row_bias,
                     const at::Tensor& col_bias, int64_t self_offset, double scale) {
  TORCH_CHECK(z.dim() == 2 && k.dim() == 2 && z.size(1) == k.size(1),
              "streaming_lse: z [N, d] and k [M, d] must share d, got ", z.sizes(), " and ", k.sizes());
  TORCH_CHECK(z.scalar_type() == k.scalar_type(), "streaming_lse: z and k must share a dtype");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "streaming_lse: z must be floating point");
  const int64_t n = z.size(0), m = k.size(0);
  TORCH_CHECK(row_labels.numel() == n && row_bias.numel() == n,
              "streaming_lse: row_labels and row_bias must have N = ", n, " entries");
  TORCH_CHECK(col_labels.numel() == m && col_bias.numel() == m,
              "streaming_lse: col_labels and col_bias must have M = ", m, " entries");
  TORCH_CHECK(row_labels.scalar_type() == at::kLong && col_labels.scalar_type() == at::kLong,
              "streaming_lse: labels must be int64");
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Detached: the kernel is below autograd. Labels as int32 (class indices), so that the
  // same-class select below vectorizes with 32-bit compares.
  auto prep = [](const at::Tensor& t, at::ScalarType dtype) {
    return t.detach().to(dtype).contiguous();
  };
  return {prep(z, acc), prep(k, acc), prep(row_labels, at::kInt), prep(col_labels, at::kInt),
          prep(row_bias, acc), prep(col_bias, acc), self_offset, scale};
}

// logits[r, c] = scale·<z_{r0+r}, k_{c0+c}> + bias, with the self column set to −inf.
template <typename acc_t>
void tile_logits(const Problem& p, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                 at::Tensor& logits) {
  at::mm_out(logits, p.z.slice(0, r0, r1), p.k.slice(0, c0, c1).t());
  const int64_t cols = c1 - c0;
  acc_t* t = logits.data_ptr<acc_t>();
  const int32_t* rl = p.row_labels.data_ptr<int32_t>();
  const int32_t* cl = p.col_labels.data_ptr<int32_t>() + c0;
  const acc_t* rb = p.row_bias.data_ptr<acc_t>();
  const acc_t* cb = p.col_bias.data_ptr<acc_t>() + c0;
  const acc_t scale = static_cast<acc_t>(p.scale);
  for (int64_t r = 0; r < r1 - r0; ++r) {
    acc_t* row = t + r * cols;
    const int32_t label = rl[r0 + r];
    const acc_t same_bias = rb[r0 + r];
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = scale * row[c] + (cl[c] == label ? same_bias : cb[c]);
    }
    const int64_t self = r0 + r + p.self_offset - c0;
    if (self >= 0 && self < cols) row[self] = -std::numeric_limits<acc_t>::infinity();
  }
}

// exp of a tile shifted by `shift[r]` per row, in place. Arguments below the floor are raised to it
// first: their exp would underflow, and MKL's vectorized exp (what at::exp runs) takes a
// per-element slow path for underflow and −inf that made the forward ~5x slower. e^floor (1.8e-35
// in float32, 2.7e-261 in float64) is far below the resolution of a sum that holds a term ≥ 1 (the
// row max), so the LSE is unchanged; the backward sets such entries to 0. NaN passes through (the
// comparison is false for NaN).
template <typename acc_t>
constexpr acc_t exp_floor() {
  return std::is_same<acc_t, double>::value ? acc_t(-600) : acc_t(-80);
}

template <typename acc_t>
void shifted_exp(at::Tensor& tile, const at::Tensor& shift) {
  tile.sub_(shift.unsqueeze(1)).clamp_min_(exp_floor<acc_t>()).exp_();
}

// Online log-sum-exp over column tiles for the rows of tiles [tile_begin, tile_end). The row
// reductions run through ATen's vectorized kernels; amax and maximum propagate NaN, so a NaN
// logit makes its row's LSE NaN.
template <typename acc_t>
void forward_row_tiles(const Problem& p, int64_t tile_begin, int64_t tile_end, at::Tensor& lse) {
  const int64_t n = p.z.size(0), m = p.k.size(0);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  auto logits_storage = at::empty({kRowTile * kColTile}, p.z.options());
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t r0 = tile * kRowTile, r1 = std::min(n, r0 + kRowTile), rows = r1 - r0;
    auto run_max = at::full({rows}, neg_inf, p.z.options());
    auto run_sum = at::zeros({rows}, p.z.options());
    for (int64_t c0 = 0; c0 < m; c0 += kColTile) {
      const int64_t c1 = std::min(m, c0 + kColTile), cols = c1 - c0;
      auto logits = logits_storage.narrow(0, 0, rows * cols).view({rows, cols});
      tile_logits<acc_t>(p, r0, r1, c0, c1, logits);
      auto new_max = at::maximum(run_max, logits.amax(1));
      // A row with every column masked so far keeps max −inf; shifting it by 0 keeps exp(−inf)=0.
      auto shift = at::where(new_max.eq(neg_inf), at::zeros_like(new_max), new_max);
      run_sum.mul_((run_max - shift).exp_());
      shifted_exp<acc_t>(logits, shift);
      run_sum.add_(logits.sum(1));
      run_max = new_max;
    }
    lse.slice(0, r0, r1).copy_(at::where(run_max.eq(neg_inf), run_max, run_max + run_sum.log()));
  }
}

at::Tensor streaming_lse_forward(const at::Tensor& z, const at::Tensor& k,
                                 const at::Tensor& row_labels, const at::Tensor& col_labels,
                                 const at::Tensor& row_bias, const at::Tensor& col_bias,
                                 int64_t self_offset, double scale) {
  const Problem p = make_problem(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale);
  auto lse = at::empty({z.size(0)}, p.z.options());
  AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "streaming_lse_forward", [&] {
    at::parallel_for(0, num_tiles(z.size(0), kRowTile), 1, [&](int64_t begin, int64_t end) {
      const BelowAutograd below_autograd;
      forward_row_tiles<scalar_t>(p, begin, end, lse);
    });
  });
  return lse;
}

// probabilities[r, c] = p_rc = exp(t_rc − lse_r) for one tile: 0 on the self column, on rows
// whose lse is −inf (rows with no column at all) and where exp underflows. The row weights g·scale
// are applied outside the tile (to the dz rows, to the z rows for dk), never to p itself: tiny
// g·p products would be denormal, and denormal GEMM operands are slower by orders of magnitude.
template <typename acc_t>
void tile_probabilities(const Problem& p, const at::Tensor& lse_shift, int64_t r0, int64_t r1,
                        int64_t c0, int64_t c1, at::Tensor& probabilities) {
  tile_logits<acc_t>(p, r0, r1, c0, c1, probabilities);
  // Rows with lse = −inf have every logit −inf: they floor, and so zero, like any underflow.
  shifted_exp<acc_t>(probabilities, lse_shift.slice(0, r0, r1));
  const acc_t underflow = std::exp(exp_floor<acc_t>());
  acc_t* t = probabilities.data_ptr<acc_t>();
  const int64_t count = probabilities.numel();
  for (int64_t i = 0; i < count; ++i) t[i] = t[i] <= underflow ? acc_t(0) : t[i];
}

// One backward pass, parallel over the tiles of its output: row tiles of dz (kRowPass) or column
// tiles of dk. Each task owns its output tiles and, for each, walks the other side's tiles in
// order: accumulate(probabilities, r0, r1, c0, c1) on every recomputed tile of P, then
// finish(t0, t1) on the output tile [t0, t1). Every output element is summed in one fixed order,
// so the result does not depend on the thread count.
template <typename acc_t, bool kRowPass, class Accumulate, class Finish>
void backward_pass(const Problem& p, const at::Tensor& lse_shift, const Accumulate& accumulate,
                   const Finish& finish) {
  const int64_t n = p.z.size(0), m = p.k.size(0);
  const int64_t own = kRowPass ? n : m, own_tile = kRowPass ? kRowTile : kColTile;
  const int64_t other = kRowPass ? m : n, other_tile = kRowPass ? kColTile : kRowTile;
  at::parallel_for(0, num_tiles(own, own_tile), 1, [&](int64_t begin, int64_t end) {
    const BelowAutograd below_autograd;
    auto storage = at::empty({kRowTile * kColTile}, p.z.options());
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * own_tile, t1 = std::min(own, t0 + own_tile);
      for (int64_t o0 = 0; o0 < other; o0 += other_tile) {
        const int64_t o1 = std::min(other, o0 + other_tile);
        const int64_t r0 = kRowPass ? t0 : o0, r1 = kRowPass ? t1 : o1;
        const int64_t c0 = kRowPass ? o0 : t0, c1 = kRowPass ? o1 : t1;
        auto probabilities = storage.narrow(0, 0, (r1 - r0) * (c1 - c0)).view({r1 - r0, c1 - c0});
        tile_probabilities<acc_t>(p, lse_shift, r0, r1, c0, c1, probabilities);
        accumulate(probabilities, r0, r1, c0, c1);
      }
      finish(t0, t1);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> streaming_lse_backward(
    const at::Tensor& grad_lse, const at::Tensor& z, const at::Tensor& k,
    const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& row_bias,
    const at::Tensor& col_bias, const at::Tensor& lse, int64_t self_offset, double scale) {
  const Problem p = make_problem(z, k, row_labels, col_labels, row_bias, col_bias, self_offset, scale);
  const int64_t n = z.size(0);
  TORCH_CHECK(grad_lse.numel() == n && lse.numel() == n,
              "streaming_lse_backward: grad_lse and lse must have N = ", n, " entries");
  const auto lse_acc = lse.detach().to(p.z.scalar_type());
  const auto lse_shift =
      at::where(lse_acc.isneginf(), at::zeros_like(lse_acc), lse_acc).contiguous();
  // Row weights g_i·scale: applied to the finished dz rows and, for dk, to the z rows.
  const auto row_weights =
      (grad_lse.detach().to(p.z.scalar_type()) * scale).unsqueeze(1).contiguous();
  const auto weighted_z = p.z * row_weights;
  auto dz = at::zeros_like(p.z);
  auto dk = at::zeros_like(p.k);
  AT_DISPATCH_FLOATING_TYPES(p.z.scalar_type(), "streaming_lse_backward", [&] {
    // dz rows: (g·scale) ⊙ Σ over column tiles of P_tile · K_tile.
    backward_pass<scalar_t, true>(
        p, lse_shift,
        [&](const at::Tensor& probabilities, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
          dz.slice(0, r0, r1).addmm_(probabilities, p.k.slice(0, c0, c1));
        },
        [&](int64_t r0, int64_t r1) { dz.slice(0, r0, r1).mul_(row_weights.slice(0, r0, r1)); });
    // dk columns: Σ over row tiles of P_tileᵀ · ((g·scale) ⊙ Z_tile).
    backward_pass<scalar_t, false>(
        p, lse_shift,
        [&](const at::Tensor& probabilities, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
          dk.slice(0, c0, c1).addmm_(probabilities.t(), weighted_z.slice(0, r0, r1));
        },
        [](int64_t, int64_t) {});
  });
  return {dz, dk};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_kernels, CPU, m) {
  m.impl("streaming_lse_forward", &streaming_lse_forward);
  m.impl("streaming_lse_backward", &streaming_lse_backward);
}

}  // namespace rcl_kernels
