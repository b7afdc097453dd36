// Packed-sequence bookkeeping shared by the CPU kernels (csrc/cpu/rnn.cpp) and the CUDA glue
// (csrc/cuda/rnn.cpp) of the LSTM/GRU layers. batch_sizes lives on the CPU, as PackedSequence keeps it.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace fastdl {

// Which rows of a padded, length-sorted batch take part in each step, and where their previous state is.
class Steps {
 public:
  Steps(int64_t time, int64_t batch, const std::optional<at::Tensor>& batch_sizes, bool reverse)
      : time_(time), reverse_(reverse), sizes_(time, batch) {
    if (batch_sizes.has_value()) {
      const at::Tensor sizes = batch_sizes->to(at::kCPU, at::kLong).contiguous();
      TORCH_CHECK(sizes.dim() == 1 && sizes.size(0) == time, "fastdl rnn: batch_sizes must have one entry per time step (",
                  time, "), got shape ", sizes.sizes());
      const int64_t* data = sizes.const_data_ptr<int64_t>();
      for (int64_t t = 0; t < time; ++t) {
        TORCH_CHECK(data[t] >= 0 && data[t] <= batch && (t == 0 || data[t] <= data[t - 1]),
                    "fastdl rnn: batch_sizes must be non-increasing and at most the batch size ", batch);
        sizes_[t] = data[t];
      }
    }
    packed_ = time > 0 && sizes_[time - 1] < batch;
  }
  // Time index of the step-th step of the recurrence (backward through time walks steps in reverse).
  int64_t at(int64_t step) const { return reverse_ ? time_ - 1 - step : step; }
  bool has_previous(int64_t t) const { return reverse_ ? t + 1 < time_ : t > 0; }
  int64_t previous(int64_t t) const { return reverse_ ? t + 1 : t - 1; }
  int64_t active(int64_t t) const { return sizes_[t]; }
  // Rows [0, continuing) carry state from the previous step; rows [continuing, active) start from h0.
  int64_t continuing(int64_t t) const { return has_previous(t) ? std::min(active(t), active(previous(t))) : 0; }
  // Rows [first_finishing, active) take their final state at step t.
  int64_t first_finishing(int64_t t) const {
    if (reverse_) return t == 0 ? 0 : active(t);
    return t + 1 < time_ ? active(t + 1) : 0;
  }
  // The rows of slice [lo, hi) at step t: [begin, end) run, [begin, continuing) carry state from the
  // previous step, [continuing, end) start from the initial state, [finishing, end) end here.
  struct Rows {
    int64_t begin, continuing, finishing, end;
  };
  Rows rows(int64_t t, int64_t lo, int64_t hi) const {
    const int64_t end = std::clamp(active(t), lo, hi);
    return {lo, std::clamp(continuing(t), lo, end), std::clamp(first_finishing(t), lo, end), end};
  }
  // Outputs and saved tensors must be zero where rows are inactive (packed input) and need no fill else.
  at::Tensor allocate(at::IntArrayRef shape, const at::TensorOptions& options) const {
    return packed_ ? at::zeros(shape, options) : at::empty(shape, options);
  }

 private:
  int64_t time_;
  bool reverse_;
  std::vector<int64_t> sizes_;
  bool packed_ = false;
};

}  // namespace fastdl
