// Scaled dot-product attention, CUDA flash kernels (math in fastdl/ops/attention.py; same algorithm as
// csrc/cpu/attention.cpp and triton_kernels/attention.py). Free of torch headers: the launchers at the
// bottom take raw pointers, shapes and strides.
//
// Forward: a CTA (4 warps) owns BM queries of one (batch, query head) and walks the key tiles: Q, K, V
// tiles are staged in shared memory, S = Q·Kᵀ and O += P·V run on tensor cores (WMMA 16×16×16, fp16/bf16
// in, fp32 accumulate), the online softmax in base 2 (log2 e folded into the scale) runs a warp per
// query row between them. Causal CTAs stop at their last visible key. O accumulates in fp32 in shared
// memory (a row rescale needs element-wise access the opaque WMMA fragments do not give), and the
// log-sum-exp of every row is written for backward. O is written in the output's dtype: fp32 for fp16/bf16
// inputs (the Python op rounds it for the caller and keeps it unrounded for backward's δ).
//
// Backward (FlashAttention-2's split, no atomics, so deterministic): δ_i = dO_i·O_i is computed by the
// glue, from the unrounded O; one kernel per (key tile, batch × key/value head) accumulates dK and dV over the query heads of
// its group and the query tiles that see its keys; a second one per (query tile, batch × query head)
// accumulates dQ (and writes dS as the mask's gradient when asked). Both recompute P from the saved lse.
//
// fp32 inputs use the same tiles with fp32 FMA products (SIMT) instead of tensor cores: WMMA's fp32 path
// is TF32, which would miss fp32 tolerances. Head dims are padded to 32/64/128/256 in shared memory.
//
// Dropout uses the counter hash of _dropout_bits in fastdl/ops/attention.py, so every backend drops the
// same elements for a seed and backward regenerates the forward's mask.
#include <mma.h>

#include <cmath>
#include <type_traits>

#include "common.h"

namespace fastdl {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  const void *q, *k, *v, *mask, *grad_out;
  void *out, *dq, *dk, *dv, *dmask;
  bool out_float;  // O is written as fp32 (whatever T is)
  float *lse;
  const float *delta;
  int64_t batch, heads_q, heads_kv, nq, nk, d, dv_dim;
  int64_t sq[3], sk[3], sv[3], sm[4], so[3], sg[3];  // (batch, head, row) strides; mask also column
  float scale;
  bool causal;
  bool dropout;
  int64_t threshold;
  float keep_scale;
  uint32_t seed_lo, seed_hi;
};

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

__device__ __forceinline__ float keep_multiplier(const Params& p, int64_t row, int64_t col) {
  const uint32_t key = mix32(mix32(static_cast<uint32_t>(row) ^ p.seed_lo) ^ static_cast<uint32_t>(row >> 32) ^ p.seed_hi);
  const int64_t bits = mix32(key ^ static_cast<uint32_t>(col));
  return bits >= p.threshold ? p.keep_scale : 0.0f;
}

// C[m×n] (fp32, row-major, shared) = A·B (+ C when accumulating), all operands in shared memory, m, n, k
// multiples of 16. A(i, p) = a[i·lda + p] when kARowMajor, else a[p·lda + i]; B(p, j) = b[p·ldb + j] when
// kBRowMajor, else b[j·ldb + p] — so Aᵀ and Bᵀ are free. Tensor cores for fp16/bf16, FMA for fp32.
template <typename T, bool kARowMajor, bool kBRowMajor>
__device__ void tile_product(float* c, int ldc, const T* a, int lda, const T* b, int ldb, int m, int n, int k,
                             bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    for (int idx = threadIdx.x; idx < m * n; idx += blockDim.x) {
      const int i = idx / n, j = idx % n;
      float sum = 0.0f;
      for (int p = 0; p < k; ++p)
        sum += (kARowMajor ? a[i * lda + p] : a[p * lda + i]) * (kBRowMajor ? b[p * ldb + j] : b[j * ldb + p]);
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum;
    }
  } else {
    using namespace nvcuda;
    using LayoutA = std::conditional_t<kARowMajor, wmma::row_major, wmma::col_major>;
    using LayoutB = std::conditional_t<kBRowMajor, wmma::row_major, wmma::col_major>;
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int tiles_n = n / 16;
    for (int tile = warp; tile < (m / 16) * tiles_n; tile += warps) {
      const int i0 = (tile / tiles_n) * 16, j0 = (tile % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (accumulate) wmma::load_matrix_sync(acc, c + i0 * ldc + j0, ldc, wmma::mem_row_major);
      else wmma::fill_fragment(acc, 0.0f);
      for (int p = 0; p < k; p += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
        wmma::load_matrix_sync(fa, kARowMajor ? a + i0 * lda + p : a + p * lda + i0, lda);
        wmma::load_matrix_sync(fb, kBRowMajor ? b + p * ldb + j0 : b + j0 * ldb + p, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(c + i0 * ldc + j0, acc, ldc, wmma::mem_row_major);
    }
  }
}

// Stages rows [row0, row0 + rows_tile) × the first `width` columns of a (row stride `stride`) tensor
// into a (rows_tile × kPad) shared tile, zero outside the tensor.
template <typename T, int kPad>
__device__ void stage(T* tile, int rows_tile, const T* base, int64_t stride, int64_t row0, int64_t rows, int64_t width) {
  for (int idx = threadIdx.x; idx < rows_tile * kPad; idx += blockDim.x) {
    const int r = idx / kPad, c = idx % kPad;
    const bool inside = row0 + r < rows && c < width;
    tile[idx] = inside ? base[(row0 + r) * stride + c] : from_float<T>(0.0f);
  }
}

__device__ __forceinline__ size_t align_up(size_t bytes) { return (bytes + 127) / 128 * 128; }

// Shared-memory carving: successive 128-byte-aligned arrays (WMMA wants 32-byte-aligned tiles).
struct Carver {
  unsigned char* base;
  size_t offset = 0;
  template <typename U>
  __device__ U* take(size_t count) {
    U* ptr = reinterpret_cast<U*>(base + offset);
    offset += align_up(count * sizeof(U));
    return ptr;
  }
};

// The scaled, masked score of tile element (r, c) = query i, key j, in base 2: −∞ where causality, the
// bounds or the mask hide it. The mask has the inputs' dtype.
template <typename T>
__device__ __forceinline__ float score(const Params& p, const float* s, int ld, int r, int c, int64_t i, int64_t j,
                                       int64_t b, int64_t h) {
  if (i >= p.nq || j >= p.nk || (p.causal && j > i)) return -INFINITY;
  float value = s[r * ld + c] * p.scale * kLog2e;
  if (p.mask != nullptr)
    value += to_float(static_cast<const T*>(p.mask)[b * p.sm[0] + h * p.sm[1] + i * p.sm[2] + j * p.sm[3]]) * kLog2e;
  return value;
}

template <typename T, int kPad, int kBM, int kBN>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Carver carve{smem};
  T* q = carve.take<T>(kBM * kPad);
  T* k = carve.take<T>(kBN * kPad);
  T* v = carve.take<T>(kBN * kPad);
  float* s = carve.take<float>(kBM * kBN);
  T* prob = carve.take<T>(kBM * kBN);
  float* o = carve.take<float>(kBM * kPad);
  float* row_max = carve.take<float>(kBM);
  float* row_sum = carve.take<float>(kBM);
  float* rescale = carve.take<float>(kBM);

  const int64_t tiles = (p.nq + kBM - 1) / kBM;  // one flat grid axis: no 65535 limit on batch × heads
  const int64_t i0 = (blockIdx.x % tiles) * kBM, bh = blockIdx.x / tiles;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  const T* qg = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* kg = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
  stage<T, kPad>(q, kBM, qg, p.sq[2], i0, p.nq, p.d);
  for (int idx = threadIdx.x; idx < kBM * kPad; idx += blockDim.x) o[idx] = 0.0f;
  for (int r = threadIdx.x; r < kBM; r += blockDim.x) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
  }
  const int64_t row0 = (b * p.heads_q + h) * p.nq + i0;
  const int64_t keys = p.causal ? min(p.nk, i0 + kBM) : p.nk;  // later tiles are all masked
  for (int64_t j0 = 0; j0 < keys; j0 += kBN) {
    __syncthreads();
    stage<T, kPad>(k, kBN, kg, p.sk[2], j0, p.nk, p.d);
    stage<T, kPad>(v, kBN, vg, p.sv[2], j0, p.nk, p.dv_dim);
    __syncthreads();
    tile_product<T, true, false>(s, kBN, q, kPad, k, kPad, kBM, kBN, kPad, false);  // S = Q·Kᵀ
    __syncthreads();
    // A warp per query row, its lanes across the row's keys; row statistics by warp shuffles. Every lane
    // reads row_max[r] before the shuffles that precede lane 0's update of it.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp; r < kBM; r += kThreads / 32) {
      float tile_max = -INFINITY;
      for (int c = lane; c < kBN; c += 32) tile_max = fmaxf(tile_max, score<T>(p, s, kBN, r, c, i0 + r, j0 + c, b, h));
      for (int offset = 16; offset > 0; offset /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      const float old_max = row_max[r];
      const float new_max = fmaxf(old_max, tile_max);
      const float shift = new_max == -INFINITY ? 0.0f : new_max;  // a row masked so far keeps weight 0
      float sum = 0.0f;
      for (int c = lane; c < kBN; c += 32) {
        const float value = exp2f(score<T>(p, s, kBN, r, c, i0 + r, j0 + c, b, h) - shift);
        sum += value;
        const float dropped = p.dropout ? value * keep_multiplier(p, row0 + r, j0 + c) : value;
        prob[r * kBN + c] = from_float<T>(dropped);
      }
      for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      if (lane == 0) {
        rescale[r] = exp2f(old_max - shift);
        row_sum[r] = row_sum[r] * rescale[r] + sum;
        row_max[r] = new_max;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBM * kPad; idx += blockDim.x) o[idx] *= rescale[idx / kPad];
    __syncthreads();
    tile_product<T, true, true>(o, kPad, prob, kBN, v, kPad, kBM, kPad, kBN, true);  // O += P·V
  }
  __syncthreads();
  const int64_t out_base = b * p.so[0] + h * p.so[1];
  for (int idx = threadIdx.x; idx < kBM * kPad; idx += blockDim.x) {
    const int r = idx / kPad, c = idx % kPad;
    if (i0 + r >= p.nq || c >= p.dv_dim) continue;
    // A fully masked row (sum 0) gives 0, as torch does.
    const float inverse = row_sum[r] > 0.0f ? 1.0f / row_sum[r] : 0.0f;
    const int64_t at = out_base + (i0 + r) * p.so[2] + c;
    if (p.out_float) static_cast<float*>(p.out)[at] = o[idx] * inverse;
    else static_cast<T*>(p.out)[at] = from_float<T>(o[idx] * inverse);
  }
  for (int r = threadIdx.x; r < kBM; r += blockDim.x)
    if (i0 + r < p.nq)
      p.lse[row0 + r] = row_sum[r] > 0.0f ? (row_max[r] + log2f(row_sum[r])) * kLn2 : INFINITY;
}

// Recomputes P (into `prob`, after dropout: what dV needs) and dS (into `ds`, and as fp32 into `s`) for a
// tile whose scores are in `s` and dO·Vᵀ in `dp`.
template <typename T, int kBM, int kBN>
__device__ void backward_elementwise(const Params& p, float* s, const float* dp, T* prob, T* ds, const float* lse2,
                                     const float* delta, int64_t i0, int64_t j0, int64_t b, int64_t h) {
  const int64_t row0 = (b * p.heads_q + h) * p.nq + i0;
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += blockDim.x) {
    const int r = idx / kBN, c = idx % kBN;
    const float value = exp2f(score<T>(p, s, kBN, r, c, i0 + r, j0 + c, b, h) - lse2[r]);  // lse = +∞ gives 0
    const float z = p.dropout ? keep_multiplier(p, row0 + r, j0 + c) : 1.0f;
    const float grad = value * (z * dp[idx] - delta[r]);
    prob[idx] = from_float<T>(value * z);
    ds[idx] = from_float<T>(grad);
    s[idx] = grad;
  }
}

template <typename T, int kPad, int kBM, int kBN>
__device__ void stage_query_rows(const Params& p, T* q, T* go, float* lse2, float* delta, int64_t b, int64_t h,
                                 int64_t i0) {
  stage<T, kPad>(q, kBM, static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1], p.sq[2], i0, p.nq, p.d);
  stage<T, kPad>(go, kBM, static_cast<const T*>(p.grad_out) + b * p.sg[0] + h * p.sg[1], p.sg[2], i0, p.nq, p.dv_dim);
  const int64_t row0 = (b * p.heads_q + h) * p.nq + i0;
  for (int r = threadIdx.x; r < kBM; r += blockDim.x) {
    const bool inside = i0 + r < p.nq;
    lse2[r] = inside ? p.lse[row0 + r] * kLog2e : INFINITY;
    delta[r] = inside ? p.delta[row0 + r] : 0.0f;
  }
}

template <typename T, int kPad, int kBM, int kBN>
__global__ void __launch_bounds__(kThreads) backward_dkdv_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Carver carve{smem};
  T* k = carve.take<T>(kBN * kPad);
  T* v = carve.take<T>(kBN * kPad);
  T* q = carve.take<T>(kBM * kPad);
  T* go = carve.take<T>(kBM * kPad);
  float* s = carve.take<float>(kBM * kBN);
  float* dp = carve.take<float>(kBM * kBN);
  T* prob = carve.take<T>(kBM * kBN);
  T* ds = carve.take<T>(kBM * kBN);
  float* dk = carve.take<float>(kBN * kPad);
  float* dv = carve.take<float>(kBN * kPad);
  float* lse2 = carve.take<float>(kBM);
  float* delta = carve.take<float>(kBM);

  const int64_t tiles = (p.nk + kBN - 1) / kBN;
  const int64_t j0 = (blockIdx.x % tiles) * kBN, bh = blockIdx.x / tiles;
  const int64_t b = bh / p.heads_kv, hk = bh % p.heads_kv;
  const int64_t group = p.heads_q / p.heads_kv;
  stage<T, kPad>(k, kBN, static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1], p.sk[2], j0, p.nk, p.d);
  stage<T, kPad>(v, kBN, static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1], p.sv[2], j0, p.nk, p.dv_dim);
  for (int idx = threadIdx.x; idx < kBN * kPad; idx += blockDim.x) dk[idx] = dv[idx] = 0.0f;
  const int64_t first = p.causal ? (j0 / kBM) * kBM : 0;  // queries before j0 see none of these keys
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t i0 = first; i0 < p.nq; i0 += kBM) {
      __syncthreads();
      stage_query_rows<T, kPad, kBM, kBN>(p, q, go, lse2, delta, b, h, i0);
      __syncthreads();
      tile_product<T, true, false>(s, kBN, q, kPad, k, kPad, kBM, kBN, kPad, false);    // S = Q·Kᵀ
      tile_product<T, true, false>(dp, kBN, go, kPad, v, kPad, kBM, kBN, kPad, false);  // dP = dO·Vᵀ
      __syncthreads();
      backward_elementwise<T, kBM, kBN>(p, s, dp, prob, ds, lse2, delta, i0, j0, b, h);
      __syncthreads();
      tile_product<T, false, true>(dv, kPad, prob, kBN, go, kPad, kBN, kPad, kBM, true);  // dV += (P∘Z)ᵀ·dO
      tile_product<T, false, true>(dk, kPad, ds, kBN, q, kPad, kBN, kPad, kBM, true);     // dK += dSᵀ·Q
    }
  }
  __syncthreads();
  const int64_t kv_row0 = (b * p.heads_kv + hk) * p.nk + j0;
  for (int idx = threadIdx.x; idx < kBN * kPad; idx += blockDim.x) {
    const int r = idx / kPad, c = idx % kPad;
    if (j0 + r >= p.nk) continue;
    if (c < p.d) static_cast<T*>(p.dk)[(kv_row0 + r) * p.d + c] = from_float<T>(dk[idx] * p.scale);
    if (c < p.dv_dim) static_cast<T*>(p.dv)[(kv_row0 + r) * p.dv_dim + c] = from_float<T>(dv[idx]);
  }
}

template <typename T, int kPad, int kBM, int kBN>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  Carver carve{smem};
  T* q = carve.take<T>(kBM * kPad);
  T* go = carve.take<T>(kBM * kPad);
  T* k = carve.take<T>(kBN * kPad);
  T* v = carve.take<T>(kBN * kPad);
  float* s = carve.take<float>(kBM * kBN);
  float* dp = carve.take<float>(kBM * kBN);
  T* prob = carve.take<T>(kBM * kBN);
  T* ds = carve.take<T>(kBM * kBN);
  float* dq = carve.take<float>(kBM * kPad);
  float* lse2 = carve.take<float>(kBM);
  float* delta = carve.take<float>(kBM);

  const int64_t tiles = (p.nq + kBM - 1) / kBM;  // one flat grid axis: no 65535 limit on batch × heads
  const int64_t i0 = (blockIdx.x % tiles) * kBM, bh = blockIdx.x / tiles;
  const int64_t b = bh / p.heads_q, h = bh % p.heads_q;
  const int64_t hk = h / (p.heads_q / p.heads_kv);
  stage_query_rows<T, kPad, kBM, kBN>(p, q, go, lse2, delta, b, h, i0);
  for (int idx = threadIdx.x; idx < kBM * kPad; idx += blockDim.x) dq[idx] = 0.0f;
  const int64_t row0 = (b * p.heads_q + h) * p.nq + i0;
  const int64_t keys = p.causal ? min(p.nk, i0 + kBM) : p.nk;
  for (int64_t j0 = 0; j0 < keys; j0 += kBN) {
    __syncthreads();
    stage<T, kPad>(k, kBN, static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1], p.sk[2], j0, p.nk, p.d);
    stage<T, kPad>(v, kBN, static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1], p.sv[2], j0, p.nk, p.dv_dim);
    __syncthreads();
    tile_product<T, true, false>(s, kBN, q, kPad, k, kPad, kBM, kBN, kPad, false);
    tile_product<T, true, false>(dp, kBN, go, kPad, v, kPad, kBM, kBN, kPad, false);
    __syncthreads();
    backward_elementwise<T, kBM, kBN>(p, s, dp, prob, ds, lse2, delta, i0, j0, b, h);
    __syncthreads();
    tile_product<T, true, true>(dq, kPad, ds, kBN, k, kPad, kBM, kPad, kBN, true);  // dQ += dS·K
    if (p.dmask != nullptr)
      for (int idx = threadIdx.x; idx < kBM * kBN; idx += blockDim.x) {
        const int r = idx / kBN, c = idx % kBN;
        if (i0 + r < p.nq && j0 + c < p.nk) static_cast<T*>(p.dmask)[(row0 + r) * p.nk + j0 + c] = from_float<T>(s[idx]);
      }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBM * kPad; idx += blockDim.x) {
    const int r = idx / kPad, c = idx % kPad;
    if (i0 + r < p.nq && c < p.d) static_cast<T*>(p.dq)[(row0 + r) * p.d + c] = from_float<T>(dq[idx] * p.scale);
  }
}

template <typename T>
constexpr size_t forward_smem(int pad, int bm, int bn) {
  auto a = [](size_t bytes) { return (bytes + 127) / 128 * 128; };
  return a(bm * pad * sizeof(T)) + 2 * a(bn * pad * sizeof(T)) + a(bm * bn * 4) + a(bm * bn * sizeof(T)) +
         a(bm * pad * 4) + 3 * a(bm * 4);
}

template <typename T>
constexpr size_t backward_smem(int pad, int bm, int bn) {
  auto a = [](size_t bytes) { return (bytes + 127) / 128 * 128; };
  return 2 * a(bn * pad * sizeof(T)) + 2 * a(bm * pad * sizeof(T)) + 2 * a(bm * bn * 4) +
         2 * a(bm * bn * sizeof(T)) + 2 * a((bm > bn ? bm : bn) * pad * 4) + 2 * a(bm * 4);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const Params& p) {
  if (grid.x == 0) return cudaSuccess;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Tile shapes per padded head dim: big head dims take smaller tiles so everything fits in shared memory.
template <typename T, int kPad>
cudaError_t run_forward(const Params& p, cudaStream_t stream) {
  constexpr int bm = kPad >= 256 ? 32 : 64, bn = kPad >= 128 ? 32 : 64;
  const dim3 grid(static_cast<unsigned>((p.nq + bm - 1) / bm * p.batch * p.heads_q));
  return launch(forward_kernel<T, kPad, bm, bn>, grid, forward_smem<T>(kPad, bm, bn), stream, p);
}

template <typename T, int kPad>
cudaError_t run_backward(const Params& p, cudaStream_t stream) {
  constexpr int bm = kPad >= 256 ? 16 : 32, bn = kPad >= 256 ? 16 : 32;
  const size_t smem = backward_smem<T>(kPad, bm, bn);
  const dim3 kv_grid(static_cast<unsigned>((p.nk + bn - 1) / bn * p.batch * p.heads_kv));
  cudaError_t status = launch(backward_dkdv_kernel<T, kPad, bm, bn>, kv_grid, smem, stream, p);
  if (status != cudaSuccess) return status;
  const dim3 q_grid(static_cast<unsigned>((p.nq + bm - 1) / bm * p.batch * p.heads_q));
  return launch(backward_dq_kernel<T, kPad, bm, bn>, q_grid, smem, stream, p);
}

template <typename T, bool kForward>
cudaError_t run(const Params& p, cudaStream_t stream) {
  const int64_t widest = p.d > p.dv_dim ? p.d : p.dv_dim;
  if (widest <= 32) return kForward ? run_forward<T, 32>(p, stream) : run_backward<T, 32>(p, stream);
  if (widest <= 64) return kForward ? run_forward<T, 64>(p, stream) : run_backward<T, 64>(p, stream);
  if (widest <= 128) return kForward ? run_forward<T, 128>(p, stream) : run_backward<T, 128>(p, stream);
  if (widest <= 256) return kForward ? run_forward<T, 256>(p, stream) : run_backward<T, 256>(p, stream);
  return cudaErrorInvalidValue;
}

// shape = (batch, heads_q, heads_kv, nq, nk, d, dv); strides: q, k, v, grad_out, out as (batch, head, row)
// and the mask as (batch, head, row, column).
Params make_params(const int64_t* shape, const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                   const int64_t* mask_strides, float scale, bool causal, double dropout_p, int64_t seed) {
  Params p{};
  p.batch = shape[0], p.heads_q = shape[1], p.heads_kv = shape[2], p.nq = shape[3], p.nk = shape[4];
  p.d = shape[5], p.dv_dim = shape[6];
  for (int i = 0; i < 3; ++i) p.sq[i] = q_strides[i], p.sk[i] = k_strides[i], p.sv[i] = v_strides[i];
  for (int i = 0; i < 4; ++i) p.sm[i] = mask_strides != nullptr ? mask_strides[i] : 0;
  p.scale = scale;
  p.causal = causal;
  p.dropout = dropout_p > 0;
  const double threshold = dropout_p * 4294967296.0;
  p.threshold = static_cast<int64_t>(threshold + 0.5 < 4294967296.0 ? threshold + 0.5 : 4294967296.0);
  p.keep_scale = dropout_p >= 1 ? 0.0f : static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed_lo = static_cast<uint32_t>(seed);
  p.seed_hi = static_cast<uint32_t>(seed >> 32);
  return p;
}

}  // namespace

cudaError_t attention_forward(ScalarKind kind, const void* q, const void* k, const void* v, const void* mask, void* out,
                              bool out_float, float* lse, const int64_t* shape, const int64_t* q_strides,
                              const int64_t* k_strides, const int64_t* v_strides, const int64_t* mask_strides,
                              const int64_t* out_strides, float scale, bool causal, double dropout_p, int64_t seed,
                              cudaStream_t stream) {
  Params p = make_params(shape, q_strides, k_strides, v_strides, mask_strides, scale, causal, dropout_p, seed);
  p.q = q, p.k = k, p.v = v, p.mask = mask, p.out = out, p.out_float = out_float, p.lse = lse;
  for (int i = 0; i < 3; ++i) p.so[i] = out_strides[i];
  return dispatch_scalar(kind, [&](auto tag) { return run<decltype(tag), true>(p, stream); });
}

cudaError_t attention_backward(ScalarKind kind, const void* grad_out, const void* q, const void* k, const void* v,
                               const void* mask, const float* lse, const float* delta, void* dq, void* dk, void* dv,
                               void* dmask, const int64_t* shape, const int64_t* q_strides, const int64_t* k_strides,
                               const int64_t* v_strides, const int64_t* mask_strides, const int64_t* grad_strides,
                               float scale, bool causal, double dropout_p, int64_t seed, cudaStream_t stream) {
  Params p = make_params(shape, q_strides, k_strides, v_strides, mask_strides, scale, causal, dropout_p, seed);
  p.grad_out = grad_out, p.q = q, p.k = k, p.v = v, p.mask = mask, p.lse = const_cast<float*>(lse), p.delta = delta;
  p.dq = dq, p.dk = dk, p.dv = dv, p.dmask = dmask;
  for (int i = 0; i < 3; ++i) p.sg[i] = grad_strides[i];
  return dispatch_scalar(kind, [&](auto tag) { return run<decltype(tag), false>(p, stream); });
}

}  // namespace cuda
}  // namespace fastdl
