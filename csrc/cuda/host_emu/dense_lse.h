// Inputs of the op and the op as a dense double formula (csrc/ops.cpp), for the host-emulation
// tests: random inputs already in the kernel's input dtype, and lse, dz, dk of them with every
// step in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "cuda/wmma_lse_kernels.cuh"

namespace dense_lse {

// A fresh random seed, printed first so that a failing run names the seed of its inputs.
inline unsigned printed_seed() {
  const unsigned seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  return seed;
}

template <typename T, typename Acc>
struct Inputs {
  int64_t n, m, d, self_offset;
  double scale;
  std::vector<T> z, k;               // [n, d], [m, d]
  std::vector<int64_t> rl, cl;       // labels [n], [m]
  std::vector<Acc> rb, cb, g;        // row bias [n], column bias [m], grad_lse [n]

  // The kernels' view of these inputs.
  rcl_cuda::LseProblem problem(rcl_cuda::ElemType type, bool allow_tf32) const {
    return rcl_cuda::lse_problem(z.data(), k.data(), rl.data(), cl.data(), rb.data(), cb.data(), n,
                                 m, d, self_offset, scale, type, allow_tf32);
  }
};

// Unit-norm feature rows; when self_offset == 0, columns [0, min(n, m)) are the anchors
// themselves (the self-contrast layout). Labels in 0..4, biases ~ N(0, 0.5²), g ~ N(0, 1);
// nan_feature puts a NaN into z[n / 2].
template <typename T, typename Acc>
Inputs<T, Acc> random_inputs(int64_t n, int64_t m, int64_t d, int64_t self_offset, double scale,
                             bool nan_feature, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int64_t> label(0, 4);
  Inputs<T, Acc> in{n, m, d, self_offset, scale,
                    std::vector<T>(static_cast<size_t>(n * d)), std::vector<T>(static_cast<size_t>(m * d)),
                    std::vector<int64_t>(static_cast<size_t>(n)), std::vector<int64_t>(static_cast<size_t>(m)),
                    std::vector<Acc>(static_cast<size_t>(n)), std::vector<Acc>(static_cast<size_t>(m)),
                    std::vector<Acc>(static_cast<size_t>(n))};
  auto fill_unit = [&](std::vector<T>& x, int64_t rows) {
    std::vector<double> v(static_cast<size_t>(d));
    for (int64_t r = 0; r < rows; ++r) {
      double norm = 0;
      for (auto& e : v) {
        e = normal(rng);
        norm += e * e;
      }
      norm = std::sqrt(norm);
      for (int64_t e = 0; e < d; ++e) x[r * d + e] = T(v[e] / (norm > 0 ? norm : 1));
    }
  };
  fill_unit(in.z, n);
  fill_unit(in.k, m);
  for (int64_t j = 0; j < std::min(n, m) && self_offset == 0; ++j)
    for (int64_t e = 0; e < d; ++e) in.k[j * d + e] = in.z[j * d + e];
  for (auto& x : in.rl) x = label(rng);
  for (auto& x : in.cl) x = label(rng);
  for (auto& x : in.rb) x = Acc(0.5 * normal(rng));
  for (auto& x : in.cb) x = Acc(0.5 * normal(rng));
  for (auto& x : in.g) x = Acc(normal(rng));
  if (nan_feature && n > 0 && d > 0) in.z[static_cast<size_t>((n / 2) * d)] = T(std::nanf(""));
  return in;
}

// log Σ_j exp(t_j) of one row of logits, shifted by their max: NaN if any t_j is NaN, −inf if
// every column is masked (−inf) or there is none.
inline double row_lse(const std::vector<double>& t) {
  const double ninf = -std::numeric_limits<double>::infinity();
  double mx = ninf;
  for (const double v : t) {
    if (std::isnan(v)) return std::numeric_limits<double>::quiet_NaN();
    mx = std::max(mx, v);
  }
  if (mx == ninf) return ninf;
  double s = 0;
  for (const double v : t) s += std::exp(v - mx);
  return mx + std::log(s);
}

struct Result {
  std::vector<double> lse, dz, dk;
};

template <typename T, typename Acc>
Result compute(const Inputs<T, Acc>& in) {
  const int64_t n = in.n, m = in.m, d = in.d, self_offset = in.self_offset;
  const double scale = in.scale;
  const auto &z = in.z, &k = in.k;
  const auto &rl = in.rl, &cl = in.cl;
  const auto &rb = in.rb, &cb = in.cb, &g = in.g;
  const double ninf = -std::numeric_limits<double>::infinity();
  Result out{std::vector<double>(size_t(n)), std::vector<double>(size_t(n * d), 0.0),
             std::vector<double>(size_t(m * d), 0.0)};
  std::vector<double> t(static_cast<size_t>(m));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      double dot = 0;
      for (int64_t e = 0; e < d; ++e) dot += double(z[i * d + e]) * double(k[j * d + e]);
      t[j] = scale * dot + (cl[j] == rl[i] ? double(rb[i]) : double(cb[j]));
      if (j == i + self_offset) t[j] = ninf;
    }
    const double lse = row_lse(t);
    out.lse[i] = lse;
    for (int64_t j = 0; j < m; ++j) {
      const double p = (j == i + self_offset || lse == ninf) ? 0.0 : std::exp(t[j] - lse);
      const double w = scale * double(g[i]) * p;
      for (int64_t e = 0; e < d; ++e) {
        out.dz[i * d + e] += w * double(k[j * d + e]);
        out.dk[j * d + e] += w * double(z[i * d + e]);
      }
    }
  }
  return out;
}

// Relative norm error over the entries where the reference is finite; -1 if the non-finite
// patterns differ.
template <typename V>
double rel_err(const V* got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double v = double(got[i]), r = ref[i];
    if (std::isnan(r) != std::isnan(v) || std::isinf(r) != std::isinf(v)) return -1;
    if (std::isinf(r) && (r > 0) != (v > 0)) return -1;
    if (!std::isfinite(r)) continue;
    num += (v - r) * (v - r);
    den += r * r;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace dense_lse
