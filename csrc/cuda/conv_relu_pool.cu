// Fused bias + ReLU + max-pool after a cuDNN convolution, and its backward, CUDA kernels (math in
// fastdl/ops/conv_relu_pool.py and csrc/cpu/conv_relu_pool.cpp).
//
// What is fused: the convolution itself is cuDNN's (called by the glue in conv_relu_pool.cpp, without
// bias); this file is its epilogue. The forward kernel reads the bias-free conv output z once and writes
// only the pooled y and, per pooled value, the int8/int16/int32 window offset of the max (−1 where the
// ReLU clipped it): relu(· + b) is non-decreasing, so y = max(0, b + window max of z), one add and one
// clamp per pooled value. The full-resolution ReLU output is never written, nor kept for backward.
//
// Forward: one thread per pooled value. Threads are numbered in memory order of the output (channels
// fastest for channels-last, columns fastest for NCHW), so a warp's loads of z and stores of y are
// contiguous runs (for channels-last fully coalesced; for NCHW strided by the pooling stride).
//
// Backward: one thread per full-resolution position of ∂L/∂z, gathering rather than scattering: the
// windows that contain position h along an axis are those with (h + pad − i·dil) divisible by the stride
// for some window row i; the thread adds their gradient when their argmax is that row/column. No atomics,
// so the result is deterministic, and ∂L/∂z needs no zero-fill pass. All arithmetic is fp32.
#include "common.h"

namespace fastdl {
namespace cuda {
namespace {

constexpr int kThreads = 256;

struct PoolShape {
  int64_t batch, channels, height, width, out_height, out_width;
  int kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;
};

// (n, c, row, col) of linear index `index` over a (batch, channels, rows, cols) tensor stored dense in
// channels-last or NCHW order; returns the element's offset in that storage (the same number).
__device__ __forceinline__ void unravel(int64_t index, int64_t channels, int64_t rows, int64_t cols,
                                        bool channels_last, int64_t& n, int64_t& c, int64_t& row, int64_t& col) {
  if (channels_last) {
    c = index % channels;
    index /= channels;
    col = index % cols;
    index /= cols;
    row = index % rows;
    n = index / rows;
  } else {
    col = index % cols;
    index /= cols;
    row = index % rows;
    index /= rows;
    c = index % channels;
    n = index / channels;
  }
}

__device__ __forceinline__ int64_t offset_of(int64_t n, int64_t c, int64_t row, int64_t col, int64_t channels,
                                             int64_t rows, int64_t cols, bool channels_last) {
  return channels_last ? ((n * rows + row) * cols + col) * channels + c : ((n * channels + c) * rows + row) * cols + col;
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    bias_relu_pool_kernel(const T* __restrict__ z, const T* __restrict__ bias, T* __restrict__ y,
                          Index* __restrict__ argmax, PoolShape s, bool channels_last) {
  const int64_t total = s.batch * s.channels * s.out_height * s.out_width;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, oh, ow;
    unravel(index, s.channels, s.out_height, s.out_width, channels_last, n, c, oh, ow);
    float best = -INFINITY;
    int offset = 0;
    for (int i = 0; i < s.kernel_h; ++i) {
      const int64_t h = oh * s.stride_h - s.padding_h + static_cast<int64_t>(i) * s.dilation_h;
      if (h < 0 || h >= s.height) continue;
      for (int j = 0; j < s.kernel_w; ++j) {
        const int64_t w = ow * s.stride_w - s.padding_w + static_cast<int64_t>(j) * s.dilation_w;
        if (w < 0 || w >= s.width) continue;
        const float v = to_float(z[offset_of(n, c, h, w, s.channels, s.height, s.width, channels_last)]);
        if (v > best || isnan(v)) {  // a NaN wins, as in max_pool2d
          best = v;
          offset = i * s.kernel_w + j;
        }
      }
    }
    if (bias != nullptr) best += to_float(bias[c]);
    const bool clipped = best <= 0.0f;  // false for NaN, which passes through ReLU
    y[index] = from_float<T>(clipped ? 0.0f : best);
    argmax[index] = static_cast<Index>(clipped ? -1 : offset);
  }
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    unpool_grad_kernel(const T* __restrict__ grad, const Index* __restrict__ argmax, T* __restrict__ grad_z,
                       PoolShape s, bool channels_last) {
  const int64_t total = s.batch * s.channels * s.height * s.width;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t n, c, h, w;
    unravel(index, s.channels, s.height, s.width, channels_last, n, c, h, w);
    float sum = 0.0f;
    for (int i = 0; i < s.kernel_h; ++i) {
      const int64_t row = h + s.padding_h - static_cast<int64_t>(i) * s.dilation_h;  // oh · stride_h if covered
      if (row < 0 || row % s.stride_h != 0 || row / s.stride_h >= s.out_height) continue;
      for (int j = 0; j < s.kernel_w; ++j) {
        const int64_t col = w + s.padding_w - static_cast<int64_t>(j) * s.dilation_w;
        if (col < 0 || col % s.stride_w != 0 || col / s.stride_w >= s.out_width) continue;
        const int64_t at = offset_of(n, c, row / s.stride_h, col / s.stride_w, s.channels, s.out_height,
                                     s.out_width, channels_last);
        if (argmax[at] == i * s.kernel_w + j) sum += to_float(grad[at]);
      }
    }
    grad_z[index] = from_float<T>(sum);
  }
}

template <typename Fn>
cudaError_t dispatch_index(int index_bytes, Fn&& fn) {
  switch (index_bytes) {
    case 1: return fn(int8_t{});
    case 2: return fn(int16_t{});
    case 4: return fn(int32_t{});
  }
  return cudaErrorInvalidValue;
}

unsigned int grid_for(int64_t work) {
  // A grid-stride loop covers the rest: the grid stays within limits for any size (> 2^31 elements).
  const int64_t blocks = blocks_for(work, kThreads);
  return static_cast<unsigned int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

PoolShape make_shape(const int64_t* sizes, const int* window) {
  return {sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], window[0], window[1], window[2],
          window[3], window[4], window[5], window[6], window[7]};
}

}  // namespace

// sizes: batch, channels, height, width (of z), out_height, out_width (of y);
// window: kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w.
// bias may be null. index_bytes is the argmax element size (1, 2 or 4).
cudaError_t bias_relu_pool_forward(ScalarKind kind, int index_bytes, const void* z, const void* bias, void* y,
                                   void* argmax, const int64_t* sizes, const int* window, bool channels_last,
                                   cudaStream_t stream) {
  const PoolShape s = make_shape(sizes, window);
  const int64_t total = s.batch * s.channels * s.out_height * s.out_width;
  if (total == 0) return cudaSuccess;
  return dispatch_scalar(kind, [&](auto scalar) {
    using T = decltype(scalar);
    return dispatch_index(index_bytes, [&](auto index) {
      using Index = decltype(index);
      bias_relu_pool_kernel<T, Index><<<grid_for(total), kThreads, 0, stream>>>(
          static_cast<const T*>(z), static_cast<const T*>(bias), static_cast<T*>(y), static_cast<Index*>(argmax), s,
          channels_last);
      return cudaGetLastError();
    });
  });
}

cudaError_t unpool_grad_backward(ScalarKind kind, int index_bytes, const void* grad, const void* argmax, void* grad_z,
                                 const int64_t* sizes, const int* window, bool channels_last, cudaStream_t stream) {
  const PoolShape s = make_shape(sizes, window);
  const int64_t total = s.batch * s.channels * s.height * s.width;
  if (total == 0) return cudaSuccess;
  return dispatch_scalar(kind, [&](auto scalar) {
    using T = decltype(scalar);
    return dispatch_index(index_bytes, [&](auto index) {
      using Index = decltype(index);
      unpool_grad_kernel<T, Index><<<grid_for(total), kThreads, 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const Index*>(argmax), static_cast<T*>(grad_z), s, channels_last);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace fastdl
