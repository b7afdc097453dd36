// Shared by the CPU kernels: run-time instruction-set selection and vectorizable math.
//
// Wheels must run on any x86-64 CPU, so nothing is compiled with -march=native. Instead the hot loops of
// each kernel sit in functions marked FASTDL_CPU_CLONES: GCC compiles one copy per listed target and an
// ifunc resolver picks the best one for the running CPU when the library is loaded. The targets are the
// x86-64 ISA levels (baseline SSE2; v3 = AVX2 + FMA + BMI; v4 = AVX-512 F/BW/CD/DQ/VL), which GCC ≥ 12
// resolves by CPU feature bits, on AMD and Intel alike (CPU-model names such as "arch=haswell" would
// match Intel models only). A clone named "avx2" alone would lack FMA, which AVX2 does not imply. Older
// GCC falls back to the feature names. The loops are written so that the compiler can vectorize them (no calls, no
// data-dependent branches), and every helper they call is always_inline so it is compiled for the
// clone's target too.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FASTDL_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDL_CPU_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define FASTDL_CPU_CLONES
#endif

#define FASTDL_INLINE inline __attribute__((always_inline))
// For lambdas called in a hot loop of a FASTDL_CPU_CLONES function: a lambda is a function of its own,
// compiled for the baseline target unless it is inlined into the clone, so force that.
#define FASTDL_INLINE_LAMBDA __attribute__((always_inline))

namespace fastdl {
namespace cpu {

// A 64-byte block of scalars as one value (GCC vector extension): one AVX-512 register in the v4 clone,
// two AVX2 or four SSE registers in the others. Kernels spell their inner loops over these because GCC
// scalarized the same loops written over arrays, and named accumulator vectors stay in registers where a
// lanes[] array spilled to the stack. Spelled per type: GCC drops vector_size from an alias template's
// dependent type.
typedef float VecFloat __attribute__((vector_size(64)));
typedef double VecDouble __attribute__((vector_size(64)));
template <typename T>
using Vec = std::conditional_t<std::is_same_v<T, float>, VecFloat, VecDouble>;
template <typename T>
constexpr int64_t kVecLanes = 64 / sizeof(T);

// An unaligned load of one Vec.
template <typename T>
FASTDL_INLINE Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

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

// Doubles serve gradcheck and fp64 oracles, where exactness matters more than speed.
FASTDL_INLINE double pow_fast(double base, double exponent, int32_t&) { return std::pow(base, exponent); }
FASTDL_INLINE bool pow_fast_covers(double, double) { return true; }

}  // namespace cpu
}  // namespace fastdl
