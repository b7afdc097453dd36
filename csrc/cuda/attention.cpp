// Torch glue for the CUDA attention kernels in attention.cu: checks, allocation, δ, stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>

#include "torch_glue.h"

namespace fastdl {
namespace cuda {

cudaError_t attention_forward(ScalarKind kind, const void* q, const void* k, const void* v, const void* mask, void* out,
                              bool out_float, float* lse, const int64_t* shape, const int64_t* q_strides,
                              const int64_t* k_strides, const int64_t* v_strides, const int64_t* mask_strides,
                              const int64_t* out_strides, float scale, bool causal, double dropout_p, int64_t seed,
                              cudaStream_t stream);
cudaError_t attention_backward(ScalarKind kind, const void* grad_out, const void* q, const void* k, const void* v,
                               const void* mask, const float* lse, const float* delta, void* dq, void* dk, void* dv,
                               void* dmask, const int64_t* shape, const int64_t* q_strides, const int64_t* k_strides,
                               const int64_t* v_strides, const int64_t* mask_strides, const int64_t* grad_strides,
                               float scale, bool causal, double dropout_p, int64_t seed, cudaStream_t stream);

namespace {

// The kernels index rows by strides but read each row's head dim contiguously.
at::Tensor unit_stride(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

std::array<int64_t, 3> row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                  const char* op) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              ": expected query, key and value on one CUDA device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": expected 4-D query, key and value");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": query, key and value must share a dtype");
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2) &&
                  q.size(3) == k.size(3),
              op, ": query (B, Hq, Nq, D), key (B, Hk, Nk, D) and value (B, Hk, Nk, Dv) do not match");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": key heads must divide query heads");
  TORCH_CHECK(q.size(3) <= 256 && v.size(3) <= 256, op, ": head dims above 256 are not supported, got ", q.size(3),
              " and ", v.size(3));
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == q.device() && mask->scalar_type() == q.scalar_type(), op,
                ": attn_mask must have the query's device and dtype");
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), k.size(2)}), op,
                ": attn_mask must be (B, Hq, Nq, Nk)");
  }
}

std::array<int64_t, 7> shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

// Writes the output into `out` (B, Hq, Nq, Dv; any strides with a unit stride along the head dim; the query's
// dtype or fp32), laid out and typed as the Python op chose. Returns the log-sum-exp of every row.
at::Tensor attention_forward_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const c10::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                                  double scale, int64_t seed, at::Tensor out) {
  const char* op = "fastdl::attention_forward_kernel";
  check_inputs(query, key, value, mask, op);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = unit_stride(query), k = unit_stride(key), v = unit_stride(value);
  TORCH_CHECK(out.device() == q.device() && (out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat) &&
                  out.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}) &&
                  (out.stride(3) == 1 || v.size(3) <= 1),
              op, ": out must be (B, Hq, Nq, Dv) on the query's device, of its dtype or fp32, with unit stride along "
              "the head dim");
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const auto shape = shape_of(q, k, v);
  const auto qs = row_strides(q), ks = row_strides(k), vs = row_strides(v), os = row_strides(out);
  std::array<int64_t, 4> ms{};
  if (mask.has_value()) ms = {mask->stride(0), mask->stride(1), mask->stride(2), mask->stride(3)};
  check_launch(attention_forward(scalar_kind(q, op), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                                 mask.has_value() ? mask->const_data_ptr() : nullptr, out.mutable_data_ptr(),
                                 out.scalar_type() == at::kFloat, lse.mutable_data_ptr<float>(), shape.data(),
                                 qs.data(), ks.data(), vs.data(), mask.has_value() ? ms.data() : nullptr, os.data(),
                                 static_cast<float>(scale), is_causal, dropout_p, seed, current_stream(q)),
               op);
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse, double dropout_p,
    bool is_causal, double scale, int64_t seed, bool mask_grad) {
  const char* op = "fastdl::attention_backward_kernel";
  check_inputs(query, key, value, mask, op);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == query.scalar_type(), op,
              ": grad_out must match the output's shape and the query's dtype");
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = unit_stride(query), k = unit_stride(key), v = unit_stride(value), g = unit_stride(grad_out);
  // δ_i = dO_i · O_i in fp32 (O unrounded: fp32 for fp16/bf16 inputs): one row reduction, cheaper here than a
  // pass inside both kernels.
  const at::Tensor delta = (g.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor lse32 = lse.to(at::kFloat).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dmask = mask_grad ? at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options())
                               : at::empty({0}, q.options());
  const auto shape = shape_of(q, k, v);
  const auto qs = row_strides(q), ks = row_strides(k), vs = row_strides(v), gs = row_strides(g);
  std::array<int64_t, 4> ms{};
  if (mask.has_value()) ms = {mask->stride(0), mask->stride(1), mask->stride(2), mask->stride(3)};
  check_launch(attention_backward(scalar_kind(q, op), g.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(),
                                  v.const_data_ptr(), mask.has_value() ? mask->const_data_ptr() : nullptr,
                                  lse32.const_data_ptr<float>(), delta.const_data_ptr<float>(), dq.mutable_data_ptr(),
                                  dk.mutable_data_ptr(), dv.mutable_data_ptr(),
                                  mask_grad ? dmask.mutable_data_ptr() : nullptr, shape.data(), qs.data(), ks.data(),
                                  vs.data(), mask.has_value() ? ms.data() : nullptr, gs.data(),
                                  static_cast<float>(scale), is_causal, dropout_p, seed, current_stream(q)),
               op);
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace cuda
}  // namespace fastdl

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("attention_forward_kernel", &fastdl::cuda::attention_forward_cuda);
  m.impl("attention_backward_kernel", &fastdl::cuda::attention_backward_cuda);
}
