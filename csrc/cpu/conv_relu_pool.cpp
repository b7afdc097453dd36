// Fused Conv2d + ReLU + MaxPool2d (AlexNet, ZFNet, VGG, LeNet blocks), CPU.
//
// Forward: z = conv(x, w) through ATen (oneDNN) without bias, handed to the pooling in channels-last; then
// ONE pass that reads z window by window and writes only the pooled results:
//   y[n, oh, ow, c] = max(0, b[c] + max_{(i, j) in window} z[n, oh·s − p + i·d, ow·s − p + j·d, c])
//   a[n, oh, ow, c] = i·PW + j of that max (first in row-major order; a NaN wins), or −1 where y ≤ 0.
// relu(· + b) is non-decreasing, so it commutes with the max: the add and clamp are done once per pooled
// value, and the full-resolution ReLU output never exists. a is int8 (int16/int32 for huge windows).
//
// Backward: ∂L/∂z is zero except at each window's argmax, which receives that window's gradient (the
// ReLU mask is the a = −1 case). So where a group's filters fit in cache (sparse_backward_pays), the
// convolution's backward is our own and sparse: each window with a gradient scatters into ∂L/∂x and ∂L/∂w
// directly (see "backward" below), never materializing ∂L/∂z. Elsewhere ∂L/∂z is built in one pass and
// handed to ATen's convolution_backward.
// ∂L/∂b = Σ_{n, oh, ow: a ≥ 0} g.
//
// Why channels-last for z: oneDNN's convolution is mostly faster on NHWC here than on NCHW (see
// forward_conv_format for when it is not), and in NHWC every pooling step is a contiguous sweep over the channels,
// which vectorizes without gathers. The pooled tensors (y, argmax, and ∂L/∂y in backward) are read and
// written in the caller's layout through their strides, so NCHW callers pay no conversion pass for them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "conv_relu_pool_geometry.h"

namespace fastdl {
namespace cpu {
namespace {

struct PoolGeometry {
  int64_t batch, channels, height, width;  // of z
  int64_t out_height, out_width;           // of y
  int64_t kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;
};

// The window positions k (0 ≤ k < kernel) of output index o that land inside 0 … size−1: [first, end).
FASTDL_INLINE void window_range(int64_t o, int64_t size, int64_t kernel, int64_t stride, int64_t padding,
                                int64_t dilation, int64_t& first, int64_t& end) {
  const int64_t start = o * stride - padding;
  first = start < 0 ? (-start + dilation - 1) / dilation : 0;
  end = std::min(kernel, (size - start + dilation - 1) / dilation);
}

// Running max over the channels of one window position. The offset is kept in scalar_t (exact far beyond
// any window size) so that value and offset selects have the same width and the loop vectorizes.
template <typename scalar_t>
FASTDL_INLINE void max_step(const scalar_t* __restrict z, scalar_t* __restrict best, scalar_t* __restrict offset,
                            scalar_t position, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t v = z[c];
    const bool take = (v > best[c]) | (v != v);  // a NaN wins, as in max_pool2d
    best[c] = take ? v : best[c];
    offset[c] = take ? position : offset[c];
  }
}

// Pooled tensors (y, argmax, grad_output) are read and written through their strides, so that they are
// produced and consumed directly in the caller's layout (NCHW or channels-last): converting them would
// cost a pass of its own, and on a shared 2-core machine every extra parallel ATen op also pays a thread
// wake-up that can exceed the op itself.
struct Strides {
  int64_t n, c, h, w;
  int64_t at(int64_t n_, int64_t h_, int64_t w_) const { return n_ * n + h_ * h + w_ * w; }
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t, typename index_t>
FASTDL_INLINE void finish_window(const scalar_t* __restrict best, const scalar_t* __restrict offset,
                                 const scalar_t* __restrict bias, scalar_t* __restrict y, index_t* __restrict a,
                                 int64_t channel_stride, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t value = best[c] + bias[c];
    const bool clipped = value <= 0;  // false for NaN, which passes through ReLU
    y[c * channel_stride] = clipped ? scalar_t(0) : value;
    a[c * channel_stride] = clipped ? index_t(-1) : static_cast<index_t>(offset[c]);
  }
}

// z: channels-last (n, h, w, c) dense; y and a: any layout, both with strides `out`.
template <typename scalar_t, typename index_t>
void bias_relu_pool(const PoolGeometry& g, const scalar_t* z, const scalar_t* bias, scalar_t* y, index_t* a,
                    Strides out) {
  const int64_t C = g.channels;
  // Rows per task: enough window work (~64k compares) to be worth waking a thread for.
  const int64_t row_work = std::max<int64_t>(1, g.out_width * C * g.kernel_h * g.kernel_w);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / row_work);
  at::parallel_for(0, g.batch * g.out_height, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> work(2 * C);
    scalar_t* best = work.data();
    scalar_t* offset = work.data() + C;
    with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.out_height, oh = row % g.out_height;
        int64_t i0, i1;
        window_range(oh, g.height, g.kernel_h, g.stride_h, g.padding_h, g.dilation_h, i0, i1);
        for (int64_t ow = 0; ow < g.out_width; ++ow) {
          int64_t j0, j1;
          window_range(ow, g.width, g.kernel_w, g.stride_w, g.padding_w, g.dilation_w, j0, j1);
          std::fill(best, best + C, -std::numeric_limits<scalar_t>::infinity());
          std::fill(offset, offset + C, scalar_t(0));
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t h = oh * g.stride_h - g.padding_h + i * g.dilation_h;
            for (int64_t j = j0; j < j1; ++j) {
              const int64_t w = ow * g.stride_w - g.padding_w + j * g.dilation_w;
              max_step(z + ((n * g.height + h) * g.width + w) * C, best, offset,
                       static_cast<scalar_t>(i * g.kernel_w + j), C);
            }
          }
          const int64_t at = out.at(n, oh, ow);
          finish_window(best, offset, bias, y + at, a + at, out.c, C);
        }
      }
    });
  });
}

// ------------------------------------------------------------------------------------- dense backward
// Where the sparse backward below does not pay (see sparse_backward_pays), ∂L/∂z is built densely in
// channels-last and handed to ATen's (oneDNN's) convolution_backward.

// One window's gradient and argmax for a run of channels, copied out of their (possibly strided) layout
// into contiguous buffers; the bias gradient, Σ over windows of g where a ≥ 0, accumulates on the way.
template <typename scalar_t, typename index_t>
FASTDL_INLINE void load_window(const scalar_t* __restrict grad, int64_t grad_stride, const index_t* __restrict a,
                               int64_t a_stride, scalar_t* __restrict grad_out, index_t* __restrict a_out,
                               double* __restrict bias_sum, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t g = grad[c * grad_stride];
    const index_t offset = a[c * a_stride];
    grad_out[c] = g;
    a_out[c] = offset;
    bias_sum[c] += offset >= 0 ? static_cast<double>(g) : 0.0;
  }
}

// grad_z[c] += g[c] where this window's argmax is `position`. One vectorized sweep per window position
// instead of a per-channel scatter (whose target address would depend on the data).
template <typename scalar_t, typename index_t>
FASTDL_INLINE void route_step(const scalar_t* __restrict grad, const index_t* __restrict a,
                              scalar_t* __restrict grad_z, index_t position, int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) grad_z[c] += a[c] == position ? grad[c] : scalar_t(0);
}

// Writes ∂L/∂z (channels-last dense; every element, zeros included) and, when grad_bias is not null,
// ∂L/∂b. A task owns one image and a run of channels: it zeroes its part of ∂L/∂z, then adds each
// window's gradient at its argmax, so overlapping windows never race and every sum happens in a fixed
// order (deterministic). Per-image bias sums are added over images in order at the end.
template <typename scalar_t, typename index_t>
void route_grad(const PoolGeometry& g, const scalar_t* grad, Strides grad_strides, const index_t* a,
                Strides a_strides, scalar_t* grad_z, scalar_t* grad_bias) {
  const int64_t C = g.channels;
  // Split the channels only as far as needed to give every thread work (runs of at least 16 channels).
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>((threads + g.batch - 1) / g.batch, 1, std::max<int64_t>(1, C / 16));
  const int64_t chunk = (C + chunks - 1) / chunks;
  std::vector<double> bias_sums(g.batch * C, 0.0);
  at::parallel_for(0, g.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> grad_window(chunk);
    std::vector<index_t> a_window(chunk);
    with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / chunks, c0 = (task % chunks) * chunk, width = std::min(chunk, C - c0);
        if (width <= 0) continue;
        scalar_t* image = grad_z + n * g.height * g.width * C + c0;
        for (int64_t p = 0; p < g.height * g.width; ++p) std::fill(image + p * C, image + p * C + width, scalar_t(0));
        double* bias_sum = bias_sums.data() + n * C + c0;
        for (int64_t oh = 0; oh < g.out_height; ++oh) {
          int64_t i0, i1;
          window_range(oh, g.height, g.kernel_h, g.stride_h, g.padding_h, g.dilation_h, i0, i1);
          for (int64_t ow = 0; ow < g.out_width; ++ow) {
            int64_t j0, j1;
            window_range(ow, g.width, g.kernel_w, g.stride_w, g.padding_w, g.dilation_w, j0, j1);
            load_window(grad + grad_strides.at(n, oh, ow) + c0 * grad_strides.c, grad_strides.c,
                        a + a_strides.at(n, oh, ow) + c0 * a_strides.c, a_strides.c, grad_window.data(),
                        a_window.data(), bias_sum, width);
            for (int64_t i = i0; i < i1; ++i) {
              const int64_t h = oh * g.stride_h - g.padding_h + i * g.dilation_h;
              for (int64_t j = j0; j < j1; ++j) {
                const int64_t w = ow * g.stride_w - g.padding_w + j * g.dilation_w;
                route_step(grad_window.data(), a_window.data(), image + (h * g.width + w) * C,
                           static_cast<index_t>(i * g.kernel_w + j), width);
              }
            }
          }
        }
      }
    });
  });
  if (grad_bias == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < g.batch; ++n) sum += bias_sums[n * C + c];
    grad_bias[c] = static_cast<scalar_t>(sum);
  }
}


// ---------------------------------------------------------------------------------------------- backward
// ∂L/∂z is zero except at each window's argmax, so the convolution's backward is not run densely over z's
// full resolution: every window with a gradient (a ≥ 0) scatters its share directly,
//   ∂L/∂x[n, h·s − p + i·d, w·s − p + j·d, k] += g · w[c, k, i, j]
//   ∂L/∂w[c, k, i, j]                         += g · x[n, h·s − p + i·d, w·s − p + j·d, k]
// with (h, w) the window's argmax in z and k over the input channels of c's group. That is as many times
// less work as z has positions per pooled value (4× for 2×2 pools, 4.3× for AlexNet's 3/2 on 27×27), and
// ∂L/∂z is never written. x and ∂L/∂x are channels-last (NHWC) and w is read as (C_out, KH, KW, C_in/groups)
// (channels-last too), so each tap is a contiguous run of channels.

struct ConvGeometry {
  int64_t in_channels, height, width;  // of x
  int64_t out_channels, groups;
  int64_t kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w, dilation_h, dilation_w;
  int64_t group_in() const { return in_channels / groups; }
  int64_t group_out() const { return out_channels / groups; }
  int64_t filter_size() const { return kernel_h * kernel_w * group_in(); }
};

// The position in z of the max of pooled window (oh, ow) whose window offset is `offset`.
FASTDL_INLINE void argmax_position(const PoolGeometry& g, int64_t oh, int64_t ow, int64_t offset, int64_t& h,
                                   int64_t& w) {
  h = oh * g.stride_h - g.padding_h + offset / g.kernel_w * g.dilation_h;
  w = ow * g.stride_w - g.padding_w + offset % g.kernel_w * g.dilation_w;
}

// The taps of the convolution at z position (h, w) that fall inside x, as contiguous runs of channels
// k0 … k0+width−1 of `group`: fn(offset in an NHWC image, offset in a (KH, KW, C_in/groups) filter, length).
// When a run can span a whole tap row (all channels, unit dilation along the width) it does, so that
// few-channel layers (AlexNet conv1: 3) still get long vectorizable runs.
template <typename Fn>
FASTDL_INLINE void for_each_tap_run(const ConvGeometry& cg, int64_t h, int64_t w, int64_t group, int64_t k0,
                                    int64_t width, Fn&& fn) {
  int64_t i0, i1, j0, j1;
  window_range(h, cg.height, cg.kernel_h, cg.stride_h, cg.padding_h, cg.dilation_h, i0, i1);
  window_range(w, cg.width, cg.kernel_w, cg.stride_w, cg.padding_w, cg.dilation_w, j0, j1);
  const int64_t w0 = w * cg.stride_w - cg.padding_w + j0 * cg.dilation_w;
  const bool whole_rows = width == cg.in_channels && cg.dilation_w == 1;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = h * cg.stride_h - cg.padding_h + i * cg.dilation_h;
    const int64_t image = (row * cg.width + w0) * cg.in_channels + group * cg.group_in() + k0;
    const int64_t filter = (i * cg.kernel_w + j0) * cg.group_in() + k0;
    if (whole_rows) {
      fn(image, filter, (j1 - j0) * cg.in_channels);
      continue;
    }
    for (int64_t j = 0; j < j1 - j0; ++j)
      fn(image + j * cg.dilation_w * cg.in_channels, filter + j * cg.group_in(), width);
  }
}

// out[k] += Σ_q g[q] · sources[q][offset + k] for the kVecs vectors of k at out. The sum over q runs in
// registers, in four independent chains (q mod 4) so that the multiply-adds do not wait on each other;
// `out` is read and written once. Each source element is used once, so this is bound by loads: every
// source costs its kVecs vector loads plus the broadcast of g[q], and kVecs > 1 spreads that broadcast.
template <typename Isa, int kVecs, typename scalar_t>
FASTDL_INLINE void add_scaled_block(scalar_t* __restrict out, const scalar_t* const* sources, int64_t offset,
                                    const scalar_t* g, int64_t count) {
  using V = Vec<scalar_t, Isa>;
  constexpr int64_t lanes = kLanes<scalar_t, Isa>;
  V sum[4][kVecs] = {};
  int64_t q = 0;
  for (; q + 4 <= count; q += 4)
#pragma GCC unroll 4
    for (int chain = 0; chain < 4; ++chain)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) sum[chain][v] += g[q + chain] * load_vec<Isa>(sources[q + chain] + offset + v * lanes);
  for (; q < count; ++q)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) sum[0][v] += g[q] * load_vec<Isa>(sources[q] + offset + v * lanes);
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v)
    store_vec<Isa>(out + v * lanes, load_vec<Isa>(out + v * lanes) + ((sum[0][v] + sum[1][v]) + (sum[2][v] + sum[3][v])));
}

// out[k] += Σ_q g[q] · sources[q][offset + k] for k < length: blocks of the ISA's tile width, then single
// vectors, then a scalar tail. Every element is summed in the same order whichever path takes it.
template <typename Isa, typename scalar_t>
FASTDL_INLINE void add_scaled_rows(scalar_t* __restrict out, const scalar_t* const* sources, int64_t offset,
                                   const scalar_t* g, int64_t count, int64_t length) {
  constexpr int64_t lanes = kLanes<scalar_t, Isa>, kBlock = Isa::kTileVecs * lanes;
  int64_t k = 0;
  for (; k + kBlock <= length; k += kBlock) add_scaled_block<Isa, Isa::kTileVecs>(out + k, sources, offset + k, g, count);
  for (; k + lanes <= length; k += lanes) add_scaled_block<Isa, 1>(out + k, sources, offset + k, g, count);
  for (; k < length; ++k) {
    scalar_t sum[4] = {};
    int64_t q = 0;
    for (; q + 4 <= count; q += 4)
      for (int chain = 0; chain < 4; ++chain) sum[chain] += g[q + chain] * sources[q + chain][offset + k];
    for (; q < count; ++q) sum[0] += g[q] * sources[q][offset + k];
    out[k] += (sum[0] + sum[1]) + (sum[2] + sum[3]);
  }
}

// Per-task scratch: the windows (or channels) gathered for one add_scaled_rows.
template <typename scalar_t>
struct Gathered {
  std::vector<const scalar_t*> sources;
  std::vector<scalar_t> g;
  std::vector<int64_t> first;  // bucket starts (input gradient)
};

// ∂L/∂x of image n, channels k0 … k0+width−1 of `group` (NHWC, zeroed here first). For each window, the
// group's output channels are bucketed by argmax offset (a counting sort): the channels of one bucket hit
// the same position of z, so their filters are summed into the same taps together. Contributions arrive in
// a fixed order (window by window, bucket by bucket, channel by channel), whatever the split into tasks.
template <typename Isa, typename scalar_t, typename index_t>
FASTDL_INLINE void scatter_input_grad(const PoolGeometry& pg, const ConvGeometry& cg, const scalar_t* grad,
                                      Strides grad_strides, const index_t* a, Strides a_strides,
                                      const scalar_t* weight, scalar_t* grad_input, int64_t n, int64_t group,
                                      int64_t k0, int64_t width, Gathered<scalar_t>& scratch) {
  scalar_t* image = grad_input + n * cg.height * cg.width * cg.in_channels;
  const int64_t first_channel = group * cg.group_in() + k0;
  for (int64_t p = 0; p < cg.height * cg.width; ++p)
    std::fill(image + p * cg.in_channels + first_channel, image + p * cg.in_channels + first_channel + width,
              scalar_t(0));
  const int64_t positions = pg.kernel_h * pg.kernel_w, c0 = group * cg.group_out();
  std::vector<int64_t>& start = scratch.first;
  for (int64_t oh = 0; oh < pg.out_height; ++oh) {
    for (int64_t ow = 0; ow < pg.out_width; ++ow) {
      const index_t* a_window = a + a_strides.at(n, oh, ow);
      const scalar_t* grad_window = grad + grad_strides.at(n, oh, ow);
      std::fill(start.begin(), start.end(), 0);
      // Bucket b holds offset b − 1 (bucket 0: the ReLU-clipped −1). Count into start[b + 1], then prefix
      // sums make start[b] the beginning of bucket b, and placing advances it to the bucket's end.
      for (int64_t c = c0; c < c0 + cg.group_out(); ++c) ++start[a_window[c * a_strides.c] + 2];
      for (int64_t b = 1; b <= positions + 1; ++b) start[b] += start[b - 1];
      for (int64_t c = c0; c < c0 + cg.group_out(); ++c) {
        const int64_t slot = start[a_window[c * a_strides.c] + 1]++;
        scratch.sources[slot] = weight + c * cg.filter_size();
        scratch.g[slot] = grad_window[c * grad_strides.c];
      }
      // Now bucket o (offset o − 1) spans [start[o − 1], start[o]).
      for (int64_t o = 1; o <= positions; ++o) {
        const int64_t begin = start[o - 1], count = start[o] - begin;
        if (count == 0) continue;
        int64_t h, w;
        argmax_position(pg, oh, ow, o - 1, h, w);
        for_each_tap_run(cg, h, w, group, k0, width, [&](int64_t at, int64_t tap, int64_t length) FASTDL_INLINE_LAMBDA {
          add_scaled_rows<Isa>(image + at, scratch.sources.data() + begin, tap, scratch.g.data() + begin, count,
                               length);
        });
      }
    }
  }
}

// Image n's share of ∂L/∂w[c], in (KH, KW, C_in/groups) order, into `image_sum`; returns its share of
// ∂L/∂b[c] (in double). `padded` is x in NHWC with the convolution's zero padding made explicit, so that
// every tap of every window is in bounds and all of the image's windows go through add_scaled_rows together.
template <typename Isa, typename scalar_t, typename index_t>
FASTDL_INLINE double image_weight_grad(const PoolGeometry& pg, const ConvGeometry& cg, const scalar_t* grad,
                                       Strides grad_strides, const index_t* a, Strides a_strides,
                                       const scalar_t* padded, int64_t c, int64_t n, scalar_t* image_sum,
                                       Gathered<scalar_t>& scratch) {
  const int64_t group = c / cg.group_out();
  const int64_t padded_h = cg.height + 2 * cg.padding_h, padded_w = cg.width + 2 * cg.padding_w;
  const int64_t row = padded_w * cg.in_channels;  // one padded image row
  const scalar_t* image = padded == nullptr ? nullptr : padded + n * padded_h * row + group * cg.group_in();
  double bias_sum = 0;
  int64_t count = 0;
  for (int64_t oh = 0; oh < pg.out_height; ++oh) {
    for (int64_t ow = 0; ow < pg.out_width; ++ow) {
      const index_t offset = a[a_strides.at(n, oh, ow) + c * a_strides.c];
      if (offset < 0) continue;  // clipped by the ReLU: no gradient
      const scalar_t g = grad[grad_strides.at(n, oh, ow) + c * grad_strides.c];
      bias_sum += g;
      int64_t h, w;
      argmax_position(pg, oh, ow, offset, h, w);
      // Tap (0, 0) of z position (h, w) is padded position (h·s, w·s).
      if (image != nullptr) scratch.sources[count] = image + h * cg.stride_h * row + w * cg.stride_w * cg.in_channels;
      scratch.g[count++] = g;
    }
  }
  if (image == nullptr) return bias_sum;
  std::fill(image_sum, image_sum + cg.filter_size(), scalar_t(0));
  const bool whole_rows = cg.groups == 1 && cg.dilation_w == 1;
  for (int64_t i = 0; i < cg.kernel_h; ++i) {
    const int64_t row_offset = i * cg.dilation_h * row;
    if (whole_rows) {
      add_scaled_rows<Isa>(image_sum + i * cg.kernel_w * cg.group_in(), scratch.sources.data(), row_offset,
                           scratch.g.data(), count, cg.kernel_w * cg.in_channels);
      continue;
    }
    for (int64_t j = 0; j < cg.kernel_w; ++j)
      add_scaled_rows<Isa>(image_sum + (i * cg.kernel_w + j) * cg.group_in(), scratch.sources.data(),
                           row_offset + j * cg.dilation_w * cg.in_channels, scratch.g.data(), count, cg.group_in());
  }
  return bias_sum;
}

template <typename scalar_t, typename index_t>
void conv_backward_sparse(const PoolGeometry& pg, const ConvGeometry& cg, const scalar_t* grad, Strides grad_strides,
                          const index_t* a, Strides a_strides, const scalar_t* padded_input, const scalar_t* weight,
                          scalar_t* grad_input, scalar_t* grad_weight, scalar_t* grad_bias) {
  const int64_t pooled = pg.out_height * pg.out_width;
  if (grad_input != nullptr) {
    // Tasks are (group, image, run of channels), group-major so that a thread's consecutive tasks read the
    // same group's filters (from its cache); the channels are split only as far as needed to give every
    // thread work (runs of at least 16), since shorter runs vectorize worse.
    const int64_t images = pg.batch * cg.groups, threads = at::get_num_threads();
    const int64_t chunks =
        std::clamp<int64_t>((threads + images - 1) / images, 1, std::max<int64_t>(1, cg.group_in() / 16));
    const int64_t chunk = (cg.group_in() + chunks - 1) / chunks;
    at::parallel_for(0, images * chunks, 1, [&](int64_t begin, int64_t end) {
      Gathered<scalar_t> scratch{std::vector<const scalar_t*>(cg.group_out()), std::vector<scalar_t>(cg.group_out()),
                                 std::vector<int64_t>(pg.kernel_h * pg.kernel_w + 2)};
      with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t group = task / chunks / pg.batch, n = task / chunks % pg.batch;
          const int64_t k0 = task % chunks * chunk, width = std::min(chunk, cg.group_in() - k0);
          if (width > 0)
            scatter_input_grad<decltype(isa)>(pg, cg, grad, grad_strides, a, a_strides, weight, grad_input, n, group,
                                              k0, width, scratch);
        }
      });
    });
  }
  if (grad_weight == nullptr && grad_bias == nullptr) return;
  // Tasks are blocks of output channels: each owns its filters' gradients, so nothing is shared between
  // threads, and goes image by image, so that an image of x is read from cache by all the block's channels.
  // Each image's share is summed in scalar_t, the images' shares in double, so that long sums (batch ×
  // pooled positions) keep their precision.
  constexpr int64_t kChannelBlock = 8;
  const int64_t size = cg.filter_size(), blocks = (cg.out_channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t work = kChannelBlock * pg.batch * pooled * (grad_weight != nullptr ? size : 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(work, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> image_sum(size);
    std::vector<double> total(kChannelBlock * size), bias_sum(kChannelBlock);
    Gathered<scalar_t> scratch{std::vector<const scalar_t*>(pooled), std::vector<scalar_t>(pooled), {}};
    with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t c0 = block * kChannelBlock, c1 = std::min(cg.out_channels, c0 + kChannelBlock);
        std::fill(total.begin(), total.end(), 0.0);
        std::fill(bias_sum.begin(), bias_sum.end(), 0.0);
        for (int64_t n = 0; n < pg.batch; ++n) {
          for (int64_t c = c0; c < c1; ++c) {
            bias_sum[c - c0] += image_weight_grad<decltype(isa)>(pg, cg, grad, grad_strides, a, a_strides,
                                                                 grad_weight != nullptr ? padded_input : nullptr, c,
                                                                 n, image_sum.data(), scratch);
            if (grad_weight == nullptr) continue;
            double* sum = total.data() + (c - c0) * size;
            for (int64_t k = 0; k < size; ++k) sum[k] += image_sum[k];
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          if (grad_bias != nullptr) grad_bias[c] = static_cast<scalar_t>(bias_sum[c - c0]);
          if (grad_weight == nullptr) continue;
          // (KH, KW, C_in/groups) → (C_in/groups, KH, KW), the parameter's own layout.
          const int64_t taps = cg.kernel_h * cg.kernel_w;
          const double* sum = total.data() + (c - c0) * size;
          for (int64_t k = 0; k < cg.group_in(); ++k)
            for (int64_t t = 0; t < taps; ++t)
              grad_weight[c * size + k * taps + t] = static_cast<scalar_t>(sum[t * cg.group_in() + k]);
        }
      }
    });
  });
}

// x as NHWC with the convolution's zero padding made explicit: (N, H + 2·ph, W + 2·pw, C), dense. Copied
// in 16 × 16 tiles of (width, channels) from any layout, so NCHW callers pay one pass, not a transpose and
// then a pad.
at::Tensor padded_nhwc(const at::Tensor& input, int64_t padding_h, int64_t padding_w) {
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t padded_h = H + 2 * padding_h, padded_w = W + 2 * padding_w;
  at::Tensor out = padding_h > 0 || padding_w > 0 ? at::zeros({N, padded_h, padded_w, C}, input.options())
                                                  : at::empty({N, padded_h, padded_w, C}, input.options());
  constexpr int64_t kTile = 16;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(W * C, 1));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastdl::padded_nhwc", [&] {
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t sn = input.stride(0), sc = input.stride(1), sh = input.stride(2), sw = input.stride(3);
    at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H;
        const scalar_t* from = src + n * sn + h * sh;
        scalar_t* to = dst + ((n * padded_h + h + padding_h) * padded_w + padding_w) * C;
        for (int64_t w0 = 0; w0 < W; w0 += kTile)
          for (int64_t c0 = 0; c0 < C; c0 += kTile)
            for (int64_t c = c0; c < std::min(C, c0 + kTile); ++c)
              for (int64_t w = w0; w < std::min(W, w0 + kTile); ++w) to[w * C + c] = from[c * sc + w * sw];
      }
    });
  });
  return out;
}

void check_pair(at::IntArrayRef values, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "fastdl::conv_relu_pool2d: ", name, " must have 2 values, got ", values.size());
  TORCH_CHECK(values[0] >= minimum && values[1] >= minimum, "fastdl::conv_relu_pool2d: ", name, " must be >= ",
              minimum, ", got ", values);
}

PoolGeometry geometry_of(at::IntArrayRef z, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                         at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation, bool ceil_mode) {
  check_pair(pool_kernel, "pool_kernel_size", 1);
  check_pair(pool_stride, "pool_stride", 1);
  check_pair(pool_padding, "pool_padding", 0);
  check_pair(pool_dilation, "pool_dilation", 1);
  TORCH_CHECK(pool_padding[0] <= pool_kernel[0] / 2 && pool_padding[1] <= pool_kernel[1] / 2,
              "fastdl::conv_relu_pool2d: pool_padding must be at most half of pool_kernel_size, got ", pool_padding,
              " and ", pool_kernel);
  PoolGeometry g{z[0], z[1], z[2], z[3],
                 pooled_size(z[2], pool_kernel[0], pool_stride[0], pool_padding[0], pool_dilation[0], ceil_mode),
                 pooled_size(z[3], pool_kernel[1], pool_stride[1], pool_padding[1], pool_dilation[1], ceil_mode),
                 pool_kernel[0], pool_kernel[1], pool_stride[0], pool_stride[1], pool_padding[0], pool_padding[1],
                 pool_dilation[0], pool_dilation[1]};
  TORCH_CHECK(g.out_height >= 1 && g.out_width >= 1, "fastdl::conv_relu_pool2d: the convolution output ",
              z, " is too small for the pooling window");
  return g;
}

template <typename Fn>
void dispatch_argmax(at::ScalarType type, Fn&& fn) {
  switch (type) {
    case at::kChar: return fn(int8_t{});
    case at::kShort: return fn(int16_t{});
    case at::kInt: return fn(int32_t{});
    default: TORCH_CHECK(false, "fastdl::conv_relu_pool2d: argmax must be int8, int16 or int32, got ", type);
  }
}

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

// The caller's layout for a result: channels-last stays, anything else becomes contiguous NCHW.
at::MemoryFormat format_of(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(kChannelsLast) ? kChannelsLast : at::MemoryFormat::Contiguous;
}

// dst[k][r] = src[r][k] for each of `batch` (rows × cols) matrices, in square tiles so that both the reads
// and the writes of a tile stay within a few cache lines. Tasks are runs of tile rows of ~64k elements, so a
// small tensor is converted on the calling thread: waking the thread pool would cost more than the copy.
template <typename scalar_t>
void transpose_matrices(const scalar_t* src, scalar_t* dst, int64_t batch, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (kTile * std::max<int64_t>(cols, 1)));
  at::parallel_for(0, batch * row_tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t offset = task / row_tiles * rows * cols;
      const int64_t r0 = task % row_tiles * kTile, r1 = std::min(rows, r0 + kTile);
      for (int64_t k0 = 0; k0 < cols; k0 += kTile) {
        const int64_t k1 = std::min(cols, k0 + kTile);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t k = k0; k < k1; ++k) dst[offset + k * rows + r] = src[offset + r * cols + k];
      }
    }
  });
}

// `t` in memory format `format` (NCHW or channels-last). A dense tensor in the other of the two formats is
// converted by `transpose_matrices`: ATen's copy between them walks the destination element by element
// and is an order of magnitude slower here (it was the largest cost of this op after the convolutions).
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat format) {
  if (t.is_contiguous(format)) return t;
  const at::MemoryFormat other = format == kChannelsLast ? at::MemoryFormat::Contiguous : kChannelsLast;
  if (!t.is_contiguous(other)) return t.contiguous(format);
  at::Tensor out = at::empty(t.sizes(), t.options(), format);
  const int64_t channels = t.size(1), positions = t.size(2) * t.size(3);
  // NCHW → NHWC transposes each image's (C, H·W) matrix; NHWC → NCHW each image's (H·W, C) matrix.
  const int64_t rows = format == kChannelsLast ? channels : positions;
  const int64_t cols = format == kChannelsLast ? positions : channels;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fastdl::in_format", [&] {
    transpose_matrices(t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), t.size(0), rows, cols);
  });
  return out;
}

// The layout the forward convolution runs in. oneDNN's channels-last kernels are as fast as or faster than
// its NCHW ones on these layers with AVX-512 (AlexNet conv1: about 3× at batch 1), but an NCHW caller then
// pays for converting the input and the weight. That pays off when the input is at least as large as the
// weight; when the weight dominates (AlexNet conv5 and VGG16 block 5 at small batch) converting it on every
// call would cost more than the convolution gains, so the convolution runs in NCHW and only its output is
// converted for the pooling pass. oneDNN's AVX2 kernels differ: channels-last still wins on layers with few
// input channels (AlexNet conv1: 3, VGG16 block 1: 64; 1.2–1.35× one thread) and loses on wider ones
// (AlexNet conv2, 96 → 256: 1.35× slower at batch 16), so below AVX-512 only those run channels-last.
// fastdl's instruction set stands for oneDNN's here: both follow the CPU unless one is capped by hand.
bool onednn_prefers_channels_last(const at::Tensor& input) {
  constexpr int64_t kFewChannels = 64;
  return format_of(input) == kChannelsLast || cpu_isa() == CpuIsa::avx512 || input.size(1) <= kFewChannels;
}

at::MemoryFormat forward_conv_format(const at::Tensor& input, const at::Tensor& weight) {
  const bool conversion_pays = format_of(input) == kChannelsLast || input.numel() >= weight.numel();
  return onednn_prefers_channels_last(input) && conversion_pays ? kChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether the sparse backward beats oneDNN's dense one. It does several times fewer multiply-adds, but
// reads every filter of a group once per pooled window: that is cheap while a group's filters stay in a
// core's L2 cache (AlexNet conv1 0.14 MB, conv2 0.6 MB: 1.6× faster than oneDNN's backward there), and
// loses once they come from L3 (VGG16 block 5, 9.4 MB: 0.8×), where oneDNN's blocked GEMMs win.
bool sparse_backward_pays(const ConvGeometry& cg, int64_t element_size) {
  return cg.group_out() * cg.filter_size() * element_size <= (int64_t{1} << 20);
}

std::tuple<at::Tensor, at::Tensor> conv_relu_pool_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation, bool ceil_mode) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "fastdl::conv_relu_pool2d: expected 4-D input and weight, got ",
              input.sizes(), " and ", weight.sizes());
  const auto conv_format = forward_conv_format(input, weight);
  const at::Tensor z = in_format(at::convolution(in_format(input, conv_format), in_format(weight, conv_format),
                                                 std::nullopt, stride, padding, dilation, false, {0, 0}, groups),
                                 kChannelsLast);
  const PoolGeometry g = geometry_of(z.sizes(), pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode);
  const std::vector<int64_t> shape{g.batch, g.channels, g.out_height, g.out_width};
  const auto format = format_of(input);
  at::Tensor y = at::empty(shape, z.options(), format);
  at::Tensor a = at::empty(shape, z.options().dtype(argmax_type(pool_kernel)), format);
  TORCH_CHECK(!bias.has_value() || bias->numel() == g.channels, "fastdl::conv_relu_pool2d: bias must have ",
              g.channels, " values, got ", bias.has_value() ? bias->numel() : 0);
  if (y.numel() == 0) return {y, a};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastdl::conv_relu_pool_forward", [&] {
    std::vector<scalar_t> no_bias;
    at::Tensor b;
    if (bias.has_value()) b = bias->contiguous();
    else no_bias.assign(g.channels, scalar_t(0));
    const scalar_t* bias_values = b.defined() ? b.const_data_ptr<scalar_t>() : no_bias.data();
    dispatch_argmax(a.scalar_type(), [&](auto index) {
      using index_t = decltype(index);
      bias_relu_pool<scalar_t, index_t>(g, z.const_data_ptr<scalar_t>(), bias_values, y.mutable_data_ptr<scalar_t>(),
                                        a.mutable_data_ptr<index_t>(), strides_of(y));
    });
  });
  return {y, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_pool_backward(
    const at::Tensor& grad_output, const at::Tensor& argmax, const at::Tensor& input, const at::Tensor& weight,
    bool has_bias, bool input_needs_grad, bool weight_needs_grad, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
    at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation, bool ceil_mode) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.sizes() == argmax.sizes(),
              "fastdl::conv_relu_pool2d_backward: grad_output has shape ", grad_output.sizes(),
              " but argmax has shape ", argmax.sizes());
  TORCH_CHECK(argmax.scalar_type() == argmax_type(pool_kernel), "fastdl::conv_relu_pool2d_backward: argmax must be ",
              argmax_type(pool_kernel), " for this window, got ", argmax.scalar_type());
  int64_t conv_size[2];
  for (int d = 0; d < 2; ++d)
    conv_size[d] = (input.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1) / stride[d] + 1;
  const PoolGeometry g = geometry_of({input.size(0), weight.size(0), conv_size[0], conv_size[1]}, pool_kernel,
                                     pool_stride, pool_padding, pool_dilation, ceil_mode);
  TORCH_CHECK(g.out_height == grad_output.size(2) && g.out_width == grad_output.size(3),
              "fastdl::conv_relu_pool2d_backward: grad_output has shape ", grad_output.sizes(),
              ", expected pooled size ", g.out_height, "x", g.out_width);
  const ConvGeometry cg{input.size(1), input.size(2),  input.size(3),  weight.size(0), groups,
                        weight.size(2), weight.size(3), stride[0],      stride[1],      padding[0],
                        padding[1],     dilation[0],    dilation[1]};
  at::Tensor grad_bias = has_bias ? at::empty({g.channels}, grad_output.options()) : weight.new_empty({0});
  at::Tensor grad_input, grad_weight;
  if (sparse_backward_pays(cg, weight.element_size())) {
    // Padded NHWC x is read by the weight gradient, channels-last w by the input gradient.
    const at::Tensor padded_input = weight_needs_grad ? padded_nhwc(input, padding[0], padding[1]) : at::Tensor();
    const at::Tensor weight_ohwi = input_needs_grad ? in_format(weight, kChannelsLast) : at::Tensor();
    if (input_needs_grad) grad_input = at::empty(input.sizes(), input.options(), kChannelsLast);
    if (weight_needs_grad) grad_weight = at::empty(weight.sizes(), weight.options());
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "fastdl::conv_relu_pool_backward", [&] {
      dispatch_argmax(argmax.scalar_type(), [&](auto index) {
        using index_t = decltype(index);
        conv_backward_sparse<scalar_t, index_t>(
            g, cg, grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output), argmax.const_data_ptr<index_t>(),
            strides_of(argmax), weight_needs_grad ? padded_input.const_data_ptr<scalar_t>() : nullptr,
            input_needs_grad ? weight_ohwi.const_data_ptr<scalar_t>() : nullptr,
            input_needs_grad ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
            weight_needs_grad ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
            has_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
      });
    });
  } else {
    at::Tensor grad_z = at::empty({g.batch, g.channels, g.height, g.width}, grad_output.options(), kChannelsLast);
    if (grad_z.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "fastdl::conv_relu_pool_backward", [&] {
        dispatch_argmax(argmax.scalar_type(), [&](auto index) {
          using index_t = decltype(index);
          route_grad<scalar_t, index_t>(g, grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
                                        argmax.const_data_ptr<index_t>(), strides_of(argmax),
                                        grad_z.mutable_data_ptr<scalar_t>(),
                                        has_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr);
        });
      });
    } else if (has_bias) {
      grad_bias.zero_();
    }
    // ∂L/∂z is built in channels-last; oneDNN's AVX-512 channels-last backward is as fast as or faster than
    // its NCHW one on every layer measured (VGG16 block 5 at batch 16: 7% faster), which outweighs
    // converting the input and weight. Its AVX2 one is not, for wide inputs (VGG16 block 5: NCHW 10%
    // faster, one thread): there ∂L/∂z is transposed instead (a pass costing ~1% of that backward).
    if (input_needs_grad || weight_needs_grad) {
      const auto format = onednn_prefers_channels_last(input) ? kChannelsLast : at::MemoryFormat::Contiguous;
      std::tie(grad_input, grad_weight, std::ignore) =
          at::convolution_backward(in_format(grad_z, format), in_format(input, format), in_format(weight, format),
                                   std::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                   {input_needs_grad, weight_needs_grad, false});
    }
  }
  grad_input = input_needs_grad ? in_format(grad_input, format_of(input)) : input.new_empty({0});
  grad_weight = weight_needs_grad ? in_format(grad_weight, at::MemoryFormat::Contiguous) : weight.new_empty({0});
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cpu
}  // namespace fastdl

TORCH_LIBRARY_FRAGMENT(fastdl, m) {
  m.def(
      "conv_relu_pool_forward(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
      "int[] dilation, int groups, int[] pool_kernel_size, int[] pool_stride, int[] pool_padding, "
      "int[] pool_dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "conv_relu_pool_backward(Tensor grad_output, Tensor argmax, Tensor input, Tensor weight, bool has_bias, "
      "bool input_needs_grad, bool weight_needs_grad, int[] stride, int[] padding, int[] dilation, int groups, "
      "int[] pool_kernel_size, int[] pool_stride, int[] pool_padding, int[] pool_dilation, bool ceil_mode) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("conv_relu_pool_forward", &fastdl::cpu::conv_relu_pool_forward);
  m.impl("conv_relu_pool_backward", &fastdl::cpu::conv_relu_pool_backward);
}
