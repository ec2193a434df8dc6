// Writers of planned files: the Q8_0 encoder against the gguf package's own encodings (golden
// fixture from scripts/make_q8_0_fixtures.py) and its error bound on random data, GGUF headers built
// by GgufHeaderBuilder read back by the GGUF reader (typed metadata, shapes, offsets, data), and
// planned safetensors layouts read back by the safetensors reader.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "kernels/ggml_blocks.h"
#include "shard/gguf.h"
#include "shard/gguf_writer.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora::shard {
namespace {

TEST(Q8_0Encoder, MatchesTheGgufPackageByteForByte) {
  auto fixture = SafetensorsFile::open(testing_support::source_dir() + "/tests/fixtures/merge/q8_0_quantize.safetensors");
  const auto& input = fixture->at("input");
  const auto& expected = fixture->at("expected");
  ASSERT_EQ(static_cast<uint64_t>(expected.numel()), static_cast<uint64_t>(input.numel()) / 32 * 34);
  std::vector<uint8_t> encoded(static_cast<size_t>(expected.numel()));
  kernels::quantize_q8_0(reinterpret_cast<const float*>(fixture->data(input)), input.numel(), encoded.data());
  const uint8_t* golden = fixture->data(expected);
  for (size_t block = 0; block < encoded.size() / 34; ++block)
    for (size_t j = 0; j < 34; ++j)
      ASSERT_EQ(encoded[block * 34 + j], golden[block * 34 + j]) << "block " << block << " byte " << j;
}

TEST(Q8_0Encoder, DecodesWithinHalfAStepAndRefusesPartialBlocks) {
  std::mt19937 generator(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(32 * 64);
  for (auto& value : values) value = normal(generator) * 0.05f;
  std::fill(values.begin(), values.begin() + 32, 0.0f);   // an all-zero block stays zero
  std::vector<uint8_t> encoded(values.size() / 32 * 34);
  kernels::quantize_q8_0(values.data(), static_cast<int64_t>(values.size()), encoded.data());
  std::vector<float> decoded(values.size());
  kernels::dequantize_ggml(kernels::ggml_type::q8_0, encoded.data(), static_cast<int64_t>(values.size()), decoded.data());
  for (size_t block = 0; block < values.size() / 32; ++block) {
    float largest = 0;
    for (int j = 0; j < 32; ++j) largest = std::max(largest, std::abs(values[block * 32 + j]));
    int extreme = 0;
    for (int j = 0; j < 32; ++j) {
      const size_t i = block * 32 + j;
      EXPECT_LE(std::abs(decoded[i] - values[i]), largest / 127 * 0.5 + largest * std::ldexp(1.0, -11)) << i;
      extreme += std::abs(static_cast<int8_t>(encoded[block * 34 + 2 + j])) == 127;
    }
    if (largest > 0) EXPECT_GE(extreme, 1) << "the largest magnitude maps to +-127";
  }
  for (int j = 0; j < 34; ++j) EXPECT_EQ(encoded[j], 0) << j;
  EXPECT_THROW(kernels::quantize_q8_0(values.data(), 48, encoded.data()), std::invalid_argument);
}

TEST(GgufHeaderBuilder, TheReaderReadsBackMetadataTensorsAndData) {
  GgufHeaderBuilder builder;
  builder.add_string("general.architecture", "llama");
  builder.add_uint32("llama.block_count", 3);
  builder.add_int32("test.negative", -7);
  builder.add_float32("llama.rope.freq_base", 500000.0f);
  builder.add_bool("tokenizer.ggml.add_bos_token", true);
  builder.add_string_array("tokenizer.ggml.tokens", {"a", "", "\xc4\xa0the"});
  builder.add_float32_array("tokenizer.ggml.scores", {0.5f, -1.0f, 2.0f});
  builder.add_int32_array("tokenizer.ggml.token_type", {1, 3, 4});
  EXPECT_THROW(builder.add_uint32("llama.block_count", 4), std::invalid_argument);
  const uint64_t norm = builder.add_tensor("output_norm.weight", {5}, kernels::ggml_type::f32);
  const uint64_t matrix = builder.add_tensor("token_embd.weight", {3, 64}, kernels::ggml_type::q8_0);
  const uint64_t half = builder.add_tensor("output.weight", {3, 10}, kernels::ggml_type::f16);
  EXPECT_THROW(builder.add_tensor("bad", {2, 48}, kernels::ggml_type::q8_0), std::invalid_argument);
  EXPECT_EQ(norm, 0u);
  EXPECT_EQ(matrix, 32u);               // 20 bytes of F32, padded to 32
  EXPECT_EQ(half, 256u);                // 204 bytes of Q8_0 from 32, padded to 256
  EXPECT_EQ(builder.data_bytes(), half + 64);   // 60 bytes padded

  std::string image = builder.header();
  ASSERT_EQ(image.size() % 32, 0u);
  const uint64_t data_start = image.size();
  image.resize(data_start + builder.data_bytes(), '\0');
  const float norm_values[5] = {1, 2, 3, 4, 5};
  std::memcpy(image.data() + data_start + norm, norm_values, sizeof norm_values);
  std::vector<float> rows(3 * 64);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = i % 32 == 0 ? 127.0f : static_cast<float>(i % 17) - 8.0f;
  kernels::quantize_q8_0(rows.data(), 3 * 64, reinterpret_cast<uint8_t*>(image.data() + data_start + matrix));

  auto file = GgufFile::parse(reinterpret_cast<const uint8_t*>(image.data()), image.size(), "built");
  EXPECT_EQ(file->version(), 3u);
  EXPECT_EQ(file->data_offset(), data_start);
  EXPECT_EQ(file->get_string("general.architecture"), "llama");
  EXPECT_EQ(file->find_key("llama.block_count")->type, GgufType::uint32);
  EXPECT_EQ(file->get_int("llama.block_count"), 3);
  EXPECT_EQ(file->get_int("test.negative"), -7);
  EXPECT_EQ(file->get_float("llama.rope.freq_base"), 500000.0);
  EXPECT_TRUE(file->get_bool("tokenizer.ggml.add_bos_token"));
  EXPECT_EQ(file->get_string_array("tokenizer.ggml.tokens"), (std::vector<std::string>{"a", "", "\xc4\xa0the"}));
  EXPECT_EQ(file->get_float_array("tokenizer.ggml.scores"), (std::vector<double>{0.5, -1.0, 2.0}));
  EXPECT_EQ(file->find_key("tokenizer.ggml.token_type")->element_type, GgufType::int32);
  EXPECT_EQ(file->get_int_array("tokenizer.ggml.token_type"), (std::vector<int64_t>{1, 3, 4}));
  ASSERT_EQ(file->tensors().size(), 3u);
  EXPECT_EQ(file->tensor("token_embd.weight").shape, (std::vector<int64_t>{3, 64}));
  EXPECT_EQ(file->tensor("token_embd.weight").offset, matrix);
  EXPECT_EQ(file->tensor("output.weight").bytes, 60u);
  EXPECT_EQ(file->dequantize(file->tensor("output_norm.weight")), std::vector<float>(norm_values, norm_values + 5));
  EXPECT_EQ(file->dequantize(file->tensor("token_embd.weight")), rows);   // d = 1: integers are exact
}

TEST(PlannedSafetensors, TheReaderReadsBackWhatWasWrittenAtThePlannedOffsets) {
  const std::vector<SafetensorsTensorSpec> specs = {{"b.weight", kernels::DType::bf16, {3, 5}},
                                                    {"a.weight", kernels::DType::f32, {2}},
                                                    {"empty", kernels::DType::f16, {0, 4}}};
  const auto layout = plan_safetensors(specs, {{"format", "pt"}});
  ASSERT_EQ(layout.header.size() % 8, 0u);
  EXPECT_EQ(layout.file_offsets[0], layout.header.size());
  EXPECT_EQ(layout.file_offsets[1], layout.header.size() + 30);
  EXPECT_EQ(layout.tensor_bytes, (std::vector<uint64_t>{30, 8, 0}));
  EXPECT_EQ(layout.file_size, layout.header.size() + 38);
  std::string image = layout.header;
  image.resize(layout.file_size, '\0');
  const float pair[2] = {1.5f, -2.0f};
  std::memcpy(image.data() + layout.file_offsets[1], pair, sizeof pair);
  image[layout.file_offsets[0] + 29] = 0x3f;
  auto file = SafetensorsFile::parse(reinterpret_cast<const uint8_t*>(image.data()), image.size(), "planned");
  EXPECT_EQ(file->metadata().at("format"), "pt");
  EXPECT_EQ(file->at("b.weight").shape, (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(std::memcmp(file->data(file->at("a.weight")), pair, sizeof pair), 0);
  EXPECT_EQ(file->data(file->at("b.weight"))[29], 0x3f);
  EXPECT_THROW(plan_safetensors({{"x", kernels::DType::f32, {1}}, {"x", kernels::DType::f32, {1}}}, {}),
               std::invalid_argument);
}

}  // namespace
}  // namespace qlora::shard
