// LoRA dropout across world sizes (run under mpirun -np 1, 2 and 4): masks are a function of each
// token's place in the global batch, so with dropout the loss of any world size and micro-batch split
// equals a 1-rank whole-batch run, dropout really changes the loss, and checkpointed blocks recompute
// the masks their first forward drew.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cluster/mpi_communicator.h"
#include "launcher/train.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

constexpr int64_t kSteps = 10;
// The no-dropout world-size test's tolerance (test_training_mpi): float reductions in another order.
constexpr double kLossTolerance = 1e-5;

TrainOptions dropout_run(const std::string& model_path, double dropout) {
  TrainOptions options;
  options.model_path = model_path;
  options.steps = kSteps;
  options.global_batch = 12;   // divides over 1, 2, 3 and 4 ranks
  options.sequence_length = 32;
  options.learning_rate = 2e-3;
  options.lora.dropout = dropout;
  options.write_outputs = false;
  options.quiet = true;
  options.threads = 1;
  return options;
}

int world_size() {
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  return world;
}

double largest_difference(const std::vector<double>& first, const std::vector<double>& second) {
  double largest = 0;
  for (size_t step = 0; step < std::min(first.size(), second.size()); ++step)
    largest = std::max(largest, std::fabs(first[step] - second[step]));
  return largest;
}

// Every rank splits its share into micro-batches of one sequence; rank 0 then trains alone on the
// whole global batch in one forward. Same global batches, same masks, same losses.
TEST(DropoutAcrossWorldSizes, LossMatchesASingleRankWholeBatchRunForTenSteps) {
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto world_communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  TrainOptions split = dropout_run(model_path, 0.1);
  split.micro_batch = 1;
  const auto distributed = run_training(split, *world_communicator);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    auto self_communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
    const auto whole = run_training(dropout_run(model_path, 0.1), *self_communicator);
    ASSERT_EQ(whole.losses.size(), static_cast<size_t>(kSteps));
    ASSERT_EQ(distributed.losses.size(), static_cast<size_t>(kSteps));
    std::printf("dropout 0.1, world %d in micro-batches of 1 vs 1 rank whole batch over %lld steps: largest loss "
                "difference %.3g\n",
                world_size(), static_cast<long long>(kSteps), largest_difference(distributed.losses, whole.losses));
    for (size_t step = 0; step < whole.losses.size(); ++step)
      EXPECT_NEAR(distributed.losses[step], whole.losses[step], kLossTolerance) << "step " << step + 1;
    EXPECT_LT(whole.losses.back(), whole.losses.front());
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Guards the test above against passing because dropout does nothing: B starts at zero, so the
// first step's loss cannot depend on the masks, and every later one must.
TEST(DropoutAcrossWorldSizes, DropoutChangesTheLossFromTheSecondStepOn) {
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const auto without = run_training(dropout_run(model_path, 0.0), *communicator);
  const auto with = run_training(dropout_run(model_path, 0.1), *communicator);
  ASSERT_EQ(without.losses.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(with.losses.size(), static_cast<size_t>(kSteps));
  EXPECT_NEAR(with.losses[0], without.losses[0], kLossTolerance);
  std::vector<double> later_with(with.losses.begin() + 1, with.losses.end());
  std::vector<double> later_without(without.losses.begin() + 1, without.losses.end());
  const double difference = largest_difference(later_with, later_without);
  if (communicator->rank() == 0)
    std::printf("world %d: dropout 0.1 vs 0 largest loss difference over steps 2-%lld: %.3g\n", world_size(),
                static_cast<long long>(kSteps), difference);
  EXPECT_GT(difference, 100 * kLossTolerance);
}

// The checkpoint functions recompute each block in backward; if the recomputation drew other masks
// than the forward, the gradients would belong to another network and the losses would drift apart.
TEST(DropoutAcrossWorldSizes, CheckpointedAndNonCheckpointedRunsAgree) {
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  TrainOptions plain = dropout_run(model_path, 0.1);
  plain.prepare.use_gradient_checkpointing = false;
  TrainOptions reentrant = dropout_run(model_path, 0.1);
  reentrant.prepare.use_gradient_checkpointing = true;
  reentrant.prepare.use_reentrant = true;
  TrainOptions non_reentrant = reentrant;
  non_reentrant.prepare.use_reentrant = false;
  const auto plain_losses = run_training(plain, *communicator).losses;
  const auto reentrant_losses = run_training(reentrant, *communicator).losses;
  const auto non_reentrant_losses = run_training(non_reentrant, *communicator).losses;
  ASSERT_EQ(plain_losses.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(reentrant_losses.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(non_reentrant_losses.size(), static_cast<size_t>(kSteps));
  if (communicator->rank() == 0)
    std::printf("world %d, dropout 0.1: largest loss difference to no checkpointing: reentrant %.3g, "
                "non-reentrant %.3g\n",
                world_size(), largest_difference(reentrant_losses, plain_losses),
                largest_difference(non_reentrant_losses, plain_losses));
  for (size_t step = 0; step < plain_losses.size(); ++step) {
    EXPECT_NEAR(reentrant_losses[step], plain_losses[step], kLossTolerance) << "step " << step + 1;
    EXPECT_NEAR(non_reentrant_losses[step], plain_losses[step], kLossTolerance) << "step " << step + 1;
  }
}

}  // namespace
}  // namespace qlora::launcher
