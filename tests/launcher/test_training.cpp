// Single-process training: the loss falls on the synthetic model and the shipped text, the run
// folder holds a PEFT adapter, and the memory report matches the sizes of what it measures.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cluster/mpi_communicator.h"
#include "launcher/optimizer.h"
#include "launcher/train.h"
#include "common/json.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

TEST(Training, LossFallsByAtLeastThirtyPercentOverFiftySteps) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  TrainOptions options;
  options.model_path = testing_support::synthetic_store("tiny", 64, MPI_COMM_SELF);
  options.steps = 50;
  options.global_batch = 8;
  options.sequence_length = 64;
  options.out_dir = testing_support::shared_temp_dir(MPI_COMM_SELF) + "/run";
  options.quiet = true;
  const auto result = run_training(options, *communicator);
  ASSERT_EQ(result.losses.size(), 50u);
  const double first = result.losses.front();
  double last_five = 0;
  for (size_t i = 45; i < 50; ++i) last_five += result.losses[i] / 5.0;
  EXPECT_GT(first, 5.0) << "a random model starts near ln(512) or above";
  EXPECT_LT(last_five, 0.7 * first) << "first " << first << ", mean of the last five " << last_five;

  // The run folder: PEFT adapter (safetensors + config), metrics, memory report.
  auto adapter = shard::SafetensorsFile::open(options.out_dir + "/final/adapter_model.safetensors");
  const auto* lora_a = adapter->find("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
  ASSERT_NE(lora_a, nullptr);
  EXPECT_EQ(lora_a->shape, (std::vector<int64_t>{8, 256}));
  const auto* lora_b = adapter->find("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight");
  ASSERT_NE(lora_b, nullptr);
  EXPECT_EQ(lora_b->shape, (std::vector<int64_t>{256, 8}));
  EXPECT_EQ(adapter->entries().size(), 4u * 7u * 2u);
  std::ifstream config_file(options.out_dir + "/final/adapter_config.json");
  std::stringstream config_text;
  config_text << config_file.rdbuf();
  const auto config = parse_json(config_text.str(), "adapter_config.json");
  EXPECT_EQ(json_string(config, "peft_type", "adapter_config.json"), "LORA");
  EXPECT_EQ(json_int(config, "r", "adapter_config.json"), 8);
  EXPECT_EQ(json_double(config, "lora_alpha", "adapter_config.json"), 16.0);
  EXPECT_EQ(config.at("target_modules").size(), 7u);
  std::ifstream metrics(options.out_dir + "/metrics.jsonl");
  int step_lines = 0;
  int eval_lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto entry = parse_json(line, "metrics.jsonl");
    if (entry.contains("tokens_per_second")) ++step_lines;
    if (entry.contains("eval_loss")) {
      ++eval_lines;
      EXPECT_EQ(json_int(entry, "step", "metrics.jsonl"), 50);
      EXPECT_NEAR(json_double(entry, "eval_perplexity", "metrics.jsonl"),
                  std::exp(json_double(entry, "eval_loss", "metrics.jsonl")), 1e-6);
    }
  }
  EXPECT_EQ(step_lines, 50);
  EXPECT_EQ(eval_lines, 1) << "the held-out tail is evaluated once, at the end";
  ASSERT_EQ(result.eval_losses.size(), 1u);
  EXPECT_LT(result.eval_losses[0].second, first) << "held-out loss improves on the untrained loss";
  EXPECT_TRUE(std::filesystem::exists(options.out_dir + "/memory.json"));
}

TEST(Training, MemoryReportMatchesTheSizesOfWhatItMeasures) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  TrainOptions options;
  options.model_path = testing_support::synthetic_store("tiny", 64, MPI_COMM_SELF);
  options.steps = 2;
  options.global_batch = 4;
  options.sequence_length = 64;
  options.write_outputs = false;
  options.quiet = true;
  const auto result = run_training(options, *communicator);
  const auto& memory = result.memory;
  // tiny: 4 layers x (q 256x256 + k,v 128x256 + o 256x256 + gate,up 688x256 + down 256x688).
  const double quantized_elements = 4.0 * (2 * 65536 + 2 * 32768 + 3 * 176128);
  const double expected_shard = quantized_elements / 2 + quantized_elements / 64 * 4;
  EXPECT_NEAR(memory.quantized_weights / expected_shard, 1.0, 0.05);
  // fp32 after upcast: embeddings + LM head 2 x 512x256, norms 9 x 256.
  const double expected_replicated = 4.0 * (2 * 512 * 256 + 9 * 256);
  EXPECT_NEAR(memory.replicated_parameters / expected_replicated, 1.0, 0.05);
  // r=8 adapters on all seven projections: A [8, in] + B [out, 8] each, fp32.
  const double adapter_elements = 4.0 * 8 * ((256 + 256) + (256 + 128) * 2 + (256 + 256) + (256 + 688) * 3);
  EXPECT_NEAR(memory.adapters / (4 * adapter_elements), 1.0, 0.05);
  // Gradients: one per adapter element plus the flat reduction buffer; AdamW: two moments.
  EXPECT_NEAR(memory.gradients / (2 * 4 * adapter_elements), 1.0, 0.05);
  EXPECT_NEAR(memory.optimizer_state / (2 * 4 * adapter_elements), 1.0, 0.05);
  EXPECT_EQ(memory.gather_buffers, 0) << "a single rank gathers nothing";
  EXPECT_GT(memory.forward_activation_peak, 0);
  EXPECT_GE(memory.backward_activation_peak, memory.forward_activation_peak);
  EXPECT_GE(memory.peak_total, memory.quantized_weights + memory.replicated_parameters + memory.adapters);
}

}  // namespace
}  // namespace qlora::launcher

namespace qlora::launcher {
namespace {

// 20 steps straight and 10 + resume 10 give the same losses and bitwise the same adapters: the
// checkpoint carries the optimizer moments and step, and batches and dropout masks are functions of
// (seed, step), so nothing else needs restoring.
TEST(Training, ResumingFromACheckpointIsBitwiseIdenticalToNotStopping) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  const std::string folder = testing_support::shared_temp_dir(MPI_COMM_SELF);
  TrainOptions options;
  options.model_path = testing_support::synthetic_store("tiny", 64, MPI_COMM_SELF);
  options.global_batch = 4;
  options.sequence_length = 32;
  options.lora.dropout = 0.1;  // exercises the dropout RNG across the restart
  options.weight_decay = 0.01;
  options.quiet = true;
  options.eval_fraction = 0;
  auto adapters_of = [](model::LlamaModelImpl& model) {
    std::vector<torch::Tensor> copies;
    for (auto& parameter : model.lora_parameters()) copies.push_back(parameter.detach().clone());
    return copies;
  };
  std::vector<torch::Tensor> straight_adapters;
  std::vector<torch::Tensor> resumed_adapters;

  options.steps = 20;
  options.out_dir = folder + "/straight";
  const auto straight = run_training(options, *communicator, [&](model::LlamaModelImpl& model) {
    straight_adapters = adapters_of(model);
  });

  options.out_dir = folder + "/interrupted";
  options.steps = 10;
  const auto first_half = run_training(options, *communicator);
  ASSERT_TRUE(std::filesystem::exists(options.out_dir + "/checkpoints/step-10/trainer_state.h5"));
  options.steps = 20;
  options.resume = "auto";
  const auto second_half = run_training(options, *communicator, [&](model::LlamaModelImpl& model) {
    resumed_adapters = adapters_of(model);
  });
  EXPECT_EQ(second_half.first_step, 10);
  // The restored moments are in the memory report too (two fp32 copies of the adapters).
  EXPECT_GT(second_half.memory.optimizer_state, 0);
  EXPECT_EQ(second_half.memory.optimizer_state, 2 * second_half.memory.adapters);
  EXPECT_EQ(second_half.memory.optimizer_state, straight.memory.optimizer_state);
  std::vector<double> joined = first_half.losses;
  joined.insert(joined.end(), second_half.losses.begin(), second_half.losses.end());
  ASSERT_EQ(joined.size(), straight.losses.size());
  for (size_t i = 0; i < joined.size(); ++i) EXPECT_EQ(joined[i], straight.losses[i]) << "step " << i + 1;
  ASSERT_EQ(straight_adapters.size(), resumed_adapters.size());
  for (size_t i = 0; i < straight_adapters.size(); ++i)
    EXPECT_TRUE(torch::equal(straight_adapters[i], resumed_adapters[i])) << "adapter tensor " << i;
}

TEST(Training, GradientAccumulationMatchesOneLargeBatch) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  TrainOptions options;
  options.model_path = testing_support::synthetic_store("tiny", 64, MPI_COMM_SELF);
  options.global_batch = 8;
  options.sequence_length = 32;
  options.steps = 4;
  options.write_outputs = false;
  options.quiet = true;
  options.eval_fraction = 0;
  const auto whole = run_training(options, *communicator);
  options.micro_batch = 2;
  const auto accumulated = run_training(options, *communicator);
  ASSERT_EQ(whole.losses.size(), accumulated.losses.size());
  for (size_t i = 0; i < whole.losses.size(); ++i) EXPECT_NEAR(whole.losses[i], accumulated.losses[i], 1e-5) << i;
}

TEST(Training, LearningRateScheduleWarmsUpThenDecays) {
  Schedule schedule;
  schedule.kind = "cosine";
  schedule.peak = 1e-3;
  schedule.warmup_steps = 4;
  schedule.total_steps = 14;
  EXPECT_DOUBLE_EQ(schedule.at(0), 0.25e-3);
  EXPECT_DOUBLE_EQ(schedule.at(3), 1e-3);
  EXPECT_DOUBLE_EQ(schedule.at(4), 1e-3);
  EXPECT_NEAR(schedule.at(9), 0.5e-3, 1e-12);   // halfway through the decay
  EXPECT_NEAR(schedule.at(14), 0.0, 1e-12);
  schedule.kind = "constant";
  EXPECT_DOUBLE_EQ(schedule.at(10), 1e-3);
}

}  // namespace
}  // namespace qlora::launcher
