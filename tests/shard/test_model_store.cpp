// The 4-bit store: conversion (synthetic and Hugging Face folders), per-rank hyperslab reads that
// reassemble the whole tensor for any world size, bytes read per rank, and refusals of bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <unistd.h>

#include "common/json.h"
#include "kernels/dtype.h"
#include "kernels/nf4.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora::shard {
namespace {

using testing_support::shared_temp_dir;
using testing_support::synthetic_store;

TEST(ModelStore, SyntheticStoreHasEveryTensorWithItsShape) {
  auto store = ModelStore::open(synthetic_store("tiny"));
  const ModelConfig& config = store->header().config;
  EXPECT_EQ(config.hidden_size, 256);
  EXPECT_EQ(config.num_hidden_layers, 4);
  EXPECT_EQ(config.num_attention_heads, 8);
  EXPECT_EQ(config.num_key_value_heads, 4);
  EXPECT_EQ(config.vocab_size, 512);
  EXPECT_EQ(store->tensors().size(), config.tensor_names().size());
  int64_t quantized = 0;
  for (const auto& tensor : store->tensors()) {
    EXPECT_EQ(tensor.shape, config.expected_shape(tensor.name)) << tensor.name;
    EXPECT_EQ(tensor.quantized, ModelConfig::is_block_linear(tensor.name)) << tensor.name;
    if (tensor.quantized) ++quantized;
  }
  EXPECT_EQ(quantized, 4 * 7);
  EXPECT_EQ(store->header().blocksize, 64);
  EXPECT_EQ(store->header().quant_type, "nf4");
}

// Reading every rank's hyperslab and placing it at its offsets rebuilds exactly the world-1 bytes,
// including world sizes that do not divide the block count.
TEST(ModelStore, ShardsOfAnyWorldSizeReassembleTheTensor) {
  auto store = ModelStore::open(synthetic_store("tiny"));
  const std::string name = "model.layers.1.mlp.down_proj.weight";
  const StoredTensor& tensor = store->tensor(name);
  const int64_t blocksize = store->header().blocksize;
  const ShardRange whole = shard_range(tensor.numel, blocksize, 0, 1);
  std::vector<uint8_t> codes(whole.bytes());
  std::vector<float> absmax(whole.blocks());
  store->read_codes(name, whole, codes.data());
  store->read_absmax(name, whole, absmax.data());
  for (int world : {2, 3, 4, 7}) {
    std::vector<uint8_t> rebuilt_codes(codes.size(), 0xAA);
    std::vector<float> rebuilt_absmax(absmax.size(), -1.0f);
    int64_t previous_end = 0;
    for (int rank = 0; rank < world; ++rank) {
      const ShardRange range = shard_range(tensor.numel, blocksize, rank, world);
      EXPECT_EQ(range.block_begin, previous_end) << "world " << world << " rank " << rank;
      previous_end = range.block_end;
      EXPECT_LE(range.blocks() - whole.blocks() / world, 1);
      store->read_codes(name, range, rebuilt_codes.data() + range.byte_begin);
      store->read_absmax(name, range, rebuilt_absmax.data() + range.block_begin);
    }
    EXPECT_EQ(previous_end, whole.block_end);
    EXPECT_EQ(rebuilt_codes, codes) << "world " << world;
    EXPECT_EQ(rebuilt_absmax, absmax) << "world " << world;
  }
}

// The embedding's vocabulary rows, read per rank as one hyperslab each, rebuild the whole tensor; the
// cut is balanced (ranks differ by at most one row, lower ranks take the remainder).
TEST(ModelStore, VocabularyRowsOfAnyWorldSizeReassembleTheEmbedding) {
  auto store = ModelStore::open(synthetic_store("tiny"));
  const std::string name = "model.embed_tokens.weight";
  const StoredTensor& tensor = store->tensor(name);
  const int64_t vocab = tensor.shape[0];
  const int64_t row_bytes = tensor.shape[1] * kernels::dtype_size(tensor.dtype);
  std::vector<uint8_t> whole(static_cast<size_t>(vocab * row_bytes));
  store->read_dense(name, whole.data());
  for (int world : {1, 2, 3, 5, 7, 512}) {
    std::vector<uint8_t> rebuilt(whole.size(), 0xAA);
    const uint64_t read_before = store->bytes_read();
    int64_t previous_end = 0;
    for (int rank = 0; rank < world; ++rank) {
      const VocabRange range = vocab_range(vocab, rank, world);
      EXPECT_EQ(range.begin, previous_end) << "world " << world << " rank " << rank;
      EXPECT_EQ(range.rows(), vocab / world + (rank < vocab % world ? 1 : 0)) << "world " << world;
      previous_end = range.end;
      store->read_dense_rows(name, range.begin, range.end, rebuilt.data() + range.begin * row_bytes);
    }
    EXPECT_EQ(previous_end, vocab);
    EXPECT_EQ(rebuilt, whole) << "world " << world;
    EXPECT_EQ(store->bytes_read() - read_before, whole.size()) << "world " << world;
  }
  EXPECT_THROW(store->read_dense_rows(name, 500, 513, whole.data()), FormatError);
  EXPECT_THROW(store->read_dense_rows(name, 7, 3, whole.data()), FormatError);
}

TEST(ModelStore, EachRankReadsAboutItsShareOfTheQuantizedBytes) {
  const std::string path = synthetic_store("tiny");
  auto reference = ModelStore::open(path);
  uint64_t quantized_total = 0;
  for (const auto& tensor : reference->tensors())
    if (tensor.quantized)
      quantized_total += kernels::packed_byte_count(tensor.numel) +
                         4 * kernels::quant_block_count(tensor.numel, reference->header().blocksize);
  const int world = 4;
  for (int rank = 0; rank < world; ++rank) {
    auto store = ModelStore::open(path);
    for (const auto& tensor : store->tensors()) {
      if (!tensor.quantized) continue;
      const ShardRange range = shard_range(tensor.numel, store->header().blocksize, rank, world);
      std::vector<uint8_t> codes(range.bytes());
      std::vector<float> absmax(range.blocks());
      store->read_codes(tensor.name, range, codes.data());
      store->read_absmax(tensor.name, range, absmax.data());
    }
    const double share = static_cast<double>(store->bytes_read()) / static_cast<double>(quantized_total);
    EXPECT_NEAR(share, 1.0 / world, 0.01) << "rank " << rank;
  }
}

// Writes a small Llama checkpoint the way transformers saves one (bf16 safetensors + config.json).
std::string write_hf_checkpoint(const std::string& folder, const ModelConfig& config, bool corrupt_shape,
                                bool inject_nan, std::map<std::string, std::vector<float>>* originals) {
  std::filesystem::create_directories(folder);
  std::ofstream(folder + "/config.json") << dump_json(config.to_json(), 2);
  SafetensorsWriter writer;
  std::mt19937 generator(7);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (const auto& name : config.tensor_names()) {
    auto shape = config.expected_shape(name);
    int64_t numel = 1;
    for (int64_t dim : shape) numel *= dim;
    std::vector<uint16_t> bits(numel);
    std::vector<float> values(numel);
    for (int64_t i = 0; i < numel; ++i) {
      bits[i] = kernels::float_to_bf16(normal(generator));
      values[i] = kernels::bf16_to_float(bits[i]);
    }
    if (inject_nan && name == "model.layers.1.mlp.up_proj.weight") bits[5] = 0x7fc0;
    if (corrupt_shape && name == "model.layers.0.self_attn.k_proj.weight") shape[0] += 1, bits.resize(bits.size() + shape[1]);
    if (originals) (*originals)[name] = values;
    writer.add(name, kernels::DType::bf16, shape, bits.data(), bits.size() * 2);
  }
  writer.write(folder + "/model.safetensors");
  return folder;
}

ModelConfig small_config() {
  ModelConfig config = synthetic_config("micro");
  config.vocab_size = 300;
  return config;
}

TEST(Converter, HuggingFaceFolderQuantizesBlockLinearsAndKeepsTheRest) {
  const std::string folder = shared_temp_dir() + "/hf-good";
  std::map<std::string, std::vector<float>> originals;
  write_hf_checkpoint(folder, small_config(), false, false, &originals);
  const std::string out = shared_temp_dir() + "/hf-good.h5";
  const auto summary = convert_hf_directory(folder, out, ConvertOptions{});
  EXPECT_EQ(summary.quantized_parameters, 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 172));
  auto store = ModelStore::open(out);
  // A quantized weight dequantizes to the same values as quantizing the bf16 original directly,
  // and stays within half the widest NF4 code gap (0.16) times absmax of it.
  const std::string name = "model.layers.1.mlp.gate_proj.weight";
  const auto& original = originals.at(name);
  const int64_t numel = static_cast<int64_t>(original.size());
  const ShardRange whole = shard_range(numel, 64, 0, 1);
  std::vector<uint8_t> codes(whole.bytes());
  std::vector<float> absmax(whole.blocks());
  store->read_codes(name, whole, codes.data());
  store->read_absmax(name, whole, absmax.data());
  std::vector<float> decoded(numel);
  kernels::dequantize_4bit_reference(kernels::QuantType::nf4, codes.data(), absmax.data(), numel, 64, decoded.data());
  for (int64_t i = 0; i < numel; ++i)
    ASSERT_LE(std::fabs(decoded[i] - original[i]), 0.1609f * absmax[i / 64] + 1e-7f) << "element " << i;
  // Dense tensors are stored bit-exact in their source dtype.
  std::vector<uint16_t> norm(64);
  store->read_dense("model.layers.0.input_layernorm.weight", norm.data());
  const auto& norm_original = originals.at("model.layers.0.input_layernorm.weight");
  for (int i = 0; i < 64; ++i) EXPECT_EQ(kernels::bf16_to_float(norm[i]), norm_original[i]);
}

TEST(Converter, RefusesAShapeThatContradictsConfigJson) {
  const std::string folder = shared_temp_dir() + "/hf-bad-shape";
  write_hf_checkpoint(folder, small_config(), true, false, nullptr);
  const std::string out = shared_temp_dir() + "/hf-bad-shape.h5";
  try {
    convert_hf_directory(folder, out, ConvertOptions{});
    FAIL() << "expected a FormatError";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("model.layers.0.self_attn.k_proj.weight"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("config.json"), std::string::npos) << error.what();
  }
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_FALSE(std::filesystem::exists(out + ".partial"));
}

TEST(Converter, RefusesNaNWeightsNamingTheTensor) {
  const std::string folder = shared_temp_dir() + "/hf-nan";
  write_hf_checkpoint(folder, small_config(), false, true, nullptr);
  const std::string out = shared_temp_dir() + "/hf-nan.h5";
  try {
    convert_hf_directory(folder, out, ConvertOptions{});
    FAIL() << "expected a FormatError";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("NaN"), std::string::npos) << error.what();
  }
  EXPECT_FALSE(std::filesystem::exists(out));
}

// The writer's temporary is created exclusively: a link planted under its name is replaced, never
// written through (the demo model's store lives under a predictable $TMPDIR path).
TEST(ModelStore, WriterNeverWritesThroughALinkAtItsTemporaryName) {
  const std::filesystem::path folder = std::filesystem::path(shared_temp_dir()) / "planted-link";
  std::filesystem::create_directories(folder);
  const std::filesystem::path victim = folder / "victim.txt";
  std::ofstream(victim) << "precious";
  const std::string out = (folder / "model.h5").string();
  std::filesystem::remove(out + ".partial-" + std::to_string(getpid()));
  std::filesystem::create_symlink(victim, out + ".partial-" + std::to_string(getpid()));
  ConvertOptions options;
  convert_synthetic("micro", out, options);
  std::ifstream in(victim);
  std::string content;
  std::getline(in, content);
  EXPECT_EQ(content, "precious");
  EXPECT_TRUE(std::filesystem::is_symlink(victim) == false);
  EXPECT_EQ(ModelStore::open(out)->header().config.num_hidden_layers,
            ModelStore::open(synthetic_store("micro"))->header().config.num_hidden_layers);
  EXPECT_FALSE(std::filesystem::exists(out + ".partial-" + std::to_string(getpid())));
}

TEST(ModelStore, RefusesMissingForeignAndTruncatedFiles) {
  EXPECT_THROW(ModelStore::open(shared_temp_dir() + "/absent.h5"), FormatError);
  const std::string text_file = shared_temp_dir() + "/not-a-store.h5";
  std::ofstream(text_file) << "hello";
  EXPECT_THROW(ModelStore::open(text_file), FormatError);
  // A store from a newer format version is refused with an upgrade hint.
  const std::string newer = shared_temp_dir() + "/newer.h5";
  {
    StoreHeader header;
    header.config = synthetic_config("micro");
    header.format_version = kStoreFormatVersion + 1;
    ModelStoreWriter writer(newer, header);
    writer.finish();
  }
  try {
    ModelStore::open(newer);
    FAIL() << "a newer store opened";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find("newer"), std::string::npos) << error.what();
  }
  // Truncate a real store to half its size.
  const std::string truncated = shared_temp_dir() + "/truncated.h5";
  std::filesystem::copy_file(synthetic_store("micro"), truncated, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(truncated, std::filesystem::file_size(truncated) / 2);
  try {
    auto store = ModelStore::open(truncated);
    for (const auto& tensor : store->tensors()) {
      if (!tensor.quantized) continue;
      const ShardRange whole = shard_range(tensor.numel, 64, 0, 1);
      std::vector<uint8_t> codes(whole.bytes());
      store->read_codes(tensor.name, whole, codes.data());
    }
    FAIL() << "a truncated store read without error";
  } catch (const FormatError& error) {
    EXPECT_NE(std::string(error.what()).find(truncated), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace qlora::shard
