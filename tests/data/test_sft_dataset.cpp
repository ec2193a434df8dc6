// Instruction datasets: format detection, each format's conversion, malformed records refused with
// FILE:LINE and the field path, and token ids plus loss masks equal to TRL's preparation
// (tests/fixtures/sft/expected.json, made by scripts/make_sft_fixtures.py) for the austen_bpe
// tokenizer with a ChatML template, a Llama 3 style tokenizer (bos added to plain text) and template,
// and, when QLORA_SMOLLM2_GGUF names it, SmolLM2's own.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <memory>

#include "common/errors.h"
#include "common/json.h"
#include "data/chat_template.h"
#include "data/example_cache.h"
#include "data/sft_dataset.h"
#include "data/sft_examples.h"
#include "data/tokenizer.h"
#include "shard/gguf.h"
#include "support/test_support.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using testing_support::read_file;
using testing_support::source_dir;
using testing_support::write_file;

std::string fixture(const std::string& name) { return source_dir() + "/tests/fixtures/" + name; }

const char* kFiles[] = {"text.jsonl", "messages.jsonl", "prompt_completion.jsonl", "prompt_completion_chat.jsonl",
                        "sharegpt.jsonl", "alpaca.json"};

// Writes `text` to a fresh file under the test's temporary folder and returns its path.
std::string temporary_data(const std::string& name, const std::string& text) {
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "sft";
  fs::create_directories(folder);
  write_file((folder / name).string(), text);
  return (folder / name).string();
}

// The message of the FormatError reading `text` (as FILE) raises; "" and a test failure when none.
std::string refusal(const std::string& text, DataFormat format = DataFormat::automatic,
                    const std::string& name = "bad.jsonl") {
  const std::string path = temporary_data(name, text);
  try {
    read_sft_dataset(path, format);
  } catch (const FormatError& error) {
    return std::string(error.what()).substr(path.size());  // from the ":LINE:" on
  } catch (const UserError& error) {
    return std::string("UserError ") + error.what();
  }
  ADD_FAILURE() << "accepted: " << text;
  return "";
}

TEST(SftDataset, DetectsEachFormatFromTheKeys) {
  struct Case {
    const char* file;
    DataFormat format;
    RecordShape shape;
    bool conversational;
    size_t records;
  };
  const Case cases[] = {
      {"text.jsonl", DataFormat::text, RecordShape::text, false, 4},
      {"messages.jsonl", DataFormat::messages, RecordShape::conversation, true, 4},
      {"prompt_completion.jsonl", DataFormat::prompt_completion, RecordShape::prompt_completion, false, 3},
      {"prompt_completion_chat.jsonl", DataFormat::prompt_completion, RecordShape::prompt_completion, true, 3},
      {"sharegpt.jsonl", DataFormat::sharegpt, RecordShape::conversation, true, 2},
      {"alpaca.json", DataFormat::alpaca, RecordShape::prompt_completion, true, 3},
  };
  for (const Case& expected : cases) {
    const SftDataset dataset = read_sft_dataset(fixture(std::string("sft/") + expected.file));
    EXPECT_EQ(data_format_name(dataset.format), data_format_name(expected.format)) << expected.file;
    EXPECT_EQ(static_cast<int>(dataset.shape), static_cast<int>(expected.shape)) << expected.file;
    EXPECT_EQ(dataset.conversational, expected.conversational) << expected.file;
    EXPECT_EQ(dataset.records.size(), expected.records) << expected.file;
  }
  EXPECT_TRUE(is_sft_data_path("a/b.jsonl"));
  EXPECT_TRUE(is_sft_data_path("b.json"));
  EXPECT_FALSE(is_sft_data_path("corpus.txt"));
  EXPECT_FALSE(is_sft_data_path("tokens.h5"));
}

TEST(SftDataset, ConvertsAlpacaAndShareGptToConversations) {
  const SftDataset alpaca = read_sft_dataset(fixture("sft/alpaca.json"));
  ASSERT_EQ(alpaca.records.size(), 3u);
  // Each record is named by the line its object starts on in the pretty-printed array.
  EXPECT_EQ(alpaca.records[0].where, fixture("sft/alpaca.json") + ":2");
  EXPECT_EQ(alpaca.records[1].where, fixture("sft/alpaca.json") + ":7");
  EXPECT_EQ(alpaca.records[2].where, fixture("sft/alpaca.json") + ":12");
  EXPECT_EQ(alpaca.records[0].messages, Json::parse(R"([{"role":"user","content":"Summarise the first sentence of Pride and Prejudice."}])"));
  EXPECT_EQ(alpaca.records[1].messages[0]["content"], "Translate into French.\n\nA single man of good fortune.");
  EXPECT_EQ(alpaca.records[1].completion_messages,
            Json::parse(R"([{"role":"assistant","content":"Un homme seul \u00e0 la belle fortune."}])"));
  EXPECT_EQ(alpaca.records[2].messages[0]["content"], "Count the Bennet daughters.");

  const SftDataset sharegpt = read_sft_dataset(fixture("sft/sharegpt.jsonl"));
  EXPECT_EQ(sharegpt.records[1].where, fixture("sft/sharegpt.jsonl") + ":2");
  std::vector<std::string> roles;
  for (const Json& message : sharegpt.records[1].messages) roles.push_back(message["role"]);
  EXPECT_EQ(roles, (std::vector<std::string>{"system", "user", "assistant", "user", "assistant"}));
  EXPECT_EQ(sharegpt.records[1].messages[2]["content"], "Mr. Collins.");

  const SftDataset text = read_sft_dataset(fixture("sft/text.jsonl"));
  EXPECT_EQ(text.records[2].text, "In 1811, \u00a310,000 a year<|im_end|>");
  const SftDataset standard = read_sft_dataset(fixture("sft/prompt_completion.jsonl"));
  EXPECT_EQ(standard.records[0].prompt, "The sky over Longbourn is");
  EXPECT_EQ(standard.records[0].completion, " grey with rain.");
}

TEST(SftDataset, BlankLinesAreSkippedAndLinesCountedFromTheFile) {
  const std::string path = temporary_data("blank.jsonl", "\n{\"text\": \"a\"}\n   \n\r\n{\"text\": \"b\"}\n\n");
  const SftDataset dataset = read_sft_dataset(path);
  ASSERT_EQ(dataset.records.size(), 2u);
  EXPECT_EQ(dataset.records[0].where, path + ":2");
  EXPECT_EQ(dataset.records[1].where, path + ":5");
  EXPECT_EQ(dataset.records[1].text, "b");
}

TEST(SftDataset, RefusesMalformedRecordsWithFileLineAndField) {
  const std::string good_chat = R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})";
  EXPECT_EQ(refusal(good_chat + "\n" + R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": 3}]})"),
            ":2: messages[2].content: expected a string, got number");
  EXPECT_EQ(refusal(good_chat + "\n" + R"({"messages": [{"content": "a"}]})"), ":2: messages[0].role: missing");
  EXPECT_EQ(refusal(R"({"messages": []})"), ":1: messages: expected at least one message, got an empty list");
  EXPECT_EQ(refusal(R"({"messages": "hello"})"), ":1: messages: expected a list of messages, got string");
  EXPECT_EQ(refusal(R"({"messages": ["hello"]})"),
            ":1: messages[0]: expected an object with \"role\" and \"content\", got string");
  EXPECT_EQ(refusal("{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n").substr(0, 17), ":3: invalid JSON:");
  EXPECT_EQ(refusal("[1, 2]\n"), ":1: expected a JSON object, got number");  // an array file of numbers
  EXPECT_EQ(refusal("{\"text\": \"a\"}\n[1, 2]\n"), ":2: expected a JSON object, got array");
  EXPECT_EQ(refusal("{\"text\": \"a\"}\n" + good_chat + "\n"),
            ":2: the record looks like messages data but the file's first record is text");
  EXPECT_EQ(refusal(R"({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]})"),
            ":1: completion: expected a string like \"prompt\", got array");
  EXPECT_EQ(refusal("{\"prompt\": \"a\", \"completion\": \"b\"}\n" +
                    std::string(R"({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]})")),
            ":2: prompt and completion are message lists but earlier records' are strings");
  EXPECT_EQ(refusal(R"({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]})"),
            std::string(":1: conversations[1].from: unknown role \"robot\" (known: human, user, gpt, assistant, chatgpt, "
                        "bard, bing, model, system, tool, observation, function_response, ipython)"));
  EXPECT_EQ(refusal(R"({"conversations": [{"from": "human", "value": null}]})"),
            ":1: conversations[0].value: expected a string, got null");
  EXPECT_EQ(refusal(R"({"instruction": "a", "input": 5, "output": "b"})"), ":1: input: expected a string, got number");
  EXPECT_EQ(refusal(R"({"instruction": "a", "input": "x"})"),
            ":1: no known instruction-data format in a record with keys \"input\", \"instruction\"");
  EXPECT_EQ(refusal(R"({"instruction": "a", "input": "x"})", DataFormat::alpaca), ":1: output: missing");
  EXPECT_EQ(refusal(good_chat, DataFormat::text), ":1: text: missing");
  EXPECT_EQ(refusal(R"({"text": 7})"), ":1: text: expected a string, got number");
  // A JSON array names the line each element starts on.
  EXPECT_EQ(refusal("[\n  {\"text\": \"a\"},\n  {\n    \"text\": [\"b\"]\n  }\n]\n", DataFormat::automatic, "bad.json"),
            ":3: text: expected a string, got array");
  EXPECT_EQ(refusal("\n \n", DataFormat::automatic), "UserError " + temporary_data("bad.jsonl", "\n \n") + ": no records");
  // A tool call may leave content null; elsewhere null is refused.
  EXPECT_NO_THROW(read_sft_dataset(temporary_data(
      "tools.jsonl", R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": []}]})")));
}

TEST(SftDataset, OptionNamesAndTrainOnDefaults) {
  EXPECT_EQ(data_format_name(parse_data_format("prompt-completion")), "prompt-completion");
  EXPECT_EQ(data_format_name(parse_data_format("sharegpt")), "sharegpt");
  EXPECT_THROW(parse_data_format("csv"), UserError);
  EXPECT_EQ(train_on_name(parse_train_on("assistant")), "assistant");
  EXPECT_THROW(parse_train_on("prompt"), UserError);
  const auto resolved = [](const char* file, TrainOn train_on) {
    return train_on_name(resolve_train_on(train_on, read_sft_dataset(fixture(std::string("sft/") + file))));
  };
  EXPECT_EQ(resolved("text.jsonl", TrainOn::automatic), "all");
  EXPECT_EQ(resolved("messages.jsonl", TrainOn::automatic), "all");
  EXPECT_EQ(resolved("sharegpt.jsonl", TrainOn::automatic), "all");
  EXPECT_EQ(resolved("prompt_completion.jsonl", TrainOn::automatic), "completion");
  EXPECT_EQ(resolved("prompt_completion_chat.jsonl", TrainOn::automatic), "completion");
  EXPECT_EQ(resolved("alpaca.json", TrainOn::automatic), "completion");
  EXPECT_EQ(resolved("messages.jsonl", TrainOn::assistant), "assistant");
  EXPECT_EQ(resolved("alpaca.json", TrainOn::assistant), "assistant");
  EXPECT_THROW(resolved("messages.jsonl", TrainOn::completion), UserError);
  EXPECT_THROW(resolved("text.jsonl", TrainOn::assistant), UserError);
  EXPECT_THROW(resolved("prompt_completion.jsonl", TrainOn::assistant), UserError);
}

// A tokenizer and chat template as a job would bind them.
struct TokenizerSetup {
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;
  ConversationRenderer render;
};

void bind(TokenizerSetup& setup) {
  Json variables = Json::object();
  const Tokenizer& tokenizer = *setup.tokenizer;
  variables["bos_token"] = tokenizer.bos_id() >= 0 ? tokenizer.decode({tokenizer.bos_id()}) : "";
  variables["eos_token"] = tokenizer.eos_id() >= 0 ? tokenizer.decode({tokenizer.eos_id()}) : "";
  // A copy (copies share the parsed program): the setup may move.
  const ChatTemplate chat_template = *setup.chat_template;
  setup.render = [chat_template, variables](const Json& messages, bool add_generation_prompt) {
    return chat_template.render(messages, add_generation_prompt, variables);
  };
}

TokenizerSetup austen_chatml() {
  TokenizerSetup setup;
  setup.tokenizer = load_tokenizer_json(read_file(fixture("tokenizers/austen_bpe.json")), "austen_bpe.json");
  setup.chat_template.emplace(read_file(fixture("sft/chatml.jinja")), "chatml.jinja");
  bind(setup);
  return setup;
}

// A tokenizer whose tokenizer(text) prepends <|begin_of_text|>, and a Llama 3 style template.
TokenizerSetup austen_llama3() {
  TokenizerSetup setup;
  setup.tokenizer = load_tokenizer_json(read_file(fixture("sft/austen_llama3_bos.json")), "austen_llama3_bos.json");
  setup.chat_template.emplace(read_file(fixture("sft/llama3.jinja")), "llama3.jinja");
  bind(setup);
  return setup;
}

std::optional<TokenizerSetup> smollm2() {
  const char* path = std::getenv("QLORA_SMOLLM2_GGUF");
  if (path == nullptr || !fs::exists(path)) return std::nullopt;
  const auto file = shard::GgufFile::open(path);
  TokenizerSetup setup;
  setup.tokenizer = load_gguf_tokenizer(*file);
  setup.chat_template.emplace(file->get_string("tokenizer.chat_template"), path);
  bind(setup);
  return setup;
}

std::vector<uint8_t> mask_of(const Json& bits) {
  std::vector<uint8_t> mask;
  for (const Json& bit : bits) mask.push_back(static_cast<uint8_t>(bit.get<int>()));
  return mask;
}

// Every file, every --train-on choice the fixture records: ids and masks bit for bit.
void expect_fixture_cases(const TokenizerSetup& setup, const std::string& name) {
  const Json expected = parse_json(read_file(fixture("sft/expected.json")), "expected.json")["cases"][name];
  int64_t compared = 0;
  for (const char* file : kFiles) {
    const SftDataset dataset = read_sft_dataset(fixture(std::string("sft/") + file));
    const Json& cases = expected.at(file);
    ASSERT_EQ(cases.size(), dataset.records.size()) << file;
    const auto all = tokenize_sft_dataset(dataset, *setup.tokenizer, setup.render, TrainOn::all);
    for (size_t i = 0; i < cases.size(); ++i) {
      const std::vector<int32_t> ids = cases[i]["input_ids"].get<std::vector<int32_t>>();
      EXPECT_EQ(all[i].tokens, ids) << name << " " << file << " record " << i;
      EXPECT_EQ(all[i].counted, std::vector<uint8_t>(ids.size(), 1)) << name << " " << file << " record " << i;
    }
    for (const auto& [mode, train_on] : {std::pair{"completion", TrainOn::completion}, std::pair{"assistant", TrainOn::assistant}}) {
      if (!cases[0].contains(mode)) continue;
      const auto examples = tokenize_sft_dataset(dataset, *setup.tokenizer, setup.render, train_on);
      for (size_t i = 0; i < cases.size(); ++i) {
        EXPECT_EQ(examples[i].tokens, cases[i]["input_ids"].get<std::vector<int32_t>>()) << name << " " << file << " " << mode;
        EXPECT_EQ(examples[i].counted, mask_of(cases[i][mode])) << name << " " << file << " record " << i << " " << mode;
        ++compared;
      }
    }
  }
  // 3 + 3 + 3 completion masks, 4 + 3 + 2 + 3 assistant masks.
  EXPECT_EQ(compared, 21);
}

TEST(SftExamples, MatchTrlOnTheAustenTokenizerWithChatMl) { expect_fixture_cases(austen_chatml(), "austen_chatml"); }

TEST(SftExamples, MatchTrlOnALlama3StyleTokenizerThatAddsBos) {
  const TokenizerSetup setup = austen_llama3();
  ASSERT_TRUE(setup.tokenizer->adds_bos());
  EXPECT_FALSE(austen_chatml().tokenizer->adds_bos());
  expect_fixture_cases(setup, "austen_llama3");
}

TEST(SftExamples, MatchTrlOnSmolLM2) {
  auto setup = smollm2();
  if (!setup) GTEST_SKIP() << "set QLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run";
  expect_fixture_cases(*setup, "smollm2");
}

TEST(SftExamples, ConversationsWithoutATemplateAskForOne) {
  const TokenizerSetup setup = austen_chatml();
  const SftDataset dataset = read_sft_dataset(fixture("sft/messages.jsonl"));
  try {
    tokenize_sft_dataset(dataset, *setup.tokenizer, ConversationRenderer(), TrainOn::automatic);
    ADD_FAILURE() << "conversations tokenized without a template";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("messages.jsonl: messages data is conversational and needs a chat template"),
              std::string::npos) << error.what();
    EXPECT_NE(error.hint.find("--chat-template FILE"), std::string::npos);
  }
  // Text needs none.
  const auto text = tokenize_sft_dataset(read_sft_dataset(fixture("sft/text.jsonl")), *setup.tokenizer,
                                         ConversationRenderer(), TrainOn::automatic);
  EXPECT_EQ(text.size(), 4u);
}

TEST(SftExamples, AssistantMaskNamesTheRecordWhenTheTemplateHidesAReply) {
  TokenizerSetup setup = austen_chatml();
  // A template that renders only the user's turns: no assistant content to locate.
  setup.chat_template.emplace("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
                              "users-only");
  bind(setup);
  const SftDataset dataset = read_sft_dataset(fixture("sft/messages.jsonl"));
  try {
    tokenize_sft_dataset(dataset, *setup.tokenizer, setup.render, TrainOn::assistant);
    ADD_FAILURE() << "assistant mask built without the assistant's text";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("messages.jsonl:1: message 1 (assistant): its content does not appear"),
              std::string::npos) << error.what();
  }
  // raise_exception in a template names the record too.
  setup.chat_template.emplace("{{ raise_exception('no system role') }}", "raising");
  bind(setup);
  try {
    tokenize_sft_dataset(dataset, *setup.tokenizer, setup.render, TrainOn::all);
    ADD_FAILURE() << "a raising template rendered";
  } catch (const UserError& error) {
    EXPECT_NE(std::string(error.what()).find("messages.jsonl:1: "), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("no system role"), std::string::npos) << error.what();
  }
}

TEST(SftExamples, AssistantRepliesThatRepeatTheUserAreFoundInTheirOwnTurn) {
  const TokenizerSetup setup = austen_chatml();
  const Json messages = Json::parse(R"([{"role": "user", "content": "Say: Netherfield"},
                                        {"role": "assistant", "content": "Netherfield"}])");
  const std::string rendered = setup.render(messages, false);
  const auto ranges = assistant_content_ranges(rendered, messages, "here");
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_EQ(rendered.substr(ranges[0].first, ranges[0].second - ranges[0].first), "Netherfield");
  EXPECT_GT(ranges[0].first, rendered.find("Say: Netherfield") + 5);
  // Token ranges cover the text exactly, in order.
  const auto tokens = setup.tokenizer->encode(rendered);
  const auto token_ranges = token_byte_ranges(rendered, tokens, *setup.tokenizer);
  ASSERT_EQ(token_ranges.size(), tokens.size());
  EXPECT_EQ(token_ranges.front().first, 0u);
  EXPECT_EQ(token_ranges.back().second, rendered.size());
  for (size_t i = 1; i < token_ranges.size(); ++i) EXPECT_EQ(token_ranges[i].first, token_ranges[i - 1].second);
}

std::vector<std::string> partial_files(const fs::path& folder) {
  std::vector<std::string> found;
  for (const auto& entry : fs::directory_iterator(folder))
    if (entry.path().filename().string().find(".partial") != std::string::npos) found.push_back(entry.path().string());
  return found;
}

TEST(ExampleCache, BuildsOnceAndRebuildsWhenAnyIngredientChanges) {
  const TokenizerSetup setup = austen_chatml();
  const std::string data = temporary_data("cached.jsonl", read_file(fixture("sft/messages.jsonl")));
  fs::remove(example_cache_path(data));
  ExampleRecipe recipe;
  recipe.tokenizer = setup.tokenizer.get();
  recipe.tokenizer_checksum = "austen";
  recipe.template_source = read_file(fixture("sft/chatml.jinja"));
  recipe.render = setup.render;
  recipe.train_on = TrainOn::assistant;

  const ExampleCacheResult first = ensure_example_cache(data, recipe);
  EXPECT_TRUE(first.built);
  EXPECT_EQ(first.path, example_cache_path(data));
  EXPECT_EQ(first.format, "messages");
  EXPECT_EQ(first.train_on, "assistant");
  const auto direct = tokenize_sft_dataset(read_sft_dataset(data), *setup.tokenizer, setup.render, TrainOn::assistant);
  const auto cached = read_example_file(first.path);
  ASSERT_EQ(cached.size(), direct.size());
  int64_t tokens = 0, counted = 0;
  for (size_t i = 0; i < direct.size(); ++i) {
    EXPECT_EQ(cached[i].tokens, direct[i].tokens) << i;
    EXPECT_EQ(cached[i].counted, direct[i].counted) << i;
    tokens += static_cast<int64_t>(direct[i].tokens.size());
    for (uint8_t bit : direct[i].counted) counted += bit;
  }
  EXPECT_EQ(first.examples, 4);
  EXPECT_EQ(first.tokens, tokens);
  EXPECT_EQ(first.counted, counted);
  EXPECT_LT(counted, tokens);

  // The second run reuses the file: same summary, nothing rewritten.
  const auto written = fs::last_write_time(first.path);
  const ExampleCacheResult second = ensure_example_cache(data, recipe);
  EXPECT_FALSE(second.built);
  EXPECT_EQ(second.tokens, tokens);
  EXPECT_EQ(second.counted, counted);
  EXPECT_EQ(second.train_on, "assistant");
  EXPECT_EQ(fs::last_write_time(first.path), written);

  // Each ingredient of the key forces a rebuild.
  recipe.train_on = TrainOn::all;
  const ExampleCacheResult all = ensure_example_cache(data, recipe);
  EXPECT_TRUE(all.built);
  EXPECT_EQ(all.counted, tokens);
  recipe.template_source += " ";
  EXPECT_TRUE(ensure_example_cache(data, recipe).built);
  EXPECT_FALSE(ensure_example_cache(data, recipe).built);
  recipe.tokenizer_checksum = "another";
  EXPECT_TRUE(ensure_example_cache(data, recipe).built);
  recipe.format = DataFormat::messages;
  EXPECT_TRUE(ensure_example_cache(data, recipe).built);
  write_file(data, read_file(data) + "\n");  // a blank line more: the same records, other bytes
  EXPECT_TRUE(ensure_example_cache(data, recipe).built);
  // A damaged cache file is rebuilt, not trusted.
  write_file(example_cache_path(data), "not HDF5");
  EXPECT_TRUE(ensure_example_cache(data, recipe).built);
  EXPECT_EQ(read_example_file(example_cache_path(data)).size(), 4u);
  EXPECT_TRUE(partial_files(fs::path(data).parent_path()).empty());
}

TEST(ExampleCache, LeavesNothingBehindWhenTheDataIsRefused) {
  const TokenizerSetup setup = austen_chatml();
  const std::string data = temporary_data("refused.jsonl", "{\"text\": \"fine\"}\n{\"text\": 3}\n");
  fs::remove(example_cache_path(data));
  ExampleRecipe recipe;
  recipe.tokenizer = setup.tokenizer.get();
  recipe.tokenizer_checksum = "austen";
  EXPECT_THROW(ensure_example_cache(data, recipe), FormatError);
  EXPECT_FALSE(fs::exists(example_cache_path(data)));
  EXPECT_TRUE(partial_files(fs::path(data).parent_path()).empty());
  // write_example_file into a missing folder fails cleanly too.
  EXPECT_THROW(write_example_file("/nonexistent-folder/x.examples.h5", {}, {}), UserError);
  EXPECT_THROW(read_example_file(data), FormatError);
}

}  // namespace
}  // namespace qlora::data
