// DoRA training across ranks (run under mpirun -np 2): the magnitudes train, are all-reduced and
// checkpointed like lora_A and lora_B, so a 2-rank run's losses equal a 1-rank whole-batch run's
// within the LoRA world-size tolerance, with and without dropout; checkpointed blocks (which recompute
// the DoRA product and its weight norm in backward) give the losses of uncheckpointed ones; a resumed
// run continues bitwise where it stopped; and DoRA really differs from LoRA once B moves.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "cluster/mpi_communicator.h"
#include "launcher/train.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

constexpr int64_t kSteps = 8;
// test_training_mpi's and test_dropout_world_mpi's tolerance: float reductions in another order.
constexpr double kLossTolerance = 1e-5;

TrainOptions dora_run(const std::string& model_path, double dropout) {
  TrainOptions options;
  options.model_path = model_path;
  options.steps = kSteps;
  options.global_batch = 4;
  options.sequence_length = 32;
  options.learning_rate = 2e-3;
  options.lora.dropout = dropout;
  options.lora.use_dora = true;
  options.write_outputs = false;
  options.quiet = true;
  options.threads = 1;
  return options;
}

int rank_of_world() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

double largest_difference(const std::vector<double>& first, const std::vector<double>& second) {
  double largest = 0;
  for (size_t step = 0; step < std::min(first.size(), second.size()); ++step)
    largest = std::max(largest, std::fabs(first[step] - second[step]));
  return largest;
}

class DoraAcrossWorldSizes : public ::testing::TestWithParam<double> {};

TEST_P(DoraAcrossWorldSizes, LossMatchesASingleRankWholeBatchRun) {
  const double dropout = GetParam();
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto world_communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  TrainOptions split = dora_run(model_path, dropout);
  split.micro_batch = 1;
  const auto distributed = run_training(split, *world_communicator);
  if (rank_of_world() == 0) {
    auto self_communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
    const auto whole = run_training(dora_run(model_path, dropout), *self_communicator);
    ASSERT_EQ(whole.losses.size(), static_cast<size_t>(kSteps));
    ASSERT_EQ(distributed.losses.size(), static_cast<size_t>(kSteps));
    std::printf("DoRA dropout %g, world %d in micro-batches of 1 vs 1 rank whole batch: largest loss difference %.3g\n",
                dropout, world_communicator->size(), largest_difference(distributed.losses, whole.losses));
    for (size_t step = 0; step < whole.losses.size(); ++step)
      EXPECT_NEAR(distributed.losses[step], whole.losses[step], kLossTolerance) << "step " << step + 1;
    EXPECT_LT(whole.losses.back(), whole.losses.front());
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Non-reentrant checkpointing passes each block's adapters, magnitudes included, as inputs of its
// checkpoint function; a missing one would get no gradient and the losses would part.
TEST_P(DoraAcrossWorldSizes, CheckpointedAndNonCheckpointedRunsAgree) {
  const double dropout = GetParam();
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  TrainOptions plain = dora_run(model_path, dropout);
  plain.prepare.use_gradient_checkpointing = false;
  TrainOptions reentrant = plain;
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
    std::printf("DoRA dropout %g: largest loss difference to no checkpointing: reentrant %.3g, non-reentrant %.3g\n",
                dropout, largest_difference(reentrant_losses, plain_losses),
                largest_difference(non_reentrant_losses, plain_losses));
  for (size_t step = 0; step < plain_losses.size(); ++step) {
    EXPECT_NEAR(reentrant_losses[step], plain_losses[step], kLossTolerance) << "step " << step + 1;
    EXPECT_NEAR(non_reentrant_losses[step], plain_losses[step], kLossTolerance) << "step " << step + 1;
  }
}

INSTANTIATE_TEST_SUITE_P(Dropout, DoraAcrossWorldSizes, ::testing::Values(0.0, 0.1),
                         [](const auto& info) { return std::string(info.param > 0 ? "dropout" : "no_dropout"); });

// B starts at zero and the magnitudes at the weights' row norms, so the first step's loss is the
// base model's, as with LoRA; from then on the magnitudes and the normalisation change the network.
TEST(DoraTraining, DiffersFromLoraFromTheSecondStepOn) {
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  TrainOptions lora = dora_run(model_path, 0.0);
  lora.lora.use_dora = false;
  const auto lora_losses = run_training(lora, *communicator).losses;
  const auto dora_losses = run_training(dora_run(model_path, 0.0), *communicator).losses;
  ASSERT_EQ(lora_losses.size(), static_cast<size_t>(kSteps));
  ASSERT_EQ(dora_losses.size(), static_cast<size_t>(kSteps));
  EXPECT_NEAR(dora_losses[0], lora_losses[0], kLossTolerance);
  std::vector<double> later_lora(lora_losses.begin() + 1, lora_losses.end());
  std::vector<double> later_dora(dora_losses.begin() + 1, dora_losses.end());
  const double difference = largest_difference(later_lora, later_dora);
  if (communicator->rank() == 0) std::printf("DoRA vs LoRA largest loss difference over steps 2-%lld: %.3g\n",
                                             static_cast<long long>(kSteps), difference);
  EXPECT_GT(difference, 100 * kLossTolerance);
}

// The checkpoint holds the magnitudes and their AdamW moments: 8 steps straight equal 4 + resume 4.
TEST(DoraTraining, ResumingOnTwoRanksContinuesBitwise) {
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const std::string folder = testing_support::shared_temp_dir();
  TrainOptions options = dora_run(model_path, 0.1);
  options.write_outputs = true;
  options.eval_fraction = 0;
  options.out_dir = folder + "/dora-straight";
  const auto straight = run_training(options, *communicator);
  options.out_dir = folder + "/dora-interrupted";
  options.steps = kSteps / 2;
  const auto first_half = run_training(options, *communicator);
  MPI_Barrier(MPI_COMM_WORLD);  // rank 0 writes the checkpoint after the others have returned
  ASSERT_TRUE(std::filesystem::exists(options.out_dir + "/checkpoints/step-4/adapter_model.safetensors"));
  options.steps = kSteps;
  options.resume = "auto";
  const auto second_half = run_training(options, *communicator);
  EXPECT_EQ(second_half.first_step, kSteps / 2);
  std::vector<double> joined = first_half.losses;
  joined.insert(joined.end(), second_half.losses.begin(), second_half.losses.end());
  ASSERT_EQ(joined.size(), straight.losses.size());
  for (size_t i = 0; i < joined.size(); ++i) EXPECT_EQ(joined[i], straight.losses[i]) << "step " << i + 1;
}

}  // namespace
}  // namespace qlora::launcher
