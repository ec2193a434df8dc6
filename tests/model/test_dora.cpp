// DoRA (PEFT's use_dora) against PEFT's own numbers (scripts/make_dora_fixtures.py): the magnitudes
// qlora initialises, logits, loss and the gradients of lora_A, lora_B and every magnitude vector on
// the small Llama fixture, unquantized and on an NF4 base (bitsandbytes' 4-bit Linear, QDoRA), within
// 1e-4 relative; PEFT-format adapters both ways; the weight-norm identity, the dropout formula and
// the merged weight.
#include <gtest/gtest.h>
#include <mpi.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "cluster/mpi_communicator.h"
#include "common/json.h"
#include "launcher/adapter_io.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora::model {
namespace {

std::string fixture_path(const std::string& name) {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/fixtures/" + name;
}

torch::Tensor read_tensor(const shard::SafetensorsFile& file, const std::string& name) {
  const auto& entry = file.at(name);
  const auto dtype = entry.dtype == kernels::DType::i64 ? torch::kLong : torch::kFloat;
  auto tensor = torch::empty(entry.shape, dtype);
  std::memcpy(tensor.data_ptr(), file.data(entry), entry.end - entry.begin);
  return tensor;
}

double relative_error(const torch::Tensor& actual, const torch::Tensor& expected) {
  return (actual - expected).abs().max().item<double>() / expected.abs().max().item<double>();
}

LoraConfig fixture_config() {
  LoraConfig lora;
  lora.r = 4;
  lora.alpha = 8;
  lora.use_dora = true;
  return lora;
}

// The fixture model as a store: quant type none, or NF4 quantized as bitsandbytes' CPU backend does
// (the fixture ran bitsandbytes on a CPU).
std::unique_ptr<shard::ModelStore> fixture_store(bool nf4) {
  const std::string path = testing_support::shared_temp_dir(MPI_COMM_SELF) + (nf4 ? "/dora-nf4.h5" : "/dora-dense.h5");
  shard::ConvertOptions options;
  options.quantize = nf4;
  options.backend = kernels::BitsandbytesBackend::cpu;
  shard::convert_hf_directory(fixture_path("model/llama/hf"), path, options);
  return shard::ModelStore::open(path);
}

// transformers' causal LM loss: logits at t predict token t+1.
torch::Tensor causal_loss(const torch::Tensor& logits, const torch::Tensor& input_ids) {
  const int64_t vocab = logits.size(-1);
  return torch::nn::functional::cross_entropy(logits.narrow(1, 0, logits.size(1) - 1).reshape({-1, vocab}),
                                              input_ids.narrow(1, 1, input_ids.size(1) - 1).reshape({-1}));
}

class DoraParity : public ::testing::TestWithParam<bool> {};

TEST_P(DoraParity, MagnitudesLogitsLossAndEveryGradientMatchPeft) {
  const bool nf4 = GetParam();
  const std::string kind = nf4 ? "nf4" : "dense";
  auto store = fixture_store(nf4);
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  LlamaModel model(*store, *communicator);
  prepare::prepare_model_for_kbit_training(*model, prepare::PrepareOptions{});
  model->add_lora(fixture_config(), 1);
  auto adapters = shard::SafetensorsFile::open(fixture_path("dora/adapter_" + kind + ".safetensors"));
  const auto named = model->named_lora_parameters();
  ASSERT_EQ(named.size(), 2u * 7 * 3) << "lora_A, lora_B and a magnitude per projection of both layers";
  // PEFT initialised the magnitudes from the (dequantized) base weights; so must qlora.
  double worst_magnitude = 0;
  int magnitudes = 0;
  for (const auto& [name, parameter] : named) {
    if (name.find("lora_magnitude_vector") == std::string::npos) continue;
    ++magnitudes;
    worst_magnitude = std::max(worst_magnitude, relative_error(parameter.detach(), read_tensor(*adapters, name)));
  }
  EXPECT_EQ(magnitudes, 14);
  EXPECT_LT(worst_magnitude, 1e-5);
  {
    torch::NoGradGuard no_grad;
    for (const auto& [name, parameter] : named) parameter.copy_(read_tensor(*adapters, name));
  }
  model->train();
  auto expected = shard::SafetensorsFile::open(fixture_path("dora/expected_" + kind + ".safetensors"));
  const auto input_ids = read_tensor(*expected, "input_ids");
  auto logits = model->forward(input_ids);
  auto loss = causal_loss(logits, input_ids);
  loss.backward();
  const double logits_error = relative_error(logits.detach(), read_tensor(*expected, "logits"));
  const double loss_error = relative_error(loss.detach().reshape({1}), read_tensor(*expected, "loss"));
  double worst_gradient = 0;
  std::string worst_name;
  for (const auto& [name, parameter] : named) {
    ASSERT_TRUE(parameter.grad().defined()) << name;
    const double error = relative_error(parameter.grad(), read_tensor(*expected, "grad." + name));
    if (error >= worst_gradient) {
      worst_gradient = error;
      worst_name = name;
    }
  }
  std::printf("dora %-5s magnitudes %.2e  logits %.2e  loss %.2e  worst gradient %.2e (%s)\n", kind.c_str(),
              worst_magnitude, logits_error, loss_error, worst_gradient, worst_name.c_str());
  EXPECT_LT(logits_error, 1e-4);
  EXPECT_LT(loss_error, 1e-4);
  EXPECT_LT(worst_gradient, 1e-4) << worst_name;
}

INSTANTIATE_TEST_SUITE_P(Fixture, DoraParity, ::testing::Values(false, true),
                         [](const auto& info) { return std::string(info.param ? "nf4" : "dense"); });

// An adapter folder PEFT's save_pretrained wrote loads into qlora and gives PEFT's logits.
TEST(DoraAdapterFiles, PeftSavedAdapterLoadsAndReproducesPeftLogits) {
  auto store = fixture_store(false);
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  LlamaModel model(*store, *communicator);
  prepare::prepare_model_for_kbit_training(*model, prepare::PrepareOptions{});
  launcher::load_peft_adapter(fixture_path("dora/peft_adapter"), *model);
  ASSERT_TRUE(model->lora_config().use_dora);
  model->eval();
  torch::NoGradGuard no_grad;
  auto expected = shard::SafetensorsFile::open(fixture_path("dora/expected_dense.safetensors"));
  const auto logits = model->forward(read_tensor(*expected, "input_ids"));
  const double error = relative_error(logits, read_tensor(*expected, "logits"));
  std::printf("PEFT-saved DoRA adapter in qlora: logits relative error %.2e\n", error);
  EXPECT_LT(error, 1e-4);
}

// qlora writes use_dora and the magnitudes under PEFT's keys, and reads its own folder back.
TEST(DoraAdapterFiles, SavedAdapterHasPeftKeysAndConfigAndLoadsBack) {
  auto store = fixture_store(false);
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  LlamaModel trained(*store, *communicator);
  trained->add_lora(fixture_config(), 5);
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, parameter] : trained->named_lora_parameters()) parameter.add_(torch::randn_like(parameter) * 0.01);
  }
  const std::string folder = testing_support::shared_temp_dir(MPI_COMM_SELF) + "/dora-adapter";
  launcher::write_peft_adapter(folder, trained->named_lora_parameters(), trained->lora_config(), "fixture");
  std::ifstream config_file(folder + "/adapter_config.json");
  std::stringstream text;
  text << config_file.rdbuf();
  const Json config = parse_json(text.str(), "adapter_config.json");
  EXPECT_EQ(config.at("use_dora"), true);
  auto weights = shard::SafetensorsFile::open(folder + "/adapter_model.safetensors");
  const std::string magnitude = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector";
  ASSERT_NE(weights->find(magnitude), nullptr);
  EXPECT_EQ(weights->at(magnitude).shape, std::vector<int64_t>({64}));

  LlamaModel loaded(*store, *communicator);
  launcher::load_peft_adapter(folder, *loaded);
  const auto expected = trained->named_lora_parameters();
  const auto actual = loaded->named_lora_parameters();
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].first, expected[i].first);
    EXPECT_TRUE(torch::equal(actual[i].second, expected[i].second)) << actual[i].first;
  }
}

// A random adapter whose update is not small next to the weight.
struct RandomAdapter {
  torch::Tensor weight;
  LoraAdapter adapter{nullptr};
};

RandomAdapter random_adapter(double dropout) {
  torch::manual_seed(7);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(8);
  LoraConfig config = fixture_config();
  config.r = 6;
  config.dropout = dropout;
  RandomAdapter random;
  random.weight = torch::randn({48, 40}) * 0.1;
  random.adapter = LoraAdapter(40, 48, config, generator);
  torch::NoGradGuard no_grad;
  random.adapter->lora_B.copy_(torch::randn({48, 6}) * 0.2);
  random.adapter->initialise_magnitude(random.weight);
  random.adapter->lora_magnitude_vector.mul_(1.0 + 0.3 * torch::rand({48}));
  return random;
}

TEST(DoraWeightNorm, EqualsTheNormOfTheFormedWeightPerRow) {
  const auto random = random_adapter(0.0);
  const auto& adapter = *random.adapter;
  const auto formed = (random.weight + adapter.scaling * torch::matmul(adapter.lora_B, adapter.lora_A)).detach();
  const auto direct = formed.norm(2, {1});
  EXPECT_LT(relative_error(adapter.weight_norm(random.weight), direct), 1e-6);
  EXPECT_FALSE(adapter.weight_norm(random.weight).requires_grad());
  // B = 0: the base weight's norms, as PEFT initialises the magnitudes.
  EXPECT_LT(relative_error(dora_weight_norm(random.weight, adapter.lora_A, torch::zeros_like(adapter.lora_B), 2.0),
                           random.weight.norm(2, {1})),
            1e-6);
}

// With dropout in training PEFT scales the base product of the dropped input:
// W x + (m/n - 1) W d(x) + (m/n) s B A d(x); the magnitude's gradient follows.
TEST(DoraDropout, TrainingOutputAndMagnitudeGradientFollowPeftsFormula) {
  auto random = random_adapter(0.3);
  auto& adapter = *random.adapter;
  adapter.train();
  const auto x = torch::randn({10, 40});
  DropoutSource source;
  source.seed = 3;
  source.sequence_length = 5;
  const auto weight = random.weight;
  const auto product = [&](const torch::Tensor& input) { return torch::matmul(input, weight.t()); };
  auto output = adapter.dora_output(x, weight, product, source);
  const auto upstream = torch::randn({10, 48});
  (output * upstream).sum().backward();

  const auto dropped = x * dropout_mask(source, 10, 40, 0.7);
  const auto norm = (weight + adapter.scaling * torch::matmul(adapter.lora_B, adapter.lora_A)).detach().norm(2, {1});
  const auto magnitude = adapter.lora_magnitude_vector.detach();
  const auto scale = magnitude / norm;
  const auto update = adapter.scaling * torch::matmul(torch::matmul(dropped, adapter.lora_A.t()), adapter.lora_B.t());
  const auto expected = torch::matmul(x, weight.t()) + (scale - 1) * torch::matmul(dropped, weight.t()) + scale * update;
  EXPECT_LT(relative_error(output.detach(), expected.detach()), 1e-6);
  const auto expected_magnitude_grad =
      ((torch::matmul(dropped, weight.t()) + update) * upstream).sum(0).detach() / norm;
  EXPECT_LT(relative_error(adapter.lora_magnitude_vector.grad(), expected_magnitude_grad), 1e-5);
  // Dropout really acts: the evaluation output differs.
  adapter.eval();
  torch::NoGradGuard no_grad;
  EXPECT_GT((adapter.dora_output(x, weight, product, source) - output.detach()).abs().max().item<double>(), 1e-3);
}

// The merged weight reproduces the adapted projection in evaluation: one product instead of two.
TEST(MergedWeight, ReproducesTheAdaptedProjectionForDoraAndLora) {
  auto random = random_adapter(0.0);
  auto& adapter = *random.adapter;
  adapter.eval();
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({9, 40});
  const auto product = [&](const torch::Tensor& input) { return torch::matmul(input, random.weight.t()); };
  const auto dora = adapter.dora_output(x, random.weight, product, DropoutSource{});
  const auto merged = merged_weight(random.weight, adapter);
  EXPECT_LT(relative_error(torch::matmul(x, merged.t()), dora), 1e-5);
  // The magnitudes were moved off the adapted rows' norms, so DoRA's merge is not LoRA's.
  EXPECT_GT(relative_error(merged, random.weight + adapter.scaling * torch::matmul(adapter.lora_B, adapter.lora_A)), 1e-2);

  auto generator = at::make_generator<at::CPUGeneratorImpl>(8);
  LoraConfig plain = fixture_config();
  plain.use_dora = false;
  LoraAdapter lora(40, 48, plain, generator);
  lora->lora_B.copy_(adapter.lora_B.narrow(1, 0, 4));
  auto lora_output = torch::matmul(x, random.weight.t());
  lora->add_update(lora_output, x, DropoutSource{});
  EXPECT_LT(relative_error(torch::matmul(x, merged_weight(random.weight, *lora).t()), lora_output), 1e-5);
}

}  // namespace
}  // namespace qlora::model
