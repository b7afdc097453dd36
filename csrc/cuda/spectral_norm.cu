// Spectral normalization, CUDA kernels (math in fastdl/ops/spectral_norm.py and csrc/cpu/spectral_norm.cpp).
//
// W is the row-major matrix view (H rows, C columns); u, v and W / σ are in the weight's type, all
// arithmetic in fp32. After an iteration σ = uᵀWv = ‖Wᵀu‖² / max(‖Wᵀu‖, ε), so σ costs no third
// matrix-vector product. Every reduction has a fixed shape (warp shuffles in a fixed pattern, partials
// added in block order), so results are bit-identical run to run: no atomics.
//
// Two forward paths:
// * small W (the SN-GAN layers up to ~128×1024, where torch is launch-bound): one block does everything
//   in one launch — the n iterations (W v by warps over rows, Wᵀu by threads over columns; W stays in L2
//   between the two), σ and W / σ;
// * large W (memory-bound): per iteration, `row_block_pass` lets each block form s = W_b v for its rows
//   and, while they are hot in L1/L2, its partial W_bᵀ s_b — one read of W for W v and Wᵀ(W v) — then
//   one block (`finalize`) adds the partials in block order and normalizes; `scale` writes W / σ.
// Backward: `dot_partials` (per-block ⟨G, W⟩), `sum_partials` (one block adds them in a fixed order), then
// `gradient` writes G / σ − (⟨G, W⟩ / σ²) u_h v_col.
#include <algorithm>
#include <cmath>

#include "common.h"

namespace fastdl {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kSingleBlockThreads = 1024;
constexpr int kRowsPerBlock = 8;  // one warp per row in row_block_pass
constexpr int kRowBlockThreads = kRowsPerBlock * kWarp;
constexpr int kFinalizeThreads = 1024;
constexpr int kElementThreads = 256;
constexpr int64_t kSingleBlockLimit = 128 * 1024;  // W elements up to which one block does it all

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// The sum of `value` over the block, in a fixed order; every thread gets it. `shared` holds ≥ 32 floats.
__device__ float block_sum(float value, float* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = (blockDim.x + kWarp - 1) / kWarp;
  value = warp_sum(value);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += shared[w];
  return total;
}

// s[h] = w_h · v for the rows h = first, first + stride, …: one warp per row, coalesced along the row.
template <typename T>
__device__ void row_dots(const T* __restrict__ w, const T* __restrict__ v, float* __restrict__ s, int64_t rows,
                         int64_t cols, int64_t first, int64_t stride) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t h = first; h < rows; h += stride) {
    const T* row = w + h * cols;
    float dot = 0.0f;
    for (int64_t c = lane; c < cols; c += kWarp) dot += to_float(row[c]) * to_float(v[c]);
    dot = warp_sum(dot);
    if (lane == 0) s[h] = dot;
  }
}

// u = s / max(‖s‖, ε) (s already in `s`), t = Wᵀu into `t`; returns ‖t‖. Called by one whole block.
template <typename T>
__device__ float transpose_product(const T* __restrict__ w, const float* __restrict__ s, T* __restrict__ u,
                                   float* __restrict__ t, int64_t rows, int64_t cols, float eps, float* shared) {
  float squares = 0.0f;
  for (int64_t h = threadIdx.x; h < rows; h += blockDim.x) squares += s[h] * s[h];
  const float s_denominator = fmaxf(sqrtf(block_sum(squares, shared)), eps);
  for (int64_t h = threadIdx.x; h < rows; h += blockDim.x) u[h] = from_float<T>(s[h] / s_denominator);
  __syncthreads();
  squares = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float sum = 0.0f;
    for (int64_t h = 0; h < rows; ++h) sum += to_float(w[h * cols + c]) * to_float(u[h]);
    t[c] = sum;
    squares += sum * sum;
  }
  return sqrtf(block_sum(squares, shared));
}

template <typename T>
__global__ void single_block(const T* __restrict__ w, const T* __restrict__ source, T* __restrict__ out,
                             T* __restrict__ u, T* __restrict__ v, float* __restrict__ sigma_out,
                             float* __restrict__ scratch, int64_t rows, int64_t cols, int64_t numel,
                             int iterations, bool training, float eps) {
  __shared__ float shared[kWarp];
  float* s = scratch;
  float* t = scratch + rows;
  const int64_t warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  float sigma = 0.0f;
  for (int i = 0; i < (training ? iterations : 1); ++i) {
    row_dots(w, v, s, rows, cols, warp, warps);
    __syncthreads();
    if (training) {
      const float t_norm = transpose_product(w, s, u, t, rows, cols, eps, shared);
      const float t_denominator = fmaxf(t_norm, eps);
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) v[c] = from_float<T>(t[c] / t_denominator);
      sigma = t_norm * t_norm / t_denominator;
      __syncthreads();
    } else {
      float products = 0.0f;
      for (int64_t h = threadIdx.x; h < rows; h += blockDim.x) products += to_float(u[h]) * s[h];
      sigma = block_sum(products, shared);
    }
  }
  if (threadIdx.x == 0) *sigma_out = sigma;
  const float divisor = to_float(from_float<T>(sigma));  // σ in the weight's type, as torch's σ tensor
  for (int64_t i = threadIdx.x; i < numel; i += blockDim.x) out[i] = from_float<T>(to_float(source[i]) / divisor);
}

// s for this block's rows and, when `with_transpose`, partial[block] = Σ_{h in block} s_h w_h.
template <typename T>
__global__ void row_block_pass(const T* __restrict__ w, const T* __restrict__ v, float* __restrict__ s,
                               float* __restrict__ partial, int64_t rows, int64_t cols, bool with_transpose) {
  __shared__ float block_s[kRowsPerBlock];
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t h = first_row + warp;
  float dot = 0.0f;
  if (h < rows) {
    const T* row = w + h * cols;
    for (int64_t c = lane; c < cols; c += kWarp) dot += to_float(row[c]) * to_float(v[c]);
  }
  dot = warp_sum(dot);
  if (lane == 0) {
    block_s[warp] = h < rows ? dot : 0.0f;
    if (h < rows) s[h] = dot;
  }
  if (!with_transpose) return;
  __syncthreads();
  const int64_t last_row = min(rows, first_row + kRowsPerBlock);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float sum = 0.0f;
    for (int64_t r = first_row; r < last_row; ++r) sum += block_s[r - first_row] * to_float(w[r * cols + c]);
    partial[static_cast<int64_t>(blockIdx.x) * cols + c] = sum;
  }
}

// One block: u, v and σ from s and the partials (training), or σ = uᵀs (eval).
template <typename T>
__global__ void finalize(const float* __restrict__ s, float* __restrict__ partial, T* __restrict__ u,
                         T* __restrict__ v, float* __restrict__ sigma_out, int64_t rows, int64_t cols,
                         int64_t blocks, bool training, float eps) {
  __shared__ float shared[kWarp];
  if (!training) {
    float products = 0.0f;
    for (int64_t h = threadIdx.x; h < rows; h += blockDim.x) products += to_float(u[h]) * s[h];
    const float sigma = block_sum(products, shared);
    if (threadIdx.x == 0) *sigma_out = sigma;
    return;
  }
  float squares = 0.0f;
  for (int64_t h = threadIdx.x; h < rows; h += blockDim.x) squares += s[h] * s[h];
  const float s_denominator = fmaxf(sqrtf(block_sum(squares, shared)), eps);
  for (int64_t h = threadIdx.x; h < rows; h += blockDim.x) u[h] = from_float<T>(s[h] / s_denominator);
  squares = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float t = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) t += partial[b * cols + c];
    t /= s_denominator;
    partial[c] = t;  // only this thread reads it back below
    squares += t * t;
  }
  const float t_norm = sqrtf(block_sum(squares, shared));
  const float t_denominator = fmaxf(t_norm, eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) v[c] = from_float<T>(partial[c] / t_denominator);
  if (threadIdx.x == 0) *sigma_out = t_norm * t_norm / t_denominator;
}

template <typename T>
__global__ void scale(const T* __restrict__ source, T* __restrict__ out, const float* __restrict__ sigma,
                      int64_t numel) {
  const float divisor = to_float(from_float<T>(*sigma));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride)
    out[i] = from_float<T>(to_float(source[i]) / divisor);
}

template <typename T>
__global__ void dot_partials(const T* __restrict__ g, const T* __restrict__ w, float* __restrict__ partial,
                             int64_t numel) {
  __shared__ float shared[kWarp];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float product = i < numel ? to_float(g[i]) * to_float(w[i]) : 0.0f;
  const float sum = block_sum(product, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: partial[parts] = Σ partial[0 … parts), in a fixed order.
__global__ void sum_partials(float* __restrict__ partial, int64_t parts) {
  __shared__ float shared[kWarp];
  float lanes = 0.0f;
  for (int64_t p = threadIdx.x; p < parts; p += blockDim.x) lanes += partial[p];
  const float total = block_sum(lanes, shared);
  if (threadIdx.x == 0) partial[parts] = total;
}

template <typename T>
__global__ void gradient(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ v,
                         const float* __restrict__ dot, const float* __restrict__ sigma_ptr, T* __restrict__ out,
                         int64_t rows, int64_t after, int64_t numel) {
  const float sigma = *sigma_ptr;
  const float coefficient = *dot / (sigma * sigma);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  // W as (A, H, B): element (a, h, b) has row h and column a·B + b of the matrix view.
  const int64_t h = (i / after) % rows;
  const int64_t column = (i / (rows * after)) * after + i % after;
  out[i] = from_float<T>(to_float(g[i]) / sigma - coefficient * to_float(u[h]) * to_float(v[column]));
}

}  // namespace

int64_t spectral_norm_scratch_floats(int64_t rows, int64_t cols) {
  if (rows * cols <= kSingleBlockLimit) return rows + cols;
  return rows + ((rows + kRowsPerBlock - 1) / kRowsPerBlock) * cols;
}

cudaError_t spectral_norm_forward(ScalarKind kind, const void* matrix, const void* source, void* out, void* u,
                                  void* v, float* sigma, float* scratch, int64_t rows, int64_t cols,
                                  int iterations, bool training, float eps, cudaStream_t stream) {
  const int64_t numel = rows * cols;
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    const T* w = static_cast<const T*>(matrix);
    T* u_data = static_cast<T*>(u);
    T* v_data = static_cast<T*>(v);
    if (numel <= kSingleBlockLimit) {
      single_block<T><<<1, kSingleBlockThreads, 0, stream>>>(w, static_cast<const T*>(source), static_cast<T*>(out),
                                                             u_data, v_data, sigma, scratch, rows, cols, numel,
                                                             iterations, training, eps);
      return cudaGetLastError();
    }
    const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    float* s = scratch;
    float* partial = scratch + rows;
    for (int i = 0; i < (training ? iterations : 1); ++i) {
      row_block_pass<T><<<static_cast<unsigned int>(blocks), kRowBlockThreads, 0, stream>>>(w, v_data, s, partial, rows,
                                                                                            cols, training);
      finalize<T><<<1, kFinalizeThreads, 0, stream>>>(s, partial, u_data, v_data, sigma, rows, cols, blocks, training,
                                                     eps);
    }
    const unsigned int grid = std::min<unsigned int>(blocks_for(numel, kElementThreads), 65535u * 4);
    scale<T><<<grid, kElementThreads, 0, stream>>>(static_cast<const T*>(source), static_cast<T*>(out), sigma, numel);
    return cudaGetLastError();
  });
}

// Floats of scratch the backward needs: one partial per block and their total.
int64_t spectral_norm_backward_scratch_floats(int64_t numel) { return (numel + kElementThreads - 1) / kElementThreads + 1; }

cudaError_t spectral_norm_backward(ScalarKind kind, const void* grad_output, const void* weight, const void* u,
                                   const void* v, const float* sigma, float* partial, void* grad_weight, int64_t rows,
                                   int64_t after, int64_t numel, cudaStream_t stream) {
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    const int64_t parts = spectral_norm_backward_scratch_floats(numel) - 1;
    const auto grid = static_cast<unsigned int>(parts);
    dot_partials<T><<<grid, kElementThreads, 0, stream>>>(static_cast<const T*>(grad_output),
                                                          static_cast<const T*>(weight), partial, numel);
    sum_partials<<<1, kFinalizeThreads, 0, stream>>>(partial, parts);
    gradient<T><<<grid, kElementThreads, 0, stream>>>(static_cast<const T*>(grad_output), static_cast<const T*>(u),
                                                      static_cast<const T*>(v), partial + parts, sigma,
                                                      static_cast<T*>(grad_weight), rows, after, numel);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fastdl
