// Dilated causal 1-D convolution (WaveNet, TCN), CPU kernels. Math in fastdl/ops/causal_conv.py:
//   y[n, o, t]      = b[o] + Σ_j Σ_i w[o, i, j] · x[n, i, t − s_j],   s_j = d·(k − 1 − j), x at t < 0 is 0
//   ∂x[n, i, t]     = Σ_j Σ_o w[o, i, j] · g[n, o, t + s_j]           (t + s_j < T)
//   ∂w[o, i, j]     = Σ_n Σ_{t ≥ s_j} g[n, o, t] · x[n, i, t − s_j]
//   ∂b[o]           = Σ_n Σ_t g[n, o, t]
//
// The causal window is read in place. Per group, tap j is one matrix product on shifted column ranges
// of the unpadded rows:   Y[:, s_j:T] += W_j · X[:, 0:T−s_j]   (W_j = w[:, :, j], C_out/g × C_in/g)
// The dense forward and ∂x sum these products in a direct register-tiled kernel (see "shifted matrix
// products"), ∂w is one GEMM per tap through ATen's BLAS with leading dimension T: no padded copy of x,
// no over-long output to chomp, and the FLOPs are exactly the useful ones.
//
// Depthwise layers (one input channel per group) are k multiply-adds per output: a vectorized sweep
// along time, with kernel sizes 2 and 3 (WaveNet, TCN) fused into one pass, any other k one pass per tap.
//
// Work is split into tasks whose partition depends only on the shape, never on the thread count, and
// reductions (∂w, ∂b) sum per-task partials in task order: results are bit-identical run to run.
//
// Streaming step: x at step t sits in ring slot t mod (R + 1), R = d·(k − 1), buffer (N, R + 1, C_in).
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../python_functions.h"
#include "common.h"

namespace fastdl {
namespace cpu {
namespace {

// The BLAS that torch itself links (MKL, or OpenBLAS in other builds) exports the Fortran GEMMs; ATen's
// own cpublas::gemm wrappers are not exported from libtorch, so we call the Fortran symbols directly.
// Their dimensions are 32-bit ints: rows and sequence lengths are checked against INT_MAX (pointers and
// every offset here stay int64).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

// A time chunk per GEMM: wide enough that BLAS runs at full speed, narrow enough that a (C_out/g × chunk)
// output tile stays in L2 for the bias pass, and that one long sequence still gives every thread work.
constexpr int64_t kTimeChunk = 1024;
// Backward tasks cover more time each: every task holds a private ∂w partial.
constexpr int64_t kWeightChunk = 4096;

struct Shape {
  int64_t batch, in_channels, out_channels, length, taps, dilation, groups;
  int64_t in_per_group() const { return in_channels / groups; }
  int64_t out_per_group() const { return out_channels / groups; }
  int64_t shift(int64_t tap) const { return dilation * (taps - 1 - tap); }
};

Shape shape_of(const at::Tensor& input, const at::Tensor& weight, int64_t dilation, int64_t groups) {
  return {input.size(0), input.size(1), weight.size(0), input.size(2), weight.size(2), dilation, groups};
}

void check_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                int64_t dilation, int64_t groups, const char* name) {
  TORCH_CHECK(input.dim() == 3, name, ": expected input (N, C_in, T), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 3, name, ": expected weight (C_out, C_in/groups, k), got shape ", weight.sizes());
  TORCH_CHECK(dilation >= 1 && groups >= 1, name, ": dilation and groups must be >= 1, got ", dilation, " and ",
              groups);
  TORCH_CHECK(weight.size(0) % groups == 0 && weight.size(1) * groups == input.size(1), name, ": weight ",
              weight.sizes(), " with groups=", groups, " does not fit an input of ", input.size(1), " channels");
  TORCH_CHECK(input.size(1) <= INT_MAX && input.size(2) <= INT_MAX && weight.size(0) <= INT_MAX, name,
              ": channels and length must each be below 2^31 (BLAS dimensions), got input ", input.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), name, ": weight dtype differs from input dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), name, ": bias must be (C_out,), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), name, ": bias dtype differs from input dtype");
  }
}

// Row-major C (m × n) = op(A)·op(B) + beta·C. BLAS is column-major, and a row-major matrix is its
// transpose in column-major, so the call computes Cᵀ = op(B)ᵀ·op(A)ᵀ with the same transpose flags.
template <typename scalar_t>
void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  const char flag_a = transpose_a ? 'T' : 'N', flag_b = transpose_b ? 'T' : 'N';
  const int m32 = static_cast<int>(m), n32 = static_cast<int>(n), k32 = static_cast<int>(k);
  const int lda32 = static_cast<int>(lda), ldb32 = static_cast<int>(ldb), ldc32 = static_cast<int>(ldc);
  const scalar_t one = 1;
  if constexpr (std::is_same_v<scalar_t, float>)
    sgemm_(&flag_b, &flag_a, &n32, &m32, &k32, &one, b, &ldb32, a, &lda32, &beta, c, &ldc32);
  else
    dgemm_(&flag_b, &flag_a, &n32, &m32, &k32, &one, b, &ldb32, a, &lda32, &beta, c, &ldc32);
}

// Runs fn(task) for task in [0, tasks) on the thread pool, each thread claiming the next unclaimed task.
// A static split (at::parallel_for's) stalls on the slowest thread, which on a shared machine is often
// one that lost its core; claiming tasks keeps both cores busy. Which thread runs a task does not change
// what it computes, so results stay deterministic.
template <typename Fn>
void for_each_task(int64_t tasks, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t task = next.fetch_add(1); task < tasks; task = next.fetch_add(1)) fn(task);
  });
}


// ------------------------------------------------------------------------------------- depthwise sweeps

// out[t] = bias + Σ_j w[j]·x[t − s_j] over t in [begin, end), every t − s_j ≥ 0 there. K = 2, 3 fused.
template <typename scalar_t, int K>
FASTDL_INLINE void depthwise_row_fused(const scalar_t* x, const scalar_t* w, scalar_t bias, int64_t dilation,
                                       int64_t begin, int64_t end, scalar_t* out) {
  const scalar_t w0 = w[0], w1 = w[1], w2 = K == 3 ? w[2] : scalar_t(0);
  const scalar_t* x0 = x - dilation * (K - 1);
  const scalar_t* x1 = x - dilation * (K - 2);
  for (int64_t t = begin; t < end; ++t) {
    scalar_t acc = bias + w0 * x0[t] + w1 * x1[t];
    if constexpr (K == 3) acc += w2 * x[t];
    out[t] = acc;
  }
}

// out[t] = bias + Σ_j w[j]·x[t − s_j] (x before 0 is 0), for one row of length T.
template <typename scalar_t>
FASTDL_INLINE void depthwise_forward_row(const scalar_t* x, const scalar_t* w, scalar_t bias, int64_t taps,
                                         int64_t dilation, int64_t length, scalar_t* out) {
  const int64_t reach = std::min(length, dilation * (taps - 1));
  if (taps == 2 || taps == 3) {
    // Head (t < reach): some taps fall before 0; the generic passes below handle it on [0, reach).
    if (taps == 2) depthwise_row_fused<scalar_t, 2>(x, w, bias, dilation, reach, length, out);
    else depthwise_row_fused<scalar_t, 3>(x, w, bias, dilation, reach, length, out);
  }
  const int64_t generic_end = taps == 2 || taps == 3 ? reach : length;
  for (int64_t t = 0; t < generic_end; ++t) out[t] = bias + w[taps - 1] * x[t];
  for (int64_t j = 0; j + 1 < taps; ++j) {
    const int64_t shift = dilation * (taps - 1 - j);
    const scalar_t wj = w[j];
    for (int64_t t = shift; t < generic_end; ++t) out[t] += wj * x[t - shift];
  }
}

// Σ_{t < count} term(t) in kPartialSums interleaved partial sums, added up at the end by halving (lane l
// plus lane l + width, width = kPartialSums/2 … 1): GCC vectorizes both the sweep (a single running float sum it may
// not reorder, so it would not) and the final tree, which matters when count is short (a streaming step's
// dot products are ~100 long). The order, hence the result, is the same on every run.
constexpr int64_t kPartialSums = 16;

template <typename scalar_t, typename Term>
FASTDL_INLINE scalar_t sum_in_lanes(int64_t count, Term term) {
  scalar_t lanes[kPartialSums] = {};
  int64_t t = 0;
  for (; t + kPartialSums <= count; t += kPartialSums)
    for (int64_t l = 0; l < kPartialSums; ++l) lanes[l] += term(t + l);
  for (int64_t l = 0; t + l < count; ++l) lanes[l] += term(t + l);
  for (int64_t width = kPartialSums / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// dx[t] += Σ_j w[j]·g[t + s_j] (t + s_j < T); dw[j] += Σ_{t ≥ s_j} g[t]·x[t − s_j]; db += Σ_t g[t].
template <typename scalar_t>
FASTDL_INLINE void depthwise_backward_row(const scalar_t* g, const scalar_t* x, const scalar_t* w, int64_t taps,
                                          int64_t dilation, int64_t length, scalar_t* dx, scalar_t* dw,
                                          scalar_t* db) {
  *db += sum_in_lanes<scalar_t>(length, [&](int64_t t) FASTDL_INLINE_LAMBDA { return g[t]; });
  for (int64_t j = 0; j < taps; ++j) {
    const int64_t shift = dilation * (taps - 1 - j);
    if (shift >= length) continue;
    const scalar_t wj = w[j];
    const scalar_t* g_shifted = g + shift;
    for (int64_t t = 0; t < length - shift; ++t) dx[t] += wj * g_shifted[t];
    dw[j] += sum_in_lanes<scalar_t>(length - shift, [&](int64_t t) FASTDL_INLINE_LAMBDA { return g_shifted[t] * x[t]; });
  }
}

// ---------------------------------------------------------------------------- shifted matrix products
//
// The dense forward and ∂x are both, per (image, group), a sum over taps of a small matrix times column-
// shifted rows:
//     out[r, t] = init[r] + Σ_j Σ_c P_j[r, c] · src[c, t + offset_j]        (src outside [0, T) reads 0)
//   forward: src = x, P_j = W_j   (C_out/g × C_in/g), offset_j = −s_j, init = bias
//   ∂x:      src = g, P_j = W_jᵀ  (C_in/g × C_out/g), offset_j = +s_j, init = 0
// One BLAS GEMM per tap would pack the strided src rows again for every call, zero or rescale out
// between taps and leave the bias to another pass over out. This kernel reads src in place instead and
// keeps a tile of kRows outputs × kVectors vectors of consecutive steps in registers over every tap and
// channel, so each output is written once, bias included. The tile's shape is the ISA's broadcast tile
// (isa.h: Isa::kTileRows rows × Isa::kTileVecs vectors).

// P_j of every group, laid out for the tile kernel: per group, per block of block_rows output rows, per
// tap, per input row c, the block's block_rows coefficients side by side (zeros past the last row, so a
// partial block runs the same code). `transposed` selects P_j = W_jᵀ (∂x) over P_j = W_j (forward).
template <typename scalar_t>
std::vector<scalar_t> pack_blocks(const scalar_t* w, const Shape& s, bool transposed, int64_t block_rows) {
  const int64_t cig = s.in_per_group(), cog = s.out_per_group();
  const int64_t rows = transposed ? cig : cog, columns = transposed ? cog : cig;
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  std::vector<scalar_t> packed(s.groups * blocks * s.taps * columns * block_rows, scalar_t(0));
  scalar_t* out = packed.data();
  for (int64_t group = 0; group < s.groups; ++group)
    for (int64_t block = 0; block < blocks; ++block)
      for (int64_t j = 0; j < s.taps; ++j)
        for (int64_t c = 0; c < columns; ++c)
          for (int64_t r = block * block_rows; r < (block + 1) * block_rows; ++r, ++out) {
            if (r >= rows) continue;
            const int64_t o = group * cog + (transposed ? c : r), i = transposed ? r : c;
            *out = w[(o * cig + i) * s.taps + j];
          }
  return packed;
}

// One (image, group) of a shifted product: src (columns, T) and out (rows, T) rows of length T.
template <typename scalar_t>
struct ShiftedProduct {
  const scalar_t* src;
  scalar_t* out;
  const scalar_t* packed;  // this group's pack_blocks
  const scalar_t* init;    // rows values, or nullptr for zeros
  const int64_t* offsets;  // per tap
  int64_t length, rows, columns, taps;
};

// out tile (kRows × kVectors vectors) = init + Σ_j Σ_c coefficients · sources[j][c·stride …]; stores the
// first rows_valid rows.
template <typename Isa, typename scalar_t>
FASTDL_INLINE void product_tile(const scalar_t* const* sources, int64_t stride, int64_t taps, int64_t columns,
                                const scalar_t* coefficients, const scalar_t* init, int64_t rows_valid, scalar_t* out,
                                int64_t out_stride) {
  using vec = Vec<scalar_t, Isa>;
  constexpr int kRows = Isa::kTileRows, kVectors = Isa::kTileVecs;
  constexpr int64_t lanes = kLanes<scalar_t, Isa>;
  vec acc[kRows][kVectors];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    const scalar_t value = init != nullptr && r < rows_valid ? init[r] : scalar_t(0);
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) acc[r][v] = vec{} + value;
  }
  for (int64_t j = 0; j < taps; ++j) {
    const scalar_t* src = sources[j];
    const scalar_t* coefficient = coefficients + j * columns * kRows;
    for (int64_t c = 0; c < columns; ++c, src += stride, coefficient += kRows) {
      vec x[kVectors];
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) x[v] = load_vec<Isa>(src + v * lanes);
#pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
        const scalar_t w = coefficient[r];
#pragma GCC unroll 4
        for (int v = 0; v < kVectors; ++v) acc[r][v] += w * x[v];
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r)
    if (r < rows_valid)
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) store_vec<Isa>(out + r * out_stride + v * lanes, acc[r][v]);
}

// Columns [begin, end) of a shifted product, one tile width at a time, every row block per tile. Each
// tile's src columns are first copied into a contiguous (taps, columns, tile width) block: read in place,
// rows T apart (a multiple of 4 KiB for the usual lengths) all fall in the same L1 sets and evict each
// other before the next row block reads them again; the copy stays in L1 across the blocks. The copy
// also supplies the zeros where src reaches outside [0, T) (the causal head of the forward, the tail of
// ∂x), and a tile cut short by `end` is written through a small buffer.
template <typename Isa, typename scalar_t>
FASTDL_INLINE void shifted_product(const ShiftedProduct<scalar_t>& p, int64_t begin, int64_t end) {
  constexpr int64_t kRows = Isa::kTileRows, kColumns = Isa::kTileVecs * kLanes<scalar_t, Isa>;
  const int64_t blocks = (p.rows + kRows - 1) / kRows, block_size = p.taps * p.columns * kRows;
  std::vector<const scalar_t*> sources(p.taps);
  std::vector<scalar_t> staged_src(p.taps * p.columns * kColumns), staged_out(kRows * kColumns);
  for (int64_t j = 0; j < p.taps; ++j) sources[j] = staged_src.data() + j * p.columns * kColumns;
  for (int64_t t0 = begin; t0 < end; t0 += kColumns) {
    const int64_t width = std::min(kColumns, end - t0);
    for (int64_t j = 0; j < p.taps; ++j) {
      scalar_t* stage = staged_src.data() + j * p.columns * kColumns;
      const int64_t first = t0 + p.offsets[j];
      if (width == kColumns && first >= 0 && first + kColumns <= p.length) {
        // A constant-size memcpy: inlined as a few vector moves (std::copy_n became a libc memmove call).
        for (int64_t c = 0; c < p.columns; ++c)
          std::memcpy(stage + c * kColumns, p.src + c * p.length + first, kColumns * sizeof(scalar_t));
        continue;
      }
      for (int64_t c = 0; c < p.columns; ++c)
        for (int64_t u = 0; u < kColumns; ++u) {
          const int64_t t = first + u;
          stage[c * kColumns + u] = u < width && t >= 0 && t < p.length ? p.src[c * p.length + t] : scalar_t(0);
        }
    }
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t row0 = block * kRows, rows_valid = std::min<int64_t>(kRows, p.rows - row0);
      const scalar_t* init = p.init != nullptr ? p.init + row0 : nullptr;
      const bool whole = width == kColumns;
      product_tile<Isa>(sources.data(), kColumns, p.taps, p.columns, p.packed + block * block_size, init, rows_valid,
                        whole ? p.out + row0 * p.length + t0 : staged_out.data(), whole ? p.length : kColumns);
      if (!whole)
        for (int64_t r = 0; r < rows_valid; ++r)
          std::copy_n(staged_out.data() + r * kColumns, width, p.out + (row0 + r) * p.length + t0);
    }
  }
}

// The rows of `isa`'s tile: what pack_blocks must use for shifted_product under that ISA.
int64_t tile_rows(CpuIsa isa) {
  return with_cpu_isa(isa, [](auto tag) FASTDL_INLINE_LAMBDA { return int64_t{decltype(tag)::kTileRows}; });
}

// ------------------------------------------------------------------------------------------- forward

template <typename scalar_t>
void dense_forward(const Shape& s, const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y) {
  const int64_t cig = s.in_per_group(), cog = s.out_per_group();
  const CpuIsa isa = cpu_isa();  // one ISA for the packing and the products (its tile rows)
  const std::vector<scalar_t> packed = pack_blocks(w, s, /*transposed=*/false, tile_rows(isa));
  const int64_t group_size = static_cast<int64_t>(packed.size()) / s.groups;
  std::vector<int64_t> offsets(s.taps);
  for (int64_t j = 0; j < s.taps; ++j) offsets[j] = -s.shift(j);
  const int64_t chunks = (s.length + kTimeChunk - 1) / kTimeChunk;
  for_each_task(s.batch * s.groups * chunks, [&](int64_t task) {
    const int64_t chunk = task % chunks, group = (task / chunks) % s.groups, n = task / (chunks * s.groups);
    const ShiftedProduct<scalar_t> product{x + (n * s.in_channels + group * cig) * s.length,
                                           y + (n * s.out_channels + group * cog) * s.length,
                                           packed.data() + group * group_size,
                                           bias != nullptr ? bias + group * cog : nullptr,
                                           offsets.data(), s.length, cog, cig, s.taps};
    with_cpu_isa(isa, [&](auto tag) FASTDL_INLINE_LAMBDA {
      shifted_product<decltype(tag)>(product, chunk * kTimeChunk, std::min(s.length, (chunk + 1) * kTimeChunk));
    });
  });
}

template <typename scalar_t>
void depthwise_forward(const Shape& s, const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y) {
  const int64_t multiplier = s.out_per_group();
  const int64_t rows = s.batch * s.out_channels;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, s.length));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / s.out_channels, o = row % s.out_channels;
        depthwise_forward_row(x + (n * s.in_channels + o / multiplier) * s.length, w + o * s.taps,
                              bias != nullptr ? bias[o] : scalar_t(0), s.taps, s.dilation, s.length,
                              y + row * s.length);
      }
    });
  });
}

at::Tensor causal_conv_forward(const at::Tensor& input_, const at::Tensor& weight_,
                               const std::optional<at::Tensor>& bias_, int64_t dilation, int64_t groups) {
  check_args(input_, weight_, bias_, dilation, groups, "fastdl::causal_conv_forward");
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const std::optional<at::Tensor> bias = bias_.has_value() ? std::optional(bias_->contiguous()) : std::nullopt;
  const Shape s = shape_of(input, weight, dilation, groups);
  at::Tensor output = at::empty({s.batch, s.out_channels, s.length}, input.options());
  if (output.numel() == 0) return output;
  if (s.in_per_group() == 0) return bias.has_value() ? output.copy_(bias->view({1, -1, 1}).expand_as(output)) : output.zero_();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastdl::causal_conv_forward", [&] {
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    if (s.in_per_group() == 1) {
      depthwise_forward(s, input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
                        output.mutable_data_ptr<scalar_t>());
    } else {
      dense_forward(s, input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
                    output.mutable_data_ptr<scalar_t>());
    }
  });
  return output;
}

// ------------------------------------------------------------------------------------------ backward

// Sums partials[task][0 … size) over tasks in task order into out: deterministic by construction.
template <typename scalar_t>
void sum_partials(const scalar_t* partials, int64_t tasks, int64_t size, scalar_t* out) {
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) out[e] = 0;
    for (int64_t task = 0; task < tasks; ++task)
      for (int64_t e = begin; e < end; ++e) out[e] += partials[task * size + e];
  });
}

// ∂x, ∂w (as (k, C_out, C_in/g)) and ∂b in one pass. A task is one (image, group, kWeightChunk steps);
// it walks its steps kTimeChunk at a time, and for each piece computes ∂x there and adds the piece's
// ∂w, ∂b terms into the task's private partial while the g and x columns are still in cache. The
// partials are then summed in task order.
template <typename scalar_t>
void dense_backward(const Shape& s, const scalar_t* g, const scalar_t* x, const scalar_t* w, scalar_t* dx,
                    scalar_t* dw_taps, scalar_t* db) {
  const int64_t cig = s.in_per_group(), cog = s.out_per_group();
  const CpuIsa isa = cpu_isa();  // one ISA for the packing and the products (its tile rows)
  const std::vector<scalar_t> packed = pack_blocks(w, s, /*transposed=*/true, tile_rows(isa));
  const int64_t group_size = static_cast<int64_t>(packed.size()) / s.groups;
  std::vector<int64_t> offsets(s.taps);
  for (int64_t j = 0; j < s.taps; ++j) offsets[j] = s.shift(j);
  const int64_t chunks = (s.length + kWeightChunk - 1) / kWeightChunk;
  const int64_t per_group_tasks = s.batch * chunks;
  const int64_t weight_size = s.taps * cog * cig, partial_size = weight_size + cog;
  std::vector<scalar_t> partials(s.groups * per_group_tasks * partial_size, scalar_t(0));
  for_each_task(s.groups * per_group_tasks, [&](int64_t task) {
    const int64_t group = task / per_group_tasks, n = (task % per_group_tasks) / chunks, chunk = task % chunks;
    const int64_t begin = chunk * kWeightChunk, end = std::min(s.length, begin + kWeightChunk);
    const scalar_t* gg = g + (n * s.out_channels + group * cog) * s.length;
    const scalar_t* xg = x + (n * s.in_channels + group * cig) * s.length;
    scalar_t* dxg = dx + (n * s.in_channels + group * cig) * s.length;
    scalar_t* partial = partials.data() + task * partial_size;
    const ShiftedProduct<scalar_t> dx_product{gg, dxg, packed.data() + group * group_size, nullptr, offsets.data(),
                                              s.length, cig, cog, s.taps};
    for (int64_t t0 = begin; t0 < end; t0 += kTimeChunk) {
      const int64_t t1 = std::min(end, t0 + kTimeChunk);
      // dX[:, t] = Σ_j W_jᵀ · G[:, t + s_j] (G past T is 0).
      with_cpu_isa(isa, [&](auto tag) FASTDL_INLINE_LAMBDA { shifted_product<decltype(tag)>(dx_product, t0, t1); });
      // dW_j += G[:, t] · X[:, t − s_j]ᵀ over t in [max(t0, s_j), t1).
      for (int64_t j = 0; j < s.taps; ++j) {
        const int64_t shift = s.shift(j), first = std::max(t0, shift);
        if (first >= t1) continue;
        gemm<scalar_t>(false, true, cog, cig, t1 - first, gg + first, s.length, xg + first - shift, s.length,
                       scalar_t(1), partial + j * cog * cig, cig);
      }
      for (int64_t o = 0; o < cog; ++o) {
        const scalar_t* row = gg + o * s.length + t0;
        partial[weight_size + o] += sum_in_lanes<scalar_t>(t1 - t0, [&](int64_t t) { return row[t]; });
      }
    }
  });
  std::vector<scalar_t> group_sum(partial_size);
  for (int64_t group = 0; group < s.groups; ++group) {
    sum_partials(partials.data() + group * per_group_tasks * partial_size, per_group_tasks, partial_size,
                 group_sum.data());
    for (int64_t j = 0; j < s.taps; ++j)
      std::copy_n(group_sum.data() + j * cog * cig, cog * cig, dw_taps + (j * s.out_channels + group * cog) * cig);
    std::copy_n(group_sum.data() + weight_size, cog, db + group * cog);
  }
}

// One task per input channel: it owns dx of that channel in every image and ∂w, ∂b of the output
// channels reading it, so nothing is shared between tasks and every sum runs in a fixed order.
template <typename scalar_t>
void depthwise_backward(const Shape& s, const scalar_t* g, const scalar_t* x, const scalar_t* w, scalar_t* dx,
                        scalar_t* dw, scalar_t* db) {
  const int64_t multiplier = s.out_per_group();
  at::parallel_for(0, s.in_channels, 1, [&](int64_t begin, int64_t end) {
    with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t o = c * multiplier; o < (c + 1) * multiplier; ++o) {
          std::fill(dw + o * s.taps, dw + (o + 1) * s.taps, scalar_t(0));
          db[o] = 0;
        }
        for (int64_t n = 0; n < s.batch; ++n) {
          scalar_t* dx_row = dx + (n * s.in_channels + c) * s.length;
          std::fill(dx_row, dx_row + s.length, scalar_t(0));
          for (int64_t o = c * multiplier; o < (c + 1) * multiplier; ++o)
            depthwise_backward_row(g + (n * s.out_channels + o) * s.length, x + (n * s.in_channels + c) * s.length,
                                   w + o * s.taps, s.taps, s.dilation, s.length, dx_row, dw + o * s.taps, db + o);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv_backward(const at::Tensor& grad_output_,
                                                                    const at::Tensor& input_,
                                                                    const at::Tensor& weight_, int64_t dilation,
                                                                    int64_t groups) {
  check_args(input_, weight_, std::nullopt, dilation, groups, "fastdl::causal_conv_backward");
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous(), grad = grad_output_.contiguous();
  const Shape s = shape_of(input, weight, dilation, groups);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({s.batch, s.out_channels, s.length}),
              "fastdl::causal_conv_backward: grad_output has shape ", grad.sizes(), ", expected (", s.batch, ", ",
              s.out_channels, ", ", s.length, ")");
  at::Tensor grad_input = at::empty_like(input);
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_bias = at::zeros({s.out_channels}, weight.options());
  if (grad.numel() == 0 || input.numel() == 0) return {grad_input.zero_(), grad_weight, grad_bias};
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastdl::causal_conv_backward", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    if (s.in_per_group() == 1) {
      depthwise_backward(s, g, x, weight.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                         grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
      return;
    }
    at::Tensor dw_taps = at::empty({s.taps, s.out_channels, s.in_per_group()}, weight.options());
    dense_backward(s, g, x, weight.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
                   dw_taps.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>());
    grad_weight.copy_(dw_taps.permute({1, 2, 0}));
  });
  return {grad_input, grad_weight, grad_bias};
}

// --------------------------------------------------------------------------------------- streaming step

// y[n, o] = b[o] + Σ_i Σ_j w[o, i, j] · window[n, group(o)·C_in/g + i, j], where window[n, c, j] is channel c
// of x at step t − s_j: x_t itself for s_j = 0, else ring slot (t − s_j) mod (R + 1). Laid out (C_in, k),
// as the weight's (C_in/g, k) rows are, each output is one contiguous dot product of length (C_in/g)·k
// with its weight row: the weight is read in its own layout, nothing is permuted or copied per step.
template <typename scalar_t>
FASTDL_INLINE void step_outputs(const scalar_t* window, const scalar_t* w, const scalar_t* bias, int64_t in_channels,
                                int64_t out_channels, int64_t taps, int64_t row_length, int64_t out_per_group,
                                int64_t begin, int64_t end, scalar_t* y) {
  // (image n, output o, o's group, o's index in it) of row = n·C_out + o, advanced without divisions.
  int64_t n = begin / out_channels, o = begin % out_channels, group = o / out_per_group, in_group = o % out_per_group;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* w_row = w + o * row_length;
    const scalar_t* z = window + n * in_channels * taps + group * row_length;
    const scalar_t dot = sum_in_lanes<scalar_t>(row_length, [&](int64_t e) FASTDL_INLINE_LAMBDA { return w_row[e] * z[e]; });
    y[row] = (bias != nullptr ? bias[o] : scalar_t(0)) + dot;
    if (++in_group == out_per_group) in_group = 0, ++group;
    if (++o == out_channels) o = 0, group = 0, ++n;
  }
}

// Every check of the streaming step is here, in C++, where it costs nanoseconds: the eager fast path of
// CausalConv1d.step calls the kernel with no Python-side validation (see fastdl/ops/causal_conv.py).
void check_step_args(const at::Tensor& input, const at::Tensor& buffer, int64_t position, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t dilation, int64_t groups) {
  const char* op = "causal_conv1d_step";
  TORCH_CHECK(input.dim() == 2, op, ": input must be (batch, in_channels), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 3, op, ": weight must be (out_channels, in_channels/groups, kernel_size), got ",
              weight.sizes());
  TORCH_CHECK(dilation >= 1 && groups >= 1, op, ": dilation and groups must be >= 1, got ", dilation, " and ",
              groups);
  TORCH_CHECK(weight.size(0) % groups == 0 && weight.size(1) * groups == input.size(1), op, ": input has ",
              input.size(1), " channels but weight ", weight.sizes(), " with groups=", groups, " expects ",
              weight.size(1) * groups);
  TORCH_CHECK(weight.size(2) >= 1, op, ": kernel_size must be >= 1");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.device() == input.device(), op, ": weight is ",
              weight.scalar_type(), " on ", weight.device(), ", input is ", input.scalar_type(), " on ",
              input.device());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == input.scalar_type() &&
                    bias->device() == input.device(),
                op, ": bias must be a (", weight.size(0), ",) tensor of the input's dtype and device, got ",
                bias->sizes(), " ", bias->scalar_type(), " on ", bias->device());
  const int64_t slots = dilation * (weight.size(2) - 1) + 1;
  TORCH_CHECK(buffer.dim() == 3 && buffer.size(0) == input.size(0) && buffer.size(1) == slots &&
                  buffer.size(2) == input.size(1) && buffer.is_contiguous() &&
                  buffer.scalar_type() == input.scalar_type() && buffer.device() == input.device(),
              op, ": state buffer must be a contiguous (", input.size(0), ", ", slots, ", ", input.size(1),
              ") tensor (batch, dilation·(kernel_size−1)+1, in_channels) of the input's dtype and device, got ",
              buffer.sizes(), " ", buffer.scalar_type(), " on ", buffer.device(), ": make it with init_state");
  TORCH_CHECK(position >= 0, op, ": position must be >= 0, got ", position);
}

at::Tensor causal_conv_step(const at::Tensor& input_, at::Tensor& buffer, int64_t position, const at::Tensor& weight_,
                            const std::optional<at::Tensor>& bias_, int64_t dilation, int64_t groups) {
  check_step_args(input_, buffer, position, weight_, bias_, dilation, groups);
  const at::Tensor input = input_.contiguous(), weight = weight_.contiguous();
  const std::optional<at::Tensor> bias = bias_.has_value() ? std::optional(bias_->contiguous()) : std::nullopt;
  const int64_t batch = input.size(0), in_channels = input.size(1), out_channels = weight.size(0);
  const int64_t taps = weight.size(2), slots = buffer.size(1);
  const int64_t row_length = weight.size(1) * taps;
  at::Tensor output = at::empty({batch, out_channels}, input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "causal_conv1d_step", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* ring = buffer.mutable_data_ptr<scalar_t>();
    // Gather the window, (N, C_in, k); small: one sample of each layer input per tap.
    std::vector<scalar_t> window(batch * in_channels * taps);
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t j = 0; j < taps; ++j) {
        const int64_t shift = dilation * (taps - 1 - j);
        const scalar_t* h = shift == 0 ? x + n * in_channels
                                       : ring + (n * slots + (position % slots - shift + slots) % slots) * in_channels;
        scalar_t* z = window.data() + n * in_channels * taps + j;
        for (int64_t c = 0; c < in_channels; ++c) z[c * taps] = h[c];
      }
    for (int64_t n = 0; n < batch; ++n)
      std::copy_n(x + n * in_channels, in_channels, ring + (n * slots + position % slots) * in_channels);
    // One generation step of a WaveNet layer is a few thousand multiply-adds: below ~16k per thread the
    // fork costs more than it saves, so small batches run on the calling thread.
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, row_length));
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch * out_channels, grain, [&](int64_t begin, int64_t end) {
      with_cpu_isa([&](auto) FASTDL_INLINE_LAMBDA {
        step_outputs(window.data(), weight.const_data_ptr<scalar_t>(), b, in_channels, out_channels, taps, row_length,
                     out_channels / groups, begin, end, output.mutable_data_ptr<scalar_t>());
      });
    });
  });
  return output;
}

// fastdl._C.causal_conv_step: the same kernel called from Python without the dispatcher, for the eager
// fast path of CausalConv1d.step (see python_functions.h and fastdl/ops/causal_conv.py). The output is a
// new tensor outside autograd: the step is not differentiable (it is meant for generation).
at::Tensor causal_conv_step_from_python(const at::Tensor& input, at::Tensor& buffer, int64_t position,
                                        const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                        int64_t dilation, int64_t groups) {
  TORCH_CHECK(input.is_cpu(), "causal_conv1d_step: fastdl._C.causal_conv_step takes CPU tensors, got input on ",
              input.device());
  return causal_conv_step(input, buffer, position, weight, bias, dilation, groups);
}

const PythonFunctions registered([](PyObject* module) {
  return define_pybind11(module, [](pybind11::module_ m) {
    m.def("causal_conv_step", &causal_conv_step_from_python, pybind11::arg("input"), pybind11::arg("buffer"),
          pybind11::arg("position"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("dilation"),
          pybind11::arg("groups"),
          "One streaming step of a causal conv layer on CPU tensors, as torch.ops.fastdl.causal_conv_step: "
          "returns y_t (N, C_out) and writes input into ring slot position mod (R + 1) of buffer.");
  });
});

}  // namespace
}  // namespace cpu
}  // namespace fastdl

TORCH_LIBRARY_FRAGMENT(fastdl, m) {
  m.def("causal_conv_forward(Tensor input, Tensor weight, Tensor? bias, int dilation, int groups) -> Tensor");
  m.def("causal_conv_backward(Tensor grad_output, Tensor input, Tensor weight, int dilation, int groups) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("causal_conv_step(Tensor input, Tensor(a!) buffer, int position, Tensor weight, Tensor? bias, int dilation, "
        "int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("causal_conv_forward", &fastdl::cpu::causal_conv_forward);
  m.impl("causal_conv_backward", &fastdl::cpu::causal_conv_backward);
  m.impl("causal_conv_step", &fastdl::cpu::causal_conv_step);
}
