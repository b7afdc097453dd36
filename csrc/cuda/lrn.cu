// Local response normalization, CUDA kernels (math in fastdl/ops/lrn.py and csrc/cpu/lrn.cpp).
//
// One thread owns one (image, position) and walks its channels in order: for NC… layouts, neighbouring
// threads own neighbouring positions, so every load and store of a warp is one coalesced transaction.
// (Channels-last inputs run the same kernel with a channel stride of 1; their accesses are strided
// across the warp — correct, not yet tuned.) LRN is memory-bound, so the kernel's job is to read x once
// and write y once: the window sum slides (add the entering channel's square, subtract the leaving one's),
// in fp64 so the subtraction cancels exactly, with NaN/Inf kept out of the running sum and counted instead
// — a sliding sum would otherwise turn one Inf into NaN for every later channel. All arithmetic is fp32
// or wider whatever the storage type.
//
// Backward needs at channel c the mirrored sum T_c = Σ_{j = c−after … c+before} t_j with
// t_j = g_j · x_j · scale_j^(−β−1). A thread cannot index a queue of past t_j held in registers, so it
// keeps three sliding scale windows — a lead one at j = c + before (its t_j enters T), a trail one at
// i = c − after − 1 (its t_i leaves T; recomputed bit-identically since both windows see the same updates)
// and one at c — and starts the walk before+after channels early so that every window starts empty.
// Nothing is saved from forward: re-reading x (mostly from L1/L2) is cheaper than a saved scale.
#include <cmath>

#include "common.h"

namespace fastdl {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// A window sum that stays exact under sliding: finite values in fp64, NaN and Inf counted apart.
struct SlidingSum {
  double finite = 0;
  int nans = 0;
  int infs = 0;

  __device__ void add(double v, int sign) {
    if (isnan(v)) nans += sign;
    else if (isinf(v)) infs += sign;
    else finite += sign * v;
  }
  __device__ double value() const {
    if (nans > 0) return NAN;
    if (infs > 0) return INFINITY;
    return finite;
  }
};

struct LrnArgs {
  int64_t batch, channels, positions;
  int64_t stride_n, stride_c, stride_s;
  int before, after;  // the window of channel c is c − before … c + after
  float alpha_over_size, beta, k;
};

template <typename T>
__device__ __forceinline__ float channel_value(const T* p, const LrnArgs& a, int64_t c) {
  return (c >= 0 && c < a.channels) ? to_float(p[c * a.stride_c]) : 0.0f;
}

// Moves the window sum of x² from channel idx − 1 to channel idx.
template <typename T>
__device__ __forceinline__ void slide_squares(SlidingSum& s, const T* x, const LrnArgs& a, int64_t idx) {
  const double entering = channel_value(x, a, idx + a.after);
  const double leaving = channel_value(x, a, idx - a.before - 1);
  s.add(entering * entering, 1);
  s.add(leaving * leaving, -1);
}

__device__ __forceinline__ float scale_of(const SlidingSum& s, const LrnArgs& a) {
  return a.k + a.alpha_over_size * static_cast<float>(s.value());
}

// t_j = g_j · x_j · scale_j^(−β−1), zero outside the channels.
template <typename T>
__device__ __forceinline__ double mirror_term(const SlidingSum& s, const T* x, const T* g, const LrnArgs& a,
                                              int64_t j) {
  if (j < 0 || j >= a.channels) return 0.0;
  return static_cast<double>(to_float(g[j * a.stride_c]) * to_float(x[j * a.stride_c]) *
                             powf(scale_of(s, a), -a.beta - 1.0f));
}

__device__ __forceinline__ bool locate(const LrnArgs& a, int64_t& offset) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= a.batch * a.positions) return false;
  offset = (index / a.positions) * a.stride_n + (index % a.positions) * a.stride_s;
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lrn_forward_kernel(const T* __restrict__ x, T* __restrict__ y, LrnArgs a) {
  int64_t offset;
  if (!locate(a, offset)) return;
  x += offset;
  y += offset;
  SlidingSum window;
  for (int64_t c = 0; c < a.channels; ++c) {
    slide_squares(window, x, a, c);
    y[c * a.stride_c] = from_float<T>(to_float(x[c * a.stride_c]) * powf(scale_of(window, a), -a.beta));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lrn_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dx, LrnArgs a) {
  int64_t offset;
  if (!locate(a, offset)) return;
  g += offset;
  x += offset;
  dx += offset;
  SlidingSum lead, trail, center, mirrored;
  const float coef = 2.0f * a.alpha_over_size * a.beta;
  for (int64_t c = -(a.before + a.after); c < a.channels; ++c) {
    const int64_t j = c + a.before, i = c - a.after - 1;
    slide_squares(lead, x, a, j);
    mirrored.add(mirror_term(lead, x, g, a, j), 1);
    slide_squares(trail, x, a, i);
    mirrored.add(mirror_term(trail, x, g, a, i), -1);
    slide_squares(center, x, a, c);
    if (c < 0) continue;
    const float scale_pow = powf(scale_of(center, a), -a.beta);
    // β = 0: the window term is exactly 0, as torch's pow backward for a zero exponent (0 · NaN is not).
    const float mirror = a.beta == 0.0f ? 0.0f : coef * to_float(x[c * a.stride_c]) * static_cast<float>(mirrored.value());
    dx[c * a.stride_c] = from_float<T>(to_float(g[c * a.stride_c]) * scale_pow - mirror);
  }
}

LrnArgs make_args(int64_t batch, int64_t channels, int64_t positions, int64_t stride_n, int64_t stride_c,
                  int64_t stride_s, int size, float alpha, float beta, float k) {
  return {batch, channels, positions, stride_n, stride_c, stride_s, size / 2, (size - 1) / 2, alpha / size, beta, k};
}

}  // namespace

cudaError_t lrn_forward(ScalarKind kind, const void* x, void* y, int64_t batch, int64_t channels, int64_t positions,
                        int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, float alpha, float beta, float k,
                        cudaStream_t stream) {
  const LrnArgs args = make_args(batch, channels, positions, stride_n, stride_c, stride_s, size, alpha, beta, k);
  return dispatch_scalar(kind, [&](auto tag) {
    using T = decltype(tag);
    lrn_forward_kernel<T><<<blocks_for(batch * positions, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), args);
    return cudaGetLastError();
  });
}

cudaError_t lrn_backward(ScalarKind kind, const void* grad_output, const void* x, void* grad_input, int64_t batch,
                         int64_t channels, int64_t positions, int64_t stride_n, int64_t stride_c, int64_t stride_s,
                         int size, float alpha, float beta, float k, cudaStream_t stream) {
  const LrnArgs args = make_args(batch, channels, positions, stride_n, stride_c, stride_s, size, alpha, beta, k);
  return dispatch_scalar(kind, [&](auto tag) {
    using T = decltype(tag);
    lrn_backward_kernel<T><<<blocks_for(batch * positions, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_output), static_cast<const T*>(x), static_cast<T*>(grad_input), args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastdl
