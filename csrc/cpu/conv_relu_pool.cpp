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
// ReLU mask is the a = −1 case); it is built in one pass and handed to ATen's convolution_backward.
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
FASTDL_CPU_CLONES void max_step(const scalar_t* __restrict z, scalar_t* __restrict best, scalar_t* __restrict offset,
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
FASTDL_CPU_CLONES void finish_window(const scalar_t* __restrict best, const scalar_t* __restrict offset,
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
}

// One window's gradient and argmax for a run of channels, copied out of their (possibly strided) layout
// into contiguous buffers; the bias gradient, Σ over windows of g where a ≥ 0, accumulates on the way.
template <typename scalar_t, typename index_t>
FASTDL_CPU_CLONES void load_window(const scalar_t* __restrict grad, int64_t grad_stride, const index_t* __restrict a,
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
FASTDL_CPU_CLONES void route_step(const scalar_t* __restrict grad, const index_t* __restrict a,
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
  if (grad_bias == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < g.batch; ++n) sum += bias_sums[n * C + c];
    grad_bias[c] = static_cast<scalar_t>(sum);
  }
}

void check_pair(at::IntArrayRef values, const char* name, int64_t minimum) {
  TORCH_CHECK(values.size() == 2, "fastdl::conv_relu_pool2d: ", name, " must have 2 values, got ", values.size());
  TORCH_CHECK(values[0] >= minimum && values[1] >= minimum, "fastdl::conv_relu_pool2d: ", name, " must be >= ",
              minimum, ", got ", values);
}

PoolGeometry geometry_of(const at::Tensor& z, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                         at::IntArrayRef pool_padding, at::IntArrayRef pool_dilation, bool ceil_mode) {
  check_pair(pool_kernel, "pool_kernel_size", 1);
  check_pair(pool_stride, "pool_stride", 1);
  check_pair(pool_padding, "pool_padding", 0);
  check_pair(pool_dilation, "pool_dilation", 1);
  TORCH_CHECK(pool_padding[0] <= pool_kernel[0] / 2 && pool_padding[1] <= pool_kernel[1] / 2,
              "fastdl::conv_relu_pool2d: pool_padding must be at most half of pool_kernel_size, got ", pool_padding,
              " and ", pool_kernel);
  PoolGeometry g{z.size(0), z.size(1), z.size(2), z.size(3),
                 pooled_size(z.size(2), pool_kernel[0], pool_stride[0], pool_padding[0], pool_dilation[0], ceil_mode),
                 pooled_size(z.size(3), pool_kernel[1], pool_stride[1], pool_padding[1], pool_dilation[1], ceil_mode),
                 pool_kernel[0], pool_kernel[1], pool_stride[0], pool_stride[1], pool_padding[0], pool_padding[1],
                 pool_dilation[0], pool_dilation[1]};
  TORCH_CHECK(g.out_height >= 1 && g.out_width >= 1, "fastdl::conv_relu_pool2d: the convolution output ",
              z.sizes(), " is too small for the pooling window");
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
// its NCHW ones on these layers (AlexNet conv1: about 3× at batch 1), but an NCHW caller then pays for
// converting the input and the weight. That pays off when the input is at least as large as the weight;
// when the weight dominates (AlexNet conv5 and VGG16 block 5 at small batch) converting it on every call
// would cost more than the convolution gains, so the convolution runs in NCHW and only its output is
// converted for the pooling pass.
at::MemoryFormat forward_conv_format(const at::Tensor& input, const at::Tensor& weight) {
  return format_of(input) == kChannelsLast || input.numel() >= weight.numel() ? kChannelsLast
                                                                              : at::MemoryFormat::Contiguous;
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
  const PoolGeometry g = geometry_of(z, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode);
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
  at::Tensor grad_z = at::empty({input.size(0), weight.size(0), conv_size[0], conv_size[1]}, grad_output.options(),
                                kChannelsLast);
  const PoolGeometry g = geometry_of(grad_z, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode);
  TORCH_CHECK(g.out_height == grad_output.size(2) && g.out_width == grad_output.size(3),
              "fastdl::conv_relu_pool2d_backward: grad_output has shape ", grad_output.sizes(),
              ", expected pooled size ", g.out_height, "x", g.out_width);
  at::Tensor grad_bias = has_bias ? at::empty({g.channels}, grad_output.options()) : weight.new_empty({0});
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
  // The convolution's backward always runs in channels-last, whatever the forward chose: ∂L/∂z is built
  // there, and oneDNN's channels-last backward is as fast as or faster than its NCHW one on every layer
  // measured (VGG16 block 5 at batch 16: 7% faster), which outweighs converting the input and weight.
  at::Tensor grad_input, grad_weight;
  if (input_needs_grad || weight_needs_grad) {
    std::tie(grad_input, grad_weight, std::ignore) =
        at::convolution_backward(grad_z, in_format(input, kChannelsLast), in_format(weight, kChannelsLast),
                                 std::nullopt, stride, padding, dilation, false, {0, 0}, groups,
                                 {input_needs_grad, weight_needs_grad, false});
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
