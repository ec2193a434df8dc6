// GradientReducer (run under mpirun -np 2 and 3) against the plain mean over ranks computed here:
// which parameters share a bucket, that a bucket is reduced the moment its last gradient arrives (and
// never before an earlier bucket), that overlap on and off give the same bits, that accumulated
// micro-steps are summed before the one reduction, and that a parameter without a gradient this step
// contributes zeros. Each test drives backward one parameter at a time, so the order in which the
// gradient hooks fire is chosen by the test rather than by autograd's scheduling.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cluster/gradient_reducer.h"
#include "cluster/mpi_communicator.h"
#include "support/world_communicator_test.h"

namespace qlora::cluster {
namespace {

// Forwards to a real communicator and notes each all-reduce launch in a log shared with the test's
// own gradient hooks, so the log shows launches interleaved with gradient arrivals.
class RecordingCommunicator final : public Communicator {
 public:
  RecordingCommunicator(Communicator& inner, std::vector<std::string>& events) : inner_(inner), events_(events) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string backend() const override { return inner_.backend(); }
  std::unique_ptr<PendingCollective> all_gather_async(const void* send, void* recv,
                                                      const std::vector<int64_t>& counts) override {
    return inner_.all_gather_async(send, recv, counts);
  }
  std::unique_ptr<PendingCollective> all_reduce_async(float* data, int64_t count, ReduceOp op) override {
    events_.push_back(std::string(op == ReduceOp::sum ? "sum " : "other ") + std::to_string(count));
    return inner_.all_reduce_async(data, count, op);
  }
  void broadcast(void* data, int64_t bytes, int root) override { inner_.broadcast(data, bytes, root); }
  void barrier() override { inner_.barrier(); }
  std::vector<std::string> gather_to_root(const std::string& record) override { return inner_.gather_to_root(record); }
  [[noreturn]] void abort(int exit_code) override {
    inner_.abort(exit_code);
    std::abort();  // not reached: the compiler does not carry [[noreturn]] through the virtual call
  }

 private:
  Communicator& inner_;
  std::vector<std::string>& events_;
};

// Six parameters of 10, 20, 30, 5, 100 and 7 floats; with 200-byte buckets they group as
// {0, 1} (120 B), {2, 3} (140 B), {4} (400 B: larger than a bucket, alone) and {5}.
const std::vector<std::vector<int64_t>> kShapes = {{2, 5}, {20}, {3, 10}, {5}, {10, 10}, {7}};
constexpr int64_t kBucketBytes = 200;

std::vector<torch::Tensor> make_parameters() {
  std::vector<torch::Tensor> parameters;
  for (const auto& shape : kShapes) parameters.push_back(torch::zeros(shape, torch::requires_grad()));
  return parameters;
}

// The gradient rank `rank` produces for parameter `index` in step `step`: any rank can compute any other's.
torch::Tensor gradient_of(int rank, size_t index, int step) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(10000 * step + 100 * rank + static_cast<int>(index));
  return torch::randn(kShapes[index], generator);
}

// Makes autograd deliver exactly `gradient` to `parameter` (and so fire its hooks).
void backward_into(const torch::Tensor& parameter, const torch::Tensor& gradient) {
  (parameter * gradient).sum().backward();
}

// Plain mean over ranks, summed in rank order in float.
torch::Tensor mean_over_ranks(int world, size_t index, const std::vector<int>& steps) {
  torch::Tensor sum = torch::zeros(kShapes[index]);
  for (int rank = 0; rank < world; ++rank)
    for (int step : steps) sum += gradient_of(rank, index, step);
  return sum / world;
}

// Logs "gradient i" whenever parameter i's gradient arrives. Registered before the reducer's own
// hooks, so a launch triggered by that gradient is logged after it.
void log_gradient_arrivals(std::vector<torch::Tensor>& parameters, std::vector<std::string>& events) {
  for (size_t i = 0; i < parameters.size(); ++i)
    parameters[i].register_hook([&events, i](torch::Tensor gradient) {
      events.push_back("gradient " + std::to_string(i));
      return gradient;
    });
}

void clear_gradients(std::vector<torch::Tensor>& parameters) {
  for (auto& parameter : parameters) parameter.mutable_grad() = torch::Tensor();
}

// Every rank holds the same bits for every parameter's gradient (checked through plain MPI).
void expect_identical_on_every_rank(const std::vector<torch::Tensor>& parameters) {
  for (size_t i = 0; i < parameters.size(); ++i) {
    auto mine = parameters[i].grad().contiguous();
    auto from_root = mine.clone();
    MPI_Bcast(from_root.data_ptr<float>(), static_cast<int>(from_root.numel()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    EXPECT_TRUE(torch::equal(mine, from_root)) << "parameter " << i << " differs from rank 0's";
  }
}

// Largest absolute difference between the reduced gradients and the plain mean. The inputs are
// standard normal, so sums over three ranks stay below ~15 and float rounding below 4e-6.
constexpr double kMeanTolerance = 4e-6;

double largest_error_from_mean(const std::vector<torch::Tensor>& parameters, int world, const std::vector<int>& steps) {
  double largest = 0.0;
  for (size_t i = 0; i < parameters.size(); ++i) {
    const auto error = (parameters[i].grad() - mean_over_ranks(world, i, steps)).abs().max().item<double>();
    largest = std::max(largest, error);
  }
  return largest;
}

using GradientReducerTest = WorldCommunicatorTest;

TEST_F(GradientReducerTest, BucketsHoldConsecutiveParametersUpToTheBucketSize) {
  auto first = make_parameters();
  EXPECT_EQ(GradientReducer(world(), first, kBucketBytes, true).bucket_count(), 4u);
  auto second = make_parameters();
  GradientReducer one_per_parameter(world(), second, 0, true);
  EXPECT_EQ(one_per_parameter.bucket_count(), 6u);
  auto third = make_parameters();
  GradientReducer all_in_one(world(), third, int64_t{1} << 30, true);
  EXPECT_EQ(all_in_one.bucket_count(), 1u);
  EXPECT_EQ(all_in_one.buffer_bytes(), (10 + 20 + 30 + 5 + 100 + 7) * 4);
}

// Gradients arriving in the parameters' order: each bucket is launched (summed, one all-reduce of
// its whole length) right after its last gradient, the oversized one included.
TEST_F(GradientReducerTest, ABucketIsReducedAsSoonAsItsLastGradientArrivesAndAveragedAtTheEnd) {
  std::vector<std::string> events;
  RecordingCommunicator recording(world(), events);
  auto parameters = make_parameters();
  log_gradient_arrivals(parameters, events);
  GradientReducer reducer(recording, parameters, kBucketBytes, true);
  EXPECT_EQ(reducer.buffer_bytes(), (10 + 20 + 30 + 5 + 100 + 7) * 4);

  reducer.begin_step();
  for (size_t i = 0; i < parameters.size(); ++i) backward_into(parameters[i], gradient_of(world().rank(), i, 0));
  EXPECT_EQ(reducer.launched_during_backward(), 4);
  const double waited = reducer.finish_step();
  EXPECT_GE(waited, 0.0);

  const std::vector<std::string> expected = {"gradient 0", "gradient 1", "sum 30",     "gradient 2", "gradient 3",
                                             "sum 35",     "gradient 4", "sum 100",    "gradient 5", "sum 7"};
  EXPECT_EQ(events, expected);
  EXPECT_LT(largest_error_from_mean(parameters, world().size(), {0}), kMeanTolerance);
  for (size_t i = 0; i < parameters.size(); ++i) EXPECT_EQ(parameters[i].grad().sizes(), parameters[i].sizes());
  expect_identical_on_every_rank(parameters);
}

// Bucket 1 completes first but waits for bucket 0: launches follow bucket order, not arrival order.
TEST_F(GradientReducerTest, BucketsAreLaunchedInIndexOrderWhateverOrderGradientsArriveIn) {
  std::vector<std::string> events;
  RecordingCommunicator recording(world(), events);
  auto parameters = make_parameters();
  log_gradient_arrivals(parameters, events);
  GradientReducer reducer(recording, parameters, kBucketBytes, true);
  reducer.begin_step();
  for (size_t i : {2, 3, 0, 5, 1, 4}) backward_into(parameters[i], gradient_of(world().rank(), i, 0));
  reducer.finish_step();
  const std::vector<std::string> expected = {"gradient 2", "gradient 3", "gradient 0", "gradient 5", "gradient 1",
                                             "sum 30",     "sum 35",     "gradient 4", "sum 100",    "sum 7"};
  EXPECT_EQ(events, expected);
  EXPECT_LT(largest_error_from_mean(parameters, world().size(), {0}), kMeanTolerance);
}

// Ranks whose hooks fire in opposite orders still issue the same collectives in the same order (a
// mismatch would pair buckets of different lengths and fail or hang).
TEST_F(GradientReducerTest, RanksReceivingGradientsInDifferentOrdersStillAgree) {
  auto parameters = make_parameters();
  GradientReducer reducer(world(), parameters, kBucketBytes, true);
  reducer.begin_step();
  std::vector<size_t> order = {0, 1, 2, 3, 4, 5};
  if (world().rank() % 2 == 1) order = {5, 4, 3, 2, 1, 0};
  for (size_t i : order) backward_into(parameters[i], gradient_of(world().rank(), i, 0));
  reducer.finish_step();
  EXPECT_LT(largest_error_from_mean(parameters, world().size(), {0}), kMeanTolerance);
  expect_identical_on_every_rank(parameters);
}

TEST_F(GradientReducerTest, OverlapOnAndOffGiveBitwiseEqualGradients) {
  std::vector<std::string> events;
  RecordingCommunicator recording(world(), events);
  auto overlapped = make_parameters();
  auto deferred = make_parameters();
  log_gradient_arrivals(deferred, events);
  GradientReducer overlapping(world(), overlapped, kBucketBytes, true);
  GradientReducer deferring(recording, deferred, kBucketBytes, false);
  for (int step = 0; step < 2; ++step) {
    events.clear();
    clear_gradients(overlapped);
    clear_gradients(deferred);
    overlapping.begin_step();
    deferring.begin_step();
    for (size_t i = 0; i < kShapes.size(); ++i) {
      const auto gradient = gradient_of(world().rank(), i, step);
      backward_into(overlapped[i], gradient);
      backward_into(deferred[i], gradient);
    }
    EXPECT_EQ(overlapping.launched_during_backward(), 4);
    EXPECT_EQ(deferring.launched_during_backward(), 0);
    const size_t arrivals = events.size();
    overlapping.finish_step();
    deferring.finish_step();
    // Without overlap every launch happens in finish_step, after all six arrivals.
    EXPECT_EQ(arrivals, 6u);
    const std::vector<std::string> launches(events.begin() + static_cast<std::ptrdiff_t>(arrivals), events.end());
    EXPECT_EQ(launches, (std::vector<std::string>{"sum 30", "sum 35", "sum 100", "sum 7"}));
    for (size_t i = 0; i < kShapes.size(); ++i)
      EXPECT_TRUE(torch::equal(overlapped[i].grad(), deferred[i].grad())) << "parameter " << i << ", step " << step;
    EXPECT_LT(largest_error_from_mean(deferred, world().size(), {step}), kMeanTolerance);
  }
}

// Gradient accumulation: an earlier micro-step only accumulates in .grad (no collective); the last
// one reduces the accumulated sum, and the result is the mean over ranks of both micro-steps' sum.
TEST_F(GradientReducerTest, AccumulatedMicroStepsAreSummedBeforeTheOneReduction) {
  std::vector<std::string> events;
  RecordingCommunicator recording(world(), events);
  auto parameters = make_parameters();
  GradientReducer reducer(recording, parameters, kBucketBytes, true);
  reducer.begin_step(false);
  for (size_t i = 0; i < parameters.size(); ++i) backward_into(parameters[i], gradient_of(world().rank(), i, 1));
  EXPECT_TRUE(events.empty()) << "an accumulating micro-step must not reduce";
  for (size_t i = 0; i < parameters.size(); ++i)
    EXPECT_TRUE(torch::equal(parameters[i].grad(), gradient_of(world().rank(), i, 1))) << "parameter " << i;
  reducer.begin_step(true);
  for (size_t i = 0; i < parameters.size(); ++i) backward_into(parameters[i], gradient_of(world().rank(), i, 2));
  reducer.finish_step();
  EXPECT_EQ(events.size(), 4u);
  EXPECT_LT(largest_error_from_mean(parameters, world().size(), {1, 2}), kMeanTolerance);
  expect_identical_on_every_rank(parameters);
}

// Step 2: parameter 3 gets no gradient anywhere and parameter 1 only on rank 0. Their bucket slots
// still hold step 1's sums; what is reduced must be zeros for them, not those stale values.
TEST_F(GradientReducerTest, AParameterWithoutAGradientThisStepContributesZeros) {
  auto parameters = make_parameters();
  GradientReducer reducer(world(), parameters, kBucketBytes, true);
  reducer.begin_step();
  for (size_t i = 0; i < parameters.size(); ++i) backward_into(parameters[i], gradient_of(world().rank(), i, 3));
  reducer.finish_step();
  EXPECT_LT(largest_error_from_mean(parameters, world().size(), {3}), kMeanTolerance);

  clear_gradients(parameters);
  reducer.begin_step();
  for (size_t i = 0; i < parameters.size(); ++i) {
    if (i == 3 || (i == 1 && world().rank() != 0)) continue;
    backward_into(parameters[i], gradient_of(world().rank(), i, 4));
  }
  reducer.finish_step();
  EXPECT_TRUE(torch::equal(parameters[3].grad(), torch::zeros(kShapes[3]))) << parameters[3].grad();
  const auto only_rank_zero = gradient_of(0, 1, 4) / world().size();
  EXPECT_LT((parameters[1].grad() - only_rank_zero).abs().max().item<double>(), kMeanTolerance);
  for (size_t i : {0, 2, 4, 5})
    EXPECT_LT((parameters[i].grad() - mean_over_ranks(world().size(), i, {4})).abs().max().item<double>(),
              kMeanTolerance)
        << "parameter " << i;
  expect_identical_on_every_rank(parameters);
}

// One rank: the "average" is the rank's own gradient, bit for bit.
TEST_F(GradientReducerTest, OneRankKeepsItsOwnGradientsExactly) {
  auto self = make_mpi_communicator(MPI_COMM_SELF);
  auto parameters = make_parameters();
  GradientReducer reducer(*self, parameters, kBucketBytes, true);
  reducer.begin_step();
  for (size_t i = 0; i < parameters.size(); ++i) backward_into(parameters[i], gradient_of(world().rank(), i, 5));
  reducer.finish_step();
  for (size_t i = 0; i < parameters.size(); ++i)
    EXPECT_TRUE(torch::equal(parameters[i].grad(), gradient_of(world().rank(), i, 5))) << "parameter " << i;
}

}  // namespace
}  // namespace qlora::cluster
