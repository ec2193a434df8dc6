// AdamW over the adapters with fp32 state, and the learning-rate schedule. Our own (same update as
// torch.optim.AdamW) rather than LibTorch's, so its state can be saved and restored exactly and
// identically under LibTorch 1.13 and 2.x, whose optimizer-state containers differ.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::launcher {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-8;
  double weight_decay = 0.0;
};

class AdamW {
 public:
  AdamW(std::vector<torch::Tensor> parameters, AdamWOptions options);
  // One update at `learning_rate` from each parameter's grad(); moments are created on first use.
  void step(double learning_rate);
  void zero_grad();

  int64_t steps_taken() const { return steps_taken_; }
  // Bytes held by the moments (restored or created), for the memory report.
  int64_t state_bytes() const;
  const std::vector<torch::Tensor>& first_moments() const { return first_moments_; }
  const std::vector<torch::Tensor>& second_moments() const { return second_moments_; }
  // Restores a saved state (moments as saved by first_moments()/second_moments()).
  void restore(int64_t steps_taken, std::vector<torch::Tensor> first, std::vector<torch::Tensor> second);

 private:
  std::vector<torch::Tensor> parameters_;
  AdamWOptions options_;
  std::vector<torch::Tensor> first_moments_;
  std::vector<torch::Tensor> second_moments_;
  int64_t steps_taken_ = 0;
};

struct Schedule {
  std::string kind = "constant";   // constant | cosine
  double peak = 2e-3;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double final_fraction = 0.0;      // cosine decays to peak * final_fraction
  // Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine.
  double at(int64_t step) const;
};

}  // namespace qlora::launcher
