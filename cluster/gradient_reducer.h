// Averaged all-reduce of adapter gradients in fusion buckets: each parameter's gradient is copied
// into its bucket the moment autograd produces it (a gradient hook), and a bucket is reduced as
// soon as it is complete, so reductions overlap the rest of backward. Buckets are launched strictly
// in index order, which every rank agrees on, so collectives can never be issued out of order.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cluster/communicator.h"

namespace qlora::cluster {

class GradientReducer {
 public:
  // `parameters` in the order backward produces their gradients (last layer first). Each bucket
  // holds consecutive parameters up to `bucket_bytes` (at least one parameter).
  GradientReducer(Communicator& communicator, std::vector<torch::Tensor> parameters, int64_t bucket_bytes,
                  bool overlap);
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Call before each backward. Only the last micro-step of an accumulated step reduces: its hooks
  // add the gradients accumulated so far (in .grad) to the one arriving.
  void begin_step(bool last_micro_step = true);
  // Launches what backward left unlaunched, waits for every bucket, and stores the averaged
  // gradients in each parameter's grad(). Returns the seconds spent waiting here.
  double finish_step();

  size_t bucket_count() const { return buckets_.size(); }
  int64_t buffer_bytes() const;
  int64_t launched_during_backward() const { return launched_during_backward_; }

 private:
  struct Bucket {
    torch::Tensor flat;
    std::vector<size_t> members;
    int64_t ready = 0;
    bool launched = false;
    std::unique_ptr<PendingCollective> pending;
  };
  void on_gradient(size_t parameter_index, const torch::Tensor& gradient);
  void launch_ready_buckets(bool force);

  Communicator& communicator_;
  std::vector<torch::Tensor> parameters_;
  std::vector<size_t> bucket_of_;
  std::vector<int64_t> offset_of_;
  std::vector<char> received_;  // this step, per parameter
  std::vector<Bucket> buckets_;
  size_t next_to_launch_ = 0;
  bool overlap_;
  bool in_step_ = false;
  int64_t launched_during_backward_ = 0;
};

}  // namespace qlora::cluster
