// KV-cached generation (model/generation.h, launcher/generate.h), run under mpirun -np 1 and 2: on a
// synthetic micro model with nonzero LoRA B on every projection, NF4 (blocks gathered per step) and
// unquantized, the cached decoder's logits equal a full recompute of the growing sequence at every
// step and its greedy tokens are the recompute's; the sharded model's tokens and logits equal one
// rank's; temperature / top-p sampling follows a reference of transformers' rule written here and is
// deterministic for a seed; streaming never prints half a UTF-8 character.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <string>

#include "cluster/mpi_communicator.h"
#include "launcher/generate.h"
#include "model/generation.h"
#include "model/llama.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::model {
namespace {

constexpr int64_t kVocab = 509;  // prime: every world size splits the LM head unevenly

std::string micro_store(bool quantize) {
  const std::string folder = testing_support::shared_temp_dir();
  const std::string name = std::string("generation-") + (quantize ? "nf4" : "dense");
  const std::string path = folder + "/" + name + ".h5";
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0 && !std::filesystem::exists(path)) {
    const std::string config = folder + "/" + name + ".json";
    std::ofstream(config) << R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
      "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": )"
                          << kVocab << R"(, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "float32"})";
    shard::ConvertOptions options;
    options.quantize = quantize;
    shard::convert_synthetic(config, path, options);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  return path;
}

LlamaModel adapted_model(const shard::ModelStore& store, cluster::Communicator& communicator) {
  LlamaModel model(store, communicator);
  prepare::PrepareOptions options;
  options.use_gradient_checkpointing = false;
  prepare::prepare_model_for_kbit_training(*model, options);
  LoraConfig lora;
  lora.dropout = 0.1;  // must not apply: generation runs in eval mode
  model->add_lora(lora, 7);
  torch::NoGradGuard no_grad;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(99);
  // Large enough that the adapters move the logits well beyond the tolerances below.
  for (auto& [name, parameter] : model->named_lora_parameters())
    parameter.copy_(torch::randn(parameter.sizes(), generator) * 0.2);
  model->eval();
  return model;
}

double max_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  return (actual - expected).abs().max().item<double>();
}

class Generation : public ::testing::TestWithParam<bool> {};

TEST_P(Generation, CachedLogitsEqualFullRecomputeAndGreedyTokensMatch) {
  auto world = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  auto store = shard::ModelStore::open(micro_store(GetParam()));
  auto model = adapted_model(*store, *world);
  torch::NoGradGuard no_grad;

  // The adapters matter: the same model without them gives other logits.
  const std::vector<int64_t> prompt = {3, 141, 59, 265, 358, 97, 93};
  auto prompt_tensor = torch::tensor(prompt, torch::kLong).view({1, -1});
  const auto adapted_logits = model->forward(prompt_tensor)[0];
  auto base = LlamaModel(*store, *world);
  prepare::prepare_model_for_kbit_training(*base, prepare::PrepareOptions{});
  base->eval();
  EXPECT_GT(max_difference(base->forward(prompt_tensor)[0], adapted_logits), 1e-2);

  CachedDecoder decoder(*model, 4);  // a small capacity, so the cache grows while decoding
  const auto prefill = decoder.append(prompt, /*all_positions=*/true);
  ASSERT_EQ(prefill.sizes(), adapted_logits.sizes());
  EXPECT_LT(max_difference(prefill, adapted_logits), 1e-5);

  std::vector<int64_t> sequence = prompt;
  auto logits = prefill[-1];
  for (int step = 0; step < 20; ++step) {
    const auto full = model->forward(torch::tensor(sequence, torch::kLong).view({1, -1}))[0][-1];
    ASSERT_LT(max_difference(logits, full), 1e-5) << "step " << step;
    const int64_t cached_token = logits.argmax().item<int64_t>();
    ASSERT_EQ(cached_token, full.argmax().item<int64_t>()) << "step " << step;
    sequence.push_back(cached_token);
    logits = decoder.append({cached_token});
  }
  EXPECT_EQ(decoder.length(), static_cast<int64_t>(sequence.size()));

  // generate_completion gives the same greedy tokens, and truncating the cache replays them.
  auto tokenizer = data::make_byte_tokenizer();
  decoder.reset();
  TokenSampler greedy(SamplingOptions{0.0, 1.0, 0});
  const auto completion = launcher::generate_completion(decoder, *tokenizer, prompt, {}, 20, greedy, *world, nullptr,
                                                        nullptr);
  EXPECT_EQ(completion.tokens, std::vector<int64_t>(sequence.begin() + prompt.size(), sequence.end()));
  EXPECT_FALSE(completion.stopped);
  decoder.truncate(static_cast<int64_t>(prompt.size()) - 2);
  std::vector<int64_t> longer = prompt;
  longer.insert(longer.end(), completion.tokens.begin(), completion.tokens.begin() + 5);
  TokenSampler greedy_again(SamplingOptions{0.0, 1.0, 0});
  const auto resumed = launcher::generate_completion(decoder, *tokenizer, longer, {}, 15, greedy_again, *world,
                                                     nullptr, nullptr);
  EXPECT_EQ(resumed.tokens, std::vector<int64_t>(completion.tokens.begin() + 5, completion.tokens.end()));

  // A stop token ends the completion before it and is not part of it.
  decoder.reset();
  TokenSampler greedy_stop(SamplingOptions{0.0, 1.0, 0});
  const auto stopped = launcher::generate_completion(decoder, *tokenizer, prompt, {completion.tokens[3]}, 20,
                                                     greedy_stop, *world, nullptr, nullptr);
  EXPECT_TRUE(stopped.stopped);
  const auto first_stop = std::find(completion.tokens.begin(), completion.tokens.end(), completion.tokens[3]);
  EXPECT_EQ(stopped.tokens, std::vector<int64_t>(completion.tokens.begin(), first_stop));
}

TEST_P(Generation, ShardedModelEqualsOneRank) {
  auto world = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  auto self = cluster::make_mpi_communicator(MPI_COMM_SELF);
  auto store = shard::ModelStore::open(micro_store(GetParam()));
  auto sharded = adapted_model(*store, *world);
  auto single = adapted_model(*store, *self);
  EXPECT_EQ(sharded->vocab_range().rows(), shard::vocab_range(kVocab, world->rank(), world->size()).rows());

  const std::vector<int64_t> prompt = {11, 400, 7, 508, 250};
  CachedDecoder sharded_decoder(*sharded, 64);
  CachedDecoder single_decoder(*single, 64);
  EXPECT_LT(max_difference(sharded_decoder.append(prompt, true), single_decoder.append(prompt, true)), 1e-5);
  for (const double temperature : {0.0, 0.8}) {
    sharded_decoder.reset();
    single_decoder.reset();
    TokenSampler sharded_sampler(SamplingOptions{temperature, 0.9, 1234});
    TokenSampler single_sampler(SamplingOptions{temperature, 0.9, 1234});
    auto tokenizer = data::make_byte_tokenizer();
    const auto a = launcher::generate_completion(sharded_decoder, *tokenizer, prompt, {}, 24, sharded_sampler, *world,
                                                 nullptr, nullptr);
    const auto b = launcher::generate_completion(single_decoder, *tokenizer, prompt, {}, 24, single_sampler, *self,
                                                 nullptr, nullptr);
    EXPECT_EQ(a.tokens, b.tokens) << "temperature " << temperature;
    ASSERT_EQ(a.tokens.size(), 24u);
    // Every rank holds the same tokens (rank 0's, broadcast).
    std::vector<int64_t> gathered(a.tokens.size() * static_cast<size_t>(world->size()));
    MPI_Allgather(a.tokens.data(), static_cast<int>(a.tokens.size()), MPI_INT64_T, gathered.data(),
                  static_cast<int>(a.tokens.size()), MPI_INT64_T, MPI_COMM_WORLD);
    for (int r = 0; r < world->size(); ++r)
      EXPECT_TRUE(std::equal(a.tokens.begin(), a.tokens.end(), gathered.begin() + r * a.tokens.size()));
  }
}

INSTANTIATE_TEST_SUITE_P(Stores, Generation, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? std::string("nf4") : std::string("dense"); });

// ---- sampling, against a reference written from transformers' TemperatureLogitsWarper and
// TopPLogitsWarper: scale by 1/temperature; sort ascending; drop a token when the softmax mass up to and
// including it is <= 1 - top_p; always keep the most probable; renormalise. -----------------------------

std::vector<double> reference_distribution(const std::vector<float>& logits, double temperature, double top_p) {
  const size_t n = logits.size();
  std::vector<float> scaled(n);
  for (size_t i = 0; i < n; ++i) scaled[i] = static_cast<float>(logits[i] / temperature);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return scaled[a] < scaled[b]; });
  const float top = *std::max_element(scaled.begin(), scaled.end());
  double total = 0;
  for (float value : scaled) total += std::exp(static_cast<double>(value - top));
  std::vector<bool> kept(n, true);
  double cumulative = 0;
  // transformers adds no TopPLogitsWarper at top_p = 1.
  for (size_t position = 0; top_p < 1.0 && position + 1 < n; ++position) {
    cumulative += std::exp(static_cast<double>(scaled[order[position]] - top)) / total;
    if (cumulative <= 1.0 - top_p + 1e-9) kept[order[position]] = false;
  }
  double kept_total = 0;
  for (size_t i = 0; i < n; ++i)
    if (kept[i]) kept_total += std::exp(static_cast<double>(scaled[i] - top));
  std::vector<double> probabilities(n, 0.0);
  for (size_t i = 0; i < n; ++i)
    if (kept[i]) probabilities[i] = std::exp(static_cast<double>(scaled[i] - top)) / kept_total;
  return probabilities;
}

TEST(Sampling, DistributionMatchesTheReferenceRule) {
  std::mt19937 generator(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(300);
  for (auto& value : logits) value = normal(generator);
  for (const double temperature : {0.3, 0.7, 1.0, 1.6}) {
    for (const double top_p : {0.05, 0.5, 0.9, 0.99, 1.0}) {
      const auto expected = reference_distribution(logits, temperature, top_p);
      const auto actual = sampling_distribution(torch::tensor(logits), temperature, top_p);
      int kept_expected = 0, kept_actual = 0;
      for (size_t i = 0; i < logits.size(); ++i) {
        kept_expected += expected[i] > 0;
        kept_actual += actual[static_cast<int64_t>(i)].item<float>() > 0;
        ASSERT_NEAR(actual[static_cast<int64_t>(i)].item<float>(), expected[i], 1e-6)
            << "token " << i << " temperature " << temperature << " top_p " << top_p;
      }
      EXPECT_EQ(kept_actual, kept_expected) << "temperature " << temperature << " top_p " << top_p;
      if (top_p < 1.0) EXPECT_LT(kept_actual, 300);
    }
  }
}

TEST(Sampling, BoundaryRuleAndKeepsTheMostProbableToken) {
  // Four equal tokens: cumulative mass 0.25, 0.5, 0.75, 1. A token whose mass reaches exactly 1 - top_p
  // is removed (transformers uses <=).
  const auto equal = torch::zeros({4});
  EXPECT_EQ((sampling_distribution(equal, 1.0, 0.5) > 0).sum().item<int64_t>(), 2);
  EXPECT_EQ((sampling_distribution(equal, 1.0, 0.75) > 0).sum().item<int64_t>(), 3);
  EXPECT_EQ((sampling_distribution(equal, 1.0, 0.76) > 0).sum().item<int64_t>(), 4);
  // A tiny top_p keeps only the most probable token.
  const auto peaked = torch::tensor(std::vector<float>{1.0f, 3.0f, 2.0f, -1.0f});
  const auto only = sampling_distribution(peaked, 1.0, 1e-6);
  EXPECT_FLOAT_EQ(only[1].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(only.sum().item<float>(), 1.0f);
}

TEST(Sampling, SeededDrawsMatchTheReferenceAndRepeat) {
  std::mt19937 generator(17);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<float> logits(64);
  for (auto& value : logits) value = normal(generator);
  const auto logits_tensor = torch::tensor(logits);
  for (const uint64_t seed : {uint64_t{0}, uint64_t{42}}) {
    TokenSampler sampler(SamplingOptions{0.8, 0.9, seed});
    TokenSampler again(SamplingOptions{0.8, 0.9, seed});
    const auto expected = reference_distribution(logits, 0.8, 0.9);
    std::mt19937_64 reference_generator(seed);
    std::vector<int64_t> counts(64, 0);
    for (int draw = 0; draw < 2000; ++draw) {
      const int64_t token = sampler.next(logits_tensor);
      ASSERT_EQ(token, again.next(logits_tensor));
      // The reference draw: u from the top 53 bits, the first token whose running mass exceeds u.
      const double u = static_cast<double>(reference_generator() >> 11) / 9007199254740992.0;
      double running = 0;
      int64_t reference_token = -1;
      for (size_t i = 0; i < expected.size() && reference_token < 0; ++i) {
        running += expected[i];
        if (expected[i] > 0 && running > u) reference_token = static_cast<int64_t>(i);
      }
      ASSERT_EQ(token, reference_token) << "draw " << draw;
      ++counts[static_cast<size_t>(token)];
    }
    // Only nucleus tokens are drawn, the most probable about as often as its probability says.
    const auto best = static_cast<size_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    for (size_t i = 0; i < counts.size(); ++i)
      if (expected[i] == 0) EXPECT_EQ(counts[i], 0);
    EXPECT_NEAR(counts[best] / 2000.0, expected[best], 0.04);
  }
  // Greedy ignores the seed and takes the first maximum.
  TokenSampler greedy(SamplingOptions{0.0, 0.5, 3});
  EXPECT_EQ(greedy.next(torch::tensor(std::vector<float>{0.f, 2.f, 2.f, 1.f})), 1);
}

TEST(Streaming, PrintablePrefixNeverEndsInsideACharacter) {
  using launcher::printable_prefix_length;
  EXPECT_EQ(printable_prefix_length("abc"), 3u);
  EXPECT_EQ(printable_prefix_length(""), 0u);
  EXPECT_EQ(printable_prefix_length("a\xC3"), 1u);                  // first byte of é
  EXPECT_EQ(printable_prefix_length("a\xC3\xA9"), 3u);              // é complete
  EXPECT_EQ(printable_prefix_length("a\xE2\x82"), 1u);              // two of € 's three bytes
  EXPECT_EQ(printable_prefix_length("a\xE2\x82\xAC"), 4u);
  EXPECT_EQ(printable_prefix_length("a\xF0\x9F\x98"), 1u);          // three of 😀's four bytes
  EXPECT_EQ(printable_prefix_length("a\xF0\x9F\x98\x80"), 5u);
  EXPECT_EQ(printable_prefix_length("ab\xEF\xBF\xBD"), 2u);         // a decoder's U+FFFD placeholder
}

}  // namespace
}  // namespace qlora::model
