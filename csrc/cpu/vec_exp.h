// The CPU epilogue's exponential (tiled_lse_cpu.cpp): e^x on vectors of GCC's vector extension,
// written out lane by lane so that one source compiles to AVX-512, AVX2 + FMA or SSE2 code,
// whichever target attribute the calling function has. Everything here is always inlined into
// that caller: an out-of-line copy would be compiled for one ISA and could be shared by callers of
// another. bench/cpu_exp.py times it against ATen's Vectorized<T>::exp (Sleef) on this shape.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rcl_kernels {
namespace {

#define RCL_INLINE inline __attribute__((always_inline))

// The epilogue works on vectors of GCC's vector extension, Bytes wide (the variant's register
// width: 64 for AVX-512, 32 for AVX2, 16 for the SSE2 baseline; a wider vector than the ISA has
// is lowered badly, 10x slower for AVX2 in a microbenchmark): portable code whose lane arithmetic
// is spelled out, so the compiler has nothing to prove before it vectorizes.
template <typename T, int Bytes>
struct Lanes {
  static constexpr int kWidth = Bytes / int(sizeof(T));
  typedef T V __attribute__((vector_size(Bytes)));
  using UInt = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  typedef UInt U __attribute__((vector_size(Bytes)));
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Int I __attribute__((vector_size(Bytes)));
  typedef int32_t Labels __attribute__((vector_size(Bytes / (sizeof(T) / 4))));
};

template <typename To, typename From>
RCL_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// e^x, with 0 below e^kCutoff: the arguments are logits shifted by their row's max or lse (≤ 0),
// and flushing what is below e^-80 (float) keeps denormals out of the GEMMs that read the
// probabilities (a denormal operand is orders of magnitude slower) while the sums, which hold a
// term ≥ 1, cannot see it. x = n·ln2 + r with |r| ≤ ln2/2; e^r by its Taylor polynomial (degree 7
// for float: error < 6e-9 relative; 13 for double: < 5e-18); 2^n built in the exponent bits by
// adding a rounding constant, so no float-to-int conversion is needed (NaN stays NaN).
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
  static constexpr float kCutoff = -80.0f;
  static constexpr float kTiny = 1e-35f;  // ≈ e^-80.6: smaller probabilities are flushed to 0
  static constexpr float kRound = 12582912.0f;  // 1.5·2^23: x + kRound − kRound rounds x
  static constexpr float kBias = 127.0f;
  static constexpr int kMantissa = 23;
  static constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606820309417232e-6f;
  static constexpr int kDegree = 7;
};
template <>
struct ExpTraits<double> {
  static constexpr double kCutoff = -600.0;
  static constexpr double kTiny = 1e-260;  // ≈ e^-598.6
  static constexpr double kRound = 6755399441055744.0;  // 1.5·2^52
  static constexpr double kBias = 1023.0;
  static constexpr int kMantissa = 52;
  static constexpr double kLn2Hi = 0.693147180369123816490, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr int kDegree = 13;
};

template <typename T, int Bytes>
RCL_INLINE typename Lanes<T, Bytes>::V exp_shifted(typename Lanes<T, Bytes>::V x) {
  using E = ExpTraits<T>;
  using L = Lanes<T, Bytes>;
  using V = typename L::V;
  constexpr T kLog2e = T(1.44269504088896340736);
  const V cutoff = V{} + E::kCutoff;
  const V clamped = x < cutoff ? cutoff : x;  // NaN stays NaN (the comparison is false)
  const V n = (clamped * kLog2e + E::kRound) - E::kRound;
  const V r = (clamped - n * E::kLn2Hi) - n * E::kLn2Lo;
  // Σ_{i ≤ degree} r^i / i! by Horner's rule (the coefficients fold to constants).
  T factor = T(1);
  for (int i = 2; i <= E::kDegree; ++i) factor /= T(i);  // 1 / degree!
  V poly = V{} + factor;
  for (int i = E::kDegree; i >= 1; --i) {
    factor *= T(i);  // 1 / (i − 1)!
    poly = poly * r + factor;
  }
  // (n + bias) lands in the low mantissa bits of (n + bias + kRound); shifting them up by the
  // mantissa width leaves exactly the exponent field of 2^n.
  const typename L::U bits = bit_cast<typename L::U>(n + (E::kBias + E::kRound)) << E::kMantissa;
  return x < cutoff ? V{} : poly * bit_cast<V>(bits);
}

// Flushes |v| below kTiny to 0: no denormals into the GEMMs that read the probabilities.
template <typename T, int Bytes>
RCL_INLINE typename Lanes<T, Bytes>::V flush_tiny(typename Lanes<T, Bytes>::V v) {
  using V = typename Lanes<T, Bytes>::V;
  const V tiny = V{} + ExpTraits<T>::kTiny;
  return (v < tiny) & (v > -tiny) ? V{} : v;
}

}  // namespace
}  // namespace rcl_kernels
