// The vocabulary-parallel embedding and LM head (run under mpirun -np 2, 3 and 4) against the same
// model on one rank, on a vocabulary of 509 tokens (prime, so every world size splits it unevenly):
// each rank holds only its rows, the hidden states are bitwise those of one rank, and the loss, the
// adapter gradients and the full logits agree with one rank's, with ranks bringing different
// numbers of tokens. A vocabulary smaller than the world is refused.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "cluster/memory.h"
#include "cluster/mpi_communicator.h"
#include "launcher/errors.h"
#include "launcher/train.h"
#include "model/chunked_loss.h"
#include "model/llama.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::model {
namespace {

// A synthetic store of the micro shape with `vocab` tokens, written once by rank 0.
std::string store_with_vocabulary(int64_t vocab, bool tied) {
  const std::string folder = testing_support::shared_temp_dir();
  const std::string name = "vocab" + std::to_string(vocab) + (tied ? "-tied" : "");
  const std::string path = folder + "/" + name + ".h5";
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0 && !std::filesystem::exists(path)) {
    const std::string config = folder + "/" + name + ".json";
    std::ofstream(config) << R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": )"
                          << vocab << R"(, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "tie_word_embeddings": )"
                          << (tied ? "true" : "false") << R"(, "torch_dtype": "bfloat16"})";
    shard::convert_synthetic(config, path, shard::ConvertOptions{});
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return path;
}

LlamaModel prepared_model(const shard::ModelStore& store, cluster::Communicator& communicator) {
  LlamaModel model(store, communicator);
  prepare::prepare_model_for_kbit_training(*model, prepare::PrepareOptions{});
  model->add_lora(LoraConfig{}, 7);
  // Non-zero B matrices, the same on every rank, so every adapter has a gradient worth comparing.
  torch::NoGradGuard no_grad;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(99);
  for (auto& [name, parameter] : model->named_lora_parameters())
    parameter.copy_(torch::randn(parameter.sizes(), generator) * 0.05);
  return model;
}

double largest_relative_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item<double>();
}

class VocabularyParallel : public ::testing::TestWithParam<bool> {};

TEST_P(VocabularyParallel, MatchesOneRankInHiddenStatesLossGradientsAndLogits) {
  const bool tied = GetParam();
  auto world_communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  auto self_communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  const int rank = world_communicator->rank();
  const int world = world_communicator->size();
  constexpr int64_t vocab = 509;
  auto store = shard::ModelStore::open(store_with_vocabulary(vocab, tied));

  cluster::MemoryCounter::install();
  auto parallel = prepared_model(*store, *world_communicator);
  auto single = prepared_model(*store, *self_communicator);

  // Each rank holds only its balanced share of the rows: 509 / N, the first 509 % N ranks one more.
  const int64_t expected_rows = vocab / world + (rank < vocab % world ? 1 : 0);
  EXPECT_EQ(parallel->vocab_range().rows(), expected_rows);
  EXPECT_EQ(parallel->embed_tokens.size(0), expected_rows);
  EXPECT_EQ(parallel->lm_head.size(0), expected_rows);
  EXPECT_EQ(tied, parallel->lm_head.is_same(parallel->embed_tokens));
  EXPECT_TRUE(torch::equal(parallel->embed_tokens,
                           single->embed_tokens.narrow(0, parallel->vocab_range().begin, expected_rows)));
  // Loaded as stored (bf16): rows x hidden x 2 bytes, once when tied.
  EXPECT_EQ(parallel->load_memory().embeddings, expected_rows * 64 * 2 * (tied ? 1 : 2));
  EXPECT_EQ(single->load_memory().embeddings, vocab * 64 * 2 * (tied ? 1 : 2));

  // Different tokens on every rank, and a different count: rank r brings 1 + r % 2 sequences.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1000 + rank);
  const int64_t batch = 1 + rank % 2;
  const auto tokens = torch::randint(0, vocab, {batch, 24}, generator, torch::kLong);
  const auto inputs = tokens.narrow(1, 0, 23);
  const auto targets = tokens.narrow(1, 1, 23);

  parallel->eval();
  single->eval();
  {
    torch::NoGradGuard no_grad;
    // The embedding sums -0.0 from every rank but the owner: bitwise one rank's hidden states.
    EXPECT_TRUE(torch::equal(parallel->final_hidden(inputs), single->final_hidden(inputs)));
    const auto parallel_logits = parallel->forward(inputs);
    const auto single_logits = single->forward(inputs);
    ASSERT_EQ(parallel_logits.sizes(), single_logits.sizes());
    EXPECT_LT(largest_relative_difference(parallel_logits, single_logits), 1e-6);
    for (bool sum : {false, true}) {
      const double parallel_loss = parallel->next_token_loss(inputs, targets, sum).item<double>();
      const double single_loss = single->next_token_loss(inputs, targets, sum).item<double>();
      EXPECT_NEAR(parallel_loss, single_loss, 1e-6 * std::fabs(single_loss)) << "sum " << sum;
    }
  }

  parallel->train();
  single->train();
  for (int64_t chunk_rows : {int64_t{0}, int64_t{5}}) {
    for (auto* model : {&parallel, &single})
      for (auto& parameter : (*model)->lora_parameters()) parameter.mutable_grad() = torch::Tensor();
    torch::Tensor parallel_loss;
    if (chunk_rows == 0) {
      parallel_loss = parallel->next_token_loss(inputs, targets);
    } else {
      // Chunks that do not divide the gathered rows, and rows of one rank spread over several chunks.
      const auto hidden = parallel->final_hidden(inputs);
      parallel_loss = vocab_parallel_cross_entropy(hidden.reshape({-1, 64}), parallel->lm_head,
                                                   parallel->vocab_range().begin, vocab, targets.reshape({-1}),
                                                   *world_communicator, false, chunk_rows);
    }
    auto single_loss = single->next_token_loss(inputs, targets);
    parallel_loss.backward();
    single_loss.backward();
    EXPECT_NEAR(parallel_loss.item<double>(), single_loss.item<double>(), 1e-6 * single_loss.item<double>());
    const auto parallel_parameters = parallel->named_lora_parameters();
    const auto single_parameters = single->named_lora_parameters();
    double worst = 0;
    std::string worst_name;
    for (size_t i = 0; i < parallel_parameters.size(); ++i) {
      ASSERT_TRUE(parallel_parameters[i].second.grad().defined()) << parallel_parameters[i].first;
      const double difference =
          largest_relative_difference(parallel_parameters[i].second.grad(), single_parameters[i].second.grad());
      if (difference > worst) worst = difference, worst_name = parallel_parameters[i].first;
    }
    EXPECT_LT(worst, 1e-5) << worst_name << ", chunk rows " << chunk_rows;
    if (rank == 0)
      std::printf("world %d, %s, chunk rows %lld: largest relative adapter-gradient difference to one rank %.3g\n",
                  world, tied ? "tied" : "untied", static_cast<long long>(chunk_rows), worst);
  }
}

INSTANTIATE_TEST_SUITE_P(TiedAndUntied, VocabularyParallel, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "tied" : "untied"; });

TEST(VocabularyParallelRefusal, AVocabularySmallerThanTheWorldIsRefusedWithAClearMessage) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const int world = communicator->size();
  auto store = shard::ModelStore::open(store_with_vocabulary(world - 1, false));
  try {
    launcher::check_world_fits(*store, world);
    ADD_FAILURE() << "a vocabulary of " << world - 1 << " tokens was accepted for " << world << " ranks";
  } catch (const UserError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("vocabulary of " + std::to_string(world - 1) + " tokens"), std::string::npos) << message;
  }
  EXPECT_THROW(LlamaModel(*store, *communicator), ModelError);
  // One rank fewer fits: every rank holds one row.
  auto fitting = shard::ModelStore::open(store_with_vocabulary(world, false));
  EXPECT_NO_THROW(launcher::check_world_fits(*fitting, world));
  LlamaModel model(*fitting, *communicator);
  EXPECT_EQ(model->embed_tokens.size(0), 1);
}

}  // namespace
}  // namespace qlora::model
