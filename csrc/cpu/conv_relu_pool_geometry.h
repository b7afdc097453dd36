// Pooling geometry shared by the CPU kernels (csrc/cpu/conv_relu_pool.cpp) and the CUDA glue
// (csrc/cuda/conv_relu_pool.cpp) of the fused conv + ReLU + max-pool, so both size outputs alike.
#pragma once

#include <torch/types.h>

#include <cstdint>

namespace fastdl {

// Output length of a max-pool along one dimension, with torch's rules (ceil_mode included).
inline int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation,
                           bool ceil_mode) {
  const int64_t span = size + 2 * padding - dilation * (kernel - 1) - 1;
  int64_t out = (span + (ceil_mode ? stride - 1 : 0)) / stride + 1;
  if (ceil_mode && (out - 1) * stride >= size + padding) --out;  // the last window must start inside
  return out;
}

// The narrowest integer type that holds a window offset (the compact argmax kept for backward).
inline at::ScalarType argmax_type(at::IntArrayRef pool_kernel) {
  const int64_t positions = pool_kernel[0] * pool_kernel[1];
  return positions <= 127 ? at::kChar : positions <= 32767 ? at::kShort : at::kInt;
}

}  // namespace fastdl
