// Shared by the CPU kernels: vectorizable math. Per-ISA code and vector types are in isa.h.
//
// The helpers here are always_inline and free of calls and data-dependent branches, so a loop calling
// them inside per-ISA code (with_cpu_isa) vectorizes at that ISA's width.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "isa.h"

namespace fastdl {
namespace cpu {

FASTDL_INLINE float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

FASTDL_INLINE int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// log2(s) for a positive, normal, finite float. s = m·2^e with m in [√½, √2), and
// ln m = 2·atanh(t), t = (m−1)/(m+1), |t| ≤ 0.1716, summed to t⁹: truncation error below 1e-9 relative.
FASTDL_INLINE float log2_positive(float s) {
  // Integer arithmetic on the bits picks e so that m = s·2^−e lands in [√½, √2), without branches
  // (0x3f3504f3 is √½): the loops calling this stay vectorizable.
  const int32_t bits = float_to_bits(s);
  const int32_t exponent = (bits - 0x3f3504f3) >> 23;
  const float mantissa = bits_to_float(bits - exponent * (1 << 23));
  const float t = (mantissa - 1.0f) / (mantissa + 1.0f);
  const float t2 = t * t;
  const float series = 1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9))));
  return static_cast<float>(exponent) + 2.8853900817779268f * t * series;  // 2/ln 2 · t · series
}

// 2^z for |z| ≤ 125: z = n + f with n = round(z), |f| ≤ ½; 2^f = e^(f·ln 2) by Taylor to degree 7
// (truncation below 6e-9 relative); 2^n is put into the exponent bits.
FASTDL_INLINE float exp2_bounded(float z) {
  // Adding and removing 1.5·2^23 rounds to the nearest integer with plain float arithmetic, which every
  // target vectorizes (nearbyint needs SSE4.1).
  const float n = (z + 12582912.0f) - 12582912.0f;
  const float x = (z - n) * 0.69314718055994531f;
  const float poly =
      1.0f + x * (1.0f + x * (0.5f + x * (1.0f / 6 + x * (1.0f / 24 + x * (1.0f / 120 + x * (1.0f / 720 + x * (1.0f / 5040)))))));
  return poly * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

FASTDL_INLINE bool is_positive_normal(float s) {
  // Bitwise & rather than &&: no branch, so the calling loop stays vectorizable.
  return (s >= std::numeric_limits<float>::min()) & (s <= std::numeric_limits<float>::max());
}

// base^exponent as exp2(exponent · log2 base), vectorizable, within ~1e-7 relative of std::pow, for a
// positive normal base whose result stays in range (the LRN scale k + α/n·Σx² is such a number for any
// sane k). For any other base it returns garbage and sets `outside`; the caller then recomputes the
// elements where pow_fast_covers() is false with std::pow, so the semantics are exactly pow's.
FASTDL_INLINE float pow_fast(float base, float exponent, int32_t& outside) {
  const bool normal = is_positive_normal(base);
  const float z = exponent * log2_positive(normal ? base : 1.0f);
  const bool in_range = (z > -125.0f) & (z < 125.0f);
  outside |= !(normal & in_range);
  return exp2_bounded(in_range ? z : 0.0f);
}

FASTDL_INLINE bool pow_fast_covers(float base, float exponent) {
  return is_positive_normal(base) && std::fabs(exponent * log2_positive(base)) < 125.0f;
}

// Doubles serve gradcheck and fp64 oracles, where exactness matters more than speed. A non-finite base
// still counts as outside, as in the float version: it comes from a NaN or Inf that poisoned a caller's
// sliding sum, and the caller redoes its tile exactly.
FASTDL_INLINE double pow_fast(double base, double exponent, int32_t& outside) {
  outside |= !std::isfinite(base);
  return std::pow(base, exponent);
}
FASTDL_INLINE bool pow_fast_covers(double, double) { return true; }

}  // namespace cpu
}  // namespace fastdl
