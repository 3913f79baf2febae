// Runs every kernel path of wmma_lse_kernels.cu on the host under cuda_host_emu.h (threads for a
// block; wmma emulated with its documented semantics) and compares lse, dz, dk with a dense double
// formula of the op on the same (rounded) inputs. Checks tiling, masking, split/merge, operand
// layouts and output indexing. Not covered: the hardware (fragment register layouts, real
// shared-memory/alignment faults, timing) — tests/test_cuda_wmma.py on a GPU.
//
//   g++ -std=c++20 -O2 -pthread -I<cuda>/include -Icsrc csrc/cuda/host_emu/wmma_lse_test.cpp
#define RCL_HOST_EMULATION 1
#include "cuda/host_emu/cuda_host_emu.h"
// The kernels, compiled as host code.
#include "cuda/wmma_lse_kernels.cu"

#include <array>
#include <cstdio>
#include <random>
#include <set>

#include "cuda/host_emu/dense_lse.h"

namespace {

struct Case {
  int64_t n, m, d, self_offset;
  double scale;
  bool nan_feature;  // a NaN in z[n/2]
};

const char* name(rcl_cuda::ElemType t, bool tf32) {
  switch (t) {
    case rcl_cuda::ElemType::kFloat64: return "fp64";
    case rcl_cuda::ElemType::kBFloat16: return "bf16";
    case rcl_cuda::ElemType::kFloat16: return "fp16";
    default: return tf32 ? "tf32" : "fp32";
  }
}

template <typename T, typename Acc = T>
bool run(const Case& c, rcl_cuda::ElemType type, bool tf32, double tol_lse, double tol_grad,
         std::mt19937_64& rng) {
  const auto in = dense_lse::random_inputs<T, Acc>(c.n, c.m, c.d, c.self_offset, c.scale,
                                                   c.nan_feature, rng);
  const rcl_cuda::LseProblem p = in.problem(type, tf32);
  const auto ref = dense_lse::compute(in);
  Acc gmax = 0;
  for (auto v : in.g) gmax = std::max(gmax, std::abs(v));

  // The caller's split counts: one, several (uneven last split), more than there are tiles
  // (clamped). Requests that clamp to a plan already run are skipped.
  bool ok = true;
  std::set<std::array<int, 3>> seen;
  for (const int64_t splits : {int64_t(1), int64_t(3), int64_t(1000)}) {
    const auto fplan = rcl_cuda::plan_forward(p, splits);
    const auto bplan = rcl_cuda::plan_backward(p, splits, splits);
    if (!seen.insert({fplan.cols.count, bplan.row_pass.count, bplan.col_pass.count}).second)
      continue;
    std::vector<Acc> lse(c.n, Acc(std::nanf("")));
    std::vector<Acc> dz(c.n * c.d, Acc(std::nanf(""))), dk(c.m * c.d, Acc(std::nanf("")));
    std::vector<char> fws(fplan.workspace_bytes, char(0x7f));
    if (rcl_cuda::launch_forward(p, fplan, lse.data(), fws.data(), nullptr) != cudaSuccess) {
      std::printf("launch_forward failed\n");
      return false;
    }
    std::vector<char> zws(bplan.dz_workspace_bytes, char(0x7f));
    std::vector<char> kws(bplan.dk_workspace_bytes, char(0x7f));
    if (rcl_cuda::launch_backward(p, bplan, in.g.data(), &gmax, lse.data(), dz.data(), dk.data(),
                                  zws.data(), kws.data(), nullptr) != cudaSuccess) {
      std::printf("launch_backward failed\n");
      return false;
    }
    const double e_lse = dense_lse::rel_err(lse.data(), ref.lse);
    const double e_dz = dense_lse::rel_err(dz.data(), ref.dz);
    const double e_dk = dense_lse::rel_err(dk.data(), ref.dk);
    const bool good = e_lse >= 0 && e_dz >= 0 && e_dk >= 0 && e_lse <= tol_lse &&
                      e_dz <= tol_grad && e_dk <= tol_grad;
    std::printf("%s %-7s n=%-4lld m=%-4lld d=%-4lld off=%-3lld nan=%d  asked %-4lld splits fwd %d "
                "dz %d dk %d  err lse %.2e dz %.2e dk %.2e\n",
                good ? "ok  " : "FAIL", name(type, tf32), (long long)c.n, (long long)c.m,
                (long long)c.d, (long long)c.self_offset, int(c.nan_feature), (long long)splits,
                fplan.cols.count, bplan.row_pass.count, bplan.col_pass.count, e_lse, e_dz, e_dk);
    ok &= good;
  }
  return ok;
}

// The plan alone (no launch, no data): clamping, tile-aligned split lengths, workspace sizes.
bool check_plans() {
  struct Expect {
    rcl_cuda::ElemType type;
    int64_t n, m, d, asked;
    int splits;          // forward column splits = row-pass splits (both cut the columns)
    int64_t per_split;   // column tiles per split
    int col_pass_splits; // dk: row splits
  };
  using rcl_cuda::ElemType;
  const Expect cases[] = {
      // fp32: 64-column tiles. m = 700 is 11 tiles: 3 splits of 4 (the last holds 3).
      {ElemType::kFloat32, 17, 700, 20, 3, 3, 4, 1},
      // 7 splits of 11 tiles would round to 2 tiles each, leaving the 7th empty: 6 run.
      {ElemType::kFloat32, 17, 700, 20, 7, 6, 2, 1},
      // More than there are tiles: one tile per split; dk has 1 row tile (n = 17).
      {ElemType::kFloat32, 17, 700, 20, 1000, 11, 1, 1},
      // fp64: 32-row / 32-column tiles, so the same m is 22 tiles; n = 700 is 22 row tiles.
      {ElemType::kFloat64, 700, 700, 20, 7, 6, 4, 6},
      // The grid's y/z limit: 70000 tiles in at most 65535 splits -> 2 tiles each, 35000 splits.
      {ElemType::kBFloat16, 1, 64 * 70000, 8, 100000, 35000, 2, 1},
      // Nothing to split.
      {ElemType::kFloat16, 5, 0, 8, 9, 1, 1, 1},
  };
  bool ok = true;
  for (const Expect& e : cases) {
    rcl_cuda::LseProblem p;
    p.n = e.n;
    p.m = e.m;
    p.d = e.d;
    p.type = e.type;
    const auto f = rcl_cuda::plan_forward(p, e.asked);
    const auto b = rcl_cuda::plan_backward(p, e.asked, e.asked);
    const size_t acc = e.type == ElemType::kFloat64 ? 8 : 4;
    const size_t f_ws = e.splits > 1 ? 2 * size_t(e.splits) * size_t(e.n) * acc : 0;
    const size_t dz_ws = e.splits > 1 ? size_t(e.splits) * size_t(e.n * e.d) * acc : 0;
    const size_t dk_ws = e.col_pass_splits > 1 ? size_t(e.col_pass_splits) * size_t(e.m * e.d) * acc : 0;
    const bool good = f.cols.count == e.splits && f.cols.tiles_per_split == e.per_split &&
                      b.row_pass.count == e.splits && b.row_pass.tiles_per_split == e.per_split &&
                      b.col_pass.count == e.col_pass_splits && f.workspace_bytes == f_ws &&
                      b.dz_workspace_bytes == dz_ws && b.dk_workspace_bytes == dk_ws;
    std::printf("%s plan n=%lld m=%lld asked %lld: fwd %d x %lld tiles, dz %d, dk %d, workspaces "
                "%zu %zu %zu B\n",
                good ? "ok  " : "FAIL", (long long)e.n, (long long)e.m, (long long)e.asked,
                f.cols.count, (long long)f.cols.tiles_per_split, b.row_pass.count,
                b.col_pass.count, f.workspace_bytes, b.dz_workspace_bytes, b.dk_workspace_bytes);
    ok &= good;
  }
  return ok;
}

}  // namespace

int main() {
  std::mt19937_64 rng(dense_lse::printed_seed());
  const Case cases[] = {
      {1, 1, 20, 0, 10.0, false},     // only column masked: lse = -inf, zero gradients
      {3, 5, 20, 0, 10.0, false},     {17, 40, 130, 0, 10.0, false},
      {70, 65, 33, 0, 10.0, false},   // tile edges
      {17, 700, 20, 3, 10.0, false},  // M >> N: column splits in forward and the row pass
      {20, 200, 130, 0, 10.0, false},  // split partials of several d chunks (d > 128)
      {700, 17, 20, 5, 10.0, false},  // N >> M: row splits in the column pass
      {40, 50, 130, -7, 1000.0, false},  // huge logits
      {33, 90, 40, 0, 10.0, true},       // NaN feature
      {5, 0, 8, 0, 10.0, false},         // no columns
      {0, 9, 8, 0, 10.0, false},         // no rows
  };
  bool ok = check_plans();
  for (const Case& c : cases) {
    ok &= run<float>(c, rcl_cuda::ElemType::kFloat32, false, 2e-5, 2e-5, rng);
    ok &= run<double>(c, rcl_cuda::ElemType::kFloat64, false, 1e-12, 1e-12, rng);
    // 16-bit P and TF32 operands: rounding of 2^-9 .. 2^-11 per element; index bugs are O(1).
    ok &= run<float>(c, rcl_cuda::ElemType::kFloat32, true, 1e-2, 2e-2, rng);
    ok &= run<__nv_bfloat16, float>(c, rcl_cuda::ElemType::kBFloat16, false, 1e-5, 2e-2, rng);
    ok &= run<__half, float>(c, rcl_cuda::ElemType::kFloat16, false, 1e-5, 5e-3, rng);
  }
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
