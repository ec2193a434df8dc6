// The k-bit preparation protocol, step by step, and tests that show why each step exists: the input
// hook (reentrant checkpointing silently starves the adapters without it), the fp32 upcast (a 16-bit
// norm costs measurable accuracy), and checkpointing (3x less activation memory, same gradients).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstring>

#include "cluster/memory.h"
#include "cluster/mpi_communicator.h"
#include "data/batch_sampler.h"
#include "launcher/demo.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "support/test_support.h"

namespace qlora::prepare {
namespace {

struct Fixture {
  std::unique_ptr<cluster::Communicator> communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  std::unique_ptr<shard::ModelStore> store;
  model::LlamaModel model{nullptr};

  explicit Fixture(const std::string& path) {
    store = shard::ModelStore::open(path);
    model = model::LlamaModel(*store, *communicator);
  }
};

std::string store_path(const std::string& preset) { return testing_support::synthetic_store(preset, 64, MPI_COMM_SELF); }

std::pair<torch::Tensor, torch::Tensor> demo_batch(int64_t rows, int64_t length) {
  data::BatchSampler sampler(data::byte_tokens(std::string(demo_text())), length, rows, 99);
  return sampler.batch(0, 0, 1);
}

torch::Tensor loss_of(model::LlamaModelImpl& model, const torch::Tensor& inputs, const torch::Tensor& targets) {
  auto logits = model.forward(inputs);
  return torch::nn::functional::cross_entropy(logits.view({-1, logits.size(-1)}), targets.view({-1}));
}

TEST(Prepare, FollowsPeftStepByStep) {
  Fixture fixture(store_path("tiny"));
  const auto report = prepare_model_for_kbit_training(*fixture.model, PrepareOptions{});
  EXPECT_EQ(report.method, QuantizationMethod::bnb_4bit);
  // embed_tokens, lm_head, 2 norms x 4 layers, final norm: all frozen, all bf16 -> fp32.
  EXPECT_EQ(report.parameters_frozen, 11);
  EXPECT_EQ(report.upcast.size(), 11u);
  EXPECT_EQ(report.upcast_added_bytes, 2 * (2 * 512 * 256 + 9 * 256));
  EXPECT_TRUE(report.gradient_checkpointing);
  EXPECT_TRUE(report.input_require_grads_hook);
  for (auto& [name, parameter] : fixture.model->named_model_parameters()) {
    EXPECT_FALSE(parameter.requires_grad()) << name;
    EXPECT_EQ(parameter.scalar_type(), torch::kFloat) << name;
  }
}

TEST(Prepare, NonReentrantCheckpointingNeedsNoHookAndEmbeddingsCanStay16Bit) {
  Fixture fixture(store_path("tiny"));
  PrepareOptions options;
  options.use_reentrant = false;
  options.keep_embeddings_16bit = true;
  const auto report = prepare_model_for_kbit_training(*fixture.model, options);
  EXPECT_TRUE(report.gradient_checkpointing);
  EXPECT_FALSE(report.input_require_grads_hook);
  EXPECT_EQ(report.upcast.size(), 9u);
  EXPECT_EQ(report.kept_16bit, (std::vector<std::string>{"model.embed_tokens.weight", "lm_head.weight"}));
  EXPECT_EQ(fixture.model->embed_tokens.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(fixture.model->final_norm.scalar_type(), torch::kFloat);
}

TEST(Prepare, MethodsThatForbidTheUpcastSkipItAndCannotTrainHere) {
  // A store claiming gptq: PEFT leaves its 16-bit parameters alone; this runtime refuses to train it.
  const std::string path = testing_support::shared_temp_dir(MPI_COMM_SELF) + "/gptq.h5";
  {
    shard::ConvertOptions options;
    shard::convert_synthetic("micro", path, options);
  }
  // Rewrite the header's method by copying the store with a different quant_method.
  auto source = shard::ModelStore::open(path);
  shard::StoreHeader header = source->header();
  header.quant_method = "gptq";
  const std::string relabelled = path + ".gptq.h5";
  {
    shard::ModelStoreWriter writer(relabelled, header);
    for (const auto& tensor : source->tensors()) {
      if (tensor.quantized) {
        const auto range = shard::shard_range(tensor.numel, header.blocksize, 0, 1);
        std::vector<uint8_t> codes(range.bytes());
        std::vector<float> absmax(range.blocks());
        source->read_codes(tensor.name, range, codes.data());
        source->read_absmax(tensor.name, range, absmax.data());
        writer.add_quantized(tensor.name, tensor.shape, tensor.dtype, codes.data(), absmax.data());
      } else {
        std::vector<uint8_t> data(tensor.numel * kernels::dtype_size(tensor.dtype));
        source->read_dense(tensor.name, data.data());
        writer.add_dense(tensor.name, tensor.shape, tensor.dtype, data.data());
      }
    }
    writer.finish();
  }
  Fixture fixture(relabelled);
  const auto report = prepare_model_for_kbit_training(*fixture.model, PrepareOptions{});
  EXPECT_EQ(report.method, QuantizationMethod::gptq);
  EXPECT_TRUE(report.upcast.empty());
  EXPECT_EQ(fixture.model->final_norm.scalar_type(), torch::kBFloat16);
  fixture.model->add_lora(model::LoraConfig{}, 1);
  EXPECT_THROW(check_trainable(*fixture.model, report.method), PrepareError);
}

TEST(Prepare, AQuantizedModelWithoutAdaptersIsRefused) {
  Fixture fixture(store_path("micro"));
  const auto report = prepare_model_for_kbit_training(*fixture.model, PrepareOptions{});
  try {
    check_trainable(*fixture.model, report.method);
    FAIL() << "training a 4-bit model without adapters was allowed";
  } catch (const PrepareError& error) {
    EXPECT_NE(std::string(error.what()).find("without adapters"), std::string::npos) << error.what();
  }
  model::LoraConfig bad;
  bad.target_modules = {"qkv_proj"};
  EXPECT_THROW(fixture.model->add_lora(bad, 1), std::invalid_argument);
}

// Without the hook, reentrant checkpointing sees inputs that do not require grad: the blocks' outputs
// then do not either, and the adapters inside them get no gradient at all.
TEST(Prepare, ReentrantCheckpointingWithoutTheInputHookStarvesTheAdapters) {
  const auto [inputs, targets] = demo_batch(2, 32);
  for (const bool hook : {false, true}) {
    Fixture fixture(store_path("tiny"));
    prepare_model_for_kbit_training(*fixture.model, PrepareOptions{});
    fixture.model->set_input_require_grads(hook);
    fixture.model->add_lora(model::LoraConfig{}, 5);
    fixture.model->train();
    auto loss = loss_of(*fixture.model, inputs, targets);
    if (!hook) {
      EXPECT_FALSE(loss.requires_grad()) << "no path from the loss to any adapter";
      for (auto& parameter : fixture.model->lora_parameters()) EXPECT_FALSE(parameter.grad().defined());
      continue;
    }
    ASSERT_TRUE(loss.requires_grad());
    loss.backward();
    for (auto& [name, parameter] : fixture.model->named_lora_parameters()) {
      ASSERT_TRUE(parameter.grad().defined()) << name;
      // B starts at zero, so A's first gradient is zero too; B's must not be.
      if (name.find("lora_B") != std::string::npos) {
        EXPECT_GT(parameter.grad().abs().max().item<float>(), 0.0f) << name;
      }
    }
  }
}

TEST(Prepare, NonReentrantCheckpointingGivesTheSameGradientsWithoutTheHook) {
  const auto [inputs, targets] = demo_batch(2, 32);
  std::vector<torch::Tensor> gradients[2];
  for (int reentrant = 0; reentrant < 2; ++reentrant) {
    Fixture fixture(store_path("tiny"));
    PrepareOptions options;
    options.use_reentrant = reentrant == 1;
    prepare_model_for_kbit_training(*fixture.model, options);
    fixture.model->add_lora(model::LoraConfig{}, 5);
    fixture.model->train();
    loss_of(*fixture.model, inputs, targets).backward();
    for (auto& parameter : fixture.model->lora_parameters()) gradients[reentrant].push_back(parameter.grad().clone());
  }
  ASSERT_EQ(gradients[0].size(), gradients[1].size());
  for (size_t i = 0; i < gradients[0].size(); ++i) EXPECT_TRUE(torch::equal(gradients[0][i], gradients[1][i])) << i;
}

// The upcast exists because a 16-bit norm weight rounds the normalised activations to 16 bits
// (HF's RMSNorm casts them to the weight's dtype): measured here against the fp32-prepared model.
TEST(Prepare, WithoutTheFp32UpcastA16BitNormLosesAccuracy) {
  const auto [inputs, targets] = demo_batch(2, 64);
  Fixture prepared(store_path("tiny"));
  prepare_model_for_kbit_training(*prepared.model, PrepareOptions{});
  prepared.model->eval();
  torch::NoGradGuard no_grad;
  const auto reference = prepared.model->forward(inputs);
  const auto again = prepared.model->forward(inputs);
  EXPECT_TRUE(torch::equal(reference, again)) << "the fp32 model is deterministic";

  Fixture half(store_path("tiny"));
  prepare_model_for_kbit_training(*half.model, PrepareOptions{});
  for (auto& [name, parameter] : half.model->named_model_parameters())
    if (name.find("norm") != std::string::npos) parameter.set_data(parameter.to(torch::kBFloat16));
  half.model->eval();
  const auto degraded = half.model->forward(inputs);
  const double scale = reference.abs().max().item<double>();
  const double error = (degraded - reference).abs().max().item<double>() / scale;
  // bf16 keeps 8 significant bits: per-element relative rounding up to 2^-9, compounded over 9 norms.
  std::printf("max relative logit error with bf16 norms: %.3g\n", error);
  EXPECT_GT(error, 1e-3) << "bf16 norms should visibly perturb the logits";
  EXPECT_LT(error, 0.2);
}

// Checkpointing keeps only each block's input: on an 8-block model the activation peak falls by at
// least 3x while the loss and every adapter gradient stay bitwise the same.
TEST(Prepare, CheckpointingCutsActivationMemoryAtEqualLossAndGradients) {
  cluster::MemoryCounter::install();
  const auto [inputs, targets] = demo_batch(4, 128);
  double loss_value[2];
  int64_t peak[2];
  std::vector<torch::Tensor> gradients[2];
  for (int checkpointing = 0; checkpointing < 2; ++checkpointing) {
    Fixture fixture(store_path("small"));
    ASSERT_EQ(fixture.model->block_count(), 8u);
    PrepareOptions options;
    options.use_gradient_checkpointing = checkpointing == 1;
    prepare_model_for_kbit_training(*fixture.model, options);
    fixture.model->add_lora(model::LoraConfig{}, 5);
    fixture.model->train();
    const int64_t resident = cluster::MemoryCounter::current_bytes();
    cluster::MemoryCounter::reset_peak();
    auto loss = loss_of(*fixture.model, inputs, targets);
    loss.backward();
    peak[checkpointing] = cluster::MemoryCounter::peak_bytes() - resident;
    loss_value[checkpointing] = loss.item<double>();
    for (auto& parameter : fixture.model->lora_parameters()) gradients[checkpointing].push_back(parameter.grad().clone());
  }
  std::printf("activation peak of forward+backward, 8 blocks, 4 x 128 tokens: %lld bytes without checkpointing, "
              "%lld with (%.2fx)\n", static_cast<long long>(peak[0]), static_cast<long long>(peak[1]),
              static_cast<double>(peak[0]) / static_cast<double>(peak[1]));
  EXPECT_EQ(loss_value[0], loss_value[1]);
  for (size_t i = 0; i < gradients[0].size(); ++i) EXPECT_TRUE(torch::equal(gradients[0][i], gradients[1][i])) << i;
  EXPECT_GE(static_cast<double>(peak[0]) / static_cast<double>(peak[1]), 3.0)
      << "without checkpointing " << peak[0] << " bytes, with " << peak[1];
}

}  // namespace
}  // namespace qlora::prepare
