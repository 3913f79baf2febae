// The device-generic driver of the tiled algorithm (see tiled_lse.h).
#include "tiled/tiled_lse.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <utility>
#include <vector>

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

// out = aᵀ·b (accumulate: out += aᵀ·b) in the accumulation dtype. beta = 0 on the first block
// means out is never read, so it needs no zero fill (BLAS semantics, which ATen keeps).
void gemm_atb(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const double beta = accumulate ? 1.0 : 0.0;
  if (a.scalar_type() == out.scalar_type()) {
    out.addmm_(a.t(), b, beta);
  } else {
    at::addmm_out(out, out, a.t(), b, out.scalar_type(), beta);
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

// The gradient's per-row factor of the probabilities, and what dz and dk are multiplied by at the
// end (undefined: nothing). With operands in the accumulation dtype the factor is w·scale. With
// 16-bit operands the probabilities are rounded to them, so the factor is w / max|w| (in [−1, 1]:
// a float16 product of a tiny weight and a small probability would underflow) and max|w|·scale,
// a device scalar (no sync), multiplies the results.
std::pair<at::Tensor, at::Tensor> row_factor(const Problem& p, const at::Tensor& weights) {
  const at::Tensor w = weights.to(p.acc);
  if (p.z.scalar_type() == p.acc) return {w * p.scale, at::Tensor()};
  at::Tensor w_max = w.numel() > 0 ? w.abs().amax() : at::ones({}, w.options());
  w_max = at::where(w_max > 0, w_max, at::ones_like(w_max));
  return {w / w_max, w_max * p.scale};
}

// The panels of one phase: (offset, count) over [0, extent), `panel` each (0: one panel). With
// `halves`, the last `halves` panels' rows go in half panels: a phase ends with its last panel,
// so the threads that ran out of work wait for half a panel where they would wait for a whole.
using Cuts = std::vector<std::pair<int64_t, int64_t>>;

Cuts cut(int64_t extent, int64_t panel, int64_t halves) {
  if (panel <= 0) panel = std::max<int64_t>(extent, 1);
  const int64_t halves_from = std::max<int64_t>(0, extent - halves * panel);
  Cuts cuts;
  for (int64_t offset = 0; offset < extent;) {
    const int64_t size = std::min(
        offset < halves_from ? panel : std::max<int64_t>(1, panel / 2), extent - offset);
    cuts.emplace_back(offset, size);
    offset += size;
  }
  return cuts;
}

// Runs the tasks of `phases` (phase k has phases[k] tasks; task(k, i)), phase by phase: every
// task of phase k after every task of phase k − 1.
//
// `shared`: the CPU's threads pull the tasks of all phases from one counter in one parallel
// region, so a thread slowed by another process on its core takes fewer of them, where a static
// split waits for it at every barrier. A thread that pulls a task of the next phase before the
// current one is done sleeps until it is (a futex, where OpenMP's barriers spin: a spinning
// thread takes the core from the one it waits for whenever the two share it). Tasks are pulled in
// order, so the earliest unfinished task never waits: no deadlock, with any number of threads
// that OpenMP grants. Inside the region ATen and MKL run each task's ops on its own thread.
// Otherwise the tasks run in order on the calling thread, their ops using every thread.
template <typename Task>
void run_phases(const std::vector<int64_t>& phases, bool shared, const Task& task) {
  if (!shared) {
    for (size_t k = 0; k < phases.size(); ++k) {
      for (int64_t i = 0; i < phases[k]; ++i) task(k, i);
    }
    return;
  }
  const size_t count = phases.size();
  std::vector<int64_t> first(count + 1, 0);  // the global index of each phase's first task
  for (size_t k = 0; k < count; ++k) first[k + 1] = first[k] + phases[k];
  const std::unique_ptr<std::atomic<int64_t>[]> finished(new std::atomic<int64_t>[count]);
  for (size_t k = 0; k < count; ++k) finished[k].store(0);
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::atomic_flag error_set = ATOMIC_FLAG_INIT;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    size_t k = 0, ready = 0;  // this task's phase; the phases before `ready` are done
    for (int64_t t = next++; t < first[count]; t = next++) {
      while (t >= first[k + 1]) ++k;
      for (; ready < k; ++ready) {
        for (int64_t done = finished[ready].load(); done < phases[ready];
             done = finished[ready].load()) {
          finished[ready].wait(done);
        }
      }
      if (!failed.load()) {
        try {
          task(k, t - first[k]);
        } catch (...) {
          if (!error_set.test_and_set()) error = std::current_exception();
          failed.store(true);
        }
      }
      if (failed.load()) {
        // Wake every waiter: the remaining tasks are skipped.
        for (size_t j = 0; j < count; ++j) {
          finished[j].store(phases[j]);
          finished[j].notify_all();
        }
      } else if (finished[k].fetch_add(1) + 1 == phases[k]) {
        finished[k].notify_all();
      }
    }
  });
  if (error) std::rethrow_exception(error);
}

// One pass over every row block. `weights` defined: also the gradient of Σ_i w_i·lse_i, or with
// `positive_sum` defined that of Σ_i w_i·L_i (tiled_lse.h). Per block, the row phase gives each
// panel of anchor rows its scores, epilogue and dz rows; the column phase (with gradients) then
// gives each panel of dk rows its share Gᵀ·Z_b, and the next block's row phase reuses the
// workspace. Each output element has one writer, and its sums run in a fixed order: the result
// does not depend on which thread ran which panel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const Problem& p, Epilogue epilogue,
                                                   at::Tensor lse, bool compute_lse,
                                                   const at::Tensor& weights,
                                                   const at::Tensor& positive_sum,
                                                   int64_t block_rows) {
  const int64_t n = p.z.size(0), m = p.k.size(0);
  const bool gradient = weights.defined();
  block_rows = std::max<int64_t>(1, std::min(block_rows, n));
  Workspace ws = make_workspace(p, block_rows, gradient);
  at::Tensor dz, dk, post, factor;
  if (gradient) {
    dz = at::empty({n, p.z.size(1)}, p.z.options().dtype(p.acc));
    dk = n > 0 ? at::empty({m, p.k.size(1)}, p.k.options().dtype(p.acc))
               : at::zeros({m, p.k.size(1)}, p.k.options().dtype(p.acc));
    std::tie(factor, post) = row_factor(p, weights);
  }

  // How the phases are cut. Shared by the CPU's threads when every row phase has a panel per
  // thread or more; half panels where a phase has two per thread or more (fewer: they would be a
  // large share of the rows, each GEMM repacking all of K). A single CPU thread runs the row
  // panels in order, which keeps each one in cache from its GEMM to its last use; otherwise
  // (the GPU, or too few panels) a phase is one task.
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t last_rows = n - (std::max<int64_t>(n - 1, 0) / block_rows) * block_rows;
  const bool shared = p.panel > 0 && threads > 1 && last_rows >= threads * p.panel;
  auto cuts_of = [&](int64_t extent, bool rows) {
    if (!shared) return cut(extent, rows && threads == 1 ? p.panel : 0, 0);
    const int64_t panels = (extent + p.panel - 1) / p.panel;
    return cut(extent, p.panel, panels >= 2 * threads ? threads : 0);
  };
  struct Phase {
    int64_t r0, rows;
    bool columns;  // the column phase of block r0
    Cuts cuts;
  };
  std::vector<Phase> phases;
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(n, r0 + block_rows) - r0;
    phases.push_back({r0, rows, false, cuts_of(rows, true)});
    if (gradient) phases.push_back({r0, rows, true, cuts_of(m, false)});
  }
  std::vector<int64_t> sizes;
  for (const Phase& phase : phases) sizes.push_back(static_cast<int64_t>(phase.cuts.size()));

  run_phases(sizes, shared, [&](size_t k, int64_t i) {
    const Phase& phase = phases[k];
    const auto [offset, count] = phase.cuts[i];
    if (phase.columns) {
      // dk rows += G[:, cols]ᵀ·Z_b, the blocks in order.
      at::Tensor dk_rows = dk.narrow(0, offset, count);
      gemm_atb(dk_rows, ws.probabilities.narrow(0, 0, phase.rows).narrow(1, offset, count),
               p.z.narrow(0, phase.r0, phase.rows), /*accumulate=*/phase.r0 > 0);
      return;
    }
    // Scores S = Z_p·Kᵀ, the epilogue, and (the row factor is in G) dz rows = G·K.
    Block block;
    block.r0 = phase.r0 + offset;
    block.compute_lse = compute_lse;
    block.scores = ws.scores.narrow(0, offset, count);
    block.lse = lse.narrow(0, block.r0, count);
    block.row_factor = factor;
    if (gradient) block.probabilities = ws.probabilities.narrow(0, offset, count);
    if (positive_sum.defined()) block.positive_sum = positive_sum.narrow(0, block.r0, count);
    gemm_abt(block.scores, p.z.narrow(0, block.r0, count), p.k);
    epilogue(p, block);
    if (!gradient) return;
    at::Tensor dz_rows = dz.narrow(0, block.r0, count);
    gemm_ab(dz_rows, block.probabilities, p.k);
  });
  if (post.defined()) {
    dz.mul_(post);
    dk.mul_(post);
  }
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
  return std::get<0>(
      run(p, epilogue, lse, /*compute_lse=*/true, at::Tensor(), at::Tensor(), block_rows));
}

std::tuple<at::Tensor, at::Tensor> backward(const Problem& p, Epilogue epilogue,
                                            const at::Tensor& lse, const at::Tensor& weights,
                                            int64_t block_rows) {
  auto result = run(p, epilogue, lse.to(p.acc).contiguous(), /*compute_lse=*/false, weights,
                    at::Tensor(), block_rows);
  return {std::get<1>(result), std::get<2>(result)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_forward_backward(
    const Problem& p, Epilogue epilogue, const at::Tensor& weights, int64_t block_rows) {
  at::Tensor lse = at::empty({p.z.size(0)}, p.z.options().dtype(p.acc));
  at::Tensor positive_sum = at::empty({p.z.size(0)}, p.z.options().dtype(p.acc));
  auto [lse_out, dz, dk] =
      run(p, epilogue, lse, /*compute_lse=*/true, weights, positive_sum, block_rows);
  return {lse_out, positive_sum, dz, dk};
}

}  // namespace rcl_kernels::tiled
