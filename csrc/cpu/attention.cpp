// Scaled dot-product attention, CPU flash kernels (math in fastdl/ops/attention.py).
//
// Forward: a task is one (batch, query head, block of kBlockQ queries); tasks run in parallel. The task
// packs Qᵀ once and walks the key blocks: Sᵀ = K·Qᵀ for the tile (log2 e folded into the product's
// scale, so each probability is one exp2), then vectorized sweeps add the mask and run the online
// softmax in base 2, and O += P·V. The scores are kept transposed (keys down, queries across) so that
// every per-query quantity — running max, sum, rescale factor — is a vector over queries and no loop
// reduces horizontally. With causality the walk stops at the last key the block's last query may see,
// so masked tiles are never computed; only the diagonal tile is masked element by element. The N×N
// matrix never exists beyond one tile per thread. The log-sum-exp of every row is saved for backward.
//
// Backward: a task is one (batch, key/value head) — it owns the rows of dK and dV it writes and, since
// it loops over all the query heads sharing that key/value head (GQA), the rows of dQ too, so no two
// tasks write the same memory (deterministic, no atomics). For each key block and each query block
// the tile is recomputed: P = exp2(S·log2 e − lse₂), dV += (P∘Z)ᵀ·dO, dP = dO·Vᵀ,
// dS = P∘(Z∘dP − δ), dK += scale·dSᵀ·Q, dQ += scale·dS·K, with δ_i = dO_i·O_i computed once per row.
//
// The tile products are our own register-blocked micro-kernels (vectors and tile shape per ISA, isa.h)
// rather than BLAS calls: they take any strides for the left operand (so Pᵀ and
// dSᵀ cost nothing), and on this project's AMD test machine MKL runs its generic kernels anyway, which
// these match (measured with perf: equal time in the products) without the per-call packing copies.
//
// Dropout: keep_ij is a hash of (seed, global row, column) — the same function as _dropout_bits in
// fastdl/ops/attention.py — so backward regenerates the forward's mask without storing it.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fastdl {
namespace cpu {
namespace {

constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 128;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// C[kRows × kVecs·lanes] = alpha·A·B (+ C when accumulating): the k-loop keeps the whole C block in
// registers, each step broadcasting kRows elements of A against kVecs vectors of one row of B.
template <typename Isa, int kRows, int kVecs, typename T>
FASTDL_INLINE void micro_kernel(int64_t k, T alpha, const T* a, int64_t a_si, int64_t a_sk, const T* b, int64_t ldb,
                                bool accumulate, T* c, int64_t ldc) {
  using V = Vec<T, Isa>;
  constexpr int64_t lanes = kLanes<T, Isa>;
  V acc[kRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V{};
  for (int64_t p = 0; p < k; ++p) {
    V row[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) row[v] = load_vec<Isa>(b + p * ldb + v * lanes);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const T scalar = a[r * a_si + p * a_sk];
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[r][v] += scalar * row[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      T* out = c + r * ldc + v * lanes;
      V result = alpha * acc[r][v];
      if (accumulate) result += load_vec<Isa>(out);
      store_vec<Isa>(out, result);
    }
}

// Rows of C for one panel of kVecs vectors: full register tiles of Isa::kTileRows rows, then the
// remaining rows in tiles of 4, 2 and 1 (a 1-row tile has too few accumulators to hide the multiply-add
// latency, so it only takes the last odd row).
template <typename Isa, int kVecs, typename T>
FASTDL_INLINE void column_panel(int64_t m, int64_t k, T alpha, const T* a, int64_t a_si, int64_t a_sk, const T* b,
                                int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  constexpr int kRows = Isa::kTileRows;
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows)
    micro_kernel<Isa, kRows, kVecs>(k, alpha, a + i * a_si, a_si, a_sk, b, ldb, accumulate, c + i * ldc, ldc);
  if constexpr (kRows > 4)
    for (; i + 4 <= m; i += 4)
      micro_kernel<Isa, 4, kVecs>(k, alpha, a + i * a_si, a_si, a_sk, b, ldb, accumulate, c + i * ldc, ldc);
  for (; i + 2 <= m; i += 2)
    micro_kernel<Isa, 2, kVecs>(k, alpha, a + i * a_si, a_si, a_sk, b, ldb, accumulate, c + i * ldc, ldc);
  for (; i < m; ++i)
    micro_kernel<Isa, 1, kVecs>(k, alpha, a + i * a_si, a_si, a_sk, b, ldb, accumulate, c + i * ldc, ldc);
}

// Row-major C[m×n] = alpha·A·B (+ C when accumulating), A[i][p] at a[i·a_si + p·a_sk] (any strides, so
// Aᵀ costs nothing), B row-major with unit stride along n.
template <typename Isa, typename T>
FASTDL_INLINE void tile_gemm(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t a_si, int64_t a_sk,
                             const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  constexpr int kVecs = Isa::kTileVecs;
  constexpr int64_t lanes = kLanes<T, Isa>;
  int64_t j = 0;
  for (; j + kVecs * lanes <= n; j += kVecs * lanes)
    column_panel<Isa, kVecs>(m, k, alpha, a, a_si, a_sk, b + j, ldb, accumulate, c + j, ldc);
  for (; j + lanes <= n; j += lanes)
    column_panel<Isa, 1>(m, k, alpha, a, a_si, a_sk, b + j, ldb, accumulate, c + j, ldc);
  for (; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      T sum = 0;
      for (int64_t p = 0; p < k; ++p) sum += a[i * a_si + p * a_sk] * b[p * ldb + j];
      c[i * ldc + j] = alpha * sum + (accumulate ? c[i * ldc + j] : T(0));
    }
}

// dst[p·ld + j] = src[j·stride + p]: a (cols × depth) tile transposed, so products against it stream.
// Walked in groups of 16 source rows so that the writes run along destination rows: written column by
// column, consecutive stores land ld·sizeof(T) = 512 bytes apart, and perf showed the loads stalling
// behind them (4K aliasing), with this copy taking ~6% of the forward kernel.
template <typename T>
FASTDL_INLINE void pack_transposed(const T* src, int64_t stride, int64_t cols, int64_t depth, T* dst, int64_t ld) {
  constexpr int64_t kGroup = 16;
  int64_t j0 = 0;
  for (; j0 + kGroup <= cols; j0 += kGroup)
    for (int64_t p = 0; p < depth; ++p)
      for (int64_t j = 0; j < kGroup; ++j) dst[p * ld + j0 + j] = src[(j0 + j) * stride + p];
  for (int64_t p = 0; p < depth; ++p)
    for (int64_t j = j0; j < cols; ++j) dst[p * ld + j] = src[j * stride + p];
}

// The 32-bit avalanche mix of _mix32 in fastdl/ops/attention.py.
FASTDL_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

FASTDL_INLINE uint32_t dropout_row_key(int64_t seed, int64_t row) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  return mix32(mix32(static_cast<uint32_t>(row) ^ seed_lo) ^ static_cast<uint32_t>(row >> 32) ^ seed_hi);
}

// 2^z for z ≤ 0, exactly 0 below −127 (masked scores are −∞). NaN stays NaN.
FASTDL_INLINE float exp2_nonpositive(float z) { return exp2_bounded(z < -127.0f ? -127.0f : z); }
FASTDL_INLINE double exp2_nonpositive(double z) { return std::exp2(z); }

struct Dropout {
  bool active;
  int64_t threshold;  // keep when the 32 hash bits are ≥ threshold
  double scale;       // 1 / (1 − p)
  int64_t seed;
};

template <typename T>
struct Operand {  // a (B, H, N, D) tensor with unit stride along D
  const T* data;
  int64_t sb, sh, sn;
  const T* row(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
};

template <typename T>
Operand<T> operand(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
struct Output {  // a writable (B, H, N, D) tensor with unit stride along D
  T* data;
  int64_t sb, sh, sn;
  T* row(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
};

template <typename T>
Output<T> output(at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

struct Mask {  // additive (B, Hq, Nq, Nk) mask; broadcast dims have stride 0
  bool present;
  int64_t sb, sh, sn, sk;
};

// One tile's scores, transposed: st[j·kBlockQ + r] = scale·log2 e·q_r·k_j for key j (cols of them) and
// query r (rows). Keys run down, queries across, so every per-query quantity (running max, sum,
// rescale factor) is a vector over r and no loop here reduces horizontally. Adds the mask, masks
// causally, turns each score into 2^(s − m_r) with the running max m_r updated, returns the factors
// 2^(m_old − m_new) in `rescale`, adds the new probabilities into `sums`, and finally applies dropout
// (after the sums: the softmax normalizes the undropped probabilities).
template <typename T>
FASTDL_INLINE void online_softmax_tile(T* st, int64_t rows, int64_t cols, int64_t first_row, int64_t first_col,
                                       bool causal, const T* mask, const Mask& mask_layout, T* row_max, T* sums,
                                       T* rescale, const uint32_t* row_keys, const Dropout& dropout) {
  const T log2e = static_cast<T>(kLog2e);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  if (mask != nullptr)
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t r = 0; r < rows; ++r) st[j * kBlockQ + r] += mask[r * mask_layout.sn + j * mask_layout.sk] * log2e;
  if (causal)  // top-left aligned: key j is visible to query i iff j ≤ i
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t hidden = std::min(rows, first_col + j - first_row);
      for (int64_t r = 0; r < hidden; ++r) st[j * kBlockQ + r] = neg_inf;
    }
  T new_max[kBlockQ], shift[kBlockQ], tile_sum[kBlockQ];
  std::copy(row_max, row_max + rows, new_max);
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t r = 0; r < rows; ++r) new_max[r] = st[j * kBlockQ + r] > new_max[r] ? st[j * kBlockQ + r] : new_max[r];
  for (int64_t r = 0; r < rows; ++r) {
    shift[r] = new_max[r] == neg_inf ? T(0) : new_max[r];  // a row masked so far stays at zero weight
    rescale[r] = exp2_nonpositive(row_max[r] - shift[r]);  // 0 when the old max was −∞
    row_max[r] = new_max[r];
    tile_sum[r] = 0;
  }
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      const T prob = exp2_nonpositive(st[j * kBlockQ + r] - shift[r]);
      st[j * kBlockQ + r] = prob;
      tile_sum[r] += prob;
    }
  for (int64_t r = 0; r < rows; ++r) sums[r] = sums[r] * rescale[r] + tile_sum[r];
  if (!dropout.active) return;
  const T kept = static_cast<T>(dropout.scale);
  for (int64_t j = 0; j < cols; ++j) {
    const uint32_t column = static_cast<uint32_t>(first_col + j);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t bits = mix32(row_keys[r] ^ column);
      st[j * kBlockQ + r] *= bits >= dropout.threshold ? kept : T(0);
    }
  }
}

template <typename T>
struct Problem {
  Operand<T> q, k, v;
  const T* mask;
  Mask mask_layout;
  int64_t batch, heads_q, heads_kv, nq, nk, d, dv;
  T scale;
  bool causal;
  Dropout dropout;
  int64_t group() const { return heads_q / heads_kv; }
  const T* mask_tile(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (mask == nullptr) return nullptr;
    return mask + b * mask_layout.sb + h * mask_layout.sh + i * mask_layout.sn + j * mask_layout.sk;
  }
  // Causal: the keys a query block [i0, i0 + rows) sees end at min(nk, i0 + rows).
  int64_t keys_seen(int64_t i0, int64_t rows) const { return causal ? std::min(nk, i0 + rows) : nk; }
};

// One task of the forward, in per-ISA code (with_cpu_isa).
template <typename Isa, typename T>
FASTDL_INLINE void forward_block(const Problem<T>& p, int64_t b, int64_t h, int64_t i0, T* out, int64_t out_sn, T* lse,
                   std::vector<T>& buffer, std::vector<uint32_t>& row_keys) {
  const int64_t rows = std::min(kBlockQ, p.nq - i0);
  // Not zero-filled (~130 KB per block): every element is written before it is read.
  buffer.resize(kBlockK * kBlockQ + p.d * kBlockQ + kBlockQ * p.dv + 3 * kBlockQ);
  T* st = buffer.data();
  T* query_t = st + kBlockK * kBlockQ;
  T* acc = query_t + p.d * kBlockQ;
  T* row_max = acc + kBlockQ * p.dv;
  T* sums = row_max + kBlockQ;
  T* rescale = sums + kBlockQ;
  std::fill(row_max, row_max + rows, -std::numeric_limits<T>::infinity());
  std::fill(sums, sums + rows, T(0));
  const int64_t hk = h / p.group();
  const int64_t row0 = (b * p.heads_q + h) * p.nq + i0;
  row_keys.resize(kBlockQ);
  if (p.dropout.active)
    for (int64_t r = 0; r < rows; ++r) row_keys[r] = dropout_row_key(p.dropout.seed, row0 + r);
  // Qᵀ once per block: every key tile's product Sᵀ = K·Qᵀ then streams along contiguous rows of it.
  pack_transposed(p.q.row(b, h, i0), p.q.sn, rows, p.d, query_t, kBlockQ);
  const int64_t keys = p.keys_seen(i0, rows);
  if (keys == 0) std::fill(acc, acc + rows * p.dv, T(0));  // no keys: out = 0 (and lse = +∞) below
  for (int64_t j0 = 0; j0 < keys; j0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, keys - j0);
    tile_gemm<Isa>(cols, rows, p.d, p.scale * static_cast<T>(kLog2e), p.k.row(b, hk, j0), p.k.sn, 1, query_t, kBlockQ,
                 false, st, kBlockQ);
    online_softmax_tile<T>(st, rows, cols, i0, j0, p.causal, p.mask_tile(b, h, i0, j0), p.mask_layout, row_max, sums,
                           rescale, row_keys.data(), p.dropout);
    if (j0 > 0)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < p.dv; ++c) acc[r * p.dv + c] *= rescale[r];
    // O += P·V with P read transposed out of Sᵀ (strides swapped); the first tile initializes O.
    tile_gemm<Isa>(rows, p.dv, cols, T(1), st, 1, kBlockQ, p.v.row(b, hk, j0), p.v.sn, j0 > 0, acc, p.dv);
  }
  for (int64_t r = 0; r < rows; ++r) {
    // A row with every key masked (sum 0) gives 0 and lse = +∞, so backward's exp(s − lse) is 0 there.
    const T inverse = sums[r] > 0 ? T(1) / sums[r] : T(0);
    for (int64_t c = 0; c < p.dv; ++c) out[r * out_sn + c] = acc[r * p.dv + c] * inverse;
    lse[r] = sums[r] > 0 ? (row_max[r] + std::log2(sums[r])) * static_cast<T>(kLn2)
                         : std::numeric_limits<T>::infinity();
  }
}

// dS for one tile, in place of dP (rows × cols, row stride kBlockK): P = 2^(S − lse₂) recomputed from the
// scores in `s` (which become P∘Z, what dV needs), dS = P∘(Z∘dP − δ).
template <typename T>
FASTDL_INLINE void backward_tile(T* s, T* dp, int64_t rows, int64_t cols, int64_t first_row, int64_t first_col,
                                 bool causal, const T* mask, const Mask& mask_layout, const T* lse2, const T* delta,
                                 int64_t row0, const Dropout& dropout) {
  const T log2e = static_cast<T>(kLog2e);
  const T kept = static_cast<T>(dropout.scale);
  for (int64_t r = 0; r < rows; ++r) {
    T* srow = s + r * kBlockK;
    T* dprow = dp + r * kBlockK;
    if (mask != nullptr) {
      const T* m = mask + r * mask_layout.sn;
      for (int64_t c = 0; c < cols; ++c) srow[c] += m[c * mask_layout.sk] * log2e;
    }
    const T row_lse = lse2[r];
    const T row_delta = delta[r];
    const int64_t last_visible = first_row + r - first_col;
    const bool diagonal = causal && last_visible < cols - 1;
    if (!dropout.active) {
      for (int64_t c = 0; c < cols; ++c) {
        T prob = exp2_nonpositive(srow[c] - row_lse);
        prob = diagonal && c > last_visible ? T(0) : prob;
        srow[c] = prob;
        dprow[c] = prob * (dprow[c] - row_delta);
      }
      continue;
    }
    const uint32_t key = dropout_row_key(dropout.seed, row0 + r);
    for (int64_t c = 0; c < cols; ++c) {
      T prob = exp2_nonpositive(srow[c] - row_lse);
      prob = diagonal && c > last_visible ? T(0) : prob;
      const int64_t bits = mix32(key ^ static_cast<uint32_t>(first_col + c));
      const T z = bits >= dropout.threshold ? kept : T(0);
      srow[c] = prob * z;
      dprow[c] = prob * (z * dprow[c] - row_delta);
    }
  }
}

// One task of the backward, in per-ISA code (with_cpu_isa).
template <typename Isa, typename T>
FASTDL_INLINE void backward_head_pair(const Problem<T>& p, int64_t b, int64_t hk, const Operand<T>& grad,
                                      const Operand<T>& out, const T* lse, const Output<T>& dq, const Output<T>& dk,
                                      const Output<T>& dv, T* dmask) {
  const int64_t group = p.group();
  std::vector<T> lse2(group * p.nq), delta(group * p.nq);
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t i = 0; i < p.nq; ++i) {
      const T* gi = grad.row(b, h, i);
      const T* oi = out.row(b, h, i);
      T sum = 0;
      for (int64_t c = 0; c < p.dv; ++c) sum += gi[c] * oi[c];
      delta[g * p.nq + i] = sum;
      lse2[g * p.nq + i] = lse[(b * p.heads_q + h) * p.nq + i] * static_cast<T>(kLog2e);
    }
  }
  std::vector<T> s(kBlockQ * kBlockK), dp(kBlockQ * kBlockK), dk_acc(kBlockK * p.d), dv_acc(kBlockK * p.dv);
  std::vector<T> key_t(p.d * kBlockK), value_t(p.dv * kBlockK);
  for (int64_t j0 = 0; j0 < p.nk; j0 += kBlockK) {
    const int64_t cols = std::min(kBlockK, p.nk - j0);
    std::fill(dk_acc.begin(), dk_acc.end(), T(0));
    std::fill(dv_acc.begin(), dv_acc.end(), T(0));
    const T* k = p.k.row(b, hk, j0);
    pack_transposed(k, p.k.sn, cols, p.d, key_t.data(), kBlockK);
    pack_transposed(p.v.row(b, hk, j0), p.v.sn, cols, p.dv, value_t.data(), kBlockK);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      // Causal: queries before j0 see none of these keys; start at the block holding query j0.
      const int64_t first = p.causal ? (j0 / kBlockQ) * kBlockQ : 0;
      for (int64_t i0 = first; i0 < p.nq; i0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, p.nq - i0);
        const T* q = p.q.row(b, h, i0);
        const T* gi = grad.row(b, h, i0);
        tile_gemm<Isa>(rows, cols, p.d, p.scale * static_cast<T>(kLog2e), q, p.q.sn, 1, key_t.data(), kBlockK, false,
                     s.data(), kBlockK);
        tile_gemm<Isa>(rows, cols, p.dv, T(1), gi, grad.sn, 1, value_t.data(), kBlockK, false, dp.data(), kBlockK);
        const int64_t row0 = (b * p.heads_q + h) * p.nq + i0;
        backward_tile<T>(s.data(), dp.data(), rows, cols, i0, j0, p.causal, p.mask_tile(b, h, i0, j0), p.mask_layout,
                         lse2.data() + g * p.nq + i0, delta.data() + g * p.nq + i0, row0, p.dropout);
        // Transposed left operands (Pᵀ, dSᵀ) are just swapped strides for the micro-kernel.
        tile_gemm<Isa>(cols, p.dv, rows, T(1), s.data(), 1, kBlockK, gi, grad.sn, true, dv_acc.data(), p.dv);
        tile_gemm<Isa>(cols, p.d, rows, p.scale, dp.data(), 1, kBlockK, q, p.q.sn, true, dk_acc.data(), p.d);
        // The first key block reaches every query block (causal included), so it initializes dQ.
        tile_gemm<Isa>(rows, p.d, cols, p.scale, dp.data(), kBlockK, 1, k, p.k.sn, j0 > 0, dq.row(b, h, i0), dq.sn);
        if (dmask != nullptr)
          for (int64_t r = 0; r < rows; ++r)
            std::copy(dp.data() + r * kBlockK, dp.data() + r * kBlockK + cols, dmask + (row0 + r) * p.nk + j0);
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      std::copy(dk_acc.begin() + c * p.d, dk_acc.begin() + (c + 1) * p.d, dk.row(b, hk, j0 + c));
      std::copy(dv_acc.begin() + c * p.dv, dv_acc.begin() + (c + 1) * p.dv, dv.row(b, hk, j0 + c));
    }
  }
}

at::Tensor unit_stride(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                  const char* name) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, name, ": expected 4-D query, key and value");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), name,
              ": query, key and value must share a dtype");
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2) &&
                  q.size(3) == k.size(3),
              name, ": query (B, Hq, Nq, D), key (B, Hk, Nk, D) and value (B, Hk, Nk, Dv) do not match");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, name, ": key heads must divide query heads");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == q.scalar_type(), name, ": attn_mask must have the query's dtype");
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), k.size(2)}), name,
                ": attn_mask must be (B, Hq, Nq, Nk)");
  }
}

template <typename T>
Problem<T> problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                   double dropout_p, bool causal, double scale, int64_t seed) {
  Problem<T> p{operand<T>(q), operand<T>(k), operand<T>(v), nullptr, {false, 0, 0, 0, 0},
               q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3),
               static_cast<T>(scale), causal, {false, 0, 0.0, seed}};
  if (mask.has_value()) {
    p.mask = mask->data_ptr<T>();
    p.mask_layout = {true, mask->stride(0), mask->stride(1), mask->stride(2), mask->stride(3)};
  }
  if (dropout_p > 0) {
    const double threshold = std::round(dropout_p * 4294967296.0);
    p.dropout = {true, static_cast<int64_t>(std::min(threshold, 4294967296.0)),
                 dropout_p >= 1 ? 0.0 : 1.0 / (1.0 - dropout_p), seed};
  }
  return p;
}

// Writes the output into `out` (B, Hq, Nq, Dv), whatever its strides (unit stride along the head dim): the
// Python op chooses its layout (the query's, as torch does). Returns the log-sum-exp of every row.
at::Tensor attention_forward_kernel(const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
                                    const c10::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                                    double scale, int64_t seed, at::Tensor out) {
  check_inputs(query_in, key_in, value_in, mask, "attention_forward_kernel");
  const at::Tensor q = unit_stride(query_in), k = unit_stride(key_in), v = unit_stride(value_in);
  const int64_t batch = q.size(0), heads = q.size(1), nq = q.size(2), dv = v.size(3);
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == at::IntArrayRef({batch, heads, nq, dv}) &&
                  (out.stride(3) == 1 || dv <= 1),
              "attention_forward_kernel: out must be (B, Hq, Nq, Dv) of the query's dtype, with unit stride along "
              "the head dim");
  at::Tensor lse = at::empty({batch, heads, nq}, q.options());
  const int64_t blocks = (nq + kBlockQ - 1) / kBlockQ;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward_kernel", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(q, k, v, mask, dropout_p, is_causal, scale, seed);
    scalar_t* out_data = out.data_ptr<scalar_t>();
    scalar_t* lse_data = lse.data_ptr<scalar_t>();
    // Causal blocks late in the sequence cost more; the dynamic OpenMP chunks of one task balance that.
    at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer;
      std::vector<uint32_t> row_keys;
      with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t block = task % blocks, h = (task / blocks) % heads, b = task / (blocks * heads);
          const int64_t i0 = block * kBlockQ;
          forward_block<decltype(isa)>(p, b, h, i0,
                                       out_data + b * out.stride(0) + h * out.stride(1) + i0 * out.stride(2),
                                       out.stride(2), lse_data + (b * heads + h) * nq + i0, buffer, row_keys);
        }
      });
    });
  });
  return lse;
}

// Writes ∂L/∂q, ∂L/∂k, ∂L/∂v into the given tensors, whatever their strides (unit stride along the head
// dim), so a caller holding q, k and v as views of one packed projection gets one packed gradient with no
// stacking copy. Returns ∂L/∂mask (an empty tensor unless mask_grad).
at::Tensor attention_backward_into_kernel(const at::Tensor& grad_in, const at::Tensor& query_in,
                                          const at::Tensor& key_in, const at::Tensor& value_in,
                                          const c10::optional<at::Tensor>& mask, const at::Tensor& out_in,
                                          const at::Tensor& lse_in, double dropout_p, bool is_causal, double scale,
                                          int64_t seed, bool mask_grad, at::Tensor grad_query, at::Tensor grad_key,
                                          at::Tensor grad_value) {
  check_inputs(query_in, key_in, value_in, mask, "attention_backward_kernel");
  const at::Tensor q = unit_stride(query_in), k = unit_stride(key_in), v = unit_stride(value_in);
  const at::Tensor grad = unit_stride(grad_in), out = unit_stride(out_in), lse = lse_in.contiguous();
  for (const at::Tensor* g : {&grad_query, &grad_key, &grad_value})
    TORCH_CHECK(g->scalar_type() == q.scalar_type() && g->dim() == 4 && (g->stride(3) == 1 || g->size(3) <= 1),
                "attention_backward_kernel: gradient outputs must be 4-D, of the query's dtype, with unit stride "
                "along the head dim");
  TORCH_CHECK(grad_query.sizes() == q.sizes() && grad_key.sizes() == k.sizes() && grad_value.sizes() == v.sizes(),
              "attention_backward_kernel: gradient outputs must have the shapes of query, key and value");
  // The first key block initializes dQ (see backward_head_pair); without keys nothing would.
  if (k.size(2) == 0) grad_query.zero_();
  at::Tensor dmask = mask_grad ? at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)}, q.options())
                               : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward_kernel", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(q, k, v, mask, dropout_p, is_causal, scale, seed);
    const Operand<scalar_t> g = operand<scalar_t>(grad), o = operand<scalar_t>(out);
    const Output<scalar_t> dq = output<scalar_t>(grad_query), dk = output<scalar_t>(grad_key),
                           dv = output<scalar_t>(grad_value);
    scalar_t* dmask_data = mask_grad ? dmask.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
      with_cpu_isa([&](auto isa) FASTDL_INLINE_LAMBDA {
        for (int64_t task = begin; task < end; ++task)
          backward_head_pair<decltype(isa)>(p, task / p.heads_kv, task % p.heads_kv, g, o, lse.data_ptr<scalar_t>(),
                                            dq, dk, dv, dmask_data);
      });
    });
  });
  return dmask;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_kernel(
    const at::Tensor& grad_in, const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out_in, const at::Tensor& lse_in, double dropout_p,
    bool is_causal, double scale, int64_t seed, bool mask_grad) {
  at::Tensor dq = at::empty(query_in.sizes(), query_in.options());
  at::Tensor dk = at::empty(key_in.sizes(), key_in.options());
  at::Tensor dv = at::empty(value_in.sizes(), value_in.options());
  at::Tensor dmask = attention_backward_into_kernel(grad_in, query_in, key_in, value_in, mask, out_in, lse_in,
                                                    dropout_p, is_causal, scale, seed, mask_grad, dq, dk, dv);
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace cpu
}  // namespace fastdl

TORCH_LIBRARY_FRAGMENT(fastdl, m) {
  m.def(
      "attention_forward_kernel(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
      "bool is_causal, float scale, int seed, Tensor(a!) out) -> Tensor");
  m.def(
      "attention_backward_kernel(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor out, Tensor lse, float dropout_p, bool is_causal, float scale, int seed, bool mask_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_backward_into_kernel(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor out, Tensor lse, float dropout_p, bool is_causal, float scale, int seed, bool mask_grad, "
      "Tensor(a!) grad_query, Tensor(b!) grad_key, Tensor(c!) grad_value) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("attention_forward_kernel", &fastdl::cpu::attention_forward_kernel);
  m.impl("attention_backward_kernel", &fastdl::cpu::attention_backward_kernel);
  m.impl("attention_backward_into_kernel", &fastdl::cpu::attention_backward_into_kernel);
}
