// Torch glue for the CUDA spectral-norm kernels in spectral_norm.cu: checks, matrix view, allocation, stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "torch_glue.h"

namespace fastdl {
namespace cuda {

int64_t spectral_norm_scratch_floats(int64_t rows, int64_t cols);
cudaError_t spectral_norm_forward(ScalarKind kind, const void* matrix, const void* source, void* out, void* u,
                                  void* v, float* sigma, float* scratch, int64_t rows, int64_t cols,
                                  int iterations, bool training, float eps, cudaStream_t stream);
int64_t spectral_norm_backward_scratch_floats(int64_t numel);
cudaError_t spectral_norm_backward(ScalarKind kind, const void* grad_output, const void* weight, const void* u,
                                   const void* v, const float* sigma, float* partial, void* grad_weight, int64_t rows,
                                   int64_t after, int64_t numel, cudaStream_t stream);

namespace {

void check_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t dim, const char* op) {
  TORCH_CHECK(weight.is_cuda() && u.device() == weight.device() && v.device() == weight.device(), op,
              ": weight, u and v must be on the same CUDA device");
  TORCH_CHECK(weight.dim() >= 2, op, ": expected a weight of 2 or more dimensions, got ", weight.dim());
  TORCH_CHECK(dim >= 0 && dim < weight.dim(), op, ": dim must be in [0, ", weight.dim() - 1, "], got ", dim);
  const int64_t rows = weight.size(dim), cols = rows == 0 ? 0 : weight.numel() / rows;
  TORCH_CHECK(u.dim() == 1 && u.size(0) == rows, op, ": u must be a vector of length ", rows, ", got shape ", u.sizes());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == cols, op, ": v must be a vector of length ", cols, ", got shape ", v.sizes());
  TORCH_CHECK(u.scalar_type() == weight.scalar_type() && v.scalar_type() == weight.scalar_type(), op,
              ": u and v must have the weight's dtype ", weight.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_forward_cuda(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t dim, int64_t n_power_iterations,
    double eps, bool training) {
  const char* op = "fastdl::spectral_norm_forward";
  check_args(weight, u, v, dim, op);
  TORCH_CHECK(n_power_iterations > 0, op, ": n_power_iterations must be positive, got ", n_power_iterations);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor matrix = weight.movedim(dim, 0).contiguous();
  const int64_t rows = weight.size(dim), cols = rows == 0 ? 0 : weight.numel() / rows;
  at::Tensor u_out = u.clone(at::MemoryFormat::Contiguous);
  at::Tensor v_out = v.clone(at::MemoryFormat::Contiguous);
  // W / σ elementwise over W's storage: channels_last weights stay channels_last.
  const at::Tensor source = weight.contiguous(weight.suggest_memory_format());
  at::Tensor weight_sn = at::empty_like(source);
  at::Tensor sigma = at::zeros({}, weight.options().dtype(at::kFloat));
  if (weight.numel() == 0) return {weight_sn, u_out, v_out, sigma};
  at::Tensor scratch = at::empty({spectral_norm_scratch_floats(rows, cols)}, weight.options().dtype(at::kFloat));
  check_launch(spectral_norm_forward(scalar_kind(weight, op), matrix.const_data_ptr(), source.const_data_ptr(),
                                     weight_sn.mutable_data_ptr(), u_out.mutable_data_ptr(), v_out.mutable_data_ptr(),
                                     sigma.mutable_data_ptr<float>(), scratch.mutable_data_ptr<float>(), rows, cols,
                                     static_cast<int>(n_power_iterations), training, static_cast<float>(eps),
                                     current_stream(weight)),
               op);
  return {weight_sn, u_out, v_out, sigma};
}

at::Tensor spectral_norm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& u,
                                       const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  const char* op = "fastdl::spectral_norm_backward";
  check_args(weight, u, v, dim, op);
  TORCH_CHECK(grad_output.sizes() == weight.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
              " but weight has shape ", weight.sizes());
  TORCH_CHECK(grad_output.device() == weight.device() && grad_output.scalar_type() == weight.scalar_type(), op,
              ": grad_output must match the weight's device and dtype");
  TORCH_CHECK(sigma.numel() == 1 && sigma.device() == weight.device(), op, ": sigma must be one element on the weight's device");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor g = grad_output.contiguous(), w = weight.contiguous();
  const at::Tensor u_c = u.contiguous(), v_c = v.contiguous(), sigma_f = sigma.to(at::kFloat).contiguous();
  at::Tensor grad_weight = at::empty_like(w);
  const int64_t numel = w.numel();
  if (numel == 0) return grad_weight;
  // W as (A, H, B): A = the dims before `dim`, H = its size, B = the dims after.
  const int64_t rows = weight.size(dim);
  int64_t before = 1;
  for (int64_t d = 0; d < dim; ++d) before *= weight.size(d);
  const int64_t after = numel / (rows * before);
  at::Tensor partial = at::empty({spectral_norm_backward_scratch_floats(numel)}, weight.options().dtype(at::kFloat));
  check_launch(spectral_norm_backward(scalar_kind(weight, op), g.const_data_ptr(), w.const_data_ptr(), u_c.const_data_ptr(),
                                      v_c.const_data_ptr(), sigma_f.const_data_ptr<float>(), partial.mutable_data_ptr<float>(),
                                      grad_weight.mutable_data_ptr(), rows, after, numel, current_stream(weight)),
               op);
  return grad_weight;
}

}  // namespace
}  // namespace cuda
}  // namespace fastdl

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("spectral_norm_forward", &fastdl::cuda::spectral_norm_forward_cuda);
  m.impl("spectral_norm_backward", &fastdl::cuda::spectral_norm_backward_cuda);
}
