// AdamW and the schedule.
#include "launcher/optimizer.h"

#include <cassert>
#include <cmath>

namespace qlora::launcher {

AdamW::AdamW(std::vector<torch::Tensor> parameters, AdamWOptions options)
    : parameters_(std::move(parameters)), options_(options) {}

void AdamW::step(double learning_rate) {
  torch::NoGradGuard no_grad;
  if (first_moments_.empty()) {
    for (const auto& parameter : parameters_) {
      first_moments_.push_back(torch::zeros_like(parameter));
      second_moments_.push_back(torch::zeros_like(parameter));
    }
  }
  ++steps_taken_;
  const double bias_correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(steps_taken_));
  const double bias_correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(steps_taken_));
  const double step_size = learning_rate / bias_correction1;
  const double bias_correction2_root = std::sqrt(bias_correction2);
  for (size_t i = 0; i < parameters_.size(); ++i) {
    torch::Tensor& parameter = parameters_[i];
    if (!parameter.grad().defined()) continue;
    const auto& gradient = parameter.grad();
    // Decoupled weight decay, then the Adam moments, in torch.optim.AdamW's order.
    if (options_.weight_decay != 0.0) parameter.mul_(1.0 - learning_rate * options_.weight_decay);
    first_moments_[i].mul_(options_.beta1).add_(gradient, 1.0 - options_.beta1);
    second_moments_[i].mul_(options_.beta2).addcmul_(gradient, gradient, 1.0 - options_.beta2);
    auto denominator = (second_moments_[i].sqrt() / bias_correction2_root).add_(options_.epsilon);
    parameter.addcdiv_(first_moments_[i], denominator, -step_size);
  }
}

void AdamW::zero_grad() {
  for (auto& parameter : parameters_)
    if (parameter.grad().defined()) parameter.mutable_grad().zero_();
}

void AdamW::restore(int64_t steps_taken, std::vector<torch::Tensor> first, std::vector<torch::Tensor> second) {
  assert(first.size() == parameters_.size() && second.size() == parameters_.size());
  steps_taken_ = steps_taken;
  first_moments_ = std::move(first);
  second_moments_ = std::move(second);
}

double Schedule::at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps)
    return peak * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  if (kind != "cosine") return peak;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - warmup_steps) / static_cast<double>(decay_steps));
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return peak * (final_fraction + (1.0 - final_fraction) * cosine);
}

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const auto* moments : {&first_moments_, &second_moments_})
    for (const auto& moment : *moments)
      if (moment.defined()) bytes += moment.numel() * static_cast<int64_t>(moment.element_size());
  return bytes;
}

}  // namespace qlora::launcher
