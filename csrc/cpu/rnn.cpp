// LSTM and GRU on the CPU: fused cell pointwise kernels and whole-layer time loops, forward and backward.
//
// LSTM (gate order i, f, g, o), with pre-activations a = x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh:
//   i = σ(a_i)  f = σ(a_f)  g = tanh(a_g)  o = σ(a_o)
//   c' = f ⊙ c + i ⊙ g      h' = o ⊙ tanh(c')        (with proj_size: h' = (o ⊙ tanh(c'))·W_hrᵀ)
// Backward, with dh, dc the gradients reaching h', c' (dh taken before the projection):
//   dc̃ = dc + dh ⊙ o ⊙ (1 − tanh²c')
//   da_i = dc̃ ⊙ g ⊙ i(1−i)   da_f = dc̃ ⊙ c ⊙ f(1−f)   da_g = dc̃ ⊙ i ⊙ (1−g²)   da_o = dh ⊙ tanh c' ⊙ o(1−o)
//   dc_prev = dc̃ ⊙ f
// so backward needs the activated gates (i, f, g, o), c' and c — saved by forward; tanh c' is recomputed
// (one tanh per element is cheaper than storing and re-reading another [T, B, H] tensor).
//
// GRU (gate order r, z, n), with gi = x·W_ihᵀ + b_ih and gh = h·W_hhᵀ + b_hh:
//   r = σ(gi_r + gh_r)  z = σ(gi_z + gh_z)  n = tanh(gi_n + r ⊙ gh_n)  h' = (1 − z) ⊙ n + z ⊙ h
// Backward: dn = dh ⊙ (1−z) ⊙ (1−n²), dgi = (dr̃, dz̃, dn), dgh = (dr̃, dz̃, dn ⊙ r), dh_prev = dh ⊙ z + dgh·W_hh
// with dr̃ = dn ⊙ gh_n ⊙ r(1−r), dz̃ = dh ⊙ (h − n) ⊙ z(1−z): forward saves r, z, n and gh_n.
//
// A layer (one direction) receives its input projection for all time steps, computed by the caller as
// one GEMM; here only the recurrence runs: per step one GEMM h·W_hhᵀ through ATen (MKL/oneDNN) and one
// fused, vectorized pass over the gates. Backward through time runs the same loop in reverse, writes the
// pre-activation gradients of every step into one [T, B, G] tensor — which is the gradient of the input
// projection — and then forms dW_hh (and dW_hr) as ONE large GEMM over all steps instead of T small ones.
//
// Packed sequences arrive padded, time-major, sorted by decreasing length (as PackedSequence stores them),
// so the rows active at step t are a prefix 0 … batch_sizes[t]−1. Inactive rows are neither read nor
// written: outputs and saved tensors are zero there, and the state of a row is read from the step where
// it was last written (or from the initial state), so no state is ever copied.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "common.h"
#include "rnn_steps.h"

namespace fastdl {
namespace cpu {
namespace {

// σ and tanh that GCC vectorizes (the C library's do not): e^−x = 2^(−x·log₂e) through exp2_bounded,
// clamped to |exponent| ≤ 125 where σ is already 0 or 1 to fp32 precision. NaN passes through.
FASTDL_INLINE float sigmoid_of(float x) {
  float z = -1.4426950408889634f * x;
  z = z < -125.0f ? -125.0f : z;
  z = z > 125.0f ? 125.0f : z;
  return 1.0f / (1.0f + exp2_bounded(z));
}
// tanh x = 2σ(2x) − 1: absolute error ~1e-7 near 0, the fp32 rounding of the terms it is added to.
FASTDL_INLINE float tanh_of(float x) { return 2.0f * sigmoid_of(2.0f * x) - 1.0f; }
// Doubles serve gradcheck and fp64 oracles: exact library functions.
FASTDL_INLINE double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }
FASTDL_INLINE double tanh_of(double x) { return std::tanh(x); }

// One row of the LSTM cell: pre-activations input_gates + hidden_gates (4H each) and the previous cell
// state in; activated gates, new cell state and o ⊙ tanh(c') out.
template <typename T>
FASTDL_INLINE void lstm_forward_row(const T* __restrict__ input_gates, const T* __restrict__ hidden_gates,
                                        const T* __restrict__ c_prev, T* __restrict__ gates, T* __restrict__ c,
                                        T* __restrict__ h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T i = sigmoid_of(input_gates[j] + hidden_gates[j]);
    const T f = sigmoid_of(input_gates[H + j] + hidden_gates[H + j]);
    const T g = tanh_of(input_gates[2 * H + j] + hidden_gates[2 * H + j]);
    const T o = sigmoid_of(input_gates[3 * H + j] + hidden_gates[3 * H + j]);
    const T c_new = f * c_prev[j] + i * g;
    gates[j] = i;
    gates[H + j] = f;
    gates[2 * H + j] = g;
    gates[3 * H + j] = o;
    c[j] = c_new;
    h[j] = o * tanh_of(c_new);
  }
}

// One row of the LSTM cell backward. `dc` holds the gradient reaching c' and is overwritten with the
// gradient reaching c (the carry of backward through time).
template <typename T>
FASTDL_INLINE void lstm_backward_row(const T* __restrict__ dh, T* __restrict__ dc, const T* __restrict__ gates,
                                         const T* __restrict__ c, const T* __restrict__ c_prev,
                                         T* __restrict__ grad_gates, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const T tanh_c = tanh_of(c[j]);
    const T dc_total = dc[j] + dh[j] * o * (1 - tanh_c * tanh_c);
    grad_gates[j] = dc_total * g * i * (1 - i);
    grad_gates[H + j] = dc_total * c_prev[j] * f * (1 - f);
    grad_gates[2 * H + j] = dc_total * i * (1 - g * g);
    grad_gates[3 * H + j] = dh[j] * tanh_c * o * (1 - o);
    dc[j] = dc_total * f;
  }
}

// o ⊙ tanh(c') from the saved gates and cell state: what the projection W_hr was applied to.
template <typename T>
FASTDL_INLINE void lstm_projected_row(const T* __restrict__ gates, const T* __restrict__ c, T* __restrict__ r,
                                          int64_t H) {
  for (int64_t j = 0; j < H; ++j) r[j] = gates[3 * H + j] * tanh_of(c[j]);
}

// One row of the GRU cell: gi, gh (3H each) and h in; saved (r, z, n, gh_n) and h' out.
template <typename T>
FASTDL_INLINE void gru_forward_row(const T* __restrict__ gi, const T* __restrict__ gh, const T* __restrict__ h_prev,
                                       T* __restrict__ saved, T* __restrict__ h, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid_of(gi[j] + gh[j]);
    const T z = sigmoid_of(gi[H + j] + gh[H + j]);
    const T gh_n = gh[2 * H + j];
    const T n = tanh_of(gi[2 * H + j] + r * gh_n);
    saved[j] = r;
    saved[H + j] = z;
    saved[2 * H + j] = n;
    saved[3 * H + j] = gh_n;
    h[j] = n + z * (h_prev[j] - n);
  }
}

// One row of the GRU cell backward: gradients of gi, gh and the direct part dh ⊙ z of h's gradient.
template <typename T>
FASTDL_INLINE void gru_backward_row(const T* __restrict__ dh, const T* __restrict__ saved,
                                        const T* __restrict__ h_prev, T* __restrict__ grad_gi, T* __restrict__ grad_gh,
                                        T* __restrict__ grad_h_prev, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = saved[j], z = saved[H + j], n = saved[2 * H + j], gh_n = saved[3 * H + j];
    const T dn = dh[j] * (1 - z) * (1 - n * n);
    const T dz = dh[j] * (h_prev[j] - n) * z * (1 - z);
    const T dr = dn * gh_n * r * (1 - r);
    grad_gi[j] = dr;
    grad_gi[H + j] = dz;
    grad_gi[2 * H + j] = dn;
    grad_gh[j] = dr;
    grad_gh[H + j] = dz;
    grad_gh[2 * H + j] = dn * r;
    grad_h_prev[j] = dh[j] * z;
  }
}

// Rows of one step, split across threads only when there is enough work to pay for waking them.
template <typename Fn>
void for_rows(int64_t rows, int64_t row_elements, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

// Rows of a batch are independent through the whole recurrence, so each thread runs the entire time loop
// on its own slice of rows: no synchronization per step (barriers per step are what makes a loaded
// 2-core machine crawl), and the per-step GEMMs run single-threaded inside (nested regions are serial).
template <typename Fn>
void for_batch_slices(int64_t batch, Fn&& fn) {
  constexpr int64_t kMinSliceRows = 4;  // below this a GEMM slice wastes most of its register tile
  at::parallel_for(0, batch, kMinSliceRows, [&](int64_t lo, int64_t hi) {
    // Dispatch state is thread-local and worker threads start with autograd on: the ATen calls made
    // here work on the op's own buffers and must dispatch below autograd, as on the calling thread.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    fn(lo, hi);
  });
}

// The recurrent GEMMs multiply every step's rows by the same matrix. oneDNN's matmul, given that matrix
// reordered once per layer into its own blocked layout, ran 1.1–2× faster on these short-and-wide
// products (M = the 16–32 rows of a batch slice, K, N = 512–2048) than MKL's sgemm, which repacks the
// matrix on every call; a whole single-threaded LSTM layer (seq 100, batch 32, 256 → 512) got ~1.2× faster. ATen exposes that matmul only as the operators mkldnn::_reorder_linear_weight and
// mkldnn::_linear_pointwise (those torch.compile's CPU backend uses for frozen linear layers), so they
// are called through the dispatcher. Doubles (gradcheck) and builds without oneDNN use at::mm on a
// contiguous transpose: MKL streams that as it is, where a transposed view made it repack the whole
// weight on every step (measured: 68 vs 47 GFLOP/s for 16×512·512×2048).
class RecurrentWeight {
 public:
  // Multiplies by Wᵀ: `weight` is W, shape (N, K); `rows` is the usual row count of the products.
  RecurrentWeight(const at::Tensor& weight, int64_t rows) {
    // Below AVX2, oneDNN's GEMM is the slower one (see fastdl/_linear.py).
    if (weight.scalar_type() == at::kFloat && onednn_ops().has_value() && cpu_isa() != CpuIsa::baseline)
      packed_ = onednn_ops()->reorder.call(weight.contiguous(), rows);
    else
      transposed_ = weight.t().contiguous();
  }
  // h·Wᵀ (+ bias), a new (M, N) tensor.
  at::Tensor times(const at::Tensor& h, const std::optional<at::Tensor>& bias = std::nullopt) const {
    if (!packed_.defined()) return bias.has_value() ? at::addmm(*bias, h, transposed_) : at::mm(h, transposed_);
    return onednn_ops()->linear.call(h.contiguous(), packed_, bias, "none", c10::List<std::optional<at::Scalar>>(),
                                     std::nullopt);
  }
  // target = h·Wᵀ, into an existing (possibly strided) tensor.
  void times_into(at::Tensor& target, const at::Tensor& h) const {
    if (packed_.defined())
      target.copy_(times(h));
    else
      at::mm_out(target, h, transposed_);
  }
  // target += h·Wᵀ.
  void add_times_to(at::Tensor& target, const at::Tensor& h) const {
    if (packed_.defined())
      target.add_(times(h));
    else
      target.addmm_(h, transposed_);
  }

 private:
  using Reorder = at::Tensor(const at::Tensor&, std::optional<int64_t>);
  using Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);
  struct OneDnnOps {
    c10::TypedOperatorHandle<Reorder> reorder;
    c10::TypedOperatorHandle<Linear> linear;
  };
  static const std::optional<OneDnnOps>& onednn_ops() {
    static const std::optional<OneDnnOps> ops = []() -> std::optional<OneDnnOps> {
      if (!at::hasMKLDNN()) return std::nullopt;
      const auto reorder = c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
      const auto linear = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
      if (!reorder.has_value() || !linear.has_value()) return std::nullopt;
      // A torch whose operators changed signature throws here: fall back to at::mm rather than fail.
      try {
        return OneDnnOps{reorder->typed<Reorder>(), linear->typed<Linear>()};
      } catch (const c10::Error&) {
        return std::nullopt;
      }
    }();
    return ops;
  }
  at::Tensor packed_, transposed_;
};

// Rows [rows.begin, rows.end) of (previous step's h, or h0 for rows starting now)·Wᵀ (+ bias): the
// recurrent GEMM of step t, as one product (row b at index b − rows.begin).
at::Tensor recurrent_gemm(const Steps& steps, int64_t t, const Steps::Rows& rows, const at::Tensor& output,
                          const at::Tensor& h0, const RecurrentWeight& weight, const std::optional<at::Tensor>& bias) {
  const at::Tensor continuing = rows.continuing > rows.begin
                                    ? output[steps.previous(t)].narrow(0, rows.begin, rows.continuing - rows.begin)
                                    : at::Tensor();
  const at::Tensor starting = rows.end > rows.continuing ? h0.narrow(0, rows.continuing, rows.end - rows.continuing)
                                                         : at::Tensor();
  const at::Tensor h = !starting.defined() ? continuing
                       : !continuing.defined() ? starting
                                               : at::cat({continuing, starting});
  return weight.times(h, bias);
}

// The rows of a batch slice, the usual M of its recurrent GEMMs (the layout hint of RecurrentWeight).
int64_t slice_rows(int64_t batch) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (batch + threads - 1) / threads);
}

// Σ_t grad_gates[t]ᵀ · h_prev[t] over every step and row: one GEMM over all steps that have a previous
// step (inactive rows have zero gradient, and a row starting at t reads a zero output at the previous
// step), plus the rows whose previous state is h0. The GEMM writes the result directly (no zero fill).
at::Tensor recurrent_weight_grad(const Steps& steps, int64_t time, const at::Tensor& grad_gates,
                                 const at::Tensor& output, const at::Tensor& h0, bool reverse) {
  const int64_t gates = grad_gates.size(2), hidden = output.size(2);
  at::Tensor grad_w;
  if (time > 1) {
    const at::Tensor later = grad_gates.narrow(0, reverse ? 0 : 1, time - 1).reshape({-1, gates});
    const at::Tensor earlier = output.narrow(0, reverse ? 1 : 0, time - 1).reshape({-1, hidden});
    grad_w = at::mm(later.t(), earlier);
  } else {
    grad_w = at::zeros({gates, hidden}, grad_gates.options());
  }
  for (int64_t t = 0; t < time; ++t) {
    const int64_t begin = steps.continuing(t), end = steps.active(t);
    if (end > begin)
      grad_w.addmm_(grad_gates[t].narrow(0, begin, end - begin).t(), h0.narrow(0, begin, end - begin));
  }
  return grad_w;
}

template <typename T>
const T* row_of(const at::Tensor& matrix, int64_t row) {
  return matrix.const_data_ptr<T>() + row * matrix.stride(0);
}

template <typename T>
T* mutable_row_of(at::Tensor& matrix, int64_t row) {
  return matrix.mutable_data_ptr<T>() + row * matrix.stride(0);
}

void check_float(const at::Tensor& tensor, const char* op, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", tensor.scalar_type());
}

// ---------------------------------------------------------------------------------------------- cells

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_pointwise_forward(const at::Tensor& input_gates,
                                                                       const at::Tensor& hidden_gates,
                                                                       const at::Tensor& cx) {
  check_float(input_gates, "fastdl::lstm_pointwise_forward", "input_gates");
  TORCH_CHECK(input_gates.dim() == 2 && input_gates.sizes() == hidden_gates.sizes() && cx.dim() == 2 &&
                  input_gates.size(1) == 4 * cx.size(1) && input_gates.size(0) == cx.size(0),
              "fastdl::lstm_pointwise_forward: expected gates of shape (B, 4H) and cx of shape (B, H), got ",
              input_gates.sizes(), ", ", hidden_gates.sizes(), ", ", cx.sizes());
  const at::Tensor ig = input_gates.contiguous(), hg = hidden_gates.contiguous(), c_prev = cx.contiguous();
  const int64_t B = cx.size(0), H = cx.size(1);
  at::Tensor gates = at::empty_like(ig), cy = at::empty_like(c_prev), hy = at::empty_like(c_prev);
  AT_DISPATCH_FLOATING_TYPES(ig.scalar_type(), "fastdl::lstm_pointwise_forward", [&] {
    for_rows(B, 4 * H, [&](int64_t b) {
      with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
        lstm_forward_row<scalar_t>(row_of<scalar_t>(ig, b), row_of<scalar_t>(hg, b), row_of<scalar_t>(c_prev, b),
                                   mutable_row_of<scalar_t>(gates, b), mutable_row_of<scalar_t>(cy, b),
                                   mutable_row_of<scalar_t>(hy, b), H);
      });
    });
  });
  return {hy, cy, gates};
}

std::tuple<at::Tensor, at::Tensor> lstm_pointwise_backward(const at::Tensor& grad_hy, const at::Tensor& grad_cy,
                                                           const at::Tensor& gates, const at::Tensor& cx,
                                                           const at::Tensor& cy) {
  check_float(gates, "fastdl::lstm_pointwise_backward", "gates");
  const at::Tensor dh = grad_hy.contiguous(), g = gates.contiguous(), c_prev = cx.contiguous(), c = cy.contiguous();
  const int64_t B = cx.size(0), H = cx.size(1);
  at::Tensor grad_cx = grad_cy.contiguous().clone(), grad_gates = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastdl::lstm_pointwise_backward", [&] {
    for_rows(B, 4 * H, [&](int64_t b) {
      with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
        lstm_backward_row<scalar_t>(row_of<scalar_t>(dh, b), mutable_row_of<scalar_t>(grad_cx, b), row_of<scalar_t>(g, b),
                                    row_of<scalar_t>(c, b), row_of<scalar_t>(c_prev, b),
                                    mutable_row_of<scalar_t>(grad_gates, b), H);
      });
    });
  });
  return {grad_gates, grad_cx};
}

std::tuple<at::Tensor, at::Tensor> gru_pointwise_forward(const at::Tensor& input_gates, const at::Tensor& hidden_gates,
                                                         const at::Tensor& hx) {
  check_float(input_gates, "fastdl::gru_pointwise_forward", "input_gates");
  TORCH_CHECK(input_gates.dim() == 2 && input_gates.sizes() == hidden_gates.sizes() && hx.dim() == 2 &&
                  input_gates.size(1) == 3 * hx.size(1) && input_gates.size(0) == hx.size(0),
              "fastdl::gru_pointwise_forward: expected gates of shape (B, 3H) and hx of shape (B, H), got ",
              input_gates.sizes(), ", ", hidden_gates.sizes(), ", ", hx.sizes());
  const at::Tensor gi = input_gates.contiguous(), gh = hidden_gates.contiguous(), h_prev = hx.contiguous();
  const int64_t B = hx.size(0), H = hx.size(1);
  at::Tensor saved = at::empty({B, 4 * H}, gi.options()), hy = at::empty_like(h_prev);
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "fastdl::gru_pointwise_forward", [&] {
    for_rows(B, 4 * H, [&](int64_t b) {
      with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
        gru_forward_row<scalar_t>(row_of<scalar_t>(gi, b), row_of<scalar_t>(gh, b), row_of<scalar_t>(h_prev, b),
                                  mutable_row_of<scalar_t>(saved, b), mutable_row_of<scalar_t>(hy, b), H);
      });
    });
  });
  return {hy, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_pointwise_backward(const at::Tensor& grad_hy, const at::Tensor& saved,
                                                                      const at::Tensor& hx) {
  check_float(saved, "fastdl::gru_pointwise_backward", "saved");
  const at::Tensor dh = grad_hy.contiguous(), s = saved.contiguous(), h_prev = hx.contiguous();
  const int64_t B = hx.size(0), H = hx.size(1);
  at::Tensor grad_gi = at::empty({B, 3 * H}, s.options()), grad_gh = at::empty_like(grad_gi),
             grad_hx = at::empty_like(h_prev);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "fastdl::gru_pointwise_backward", [&] {
    for_rows(B, 4 * H, [&](int64_t b) {
      with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
        gru_backward_row<scalar_t>(row_of<scalar_t>(dh, b), row_of<scalar_t>(s, b), row_of<scalar_t>(h_prev, b),
                                   mutable_row_of<scalar_t>(grad_gi, b), mutable_row_of<scalar_t>(grad_gh, b),
                                   mutable_row_of<scalar_t>(grad_hx, b), H);
      });
    });
  });
  return {grad_gi, grad_gh, grad_hx};
}

// ---------------------------------------------------------------------------------------------- layers

void check_layer(const at::Tensor& input_proj, const at::Tensor& h0, int64_t gates_per_hidden, int64_t hidden,
                 const char* op) {
  check_float(input_proj, op, "input_proj");
  TORCH_CHECK(input_proj.dim() == 3 && input_proj.size(2) == gates_per_hidden * hidden && h0.dim() == 2 &&
                  h0.size(0) == input_proj.size(1),
              op, ": expected input_proj of shape (T, B, ", gates_per_hidden, "·H) and h0 of shape (B, ·), got ",
              input_proj.sizes(), " and ", h0.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_sequence_forward(
    const at::Tensor& input_proj, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const int64_t H = c0.size(1), P = h0.size(1);
  check_layer(input_proj, h0, 4, H, "fastdl::lstm_sequence_forward");
  const int64_t T = input_proj.size(0), B = input_proj.size(1);
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor proj = input_proj.contiguous(), h_init = h0.contiguous(), c_init = c0.contiguous();
  const auto options = proj.options();
  at::Tensor output = steps.allocate({T, B, P}, options), gates = steps.allocate({T, B, 4 * H}, options),
             cells = steps.allocate({T, B, H}, options);
  at::Tensor h_n = h_init.clone(), c_n = c_init.clone();
  // Without projection o ⊙ tanh(c') is h itself and goes straight to the output.
  at::Tensor unprojected = w_hr.has_value() ? at::empty({B, H}, options) : at::Tensor();
  const RecurrentWeight recurrent(w_hh, slice_rows(B));
  std::optional<RecurrentWeight> projection;
  if (w_hr.has_value()) projection.emplace(*w_hr, slice_rows(B));
  AT_DISPATCH_FLOATING_TYPES(proj.scalar_type(), "fastdl::lstm_sequence_forward", [&] {
    for_batch_slices(B, [&](int64_t lo, int64_t hi) {
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = steps.at(step);
        const Steps::Rows rows = steps.rows(t, lo, hi);
        if (rows.end == rows.begin) continue;
        const at::Tensor hidden_gates = recurrent_gemm(steps, t, rows, output, h_init, recurrent, std::nullopt);
        const at::Tensor proj_t = proj[t];
        at::Tensor gates_t = gates[t], cells_t = cells[t], output_t = output[t];
        at::Tensor& h_target = w_hr.has_value() ? unprojected : output_t;
        const at::Tensor cells_prev = steps.has_previous(t) ? cells[steps.previous(t)] : c_init;
        with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
          for (int64_t b = rows.begin; b < rows.end; ++b) {
            const scalar_t* c_prev =
                b < rows.continuing ? row_of<scalar_t>(cells_prev, b) : row_of<scalar_t>(c_init, b);
            lstm_forward_row<scalar_t>(row_of<scalar_t>(proj_t, b), row_of<scalar_t>(hidden_gates, b - rows.begin),
                                       c_prev, mutable_row_of<scalar_t>(gates_t, b),
                                       mutable_row_of<scalar_t>(cells_t, b), mutable_row_of<scalar_t>(h_target, b), H);
          }
        });
        const int64_t count = rows.end - rows.begin;
        if (w_hr.has_value()) {
          at::Tensor target = output_t.narrow(0, rows.begin, count);
          projection->times_into(target, unprojected.narrow(0, rows.begin, count));
        }
        const int64_t finishing = rows.end - rows.finishing;
        if (finishing > 0) {
          h_n.narrow(0, rows.finishing, finishing).copy_(output_t.narrow(0, rows.finishing, finishing));
          c_n.narrow(0, rows.finishing, finishing).copy_(cells_t.narrow(0, rows.finishing, finishing));
        }
      }
    });
  });
  return {output, h_n, c_n, gates, cells};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_sequence_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& output, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
    bool reverse) {
  const int64_t H = c0.size(1), P = h0.size(1);
  check_layer(gates, h0, 4, H, "fastdl::lstm_sequence_backward");
  const int64_t T = gates.size(0), B = gates.size(1);
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor grad_out = grad_output.contiguous(), g = gates.contiguous(), c = cells.contiguous(),
                   out = output.contiguous(), h_init = h0.contiguous(), c_init = c0.contiguous();
  const auto options = g.options();
  at::Tensor grad_proj = steps.allocate({T, B, 4 * H}, options);
  at::Tensor dh_carry = grad_h_n.contiguous().clone(), dc_carry = grad_c_n.contiguous().clone();
  // With projection the gradient reaching h of every step is kept for dW_hr (one GEMM after the loop);
  // the cell then receives its image through W_hr.
  at::Tensor dh_all = w_hr.has_value() ? steps.allocate({T, B, P}, options) : at::Tensor();
  at::Tensor dh_step = w_hr.has_value() ? at::Tensor() : at::empty({B, P}, options);
  at::Tensor dh_cell = w_hr.has_value() ? at::empty({B, H}, options) : at::Tensor();
  // dh_prev = grad_gates·W_hh and dh_cell = dh·W_hr: products by the transposes.
  const RecurrentWeight recurrent_back(w_hh.t(), slice_rows(B));
  std::optional<RecurrentWeight> projection_back;
  if (w_hr.has_value()) projection_back.emplace(w_hr->t(), slice_rows(B));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastdl::lstm_sequence_backward", [&] {
    for_batch_slices(B, [&](int64_t lo, int64_t hi) {
      for (int64_t step = T - 1; step >= 0; --step) {
        const int64_t t = steps.at(step);
        const Steps::Rows rows = steps.rows(t, lo, hi);
        const int64_t count = rows.end - rows.begin;
        if (count == 0) continue;
        at::Tensor dh_total = w_hr.has_value() ? dh_all[t] : dh_step;
        at::Tensor dh_rows = dh_total.narrow(0, rows.begin, count);
        at::add_out(dh_rows, grad_out[t].narrow(0, rows.begin, count), dh_carry.narrow(0, rows.begin, count));
        if (w_hr.has_value()) {
          at::Tensor target = dh_cell.narrow(0, rows.begin, count);
          projection_back->times_into(target, dh_rows);
        }
        const at::Tensor& dh = w_hr.has_value() ? dh_cell : dh_total;
        const at::Tensor g_t = g[t], c_t = c[t];
        const at::Tensor cells_prev = steps.has_previous(t) ? c[steps.previous(t)] : c_init;
        at::Tensor grad_t = grad_proj[t];
        with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
          for (int64_t b = rows.begin; b < rows.end; ++b) {
            const scalar_t* c_prev =
                b < rows.continuing ? row_of<scalar_t>(cells_prev, b) : row_of<scalar_t>(c_init, b);
            lstm_backward_row<scalar_t>(row_of<scalar_t>(dh, b), mutable_row_of<scalar_t>(dc_carry, b),
                                        row_of<scalar_t>(g_t, b), row_of<scalar_t>(c_t, b), c_prev,
                                        mutable_row_of<scalar_t>(grad_t, b), H);
          }
        });
        at::Tensor carry_rows = dh_carry.narrow(0, rows.begin, count);
        recurrent_back.times_into(carry_rows, grad_t.narrow(0, rows.begin, count));
      }
    });
  });
  at::Tensor grad_w_hh = recurrent_weight_grad(steps, T, grad_proj, out, h_init, reverse);
  at::Tensor grad_w_hr = at::empty({0}, options);
  if (w_hr.has_value()) {
    at::Tensor unprojected = steps.allocate({T, B, H}, options);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fastdl::lstm_sequence_backward", [&] {
      at::parallel_for(0, T, 1, [&](int64_t first, int64_t last) {
        for (int64_t t = first; t < last; ++t) {
          const at::Tensor g_t = g[t], c_t = c[t];
          at::Tensor r_t = unprojected[t];
          with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
            for (int64_t b = 0; b < steps.active(t); ++b)
              lstm_projected_row<scalar_t>(row_of<scalar_t>(g_t, b), row_of<scalar_t>(c_t, b),
                                           mutable_row_of<scalar_t>(r_t, b), H);
          });
        }
      });
    });
    grad_w_hr = at::mm(dh_all.reshape({-1, P}).t(), unprojected.reshape({-1, H}));
  }
  return {grad_proj, dh_carry, dc_carry, grad_w_hh, grad_w_hr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_sequence_forward(const at::Tensor& input_proj, const at::Tensor& h0,
                                                                    const at::Tensor& w_hh,
                                                                    const std::optional<at::Tensor>& b_hh,
                                                                    const std::optional<at::Tensor>& batch_sizes,
                                                                    bool reverse) {
  const int64_t H = h0.size(1);
  check_layer(input_proj, h0, 3, H, "fastdl::gru_sequence_forward");
  const int64_t T = input_proj.size(0), B = input_proj.size(1);
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor proj = input_proj.contiguous(), h_init = h0.contiguous();
  const auto options = proj.options();
  at::Tensor output = steps.allocate({T, B, H}, options), saved = steps.allocate({T, B, 4 * H}, options);
  at::Tensor h_n = h_init.clone();
  const RecurrentWeight recurrent(w_hh, slice_rows(B));
  AT_DISPATCH_FLOATING_TYPES(proj.scalar_type(), "fastdl::gru_sequence_forward", [&] {
    for_batch_slices(B, [&](int64_t lo, int64_t hi) {
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = steps.at(step);
        const Steps::Rows rows = steps.rows(t, lo, hi);
        if (rows.end == rows.begin) continue;
        const at::Tensor hidden_gates = recurrent_gemm(steps, t, rows, output, h_init, recurrent, b_hh);
        const at::Tensor proj_t = proj[t];
        const at::Tensor h_prev = steps.has_previous(t) ? output[steps.previous(t)] : h_init;
        at::Tensor saved_t = saved[t], output_t = output[t];
        with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
          for (int64_t b = rows.begin; b < rows.end; ++b) {
            const scalar_t* h_row = b < rows.continuing ? row_of<scalar_t>(h_prev, b) : row_of<scalar_t>(h_init, b);
            gru_forward_row<scalar_t>(row_of<scalar_t>(proj_t, b), row_of<scalar_t>(hidden_gates, b - rows.begin),
                                      h_row, mutable_row_of<scalar_t>(saved_t, b),
                                      mutable_row_of<scalar_t>(output_t, b), H);
          }
        });
        const int64_t finishing = rows.end - rows.finishing;
        if (finishing > 0) h_n.narrow(0, rows.finishing, finishing).copy_(output_t.narrow(0, rows.finishing, finishing));
      }
    });
  });
  return {output, h_n, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_sequence_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& saved, const at::Tensor& output,
    const at::Tensor& h0, const at::Tensor& w_hh, bool has_bias, const std::optional<at::Tensor>& batch_sizes,
    bool reverse) {
  const int64_t H = h0.size(1);
  check_layer(saved, h0, 4, H, "fastdl::gru_sequence_backward");
  const int64_t T = saved.size(0), B = saved.size(1);
  const Steps steps(T, B, batch_sizes, reverse);
  const at::Tensor grad_out = grad_output.contiguous(), s = saved.contiguous(), out = output.contiguous(),
                   h_init = h0.contiguous();
  const auto options = s.options();
  // The hidden-gate gradients of every step are kept for dW_hh and db_hh, formed after the loop.
  at::Tensor grad_proj = steps.allocate({T, B, 3 * H}, options), grad_hidden = steps.allocate({T, B, 3 * H}, options);
  at::Tensor dh_carry = grad_h_n.contiguous().clone(), dh_total = at::empty({B, H}, options);
  const RecurrentWeight recurrent_back(w_hh.t(), slice_rows(B));  // dh_prev += grad_hidden·W_hh
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "fastdl::gru_sequence_backward", [&] {
    for_batch_slices(B, [&](int64_t lo, int64_t hi) {
      for (int64_t step = T - 1; step >= 0; --step) {
        const int64_t t = steps.at(step);
        const Steps::Rows rows = steps.rows(t, lo, hi);
        const int64_t count = rows.end - rows.begin;
        if (count == 0) continue;
        at::Tensor dh_rows = dh_total.narrow(0, rows.begin, count);
        at::add_out(dh_rows, grad_out[t].narrow(0, rows.begin, count), dh_carry.narrow(0, rows.begin, count));
        const at::Tensor s_t = s[t];
        const at::Tensor h_prev = steps.has_previous(t) ? out[steps.previous(t)] : h_init;
        at::Tensor grad_proj_t = grad_proj[t], grad_hidden_t = grad_hidden[t];
        with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
          for (int64_t b = rows.begin; b < rows.end; ++b) {
            const scalar_t* h_row = b < rows.continuing ? row_of<scalar_t>(h_prev, b) : row_of<scalar_t>(h_init, b);
            gru_backward_row<scalar_t>(row_of<scalar_t>(dh_total, b), row_of<scalar_t>(s_t, b), h_row,
                                       mutable_row_of<scalar_t>(grad_proj_t, b),
                                       mutable_row_of<scalar_t>(grad_hidden_t, b), mutable_row_of<scalar_t>(dh_carry, b),
                                       H);
          }
        });
        at::Tensor carry_rows = dh_carry.narrow(0, rows.begin, count);
        recurrent_back.add_times_to(carry_rows, grad_hidden_t.narrow(0, rows.begin, count));
      }
    });
  });
  at::Tensor grad_w_hh = recurrent_weight_grad(steps, T, grad_hidden, out, h_init, reverse);
  at::Tensor grad_b_hh = has_bias ? grad_hidden.sum({0, 1}) : at::empty({0}, options);
  return {grad_proj, dh_carry, grad_w_hh, grad_b_hh};
}

}  // namespace
}  // namespace cpu
}  // namespace fastdl

TORCH_LIBRARY_FRAGMENT(fastdl, m) {
  m.def("lstm_pointwise_forward(Tensor input_gates, Tensor hidden_gates, Tensor cx) -> (Tensor, Tensor, Tensor)");
  m.def("lstm_pointwise_backward(Tensor grad_hy, Tensor grad_cy, Tensor gates, Tensor cx, Tensor cy) -> (Tensor, Tensor)");
  m.def("gru_pointwise_forward(Tensor input_gates, Tensor hidden_gates, Tensor hx) -> (Tensor, Tensor)");
  m.def("gru_pointwise_backward(Tensor grad_hy, Tensor saved, Tensor hx) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lstm_sequence_forward(Tensor input_proj, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_sequence_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor gates, Tensor cells, "
      "Tensor output, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_sequence_forward(Tensor input_proj, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? batch_sizes, bool reverse) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "gru_sequence_backward(Tensor grad_output, Tensor grad_h_n, Tensor saved, Tensor output, Tensor h0, Tensor w_hh, "
      "bool has_bias, Tensor? batch_sizes, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("lstm_pointwise_forward", &fastdl::cpu::lstm_pointwise_forward);
  m.impl("lstm_pointwise_backward", &fastdl::cpu::lstm_pointwise_backward);
  m.impl("gru_pointwise_forward", &fastdl::cpu::gru_pointwise_forward);
  m.impl("gru_pointwise_backward", &fastdl::cpu::gru_pointwise_backward);
  m.impl("lstm_sequence_forward", &fastdl::cpu::lstm_sequence_forward);
  m.impl("lstm_sequence_backward", &fastdl::cpu::lstm_sequence_backward);
  m.impl("gru_sequence_forward", &fastdl::cpu::gru_sequence_forward);
  m.impl("gru_sequence_backward", &fastdl::cpu::gru_sequence_backward);
}
