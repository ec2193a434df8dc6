// Parity with transformers + PEFT on golden fixtures (scripts/make_model_fixtures.py): logits, loss
// and every LoRA gradient of three small configurations (Llama 2 style; Llama 3 style with llama3
// rope scaling and tied embeddings; Qwen2 with q/k/v biases), both with the 16-bit weights as they
// are and with the decoder linears through NF4, within 1e-4 relative in fp32.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <cstring>

#include "cluster/mpi_communicator.h"
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
