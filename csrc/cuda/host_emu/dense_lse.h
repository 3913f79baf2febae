// The op as a dense double formula (csrc/ops.cpp), for the host-emulation tests: lse, dz and dk
// of given inputs (already rounded to the kernel's input dtype), every step in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace dense_lse {

struct Result {
  std::vector<double> lse, dz, dk;
};

template <typename T, typename Acc>
Result compute(int64_t n, int64_t m, int64_t d, int64_t self_offset, double scale,
               const std::vector<T>& z, const std::vector<T>& k, const std::vector<int64_t>& rl,
               const std::vector<int64_t>& cl, const std::vector<Acc>& rb,
               const std::vector<Acc>& cb, const std::vector<Acc>& g) {
  const double ninf = -std::numeric_limits<double>::infinity();
  Result out{std::vector<double>(size_t(n)), std::vector<double>(size_t(n * d), 0.0),
             std::vector<double>(size_t(m * d), 0.0)};
  std::vector<double> t(static_cast<size_t>(m));
  for (int64_t i = 0; i < n; ++i) {
    double mx = ninf;
    bool nan = false;
    for (int64_t j = 0; j < m; ++j) {
      double dot = 0;
      for (int64_t e = 0; e < d; ++e) dot += double(z[i * d + e]) * double(k[j * d + e]);
      t[j] = scale * dot + (cl[j] == rl[i] ? double(rb[i]) : double(cb[j]));
      if (j == i + self_offset) t[j] = ninf;
      if (std::isnan(t[j])) nan = true;
      else mx = std::max(mx, t[j]);
    }
    double lse;
    if (nan) lse = std::numeric_limits<double>::quiet_NaN();
    else if (mx == ninf) lse = ninf;
    else {
      double s = 0;
      for (int64_t j = 0; j < m; ++j) s += std::exp(t[j] - mx);
      lse = mx + std::log(s);
    }
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
