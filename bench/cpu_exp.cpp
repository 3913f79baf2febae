// The exponential pass of the CPU tiled epilogue, with three exponentials: the product's own
// (csrc/cpu/vec_exp.h), ATen's Vectorized<T>::exp (Sleef, 1 ulp) and Vectorized<T>::exp_u20, plus
// at::exp_ on the tensor. bench/cpu_exp.py builds this file twice, for AVX-512 and for AVX2 + FMA
// (CPU_CAPABILITY_* selects the width of at::vec, as in ATen's own kernels), and times the builds
// against each other in one process.
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu/vec_exp.h"

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kBytes = 64;
constexpr const char* kIsa = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kBytes = 32;
constexpr const char* kIsa = "avx2";
#else
#error "build with CPU_CAPABILITY_AVX512 or CPU_CAPABILITY_AVX2 (bench/cpu_exp.py does)"
#endif

namespace {

using rcl_kernels::ExpTraits;
using rcl_kernels::Lanes;

static_assert(at::vec::Vectorized<float>::size() == kBytes / 4,
              "at::vec is not this build's width");

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// What each pass computes per element: out = exp(x − shift[row]), its row sum on the side (the
// epilogue's sum for the lse), in place as the epilogue does.
enum Variant : int64_t {
  kHand = 0,        // exp_shifted: the product's exponential, with its flush below e^kCutoff
  kSleef = 1,       // Vectorized<T>::exp(): Sleef_exp{f16,d8,f8,d4}_u10, as is
  kSleefFlush = 2,  // the same, flushed to 0 below e^kCutoff as the product requires
  kU20 = 3,         // Vectorized<T>::exp_u20() (for double ATen forwards it to exp())
  kU20Flush = 4,    // the same, flushed to 0 below e^kCutoff
  kAten = 5,        // at::exp_ on the (already shifted) tensor: what PyTorch itself runs
};

template <typename T>
void pass_hand(T* x, const T* shift, T* sums, int64_t rows, int64_t cols) {
  using L = Lanes<T, kBytes>;
  using V = typename L::V;
  constexpr int W = L::kWidth;
  for (int64_t r = 0; r < rows; ++r) {
    T* t = x + r * cols;
    const T s = shift[r];
    V sum{};
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      V v;
      std::memcpy(&v, t + c, sizeof(V));
      const V e = rcl_kernels::exp_shifted<T, kBytes>(v - s);
      std::memcpy(t + c, &e, sizeof(V));
      sum += e;
    }
    if (c < cols) {  // the tail, filled with −inf as the epilogue fills it (e^−inf = 0)
      T buffer[W];
      for (int i = 0; i < W; ++i) buffer[i] = c + i < cols ? t[c + i] : kNegInf<T>;
      V v;
      std::memcpy(&v, buffer, sizeof(V));
      const V e = rcl_kernels::exp_shifted<T, kBytes>(v - s);
      std::memcpy(t + c, &e, size_t(cols - c) * sizeof(T));
      sum += e;
    }
    T total = 0;
    for (int i = 0; i < W; ++i) total += sum[i];
    sums[r] = total;
  }
}

template <typename T, Variant kind>
RCL_INLINE at::vec::Vectorized<T> vec_exp(const at::vec::Vectorized<T>& arg) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (kind == kSleef) {
    return arg.exp();
  } else if constexpr (kind == kSleefFlush) {
    return Vec::blendv(arg.exp(), Vec(T(0)), arg < Vec(ExpTraits<T>::kCutoff));
  } else if constexpr (kind == kU20) {
    return arg.exp_u20();
  } else {
    return Vec::blendv(arg.exp_u20(), Vec(T(0)), arg < Vec(ExpTraits<T>::kCutoff));
  }
}

template <typename T, Variant kind>
void pass_vec(T* x, const T* shift, T* sums, int64_t rows, int64_t cols) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int W = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    T* t = x + r * cols;
    const Vec s(shift[r]);
    Vec sum(T(0));
    int64_t c = 0;
    for (; c + W <= cols; c += W) {
      const Vec e = vec_exp<T, kind>(Vec::loadu(t + c) - s);
      e.store(t + c);
      sum = sum + e;
    }
    if (c < cols) {
      T buffer[W];
      for (int i = 0; i < W; ++i) buffer[i] = c + i < cols ? t[c + i] : kNegInf<T>;
      const Vec e = vec_exp<T, kind>(Vec::loadu(buffer) - s);
      e.store(t + c, int(cols - c));
      sum = sum + e;
    }
    T lanes[W];
    sum.store(lanes);
    T total = 0;
    for (int i = 0; i < W; ++i) total += lanes[i];
    sums[r] = total;
  }
}

bool cpu_has_isa() {
  __builtin_cpu_init();
  if (kBytes == 64) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// One pass of `variant` over x [rows, cols] in place; returns the row sums (none for kAten, which
// computes only the exponentials, of an x already shifted).
template <typename T>
void run_pass(int64_t variant, at::Tensor& x, const T* shift, T* sums) {
  const int64_t rows = x.size(0), cols = x.size(1);
  T* p = x.data_ptr<T>();
  switch (variant) {
    case kHand: pass_hand<T>(p, shift, sums, rows, cols); break;
    case kSleef: pass_vec<T, kSleef>(p, shift, sums, rows, cols); break;
    case kSleefFlush: pass_vec<T, kSleefFlush>(p, shift, sums, rows, cols); break;
    case kU20: pass_vec<T, kU20>(p, shift, sums, rows, cols); break;
    case kU20Flush: pass_vec<T, kU20Flush>(p, shift, sums, rows, cols); break;
    case kAten: at::exp_(x); break;
    default: TORCH_CHECK(false, "unknown variant ", variant);
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& shift) {
  TORCH_CHECK(cpu_has_isa(), "this CPU lacks the ISA of this build of bench/cpu_exp.cpp (", kIsa,
              ")");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "x: a contiguous CPU matrix");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == x.size(0) &&
                  shift.scalar_type() == x.scalar_type() && shift.is_contiguous(),
              "shift: one per row, x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "float32 or float64");
}

// out = exp(x − shift) (kAten: exp(x)) and the row sums, for the accuracy check.
std::vector<at::Tensor> apply(int64_t variant, const at::Tensor& x, const at::Tensor& shift) {
  check_inputs(x, shift);
  at::Tensor out = x.clone();
  at::Tensor sums = at::zeros_like(shift);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "apply", [&] {
    run_pass<scalar_t>(variant, out, shift.data_ptr<scalar_t>(), sums.data_ptr<scalar_t>());
  });
  return {out, sums};
}

// `reps` timed passes over a copy of `pristine`, each refreshed (untimed) before it, so every
// pass reads arguments in the same range, from cache, as the epilogue reads its row block; the
// nanoseconds of each.
std::vector<double> time_passes(int64_t variant, const at::Tensor& pristine,
                                const at::Tensor& shift, at::Tensor work, int64_t reps) {
  check_inputs(pristine, shift);
  TORCH_CHECK(work.sizes() == pristine.sizes() && work.scalar_type() == pristine.scalar_type() &&
                  work.is_contiguous(),
              "work: pristine's shape and dtype");
  std::vector<double> ns;
  ns.reserve(size_t(reps));
  at::Tensor sums = at::zeros_like(shift);
  AT_DISPATCH_FLOATING_TYPES(pristine.scalar_type(), "time_passes", [&] {
    const size_t bytes = size_t(pristine.numel()) * sizeof(scalar_t);
    for (int64_t i = 0; i < reps; ++i) {
      std::memcpy(work.data_ptr<scalar_t>(), pristine.data_ptr<scalar_t>(), bytes);
      const auto start = std::chrono::steady_clock::now();
      run_pass<scalar_t>(variant, work, shift.data_ptr<scalar_t>(), sums.data_ptr<scalar_t>());
      const auto end = std::chrono::steady_clock::now();
      ns.push_back(std::chrono::duration<double, std::nano>(end - start).count());
    }
  });
  return ns;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ISA") = kIsa;
  m.attr("LANES_FLOAT") = kBytes / 4;
  m.def("cpu_has_isa", &cpu_has_isa);
  m.def("apply", &apply);
  m.def("time_passes", &time_passes);
}
