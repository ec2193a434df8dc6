// Loading --data for a model on every rank: the store's own tokenizer (refused when it outgrows the
// model's vocabulary), pre-tokenized HDF5 files used as they are, and byte tokens for synthetic stores.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "cluster/mpi_communicator.h"
#include "common/errors.h"
#include "common/json.h"
#include "data/chat_template.h"
#include "data/example_cache.h"
#include "data/sft_dataset.h"
#include "data/sft_examples.h"
#include "data/token_cache.h"
#include "data/token_stream.h"
#include "launcher/data_loading.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;
using testing_support::source_dir;
using testing_support::write_file;

std::vector<int64_t> all_tokens(const data::TokenStream& stream) {
  std::vector<int64_t> tokens(static_cast<size_t>(stream.size()));
  stream.read(0, stream.size(), tokens.data());
  return tokens;
}

TEST(LoadDataTokens, UsesTheStoresTokenizerAndAcceptsPreTokenizedFiles) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "load";
  fs::create_directories(folder);
  // A store with an embedded tokenizer.json: the Llama model fixture plus the fixture tokenizer.
  const fs::path hf = folder / "hf";
  fs::create_directories(hf);
  for (const auto& entry : fs::directory_iterator(source_dir() + "/tests/fixtures/model/llama/hf"))
    fs::copy_file(entry.path(), hf / entry.path().filename(), fs::copy_options::overwrite_existing);
  fs::copy_file(source_dir() + "/tests/fixtures/tokenizers/austen_bpe.json", hf / "tokenizer.json");
  const std::string store_path = (folder / "model.h5").string();
  shard::convert_hf_directory(hf.string(), store_path, shard::ConvertOptions{});
  const auto store = shard::ModelStore::open(store_path);
  const std::string text = "It is a truth universally acknowledged. 1811!\n";
  write_file(folder / "data.txt", text);

  // The fixture model has 300 embedding rows, the tokenizer 1024 ids: refused before any training.
  ASSERT_EQ(store->header().tokenizer, "tokenizer.json");
  try {
    load_data_tokens((folder / "data.txt").string(), *store, *communicator, true);
    ADD_FAILURE() << "a tokenizer larger than the model's vocabulary was accepted";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("has 1024 tokens but the model's vocabulary only 300"), std::string::npos)
        << error.what();
  }

  // Pre-tokenized input is used as it is; ids outside the vocabulary are refused.
  const std::string synthetic = testing_support::synthetic_store("micro", 64, MPI_COMM_SELF);
  const auto micro = shard::ModelStore::open(synthetic);
  const std::string good = (folder / "good.h5").string();
  data::write_token_file(good, {1, 2, 3, 511}, "x", "bytes", "x");
  EXPECT_EQ(all_tokens(*load_data_tokens(good, *micro, *communicator, true)), (std::vector<int64_t>{1, 2, 3, 511}));
  const std::string bad = (folder / "bad.h5").string();
  data::write_token_file(bad, {1, 2, 512}, "x", "bytes", "x");
  try {
    load_data_tokens(bad, *micro, *communicator, true);
    ADD_FAILURE() << "token id 512 accepted for a 512-token vocabulary";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find(bad + " holds token id 512"), std::string::npos) << error.what();
  }
  // A synthetic store tokenizes text as bytes, with no end-of-text token.
  EXPECT_EQ(all_tokens(*load_data_tokens((folder / "data.txt").string(), *micro, *communicator, true)),
            data::byte_tokens(text));
}

TEST(LoadDataExamples, TokenizesInstructionDataOnceAndLeavesTextToTheTokenPath) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "examples";
  fs::create_directories(folder);
  // The micro store tokenizes as bytes and carries no chat template.
  const auto store = shard::ModelStore::open(testing_support::synthetic_store("micro", 64, MPI_COMM_SELF));
  const std::string chats = (folder / "chats.jsonl").string();
  fs::copy_file(source_dir() + "/tests/fixtures/sft/messages.jsonl", chats, fs::copy_options::overwrite_existing);
  fs::remove(data::example_cache_path(chats));
  write_file(folder / "notes.txt", "plain text\n");

  ExampleOptions options;
  EXPECT_FALSE(load_data_examples((folder / "notes.txt").string(), options, *store, *communicator, true).has_value());
  EXPECT_FALSE(load_data_examples("", options, *store, *communicator, true).has_value());
  EXPECT_FALSE(is_instruction_data((folder / "notes.txt").string(), options));
  EXPECT_TRUE(is_instruction_data(chats, options));

  // Conversations without a template: the hint names --chat-template.
  try {
    load_data_examples(chats, options, *store, *communicator, true);
    ADD_FAILURE() << "conversations tokenized without a chat template";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("needs a chat template"), std::string::npos) << error.what();
  }
  EXPECT_FALSE(fs::exists(data::example_cache_path(chats)));

  options.chat_template_path = source_dir() + "/tests/fixtures/sft/chatml.jinja";
  options.train_on = data::TrainOn::assistant;
  const auto examples = load_data_examples(chats, options, *store, *communicator, true);
  ASSERT_TRUE(examples.has_value());
  // The same as tokenizing here with the store's (byte) tokenizer and the template file.
  const auto tokenizer = data::make_byte_tokenizer();
  const data::ChatTemplate chat_template(testing_support::read_file(options.chat_template_path), "chatml.jinja");
  const Json variables = {{"bos_token", ""}, {"eos_token", ""}};
  const data::ConversationRenderer render = [&](const Json& messages, bool add_generation_prompt) {
    return chat_template.render(messages, add_generation_prompt, variables);
  };
  const auto expected = data::tokenize_sft_dataset(data::read_sft_dataset(chats), *tokenizer, render, data::TrainOn::assistant);
  ASSERT_EQ(examples->size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ((*examples)[i].tokens, expected[i].tokens) << i;
    EXPECT_EQ((*examples)[i].counted, expected[i].counted) << i;
  }
  // "<|im_start|>user\n" as bytes opens the first example; its user turn is not counted.
  EXPECT_EQ((*examples)[0].tokens[0], '<');
  EXPECT_EQ((*examples)[0].counted[0], 0);
  ASSERT_TRUE(fs::exists(data::example_cache_path(chats)));
  const auto written = fs::last_write_time(data::example_cache_path(chats));
  const auto again = load_data_examples(chats, options, *store, *communicator, true);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(fs::last_write_time(data::example_cache_path(chats)), written);
  EXPECT_EQ((*again)[3].counted, expected[3].counted);

  // Choices that do not fit the data are refused on every path.
  options.train_on = data::TrainOn::completion;
  EXPECT_THROW(load_data_examples(chats, options, *store, *communicator, true), UserError);
  EXPECT_THROW(load_data_examples((folder / "notes.txt").string(), options, *store, *communicator, true), UserError);
  options.train_on = data::TrainOn::automatic;
  options.format = data::DataFormat::messages;
  EXPECT_THROW(is_instruction_data(folder.string(), options), UserError);
  EXPECT_TRUE(is_instruction_data((folder / "notes.txt").string(), options));  // forced: read as JSONL
  options.chat_template_path = (folder / "missing.jinja").string();
  EXPECT_THROW(load_data_examples(chats, options, *store, *communicator, true), UserError);
}

// The whole path on a real model: SmolLM2's GGUF converted to a store carries its tokenizer and chat
// template, and the loader's examples equal TRL's (tests/fixtures/sft/expected.json) without any
// --chat-template.
TEST(LoadDataExamples, UseTheTemplateStoredFromSmolLM2sGguf) {
  const char* gguf = std::getenv("QLORA_SMOLLM2_GGUF");
  if (gguf == nullptr || !fs::exists(gguf)) GTEST_SKIP() << "set QLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run";
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "examples-smollm2";
  fs::create_directories(folder);
  const std::string store_path = (folder / "smollm2.h5").string();
  shard::convert_gguf_file(gguf, store_path, shard::ConvertOptions{});
  const auto store = shard::ModelStore::open(store_path);
  ASSERT_FALSE(store->header().chat_template.empty());
  const Json expected = parse_json(testing_support::read_file(source_dir() + "/tests/fixtures/sft/expected.json"),
                                   "expected.json")["cases"]["smollm2"];
  for (const char* file : {"sharegpt.jsonl", "alpaca.json"}) {
    const std::string data = (folder / file).string();
    fs::copy_file(source_dir() + "/tests/fixtures/sft/" + file, data, fs::copy_options::overwrite_existing);
    ExampleOptions options;
    options.train_on = data::TrainOn::assistant;
    const auto examples = load_data_examples(data, options, *store, *communicator, true);
    ASSERT_TRUE(examples.has_value());
    const Json& cases = expected.at(file);
    ASSERT_EQ(examples->size(), cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
      EXPECT_EQ((*examples)[i].tokens, cases[i]["input_ids"].get<std::vector<int32_t>>()) << file << " " << i;
      std::vector<uint8_t> mask;
      for (const Json& bit : cases[i]["assistant"]) mask.push_back(static_cast<uint8_t>(bit.get<int>()));
      EXPECT_EQ((*examples)[i].counted, mask) << file << " " << i;
    }
  }
}

}  // namespace
}  // namespace qlora::launcher
