// Tokenizers against the reference implementations: the ids Hugging Face `tokenizers` and
// `sentencepiece` give for tests/fixtures/tokenizers/cases.json (made by
// scripts/make_tokenizer_fixtures.py: non-ASCII text, digits, white space runs, special tokens and
// Austen excerpts), decoding back to the text, tokenizers embedded in model stores by the converter,
// and (when QLORA_SMOLLM2_GGUF names it) SmolLM2-135M's own tokenizer read from its GGUF file.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/json.h"
#include "data/bpe_tokenizer.h"
#include "data/tokenizer.h"
#include "shard/converter.h"
#include "shard/gguf.h"
#include "shard/model_store.h"
#include "support/test_support.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;

std::string fixture(const std::string& name) {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/fixtures/tokenizers/" + name;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

struct Cases {
  std::vector<std::string> texts;
  Json ids;
};

const Cases& cases() {
  static const Cases loaded = [] {
    const Json root = parse_json(read_file(fixture("cases.json")), "cases.json");
    Cases result;
    for (const Json& text : root.at("texts")) result.texts.push_back(text.get<std::string>());
    result.ids = root.at("ids");
    return result;
  }();
  return loaded;
}

std::vector<int32_t> expected_ids(const std::string& tokenizer, size_t text_index) {
  std::vector<int32_t> ids;
  for (const Json& id : cases().ids.at(tokenizer).at(text_index))
    ids.push_back(static_cast<int32_t>(json_as_int(id, "cases.json: an id")));
  return ids;
}

std::unique_ptr<Tokenizer> load_fixture(const std::string& name) {
  const std::string path = fixture(name);
  if (name.size() > 5 && name.substr(name.size() - 5) == ".json") return load_tokenizer_json(read_file(path), path);
  if (name.size() > 5 && name.substr(name.size() - 5) == ".gguf") return load_gguf_tokenizer(*shard::GgufFile::open(path));
  return load_sentencepiece(read_file(path), path);
}

// Every text: the ids equal the reference's; returns how many ids were compared.
int64_t expect_reference_ids(const Tokenizer& tokenizer, const std::string& name, bool round_trip) {
  int64_t compared = 0;
  for (size_t i = 0; i < cases().texts.size(); ++i) {
    const std::string& text = cases().texts[i];
    const std::vector<int32_t> want = expected_ids(name, i);
    const std::vector<int32_t> got = tokenizer.encode(text);
    EXPECT_EQ(got, want) << name << ", text " << i << ": '" << text.substr(0, 80) << "'";
    if (round_trip) EXPECT_EQ(tokenizer.decode(got), text) << name << ", text " << i;
    compared += static_cast<int64_t>(want.size());
  }
  return compared;
}

class ReferenceIds : public testing::TestWithParam<const char*> {};

TEST_P(ReferenceIds, EqualTheReferenceImplementationsAndDecodeBack) {
  const std::string name = GetParam();
  const bool is_sentencepiece = name.find(".model") != std::string::npos;
  if (is_sentencepiece && !sentencepiece_available()) GTEST_SKIP() << "built without libsentencepiece";
  const auto tokenizer = load_fixture(name);
  // Byte-level BPE is lossless; SentencePiece turns white space runs into single separators.
  const int64_t compared = expect_reference_ids(*tokenizer, name, !is_sentencepiece);
  EXPECT_GT(compared, 2000);
  std::printf("%s: %zu texts, %lld ids equal\n", name.c_str(), cases().texts.size(), static_cast<long long>(compared));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ReferenceIds,
                         testing::Values("austen_bpe.json", "austen_gpt2.json", "austen_llama3.json", "austen_bpe.gguf",
                                         "austen_llama3.gguf", "austen_unigram.model", "austen_spm_bpe.model"),
                         [](const testing::TestParamInfo<const char*>& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return name;
                         });

TEST(Tokenizer, SpecialIdsAndVocabularySizes) {
  const auto json = load_fixture("austen_bpe.json");
  EXPECT_EQ(json->vocab_size(), 1024);
  EXPECT_EQ(json->eos_id(), 0) << "<|endoftext|>";
  EXPECT_EQ(json->bos_id(), -1);
  EXPECT_EQ(json->kind(), "tokenizer.json");
  const auto gguf = load_fixture("austen_bpe.gguf");
  EXPECT_EQ(gguf->vocab_size(), 1024);
  EXPECT_EQ(gguf->bos_id(), 1);
  EXPECT_EQ(gguf->eos_id(), 2);
  EXPECT_EQ(gguf->encode("<|im_end|>"), std::vector<int32_t>{2});
  const auto bytes = make_byte_tokenizer();
  EXPECT_EQ(bytes->encode("A\xC3\xA9"), (std::vector<int32_t>{65, 0xC3, 0xA9}));
  EXPECT_EQ(bytes->decode({72, 105}), "Hi");
  if (sentencepiece_available()) {
    const auto unigram = load_fixture("austen_unigram.model");
    EXPECT_EQ(unigram->vocab_size(), 1000);
    EXPECT_EQ(unigram->bos_id(), 1);
    EXPECT_EQ(unigram->eos_id(), 2);
  }
}

TEST(Tokenizer, InvalidUtf8IsEncodedByteForByteAndDecodesBack) {
  const auto tokenizer = load_fixture("austen_bpe.json");
  const std::string text = std::string("ab\xFF\xC3(\xE2\x82 ok \xF0\x9F\x8E", 15) + "\x89 end";
  EXPECT_EQ(tokenizer->decode(tokenizer->encode(text)), text);
}

TEST(Tokenizer, PreTokenizerSplitsAsTheExpressionsDo) {
  auto pieces = [](const std::string& text, std::vector<PreTokenizerStep> steps) {
    std::vector<std::string> out;
    for (const auto& [first, second] : pre_tokenize(text, steps)) out.push_back(text.substr(first, second - first));
    return out;
  };
  using Step = PreTokenizerStep;
  EXPECT_EQ(pieces("a  b   c\n", {Step::gpt2_expression}), (std::vector<std::string>{"a", " ", " b", "  ", " c", "\n"}));
  EXPECT_EQ(pieces("I'll pay 1234!", {Step::digits_individual, Step::gpt2_expression}),
            (std::vector<std::string>{"I", "'ll", " pay", " ", "1", "2", "3", "4", "!"}));
  EXPECT_EQ(pieces("I'LL pay 12345!\n\n  x", {Step::llama3_expression}),
            (std::vector<std::string>{"I", "'LL", " pay", " ", "123", "45", "!\n\n", " ", " x"}));
}

TEST(Tokenizer, EncodingInPiecesCutAfterALineBreakEqualsEncodingTheWhole) {
  // The data pipeline tokenizes large files in chunks cut after a line break that precedes a
  // non-space character; for byte-level BPE that must not change a single id.
  const auto tokenizer = load_fixture("austen_llama3.json");
  std::string text;
  for (size_t i = cases().texts.size() - 6; i < cases().texts.size(); ++i) text += cases().texts[i];
  const size_t cut = text.find("\n", text.size() / 2);
  ASSERT_NE(cut, std::string::npos);
  size_t at = cut + 1;
  while (at < text.size() && (text[at] == '\n' || text[at] == ' ')) ++at;
  auto pieces = tokenizer->encode(std::string_view(text).substr(0, at));
  const auto rest = tokenizer->encode(std::string_view(text).substr(at));
  pieces.insert(pieces.end(), rest.begin(), rest.end());
  EXPECT_EQ(pieces, tokenizer->encode(text));
}

TEST(Tokenizer, RefusesWhatItCannotReproduce) {
  auto expect_refused = [](const std::string& json, const std::string& needle) {
    try {
      load_tokenizer_json(json, "tok.json");
      ADD_FAILURE() << "accepted: " << json;
    } catch (const FormatError& error) {
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
    }
  };
  expect_refused("{not json", "tok.json: invalid JSON");
  expect_refused(R"({"model": {"type": "Unigram", "vocab": []}})", "model type 'Unigram' is not supported");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}})",
                 "pre-tokenizer 'Metaspace' is not supported");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {"a": 0, "tok": 1}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}})",
                 "tokens for only 1 of the 256 byte characters");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Split",
                   "pattern": {"Regex": "\\w+"}, "behavior": "Isolated", "invert": false}})",
                 "expression '\\w+' is not one qlora implements");
  expect_refused(R"({"normalizer": {"type": "NFC"}, "model": {"type": "BPE", "vocab": {}, "merges": []}})",
                 "normalizer 'NFC' is not supported");
}

// ---- tokenizers embedded in model stores ----------------------------------------------------------

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

TEST(StoreTokenizer, HfFolderAndGgufTokenizersTravelInsideTheStore) {
  const std::string folder = testing_support::shared_temp_dir(MPI_COMM_SELF);
  const std::string source = std::string(std::getenv("QLORA_SOURCE_DIR") ? std::getenv("QLORA_SOURCE_DIR") : ".");
  const std::string text = cases().texts.back();

  // A Hugging Face folder (the Llama model fixture) with our tokenizer.json and a config naming its tokens.
  const fs::path hf = fs::path(folder) / "hf_with_tokenizer";
  fs::create_directories(hf);
  for (const auto& entry : fs::directory_iterator(source + "/tests/fixtures/model/llama/hf"))
    fs::copy_file(entry.path(), hf / entry.path().filename(), fs::copy_options::overwrite_existing);
  ASSERT_TRUE(fs::exists(hf / "config.json"));
  write_file(hf / "tokenizer.json", read_file(fixture("austen_bpe.json")));
  write_file(hf / "tokenizer_config.json", R"({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}})");
  shard::ConvertOptions checked;   // the converter as `qlora convert` runs it
  checked.check_tokenizer = check_tokenizer;
  const std::string hf_store = folder + "/hf_tokenizer.h5";
  shard::convert_hf_directory(hf.string(), hf_store, checked);
  {
    const auto store = shard::ModelStore::open(hf_store);
    EXPECT_EQ(store->header().tokenizer, "tokenizer.json");
    const auto tokenizer = load_store_tokenizer(*store);
    EXPECT_EQ(tokenizer->bos_id(), 1);
    EXPECT_EQ(tokenizer->eos_id(), 2);
    EXPECT_EQ(tokenizer->encode(text), expected_ids("austen_bpe.json", cases().texts.size() - 1));
  }
  // tokenizer.model is used when tokenizer.json is absent.
  if (sentencepiece_available()) {
    fs::remove(hf / "tokenizer.json");
    write_file(hf / "tokenizer.model", read_file(fixture("austen_unigram.model")));
    const std::string sp_store = folder + "/hf_sentencepiece.h5";
    shard::convert_hf_directory(hf.string(), sp_store, checked);
    const auto store = shard::ModelStore::open(sp_store);
    EXPECT_EQ(store->header().tokenizer, "sentencepiece");
    EXPECT_EQ(load_store_tokenizer(*store)->encode(text), expected_ids("austen_unigram.model", cases().texts.size() - 1));
  }
  // A tokenizer.json qlora cannot reproduce next to a tokenizer.model, as Llama 2 ships them: the checked
  // conversion embeds the SentencePiece model; an unchecked one keeps tokenizer.json, and using it
  // names the reason.
  write_file(hf / "tokenizer.json", R"({"model": {"type": "BPE", "byte_fallback": true, "vocab": {}, "merges": []}})");
  write_file(hf / "tokenizer.model", read_file(fixture("austen_unigram.model")));
  const std::string preferred_store = folder + "/hf_preferred.h5";
  shard::convert_hf_directory(hf.string(), preferred_store, checked);
  EXPECT_EQ(shard::ModelStore::open(preferred_store)->header().tokenizer, "sentencepiece");
  const std::string unchecked_store = folder + "/hf_unchecked.h5";
  shard::convert_hf_directory(hf.string(), unchecked_store, shard::ConvertOptions{});
  const auto unchecked = shard::ModelStore::open(unchecked_store);
  EXPECT_EQ(unchecked->header().tokenizer, "tokenizer.json");
  try {
    load_store_tokenizer(*unchecked);
    ADD_FAILURE() << "a byte_fallback tokenizer.json was loaded";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("a BPE with byte_fallback (SentencePiece style) is not supported"),
              std::string::npos)
        << error.what();
  }
  fs::remove(hf / "tokenizer.json");
  // A corrupt tokenizer.model fails the checked conversion, when the SentencePiece module can tell.
  if (sentencepiece_available()) {
    write_file(hf / "tokenizer.model", "not a SentencePiece model");
    EXPECT_THROW(shard::convert_hf_directory(hf.string(), folder + "/hf_corrupt.h5", checked), FormatError);
  }

  // No tokenizer at all: the store opens, and asking for its tokenizer says what to do.
  fs::remove(hf / "tokenizer.model");
  const std::string bare_store = folder + "/hf_bare.h5";
  shard::convert_hf_directory(hf.string(), bare_store, checked);
  const auto bare = shard::ModelStore::open(bare_store);
  EXPECT_EQ(bare->header().tokenizer, "none");
  try {
    load_store_tokenizer(*bare);
    ADD_FAILURE() << "a store without a tokenizer gave one";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find(bare_store + ": the model store carries no tokenizer"), std::string::npos)
        << error.what();
  }

  // A GGUF model: its tokenizer.* metadata becomes a small GGUF image inside the store.
  const auto gguf_file = shard::GgufFile::open(fixture("austen_bpe.gguf"));
  const shard::TokenizerSource embedded = shard::tokenizer_from_gguf(*gguf_file);
  EXPECT_EQ(embedded.kind, "gguf");
  const auto reloaded = load_tokenizer(embedded, "embedded");
  EXPECT_EQ(reloaded->encode(text), expected_ids("austen_bpe.gguf", cases().texts.size() - 1));
  EXPECT_EQ(reloaded->eos_id(), 2);
  // Synthetic stores keep byte tokens.
  const auto synthetic = shard::ModelStore::open(testing_support::synthetic_store("micro", 64, MPI_COMM_SELF));
  EXPECT_EQ(load_store_tokenizer(*synthetic)->kind(), "bytes");
}

// ---- SmolLM2-135M-Instruct's own tokenizer, when its GGUF is available -------------------------------

TEST(SmolLM2Tokenizer, GgufTokenizerGivesTheHuggingFaceIds) {
  const char* location = std::getenv("QLORA_SMOLLM2_GGUF");
  if (location == nullptr || !fs::exists(location))
    GTEST_SKIP() << "set QLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run this test";
  if (!cases().ids.contains("smollm2")) GTEST_SKIP() << "cases.json was made without --smollm2";
  const auto file = shard::GgufFile::open(location);
  const auto tokenizer = load_gguf_tokenizer(*file);
  EXPECT_EQ(tokenizer->vocab_size(), 49152);
  const int64_t compared = expect_reference_ids(*tokenizer, "smollm2", true);
  std::printf("SmolLM2: %zu texts, %lld ids equal\n", cases().texts.size(), static_cast<long long>(compared));

  // Throughput on Austen text (the first novel, once, cold cache).
  const char* austen = "/work/shared/data/austen/emma.txt";
  if (fs::exists(austen)) {
    const std::string text = read_file(austen);
    const auto start = std::chrono::steady_clock::now();
    const auto ids = tokenizer->encode(text);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("SmolLM2 tokenizer: %.2f MB in %.3f s = %.1f MB/s, %zu tokens (%.2f bytes/token)\n",
                text.size() / 1e6, seconds, text.size() / 1e6 / seconds, ids.size(),
                static_cast<double>(text.size()) / static_cast<double>(ids.size()));
    EXPECT_EQ(tokenizer->decode(ids), text);
  }
}

}  // namespace
}  // namespace qlora::data
