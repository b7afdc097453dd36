// Local response normalization (AlexNet, ZFNet, GoogLeNet), CPU kernels.
//
// For one batch index and spatial position, over channels c = 0..C−1, with window size n:
//   scale_c = k + α/n · Σ_{j = c − ⌊n/2⌋ … c + ⌊(n−1)/2⌋} x_j²        (channels outside 0..C−1 count as 0)
//   y_c     = x_c · scale_c^(−β)
// Backward (g = ∂L/∂y):
//   ∂L/∂x_c = g_c · scale_c^(−β) − (2αβ/n) · x_c · Σ_{j = c − ⌊(n−1)/2⌋ … c + ⌊n/2⌋} g_j · x_j · scale_j^(−β−1)
// The second window is the first one mirrored: x_c enters scale_j exactly when c lies in j's window.
//
// Both kernels are one pass over the data. A task is one batch index × a tile of kTile spatial positions
// × all channels; the window sums slide along the channels (add the channel entering, subtract the one
// leaving), accumulated in double so that the subtraction cancels exactly whatever the magnitudes. The
// tile is then normalized in one vectorized sweep; its pow (the costliest part of LRN) is a polynomial
// exp2/log2 (common.h), since the C library pow does not vectorize.
//
// Backward rebuilds the scale from x instead of reading one saved by forward: the window sum costs two
// flops per element inside a pass that reads x anyway, whereas a saved scale costs a full-size write in
// forward, a full-size read in backward and one more activation kept alive per LRN layer.
//
// Layouts: contiguous NC… (spatial positions of a channel adjacent: the tile's lanes are adjacent, so the
// inner loops over lanes vectorize) and channels-last N…C (a position's channels adjacent). Anything
// else is made contiguous first.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace fastdl {
namespace cpu {
namespace {

constexpr int64_t kTile = 128;

template <typename scalar_t>
struct LrnTile {
  const scalar_t* x;      // element (c, lane) at x[c * channel_stride + lane * lane_stride]
  int64_t channel_stride;
  int64_t lane_stride;
  int64_t channels;
  int64_t lanes;          // ≤ kTile
  int64_t size;
  scalar_t alpha_over_size;
  scalar_t k;
};

template <typename scalar_t, bool kChannelsLast>
FASTDL_INLINE int64_t element(const LrnTile<scalar_t>& t, int64_t c, int64_t lane) {
  return kChannelsLast ? c + lane * t.lane_stride : c * t.channel_stride + lane;
}

// sums[c·lanes + l] = Σ_{j = c − before … c + after, 0 ≤ j < channels} value(j, l), by a sliding sum in
// double. A NaN or Inf that enters a sliding sum poisons it for good (Inf − Inf = NaN), which also makes
// it easy to detect afterwards: a tile whose running sums end non-finite is summed again window by
// window, giving exactly the reference's NaN/Inf pattern. Finite tiles, the norm, pay nothing for this.
template <typename Value>
FASTDL_INLINE void channel_window_sums(int64_t channels, int64_t lanes, int64_t before, int64_t after, Value value,
                                       double* sums) {
  double running[kTile] = {};
  for (int64_t j = 0; j < std::min(after, channels); ++j)
    for (int64_t l = 0; l < lanes; ++l) running[l] += value(j, l);
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t entering = c + after, leaving = c - before - 1;
    if (entering < channels)
      for (int64_t l = 0; l < lanes; ++l) running[l] += value(entering, l);
    if (leaving >= 0)
      for (int64_t l = 0; l < lanes; ++l) running[l] -= value(leaving, l);
    for (int64_t l = 0; l < lanes; ++l) sums[c * lanes + l] = running[l];
  }
  double poison = 0;  // 0 unless some running sum is NaN or ±Inf
  for (int64_t l = 0; l < lanes; ++l) poison += running[l] * 0.0;
  if (poison == 0) return;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t l = 0; l < lanes; ++l) {
      double sum = 0;
      for (int64_t j = std::max<int64_t>(0, c - before); j <= std::min(channels - 1, c + after); ++j) sum += value(j, l);
      sums[c * lanes + l] = sum;
    }
}

template <typename scalar_t>
FASTDL_INLINE scalar_t scale_of(const LrnTile<scalar_t>& t, double window_sum) {
  return t.k + t.alpha_over_size * static_cast<scalar_t>(window_sum);
}

template <typename scalar_t, bool kChannelsLast>
FASTDL_INLINE void window_sums_of_squares(const LrnTile<scalar_t>& t, double* sums) {
  const auto square = [&](int64_t j, int64_t l) {
    const double v = t.x[element<scalar_t, kChannelsLast>(t, j, l)];
    return v * v;  // exact in double for float inputs
  };
  channel_window_sums(t.channels, t.lanes, t.size / 2, (t.size - 1) / 2, square, sums);
}

template <typename scalar_t, bool kChannelsLast>
FASTDL_CPU_CLONES void forward_tile(const LrnTile<scalar_t>& t, scalar_t beta, scalar_t* y, double* sums) {
  window_sums_of_squares<scalar_t, kChannelsLast>(t, sums);
  int32_t outside = 0;
  for (int64_t c = 0; c < t.channels; ++c)
    for (int64_t l = 0; l < t.lanes; ++l) {
      const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
      y[i] = t.x[i] * pow_fast(scale_of(t, sums[c * t.lanes + l]), -beta, outside);
    }
  if (!outside) return;
  for (int64_t c = 0; c < t.channels; ++c)
    for (int64_t l = 0; l < t.lanes; ++l) {
      const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
      const scalar_t scale = scale_of(t, sums[c * t.lanes + l]);
      if (!pow_fast_covers(scale, -beta)) y[i] = t.x[i] * std::pow(scale, -beta);
    }
}

template <typename scalar_t, bool kChannelsLast>
FASTDL_CPU_CLONES void backward_tile(const LrnTile<scalar_t>& t, scalar_t beta, const scalar_t* grad_out,
                                     scalar_t* grad_in, scalar_t* terms, scalar_t* scale_pow, double* sums) {
  window_sums_of_squares<scalar_t, kChannelsLast>(t, sums);
  // scale_pow = scale^(−β); terms = g · x · scale^(−β) / scale, the summands of the mirrored window.
  int32_t outside = 0;
  for (int64_t w = 0; w < t.channels * t.lanes; ++w) scale_pow[w] = pow_fast(scale_of(t, sums[w]), -beta, outside);
  if (outside)
    for (int64_t w = 0; w < t.channels * t.lanes; ++w) {
      const scalar_t scale = scale_of(t, sums[w]);
      if (!pow_fast_covers(scale, -beta)) scale_pow[w] = std::pow(scale, -beta);
    }
  for (int64_t c = 0; c < t.channels; ++c)
    for (int64_t l = 0; l < t.lanes; ++l) {
      const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
      const int64_t w = c * t.lanes + l;
      terms[w] = grad_out[i] * t.x[i] * scale_pow[w] / scale_of(t, sums[w]);
    }
  const auto term = [&](int64_t j, int64_t l) { return static_cast<double>(terms[j * t.lanes + l]); };
  channel_window_sums(t.channels, t.lanes, (t.size - 1) / 2, t.size / 2, term, sums);
  const scalar_t coef = 2 * t.alpha_over_size * beta;
  for (int64_t c = 0; c < t.channels; ++c)
    for (int64_t l = 0; l < t.lanes; ++l) {
      const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
      const int64_t w = c * t.lanes + l;
      grad_in[i] = grad_out[i] * scale_pow[w] - coef * t.x[i] * static_cast<scalar_t>(sums[w]);
    }
}

void check_args(const at::Tensor& input, int64_t size, const char* name) {
  TORCH_CHECK(input.dim() >= 3, name, ": expected an input of 3 or more dimensions (N, C, ...), got ",
              input.dim());
  TORCH_CHECK(size >= 1, name, ": size must be at least 1, got ", size);
}

// A view of the input as (batch, channels, positions) with a layout the tiles understand.
struct Layout {
  at::Tensor contiguous;
  bool channels_last;
  int64_t batch, channels, positions;
};

Layout layout_of(const at::Tensor& input) {
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t positions = channels == 0 || batch == 0 ? 0 : input.numel() / (batch * channels);
  const bool channels_last = input.dim() >= 4 && !input.is_contiguous() &&
                             (input.is_contiguous(at::MemoryFormat::ChannelsLast) ||
                              input.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  return {channels_last ? input : input.contiguous(), channels_last, batch, channels, positions};
}

template <typename scalar_t>
LrnTile<scalar_t> make_tile(const Layout& layout, const scalar_t* x, int64_t lanes, int64_t size, double alpha,
                            double k) {
  return {x,
          layout.channels_last ? 1 : layout.positions,
          layout.channels_last ? layout.channels : 1,
          layout.channels,
          lanes,
          size,
          static_cast<scalar_t>(alpha / size),
          static_cast<scalar_t>(k)};
}

template <typename Fn>
void for_each_tile(const Layout& layout, Fn&& fn) {
  const int64_t tiles_per_image = (layout.positions + kTile - 1) / kTile;
  const int64_t tasks = layout.batch * tiles_per_image;
  // Give each thread at least ~64k elements so small inputs do not pay for waking the pool.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, layout.channels * kTile));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / tiles_per_image, first = (task % tiles_per_image) * kTile;
      fn(image, first, std::min(kTile, layout.positions - first));
    }
  });
}

at::Tensor lrn_forward(const at::Tensor& input, int64_t size, double alpha, double beta, double k) {
  check_args(input, size, "fastdl::lrn_forward");
  const Layout layout = layout_of(input);
  at::Tensor output = at::empty_like(layout.contiguous);
  if (input.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastdl::lrn_forward", [&] {
    const scalar_t* x = layout.contiguous.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    const int64_t image_stride = layout.channels * layout.positions;
    for_each_tile(layout, [&](int64_t image, int64_t first, int64_t lanes) {
      thread_local std::vector<double> sums;
      sums.resize(layout.channels * kTile);
      const int64_t offset = image * image_stride + first * (layout.channels_last ? layout.channels : 1);
      const LrnTile<scalar_t> tile = make_tile(layout, x + offset, lanes, size, alpha, k);
      if (layout.channels_last)
        forward_tile<scalar_t, true>(tile, static_cast<scalar_t>(beta), y + offset, sums.data());
      else
        forward_tile<scalar_t, false>(tile, static_cast<scalar_t>(beta), y + offset, sums.data());
    });
  });
  return output;
}

at::Tensor lrn_backward(const at::Tensor& grad_output, const at::Tensor& input, int64_t size, double alpha,
                        double beta, double k) {
  check_args(input, size, "fastdl::lrn_backward");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "fastdl::lrn_backward: grad_output has shape ",
              grad_output.sizes(), " but input has shape ", input.sizes());
  const Layout layout = layout_of(input);
  const at::Tensor grad = grad_output.contiguous(layout.channels_last ? input.suggest_memory_format()
                                                                      : at::MemoryFormat::Contiguous);
  at::Tensor grad_input = at::empty_like(layout.contiguous);
  if (input.numel() == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastdl::lrn_backward", [&] {
    const scalar_t* x = layout.contiguous.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
    const int64_t image_stride = layout.channels * layout.positions;
    for_each_tile(layout, [&](int64_t image, int64_t first, int64_t lanes) {
      thread_local std::vector<scalar_t> work;
      thread_local std::vector<double> sums;
      work.resize(2 * layout.channels * kTile);
      sums.resize(layout.channels * kTile);
      const int64_t offset = image * image_stride + first * (layout.channels_last ? layout.channels : 1);
      const LrnTile<scalar_t> tile = make_tile(layout, x + offset, lanes, size, alpha, k);
      scalar_t* terms = work.data();
      scalar_t* scale_pow = work.data() + layout.channels * kTile;
      if (layout.channels_last)
        backward_tile<scalar_t, true>(tile, static_cast<scalar_t>(beta), g + offset, dx + offset, terms, scale_pow, sums.data());
      else
        backward_tile<scalar_t, false>(tile, static_cast<scalar_t>(beta), g + offset, dx + offset, terms, scale_pow, sums.data());
    });
  });
  return grad_input;
}

}  // namespace
}  // namespace cpu
}  // namespace fastdl

TORCH_LIBRARY_FRAGMENT(fastdl, m) {
  m.def("lrn_forward(Tensor input, int size, float alpha, float beta, float k) -> Tensor");
  m.def("lrn_backward(Tensor grad_output, Tensor input, int size, float alpha, float beta, float k) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("lrn_forward", &fastdl::cpu::lrn_forward);
  m.impl("lrn_backward", &fastdl::cpu::lrn_backward);
}
