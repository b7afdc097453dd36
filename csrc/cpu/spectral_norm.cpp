// Spectral normalization (SN-GAN / WGAN discriminators), CPU kernels.
//
// W is seen as a row-major matrix: its dimension `dim` gives the H rows, the other dimensions, in
// order, the C columns. With normalize(x) = x / max(‖x‖, ε), a training step runs n power iterations
//   u ← normalize(W v),  v ← normalize(Wᵀ u)
// (eval mode keeps u and v), then σ = uᵀ W v and W_SN = W / σ. Backward (G = ∂L/∂W_SN, u and v held
// constant as torch does): ∂L/∂W = G / σ − (⟨G, W⟩ / σ²) · u vᵀ.
//
// Passes over W, the only large operand (torch's parametrization reads W four times for n = 1):
// * One per iteration. While row w_h is in cache, s_h = w_h · v and Wᵀs += s_h w_h; then
//   u = s / max(‖s‖, ε) and Wᵀu = Wᵀs / max(‖s‖, ε), so W v and Wᵀ u cost a single read of W.
// * None for σ after an iteration: v = t / max(‖t‖, ε) with t = Wᵀu, so σ = uᵀ W v = ‖t‖² / max(‖t‖, ε).
//   (Eval mode has no iteration, so there σ = Σ_h u_h (w_h · v) is one read.)
// * One read + one write for W / σ.
// Backward is two passes: ⟨G, W⟩, then G / σ − c u_h v_col, which needs no W.
//
// Parallelism and determinism: rows are cut into a number of blocks that depends only on the shape
// (never on the thread count); each block accumulates its own partial Wᵀs, and the partials are added
// in block order. Dot products keep a vector of independent partial sums: GCC may not reassociate a float
// reduction (no -ffast-math), but it vectorizes independent lanes, and the lanes are added in a fixed
// order. The same input thus gives bit-identical results run to run, whatever the threads.
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "../python_functions.h"
#include "common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <omp.h>

namespace fastdl {
namespace cpu {
namespace {

constexpr int kRowsPerStep = 4;             // rows sharing each load of v and each load/store of Wᵀs
// W elements per parallel block of the power iteration, and per thread of W / σ: a W up to 256 KiB in
// fp32 stays on one thread. On the quiet 2-core machine two threads took 128×1024 from 2.56× to 3.3×
// torch's parametrization. The price: every synchronization of a parallel region waits for a thread the
// OS may have descheduled, so on an oversubscribed machine a step of 128×1024 can take milliseconds
// where one thread takes tens of microseconds (as torch's own parallel kernels do there).
constexpr int64_t kBlockElements = 1 << 16;
constexpr int64_t kMaxBlocks = 16;
constexpr int64_t kScaleChunk = 1 << 12;    // elements per step of the back-to-front W / σ pass
constexpr int64_t kStreamingBytes = 4 << 20; // W / σ larger than this is written around the caches
constexpr int64_t kGrain = 1 << 18;         // elements per thread below which elementwise work stays serial

// dots[r] = w_r · v for the R (1 or 4) rows starting at w (row stride `cols`). Each row keeps a vector
// of partial sums (a vectorized reduction GCC may not make itself without -ffast-math), added in a
// fixed order at the end: deterministic. (The order, hence the last bits, depends on the ISA's width.)
template <typename Isa, typename scalar_t, int R>
FASTDL_INLINE void row_dots(const scalar_t* w, int64_t cols, const scalar_t* v, scalar_t* dots) {
  static_assert(R == 1 || R == 4);
  using V = Vec<scalar_t, Isa>;
  constexpr int64_t lanes = kLanes<scalar_t, Isa>;
  V acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  const int64_t body = cols - cols % lanes;
  for (int64_t c = 0; c < body; c += lanes) {
    const V x = load_vec<Isa>(v + c);
    acc0 += load_vec<Isa>(w + c) * x;
    if constexpr (R == 4) {
      acc1 += load_vec<Isa>(w + cols + c) * x;
      acc2 += load_vec<Isa>(w + 2 * cols + c) * x;
      acc3 += load_vec<Isa>(w + 3 * cols + c) * x;
    }
  }
  const V accs[4] = {acc0, acc1, acc2, acc3};
  for (int r = 0; r < R; ++r) {
    scalar_t dot = lane_sum<Isa>(accs[r]);
    for (int64_t c = body; c < cols; ++c) dot += w[r * cols + c] * v[c];
    dots[r] = dot;
  }
}

// s[r] = w_r · v and t += Σ_r s[r] w_r for the R rows starting at w: both halves of a power iteration
// while the rows are in cache.
template <typename Isa, typename scalar_t, int R>
FASTDL_INLINE void fused_rows(const scalar_t* w, int64_t cols, const scalar_t* v, scalar_t* s, scalar_t* t) {
  scalar_t dots[R];
  row_dots<Isa, scalar_t, R>(w, cols, v, dots);
  for (int r = 0; r < R; ++r) s[r] = dots[r];
  for (int64_t c = 0; c < cols; ++c) {
    scalar_t sum = t[c];
    for (int r = 0; r < R; ++r) sum += dots[r] * w[r * cols + c];
    t[c] = sum;
  }
}

// Rows [begin, end) of W: s_h = w_h · v, and t = Σ_h s_h w_h (t overwritten).
template <typename scalar_t>
void power_pass(const scalar_t* W, int64_t begin, int64_t end, int64_t cols, const scalar_t* v, scalar_t* s,
                scalar_t* t) {
  with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
    using Isa = decltype(isa);
    std::fill(t, t + cols, scalar_t(0));
    int64_t h = begin;
    for (; h + kRowsPerStep <= end; h += kRowsPerStep)
      fused_rows<Isa, scalar_t, kRowsPerStep>(W + h * cols, cols, v, s + h, t);
    for (; h < end; ++h) fused_rows<Isa, scalar_t, 1>(W + h * cols, cols, v, s + h, t);
  });
}

// Σ_{h ∈ [begin, end)} u_h (w_h · v), in double.
template <typename scalar_t>
double bilinear_pass(const scalar_t* W, int64_t begin, int64_t end, int64_t cols, const scalar_t* u,
                     const scalar_t* v) {
  return with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
    using Isa = decltype(isa);
    double sum = 0;
    int64_t h = begin;
    scalar_t dots[kRowsPerStep];
    for (; h + kRowsPerStep <= end; h += kRowsPerStep) {
      row_dots<Isa, scalar_t, kRowsPerStep>(W + h * cols, cols, v, dots);
      for (int r = 0; r < kRowsPerStep; ++r) sum += static_cast<double>(u[h + r]) * dots[r];
    }
    for (; h < end; ++h) {
      row_dots<Isa, scalar_t, 1>(W + h * cols, cols, v, dots);
      sum += static_cast<double>(u[h]) * dots[0];
    }
    return sum;
  });
}

template <typename scalar_t>
void add_into(scalar_t* target, const scalar_t* source, int64_t n) {
  with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) target[i] += source[i];
  });
}

// y = x · (1/σ): a multiply by the reciprocal, within an ulp of x / σ; a vector divide costs several
// times a multiply and made this pass compute-bound.
template <typename scalar_t>
void scale(const scalar_t* x, scalar_t factor, scalar_t* y, int64_t n) {
  with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * factor;
  });
}

// The same for a W / σ larger than the caches, with non-temporal stores: a plain store first reads
// the destination line into cache, so W / σ would cost read W + read and write W / σ; streaming
// stores skip that read, a third of the pass's memory traffic. (SSE2: every x86-64 target has it.)
FASTDL_INLINE bool scale_streaming(const float* x, float factor, float* y, int64_t n) {
#if defined(__x86_64__)
  if (reinterpret_cast<uintptr_t>(y) % 16 != 0) return false;
  const __m128 f = _mm_set1_ps(factor);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) _mm_stream_ps(y + i, _mm_mul_ps(_mm_loadu_ps(x + i), f));
  for (; i < n; ++i) y[i] = x[i] * factor;
  _mm_sfence();
  return true;
#else
  return false;
#endif
}

FASTDL_INLINE bool scale_streaming(const double* x, double factor, double* y, int64_t n) {
#if defined(__x86_64__)
  if (reinterpret_cast<uintptr_t>(y) % 16 != 0) return false;
  const __m128d f = _mm_set1_pd(factor);
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) _mm_stream_pd(y + i, _mm_mul_pd(_mm_loadu_pd(x + i), f));
  for (; i < n; ++i) y[i] = x[i] * factor;
  _mm_sfence();
  return true;
#else
  return false;
#endif
}

// ∂L/∂W on one row segment W[a, h, 0..B): g · (1/σ) − (c u_h) · v[a·B + b].
template <typename scalar_t>
void gradient_segment(const scalar_t* g, scalar_t inverse_sigma, scalar_t coefficient_u, const scalar_t* v,
                      scalar_t* out, int64_t n) {
  with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] * inverse_sigma - coefficient_u * v[i];
  });
}

// ‖x‖², vectorized: a vector of partial sums per chunk of kNormChunk elements (a chunk bounds the
// rounding of the partial sums), the chunks added in double. A plain double loop is one dependent add
// per element, which dominated whole steps for vectors as long as the d-linear weight's 8192 columns.
constexpr int64_t kNormChunk = 1024;

template <typename scalar_t>
double squared_norm(const scalar_t* x, int64_t n) {
  return with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
    using Isa = decltype(isa);
    constexpr int64_t lanes = kLanes<scalar_t, Isa>;
    double total = 0;
    int64_t i = 0;
    while (i + lanes <= n) {
      const int64_t chunk_end = i + std::min(kNormChunk, (n - i) / lanes * lanes);
      Vec<scalar_t, Isa> acc = {};
      for (; i < chunk_end; i += lanes) {
        const Vec<scalar_t, Isa> y = load_vec<Isa>(x + i);
        acc += y * y;
      }
      total += lane_sum<Isa>(acc);
    }
    for (; i < n; ++i) total += static_cast<double>(x[i]) * x[i];
    return total;
  });
}

// How many row blocks W is cut into: a function of the shape only, so results do not depend on threads.
int64_t row_blocks(int64_t rows, int64_t cols) {
  const int64_t by_work = rows * cols / kBlockElements;
  const int64_t by_rows = std::max<int64_t>(1, rows / kRowsPerStep);
  return std::clamp<int64_t>(by_work, 1, std::min(kMaxBlocks, by_rows));
}

int64_t block_begin(int64_t block, int64_t blocks, int64_t rows) { return rows * block / blocks; }

// y = x · factor, the product formed in double and rounded once: as exact as x / (1 / factor) would be,
// for every ε (1 / ε² does not overflow a double, as it would a float), and a multiply, not a divide.
template <typename scalar_t>
void scale_exactly(const scalar_t* x, double factor, scalar_t* y, int64_t n) {
  with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(static_cast<double>(x[i]) * factor);
  });
}

// The end of a power iteration, once u holds s = W v and partials[b · C, (b + 1) · C) the blocks' Wᵀs:
// u ← normalize(W v), v ← normalize(Wᵀ u); returns ‖Wᵀu‖.
template <typename scalar_t>
double finish_iteration(int64_t rows, int64_t cols, int64_t blocks, double eps, scalar_t* u, scalar_t* v,
                        scalar_t* partials) {
  for (int64_t b = 1; b < blocks; ++b) add_into(partials, partials + b * cols, cols);  // in block order
  // With t = Wᵀs and d_s = max(‖s‖, ε): u = s / d_s, Wᵀu = t / d_s, so ‖Wᵀu‖ = ‖t‖ / d_s and
  // v = Wᵀu / max(‖Wᵀu‖, ε) = t / (d_s · max(‖Wᵀu‖, ε)): one pass over t for its norm, one to write v.
  const double s_denominator = std::max(std::sqrt(squared_norm(u, rows)), eps);
  scale_exactly(u, 1.0 / s_denominator, u, rows);
  const double t_norm = std::sqrt(squared_norm(partials, cols)) / s_denominator;
  scale_exactly(partials, 1.0 / (s_denominator * std::max(t_norm, eps)), v, cols);
  return t_norm;
}

template <typename scalar_t>
double bilinear(const scalar_t* W, int64_t rows, int64_t cols, const scalar_t* u, const scalar_t* v) {
  const int64_t blocks = row_blocks(rows, cols);
  if (blocks == 1) return bilinear_pass(W, 0, rows, cols, u, v);
  std::vector<double> sums(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b)
      sums[b] = bilinear_pass(W, block_begin(b, blocks, rows), block_begin(b + 1, blocks, rows), cols, u, v);
  });
  double sum = 0;
  for (const double partial : sums) sum += partial;
  return sum;
}

// ⟨a, b⟩ over n elements, in fixed chunks summed in order (deterministic, whatever the threads).
template <typename scalar_t>
double dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  const int64_t chunks = (n + kBlockElements - 1) / kBlockElements;
  std::vector<double> sums(chunks);
  at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / kBlockElements), [&](int64_t first, int64_t last) {
    with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t begin = chunk * kBlockElements, length = std::min(kBlockElements, n - begin);
        scalar_t value;
        row_dots<decltype(isa), scalar_t, 1>(a + begin, length, b + begin, &value);
        sums[chunk] = value;
      }
    });
  });
  double sum = 0;
  for (const double partial : sums) sum += partial;
  return sum;
}

void check_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t dim, const char* name) {
  TORCH_CHECK(weight.dim() >= 2, name, ": expected a weight of 2 or more dimensions, got ", weight.dim());
  TORCH_CHECK(dim >= 0 && dim < weight.dim(), name, ": dim must be in [0, ", weight.dim() - 1, "], got ", dim);
  const int64_t rows = weight.size(dim), cols = rows == 0 ? 0 : weight.numel() / rows;
  TORCH_CHECK(u.dim() == 1 && u.size(0) == rows, name, ": u must be a vector of length ", rows, ", got shape ",
              u.sizes());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == cols, name, ": v must be a vector of length ", cols, ", got shape ",
              v.sizes());
  TORCH_CHECK(u.scalar_type() == weight.scalar_type() && v.scalar_type() == weight.scalar_type(), name,
              ": u and v must have the weight's dtype ", weight.scalar_type());
}

struct Normalized {
  at::Tensor weight_sn;
  double sigma;  // rounded to the weight's dtype, as torch's σ is a tensor of that dtype
};

// The step itself: W / σ, with u_data and v_data (dense vectors of the weight's dtype, lengths H and C)
// updated in place by the power iterations when `training`. The kernels of every entry point below.
// A barrier for the team of a training step's parallel region. None for a single thread, which may be
// inside someone else's parallel region: a barrier there would wait for that region's other threads.
FASTDL_INLINE void team_barrier(int64_t threads) {
  if (threads > 1) {
#pragma omp barrier
  }
}

// body(thread, threads) on each thread of a team of (at most) `threads`, or here for one thread.
template <typename Body>
void run_team(int64_t threads, const Body& body) {
  if (threads == 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num(), omp_get_num_threads());
}

Normalized normalize_weight(const at::Tensor& weight, int64_t dim, int64_t n_power_iterations, double eps,
                            bool training, void* u_data, void* v_data) {
  // The matrix view, row-major. No copy for dim 0 (or any dim with only size-1 dims before it).
  const at::Tensor matrix = dim == 0 ? weight.contiguous() : weight.movedim(dim, 0).contiguous();
  const int64_t rows = weight.size(dim), cols = rows == 0 ? 0 : weight.numel() / rows;
  // W / σ elementwise over W's own storage when it is dense (keeps channels_last weights as they are).
  const at::Tensor source = weight.is_non_overlapping_and_dense() ? weight : matrix.movedim(0, dim);
  at::Tensor weight_sn = at::empty_like(source);
  double sigma = 0;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fastdl::spectral_norm", [&] {
    const scalar_t* W = matrix.const_data_ptr<scalar_t>();
    scalar_t* u = static_cast<scalar_t*>(u_data);
    scalar_t* v = static_cast<scalar_t*>(v_data);
    scalar_t* y = weight_sn.mutable_data_ptr<scalar_t>();
    const int64_t numel = weight.numel();
    const scalar_t* x = source.const_data_ptr<scalar_t>();
    // W / σ back to front: the power iteration just streamed W front to back, so its tail is still in
    // cache. An output that fits in cache stays there for the layer that reads it next; a larger one
    // streams.
    const bool streaming = numel * static_cast<int64_t>(sizeof(scalar_t)) > kStreamingBytes;
    const auto scale_range = [&](int64_t begin, int64_t end, scalar_t factor) {
      for (int64_t stop = end; stop > begin; stop -= kScaleChunk) {
        const int64_t start = std::max(begin, stop - kScaleChunk);
        if (!(streaming && scale_streaming(x + start, factor, y + start, stop - start)))
          scale(x + start, factor, y + start, stop - start);
      }
    };
    // σ is rounded to the weight's dtype first, as torch's σ is a tensor of that dtype.
    const auto reciprocal = [](double sigma_value) {
      return static_cast<scalar_t>(1.0 / static_cast<scalar_t>(sigma_value));
    };
    if (!training) {
      sigma = static_cast<scalar_t>(bilinear(W, rows, cols, u, v));
      const scalar_t factor = reciprocal(sigma);
      if (numel <= kBlockElements)
        scale_range(0, numel, factor);
      else
        at::parallel_for(0, numel, kBlockElements, [&](int64_t begin, int64_t end) { scale_range(begin, end, factor); });
      return;
    }
    // A training step is one parallel region (none for a W up to kBlockElements, which stays on this
    // thread, cache-resident): each thread takes a run of row blocks in the power iterations and the
    // same part of W for W / σ, so it scales the part of W its own core's cache just read; one region
    // rather than one per pass, since each synchronization may wait for a descheduled thread. The
    // partial sums Wᵀs (blocks · C ≤ H · C scalars) live in W / σ's memory, written only once σ is
    // known, so a step allocates nothing but its result.
    const int64_t blocks = row_blocks(rows, cols);
    double t_norm = 0;
    const auto team_step = [&](int64_t thread, int64_t threads) {
      const int64_t first = blocks * thread / threads, last = blocks * (thread + 1) / threads;
      for (int64_t i = 0; i < n_power_iterations; ++i) {
        for (int64_t b = first; b < last; ++b)
          power_pass(W, block_begin(b, blocks, rows), block_begin(b + 1, blocks, rows), cols, v, u, y + b * cols);
        team_barrier(threads);
        if (thread == 0) t_norm = finish_iteration(rows, cols, blocks, eps, u, v, y);
        team_barrier(threads);  // every thread now sees the new v and ‖Wᵀu‖
      }
      const double sigma_value = t_norm * t_norm / std::max(t_norm, eps);
      scale_range(numel * thread / threads, numel * (thread + 1) / threads, reciprocal(sigma_value));
    };
    run_team(at::in_parallel_region() ? 1 : std::min<int64_t>(blocks, at::get_num_threads()), team_step);
    sigma = static_cast<scalar_t>(t_norm * t_norm / std::max(t_norm, eps));
  });
  return {weight_sn, sigma};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spectral_norm_forward(
    const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t dim, int64_t n_power_iterations,
    double eps, bool training) {
  check_args(weight, u, v, dim, "fastdl::spectral_norm_forward");
  TORCH_CHECK(n_power_iterations > 0, "fastdl::spectral_norm_forward: n_power_iterations must be positive, got ",
              n_power_iterations);
  at::Tensor u_out = u.clone(at::MemoryFormat::Contiguous);
  at::Tensor v_out = v.clone(at::MemoryFormat::Contiguous);
  const Normalized result = normalize_weight(weight, dim, n_power_iterations, eps, training,
                                             u_out.mutable_data_ptr(), v_out.mutable_data_ptr());
  return {result.weight_sn, u_out, v_out, at::scalar_tensor(result.sigma, weight.options())};
}

// ∂L/∂W = G / σ − (⟨G, W⟩ / σ²) · u vᵀ, u_data and v_data dense vectors of the weight's dtype.
at::Tensor weight_gradient(const at::Tensor& grad_output, const at::Tensor& weight, const void* u_data,
                           const void* v_data, double sigma, int64_t dim) {
  const at::Tensor g = grad_output.contiguous(), w = weight.contiguous();
  at::Tensor grad_weight = at::empty_like(w);
  // W as (A, H, B): A = the dims before `dim`, H = its size, B = the dims after; column = a·B + b.
  const int64_t rows = weight.size(dim);
  int64_t before = 1;
  for (int64_t d = 0; d < dim; ++d) before *= weight.size(d);
  const int64_t after = rows * before == 0 ? 0 : weight.numel() / (rows * before);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "fastdl::spectral_norm_backward", [&] {
    const scalar_t* g_data = g.const_data_ptr<scalar_t>();
    const scalar_t* u = static_cast<const scalar_t*>(u_data);
    const scalar_t* v = static_cast<const scalar_t*>(v_data);
    scalar_t* out = grad_weight.mutable_data_ptr<scalar_t>();
    const double coefficient = dot(g_data, w.const_data_ptr<scalar_t>(), weight.numel()) / (sigma * sigma);
    const scalar_t inverse_sigma = static_cast<scalar_t>(1.0 / sigma);
    at::parallel_for(0, before * rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, after)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t segment = begin; segment < end; ++segment) {
                         const int64_t a = segment / rows, h = segment % rows;
                         gradient_segment(g_data + segment * after, inverse_sigma,
                                          static_cast<scalar_t>(coefficient * u[h]), v + a * after,
                                          out + segment * after, after);
                       }
                     });
  });
  return grad_weight;
}

at::Tensor spectral_norm_backward(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& u,
                                  const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  check_args(weight, u, v, dim, "fastdl::spectral_norm_backward");
  TORCH_CHECK(grad_output.sizes() == weight.sizes(), "fastdl::spectral_norm_backward: grad_output has shape ",
              grad_output.sizes(), " but weight has shape ", weight.sizes());
  TORCH_CHECK(sigma.numel() == 1, "fastdl::spectral_norm_backward: sigma must have one element, got ", sigma.numel());
  const at::Tensor u_c = u.contiguous(), v_c = v.contiguous();
  return weight_gradient(grad_output, weight, u_c.const_data_ptr(), v_c.const_data_ptr(), sigma.item<double>(), dim);
}

// Copies between a vector, perhaps strided, and dense memory of its dtype: a memcpy when the vector is
// dense, skipping TensorIterator's set-up (a microsecond per copy, when a small weight's whole step
// takes a few).
void copy_to_dense(const at::Tensor& vector, void* dense) {
  if (vector.is_contiguous())
    std::memcpy(dense, vector.const_data_ptr(), vector.numel() * vector.element_size());
  else
    at::from_blob(dense, vector.sizes(), vector.options()).copy_(vector);
}

void copy_from_dense(const void* dense, const at::Tensor& vector) {
  if (vector.is_contiguous())
    std::memcpy(vector.mutable_data_ptr(), dense, vector.numel() * vector.element_size());
  else
    vector.copy_(at::from_blob(const_cast<void*>(dense), vector.sizes(), vector.options()));
}

// Marks an in-place write made through a raw pointer, as an in-place torch op would.
void bump_version(const at::Tensor& tensor) { tensor.unsafeGetTensorImpl()->bump_version(); }

// The step on the parametrization's buffers u and v, updated in place when training: directly when they
// are dense, as they are unless someone replaced them, else through a dense copy.
Normalized step_on_buffers(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t dim,
                           int64_t n_power_iterations, double eps, bool training) {
  check_args(weight, u, v, dim, "fastdl spectral_norm step");
  TORCH_CHECK(n_power_iterations > 0, "fastdl spectral_norm step: n_power_iterations must be positive, got ",
              n_power_iterations);
  Normalized normalized;
  if (u.is_contiguous() && v.is_contiguous()) {
    // In eval mode normalize_weight only reads u and v.
    normalized = normalize_weight(weight, dim, n_power_iterations, eps, training,
                                  const_cast<void*>(u.const_data_ptr()), const_cast<void*>(v.const_data_ptr()));
  } else {
    const at::Tensor uv = at::empty({u.numel() + v.numel()}, weight.options());
    char* u_data = static_cast<char*>(uv.mutable_data_ptr());
    char* v_data = u_data + u.numel() * uv.element_size();
    copy_to_dense(u, u_data);
    copy_to_dense(v, v_data);
    normalized = normalize_weight(weight, dim, n_power_iterations, eps, training, u_data, v_data);
    if (training) {
      copy_from_dense(u_data, u);
      copy_from_dense(v_data, v);
    }
  }
  if (training) {
    bump_version(u);
    bump_version(v);
  }
  return normalized;
}

// ∂L/∂W in differentiable ATen ops, for a backward that must itself be differentiable (see
// fastdl/_autograd.py): σ = uᵀ W v is rebuilt from W, so that ∂σ/∂W reaches the second derivative.
at::Tensor differentiable_weight_gradient(const at::Tensor& grad_output, const at::Tensor& weight, const at::Tensor& uv,
                                          int64_t dim) {
  const int64_t rows = weight.size(dim);
  const at::Tensor u = uv.narrow(0, 0, rows), v = uv.narrow(0, rows, uv.numel() - rows);
  const at::Tensor sigma = at::dot(u, at::mv(weight.movedim(dim, 0).flatten(1), v));
  std::vector<int64_t> moved_shape = weight.sizes().vec();  // the shape of weight.movedim(dim, 0)
  std::rotate(moved_shape.begin(), moved_shape.begin() + dim, moved_shape.begin() + dim + 1);
  const at::Tensor outer = at::outer(u, v).reshape(moved_shape).movedim(0, dim);
  return grad_output / sigma - (grad_output * weight).sum() / (sigma * sigma) * outer;
}

// Whether backward must be differentiable ATen ops: autograd records it (create_graph turns grad mode on),
// a transform runs over it (the gradient is then a batched wrapper with no storage of its own: a vmap over
// the backward, as is_grads_batched does), or a tangent rides on its operands (forward-mode AD). Transforms
// around the forward never reach this node: the step declines them (fastdl/ops/spectral_norm.py).
bool differentiable_backward_required(const at::Tensor& grad_output, const at::Tensor& weight) {
  return at::GradMode::is_enabled() || !grad_output.has_storage() || grad_output._fw_grad(/*level=*/0).defined() ||
         weight._fw_grad(/*level=*/0).defined();
}

// W / σ with its autograd node. What ∂L/∂W reads is saved: W (the parameter, alive anyway) and the
// step's own u, v and σ, not the buffers: a later step may overwrite the buffers before backward (D(real)
// and D(fake) in one GAN loss), as torch's clones guard against too.
// The buffers reach forward inside a struct, not as tensor arguments: they are not differentiable, and
// Function::apply would otherwise record, edge and scan each as an input of the node.
struct Buffers {
  const at::Tensor& u;
  const at::Tensor& v;
};

class SpectralNormStep : public torch::autograd::Function<SpectralNormStep> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const Buffers& buffers,
                            int64_t dim, int64_t n_power_iterations, double eps, bool training) {
    const at::Tensor &u = buffers.u, &v = buffers.v;
    Normalized normalized = step_on_buffers(weight, u, v, dim, n_power_iterations, eps, training);
    // u then v in one allocation.
    const at::Tensor uv = at::empty({u.numel() + v.numel()}, weight.options());
    char* u_data = static_cast<char*>(uv.mutable_data_ptr());
    copy_to_dense(u, u_data);
    copy_to_dense(v, u_data + u.numel() * uv.element_size());
    ctx->save_for_backward({weight, uv});
    ctx->saved_data["sigma"] = normalized.sigma;
    ctx->saved_data["dim"] = dim;
    return std::move(normalized.weight_sn);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[0], &uv = saved[1];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    if (differentiable_backward_required(grads[0], weight))
      return {differentiable_weight_gradient(grads[0], weight, uv, dim), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor()};
    const char* u_data = static_cast<const char*>(uv.const_data_ptr());
    const char* v_data = u_data + weight.size(dim) * uv.element_size();
    const at::Tensor grad_weight =
        weight_gradient(grads[0], weight, u_data, v_data, ctx->saved_data["sigma"].toDouble(), dim);
    return {grad_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The parametrization's eager step: W / σ, the buffers u and v updated in place when training, and an
// autograd node when W needs a gradient.
at::Tensor eager_step(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v, int64_t dim,
                      int64_t n_power_iterations, double eps, bool training) {
  if (at::GradMode::is_enabled() && weight.requires_grad())
    return SpectralNormStep::apply(weight, Buffers{u, v}, dim, n_power_iterations, eps, training);
  return step_on_buffers(weight, u, v, dim, n_power_iterations, eps, training).weight_sn;
}

// eager_step as a plain Python function (METH_FASTCALL), called by fastdl/ops/spectral_norm.py with
// (weight, u, v, dim, n_power_iterations, eps, training). Calling it costs ~0.2 µs, where a torch.ops
// call costs ~2.5 µs (schema matching, boxing, the dispatcher), a tenth of a small weight's whole step.
// It bypasses the dispatcher, so it answers NotImplemented for what needs the dispatcher: tensor
// subclasses (fake and functional tensors among them) and active torch-function or dispatch modes. The
// caller then goes through the custom op fastdl::spectral_normalize.
PyObject* eager_step_python(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 7, "fastdl spectral_norm step: expected 7 arguments, got ", nargs);
  for (int i = 0; i < 3; ++i)
    if (!THPVariable_CheckExact(args[i])) Py_RETURN_NOTIMPLEMENTED;
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set())
    Py_RETURN_NOTIMPLEMENTED;
  const int64_t dim = PyLong_AsLongLong(args[3]);
  const int64_t n_power_iterations = PyLong_AsLongLong(args[4]);
  const double eps = PyFloat_AsDouble(args[5]);
  const int training = PyObject_IsTrue(args[6]);
  if (PyErr_Occurred()) return nullptr;
  const at::Tensor &weight = THPVariable_Unpack(args[0]), &u = THPVariable_Unpack(args[1]),
                   &v = THPVariable_Unpack(args[2]);
  at::Tensor weight_sn;
  {
    const pybind11::gil_scoped_release no_gil;
    weight_sn = eager_step(weight, u, v, dim, n_power_iterations, eps, training != 0);
  }
  return THPVariable_Wrap(std::move(weight_sn));
  END_HANDLE_TH_ERRORS
}

// fastdl._C.spectral_norm_eager_step (see python_functions.h): a METH_FASTCALL builtin, not a pybind11
// function, so that declining a call (NotImplemented) costs no argument conversion.
const PythonFunctions registered([](PyObject* module) {
  static PyMethodDef definition = {
      "spectral_norm_eager_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&eager_step_python)),
      METH_FASTCALL, "fastdl's eager spectral-norm step on a parametrization's buffers (see csrc/cpu/spectral_norm.cpp)"};
  PyObject* function = PyCFunction_New(&definition, nullptr);
  if (function == nullptr) return -1;
  const int status = PyModule_AddObjectRef(module, definition.ml_name, function);
  Py_DECREF(function);
  return status;
});

}  // namespace
}  // namespace cpu
}  // namespace fastdl

TORCH_LIBRARY_FRAGMENT(fastdl, m) {
  m.def(
      "spectral_norm_forward(Tensor weight, Tensor u, Tensor v, int dim, int n_power_iterations, float eps, "
      "bool training) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "spectral_norm_backward(Tensor grad_output, Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("spectral_norm_forward", &fastdl::cpu::spectral_norm_forward);
  m.impl("spectral_norm_backward", &fastdl::cpu::spectral_norm_backward);
}
