// CPU side of the tiled algorithm (csrc/tiled/tiled_lse.h): the problem in the accumulation
// dtype, the epilogue, and the registrations of the tiled ops for CPU tensors.
//
// The epilogue turns each row of scores into logits in place (bias, self mask), then reads the
// row for its max, once more for the exponentials and, for probabilities, once more to normalize
// them (the row is then in L1/L2). It is plain C++ that the compiler vectorizes (the
// exponential: vec_exp.h), compiled three times (AVX-512, AVX2 + FMA, baseline) through target
// attributes and chosen at run time from PyTorch's own CPU capability (ATEN_CPU_CAPABILITY
// overrides it, which the tests use to run every path). It calls no vendor math library: MKL's
// vector exp takes a slow generic path on AMD CPUs, which made the streaming CPU kernel 4.5x slower
// on an EPYC.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <type_traits>

#include "cpu/vec_exp.h"
#include "tiled/tiled_lse.h"

namespace rcl_kernels {
namespace {

// `count` ≤ kWidth elements from p (the rest `fill`), and back.
template <typename V, typename E>
RCL_INLINE V load(const E* p, int64_t count, E fill) {
  constexpr int kWidth = sizeof(V) / sizeof(E);
  if (count == kWidth) return bit_cast<V>(*reinterpret_cast<const E(*)[kWidth]>(p));
  E buffer[kWidth];
  for (int i = 0; i < kWidth; ++i) buffer[i] = i < count ? p[i] : fill;
  return bit_cast<V>(buffer);
}
template <typename V, typename E>
RCL_INLINE void store(E* p, const V& v, int64_t count) {
  if (count == int64_t(sizeof(V) / sizeof(E))) {
    std::memcpy(p, &v, sizeof(V));  // a constant size: one vector store, not a memcpy call
  } else {
    std::memcpy(p, &v, size_t(count) * sizeof(E));
  }
}

// The raw pointers of one block (tiled_lse.h's Block) for the row loop.
template <typename T>
struct Rows {
  int64_t r0;
  T* scores;        // [rows, M]
  T* lse;           // [rows]
  bool compute_lse;
  bool probabilities;
  const T* row_factor;  // [N], or null
  T* positive_sum;      // [rows], or null
};

// Rows [row_begin, row_end) of one block of the epilogue (tiled_lse.h).
template <typename T, int Bytes>
RCL_INLINE void epilogue_rows(const tiled::Problem& p, const Rows<T>& b, int64_t row_begin,
                              int64_t row_end) {
  using L = Lanes<T, Bytes>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t m = p.k.size(0);
  const int32_t* col_labels = p.col_labels.data_ptr<int32_t>();
  const int32_t* row_labels = p.row_labels.data_ptr<int32_t>();
  const T* col_bias = p.col_bias.data_ptr<T>();
  const T* row_bias = p.row_bias.data_ptr<T>();
  const T scale = static_cast<T>(p.scale);
  for (int64_t r = row_begin; r < row_end; ++r) {
    T* t = b.scores + r * m;
    const int64_t i = b.r0 + r;
    const int32_t label = row_labels[i];
    const T same_bias = row_bias[i];
    const int64_t self = i + p.self_offset;
    const bool has_self = self >= 0 && self < m;
    const T factor = b.row_factor != nullptr ? b.row_factor[i] : T(1);
    auto same_class = [&](int64_t c, int64_t count) {
      const auto labels = load<typename L::Labels>(col_labels + c, count, int32_t(-1));
      return __builtin_convertvector(labels == label, typename L::I);
    };
    // t = scale·s + (same class ? row bias : column bias), the self column −inf.
    auto logits = [&](const V& s, const typename L::I& same, int64_t c, int64_t count) {
      return s * scale + (same ? V{} + same_bias : load<V>(col_bias + c, count, T(0)));
    };
    if (!b.compute_lse) {
      // Probabilities from the given lse in one pass; rows with lse = −inf have every logit −inf:
      // shifting by +inf floors them to 0.
      const T given = b.lse[r];
      const T shift = given == kNegInf ? std::numeric_limits<T>::infinity() : given;
      for (int64_t c = 0; c < m; c += W) {
        const int64_t count = std::min<int64_t>(W, m - c);
        const V s = load<V>(t + c, count, T(0));
        const V e = exp_shifted<T, Bytes>(logits(s, same_class(c, count), c, count) - shift);
        store(t + c, flush_tiny<T, Bytes>(e * factor), count);
      }
      if (has_self) t[self] = T(0);
      continue;
    }
    // The positives' score sum and count ride along the logits pass (the self column is taken
    // out after it).
    const bool positives = b.positive_sum != nullptr;
    const bool self_positive = has_self && col_labels[self] == label;
    const T self_score = has_self ? t[self] : T(0);
    V max = V{} + kNegInf, positive_sum{}, positive_count{};
    for (int64_t c = 0; c < m; c += W) {
      const int64_t count = std::min<int64_t>(W, m - c);
      const V s = load<V>(t + c, count, T(0));
      const auto same = same_class(c, count);
      if (positives) {
        positive_sum += same ? s : V{};
        positive_count += same ? V{} + T(1) : V{};
      }
      store(t + c, logits(s, same, c, count), count);
    }
    if (has_self) t[self] = kNegInf;
    for (int64_t c = 0; c < m; c += W) {
      const V v = load<V>(t + c, std::min<int64_t>(W, m - c), kNegInf);
      max = v > max ? v : max;  // a NaN logit is skipped here and poisons the sum below
    }
    T row_max = kNegInf;
    for (int i = 0; i < W; ++i) row_max = max[i] > row_max ? max[i] : row_max;
    const T shift = row_max == kNegInf ? T(0) : row_max;  // a row with no column: e^−inf = 0
    V sum{};
    for (int64_t c = 0; c < m; c += W) {
      const int64_t count = std::min<int64_t>(W, m - c);
      const V e = exp_shifted<T, Bytes>(load<V>(t + c, count, kNegInf) - shift);
      if (b.probabilities) store(t + c, e, count);  // e^(t − max), scaled to p below
      sum += e;
    }
    T row_sum = 0;
    for (int i = 0; i < W; ++i) row_sum += sum[i];
    // A row whose logits are all NaN (a NaN scale or input) keeps max −inf, as NaN compares
    // false, but its sum is NaN: its lse is NaN, as the streaming kernel's, never −inf.
    b.lse[r] = row_max == kNegInf ? (row_sum == row_sum ? kNegInf : row_sum)
                                  : row_max + std::log(row_sum);
    T n_positive = 0, target = 0;
    if (positives) {
      T total = 0;
      for (int i = 0; i < W; ++i) {
        total += positive_sum[i];
        n_positive += positive_count[i];
      }
      if (self_positive) {
        total -= self_score;
        n_positive -= T(1);
      }
      b.positive_sum[r] = total;
      target = n_positive > 0 ? T(1) / n_positive : T(0);
    }
    if (!b.probabilities) continue;
    // p = e^(t − max) / sum (0 for a row without columns), minus the positives' target, times the
    // row factor.
    const T inverse = row_sum > 0 ? T(1) / row_sum : row_sum == row_sum ? T(0) : row_sum;
    for (int64_t c = 0; c < m; c += W) {
      const int64_t count = std::min<int64_t>(W, m - c);
      V value = load<V>(t + c, count, T(0)) * inverse;
      if (positives) value -= same_class(c, count) ? V{} + target : V{};
      store(t + c, flush_tiny<T, Bytes>(value * factor), count);
    }
    if (has_self) t[self] = T(0);  // masked: neither a probability nor a positive
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define RCL_CPU_VARIANTS 1
#define RCL_DEFINE_VARIANT(name, target, bytes)                                                    \
  template <typename T>                                                                            \
  target void name(const tiled::Problem& p, const Rows<T>& b, int64_t begin, int64_t end) {        \
    epilogue_rows<T, bytes>(p, b, begin, end);                                                     \
  }
RCL_DEFINE_VARIANT(rows_avx512, __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))), 64)
RCL_DEFINE_VARIANT(rows_avx2, __attribute__((target("avx2,fma"))), 32)
#undef RCL_DEFINE_VARIANT
#endif

template <typename T>
void rows_baseline(const tiled::Problem& p, const Rows<T>& b, int64_t begin, int64_t end) {
  epilogue_rows<T, 16>(p, b, begin, end);
}

template <typename T>
using RowsFn = void (*)(const tiled::Problem&, const Rows<T>&, int64_t, int64_t);

// The widest variant PyTorch itself uses on this CPU (at::get_cpu_capability honours
// ATEN_CPU_CAPABILITY and checks the CPU's features, whatever its vendor).
template <typename T>
RowsFn<T> rows_for_this_cpu() {
#ifdef RCL_CPU_VARIANTS
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return &rows_avx512<T>;
  if (capability == "AVX2") return &rows_avx2<T>;
#endif
  return &rows_baseline<T>;
}

void cpu_epilogue(const tiled::Problem& p, tiled::Block& block) {
  // On the CPU the operands are in the accumulation dtype, so probabilities alias the scores.
  const bool with_p = block.probabilities.defined();
  TORCH_INTERNAL_ASSERT(!with_p || block.probabilities.data_ptr() == block.scores.data_ptr());
  AT_DISPATCH_FLOATING_TYPES(block.scores.scalar_type(), "tiled_lse_cpu_epilogue", [&] {
    static const RowsFn<scalar_t> rows = rows_for_this_cpu<scalar_t>();
    const Rows<scalar_t> b{
        block.r0, block.scores.data_ptr<scalar_t>(), block.lse.data_ptr<scalar_t>(),
        block.compute_lse, with_p,
        block.row_factor.defined() ? block.row_factor.data_ptr<scalar_t>() : nullptr,
        block.positive_sum.defined() ? block.positive_sum.data_ptr<scalar_t>() : nullptr};
    at::parallel_for(0, block.scores.size(0), 8, [&](int64_t begin, int64_t end) {
      rows(p, b, begin, end);
    });
  });
}

// Rows (and dk rows) per panel of the driver's dynamic schedule. MKL packs the whole of K for each
// panel's GEMM, so a panel spends a share ∝ 1/rows of its time packing (2·rows flops per packed
// element): on a 2-core EPYC, 128-row panels ran 1.2x the three bare GEMMs at N = 4,096 and
// d = 1,024 where 256 rows ran 1.05-1.13x, and no worse at d = 128 or at BCL's shape. Thicker
// panels leave too few of them to balance the threads when one shares its core with another
// process.
constexpr int64_t kPanel = 256;

// The op's inputs in the accumulation dtype (float, or double for float64): the CPU GEMMs run
// there, and the labels as int32 so that the same-class select vectorizes with 32-bit compares.
tiled::Problem cpu_problem(const at::Tensor& z, const at::Tensor& k, const at::Tensor& row_labels,
                           const at::Tensor& col_labels, const at::Tensor& row_bias,
                           const at::Tensor& col_bias, int64_t self_offset, double scale,
                           int64_t block_rows) {
  tiled::check_arguments(z, k, row_labels, col_labels, row_bias, col_bias, block_rows);
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto prep = [](const at::Tensor& t, at::ScalarType dtype) {
    return t.detach().to(dtype).contiguous();
  };
  tiled::Problem p;
  p.z = prep(z, acc);
  p.k = prep(k, acc);
  p.row_labels = prep(row_labels, at::kInt);
  p.col_labels = prep(col_labels, at::kInt);
  p.row_bias = prep(row_bias, acc);
  p.col_bias = prep(col_bias, acc);
  p.self_offset = self_offset;
  p.scale = scale;
  p.acc = acc;
  p.panel = kPanel;
  return p;
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_kernels, CPU, m) {
  m.impl("tiled_lse_forward", &tiled::forward_op<&cpu_problem, &cpu_epilogue>);
  m.impl("tiled_lse_backward", &tiled::backward_op<&cpu_problem, &cpu_epilogue>);
  m.impl("tiled_loss_forward_backward",
         &tiled::loss_forward_backward_op<&cpu_problem, &cpu_epilogue>);
}

}  // namespace rcl_kernels
