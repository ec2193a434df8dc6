// Bucketed, hook-driven gradient averaging.
#include "cluster/gradient_reducer.h"

#include <cassert>
#include <chrono>

namespace qlora::cluster {

GradientReducer::GradientReducer(Communicator& communicator, std::vector<torch::Tensor> parameters,
                                 int64_t bucket_bytes, bool overlap)
    : communicator_(communicator), parameters_(std::move(parameters)), overlap_(overlap) {
  std::vector<std::vector<size_t>> groups;
  int64_t group_bytes = 0;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const int64_t bytes = parameters_[i].numel() * static_cast<int64_t>(sizeof(float));
    if (groups.empty() || (group_bytes + bytes > bucket_bytes && !groups.back().empty())) {
      groups.emplace_back();
      group_bytes = 0;
    }
    groups.back().push_back(i);
    group_bytes += bytes;
  }
  bucket_of_.resize(parameters_.size());
  offset_of_.resize(parameters_.size());
  for (size_t b = 0; b < groups.size(); ++b) {
    Bucket bucket;
    int64_t elements = 0;
    for (size_t index : groups[b]) {
      bucket_of_[index] = b;
      offset_of_[index] = elements;
      elements += parameters_[index].numel();
    }
    bucket.members = groups[b];
    bucket.flat = torch::zeros({elements}, torch::kFloat);
    buckets_.push_back(std::move(bucket));
  }
  for (size_t i = 0; i < parameters_.size(); ++i) {
    // The hook sees each gradient as autograd produces it; it is returned unchanged so .grad
    // accumulates as usual, and finish_step() overwrites it with the average.
    parameters_[i].register_hook([this, i](torch::Tensor gradient) {
      on_gradient(i, gradient);
      return gradient;
    });
  }
}

int64_t GradientReducer::buffer_bytes() const {
  int64_t total = 0;
  for (const auto& bucket : buckets_) total += bucket.flat.numel() * static_cast<int64_t>(sizeof(float));
  return total;
}

void GradientReducer::begin_step(bool last_micro_step) {
  for (auto& bucket : buckets_) {
    assert(!bucket.pending);
    bucket.ready = 0;
    bucket.launched = false;
  }
  received_.assign(parameters_.size(), 0);
  next_to_launch_ = 0;
  launched_during_backward_ = 0;
  in_step_ = last_micro_step;
}

void GradientReducer::on_gradient(size_t parameter_index, const torch::Tensor& gradient) {
  if (!in_step_) return;
  Bucket& bucket = buckets_[bucket_of_[parameter_index]];
  torch::NoGradGuard no_grad;
  auto slice = bucket.flat.narrow(0, offset_of_[parameter_index], parameters_[parameter_index].numel());
  const torch::Tensor& accumulated = parameters_[parameter_index].grad();
  if (accumulated.defined())
    torch::add_out(slice, accumulated.reshape({-1}), gradient.reshape({-1}));
  else
    slice.copy_(gradient.reshape({-1}));
  received_[parameter_index] = 1;
  ++bucket.ready;
  if (overlap_) launch_ready_buckets(false);
  for (auto& other : buckets_)
    if (other.pending) other.pending->test();
}

void GradientReducer::launch_ready_buckets(bool force) {
  while (next_to_launch_ < buckets_.size()) {
    Bucket& bucket = buckets_[next_to_launch_];
    const bool complete = bucket.ready >= static_cast<int64_t>(bucket.members.size());
    if (!complete && !force) return;
    if (!complete) {
      // A parameter that received no gradient this step contributes zeros, not last step's values.
      for (size_t index : bucket.members)
        if (!received_[index])
          bucket.flat.narrow(0, offset_of_[index], parameters_[index].numel()).zero_();
    }
    // Summed here; the 1/world of the average is folded into the copy back to .grad, which
    // touches every element anyway (a separate averaging pass costs up to 15% of busbw).
    bucket.pending = communicator_.all_reduce_async(bucket.flat.data_ptr<float>(), bucket.flat.numel(), ReduceOp::sum);
    bucket.launched = true;
    if (!force) ++launched_during_backward_;
    ++next_to_launch_;
  }
}

double GradientReducer::finish_step() {
  const auto start = std::chrono::steady_clock::now();
  launch_ready_buckets(true);
  torch::NoGradGuard no_grad;
  const double scale = 1.0 / static_cast<double>(communicator_.size());
  for (auto& bucket : buckets_) {
    bucket.pending->wait();
    bucket.pending.reset();
    for (size_t index : bucket.members) {
      torch::Tensor& parameter = parameters_[index];
      auto summed = bucket.flat.narrow(0, offset_of_[index], parameter.numel()).view(parameter.sizes());
      if (!parameter.grad().defined()) parameter.mutable_grad() = torch::empty_like(parameter);
      torch::mul_out(parameter.mutable_grad(), summed, scale);
    }
  }
  in_step_ = false;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace qlora::cluster
