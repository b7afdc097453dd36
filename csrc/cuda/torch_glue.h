// Shared by the torch glue files (csrc/cuda/*.cpp): what every op's CUDA entry point does before and
// after it calls a launcher from its .cu file.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include "common.h"

namespace fastdl {
namespace cuda {

inline ScalarKind scalar_kind(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

}  // namespace cuda
}  // namespace fastdl
