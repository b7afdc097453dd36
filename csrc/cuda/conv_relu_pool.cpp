// Torch glue for the CUDA conv + ReLU + max-pool: the convolution is cuDNN's (at::convolution, no bias),
// the bias + ReLU + pool epilogue and its backward are the kernels of conv_relu_pool.cu, and the conv's
// backward is ATen's convolution_backward (cuDNN) on the ∂L/∂z those kernels rebuild from the argmax.
// Layout: the caller's (channels-last stays channels-last: cuDNN's fastest path for fp16/bf16).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/conv_relu_pool_geometry.h"
#include "torch_glue.h"

namespace fastdl {
namespace cuda {

cudaError_t bias_relu_pool_forward(ScalarKind kind, int index_bytes, const void* z, const void* bias, void* y,
                                   void* argmax, const int64_t* sizes, const int* window, bool channels_last,
                                   cudaStream_t stream);
cudaError_t unpool_grad_backward(ScalarKind kind, int index_bytes, const void* grad, const void* argmax, void* grad_z,
                                 const int64_t* sizes, const int* window, bool channels_last, cudaStream_t stream);

namespace {

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

bool is_channels_last(const at::Tensor& t) { return !t.is_contiguous() && t.is_contiguous(kChannelsLast); }

at::MemoryFormat format_of(const at::Tensor& t) {
  return is_channels_last(t) ? kChannelsLast : at::MemoryFormat::Contiguous;
}

// The launchers' geometry: sizes of z and y, then the window as eight ints.
struct Geometry {
  int64_t sizes[6];
  int window[8];
};

Geometry geometry_of(at::IntArrayRef z_sizes, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                     at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation, bool ceil_mode, const char* op) {
  TORCH_CHECK(pool_kernel.size() == 2 && pool_stride.size() == 2 && pool_padding.size() == 2 &&
                  pool_dilation.size() == 2,
              op, ": pooling arguments must have 2 values each");
  TORCH_CHECK(pool_kernel[0] >= 1 && pool_kernel[1] >= 1 && pool_stride[0] >= 1 && pool_stride[1] >= 1 &&
                  pool_dilation[0] >= 1 && pool_dilation[1] >= 1 && pool_padding[0] >= 0 && pool_padding[1] >= 0 &&
                  pool_padding[0] <= pool_kernel[0] / 2 && pool_padding[1] <= pool_kernel[1] / 2,
              op, ": invalid pooling window ", pool_kernel, " stride ", pool_stride, " padding ", pool_padding,
              " dilation ", pool_dilation);
  Geometry g{};
  for (int d = 0; d < 4; ++d) g.sizes[d] = z_sizes[d];
  for (int d = 0; d < 2; ++d) {
    g.sizes[4 + d] = pooled_size(z_sizes[2 + d], pool_kernel[d], pool_stride[d], pool_padding[d], pool_dilation[d],
                                 ceil_mode);
    TORCH_CHECK(g.sizes[4 + d] >= 1, op, ": the convolution output ", z_sizes, " is too small for the pooling window");
    g.window[d] = static_cast<int>(pool_kernel[d]);
    g.window[2 + d] = static_cast<int>(pool_stride[d]);
    g.window[4 + d] = static_cast<int>(pool_padding[d]);
    g.window[6 + d] = static_cast<int>(pool_dilation[d]);
  }
  return g;
}

int index_bytes(at::ScalarType type) { return static_cast<int>(c10::elementSize(type)); }

std::tuple<at::Tensor, at::Tensor> conv_relu_pool_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation, bool ceil_mode) {
  constexpr const char* op = "fastdl::conv_relu_pool_forward";
  TORCH_CHECK(input.is_cuda() && weight.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, op, ": expected 4-D input and weight, got ", input.sizes(), " and ",
              weight.sizes());
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = format_of(input);
  const at::Tensor z = at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups)
                           .contiguous(format);
  const Geometry g = geometry_of(z.sizes(), pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode, op);
  const std::vector<int64_t> shape{g.sizes[0], g.sizes[1], g.sizes[4], g.sizes[5]};
  at::Tensor y = at::empty(shape, z.options().memory_format(format));
  at::Tensor a = at::empty(shape, z.options().dtype(argmax_type(pool_kernel)).memory_format(format));
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == z.size(1) && b.scalar_type() == z.scalar_type(), op, ": bias must have ", z.size(1),
                " values of the input's dtype");
  }
  check_launch(bias_relu_pool_forward(scalar_kind(z, op), index_bytes(a.scalar_type()), z.const_data_ptr(),
                                      b.defined() ? b.const_data_ptr() : nullptr, y.mutable_data_ptr(),
                                      a.mutable_data_ptr(), g.sizes, g.window, format == kChannelsLast,
                                      current_stream(z)),
               op);
  return {y, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_pool_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& argmax, const at::Tensor& input, const at::Tensor& weight,
    bool has_bias, bool input_needs_grad, bool weight_needs_grad, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation, bool ceil_mode) {
  constexpr const char* op = "fastdl::conv_relu_pool_backward";
  TORCH_CHECK(grad_output.is_cuda() && argmax.is_cuda() && input.is_cuda() && weight.is_cuda(), op,
              ": expected CUDA tensors");
  TORCH_CHECK(grad_output.sizes() == argmax.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
              " but argmax has shape ", argmax.sizes());
  TORCH_CHECK(argmax.scalar_type() == argmax_type(pool_kernel), op, ": argmax must be ", argmax_type(pool_kernel),
              " for this window, got ", argmax.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  const auto format = format_of(input);
  std::vector<int64_t> z_sizes{input.size(0), weight.size(0), 0, 0};
  for (int d = 0; d < 2; ++d)
    z_sizes[2 + d] = (input.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1) / stride[d] + 1;
  const Geometry g = geometry_of(z_sizes, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode, op);
  TORCH_CHECK(g.sizes[4] == grad_output.size(2) && g.sizes[5] == grad_output.size(3), op, ": grad_output has shape ",
              grad_output.sizes(), ", expected pooled size ", g.sizes[4], "x", g.sizes[5]);
  const at::Tensor grad = grad_output.contiguous(format), a = argmax.contiguous(format);
  at::Tensor grad_z = at::empty(z_sizes, grad.options().memory_format(format));  // every element is written
  check_launch(unpool_grad_backward(scalar_kind(grad, op), index_bytes(a.scalar_type()), grad.const_data_ptr(),
                                    a.const_data_ptr(), grad_z.mutable_data_ptr(), g.sizes, g.window,
                                    format == kChannelsLast, current_stream(grad)),
               op);
  at::Tensor grad_input, grad_weight;
  if (input_needs_grad || weight_needs_grad) {
    std::tie(grad_input, grad_weight, std::ignore) =
        at::convolution_backward(grad_z, input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                 {input_needs_grad, weight_needs_grad, false});
  }
  grad_input = input_needs_grad ? grad_input.contiguous(format) : input.new_empty({0});
  grad_weight = weight_needs_grad ? grad_weight.contiguous() : weight.new_empty({0});
  // Summed in fp32 whatever the storage type, then rounded once.
  const at::Tensor grad_bias =
      has_bias ? at::where(a >= 0, grad, at::zeros({}, grad.options())).sum({0, 2, 3}, false, at::kFloat).to(grad.scalar_type())
               : weight.new_empty({0});
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace fastdl

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("conv_relu_pool_forward", &fastdl::cuda::conv_relu_pool_forward_cuda);
  m.impl("conv_relu_pool_backward", &fastdl::cuda::conv_relu_pool_backward_cuda);
}
