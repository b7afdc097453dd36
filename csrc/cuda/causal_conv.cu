// Dilated causal 1-D convolution, CUDA kernels (math in fastdl/ops/causal_conv.py and csrc/cpu/causal_conv.cpp):
//   y[n, o, t] = b[o] + Σ_j Σ_i w[o, i, j] · x[n, i, t − s_j],   s_j = d·(k − 1 − j), x at t < 0 is 0.
//
// The causal window is read in place (a load at t − s_j < 0 is a 0), so there is no padded copy of x and
// no chomped output. All arithmetic is fp32 whatever the storage type.
//
// * Dense forward: a thread owns one time step t of one image and kOutTile output channels of one group,
//   held in registers. For every input channel and tap it loads x once (neighbouring threads, neighbouring
//   t: coalesced) and reuses it for its kOutTile outputs; the weights it reads are the same for the whole
//   warp (a broadcast from L1). ∂x is the same walk with wᵀ and forward shifts (t + s_j < T).
// * Depthwise (one input channel per group): one thread per output, k multiply-adds, kernel sizes 2 and 3
//   unrolled at compile time.
// * ∂w, ∂b: one block per weight element (per bias element), its threads striding over (image, time) in
//   a fixed pattern, then a fixed shared-memory tree: deterministic, no atomics.
// Grids put (image, channel tile) rows in x (up to 2^31 − 1 blocks) and time blocks in y (up to 65535,
// checked by the glue: sequences up to 8.3M steps).
// * Streaming step: one thread per (image, output channel) reads the k ring slots it needs; threads of
//   the first C_in indices also write x_t into its own ring slot, which no thread reads in this step.
#include "common.h"

namespace fastdl {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kOutTile = 8;
constexpr int kReduceThreads = 256;

struct ConvShape {
  int64_t batch, in_channels, out_channels, length;
  int taps, dilation, groups;
};

template <typename T>
__global__ void dense_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                     T* __restrict__ y, ConvShape s) {
  const int64_t cig = s.in_channels / s.groups, cog = s.out_channels / s.groups;
  const int64_t o_tiles = (cog + kOutTile - 1) / kOutTile;
  const int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t n = blockIdx.x / (s.groups * o_tiles);
  const int64_t group = (blockIdx.x / o_tiles) % s.groups;
  const int64_t o0 = (blockIdx.x % o_tiles) * kOutTile;
  if (t >= s.length) return;
  float acc[kOutTile];
#pragma unroll
  for (int r = 0; r < kOutTile; ++r) acc[r] = 0.0f;
  const T* x_group = x + (n * s.in_channels + group * cig) * s.length;
  for (int j = 0; j < s.taps; ++j) {
    const int64_t source = t - static_cast<int64_t>(s.dilation) * (s.taps - 1 - j);
    if (source < 0) continue;
    for (int64_t i = 0; i < cig; ++i) {
      const float xv = to_float(x_group[i * s.length + source]);
#pragma unroll
      for (int r = 0; r < kOutTile; ++r) {
        const int64_t o = o0 + r;
        if (o < cog) acc[r] += to_float(w[((group * cog + o) * cig + i) * s.taps + j]) * xv;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kOutTile; ++r) {
    const int64_t o = group * cog + o0 + r;
    if (o0 + r < cog)
      y[(n * s.out_channels + o) * s.length + t] = from_float<T>(acc[r] + (bias != nullptr ? to_float(bias[o]) : 0.0f));
  }
}

template <typename T>
__global__ void dense_grad_input_kernel(const T* __restrict__ g, const T* __restrict__ w, T* __restrict__ dx,
                                        ConvShape s) {
  const int64_t cig = s.in_channels / s.groups, cog = s.out_channels / s.groups;
  const int64_t i_tiles = (cig + kOutTile - 1) / kOutTile;
  const int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t n = blockIdx.x / (s.groups * i_tiles);
  const int64_t group = (blockIdx.x / i_tiles) % s.groups;
  const int64_t i0 = (blockIdx.x % i_tiles) * kOutTile;
  if (t >= s.length) return;
  float acc[kOutTile];
#pragma unroll
  for (int r = 0; r < kOutTile; ++r) acc[r] = 0.0f;
  const T* g_group = g + (n * s.out_channels + group * cog) * s.length;
  for (int j = 0; j < s.taps; ++j) {
    const int64_t target = t + static_cast<int64_t>(s.dilation) * (s.taps - 1 - j);
    if (target >= s.length) continue;
    for (int64_t o = 0; o < cog; ++o) {
      const float gv = to_float(g_group[o * s.length + target]);
#pragma unroll
      for (int r = 0; r < kOutTile; ++r) {
        const int64_t i = i0 + r;
        if (i < cig) acc[r] += to_float(w[((group * cog + o) * cig + i) * s.taps + j]) * gv;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kOutTile; ++r)
    if (i0 + r < cig) dx[(n * s.in_channels + group * cig + i0 + r) * s.length + t] = from_float<T>(acc[r]);
}

// kTaps = 2 or 3 unrolls the taps; kTaps = 0 reads s.taps at run time.
template <typename T, int kTaps>
__global__ void depthwise_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                         T* __restrict__ y, ConvShape s) {
  const int taps = kTaps > 0 ? kTaps : s.taps;
  const int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t row = blockIdx.x;  // n · C_out + o
  if (t >= s.length) return;
  const int64_t o = row % s.out_channels, n = row / s.out_channels;
  const T* x_row = x + (n * s.in_channels + o / (s.out_channels / s.in_channels)) * s.length;
  float acc = bias != nullptr ? to_float(bias[o]) : 0.0f;
#pragma unroll
  for (int j = 0; j < taps; ++j) {  // a compile-time trip count for kTaps > 0
    const int64_t source = t - static_cast<int64_t>(s.dilation) * (taps - 1 - j);
    if (source >= 0) acc += to_float(w[o * taps + j]) * to_float(x_row[source]);
  }
  y[row * s.length + t] = from_float<T>(acc);
}

template <typename T>
__global__ void depthwise_grad_input_kernel(const T* __restrict__ g, const T* __restrict__ w, T* __restrict__ dx,
                                            ConvShape s) {
  const int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t row = blockIdx.x;  // n · C_in + c
  if (t >= s.length) return;
  const int64_t c = row % s.in_channels, n = row / s.in_channels;
  const int64_t multiplier = s.out_channels / s.in_channels;
  float acc = 0.0f;
  for (int64_t o = c * multiplier; o < (c + 1) * multiplier; ++o) {
    const T* g_row = g + (n * s.out_channels + o) * s.length;
    for (int j = 0; j < s.taps; ++j) {
      const int64_t target = t + static_cast<int64_t>(s.dilation) * (s.taps - 1 - j);
      if (target < s.length) acc += to_float(w[o * s.taps + j]) * to_float(g_row[target]);
    }
  }
  dx[row * s.length + t] = from_float<T>(acc);
}

// Sums `value` over the block in a fixed tree; thread 0 gets the total.
__device__ float block_sum(float value) {
  __shared__ float partial[kReduceThreads];
  partial[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  return partial[0];
}

// One block per weight element (o, i, j): Σ_n Σ_{t ≥ s_j} g[n, o, t] · x[n, group·C_in/g + i, t − s_j].
template <typename T>
__global__ void grad_weight_kernel(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ dw, ConvShape s) {
  const int64_t cig = s.in_channels / s.groups, cog = s.out_channels / s.groups;
  const int64_t element = blockIdx.x;  // (o · C_in/g + i) · k + j
  const int j = static_cast<int>(element % s.taps);
  const int64_t i = (element / s.taps) % cig, o = element / (s.taps * cig);
  const int64_t channel = (o / cog) * cig + i;
  const int64_t shift = static_cast<int64_t>(s.dilation) * (s.taps - 1 - j);
  float acc = 0.0f;
  for (int64_t n = 0; n < s.batch; ++n) {
    const T* g_row = g + (n * s.out_channels + o) * s.length;
    const T* x_row = x + (n * s.in_channels + channel) * s.length;
    for (int64_t t = shift + threadIdx.x; t < s.length; t += kReduceThreads)
      acc += to_float(g_row[t]) * to_float(x_row[t - shift]);
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) dw[element] = from_float<T>(total);
}

template <typename T>
__global__ void grad_bias_kernel(const T* __restrict__ g, T* __restrict__ db, ConvShape s) {
  const int64_t o = blockIdx.x;
  float acc = 0.0f;
  for (int64_t n = 0; n < s.batch; ++n) {
    const T* g_row = g + (n * s.out_channels + o) * s.length;
    for (int64_t t = threadIdx.x; t < s.length; t += kReduceThreads) acc += to_float(g_row[t]);
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) db[o] = from_float<T>(total);
}

struct StepShape {
  int64_t batch, in_channels, out_channels, slots, slot_now;
  int taps, dilation, groups;
};

template <typename T>
__global__ void step_kernel(const T* __restrict__ x, T* __restrict__ ring, const T* __restrict__ w,
                            const T* __restrict__ bias, T* __restrict__ y, StepShape s) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = blockIdx.y;
  const int64_t cig = s.in_channels / s.groups, cog = s.out_channels / s.groups;
  const T* x_row = x + n * s.in_channels;
  T* ring_row = ring + n * s.slots * s.in_channels;
  if (index < s.out_channels) {
    const int64_t first_in = (index / cog) * cig;
    float acc = bias != nullptr ? to_float(bias[index]) : 0.0f;
    for (int j = 0; j < s.taps; ++j) {
      const int64_t shift = static_cast<int64_t>(s.dilation) * (s.taps - 1 - j);
      const T* h = shift == 0 ? x_row : ring_row + ((s.slot_now - shift + s.slots) % s.slots) * s.in_channels;
      for (int64_t i = 0; i < cig; ++i) acc += to_float(w[(index * cig + i) * s.taps + j]) * to_float(h[first_in + i]);
    }
    y[n * s.out_channels + index] = from_float<T>(acc);
  }
  if (index < s.in_channels) ring_row[s.slot_now * s.in_channels + index] = x_row[index];
}

}  // namespace

cudaError_t causal_conv_forward(ScalarKind kind, const void* x, const void* w, const void* bias, void* y,
                                int64_t batch, int64_t in_channels, int64_t out_channels, int64_t length, int taps,
                                int dilation, int groups, cudaStream_t stream) {
  const ConvShape s{batch, in_channels, out_channels, length, taps, dilation, groups};
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    const T *xt = static_cast<const T*>(x), *wt = static_cast<const T*>(w), *bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    const unsigned int t_blocks = blocks_for(length, kThreads);
    if (in_channels == groups) {
      const dim3 grid(static_cast<unsigned int>(batch * out_channels), t_blocks);
      if (taps == 2) depthwise_forward_kernel<T, 2><<<grid, kThreads, 0, stream>>>(xt, wt, bt, yt, s);
      else if (taps == 3) depthwise_forward_kernel<T, 3><<<grid, kThreads, 0, stream>>>(xt, wt, bt, yt, s);
      else depthwise_forward_kernel<T, 0><<<grid, kThreads, 0, stream>>>(xt, wt, bt, yt, s);
    } else {
      const int64_t o_tiles = (out_channels / groups + kOutTile - 1) / kOutTile;
      const dim3 grid(static_cast<unsigned int>(batch * groups * o_tiles), t_blocks);
      dense_forward_kernel<T><<<grid, kThreads, 0, stream>>>(xt, wt, bt, yt, s);
    }
    return cudaGetLastError();
  });
}

cudaError_t causal_conv_backward(ScalarKind kind, const void* grad_output, const void* x, const void* w,
                                 void* grad_input, void* grad_weight, void* grad_bias, int64_t batch,
                                 int64_t in_channels, int64_t out_channels, int64_t length, int taps, int dilation,
                                 int groups, cudaStream_t stream) {
  const ConvShape s{batch, in_channels, out_channels, length, taps, dilation, groups};
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    const T *gt = static_cast<const T*>(grad_output), *xt = static_cast<const T*>(x), *wt = static_cast<const T*>(w);
    const unsigned int t_blocks = blocks_for(length, kThreads);
    if (in_channels == groups) {
      const dim3 grid(static_cast<unsigned int>(batch * in_channels), t_blocks);
      depthwise_grad_input_kernel<T><<<grid, kThreads, 0, stream>>>(gt, wt, static_cast<T*>(grad_input), s);
    } else {
      const int64_t i_tiles = (in_channels / groups + kOutTile - 1) / kOutTile;
      const dim3 grid(static_cast<unsigned int>(batch * groups * i_tiles), t_blocks);
      dense_grad_input_kernel<T><<<grid, kThreads, 0, stream>>>(gt, wt, static_cast<T*>(grad_input), s);
    }
    const int64_t weight_elements = out_channels * (in_channels / groups) * taps;
    grad_weight_kernel<T><<<static_cast<unsigned int>(weight_elements), kReduceThreads, 0, stream>>>(
        gt, xt, static_cast<T*>(grad_weight), s);
    grad_bias_kernel<T><<<static_cast<unsigned int>(out_channels), kReduceThreads, 0, stream>>>(
        gt, static_cast<T*>(grad_bias), s);
    return cudaGetLastError();
  });
}

cudaError_t causal_conv_step(ScalarKind kind, const void* x, void* ring, const void* w, const void* bias, void* y,
                             int64_t batch, int64_t in_channels, int64_t out_channels, int64_t slots,
                             int64_t position, int taps, int dilation, int groups, cudaStream_t stream) {
  const StepShape s{batch, in_channels, out_channels, slots, position % slots, taps, dilation, groups};
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    const int64_t width = in_channels > out_channels ? in_channels : out_channels;
    const dim3 grid(blocks_for(width, kThreads), static_cast<unsigned int>(batch));
    step_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(ring),
                                                  static_cast<const T*>(w), static_cast<const T*>(bias),
                                                  static_cast<T*>(y), s);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastdl
