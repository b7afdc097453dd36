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
// leaving), accumulated in double so that the subtraction cancels exactly whatever the magnitudes, and
// each channel row is normalized as soon as its sum is known, while it is in L1. The pow (the costliest
// part of LRN) is a vectorized polynomial exp2/log2 (common.h), since the C library's does not vectorize.
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

// Calls emit(c, running) for c = 0 … channels−1, where running[l] = Σ_{j = c − before … c + after,
// 0 ≤ j < channels} value(j, l): a sliding sum in double, so that each subtraction cancels its addition
// exactly (squares of floats are exact in double). emit does the channel's work while the row is hot.
template <typename Value, typename Emit>
FASTDL_INLINE void slide_over_channels(int64_t channels, int64_t lanes, int64_t before, int64_t after, Value value,
                                       Emit emit) {
  double running[kTile] = {};
  for (int64_t j = 0; j < std::min(after, channels); ++j)
    for (int64_t l = 0; l < lanes; ++l) running[l] += value(j, l);
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t entering = c + after, leaving = c - before - 1;
    if (entering < channels)
      for (int64_t l = 0; l < lanes; ++l) running[l] += value(entering, l);
    if (leaving >= 0)
      for (int64_t l = 0; l < lanes; ++l) running[l] -= value(leaving, l);
    emit(c, running);
  }
}

// The same sum for one channel and lane, window by window. A NaN or Inf poisons a sliding sum for good
// (Inf − Inf = NaN), so tiles that hold one are redone with this, which gives the reference's exact
// NaN/Inf pattern; finite tiles, the norm, never come here.
template <typename Value>
FASTDL_INLINE double window_sum(int64_t channels, int64_t before, int64_t after, int64_t c, int64_t l, Value value) {
  double sum = 0;
  for (int64_t j = std::max<int64_t>(0, c - before); j <= std::min(channels - 1, c + after); ++j) sum += value(j, l);
  return sum;
}

template <typename scalar_t>
FASTDL_INLINE scalar_t scale_of(const LrnTile<scalar_t>& t, double window_sum) {
  return t.k + t.alpha_over_size * static_cast<scalar_t>(window_sum);
}

template <typename scalar_t, bool kChannelsLast>
FASTDL_INLINE double square(const LrnTile<scalar_t>& t, int64_t j, int64_t l) {
  const double v = t.x[element<scalar_t, kChannelsLast>(t, j, l)];
  return v * v;  // exact in double for float inputs
}

template <typename scalar_t, bool kChannelsLast>
FASTDL_INLINE void forward_tile(const LrnTile<scalar_t>& t, scalar_t beta, scalar_t* y) {
  const auto squares = [&](int64_t j, int64_t l) FASTDL_INLINE_LAMBDA {
    return square<scalar_t, kChannelsLast>(t, j, l);
  };
  const int64_t before = t.size / 2, after = (t.size - 1) / 2;
  int32_t outside = 0;
  const auto normalize = [&](int64_t c, const double* running) FASTDL_INLINE_LAMBDA {
    for (int64_t l = 0; l < t.lanes; ++l) {
      const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
      y[i] = t.x[i] * pow_fast(scale_of(t, running[l]), -beta, outside);
    }
  };
  slide_over_channels(t.channels, t.lanes, before, after, squares, normalize);
  if (!outside) return;
  // Some scale left pow_fast's domain: NaN/Inf in the tile (non-finite scales are outside it), or an
  // extreme k. Redo the tile exactly.
  for (int64_t c = 0; c < t.channels; ++c)
    for (int64_t l = 0; l < t.lanes; ++l) {
      const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
      y[i] = t.x[i] * std::pow(scale_of(t, window_sum(t.channels, before, after, c, l, squares)), -beta);
    }
}

template <typename scalar_t, bool kChannelsLast>
FASTDL_INLINE void backward_tile(const LrnTile<scalar_t>& t, scalar_t beta, const scalar_t* grad_out,
                                 scalar_t* grad_in, scalar_t* terms, scalar_t* scale_pow) {
  const auto squares = [&](int64_t j, int64_t l) FASTDL_INLINE_LAMBDA {
    return square<scalar_t, kChannelsLast>(t, j, l);
  };
  const int64_t before = t.size / 2, after = (t.size - 1) / 2;
  // Pass 1: scale_pow = scale^(−β) and terms = g · x · scale^(−β) / scale, the mirrored window's summands.
  const auto keep = [&](int64_t c, int64_t l, scalar_t scale, scalar_t power) FASTDL_INLINE_LAMBDA {
    const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
    scale_pow[c * t.lanes + l] = power;
    terms[c * t.lanes + l] = grad_out[i] * t.x[i] * power / scale;
  };
  int32_t outside = 0;
  const auto scale_and_terms = [&](int64_t c, const double* running) FASTDL_INLINE_LAMBDA {
    for (int64_t l = 0; l < t.lanes; ++l) {
      const scalar_t scale = scale_of(t, running[l]);
      keep(c, l, scale, pow_fast(scale, -beta, outside));
    }
  };
  slide_over_channels(t.channels, t.lanes, before, after, squares, scale_and_terms);
  if (outside)  // as in forward_tile: redo the tile exactly
    for (int64_t c = 0; c < t.channels; ++c)
      for (int64_t l = 0; l < t.lanes; ++l) {
        const scalar_t scale = scale_of(t, window_sum(t.channels, before, after, c, l, squares));
        keep(c, l, scale, std::pow(scale, -beta));
      }
  // Pass 2: the mirrored window (before and after swap roles) over the terms.
  const auto term = [&](int64_t j, int64_t l) FASTDL_INLINE_LAMBDA {
    return static_cast<double>(terms[j * t.lanes + l]);
  };
  const scalar_t coef = 2 * t.alpha_over_size * beta;
  // β = 0: the window term is exactly 0, as torch's pow backward for a zero exponent (0 · NaN is not).
  const bool window_term = beta != 0;
  const auto emit = [&](int64_t c, int64_t l, double mirrored) FASTDL_INLINE_LAMBDA {
    const int64_t i = element<scalar_t, kChannelsLast>(t, c, l);
    grad_in[i] = grad_out[i] * scale_pow[c * t.lanes + l] -
                 (window_term ? coef * t.x[i] * static_cast<scalar_t>(mirrored) : scalar_t(0));
  };
  double poison = 0;  // stays 0 unless a running sum is NaN or ±Inf
  const auto gradient = [&](int64_t c, const double* running) FASTDL_INLINE_LAMBDA {
    for (int64_t l = 0; l < t.lanes; ++l) {
      emit(c, l, running[l]);
      poison += running[l] * 0.0;
    }
  };
  slide_over_channels(t.channels, t.lanes, after, before, term, gradient);
  if (poison == 0) return;
  for (int64_t c = 0; c < t.channels; ++c)
    for (int64_t l = 0; l < t.lanes; ++l) emit(c, l, window_sum(t.channels, after, before, c, l, term));
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
      const int64_t offset = image * image_stride + first * (layout.channels_last ? layout.channels : 1);
      const LrnTile<scalar_t> tile = make_tile(layout, x + offset, lanes, size, alpha, k);
      with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
        if (layout.channels_last)
          forward_tile<scalar_t, true>(tile, static_cast<scalar_t>(beta), y + offset);
        else
          forward_tile<scalar_t, false>(tile, static_cast<scalar_t>(beta), y + offset);
      });
    });
  });
  return output;
}

at::Tensor lrn_backward(const at::Tensor& grad_output, const at::Tensor& input, int64_t size, double alpha,
                        double beta, double k) {
  check_args(input, size, "fastdl::lrn_backward");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "fastdl::lrn_backward: grad_output has shape ",
              grad_output.sizes(), " but input has shape ", input.sizes());
  TORCH_CHECK(grad_output.device() == input.device() && grad_output.scalar_type() == input.scalar_type(),
              "fastdl::lrn_backward: grad_output must match input's device and dtype");
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
      work.resize(2 * layout.channels * kTile);
      const int64_t offset = image * image_stride + first * (layout.channels_last ? layout.channels : 1);
      const LrnTile<scalar_t> tile = make_tile(layout, x + offset, lanes, size, alpha, k);
      scalar_t* terms = work.data();
      scalar_t* scale_pow = work.data() + layout.channels * kTile;
      with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
        if (layout.channels_last)
          backward_tile<scalar_t, true>(tile, static_cast<scalar_t>(beta), g + offset, dx + offset, terms, scale_pow);
        else
          backward_tile<scalar_t, false>(tile, static_cast<scalar_t>(beta), g + offset, dx + offset, terms,
                                         scale_pow);
      });
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
