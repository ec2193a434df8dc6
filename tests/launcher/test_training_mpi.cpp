// Multi-rank training (run under mpirun -np 2, 3 and 4): adapters stay bitwise identical across
// ranks, the loss equals a 1-rank run over the same global batches, and the frozen base is untouched.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstring>

#include "cluster/mpi_communicator.h"
#include "kernels/nf4.h"
#include "launcher/errors.h"
#include "launcher/train.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

TrainOptions small_run(const std::string& model_path, int64_t steps) {
  TrainOptions options;
  options.model_path = model_path;
  options.steps = steps;
  options.global_batch = 12;   // divides over 1, 2, 3 and 4 ranks
  options.sequence_length = 32;
  options.learning_rate = 2e-3;
  options.write_outputs = false;
  options.quiet = true;
  options.threads = 1;
  return options;
}

// Flattened copy of every adapter tensor, in name order.
std::vector<float> flatten_adapters(model::LlamaModelImpl& model) {
  std::vector<float> flat;
  for (const auto& [name, parameter] : model.named_lora_parameters()) {
    auto contiguous = parameter.detach().contiguous();
    flat.insert(flat.end(), contiguous.data_ptr<float>(), contiguous.data_ptr<float>() + contiguous.numel());
  }
  return flat;
}

TEST(TrainingAcrossRanks, AdaptersAreBitwiseIdenticalOnEveryRankAfterOneStep) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const std::string model_path = testing_support::synthetic_store("tiny");
  std::vector<float> adapters;
  bool any_nonzero_b = false;
  run_training(small_run(model_path, 1), *communicator, [&](model::LlamaModelImpl& model) {
    adapters = flatten_adapters(model);
    for (const auto& [name, parameter] : model.named_lora_parameters())
      if (name.find("lora_B") != std::string::npos && parameter.abs().sum().item<float>() > 0) any_nonzero_b = true;
  });
  EXPECT_TRUE(any_nonzero_b) << "one step must move the zero-initialised B matrices";
  std::vector<float> from_rank0 = adapters;
  MPI_Bcast(from_rank0.data(), static_cast<int>(from_rank0.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
  EXPECT_EQ(std::memcmp(from_rank0.data(), adapters.data(), adapters.size() * sizeof(float)), 0)
      << "adapters differ from rank 0's";
}

TEST(TrainingAcrossRanks, LossMatchesASingleRankRunOverTheSameGlobalBatchesForTenSteps) {
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto world_communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const auto distributed = run_training(small_run(model_path, 10), *world_communicator);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    auto self_communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
    const auto single = run_training(small_run(model_path, 10), *self_communicator);
    ASSERT_EQ(single.losses.size(), 10u);
    ASSERT_EQ(distributed.losses.size(), 10u);
    double largest_difference = 0;
    for (size_t step = 0; step < 10; ++step)
      largest_difference = std::max(largest_difference, std::fabs(distributed.losses[step] - single.losses[step]));
    int world = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    std::printf("world %d vs 1 rank over 10 steps: largest loss difference %.3g\n", world, largest_difference);
    for (size_t step = 0; step < 10; ++step)
      EXPECT_NEAR(distributed.losses[step], single.losses[step], 1e-5) << "step " << step + 1;
    EXPECT_LT(single.losses[9], single.losses[0]);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(TrainingAcrossRanks, FrozenBaseStaysBitwiseUnchanged) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const std::string model_path = testing_support::synthetic_store("tiny");
  auto store = shard::ModelStore::open(model_path);
  run_training(small_run(model_path, 3), *communicator, [&](model::LlamaModelImpl& model) {
    const int rank = communicator->rank();
    // The 4-bit shard this rank holds equals the store's bytes for its ranges.
    for (size_t block = 0; block < model.block_count(); ++block) {
      const auto& layout = model.gatherer().layout(block);
      const auto& segment = model.gatherer().local_segment(block);
      const uint8_t* base = segment.data_ptr<uint8_t>();
      for (size_t t = 0; t < layout.tensors().size(); ++t) {
        const auto& range = layout.range(rank, t);
        std::vector<uint8_t> codes(range.bytes());
        std::vector<float> absmax(range.blocks());
        store->read_codes(layout.tensors()[t].name, range, codes.data());
        store->read_absmax(layout.tensors()[t].name, range, absmax.data());
        EXPECT_EQ(std::memcmp(codes.data(), base + layout.codes_offset(rank, t), codes.size()), 0)
            << layout.tensors()[t].name;
        EXPECT_EQ(std::memcmp(absmax.data(), base + layout.absmax_offset(rank, t), absmax.size() * 4), 0)
            << layout.tensors()[t].name;
      }
    }
    // Replicated parameters, and this rank's vocabulary rows of the embedding and LM head, equal the
    // stored bf16 values, upcast, and never required grad.
    for (const auto& [name, parameter] : model.named_model_parameters()) {
      if (name.rfind("base_model.", 0) == 0) continue;  // adapters
      EXPECT_FALSE(parameter.requires_grad()) << name;
      EXPECT_EQ(parameter.scalar_type(), torch::kFloat) << name;
      auto stored = torch::empty(store->tensor(name).shape, torch::kBFloat16);
      store->read_dense(name, stored.data_ptr());
      if (name == "model.embed_tokens.weight" || name == "lm_head.weight")
        stored = stored.narrow(0, model.vocab_range().begin, model.vocab_range().rows());
      EXPECT_TRUE(torch::equal(parameter, stored.to(torch::kFloat))) << name;
    }
  });
}

TEST(TrainingAcrossRanks, SmallOverlappedBucketsGiveBitwiseTheSameAdaptersAsOneBucket) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const std::string model_path = testing_support::synthetic_store("tiny");
  std::vector<float> adapters[2];
  std::vector<double> losses[2];
  for (int variant = 0; variant < 2; ++variant) {
    TrainOptions options = small_run(model_path, 3);
    if (variant == 1) {
      options.bucket_mb = 0.02;  // ~20 buckets for the tiny model's 0.56 MiB of adapters
      options.overlap_reduce = true;
    } else {
      options.bucket_mb = 1024;
      options.overlap_reduce = false;
    }
    losses[variant] = run_training(options, *communicator, [&](model::LlamaModelImpl& model) {
                        adapters[variant] = flatten_adapters(model);
                      }).losses;
  }
  EXPECT_EQ(losses[0], losses[1]);
  ASSERT_EQ(adapters[0].size(), adapters[1].size());
  EXPECT_EQ(std::memcmp(adapters[0].data(), adapters[1].data(), adapters[0].size() * sizeof(float)), 0);
}

TEST(TrainingAcrossRanks, DriftingAdapterReplicasAreDetectedOnEveryRank) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const std::string model_path = testing_support::synthetic_store("tiny");
  run_training(small_run(model_path, 1), *communicator, [&](model::LlamaModelImpl& model) {
    EXPECT_NO_THROW(check_adapters_agree(*communicator, model, 1));
    if (communicator->rank() == communicator->size() - 1) {
      torch::NoGradGuard no_grad;
      model.lora_parameters()[3].view({-1})[0] += 1e-6f;
    }
    try {
      check_adapters_agree(*communicator, model, 2);
      ADD_FAILURE() << "drift went unnoticed";
    } catch (const JobError& error) {
      EXPECT_NE(std::string(error.what()).find("rank(s) " + std::to_string(communicator->size() - 1)),
                std::string::npos)
          << error.what();
    }
  });
}

}  // namespace
}  // namespace qlora::launcher
