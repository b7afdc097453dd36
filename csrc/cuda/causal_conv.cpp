// Torch glue for the CUDA causal conv kernels in causal_conv.cu: checks, contiguity, allocation, stream.
// The op schemas are defined in csrc/cpu/causal_conv.cpp (always compiled).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "torch_glue.h"

namespace fastdl {
namespace cuda {

cudaError_t causal_conv_forward(ScalarKind kind, const void* x, const void* w, const void* bias, void* y,
                                int64_t batch, int64_t in_channels, int64_t out_channels, int64_t length, int taps,
                                int dilation, int groups, cudaStream_t stream);
cudaError_t causal_conv_backward(ScalarKind kind, const void* grad_output, const void* x, const void* w,
                                 void* grad_input, void* grad_weight, void* grad_bias, int64_t batch,
                                 int64_t in_channels, int64_t out_channels, int64_t length, int taps, int dilation,
                                 int groups, cudaStream_t stream);
cudaError_t causal_conv_step(ScalarKind kind, const void* x, void* ring, const void* w, const void* bias, void* y,
                             int64_t batch, int64_t in_channels, int64_t out_channels, int64_t slots,
                             int64_t position, int taps, int dilation, int groups, cudaStream_t stream);

namespace {

constexpr int64_t kMaxTimeBlocks = 65535;  // grid.y of the time-parallel kernels
constexpr int64_t kThreadsPerBlock = 128;  // kThreads in causal_conv.cu

void check_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                int64_t dilation, int64_t groups, const char* op) {
  TORCH_CHECK(input.is_cuda() && weight.device() == input.device(), op, ": input and weight must be on one CUDA device");
  TORCH_CHECK(input.dim() == 3, op, ": expected input (N, C_in, T), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 3, op, ": expected weight (C_out, C_in/groups, k), got shape ", weight.sizes());
  TORCH_CHECK(dilation >= 1 && groups >= 1 && dilation <= INT32_MAX && groups <= INT32_MAX, op,
              ": dilation and groups must be in 1 … 2^31 − 1, got ", dilation, " and ", groups);
  TORCH_CHECK(weight.size(0) % groups == 0 && weight.size(1) * groups == input.size(1), op, ": weight ", weight.sizes(),
              " with groups=", groups, " does not fit an input of ", input.size(1), " channels");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype differs from input dtype");
  TORCH_CHECK((input.size(2) + kThreadsPerBlock - 1) / kThreadsPerBlock <= kMaxTimeBlocks, op,
              ": sequences longer than ", kMaxTimeBlocks * kThreadsPerBlock, " steps are not supported, got ",
              input.size(2));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be (C_out,), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(), op,
                ": bias must match input's dtype and device");
  }
}

at::Tensor causal_conv_forward_cuda(const at::Tensor& input_, const at::Tensor& weight_,
                                    const std::optional<at::Tensor>& bias_, int64_t dilation, int64_t groups) {
  const char* op = "fastdl::causal_conv_forward";
  check_args(input_, weight_, bias_, dilation, groups, op);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const std::optional<at::Tensor> bias = bias_.has_value() ? std::optional(bias_->contiguous()) : std::nullopt;
  at::Tensor output = at::empty({input.size(0), weight.size(0), input.size(2)}, input.options());
  if (output.numel() == 0) return output;
  check_launch(causal_conv_forward(scalar_kind(input, op), input.const_data_ptr(), weight.const_data_ptr(),
                                   bias.has_value() ? bias->const_data_ptr() : nullptr, output.mutable_data_ptr(),
                                   input.size(0), input.size(1), weight.size(0), input.size(2),
                                   static_cast<int>(weight.size(2)), static_cast<int>(dilation),
                                   static_cast<int>(groups), current_stream(input)),
               op);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv_backward_cuda(const at::Tensor& grad_output_,
                                                                         const at::Tensor& input_,
                                                                         const at::Tensor& weight_, int64_t dilation,
                                                                         int64_t groups) {
  const char* op = "fastdl::causal_conv_backward";
  check_args(input_, weight_, std::nullopt, dilation, groups, op);
  TORCH_CHECK(grad_output_.sizes() == at::IntArrayRef({input_.size(0), weight_.size(0), input_.size(2)}), op,
              ": grad_output has shape ", grad_output_.sizes(), ", expected (N, C_out, T)");
  TORCH_CHECK(grad_output_.device() == input_.device() && grad_output_.scalar_type() == input_.scalar_type(), op,
              ": grad_output must match input's device and dtype");
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), grad = grad_output_.contiguous();
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_bias = at::zeros({weight.size(0)}, weight.options());
  if (grad.numel() == 0 || input.numel() == 0) return {grad_input.zero_(), grad_weight, grad_bias};
  check_launch(causal_conv_backward(scalar_kind(input, op), grad.const_data_ptr(), input.const_data_ptr(),
                                    weight.const_data_ptr(), grad_input.mutable_data_ptr(),
                                    grad_weight.mutable_data_ptr(), grad_bias.mutable_data_ptr(), input.size(0),
                                    input.size(1), weight.size(0), input.size(2), static_cast<int>(weight.size(2)),
                                    static_cast<int>(dilation), static_cast<int>(groups), current_stream(input)),
               op);
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor causal_conv_step_cuda(const at::Tensor& input_, at::Tensor& buffer, int64_t position,
                                 const at::Tensor& weight_, const std::optional<at::Tensor>& bias_, int64_t dilation,
                                 int64_t groups) {
  const char* op = "fastdl::causal_conv_step";
  TORCH_CHECK(input_.dim() == 2, op, ": expected input (N, C_in), got ", input_.sizes());
  check_args(input_.unsqueeze(-1), weight_, bias_, dilation, groups, op);
  const int64_t batch = input_.size(0), in_channels = input_.size(1), taps = weight_.size(2);
  const int64_t slots = dilation * (taps - 1) + 1;
  TORCH_CHECK(buffer.dim() == 3 && buffer.size(0) == batch && buffer.size(1) == slots && buffer.size(2) == in_channels &&
                  buffer.is_contiguous() && buffer.scalar_type() == input_.scalar_type() &&
                  buffer.device() == input_.device(),
              op, ": buffer must be a contiguous (", batch, ", ", slots, ", ", in_channels,
              ") tensor of the input's dtype and device, got ", buffer.sizes());
  TORCH_CHECK(position >= 0, op, ": position must be >= 0, got ", position);
  TORCH_CHECK(batch <= kMaxTimeBlocks, op, ": batch above ", kMaxTimeBlocks, " is not supported, got ", batch);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const std::optional<at::Tensor> bias = bias_.has_value() ? std::optional(bias_->contiguous()) : std::nullopt;
  at::Tensor output = at::empty({batch, weight.size(0)}, input.options());
  if (output.numel() == 0) return output;
  check_launch(causal_conv_step(scalar_kind(input, op), input.const_data_ptr(), buffer.mutable_data_ptr(),
                                weight.const_data_ptr(), bias.has_value() ? bias->const_data_ptr() : nullptr,
                                output.mutable_data_ptr(), batch, in_channels, weight.size(0), slots, position,
                                static_cast<int>(taps), static_cast<int>(dilation), static_cast<int>(groups),
                                current_stream(input)),
               op);
  return output;
}

}  // namespace
}  // namespace cuda
}  // namespace fastdl

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("causal_conv_forward", &fastdl::cuda::causal_conv_forward_cuda);
  m.impl("causal_conv_backward", &fastdl::cuda::causal_conv_backward_cuda);
  m.impl("causal_conv_step", &fastdl::cuda::causal_conv_step_cuda);
}
