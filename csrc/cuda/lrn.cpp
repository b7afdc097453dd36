// Torch glue for the CUDA LRN kernels in lrn.cu: checks, layout, allocation, stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "torch_glue.h"

namespace fastdl {
namespace cuda {

cudaError_t lrn_forward(ScalarKind kind, const void* x, void* y, int64_t batch, int64_t channels, int64_t positions,
                        int64_t stride_n, int64_t stride_c, int64_t stride_s, int size, float alpha, float beta, float k,
                        cudaStream_t stream);
cudaError_t lrn_backward(ScalarKind kind, const void* grad_output, const void* x, void* grad_input, int64_t batch,
                         int64_t channels, int64_t positions, int64_t stride_n, int64_t stride_c, int64_t stride_s,
                         int size, float alpha, float beta, float k, cudaStream_t stream);

namespace {

// The input as a dense (image, channel, position) array: channels-last storage as it is, anything else
// made contiguous. Mirrors channel_view() in fastdl/_layout.py.
struct ChannelView {
  at::Tensor dense;
  int64_t batch, channels, positions, stride_n, stride_c, stride_s;
};

ChannelView channel_view(const at::Tensor& input) {
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t positions = batch == 0 || channels == 0 ? 0 : input.numel() / (batch * channels);
  const bool channels_last = !input.is_contiguous() && ((input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                                        (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
  if (channels_last) return {input, batch, channels, positions, channels * positions, 1, channels};
  return {input.contiguous(), batch, channels, positions, channels * positions, positions, 1};
}

void check_args(const at::Tensor& input, int64_t size, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA tensor");
  TORCH_CHECK(input.dim() >= 3, op, ": expected an input of 3 or more dimensions (N, C, ...), got ", input.dim());
  TORCH_CHECK(size >= 1, op, ": size must be at least 1, got ", size);
}

at::Tensor lrn_forward_cuda(const at::Tensor& input, int64_t size, double alpha, double beta, double k) {
  check_args(input, size, "fastdl::lrn_forward");
  const c10::cuda::CUDAGuard guard(input.device());
  const ChannelView v = channel_view(input);
  at::Tensor output = at::empty_like(v.dense);
  if (v.dense.numel() == 0) return output;
  check_launch(lrn_forward(scalar_kind(input, "fastdl::lrn_forward"), v.dense.const_data_ptr(), output.mutable_data_ptr(),
                           v.batch, v.channels, v.positions, v.stride_n, v.stride_c, v.stride_s, static_cast<int>(size),
                           static_cast<float>(alpha), static_cast<float>(beta), static_cast<float>(k), current_stream(input)),
               "fastdl::lrn_forward");
  return output;
}

at::Tensor lrn_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, int64_t size, double alpha,
                             double beta, double k) {
  check_args(input, size, "fastdl::lrn_backward");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "fastdl::lrn_backward: grad_output has shape ", grad_output.sizes(),
              " but input has shape ", input.sizes());
  TORCH_CHECK(grad_output.device() == input.device() && grad_output.scalar_type() == input.scalar_type(),
              "fastdl::lrn_backward: grad_output must match input's device and dtype");
  const c10::cuda::CUDAGuard guard(input.device());
  const ChannelView v = channel_view(input);
  const at::Tensor grad = grad_output.contiguous(v.stride_s == 1 ? at::MemoryFormat::Contiguous : input.suggest_memory_format());
  at::Tensor grad_input = at::empty_like(v.dense);
  if (v.dense.numel() == 0) return grad_input;
  check_launch(lrn_backward(scalar_kind(input, "fastdl::lrn_backward"), grad.const_data_ptr(), v.dense.const_data_ptr(),
                            grad_input.mutable_data_ptr(), v.batch, v.channels, v.positions, v.stride_n, v.stride_c,
                            v.stride_s, static_cast<int>(size), static_cast<float>(alpha), static_cast<float>(beta),
                            static_cast<float>(k), current_stream(input)),
               "fastdl::lrn_backward");
  return grad_input;
}

}  // namespace
}  // namespace cuda
}  // namespace fastdl

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("lrn_forward", &fastdl::cuda::lrn_forward_cuda);
  m.impl("lrn_backward", &fastdl::cuda::lrn_backward_cuda);
}
