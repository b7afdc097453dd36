// Shared by the CUDA kernels and their torch glue. Free of torch headers: the .cu files include it
// and compile with nvcc alone (see DESIGN.md), the glue maps at::ScalarType onto ScalarKind.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastdl {
namespace cuda {

// The element types the CUDA kernels are instantiated for.
enum class ScalarKind { kFloat32, kFloat16, kBFloat16 };

#ifdef __CUDACC__
// Loads and stores of every kernel go through these, so that low precision is widened to fp32 for the
// arithmetic and rounded once on the way out.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls fn(T{}) with T the CUDA type of `kind`, so one launcher serves every dtype.
template <typename Fn>
cudaError_t dispatch_scalar(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat32: return fn(float{});
    case ScalarKind::kFloat16: return fn(__half{});
    case ScalarKind::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}
#endif

inline unsigned int blocks_for(int64_t work, int threads) {
  return static_cast<unsigned int>((work + threads - 1) / threads);
}

}  // namespace cuda
}  // namespace fastdl
