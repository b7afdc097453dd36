// CPU instruction sets: one kernel source, compiled once per instruction set, the one to run chosen at
// run time. Every CPU kernel reaches its per-ISA code through this header and nothing else.
//
// The instruction sets are the x86-64 levels that matter for these kernels:
//   baseline  SSE2 (every x86-64 CPU): 16-byte vectors, 16 registers, no FMA
//   avx2      x86-64-v3, AVX2 + FMA:   32-byte vectors, 16 registers
//   avx512    x86-64-v4, AVX-512:      64-byte vectors, 32 registers
// Nothing is compiled with -march=native (a wheel runs on any x86-64 CPU). Instead a kernel writes its hot
// code once, as a template over an ISA tag (Baseline, Avx2 or Avx512 below) from which it takes its vector
// type and its register-tile shape, and runs it through with_cpu_isa:
//
//   with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
//     using Isa = decltype(isa);
//     ... code using Vec<float, Isa>, Isa::kTileRows, ... and FASTDL_INLINE helpers ...
//   });
//
// with_cpu_isa calls the lambda from one of three functions compiled for the three targets (GCC's target
// attribute). The lambda and everything it calls are always_inline, so they are inlined into that function
// and compiled for its target: explicit vectors get the ISA's registers, plain loops are auto-vectorized
// at its width. Code that is not inlined (a library call, a lambda handed to at::parallel_for) is compiled
// for the baseline: so dispatch inside a parallel task, around the task's whole loop, never around the
// parallel loop itself.
//
// One trap: an always_inline helper is still optimized on its own, for the baseline, before it is inlined,
// and GCC then builds any vector it constructs lane by lane (a helper returning `x − Vec{}` as a broadcast
// became 16 masked loads per use). Broadcast by writing `scalar * vector` in the kernel itself, which
// compiles to one broadcasting multiply-add.
//
// Why this and not the alternatives (measured on the attention forward, AVX2 path):
// * GCC's target_clones (one source, one copy per target, picked by an ifunc) gives every clone the same
//   source and so the same vector width. Written for 64-byte vectors, the AVX2 clone lowered the register
//   tiles to single-float stack stores and ran 30× slower than eager PyTorch. The clones also cannot be
//   overridden at run time (FASTDL_CPU_ISA, tests of every path on one machine).
// * Compiling whole translation units per ISA (ATen's CPU_CAPABILITY) needs per-file compiler flags,
//   which setuptools does not have, and inline functions from shared headers (std::, ATen) would be
//   emitted once per ISA and merged by the linker into whichever copy it met first: an AVX-512 std::
//   helper could end up in the baseline path.
// * A SIMD library (Highway, xsimd) adds a dependency for what GCC's vector extensions already give.
//
// The ISA in use is the best the CPU supports unless capped: FASTDL_CPU_ISA (read by fastdl on import,
// see fastdl/_cpu_isa.py) or set_cpu_isa (tests run every path the CPU has). A cap above what the CPU
// supports is clamped to it.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define FASTDL_INLINE inline __attribute__((always_inline))
// For lambdas called in per-ISA code: a lambda is a function of its own, compiled for the baseline target
// unless it is inlined into the per-ISA function, so force that.
#define FASTDL_INLINE_LAMBDA __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTDL_X86_64 1
#if defined(__clang__) || __GNUC__ >= 12
#define FASTDL_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define FASTDL_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else  // GCC before 12 does not know the x86-64 levels: their features, spelled out
#define FASTDL_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,f16c,lzcnt,movbe")))
#define FASTDL_TARGET_AVX512 \
  __attribute__((target("avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")))
#endif
#endif

namespace fastdl {
namespace cpu {

enum class CpuIsa : int { baseline = 0, avx2 = 1, avx512 = 2 };

// "baseline", "avx2" or "avx512".
const char* cpu_isa_name(CpuIsa isa);
// The best instruction set this CPU (and its OS) supports.
CpuIsa cpu_isa_supported();
namespace isa_detail {
extern std::atomic<int> active;
}

// The instruction set the kernels run now: the supported one, or lower when capped.
inline CpuIsa cpu_isa() { return static_cast<CpuIsa>(isa_detail::active.load(std::memory_order_relaxed)); }
// Caps the instruction set the kernels run (clamped to cpu_isa_supported()); returns the one now in use.
CpuIsa set_cpu_isa(CpuIsa cap);

// The ISA tags. kTileRows × kTileVecs is the register tile of a broadcast-multiply-add micro-kernel (each
// step broadcasts kTileRows scalars against kTileVecs loaded vectors): the accumulators, the loaded vectors
// and one broadcast fill most of the register file while leaving enough independent accumulators to cover
// the multiply-add latency (AVX-512: 16 + 2 + 1 of 32; AVX2: 12 + 2 + 1 of 16). SSE2 has no FMA, so each
// product needs a temporary register too: 9 + 3 + 1 + 1 of 16, and 3 × 3 beat 4 × 2 and 2 × 4 by 2–7 % on
// the attention forward and backward (of the shapes that fit).
struct Baseline {
  static constexpr CpuIsa kIsa = CpuIsa::baseline;
  static constexpr int kVecBytes = 16;
  static constexpr int kTileRows = 3;
  static constexpr int kTileVecs = 3;
};
struct Avx2 {
  static constexpr CpuIsa kIsa = CpuIsa::avx2;
  static constexpr int kVecBytes = 32;
  static constexpr int kTileRows = 6;
  static constexpr int kTileVecs = 2;
};
struct Avx512 {
  static constexpr CpuIsa kIsa = CpuIsa::avx512;
  static constexpr int kVecBytes = 64;
  static constexpr int kTileRows = 8;
  static constexpr int kTileVecs = 2;
};

// A GCC vector of kBytes / sizeof(T) lanes. (The attribute needs a non-dependent element type, hence the
// specializations; an alias template with a dependent type would silently drop vector_size.)
template <typename T, int kBytes>
struct VectorOf;
template <int kBytes>
struct VectorOf<float, kBytes> {
  typedef float type __attribute__((vector_size(kBytes)));
};
template <int kBytes>
struct VectorOf<double, kBytes> {
  typedef double type __attribute__((vector_size(kBytes)));
};

// One register of T for Isa, and how many T it holds.
template <typename T, typename Isa>
using Vec = typename VectorOf<T, Isa::kVecBytes>::type;
template <typename T, typename Isa>
constexpr int64_t kLanes = Isa::kVecBytes / sizeof(T);

// Unaligned load and store of one Vec.
template <typename Isa, typename T>
FASTDL_INLINE Vec<T, Isa> load_vec(const T* p) {
  Vec<T, Isa> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename Isa, typename T>
FASTDL_INLINE void store_vec(T* p, Vec<T, Isa> v) {
  std::memcpy(p, &v, sizeof(v));
}
// Σ of the lanes, in a fixed order (halving: lane l plus lane l + width), the same on every run.
template <typename Isa, typename V>
FASTDL_INLINE auto lane_sum(V x) {
  using T = std::remove_cv_t<std::remove_reference_t<decltype(x[0])>>;
  static_assert(sizeof(V) == Isa::kVecBytes, "lane_sum: not a vector of this ISA");
  constexpr int64_t lanes = kLanes<T, Isa>;
  T partial[lanes];
  std::memcpy(partial, &x, sizeof(x));
  for (int64_t width = lanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) partial[l] += partial[l + width];
  return partial[0];
}

namespace isa_detail {
template <typename Fn>
decltype(auto) run_baseline(Fn& fn) {
  return fn(Baseline{});
}
#ifdef FASTDL_X86_64
template <typename Fn>
FASTDL_TARGET_AVX2 decltype(auto) run_avx2(Fn& fn) {
  return fn(Avx2{});
}
template <typename Fn>
FASTDL_TARGET_AVX512 decltype(auto) run_avx512(Fn& fn) {
  return fn(Avx512{});
}
#endif
}  // namespace isa_detail

// Runs fn(isa tag) compiled for `isa`, which must not exceed cpu_isa_supported(). For a kernel whose data
// layout depends on the ISA (a weight packed in blocks of Isa::kTileRows, say): take cpu_isa() once and
// use it both to lay the data out and to run, so a concurrent set_cpu_isa cannot split the two.
template <typename Fn>
decltype(auto) with_cpu_isa(CpuIsa isa, Fn&& fn) {
#ifdef FASTDL_X86_64
  switch (isa) {
    case CpuIsa::avx512: return isa_detail::run_avx512(fn);
    case CpuIsa::avx2: return isa_detail::run_avx2(fn);
    case CpuIsa::baseline: break;
  }
#endif
  return isa_detail::run_baseline(fn);
}

// Runs fn(isa tag) compiled for the instruction set in use (see the top of this file).
template <typename Fn>
decltype(auto) with_cpu_isa(Fn&& fn) {
  return with_cpu_isa(cpu_isa(), fn);
}

}  // namespace cpu
}  // namespace fastdl
