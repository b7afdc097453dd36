// LSTM and GRU cell pointwise kernels, forward and backward (math in fastdl/ops/rnn.py and csrc/cpu/rnn.cpp).
//
// Each kernel is one step of a cell after its GEMMs: one thread per (row, hidden unit) reads that unit's
// slice of every gate pre-activation (gate blocks are H apart in a row, so a warp reads 32 adjacent units
// of each gate: coalesced), evaluates all nonlinearities and the state update in fp32, and writes the
// activated gates (what backward is written in), the new cell state and h. The time loop (one cuBLAS GEMM
// and one of these launches per step) lives in the torch glue, rnn.cpp.
//
// The previous state of a row comes from one of two places: rows [0, continuing) from the previous step
// (`carry`), rows [continuing, rows) from the initial state (`initial`) — how packed sequences, whose
// rows start at different steps in the reverse direction, are run without copying any state.
//
// For small batches (at most kPersistentMaxBatch rows, whole sequences, no projection) a persistent kernel
// runs a layer's entire time loop in one cooperative launch; see persistent_layer_kernel below.
#include <cooperative_groups.h>

#include "common.h"

namespace fastdl {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

template <typename T>
__device__ __forceinline__ float previous(const T* carry, const T* initial, int64_t row, int64_t continuing,
                                          int64_t offset) {
  return to_float(row < continuing ? carry[offset] : initial[offset]);
}

struct Shape {
  int64_t rows, continuing, hidden;
};

template <typename T>
__global__ void lstm_forward_kernel(const T* input_gates, const T* hidden_gates, const T* c_carry, const T* c_initial,
                                    T* gates, T* c, T* h, Shape s) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < s.rows * s.hidden;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = index / s.hidden, unit = index % s.hidden, H = s.hidden;
    const int64_t gate = row * 4 * H + unit;
    const float i = sigmoid(to_float(input_gates[gate]) + to_float(hidden_gates[gate]));
    const float f = sigmoid(to_float(input_gates[gate + H]) + to_float(hidden_gates[gate + H]));
    const float g = tanhf(to_float(input_gates[gate + 2 * H]) + to_float(hidden_gates[gate + 2 * H]));
    const float o = sigmoid(to_float(input_gates[gate + 3 * H]) + to_float(hidden_gates[gate + 3 * H]));
    const float c_new = f * previous(c_carry, c_initial, row, s.continuing, index) + i * g;
    gates[gate] = from_float<T>(i);
    gates[gate + H] = from_float<T>(f);
    gates[gate + 2 * H] = from_float<T>(g);
    gates[gate + 3 * H] = from_float<T>(o);
    c[index] = from_float<T>(c_new);
    h[index] = from_float<T>(o * tanhf(c_new));
  }
}

// `dc` holds the gradient reaching c' and is overwritten with the one reaching c.
template <typename T>
__global__ void lstm_backward_kernel(const T* dh, T* dc, const T* gates, const T* c, const T* c_carry,
                                     const T* c_initial, T* grad_gates, Shape s) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < s.rows * s.hidden;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = index / s.hidden, unit = index % s.hidden, H = s.hidden;
    const int64_t gate = row * 4 * H + unit;
    const float i = to_float(gates[gate]), f = to_float(gates[gate + H]), g = to_float(gates[gate + 2 * H]),
                o = to_float(gates[gate + 3 * H]);
    const float tanh_c = tanhf(to_float(c[index])), grad_h = to_float(dh[index]);
    const float dc_total = to_float(dc[index]) + grad_h * o * (1.0f - tanh_c * tanh_c);
    grad_gates[gate] = from_float<T>(dc_total * g * i * (1.0f - i));
    grad_gates[gate + H] =
        from_float<T>(dc_total * previous(c_carry, c_initial, row, s.continuing, index) * f * (1.0f - f));
    grad_gates[gate + 2 * H] = from_float<T>(dc_total * i * (1.0f - g * g));
    grad_gates[gate + 3 * H] = from_float<T>(grad_h * tanh_c * o * (1.0f - o));
    dc[index] = from_float<T>(dc_total * f);
  }
}

template <typename T>
__global__ void lstm_unprojected_kernel(const T* gates, const T* c, T* r, Shape s) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < s.rows * s.hidden;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = index / s.hidden, unit = index % s.hidden;
    r[index] = from_float<T>(to_float(gates[row * 4 * s.hidden + 3 * s.hidden + unit]) * tanhf(to_float(c[index])));
  }
}

template <typename T>
__global__ void gru_forward_kernel(const T* input_gates, const T* hidden_gates, const T* h_carry, const T* h_initial,
                                   T* saved, T* h, Shape s) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < s.rows * s.hidden;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = index / s.hidden, unit = index % s.hidden, H = s.hidden;
    const int64_t gate = row * 3 * H + unit, kept = row * 4 * H + unit;
    const float r = sigmoid(to_float(input_gates[gate]) + to_float(hidden_gates[gate]));
    const float z = sigmoid(to_float(input_gates[gate + H]) + to_float(hidden_gates[gate + H]));
    const float gh_n = to_float(hidden_gates[gate + 2 * H]);
    const float n = tanhf(to_float(input_gates[gate + 2 * H]) + r * gh_n);
    const float h_prev = previous(h_carry, h_initial, row, s.continuing, index);
    saved[kept] = from_float<T>(r);
    saved[kept + H] = from_float<T>(z);
    saved[kept + 2 * H] = from_float<T>(n);
    saved[kept + 3 * H] = from_float<T>(gh_n);
    h[index] = from_float<T>(n + z * (h_prev - n));
  }
}

template <typename T>
__global__ void gru_backward_kernel(const T* dh, const T* saved, const T* h_carry, const T* h_initial, T* grad_input_gates,
                                    T* grad_hidden_gates, T* grad_h_prev, Shape s) {
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < s.rows * s.hidden;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = index / s.hidden, unit = index % s.hidden, H = s.hidden;
    const int64_t gate = row * 3 * H + unit, kept = row * 4 * H + unit;
    const float r = to_float(saved[kept]), z = to_float(saved[kept + H]), n = to_float(saved[kept + 2 * H]),
                gh_n = to_float(saved[kept + 3 * H]);
    const float grad_h = to_float(dh[index]);
    const float dn = grad_h * (1.0f - z) * (1.0f - n * n);
    const float dz = grad_h * (previous(h_carry, h_initial, row, s.continuing, index) - n) * z * (1.0f - z);
    const float dr = dn * gh_n * r * (1.0f - r);
    grad_input_gates[gate] = from_float<T>(dr);
    grad_input_gates[gate + H] = from_float<T>(dz);
    grad_input_gates[gate + 2 * H] = from_float<T>(dn);
    grad_hidden_gates[gate] = from_float<T>(dr);
    grad_hidden_gates[gate + H] = from_float<T>(dz);
    grad_hidden_gates[gate + 2 * H] = from_float<T>(dn * r);
    grad_h_prev[index] = from_float<T>(grad_h * z);
  }
}

// ------------------------------------------------------------------------ persistent layer (small batch)
// With a handful of rows, a step of the GEMM + pointwise path is two launches whose GEMM is too small to
// fill the GPU, and it streams all of W_hh from L2 every step: launch latency and weight traffic, not
// arithmetic, set the time. Here one cooperative launch runs the whole time loop of a layer (the
// persistent-RNN idea): block k owns hidden units [k·U, k·U + U) and keeps those units' rows of W_hh — the
// i, f, g, o rows (LSTM) or r, z, n rows (GRU) of each owned unit, `units`·G rows of H — in shared memory
// for all T steps, so the weights are read from global memory once per layer. Each step:
//   1. stage h_{t−1} (B × H, fp32) in shared memory;
//   2. each warp takes weight rows and forms their dot products with all B rows of h at once (lanes
//      stride over H, a register accumulator per batch row, then a warp reduction);
//   3. threads apply the cell to the block's (row, unit) pairs — the same math as the pointwise kernels
//      above — writing h_t, the saved activations backward needs, and the new cell state;
//   4. a grid-wide barrier makes h_t, written by every block, visible before any block reads it.
// A unit's cell state is produced and consumed by the block that owns it, so only h crosses blocks, and
// it is read with ld.cg (L2, not the incoherent L1). Hidden pre-activations stay in fp32 throughout.
constexpr int kPersistentThreads = 256;
constexpr int kPersistentMaxBatch = 8;

struct PersistentShape {
  int64_t time, batch, hidden;
  int units;  // hidden units per block
  bool reverse;
};

// Shared memory of a block: its weight rows (padded to 16 bytes), then h_{t−1} and the pre-activations.
__host__ __device__ constexpr size_t persistent_weight_bytes(int gates, int units, int64_t hidden, size_t element) {
  return (static_cast<size_t>(gates) * units * hidden * element + 15) / 16 * 16;
}
__host__ __device__ constexpr size_t persistent_shared_bytes(int gates, int units, int64_t hidden, int64_t batch,
                                                             size_t element) {
  return persistent_weight_bytes(gates, units, hidden, element) +
         sizeof(float) * batch * (hidden + static_cast<size_t>(gates) * units);
}

template <typename T>
__device__ __forceinline__ float load_written_by_other_blocks(const T* p) {
  return to_float(__ldcg(p));
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, bool kLstm>
__global__ void __launch_bounds__(kPersistentThreads)
    persistent_layer_kernel(const T* input_proj, const T* h0, const T* c0, const T* w_hh, const T* b_hh, T* output,
                            T* saved, T* cells, T* h_n, T* c_n, PersistentShape s) {
  constexpr int G = kLstm ? 4 : 3;
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  const int64_t H = s.hidden, B = s.batch;
  const int64_t first_unit = static_cast<int64_t>(blockIdx.x) * s.units;
  const int units = static_cast<int>(H - first_unit < s.units ? H - first_unit : s.units);
  const int rows = G * units;  // local weight row r: gate r / units of unit first_unit + r % units

  extern __shared__ float4 shared_storage[];  // float4: 16-byte alignment
  T* weights = reinterpret_cast<T*>(shared_storage);
  float* h_shared =
      reinterpret_cast<float*>(reinterpret_cast<char*>(shared_storage) + persistent_weight_bytes(G, s.units, H, sizeof(T)));
  float* pre = h_shared + B * H;  // [B][rows] hidden pre-activations of this step

  for (int64_t index = threadIdx.x; index < rows * H; index += blockDim.x) {
    const int64_t r = index / H, k = index % H;
    weights[index] = w_hh[((r / units) * H + first_unit + r % units) * H + k];
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t step = 0; step < s.time; ++step) {
    const int64_t t = s.reverse ? s.time - 1 - step : step;
    const int64_t previous_t = s.reverse ? t + 1 : t - 1;
    const T* h_prev = step == 0 ? h0 : output + previous_t * B * H;
    for (int64_t index = threadIdx.x; index < B * H; index += blockDim.x)
      h_shared[index] = load_written_by_other_blocks(h_prev + index);
    __syncthreads();  // also orders the weight staging before the first step's products

    for (int r = warp; r < rows; r += warps) {
      float acc[kPersistentMaxBatch];
#pragma unroll
      for (int b = 0; b < kPersistentMaxBatch; ++b) acc[b] = 0.0f;
      const T* w_row = weights + static_cast<int64_t>(r) * H;
      for (int64_t k = lane; k < H; k += 32) {
        const float w = to_float(w_row[k]);
#pragma unroll
        for (int b = 0; b < kPersistentMaxBatch; ++b)
          if (b < B) acc[b] += w * h_shared[b * H + k];
      }
#pragma unroll
      for (int b = 0; b < kPersistentMaxBatch; ++b) {
        if (b >= B) break;
        const float total = warp_sum(acc[b]);
        if (lane == 0) pre[b * rows + r] = total;
      }
    }
    __syncthreads();

    for (int64_t index = threadIdx.x; index < B * units; index += blockDim.x) {
      const int64_t b = index / units, u = index % units, unit = first_unit + u;
      const T* proj = input_proj + (t * B + b) * G * H;
      const int64_t state = (t * B + b) * H + unit, kept = (t * B + b) * 4 * H + unit;
      const auto hidden_gate = [&](int g) { return pre[b * rows + g * units + u]; };
      float h_new;
      if constexpr (kLstm) {
        const float i = sigmoid(to_float(proj[unit]) + hidden_gate(0));
        const float f = sigmoid(to_float(proj[unit + H]) + hidden_gate(1));
        const float g = tanhf(to_float(proj[unit + 2 * H]) + hidden_gate(2));
        const float o = sigmoid(to_float(proj[unit + 3 * H]) + hidden_gate(3));
        const float c_prev = to_float(step == 0 ? c0[b * H + unit] : cells[(previous_t * B + b) * H + unit]);
        const float c_new = f * c_prev + i * g;
        saved[kept] = from_float<T>(i);
        saved[kept + H] = from_float<T>(f);
        saved[kept + 2 * H] = from_float<T>(g);
        saved[kept + 3 * H] = from_float<T>(o);
        cells[state] = from_float<T>(c_new);
        h_new = o * tanhf(c_new);
        if (step == s.time - 1) c_n[b * H + unit] = from_float<T>(c_new);
      } else {
        const auto bias = [&](int g) { return b_hh == nullptr ? 0.0f : to_float(b_hh[g * H + unit]); };
        const float r = sigmoid(to_float(proj[unit]) + hidden_gate(0) + bias(0));
        const float z = sigmoid(to_float(proj[unit + H]) + hidden_gate(1) + bias(1));
        const float gh_n = hidden_gate(2) + bias(2);
        const float n = tanhf(to_float(proj[unit + 2 * H]) + r * gh_n);
        saved[kept] = from_float<T>(r);
        saved[kept + H] = from_float<T>(z);
        saved[kept + 2 * H] = from_float<T>(n);
        saved[kept + 3 * H] = from_float<T>(gh_n);
        h_new = n + z * (h_shared[b * H + unit] - n);
      }
      output[state] = from_float<T>(h_new);
      if (step == s.time - 1) h_n[b * H + unit] = from_float<T>(h_new);
    }
    grid.sync();  // h_t complete everywhere; also keeps h_shared from being restaged while still read
  }
}

unsigned int grid_for(const Shape& s) {
  // Grid-stride loops: enough blocks to fill an H200 many times over, never more than the work.
  const unsigned int needed = blocks_for(s.rows * s.hidden, kThreads);
  return needed < 65535u ? needed : 65535u;
}

template <typename T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* as(void* p) {
  return static_cast<T*>(p);
}

}  // namespace

cudaError_t lstm_pointwise_forward(ScalarKind kind, const void* input_gates, const void* hidden_gates, const void* c_carry,
                                   const void* c_initial, void* gates, void* c, void* h, int64_t rows, int64_t continuing,
                                   int64_t hidden, cudaStream_t stream) {
  const Shape s{rows, continuing, hidden};
  if (rows * hidden == 0) return cudaSuccess;
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    lstm_forward_kernel<T><<<grid_for(s), kThreads, 0, stream>>>(as<T>(input_gates), as<T>(hidden_gates), as<T>(c_carry),
                                                                 as<T>(c_initial), as<T>(gates), as<T>(c), as<T>(h), s);
    return cudaGetLastError();
  });
}

cudaError_t lstm_pointwise_backward(ScalarKind kind, const void* dh, void* dc, const void* gates, const void* c,
                                    const void* c_carry, const void* c_initial, void* grad_gates, int64_t rows,
                                    int64_t continuing, int64_t hidden, cudaStream_t stream) {
  const Shape s{rows, continuing, hidden};
  if (rows * hidden == 0) return cudaSuccess;
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    lstm_backward_kernel<T><<<grid_for(s), kThreads, 0, stream>>>(as<T>(dh), as<T>(dc), as<T>(gates), as<T>(c),
                                                                  as<T>(c_carry), as<T>(c_initial), as<T>(grad_gates), s);
    return cudaGetLastError();
  });
}

cudaError_t lstm_unprojected(ScalarKind kind, const void* gates, const void* c, void* r, int64_t rows, int64_t hidden,
                             cudaStream_t stream) {
  const Shape s{rows, 0, hidden};
  if (rows * hidden == 0) return cudaSuccess;
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    lstm_unprojected_kernel<T><<<grid_for(s), kThreads, 0, stream>>>(as<T>(gates), as<T>(c), as<T>(r), s);
    return cudaGetLastError();
  });
}

cudaError_t gru_pointwise_forward(ScalarKind kind, const void* input_gates, const void* hidden_gates, const void* h_carry,
                                  const void* h_initial, void* saved, void* h, int64_t rows, int64_t continuing,
                                  int64_t hidden, cudaStream_t stream) {
  const Shape s{rows, continuing, hidden};
  if (rows * hidden == 0) return cudaSuccess;
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    gru_forward_kernel<T><<<grid_for(s), kThreads, 0, stream>>>(as<T>(input_gates), as<T>(hidden_gates), as<T>(h_carry),
                                                                as<T>(h_initial), as<T>(saved), as<T>(h), s);
    return cudaGetLastError();
  });
}

cudaError_t gru_pointwise_backward(ScalarKind kind, const void* dh, const void* saved, const void* h_carry,
                                   const void* h_initial, void* grad_input_gates, void* grad_hidden_gates,
                                   void* grad_h_prev, int64_t rows, int64_t continuing, int64_t hidden,
                                   cudaStream_t stream) {
  const Shape s{rows, continuing, hidden};
  if (rows * hidden == 0) return cudaSuccess;
  return dispatch_scalar(kind, [&](auto zero) {
    using T = decltype(zero);
    gru_backward_kernel<T><<<grid_for(s), kThreads, 0, stream>>>(as<T>(dh), as<T>(saved), as<T>(h_carry),
                                                                 as<T>(h_initial), as<T>(grad_input_gates),
                                                                 as<T>(grad_hidden_gates), as<T>(grad_h_prev), s);
    return cudaGetLastError();
  });
}

cudaError_t persistent_layer_forward(ScalarKind kind, bool lstm, const void* input_proj, const void* h0, const void* c0,
                                     const void* w_hh, const void* b_hh, void* output, void* saved, void* cells,
                                     void* h_n, void* c_n, int64_t time, int64_t batch, int64_t hidden, bool reverse,
                                     cudaStream_t stream) {
  if (batch < 1 || batch > kPersistentMaxBatch || time < 1 || hidden < 1) return cudaErrorNotSupported;
  int device = 0, processors = 0, cooperative = 0, shared_limit = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  if (!cooperative) return cudaErrorNotSupported;
  const int gates = lstm ? 4 : 3;
  // One block per multiprocessor, each owning an equal share of the units: every block is resident at
  // once (what the grid barrier requires) and the weights are spread over all shared memories.
  const int units = static_cast<int>((hidden + processors - 1) / processors);
  const unsigned int blocks = static_cast<unsigned int>((hidden + units - 1) / units);
  return dispatch_scalar(kind, [&](auto zero) -> cudaError_t {
    using T = decltype(zero);
    const size_t shared = persistent_shared_bytes(gates, units, hidden, batch, sizeof(T));
    if (shared > static_cast<size_t>(shared_limit)) return cudaErrorNotSupported;
    const auto kernel = lstm ? persistent_layer_kernel<T, true> : persistent_layer_kernel<T, false>;
    cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (error != cudaSuccess) return error;
    int resident = 0;
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kPersistentThreads, shared);
    if (error != cudaSuccess) return error;
    if (resident < 1) return cudaErrorNotSupported;
    const PersistentShape shape{time, batch, hidden, units, reverse};
    const T* input_proj_t = as<T>(input_proj);
    const T *h0_t = as<T>(h0), *c0_t = as<T>(c0), *w_hh_t = as<T>(w_hh), *b_hh_t = as<T>(b_hh);
    T *output_t = as<T>(output), *saved_t = as<T>(saved), *cells_t = as<T>(cells), *h_n_t = as<T>(h_n),
      *c_n_t = as<T>(c_n);
    void* arguments[] = {&input_proj_t, &h0_t, &c0_t, &w_hh_t, &b_hh_t, &output_t, &saved_t, &cells_t, &h_n_t, &c_n_t,
                         const_cast<PersistentShape*>(&shape)};
    return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(blocks), dim3(kPersistentThreads),
                                       arguments, shared, stream);
  });
}

}  // namespace cuda
}  // namespace fastdl
