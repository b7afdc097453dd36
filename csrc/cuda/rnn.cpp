// Torch glue for the CUDA LSTM/GRU kernels in rnn.cu: checks, allocation, stream, and the time loops.
//
// The general sequence path is the "GEMM + fused pointwise" design: per step one cuBLAS GEMM h·W_hhᵀ (through
// ATen, fp32 accumulation for fp16/bf16) and one launch of the fused cell kernel; backward through time
// the same in reverse, with dW_hh (and dW_hr) formed after the loop as one large GEMM over all steps.
// Bookkeeping of packed sequences (which rows run at each step, where their previous state is) follows
// csrc/cpu/rnn.cpp; on the GPU all rows of a step go in one launch instead of one slice per CPU thread.
// Small batches of whole sequences first try the persistent kernel (rnn.cu), one launch per layer.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../cpu/rnn_steps.h"
#include "torch_glue.h"

namespace fastdl {
namespace cuda {

cudaError_t lstm_pointwise_forward(ScalarKind kind, const void* input_gates, const void* hidden_gates, const void* c_carry,
                                   const void* c_initial, void* gates, void* c, void* h, int64_t rows, int64_t continuing,
                                   int64_t hidden, cudaStream_t stream);
cudaError_t lstm_pointwise_backward(ScalarKind kind, const void* dh, void* dc, const void* gates, const void* c,
                                    const void* c_carry, const void* c_initial, void* grad_gates, int64_t rows,
                                    int64_t continuing, int64_t hidden, cudaStream_t stream);
cudaError_t lstm_unprojected(ScalarKind kind, const void* gates, const void* c, void* r, int64_t rows, int64_t hidden,
                             cudaStream_t stream);
cudaError_t gru_pointwise_forward(ScalarKind kind, const void* input_gates, const void* hidden_gates, const void* h_carry,
                                  const void* h_initial, void* saved, void* h, int64_t rows, int64_t continuing,
                                  int64_t hidden, cudaStream_t stream);
cudaError_t gru_pointwise_backward(ScalarKind kind, const void* dh, const void* saved, const void* h_carry,
                                   const void* h_initial, void* grad_input_gates, void* grad_hidden_gates,
                                   void* grad_h_prev, int64_t rows, int64_t continuing, int64_t hidden,
                                   cudaStream_t stream);
// Runs a whole layer in one cooperative launch when the shape suits it (a few rows whose weights fit in
// the GPU's shared memories); cudaErrorNotSupported means "use the GEMM + pointwise loop".
cudaError_t persistent_layer_forward(ScalarKind kind, bool lstm, const void* input_proj, const void* h0, const void* c0,
                                     const void* w_hh, const void* b_hh, void* output, void* saved, void* cells,
                                     void* h_n, void* c_n, int64_t time, int64_t batch, int64_t hidden, bool reverse,
                                     cudaStream_t stream);

namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
}

// The previous step's tensor for rows that carry state, or nullptr at the first step.
const void* carry_of(const Steps& steps, int64_t t, const at::Tensor& sequence) {
  return steps.has_previous(t) ? sequence[steps.previous(t)].const_data_ptr() : nullptr;
}

void recurrent_gemm(const Steps& steps, int64_t t, const at::Tensor& output, const at::Tensor& h0,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const auto gemm = [&](const at::Tensor& h, int64_t begin, int64_t end) {
    if (end <= begin) return;
    at::Tensor target = out.narrow(0, begin, end - begin);
    const at::Tensor operand = h.narrow(0, begin, end - begin);
    if (bias.has_value())
      at::addmm_out(target, *bias, operand, weight.t());
    else
      at::mm_out(target, operand, weight.t());
  };
  const int64_t continuing = steps.continuing(t);
  if (continuing > 0) gemm(output[steps.previous(t)], 0, continuing);
  gemm(h0, continuing, steps.active(t));
}

void accumulate_recurrent_weight_grad(const Steps& steps, int64_t time, const at::Tensor& grad_gates,
                                      const at::Tensor& output, const at::Tensor& h0, bool reverse, at::Tensor& grad_w) {
  const int64_t gates = grad_gates.size(2), hidden = output.size(2);
  if (time > 1) {
    const at::Tensor later = grad_gates.narrow(0, reverse ? 0 : 1, time - 1).reshape({-1, gates});
    const at::Tensor earlier = output.narrow(0, reverse ? 1 : 0, time - 1).reshape({-1, hidden});
    grad_w.addmm_(later.t(), earlier);
  }
  for (int64_t t = 0; t < time; ++t) {
    const int64_t begin = steps.continuing(t), end = steps.active(t);
    if (end > begin) grad_w.addmm_(grad_gates[t].narrow(0, begin, end - begin).t(), h0.narrow(0, begin, end - begin));
  }
}

// ---------------------------------------------------------------------------------------------- cells

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_pointwise_forward_cuda(const at::Tensor& input_gates,
                                                                            const at::Tensor& hidden_gates,
                                                                            const at::Tensor& cx) {
  const char* op = "fastdl::lstm_pointwise_forward";
  check_cuda(cx, op, "cx");
  TORCH_CHECK(input_gates.dim() == 2 && input_gates.sizes() == hidden_gates.sizes() && cx.dim() == 2 &&
                  input_gates.size(1) == 4 * cx.size(1) && input_gates.size(0) == cx.size(0),
              op, ": expected gates of shape (B, 4H) and cx of shape (B, H)");
  const c10::cuda::CUDAGuard guard(cx.device());
  const at::Tensor ig = input_gates.contiguous(), hg = hidden_gates.contiguous(), c_prev = cx.contiguous();
  at::Tensor gates = at::empty_like(ig), cy = at::empty_like(c_prev), hy = at::empty_like(c_prev);
  check_launch(lstm_pointwise_forward(scalar_kind(cx, op), ig.const_data_ptr(), hg.const_data_ptr(), nullptr,
                                      c_prev.const_data_ptr(), gates.mutable_data_ptr(), cy.mutable_data_ptr(),
                                      hy.mutable_data_ptr(), cx.size(0), 0, cx.size(1), current_stream(cx)),
               op);
  return {hy, cy, gates};
}

std::tuple<at::Tensor, at::Tensor> lstm_pointwise_backward_cuda(const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                                                                const at::Tensor& gates, const at::Tensor& cx,
                                                                const at::Tensor& cy) {
  const char* op = "fastdl::lstm_pointwise_backward";
  check_cuda(gates, op, "gates");
  const c10::cuda::CUDAGuard guard(cx.device());
  const at::Tensor dh = grad_hy.contiguous(), g = gates.contiguous(), c_prev = cx.contiguous(), c = cy.contiguous();
  at::Tensor grad_cx = grad_cy.contiguous().clone(), grad_gates = at::empty_like(g);
  check_launch(lstm_pointwise_backward(scalar_kind(cx, op), dh.const_data_ptr(), grad_cx.mutable_data_ptr(),
                                       g.const_data_ptr(), c.const_data_ptr(), nullptr, c_prev.const_data_ptr(),
                                       grad_gates.mutable_data_ptr(), cx.size(0), 0, cx.size(1), current_stream(cx)),
               op);
  return {grad_gates, grad_cx};
}

std::tuple<at::Tensor, at::Tensor> gru_pointwise_forward_cuda(const at::Tensor& input_gates,
                                                              const at::Tensor& hidden_gates, const at::Tensor& hx) {
  const char* op = "fastdl::gru_pointwise_forward";
  check_cuda(hx, op, "hx");
  TORCH_CHECK(input_gates.dim() == 2 && input_gates.sizes() == hidden_gates.sizes() && hx.dim() == 2 &&
                  input_gates.size(1) == 3 * hx.size(1) && input_gates.size(0) == hx.size(0),
              op, ": expected gates of shape (B, 3H) and hx of shape (B, H)");
  const c10::cuda::CUDAGuard guard(hx.device());
  const at::Tensor gi = input_gates.contiguous(), gh = hidden_gates.contiguous(), h_prev = hx.contiguous();
  at::Tensor saved = at::empty({hx.size(0), 4 * hx.size(1)}, gi.options()), hy = at::empty_like(h_prev);
  check_launch(gru_pointwise_forward(scalar_kind(hx, op), gi.const_data_ptr(), gh.const_data_ptr(), nullptr,
                                     h_prev.const_data_ptr(), saved.mutable_data_ptr(), hy.mutable_data_ptr(), hx.size(0),
                                     0, hx.size(1), current_stream(hx)),
               op);
  return {hy, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_pointwise_backward_cuda(const at::Tensor& grad_hy,
                                                                           const at::Tensor& saved, const at::Tensor& hx) {
  const char* op = "fastdl::gru_pointwise_backward";
  check_cuda(saved, op, "saved");
  const c10::cuda::CUDAGuard guard(hx.device());
  const at::Tensor dh = grad_hy.contiguous(), s = saved.contiguous(), h_prev = hx.contiguous();
  at::Tensor grad_gi = at::empty({hx.size(0), 3 * hx.size(1)}, s.options()), grad_gh = at::empty_like(grad_gi),
             grad_hx = at::empty_like(h_prev);
  check_launch(gru_pointwise_backward(scalar_kind(hx, op), dh.const_data_ptr(), s.const_data_ptr(), nullptr,
                                      h_prev.const_data_ptr(), grad_gi.mutable_data_ptr(), grad_gh.mutable_data_ptr(),
                                      grad_hx.mutable_data_ptr(), hx.size(0), 0, hx.size(1), current_stream(hx)),
               op);
  return {grad_gi, grad_gh, grad_hx};
}

// ---------------------------------------------------------------------------------------------- layers

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_sequence_forward_cuda(
    const at::Tensor& input_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const char* op = "fastdl::lstm_sequence_forward";
  check_cuda(input_proj, op, "input_proj");
  const int64_t H = c0.size(1), P = h0.size(1), T = input_proj.size(0), B = input_proj.size(1);
  TORCH_CHECK(input_proj.dim() == 3 && input_proj.size(2) == 4 * H, op, ": expected input_proj of shape (T, B, 4H)");
  const c10::cuda::CUDAGuard guard(input_proj.device());
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor proj = input_proj.contiguous(), h_init = h0.contiguous(), c_init = c0.contiguous();
  const auto options = proj.options();
  const ScalarKind kind = scalar_kind(proj, op);
  const cudaStream_t stream = current_stream(proj);
  at::Tensor output = steps.allocate({T, B, P}, options), gates = steps.allocate({T, B, 4 * H}, options),
             cells = steps.allocate({T, B, H}, options);
  at::Tensor h_n = h_init.clone(), c_n = c_init.clone();
  if (!batch_sizes.has_value() && !w_hr.has_value()) {
    const at::Tensor weight = w_hh.contiguous();
    const cudaError_t status = persistent_layer_forward(
        kind, true, proj.const_data_ptr(), h_init.const_data_ptr(), c_init.const_data_ptr(), weight.const_data_ptr(),
        nullptr, output.mutable_data_ptr(), gates.mutable_data_ptr(), cells.mutable_data_ptr(), h_n.mutable_data_ptr(),
        c_n.mutable_data_ptr(), T, B, H, reverse, stream);
    if (status != cudaErrorNotSupported) {
      check_launch(status, op);
      return {output, h_n, c_n, gates, cells};
    }
  }
  at::Tensor hidden_gates = at::empty({B, 4 * H}, options);
  at::Tensor unprojected = w_hr.has_value() ? at::empty({B, H}, options) : at::Tensor();
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = steps.at(step), active = steps.active(t);
    recurrent_gemm(steps, t, output, h_init, w_hh, std::nullopt, hidden_gates);
    at::Tensor output_t = output[t], cells_t = cells[t];
    at::Tensor& h_target = w_hr.has_value() ? unprojected : output_t;
    check_launch(lstm_pointwise_forward(kind, proj[t].const_data_ptr(), hidden_gates.const_data_ptr(),
                                        carry_of(steps, t, cells), c_init.const_data_ptr(), gates[t].mutable_data_ptr(),
                                        cells_t.mutable_data_ptr(), h_target.mutable_data_ptr(), active,
                                        steps.continuing(t), H, stream),
                 op);
    if (w_hr.has_value() && active > 0) {
      at::Tensor target = output_t.narrow(0, 0, active);
      at::mm_out(target, unprojected.narrow(0, 0, active), w_hr->t());
    }
    const int64_t finishing = steps.first_finishing(t);
    if (active > finishing) {
      h_n.narrow(0, finishing, active - finishing).copy_(output_t.narrow(0, finishing, active - finishing));
      c_n.narrow(0, finishing, active - finishing).copy_(cells_t.narrow(0, finishing, active - finishing));
    }
  }
  return {output, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_sequence_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& output, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
    bool reverse) {
  const char* op = "fastdl::lstm_sequence_backward";
  check_cuda(gates, op, "gates");
  const int64_t H = c0.size(1), P = h0.size(1), T = gates.size(0), B = gates.size(1);
  const c10::cuda::CUDAGuard guard(gates.device());
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor grad_out = grad_output.contiguous(), g = gates.contiguous(), c = cells.contiguous(),
                   out = output.contiguous(), h_init = h0.contiguous(), c_init = c0.contiguous();
  const auto options = g.options();
  const ScalarKind kind = scalar_kind(g, op);
  const cudaStream_t stream = current_stream(g);
  at::Tensor grad_proj = steps.allocate({T, B, 4 * H}, options);
  at::Tensor dh_carry = grad_h_n.contiguous().clone(), dc_carry = grad_c_n.contiguous().clone();
  at::Tensor dh_all = w_hr.has_value() ? steps.allocate({T, B, P}, options) : at::Tensor();
  at::Tensor dh_step = w_hr.has_value() ? at::Tensor() : at::empty({B, P}, options);
  at::Tensor dh_cell = w_hr.has_value() ? at::empty({B, H}, options) : at::Tensor();
  for (int64_t step = T - 1; step >= 0; --step) {
    const int64_t t = steps.at(step), active = steps.active(t);
    if (active == 0) continue;
    at::Tensor dh_total = w_hr.has_value() ? dh_all[t] : dh_step;
    at::Tensor dh_rows = dh_total.narrow(0, 0, active);
    at::add_out(dh_rows, grad_out[t].narrow(0, 0, active), dh_carry.narrow(0, 0, active));
    if (w_hr.has_value()) {
      at::Tensor target = dh_cell.narrow(0, 0, active);
      at::mm_out(target, dh_rows, *w_hr);
    }
    const at::Tensor& dh = w_hr.has_value() ? dh_cell : dh_total;
    at::Tensor grad_t = grad_proj[t];
    check_launch(lstm_pointwise_backward(kind, dh.const_data_ptr(), dc_carry.mutable_data_ptr(), g[t].const_data_ptr(),
                                         c[t].const_data_ptr(), carry_of(steps, t, c), c_init.const_data_ptr(),
                                         grad_t.mutable_data_ptr(), active, steps.continuing(t), H, stream),
                 op);
    at::Tensor carry_rows = dh_carry.narrow(0, 0, active);
    at::mm_out(carry_rows, grad_t.narrow(0, 0, active), w_hh);
  }
  at::Tensor grad_w_hh = at::zeros_like(w_hh);
  accumulate_recurrent_weight_grad(steps, T, grad_proj, out, h_init, reverse, grad_w_hh);
  at::Tensor grad_w_hr = at::empty({0}, options);
  if (w_hr.has_value()) {
    // Inactive positions hold zeros in gates and cells (packed input), so their o ⊙ tanh c is zero too.
    at::Tensor unprojected = at::empty({T, B, H}, options);
    check_launch(lstm_unprojected(kind, g.const_data_ptr(), c.const_data_ptr(), unprojected.mutable_data_ptr(), T * B, H,
                                  stream),
                 op);
    grad_w_hr = at::mm(dh_all.reshape({-1, P}).t(), unprojected.reshape({-1, H}));
  }
  return {grad_proj, dh_carry, dc_carry, grad_w_hh, grad_w_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_sequence_forward_cuda(const at::Tensor& input_proj,
                                                                         const at::Tensor& h0, const at::Tensor& w_hh,
                                                                         const std::optional<at::Tensor>& b_hh,
                                                                         const std::optional<at::Tensor>& batch_sizes,
                                                                         bool reverse) {
  const char* op = "fastdl::gru_sequence_forward";
  check_cuda(input_proj, op, "input_proj");
  const int64_t H = h0.size(1), T = input_proj.size(0), B = input_proj.size(1);
  TORCH_CHECK(input_proj.dim() == 3 && input_proj.size(2) == 3 * H, op, ": expected input_proj of shape (T, B, 3H)");
  const c10::cuda::CUDAGuard guard(input_proj.device());
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor proj = input_proj.contiguous(), h_init = h0.contiguous();
  const auto options = proj.options();
  const ScalarKind kind = scalar_kind(proj, op);
  const cudaStream_t stream = current_stream(proj);
  at::Tensor output = steps.allocate({T, B, H}, options), saved = steps.allocate({T, B, 4 * H}, options);
  at::Tensor h_n = h_init.clone();
  if (!batch_sizes.has_value()) {
    const at::Tensor weight = w_hh.contiguous();
    const std::optional<at::Tensor> bias = b_hh.has_value() ? std::optional<at::Tensor>(b_hh->contiguous()) : std::nullopt;
    const cudaError_t status = persistent_layer_forward(
        kind, false, proj.const_data_ptr(), h_init.const_data_ptr(), nullptr, weight.const_data_ptr(),
        bias.has_value() ? bias->const_data_ptr() : nullptr, output.mutable_data_ptr(), saved.mutable_data_ptr(),
        nullptr, h_n.mutable_data_ptr(), nullptr, T, B, H, reverse, stream);
    if (status != cudaErrorNotSupported) {
      check_launch(status, op);
      return {output, h_n, saved};
    }
  }
  at::Tensor hidden_gates = at::empty({B, 3 * H}, options);
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = steps.at(step), active = steps.active(t);
    recurrent_gemm(steps, t, output, h_init, w_hh, b_hh, hidden_gates);
    at::Tensor output_t = output[t];
    check_launch(gru_pointwise_forward(kind, proj[t].const_data_ptr(), hidden_gates.const_data_ptr(),
                                       carry_of(steps, t, output), h_init.const_data_ptr(), saved[t].mutable_data_ptr(),
                                       output_t.mutable_data_ptr(), active, steps.continuing(t), H, stream),
                 op);
    const int64_t finishing = steps.first_finishing(t);
    if (active > finishing)
      h_n.narrow(0, finishing, active - finishing).copy_(output_t.narrow(0, finishing, active - finishing));
  }
  return {output, h_n, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_sequence_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& saved, const at::Tensor& output,
    const at::Tensor& h0, const at::Tensor& w_hh, bool has_bias, const std::optional<at::Tensor>& batch_sizes,
    bool reverse) {
  const char* op = "fastdl::gru_sequence_backward";
  check_cuda(saved, op, "saved");
  const int64_t H = h0.size(1), T = saved.size(0), B = saved.size(1);
  const c10::cuda::CUDAGuard guard(saved.device());
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor grad_out = grad_output.contiguous(), s = saved.contiguous(), out = output.contiguous(),
                   h_init = h0.contiguous();
  const auto options = s.options();
  const ScalarKind kind = scalar_kind(s, op);
  const cudaStream_t stream = current_stream(s);
  at::Tensor grad_proj = steps.allocate({T, B, 3 * H}, options), grad_hidden = steps.allocate({T, B, 3 * H}, options);
  at::Tensor dh_carry = grad_h_n.contiguous().clone(), dh_total = at::empty({B, H}, options);
  for (int64_t step = T - 1; step >= 0; --step) {
    const int64_t t = steps.at(step), active = steps.active(t);
    if (active == 0) continue;
    at::Tensor dh_rows = dh_total.narrow(0, 0, active);
    at::add_out(dh_rows, grad_out[t].narrow(0, 0, active), dh_carry.narrow(0, 0, active));
    at::Tensor grad_hidden_t = grad_hidden[t];
    check_launch(gru_pointwise_backward(kind, dh_total.const_data_ptr(), s[t].const_data_ptr(), carry_of(steps, t, out),
                                        h_init.const_data_ptr(), grad_proj[t].mutable_data_ptr(),
                                        grad_hidden_t.mutable_data_ptr(), dh_carry.mutable_data_ptr(), active,
                                        steps.continuing(t), H, stream),
                 op);
    dh_carry.narrow(0, 0, active).addmm_(grad_hidden_t.narrow(0, 0, active), w_hh);
  }
  at::Tensor grad_w_hh = at::zeros_like(w_hh);
  accumulate_recurrent_weight_grad(steps, T, grad_hidden, out, h_init, reverse, grad_w_hh);
  at::Tensor grad_b_hh = has_bias ? grad_hidden.sum({0, 1}) : at::empty({0}, options);
  return {grad_proj, dh_carry, grad_w_hh, grad_b_hh};
}

}  // namespace
}  // namespace cuda
}  // namespace fastdl

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("lstm_pointwise_forward", &fastdl::cuda::lstm_pointwise_forward_cuda);
  m.impl("lstm_pointwise_backward", &fastdl::cuda::lstm_pointwise_backward_cuda);
  m.impl("gru_pointwise_forward", &fastdl::cuda::gru_pointwise_forward_cuda);
  m.impl("gru_pointwise_backward", &fastdl::cuda::gru_pointwise_backward_cuda);
  m.impl("lstm_sequence_forward", &fastdl::cuda::lstm_sequence_forward_cuda);
  m.impl("lstm_sequence_backward", &fastdl::cuda::lstm_sequence_backward_cuda);
  m.impl("gru_sequence_forward", &fastdl::cuda::gru_sequence_forward_cuda);
  m.impl("gru_sequence_backward", &fastdl::cuda::gru_sequence_backward_cuda);
}
