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

}  // namespace cuda
}  // namespace fastdl
