// Runs every dtype path of mma_lse_kernels.cu on the host under mma_host_emu.h (fibers for the
// threads; mma.sync, ldmatrix, cp.async and shuffles with the PTX ISA's per-lane semantics) and
// compares lse, dz and dk with a dense double formula of the op on the same (rounded) inputs.
// A wrong lane → element mapping, operand order, pipeline stage, mask, split or semaphore order
// shows up as an O(1) error, a NaN (shared memory starts as NaN bytes and outputs are pre-filled
// with NaN), an emulator assert, or results that change with the block interleaving. Not
// covered: timing, the hardware's own scheduling, memory-model subtleties beyond the ordering the
// emulator enforces — tests/test_cuda_mma.py on a GPU.
//
//   make check-cuda   (or: nvcc -std=c++20 -O2 -Icsrc csrc/cuda/host_emu/mma_lse_test.cpp)
#define RCL_HOST_EMULATION 1
#include "cuda/host_emu/mma_host_emu.h"
// The kernels, compiled as host code.
#include "cuda/mma_lse_kernels.cu"

#include <array>
#include <chrono>
#include <cstdio>
#include <limits>
#include <random>
#include <set>
#include <string>

#include "cuda/host_emu/dense_lse.h"

namespace {

using rcl_cuda::ElemType;

struct Case {
  int64_t n, m, d, self_offset;
  double scale;
  bool nan_feature;  // a NaN in z[n/2]
  const char* what;
};

// An output buffer pre-filled with NaN between guard zones that must stay untouched.
template <typename T>
struct Guarded {
  static constexpr size_t kGuard = 64;
  static constexpr double kSentinel = 1234.5;
  std::vector<T> buf;
  explicit Guarded(size_t n) : buf(n + 2 * kGuard, T(std::numeric_limits<double>::quiet_NaN())) {
    for (size_t i = 0; i < kGuard; ++i) buf[i] = buf[buf.size() - 1 - i] = T(kSentinel);
  }
  T* data() { return buf.data() + kGuard; }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (double(buf[i]) != kSentinel || double(buf[buf.size() - 1 - i]) != kSentinel) return false;
    return true;
  }
};

template <typename Acc>
struct Outputs {
  Guarded<Acc> lse, dz, dk;
  bool launched = false;
  Outputs(int64_t n, int64_t m, int64_t d) : lse(size_t(n)), dz(size_t(n * d)), dk(size_t(m * d)) {}
  bool same_bits(Outputs& o) {
    return lse.buf.size() == o.lse.buf.size() &&
           std::memcmp(lse.buf.data(), o.lse.buf.data(), lse.buf.size() * sizeof(Acc)) == 0 &&
           std::memcmp(dz.buf.data(), o.dz.buf.data(), dz.buf.size() * sizeof(Acc)) == 0 &&
           std::memcmp(dk.buf.data(), o.dk.buf.data(), dk.buf.size() * sizeof(Acc)) == 0;
  }
};

const char* name(ElemType t, bool tf32) {
  switch (t) {
    case ElemType::kFloat64: return "fp64";
    case ElemType::kBFloat16: return "bf16";
    case ElemType::kFloat16: return "fp16";
    default: return tf32 ? "tf32" : "3xtf32";
  }
}

// Forward, then backward on the forward's lse, with `resident` blocks running interleaved.
template <typename Acc>
void launch_both(const rcl_cuda::LseProblem& p, const rcl_cuda::MmaForwardPlan& fplan,
                 const rcl_cuda::MmaBackwardPlan& bplan, const Acc* g, const Acc* gmax,
                 int resident, Outputs<Acc>& out) {
  emu::resident_blocks = resident;
  // Workspaces start as garbage: the launchers zero what they rely on.
  std::vector<double> fws(fplan.workspace_bytes / 8 + 2, 1e300), bws(bplan.workspace_bytes / 8 + 2, 1e300);
  emu::register_global(out.lse.data(), size_t(p.n) * sizeof(Acc));  // read back by the backward
  RCL_EMU_CHECK(rcl_cuda::launch_mma_forward(p, fplan, out.lse.data(), fws.data(), nullptr) ==
                    cudaSuccess, "launch_mma_forward failed");
  RCL_EMU_CHECK(rcl_cuda::launch_mma_backward(p, bplan, g, gmax, out.lse.data(), out.dz.data(),
                                              out.dk.data(), bws.data(), nullptr) == cudaSuccess,
                "launch_mma_backward failed");
  emu::globals.pop_back();
  out.launched = true;
}

template <typename T, typename Acc = T>
bool run(const Case& c, ElemType type, bool tf32, double tol_lse, double tol_grad,
         std::mt19937_64& rng) {
  const auto in = dense_lse::random_inputs<T, Acc>(c.n, c.m, c.d, c.self_offset, c.scale,
                                                   c.nan_feature, rng);
  const auto &z = in.z, &k = in.k;
  const auto &rl = in.rl, &cl = in.cl;
  const auto &rb = in.rb, &cb = in.cb, &g = in.g;
  const rcl_cuda::LseProblem p = in.problem(type, tf32);

  emu::clear_globals();
  emu::register_global(z.data(), z.size() * sizeof(T));
  emu::register_global(k.data(), k.size() * sizeof(T));
  emu::register_global(rl.data(), rl.size() * sizeof(int64_t));
  emu::register_global(cl.data(), cl.size() * sizeof(int64_t));
  emu::register_global(rb.data(), rb.size() * sizeof(Acc));
  emu::register_global(cb.data(), cb.size() * sizeof(Acc));
  emu::register_global(g.data(), g.size() * sizeof(Acc));

  const auto ref = dense_lse::compute(in);
  // The binding hands max|g| to the 16-bit paths only.
  Acc gmax = 0;
  for (auto v : g) gmax = std::max(gmax, std::abs(v));
  const bool half = type == ElemType::kBFloat16 || type == ElemType::kFloat16;

  // The caller's split counts: one, several (uneven last split), more than there are tiles
  // (clamped). Requests that clamp to a plan already run are skipped. Each plan runs with three
  // blocks interleaved, and the first plan with more than one block again one block at a time
  // (other cp.async timings too): the results must be the same bits.
  bool ok = true, compared = false;
  std::set<std::array<int, 2>> seen;
  for (const int64_t splits : {int64_t(1), int64_t(3), int64_t(1000)}) {
    const auto fplan = rcl_cuda::plan_mma_forward(p, splits);
    const auto bplan = rcl_cuda::plan_mma_backward(p, splits);
    if (!seen.insert({fplan.splits, bplan.splits}).second) continue;
    const auto t0 = std::chrono::steady_clock::now();
    Outputs<Acc> out(c.n, c.m, c.d);
    launch_both(p, fplan, bplan, g.data(), half ? &gmax : nullptr, 3, out);
    const double e_lse = dense_lse::rel_err(out.lse.data(), ref.lse);
    const double e_dz = dense_lse::rel_err(out.dz.data(), ref.dz);
    const double e_dk = dense_lse::rel_err(out.dk.data(), ref.dk);
    const bool guards = out.lse.guards_intact() && out.dz.guards_intact() && out.dk.guards_intact();
    bool same = true;
    const int64_t blocks = fplan.row_tiles * fplan.splits + bplan.col_tiles * bplan.d_chunks * bplan.splits;
    if (!compared && blocks > 2) {
      Outputs<Acc> again(c.n, c.m, c.d);
      launch_both(p, fplan, bplan, g.data(), half ? &gmax : nullptr, 1, again);
      same = out.same_bits(again);
      compared = true;
    }
    // A logit of magnitude up to scale·log2(e) (base 2) in Acc carries half an ulp of rounding,
    // twice (the logit and lse·log2 e), and exp2 turns it into that relative error of p.
    const double tol_g = tol_grad + 4 * c.scale * std::numeric_limits<Acc>::epsilon();
    const bool good = e_lse >= 0 && e_dz >= 0 && e_dk >= 0 && e_lse <= tol_lse && e_dz <= tol_g &&
                      e_dk <= tol_g && guards && same;
    std::printf("%s %-6s n=%-4lld m=%-4lld d=%-5lld off=%-3lld  asked %-4lld splits fwd %d bwd %d"
                "  err lse %.2e dz %.2e dk %.2e%s%s  (%s; %.1f s)\n",
                good ? "ok  " : "FAIL", name(type, tf32), (long long)c.n, (long long)c.m,
                (long long)c.d, (long long)c.self_offset, (long long)splits, fplan.splits,
                bplan.splits, e_lse, e_dz, e_dk, guards ? "" : "  WROTE OUTSIDE ITS OUTPUT",
                same ? "" : "  DIFFERS FROM THE ONE-BLOCK-AT-A-TIME RUN", c.what,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::fflush(stdout);
    ok &= good;
  }
  emu::clear_globals();
  return ok;
}

// The plans alone (no launch): tiles, clamping, tile-aligned split lengths, the grid limits, the
// workspace sizes.
bool check_plans() {
  bool ok = true;
  auto expect = [&](bool cond, const std::string& what) {
    std::printf("%s plan: %s\n", cond ? "ok  " : "FAIL", what.c_str());
    ok &= cond;
  };
  const auto t16 = rcl_cuda::mma_tiles(ElemType::kBFloat16, false);
  const auto t32 = rcl_cuda::mma_tiles(ElemType::kFloat32, true);
  const auto t3x = rcl_cuda::mma_tiles(ElemType::kFloat32, false);
  const auto t64 = rcl_cuda::mma_tiles(ElemType::kFloat64, false);
  expect(t16.fwd_rows == 128 && t16.fwd_cols == 64 && t16.bwd_cols == 128 && t16.bwd_rows == 64 &&
             t16.d_chunk == 128 && t16.threads == 256,
         "bf16 tiles: forward 128 rows x 64 columns, backward 128 columns x 64 rows, d chunk 128");
  expect(t32.fwd_rows == 128 && t32.bwd_cols == 128 && t32.bwd_rows == 64 && t32.d_chunk == 64 &&
             t3x.d_chunk == 64,
         "tf32 / 3xtf32 tiles: d chunk 64");
  expect(t64.fwd_rows == 64 && t64.fwd_cols == 64 && t64.bwd_cols == 64 && t64.bwd_rows == 32 &&
             t64.d_chunk == 32 && t64.threads == 128,
         "fp64 tiles: forward 64 x 64, backward 64 columns x 32 rows, d chunk 32, 128 threads");

  rcl_cuda::LseProblem p;
  p.type = ElemType::kBFloat16;
  p.n = 17;
  p.m = 700;  // 11 column tiles of 64
  p.d = 20;
  auto f = rcl_cuda::plan_mma_forward(p, 3);
  expect(f.row_tiles == 1 && f.splits == 3 && f.tiles_per_split == 4 &&
             f.workspace_bytes == 2 * 17 * 4 + 8 /* to 16 */ + 16,
         "forward 11 column tiles asked in 3 splits: 3 x 4 tiles; (max, sum) and 2 ints");
  f = rcl_cuda::plan_mma_forward(p, 7);
  expect(f.splits == 6 && f.tiles_per_split == 2, "7 splits of 11 tiles run as 6 of 2");
  f = rcl_cuda::plan_mma_forward(p, 1000);
  expect(f.splits == 11 && f.tiles_per_split == 1, "more splits than tiles: one tile each");
  f = rcl_cuda::plan_mma_forward(p, 1);
  expect(f.splits == 1 && f.workspace_bytes == 0, "one split needs no workspace");

  p.n = 700;  // 11 row tiles of 64 in the backward
  p.m = 300;  // 3 column tiles of 128
  p.d = 130;  // 2 d chunks of 128
  auto b = rcl_cuda::plan_mma_backward(p, 7);
  expect(b.col_tiles == 3 && b.d_chunks == 2 && b.row_tiles == 11 && b.splits == 6 &&
             b.tiles_per_split == 2 && b.workspace_bytes == 4 * ((11 + 3) * 2 + 1) + 12,
         "backward: 11 row tiles in 7 splits run as 6 of 2; one int per (row tile, chunk) and "
         "(column tile, chunk) and the counter");
  b = rcl_cuda::plan_mma_backward(p, 1);
  expect(b.splits == 1 && b.tiles_per_split == 11, "backward, one split: every row tile");

  p.type = ElemType::kFloat64;  // 32-row tiles: 22 of them
  b = rcl_cuda::plan_mma_backward(p, 7);
  expect(b.row_tiles == 22 && b.splits == 6 && b.tiles_per_split == 4 && b.col_tiles == 5 &&
             b.d_chunks == 5,
         "fp64 backward: 22 row tiles in 7 splits run as 6 of 4; 5 column tiles, 5 d chunks");

  p.type = ElemType::kBFloat16;  // 65535 splits at most: 70000 tiles -> 35000 splits of 2
  p.n = 1;
  p.m = 64 * 70000;
  p.d = 8;
  f = rcl_cuda::plan_mma_forward(p, 100000);
  expect(f.splits == 35000 && f.tiles_per_split == 2, "forward: at most 65535 splits");

  p.n = 64 * 70000;  // the grid below 2^31 blocks: 20000 x 8 blocks per split
  p.m = 128 * 20000;
  p.d = 128 * 8;
  b = rcl_cuda::plan_mma_backward(p, 100000);
  expect(b.splits == 11667 && b.tiles_per_split == 6 &&
             int64_t(b.splits) * b.col_tiles * b.d_chunks <= INT_MAX,
         "backward: splits capped so that the grid stays below 2^31 blocks");

  p.m = 0;
  f = rcl_cuda::plan_mma_forward(p, 9);
  b = rcl_cuda::plan_mma_backward(p, 9);
  expect(f.splits == 1 && b.col_tiles == 0 && b.workspace_bytes == 0, "no columns: nothing to split");
  return ok;
}

}  // namespace

int main() {
  const unsigned seed = dense_lse::printed_seed();
  std::mt19937_64 rng(seed);
  emu::rng.seed(seed);
  const Case cases[] = {
      {1, 1, 20, 0, 10.0, false, "the only column is masked: lse = -inf, zero gradients"},
      {3, 5, 20, 0, 10.0, false, "tiny"},
      {17, 40, 130, 0, 10.0, false, "d tail; cp.async of 4 (16-bit), 8 (fp32), 16 (fp64) bytes"},
      {70, 65, 33, 0, 10.0, false, "odd d (16-bit: plain copies); tiles past the edges"},
      {17, 700, 20, 3, 10.0, false, "M >> N: forward column splits"},
      {200, 150, 72, 0, 10.0, false, "several row and column tiles: ordered dz additions"},
      {700, 17, 20, 5, 10.0, false, "N >> M: backward row splits"},
      {40, 50, 130, -7, 1000.0, false, "huge logits"},
      {33, 90, 40, 0, 10.0, true, "NaN feature"},
      {20, 30, 256, 0, 10.0, false, "2 d chunks resident (16-bit)"},
      {20, 30, 300, 2, 10.0, false, "d chunks streamed with both operands"},
      {4, 6, 0, 0, 10.0, false, "d = 0"},
      {5, 0, 8, 0, 10.0, false, "no columns"},
      {0, 9, 8, 0, 10.0, false, "no rows"},
      {3, 5, 5000, 0, 10.0, false, "d = 5000"},
      {6, 7, 8192, -1, 10.0, false, "d = 8192"},
  };
  bool ok = check_plans();
  for (const Case& c : cases) {
    // 3xTF32 stands for fp32 "highest"; TF32 and 16-bit P round at 2^-9 .. 2^-11 per element,
    // while index bugs are O(1).
    ok &= run<float>(c, ElemType::kFloat32, false, 2e-5, 2e-5, rng);
    ok &= run<double>(c, ElemType::kFloat64, false, 1e-12, 1e-12, rng);
    ok &= run<float>(c, ElemType::kFloat32, true, 1e-2, 2e-2, rng);
    ok &= run<__nv_bfloat16, float>(c, ElemType::kBFloat16, false, 1e-5, 2e-2, rng);
    ok &= run<__half, float>(c, ElemType::kFloat16, false, 1e-5, 5e-3, rng);
  }
  std::printf(ok ? "ALL OK\n" : "FAILURES\n");
  return ok ? 0 : 1;
}
