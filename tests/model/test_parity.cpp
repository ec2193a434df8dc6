// Parity with transformers + PEFT on golden fixtures (scripts/make_model_fixtures.py): logits, loss
// and every LoRA gradient of three small configurations (Llama 2 style; Llama 3 style with llama3
// rope scaling and tied embeddings; Qwen2 with q/k/v biases), both with the 16-bit weights as they
// are and with the decoder linears through NF4, within 1e-4 relative in fp32.
#include <gtest/gtest.h>
#include <mpi.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cluster/mpi_communicator.h"
#include "model/chunked_loss.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora::model {
namespace {

std::string fixture_folder(const std::string& variant) {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/fixtures/model/" + variant;
}

torch::Tensor read_tensor(const shard::SafetensorsFile& file, const std::string& name) {
  const auto& entry = file.at(name);
  const auto dtype = entry.dtype == kernels::DType::i64 ? torch::kLong : torch::kFloat;
  auto tensor = torch::empty(entry.shape, dtype);
  std::memcpy(tensor.data_ptr(), file.data(entry), entry.end - entry.begin);
  return tensor;
}

// Largest absolute difference relative to the largest magnitude of the reference.
double relative_error(const torch::Tensor& actual, const torch::Tensor& expected) {
  return (actual - expected).abs().max().item<double>() / expected.abs().max().item<double>();
}

struct Outcome {
  double logits_error = 0;
  double loss_error = 0;
  double worst_gradient_error = 0;
  std::string worst_gradient;
};

Outcome compare(const std::string& variant, bool quantize) {
  const std::string folder = fixture_folder(variant);
  const std::string store_path = testing_support::shared_temp_dir(MPI_COMM_SELF) + "/" + variant +
                                 (quantize ? "-nf4.h5" : "-dense.h5");
  shard::ConvertOptions options;
  options.quantize = quantize;
  shard::convert_hf_directory(folder + "/hf", store_path, options);
  auto store = shard::ModelStore::open(store_path);
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  LlamaModel model(*store, *communicator);
  prepare::prepare_model_for_kbit_training(*model, prepare::PrepareOptions{});
  LoraConfig lora;
  lora.r = 4;
  lora.alpha = 8;
  model->add_lora(lora, 1);
  auto adapters = shard::SafetensorsFile::open(folder + "/adapter.safetensors");
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, parameter] : model->named_lora_parameters()) parameter.copy_(read_tensor(*adapters, name));
  }
  model->train();
  auto expected = shard::SafetensorsFile::open(folder + "/expected.safetensors");
  const std::string kind = quantize ? "nf4" : "dense";
  const auto input_ids = read_tensor(*expected, "input_ids");
  auto logits = model->forward(input_ids);
  // transformers' causal LM loss: logits at t predict token t+1.
  const int64_t vocab = logits.size(-1);
  auto loss = torch::nn::functional::cross_entropy(logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, vocab}),
                                                   input_ids.narrow(1, 1, input_ids.size(1) - 1).reshape({-1}));
  loss.backward();
  Outcome outcome;
  outcome.logits_error = relative_error(logits.detach(), read_tensor(*expected, "logits_" + kind));
  outcome.loss_error = relative_error(loss.detach().reshape({1}), read_tensor(*expected, "loss_" + kind));
  for (auto& [name, parameter] : model->named_lora_parameters()) {
    const double error = relative_error(parameter.grad(), read_tensor(*expected, "grad_" + kind + "." + name));
    if (error >= outcome.worst_gradient_error) {
      outcome.worst_gradient_error = error;
      outcome.worst_gradient = name;
    }
  }
  std::printf("%-12s %-5s logits %.2e  loss %.2e  worst gradient %.2e (%s)\n", variant.c_str(), kind.c_str(),
              outcome.logits_error, outcome.loss_error, outcome.worst_gradient_error, outcome.worst_gradient.c_str());
  return outcome;
}

class Parity : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(Parity, LogitsLossAndLoraGradientsMatchTransformersAndPeft) {
  const auto& [variant, quantize] = GetParam();
  const Outcome outcome = compare(variant, quantize);
  EXPECT_LT(outcome.logits_error, 1e-4);
  EXPECT_LT(outcome.loss_error, 1e-4);
  EXPECT_LT(outcome.worst_gradient_error, 1e-4) << outcome.worst_gradient;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity,
                         ::testing::Combine(::testing::Values("llama", "llama3_tied", "qwen2"),
                                            ::testing::Values(false, true)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + (std::get<1>(info.param) ? "_nf4" : "_dense");
                         });

}  // namespace
}  // namespace qlora::model

namespace qlora::model {
namespace {

TEST(Lora, ScalingRankPatternsAndInitialisationFollowPeft) {
  LoraConfig config;
  config.r = 8;
  config.alpha = 16;
  EXPECT_DOUBLE_EQ(config.scaling(), 2.0);
  config.use_rslora = true;
  EXPECT_DOUBLE_EQ(config.scaling(), 16.0 / std::sqrt(8.0));
  config.use_rslora = false;
  config.rank_pattern = {{"down_proj", 16}, {"model.layers.1.mlp.down_proj", 4}};
  config.alpha_pattern = {{"q_proj", 64}};
  EXPECT_EQ(config.for_module("model.layers.0.mlp.down_proj").r, 16);
  EXPECT_EQ(config.for_module("model.layers.1.mlp.down_proj").r, 4);   // the longer key wins
  EXPECT_EQ(config.for_module("model.layers.0.mlp.up_proj").r, 8);
  EXPECT_EQ(config.for_module("model.layers.0.self_attn.q_proj").alpha, 64);
  EXPECT_EQ(config.for_module("model.layers.0.self_attn.q_proj").r, 8);
  EXPECT_EQ(config.for_module("model.layers.0.mlp.xdown_proj").r, 8) << "suffix matches need a dot boundary";

  // Kaiming-uniform(a = sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in)); B starts at zero.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(3);
  LoraConfig plain;
  plain.r = 64;
  LoraAdapter adapter(400, 32, plain, generator);
  const double bound = 1.0 / std::sqrt(400.0);
  EXPECT_LE(adapter->lora_A.abs().max().item<double>(), bound);
  EXPECT_GT(adapter->lora_A.abs().max().item<double>(), 0.95 * bound);
  EXPECT_NEAR(adapter->lora_A.std().item<double>(), bound / std::sqrt(3.0), 0.02 * bound);
  EXPECT_EQ(adapter->lora_B.abs().max().item<double>(), 0.0);
  plain.init = "gaussian";
  LoraAdapter gaussian(400, 32, plain, generator);
  EXPECT_NEAR(gaussian->lora_A.std().item<double>(), 1.0 / 64, 0.02 / 64);
}

}  // namespace
}  // namespace qlora::model

namespace qlora::model {
namespace {

// The chunked loss equals cross_entropy over full logits, in value and in gradient, for chunk sizes
// that do and do not divide the rows.
TEST(ChunkedLoss, MatchesFullLogitsInValueAndGradient) {
  torch::manual_seed(11);
  const auto weight = torch::randn({1000, 48}) * 0.2;
  const auto targets = torch::randint(0, 1000, {37}, torch::kLong);
  const auto hidden_values = torch::randn({37, 48});
  auto full_hidden = hidden_values.clone().requires_grad_(true);
  auto full = torch::nn::functional::cross_entropy(torch::matmul(full_hidden, weight.t()), targets);
  full.backward();
  for (int64_t chunk : {1, 5, 37, 100}) {
    for (bool sum : {false, true}) {
      auto hidden = hidden_values.clone().requires_grad_(true);
      auto loss = chunked_cross_entropy(hidden, weight, targets, sum, chunk);
      loss.backward();
      const double expected = full.item<double>() * (sum ? 37.0 : 1.0);
      EXPECT_NEAR(loss.item<double>(), expected, 1e-5 * std::fabs(expected)) << "chunk " << chunk;
      const auto expected_grad = full_hidden.grad() * (sum ? 37.0 : 1.0);
      EXPECT_LT((hidden.grad() - expected_grad).abs().max().item<double>(), 1e-6 * (sum ? 37.0 : 1.0)) << chunk;
    }
  }
}

}  // namespace
}  // namespace qlora::model
