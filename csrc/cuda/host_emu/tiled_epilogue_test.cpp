// Runs the CUDA epilogue of the tiled algorithm (tiled_epilogue.cu) on the host under
// cuda_host_emu.h and compares lse and the probabilities with a dense double formula on the same
// scores, for every operand dtype, with and without a given lse, with self offsets inside, before
// and past the row, rows whose only column is masked, NaN scores and a NaN scale, probabilities
// scaled by the gradient's row factors, the loss's gradient (positive sums and the positives'
// target subtracted), and several row blocks (r0).
// The hardware itself (warp shuffles, timing) is tests/test_backends.py's business on a GPU.
//
//   g++ -std=c++20 -O2 -pthread -I<cuda>/include -Icsrc csrc/cuda/host_emu/tiled_epilogue_test.cpp
#define RCL_HOST_EMULATION 1
#include "cuda/host_emu/cuda_host_emu.h"
#include "cuda/tiled_epilogue.cu"

#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/host_emu/dense_lse.h"

namespace {

double as_double(float v) { return v; }
double as_double(double v) { return v; }
double as_double(__half v) { return __half2float(v); }
double as_double(__nv_bfloat16 v) { return __bfloat162float(v); }

struct Case {
  int64_t n, m, r0, rows, self_offset;
  double scale;
  bool nan_score;  // a NaN in the scores of the block's first row, column nan_column
  int64_t nan_column = 0;
  bool weighted = false;   // probabilities scaled by row factors
  bool positives = false;  // positive sums and the positives' target (with compute_lse)
};

int failures = 0;

void expect_close(const std::string& what, double got, double want, double tolerance) {
  const bool both_nan = std::isnan(got) && std::isnan(want);
  const bool same_inf = std::isinf(want) && got == want;
  if (both_nan || same_inf || std::abs(got - want) <= tolerance * std::max(1.0, std::abs(want))) return;
  if (++failures <= 20) std::printf("FAIL %s: got %.9g, want %.9g\n", what.c_str(), got, want);
}

template <typename Acc, typename Op>
void run(const Case& c, rcl_cuda::ElemType type, bool compute_lse, const char* name,
         double tolerance) {
  std::mt19937_64 rng(c.n * 1000003 + c.m * 101 + c.r0 + (compute_lse ? 7 : 0));
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int64_t> label(0, 3);
  std::vector<Acc> scores(c.rows * c.m), rb(c.n), cb(c.m);
  std::vector<int64_t> rl(c.n), cl(c.m);
  for (auto& v : scores) v = Acc(normal(rng));
  if (c.nan_score && !scores.empty()) scores[c.nan_column] = std::numeric_limits<Acc>::quiet_NaN();
  std::vector<Acc> factors(c.n);
  for (auto& v : factors) v = Acc(normal(rng));
  if (c.n > 1) factors[1] = Acc(0);
  const bool positives = c.positives && compute_lse;
  for (auto& v : rb) v = Acc(normal(rng));
  for (auto& v : cb) v = Acc(normal(rng));
  for (auto& v : rl) v = label(rng);
  for (auto& v : cl) v = label(rng);
  // The dense formula, row by row.
  const double ninf = -std::numeric_limits<double>::infinity();
  std::vector<double> want_lse(c.rows), want_p(c.rows * c.m), want_positive(c.rows), t(c.m);
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t i = c.r0 + r;
    for (int64_t j = 0; j < c.m; ++j) {
      t[j] = c.scale * double(scores[r * c.m + j]) + (cl[j] == rl[i] ? double(rb[i]) : double(cb[j]));
      if (j == i + c.self_offset) t[j] = ninf;
    }
    const double lse = dense_lse::row_lse(t);
    want_lse[r] = lse;
    const double factor = c.weighted ? double(factors[i]) : 1.0;
    double positive_sum = 0;
    int64_t positive_count = 0;
    for (int64_t j = 0; j < c.m; ++j) {
      if (j != i + c.self_offset && cl[j] == rl[i]) {
        positive_sum += double(scores[r * c.m + j]);
        ++positive_count;
      }
    }
    want_positive[r] = positive_sum;
    for (int64_t j = 0; j < c.m; ++j) {
      const bool positive = positives && j != i + c.self_offset && cl[j] == rl[i];
      const double p = lse == ninf ? 0.0 : std::exp(t[j] - lse);
      want_p[r * c.m + j] = (p - (positive ? 1.0 / double(positive_count) : 0.0)) * factor;
    }
  }
  std::vector<Acc> lse(c.rows);
  if (!compute_lse) for (int64_t r = 0; r < c.rows; ++r) lse[r] = Acc(want_lse[r]);
  std::vector<Op> p(c.rows * c.m);
  std::vector<Acc> positive_sums(c.rows);
  rcl_cuda::TiledEpilogue a;
  a.scores = scores.data();
  a.lse = lse.data();
  a.probabilities = p.data();
  a.row_labels = rl.data();
  a.col_labels = cl.data();
  a.row_bias = rb.data();
  a.col_bias = cb.data();
  if (c.weighted) a.row_factor = factors.data();
  if (positives) a.positive_sum = positive_sums.data();
  a.rows = c.rows;
  a.m = c.m;
  a.r0 = c.r0;
  a.self_offset = c.self_offset;
  a.scale = c.scale;
  a.compute_lse = compute_lse;
  a.type = type;
  if (rcl_cuda::launch_tiled_epilogue(a, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL %s: launch error\n", name);
    return;
  }
  const std::string tag = std::string(name) + " n=" + std::to_string(c.n) + " m=" +
                          std::to_string(c.m) + " r0=" + std::to_string(c.r0) + " self=" +
                          std::to_string(c.self_offset) + (compute_lse ? " lse" : " given-lse");
  for (int64_t r = 0; r < c.rows; ++r) {
    expect_close(tag + " lse[" + std::to_string(r) + "]", double(lse[r]), want_lse[r], tolerance);
    if (positives) {
      expect_close(tag + " positive_sum[" + std::to_string(r) + "]", double(positive_sums[r]),
                   want_positive[r], tolerance);
    }
    for (int64_t j = 0; j < c.m; ++j) {
      expect_close(tag + " p[" + std::to_string(r) + "," + std::to_string(j) + "]",
                   as_double(p[r * c.m + j]), want_p[r * c.m + j], tolerance);
    }
  }
}

}  // namespace

int main() {
  const Case cases[] = {
      {5, 7, 0, 5, 0, 2.0, false},      // self-contrast, fewer columns than threads
      {40, 1000, 13, 9, 0, 5.0, false},  // a later block (r0), columns beyond one pass of threads
      {3, 1, 0, 3, 0, 1.0, false},      // each row's only column is its own: lse = −inf for row 0
      {6, 300, 2, 4, 100, 3.0, false},   // distributed: the self columns start at 100
      {6, 50, 0, 6, -10, 3.0, false},    // no self column in range
      {8, 600, 0, 3, 0, 10.0, true},     // a NaN score on the masked self column: no effect
      {8, 600, 0, 3, 0, 10.0, true, 7},  // a NaN score poisons its row only, wherever it lies
      {4, 600, 0, 4, 0, std::numeric_limits<double>::quiet_NaN(), false},  // NaN scale: all NaN
      {40, 1000, 13, 9, 0, 5.0, false, 0, true},  // probabilities scaled by row factors
      {4, 600, 0, 4, 1, 2.0, true, 700, true},     // the same, a NaN in the second row
      {40, 1000, 13, 9, 0, 5.0, false, 0, true, true},  // the loss's gradient
      {6, 300, 2, 4, 100, 3.0, false, 0, true, true},   // the same, self columns from 100
      {3, 1, 0, 3, 0, 1.0, false, 0, true, true},       // rows without a positive: target 0
      {5, 7, 0, 5, -10, 2.0, false, 0, false, true},    // no self column: all same-label columns
  };
  for (const Case& c : cases) {
    for (bool compute_lse : {true, false}) {
      run<float, float>(c, rcl_cuda::ElemType::kFloat32, compute_lse, "fp32", 2e-5);
      run<double, double>(c, rcl_cuda::ElemType::kFloat64, compute_lse, "fp64", 1e-12);
      run<float, __nv_bfloat16>(c, rcl_cuda::ElemType::kBFloat16, compute_lse, "bf16", 1e-2);
      run<float, __half>(c, rcl_cuda::ElemType::kFloat16, compute_lse, "fp16", 2e-3);
    }
  }
  std::printf("tiled epilogue host emulation: %s (%d failures)\n", failures ? "FAILED" : "ok",
              failures);
  return failures ? 1 : 0;
}
