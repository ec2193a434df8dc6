// The memory planner: preset shapes against published parameter counts, stored sizes against the
// store's own arithmetic, and planned per-rank peaks against the counting allocator's measurements
// of real training runs at world sizes 1, 2 and 4 and two sequence lengths.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "launcher/errors.h"
#include "launcher/plan.h"
#include "common/json.h"
#include "tests/support/test_support.h"

namespace qlora {
namespace {

using launcher::make_plan;
using launcher::PlanJob;
using launcher::plan_preset;

TEST(Plan, PresetsHaveThePublishedParameterCounts) {
  EXPECT_EQ(plan_preset("llama-2-7b").parameter_count(), 6738415616);
  EXPECT_EQ(plan_preset("llama-2-70b").parameter_count(), 68976648192);
  EXPECT_EQ(plan_preset("llama-3-8b").parameter_count(), 8030261248);
  EXPECT_EQ(plan_preset("llama-3-70b").parameter_count(), 70553706496);
  EXPECT_EQ(plan_preset("llama-3.1-405b").parameter_count(), 405853388800);
  EXPECT_EQ(plan_preset("mistral-7b").parameter_count(), 7241732096);
  EXPECT_THROW(plan_preset("llama-9-1t"), UserError);
}

TEST(Plan, SeventyBillionStoreSizesMatchTheFacts) {
  // FACTS: 68.45 B linear parameters -> NF4 codes 34.2 GB + absmax 4.3 GB (1.1 GB double-quantized).
  PlanJob job;
  job.world = 8;
  const auto config = plan_preset("llama-2-70b");
  const auto plain = make_plan("llama-2-70b", config, job);
  EXPECT_NEAR(static_cast<double>(plain.quantized_store_bytes) / 1e9, 34.2 + 4.3, 0.1);
  job.double_quant = true;
  const auto doubled = make_plan("llama-2-70b", config, job);
  EXPECT_NEAR(static_cast<double>(doubled.quantized_store_bytes) / 1e9, 34.2 + 1.1, 0.1);
  // Every rank holds about 1/N of it.
  for (const auto& rank : doubled.ranks)
    EXPECT_NEAR(static_cast<double>(rank.quantized_weights), static_cast<double>(doubled.quantized_store_bytes) / 8.0,
                0.001 * static_cast<double>(doubled.quantized_store_bytes) / 8.0);
}

TEST(Plan, MoreRanksLessWeightMoreFitAndCheckpointingSaves) {
  const auto config = plan_preset("llama-3-70b");
  PlanJob job;
  job.device_memory = 80ll << 30;
  job.compute_dtype = "bf16";
  job.sequence_length = 4096;
  job.world = 1;
  const auto one = make_plan("llama-3-70b", config, job);
  job.world = 8;
  const auto eight = make_plan("llama-3-70b", config, job);
  EXPECT_LT(eight.ranks[0].quantized_weights * 7, one.ranks[0].quantized_weights);
  EXPECT_TRUE(eight.fits);
  job.checkpointing = false;
  const auto full = make_plan("llama-3-70b", config, job);
  EXPECT_GT(full.ranks[0].activations_full, 4 * eight.ranks[0].activations_checkpointed);
  EXPECT_FALSE(full.fits);
  // The fit search's answer is consistent with the planner at that point and one past it.
  job.checkpointing = true;
  for (const auto& point : launcher::fit_search("llama-3-70b", config, job)) {
    if (point.micro_batch == 0) continue;
    PlanJob trial = job;
    trial.sequence_length = point.sequence_length;
    trial.micro_batch = point.micro_batch;
    EXPECT_TRUE(make_plan("llama-3-70b", config, trial).fits) << point.sequence_length;
    trial.micro_batch += 1;
    EXPECT_FALSE(make_plan("llama-3-70b", config, trial).fits) << point.sequence_length;
  }
}

TEST(Plan, KeptProjectionsMoveFromShardsToReplicatedFp32) {
  const auto config = plan_preset("llama-2-7b");
  PlanJob job;
  job.world = 4;
  const auto all_quantized = make_plan("llama-2-7b", config, job);
  job.keep_unquantized = {"down_proj"};
  const auto kept = make_plan("llama-2-7b", config, job);
  const double down_elements = 32.0 * 4096 * 11008;
  // NF4 blocksize 64: 0.5 + 4/64 bytes per element, a quarter of it per rank.
  EXPECT_NEAR(static_cast<double>(all_quantized.ranks[0].quantized_weights - kept.ranks[0].quantized_weights),
              down_elements * (0.5 + 4.0 / 64) / 4, 1e3);
  EXPECT_EQ(kept.ranks[0].replicated_parameters - all_quantized.ranks[0].replicated_parameters,
            static_cast<int64_t>(down_elements) * 4);
  job.keep_unquantized = {"model.layers.3.mlp.down_proj"};
  EXPECT_THROW(make_plan("llama-2-7b", config, job), UserError);
}

TEST(Plan, EmbeddingsAndLmHeadAreEachRanksVocabularySlice) {
  // Llama-3-70B: 128256 x 8192, untied, fp32 after preparation: 8.4 GB on one rank.
  const auto config = plan_preset("llama-3-70b");
  PlanJob job;
  const auto one = make_plan("llama-3-70b", config, job);
  EXPECT_EQ(one.ranks[0].embeddings, int64_t{128256} * 8192 * 4 * 2);
  EXPECT_EQ(one.vocab_parallel_bytes_per_step, 0);
  // Five ranks: 128256 = 5 x 25651 + 1, so rank 0 holds one row more.
  job.world = 5;
  const auto five = make_plan("llama-3-70b", config, job);
  EXPECT_EQ(five.ranks[0].embeddings, int64_t{25652} * 8192 * 4 * 2);
  for (int rank = 1; rank < 5; ++rank) EXPECT_EQ(five.ranks[rank].embeddings, int64_t{25651} * 8192 * 4 * 2);
  EXPECT_LT(five.peak_bytes, one.peak_bytes);
  // The lookup and the loss move every rank's hidden states: (N-1) x tokens x hidden fp32 gathered
  // plus two ring all-reduces over N x tokens rows, and small per-row terms.
  const double tokens = static_cast<double>(job.micro_batch * job.sequence_length);
  EXPECT_NEAR(static_cast<double>(five.vocab_parallel_bytes_per_step), 4 * tokens * 8192 * 4 * (1 + 4),
              4 * tokens * 64);
  // More ranks than vocabulary rows cannot be planned.
  auto small = config;
  small.vocab_size = 4;
  job.world = 5;
  EXPECT_THROW(make_plan("small", small, job), UserError);
}

TEST(Plan, ByteSizes) {
  EXPECT_EQ(launcher::parse_byte_size("80GiB", "--device-memory"), 80ll << 30);
  EXPECT_EQ(launcher::parse_byte_size("24GB", "--device-memory"), 24000000000ll);
  EXPECT_EQ(launcher::parse_byte_size("1.5GiB", "--device-memory"), 3ll << 29);
  EXPECT_EQ(launcher::parse_byte_size("4096", "--device-memory"), 4096);
  EXPECT_THROW(launcher::parse_byte_size("80 parsecs", "--device-memory"), UserError);
}

Json read_json(const std::string& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return parse_json(text.str(), path);
}

// A model where weights, embeddings and activations all matter: GQA, untied head, 6 layers.
std::string planner_store(const std::string& folder) {
  const std::string config_path = folder + "/planner_config.json";
  std::ofstream(config_path) << R"({"model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
    "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16"})";
  const std::string store = folder + "/planner.h5";
  std::string output;
  const int code = testing_support::run_command(
      testing_support::qlora_binary() + " convert --synthetic " + config_path + " --out " + store, &output);
  EXPECT_EQ(code, 0) << output;
  return store;
}

struct Measured {
  int world;
  int64_t sequence_length;
  bool dora = false;  // --use-dora: magnitudes and DoRA's kept products
};

class PlanAgainstMeasurement : public ::testing::TestWithParam<Measured> {};

TEST_P(PlanAgainstMeasurement, PeakPerRankWithinTenPercent) {
  const auto [world, sequence_length, dora] = GetParam();
  const std::string folder = testing_support::shared_temp_dir(MPI_COMM_SELF);
  static std::string store;
  if (store.empty()) store = planner_store(folder);
  const int64_t micro_batch = 2;
  const std::string run = folder + "/plan-run-" + std::to_string(world) + "-" + std::to_string(sequence_length);
  std::string output;
  std::ostringstream command;
  command << "mpirun -np " << world << " --oversubscribe --allow-run-as-root " << testing_support::qlora_binary()
          << " train --model " << store << " --steps 2 --seq-len " << sequence_length << " --global-batch "
          << micro_batch * world << " --lora-r 8 --eval-fraction 0 --progress lines --out " << run << (dora ? "-dora --use-dora" : "");
  ASSERT_EQ(testing_support::run_command(command.str(), &output), 0) << output;
  const auto measured = read_json(run + (dora ? "-dora" : "") + "/memory.json").at("ranks");
  ASSERT_EQ(static_cast<int>(measured.size()), world);

  PlanJob job;
  job.lora.use_dora = dora;
  job.world = world;
  job.micro_batch = micro_batch;
  job.sequence_length = sequence_length;
  job.lora.r = 8;
  job.source_dtype = "bfloat16";
  const auto plan = make_plan(store, shard::read_config_file(folder + "/planner_config.json"), job);
  for (int rank = 0; rank < world; ++rank) {
    const auto& actual = measured.at(static_cast<size_t>(rank));
    const auto& planned = plan.ranks[static_cast<size_t>(rank)];
    const double peak = static_cast<double>(json_int(actual, "peak_total_bytes", "memory.json"));
    EXPECT_NEAR(static_cast<double>(planned.peak), peak, 0.10 * peak)
        << "rank " << rank << " of " << world << ", seq-len " << sequence_length;
    // Stored state is arithmetic, not estimation: tight bounds.
    EXPECT_NEAR(static_cast<double>(planned.quantized_weights),
                static_cast<double>(json_int(actual, "quantized_weights_bytes", "memory.json")), 64.0 * 7 * 6);
    EXPECT_EQ(planned.adapters, json_int(actual, "adapters_bytes", "memory.json"));
    EXPECT_EQ(planned.optimizer_state, json_int(actual, "optimizer_state_bytes", "memory.json"));
    EXPECT_EQ(planned.gather_buffers, json_int(actual, "gather_buffers_bytes", "memory.json"));
    const double forward = static_cast<double>(json_int(actual, "forward_activation_peak_bytes", "memory.json"));
    const double backward = static_cast<double>(json_int(actual, "backward_activation_peak_bytes", "memory.json"));
    EXPECT_NEAR(static_cast<double>(planned.forward_activations), forward, 0.15 * forward);
    EXPECT_NEAR(static_cast<double>(planned.backward_activations), backward, 0.15 * backward);
  }
}

INSTANTIATE_TEST_SUITE_P(WorldsAndLengths, PlanAgainstMeasurement,
                         ::testing::Values(Measured{1, 128}, Measured{2, 128}, Measured{4, 128}, Measured{1, 512},
                                           Measured{2, 512}, Measured{4, 512}, Measured{1, 512, true},
                                           Measured{2, 128, true}),
                         [](const auto& info) {
                           return "world" + std::to_string(info.param.world) + "_seq" +
                                  std::to_string(info.param.sequence_length) + (info.param.dora ? "_dora" : "");
                         });

TEST(PlanCommand, TableJsonAndErrors) {
  std::string output;
  const std::string binary = testing_support::qlora_binary();
  ASSERT_EQ(testing_support::run_command(binary + " plan --model llama-2-70b --world 8 --device-memory 80GiB "
                                                  "--seq-len 4096 --compute-dtype bf16 --json",
                                         &output),
            0)
      << output;
  const auto json = parse_json(output, "qlora plan --json");
  EXPECT_TRUE(json_bool(json, "fits", "plan"));
  EXPECT_EQ(json.at("per_rank").size(), 8u);
  EXPECT_GT(json_int(json, "communication_bytes_per_step", "plan"), 0);

  ASSERT_EQ(testing_support::run_command(binary + " plan --model llama-2-70b --world 2 --device-memory 24GiB --seq-len 2048 "
                                                  "--global-batch 2 --fit",
                                         &output),
            0)
      << output;
  EXPECT_NE(output.find("DOES NOT FIT"), std::string::npos) << output;  // 2 x 24 GB needs offload
  EXPECT_NE(output.find("largest micro-batch"), std::string::npos) << output;

  EXPECT_EQ(testing_support::run_command(binary + " plan --model llama-9-1t", &output), 2);
  EXPECT_NE(output.find("known presets"), std::string::npos) << output;
  EXPECT_EQ(testing_support::run_command(binary + " plan --model llama-2-7b --device-memory lots", &output), 2);
  EXPECT_NE(output.find("--device-memory"), std::string::npos) << output;
  EXPECT_EQ(testing_support::run_command(binary + " plan --model llama-2-7b --fit", &output), 2);
}

Json plan_of(const std::string& arguments) {
  std::string output;
  EXPECT_EQ(testing_support::run_command(testing_support::qlora_binary() + " plan " + arguments + " --json", &output), 0)
      << output;
  return parse_json(output, "qlora plan " + arguments);
}

TEST(PlanCommand, DefaultsAndMeaningsAreTrains) {
  // No --micro-batch: a rank's whole share of the default global batch of 8 at once, 128 tokens, r 8.
  const Json one = plan_of("--model llama-2-7b").at("job");
  EXPECT_EQ(json_int(one, "global_batch", "job"), 8);
  EXPECT_EQ(json_int(one, "micro_batch", "job"), 8);
  EXPECT_EQ(json_int(one, "accumulation_steps", "job"), 1);
  EXPECT_EQ(json_int(one, "sequence_length", "job"), 128);
  EXPECT_EQ(json_int(one, "lora_r", "job"), 8);
  EXPECT_EQ(json_int(one, "gather_slots", "job"), 2);
  // Four ranks, micro-batch 1: 8 / 4 = 2 sequences a rank, accumulated over 2 forwards.
  const Json four = plan_of("--model llama-2-7b --world 4 --micro-batch 1").at("job");
  EXPECT_EQ(json_int(four, "micro_batch", "job"), 1);
  EXPECT_EQ(json_int(four, "accumulation_steps", "job"), 2);
  // Batches train refuses, plan refuses with train's words.
  std::string output;
  const std::string plan = testing_support::qlora_binary() + " plan --model llama-2-7b ";
  EXPECT_EQ(testing_support::run_command(plan + "--world 3", &output), 2) << output;
  EXPECT_NE(output.find("--global-batch 8 does not divide over 3 ranks"), std::string::npos) << output;
  EXPECT_EQ(testing_support::run_command(plan + "--world 2 --micro-batch 3", &output), 2) << output;
  EXPECT_NE(output.find("--micro-batch 3 does not divide the 4 sequences each rank gets per step"), std::string::npos)
      << output;
}

TEST(PlanCommand, AccumulationStepsSetsTheGlobalBatchOrMustAgreeWithIt) {
  const Json derived = plan_of("--model llama-2-7b --world 4 --micro-batch 2 --accumulation-steps 3").at("job");
  EXPECT_EQ(json_int(derived, "global_batch", "job"), 24);
  EXPECT_EQ(json_int(derived, "micro_batch", "job"), 2);
  EXPECT_EQ(json_int(derived, "accumulation_steps", "job"), 3);
  const Json agreeing =
      plan_of("--model llama-2-7b --world 4 --global-batch 24 --micro-batch 2 --accumulation-steps 3").at("job");
  EXPECT_EQ(json_int(agreeing, "accumulation_steps", "job"), 3);
  std::string output;
  const std::string plan = testing_support::qlora_binary() + " plan --model llama-2-7b --world 4 ";
  EXPECT_EQ(testing_support::run_command(plan + "--global-batch 16 --micro-batch 2 --accumulation-steps 3", &output), 2)
      << output;
  EXPECT_NE(output.find("--accumulation-steps 3 disagrees with --global-batch 16 / 4 ranks / --micro-batch 2 = 2"),
            std::string::npos)
      << output;
  EXPECT_EQ(testing_support::run_command(plan + "--accumulation-steps 3", &output), 2) << output;
  EXPECT_NE(output.find("--accumulation-steps needs --micro-batch"), std::string::npos) << output;
}

// `qlora plan` given the arguments `qlora train` ran with plans that job: the same batch split,
// adapters, gather slots, and the activations of that micro-batch.
TEST(PlanCommand, TrainsArgumentsPlanTheJobTrainRuns) {
  const std::string folder = testing_support::shared_temp_dir(MPI_COMM_SELF);
  const std::string store = testing_support::synthetic_store("tiny", 64, MPI_COMM_SELF);
  // Every shared option away from its default.
  const std::string job = " --model " + store +
                          " --seq-len 64 --global-batch 8 --micro-batch 2 --lora-r 4 --lora-alpha 8 --lora-dropout 0.1"
                          " --lora-targets q_proj,v_proj,down_proj --lora-rank-pattern down_proj=8 --lora-init gaussian"
                          " --use-rslora --checkpointing non-reentrant --keep-embeddings-16bit --gather-slots 3";
  const std::string run = folder + "/plan-as-train";
  std::string output;
  ASSERT_EQ(testing_support::run_command("mpirun -np 2 --oversubscribe --allow-run-as-root " +
                                             testing_support::qlora_binary() + " train" + job +
                                             " --steps 1 --eval-fraction 0 --progress lines --out " + run,
                                         &output),
            0)
      << output;
  const Json plan = plan_of(job + " --world 2");
  const Json& planned = plan.at("job");
  const Json trained = read_json(run + "/config.json");  // train's resolved options
  const std::string label = "config.json";
  const int64_t world = 2;
  EXPECT_EQ(json_int(planned, "world", "job"), world);
  EXPECT_EQ(json_int(planned, "global_batch", "job"), json_int(trained, "global-batch", label));
  EXPECT_EQ(json_int(planned, "micro_batch", "job"), json_int(trained, "micro-batch", label));
  EXPECT_EQ(json_int(planned, "accumulation_steps", "job"),
            json_int(trained, "global-batch", label) / world / json_int(trained, "micro-batch", label));
  EXPECT_EQ(json_int(planned, "accumulation_steps", "job"), 2);
  EXPECT_EQ(json_int(planned, "sequence_length", "job"), json_int(trained, "seq-len", label));
  EXPECT_EQ(json_int(planned, "lora_r", "job"), json_int(trained, "lora-r", label));
  EXPECT_EQ(json_double(planned, "lora_dropout", "job"), json_double(trained, "lora-dropout", label));
  EXPECT_EQ(planned.at("lora_targets"), Json({"q_proj", "v_proj", "down_proj"}));
  EXPECT_EQ(json_int(planned.at("lora_rank_pattern"), "down_proj", "job"), 8);
  EXPECT_EQ(json_int(planned, "gather_slots", "job"), json_int(trained, "gather-slots", label));
  EXPECT_TRUE(json_bool(planned, "checkpointing", "job"));
  EXPECT_EQ(json_bool(planned, "embeddings_16bit", "job"), json_bool(trained, "keep-embeddings-16bit", label));

  // What train measured of that job: the adapter shapes (targets, rank, rank pattern), optimizer
  // state and gather pool exactly; the activation peak is that of 2-sequence forwards.
  const Json measured = read_json(run + "/memory.json").at("ranks");
  ASSERT_EQ(measured.size(), 2u);
  for (size_t rank = 0; rank < 2; ++rank) {
    const Json& actual = measured.at(rank);
    const Json& predicted = plan.at("per_rank").at(rank);
    EXPECT_EQ(json_int(predicted, "adapters", "plan"), json_int(actual, "adapters_bytes", "memory.json")) << rank;
    EXPECT_EQ(json_int(predicted, "optimizer_state", "plan"), json_int(actual, "optimizer_state_bytes", "memory.json"));
    EXPECT_EQ(json_int(predicted, "gather_buffers", "plan"), json_int(actual, "gather_buffers_bytes", "memory.json"));
    // Planned / measured is 1.11 here; planning 4-sequence forwards would give 2.07.
    const double activations =
        static_cast<double>(std::max(json_int(actual, "forward_activation_peak_bytes", "memory.json"),
                                     json_int(actual, "backward_activation_peak_bytes", "memory.json")));
    const double planned_activations = static_cast<double>(std::max(
        json_int(predicted, "forward_activations", "plan"), json_int(predicted, "backward_activations", "plan")));
    EXPECT_NEAR(planned_activations, activations, 0.2 * activations) << rank;
  }
}

}  // namespace
}  // namespace qlora
