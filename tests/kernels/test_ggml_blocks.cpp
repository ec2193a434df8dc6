// ggml block decoding (kernels/ggml_blocks.h): blocks encoded by hand from ggml's layouts (scale,
// minimum, quants -> the floats they stand for), seeded random blocks against a per-element formula
// written here with its own fp16/bf16 decoding, and the block sizes of the type table against the
// layouts they come from. The golden comparison with the gguf Python package is test_gguf.cpp's.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels/ggml_blocks.h"

namespace qlora::kernels {
namespace {

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// IEEE binary16 by its definition: sign, 5-bit exponent biased by 15, 10-bit fraction.
float half_value(uint16_t bits) {
  const int exponent = (bits >> 10) & 0x1f;
  const int fraction = bits & 0x3ff;
  double magnitude;
  if (exponent == 0) magnitude = std::ldexp(fraction, -24);   // subnormal: fraction * 2^-14 / 2^10
  else if (exponent == 31) magnitude = fraction == 0 ? INFINITY : NAN;
  else magnitude = std::ldexp(1024 + fraction, exponent - 25);
  return static_cast<float>((bits & 0x8000) ? -magnitude : magnitude);
}

// bfloat16 by its definition: sign, 8-bit exponent biased by 127, 7-bit fraction.
float bfloat_value(uint16_t bits) {
  const int exponent = (bits >> 7) & 0xff;
  const int fraction = bits & 0x7f;
  double magnitude;
  if (exponent == 0) magnitude = std::ldexp(fraction, -133);
  else if (exponent == 255) magnitude = fraction == 0 ? INFINITY : NAN;
  else magnitude = std::ldexp(128 + fraction, exponent - 134);
  return static_cast<float>((bits & 0x8000) ? -magnitude : magnitude);
}

uint16_t little_endian_u16(const uint8_t* at) { return static_cast<uint16_t>(at[0] | (at[1] << 8)); }

// Element i of a tensor of `type` stored in `data`, straight from ggml-common.h's block structs:
// block i / 32 holds it; Q4 blocks keep element k < 16 in the low nibble of qs[k] and element
// k >= 16 in the high nibble of qs[k - 16]. Q4_1's product is exact (4 bits times an 11-bit
// significand), so whether the compiler fuses it with the add cannot change the result.
float reference_element(uint32_t type, const uint8_t* data, int64_t i) {
  const int64_t block = i / 32, k = i % 32;
  switch (type) {
    case ggml_type::q8_0: {
      const uint8_t* at = data + block * 34;
      return static_cast<float>(static_cast<int8_t>(at[2 + k])) * half_value(little_endian_u16(at));
    }
    case ggml_type::q4_0: {
      const uint8_t* at = data + block * 18;
      const int nibble = k < 16 ? at[2 + k] & 0x0f : at[2 + k - 16] >> 4;
      return static_cast<float>(nibble - 8) * half_value(little_endian_u16(at));
    }
    case ggml_type::q4_1: {
      const uint8_t* at = data + block * 20;
      const int nibble = k < 16 ? at[4 + k] & 0x0f : at[4 + k - 16] >> 4;
      const float product = static_cast<float>(nibble) * half_value(little_endian_u16(at));
      return product + half_value(little_endian_u16(at + 2));
    }
    case ggml_type::f16: return half_value(little_endian_u16(data + 2 * i));
    case ggml_type::bf16: return bfloat_value(little_endian_u16(data + 2 * i));
    default: ADD_FAILURE() << "no reference for type " << type; return 0.0f;
  }
}

// A random 16-bit pattern that is finite as fp16 (exponent field below 31).
uint16_t random_finite_half(std::mt19937& generator) {
  uint16_t bits;
  do bits = static_cast<uint16_t>(generator()); while (((bits >> 10) & 0x1f) == 0x1f);
  return bits;
}

TEST(GgmlBlocks, HandEncodedBlocks) {
  // Q8_0: d = 2.0 (fp16 0x4000); q = -128, -1, 0, 1, 127, then 3.
  std::vector<uint8_t> q8(34, 3);
  q8[0] = 0x00, q8[1] = 0x40;
  const int8_t head[] = {-128, -1, 0, 1, 127};
  std::memcpy(q8.data() + 2, head, sizeof head);
  std::vector<float> out(32);
  dequantize_ggml(ggml_type::q8_0, q8.data(), 32, out.data());
  EXPECT_EQ(out[0], -256.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 0.0f);
  EXPECT_EQ(out[3], 2.0f);
  EXPECT_EQ(out[4], 254.0f);
  EXPECT_EQ(out[31], 6.0f);

  // Q8_0 with a negative subnormal scale: d = -2^-24 (0x8001), q = -128 and 5.
  q8[0] = 0x01, q8[1] = 0x80;
  q8[2] = 0x80, q8[3] = 5;
  dequantize_ggml(ggml_type::q8_0, q8.data(), 32, out.data());
  EXPECT_EQ(out[0], std::ldexp(1.0f, -17));
  EXPECT_EQ(out[1], -5.0f * std::ldexp(1.0f, -24));

  // Q4_0: d = 0.5 (0x3800); byte j holds element j (low nibble j) and element 16 + j (high 15 - j).
  std::vector<uint8_t> q4(18);
  q4[0] = 0x00, q4[1] = 0x38;
  for (int j = 0; j < 16; ++j) q4[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  dequantize_ggml(ggml_type::q4_0, q4.data(), 32, out.data());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], (j - 8) * 0.5f) << j;
    EXPECT_EQ(out[16 + j], (15 - j - 8) * 0.5f) << j;
  }

  // Q4_1: d = 0.25 (0x3400), m = -1.0 (0xbc00); same nibbles.
  std::vector<uint8_t> q41(20);
  q41[0] = 0x00, q41[1] = 0x34, q41[2] = 0x00, q41[3] = 0xbc;
  for (int j = 0; j < 16; ++j) q41[4 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  dequantize_ggml(ggml_type::q4_1, q41.data(), 32, out.data());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], j * 0.25f - 1.0f) << j;
    EXPECT_EQ(out[16 + j], (15 - j) * 0.25f - 1.0f) << j;
  }

  // Two Q4_0 blocks: the second one's scale (d = -3.0, 0xc200) applies to elements 32..63 only.
  std::vector<uint8_t> two_blocks(36, 0x9a);   // every low nibble 10, every high nibble 9
  two_blocks[0] = 0x00, two_blocks[1] = 0x3c;  // d = 1.0
  two_blocks[18] = 0x00, two_blocks[19] = 0xc2;
  std::vector<float> wide(64);
  dequantize_ggml(ggml_type::q4_0, two_blocks.data(), 64, wide.data());
  EXPECT_EQ(wide[0], 2.0f);
  EXPECT_EQ(wide[16], 1.0f);
  EXPECT_EQ(wide[32], -6.0f);
  EXPECT_EQ(wide[63], -3.0f);
}

TEST(GgmlBlocks, PlainTypesDecodeEachElement) {
  // F16: 1, -2, the largest finite 65504, the smallest subnormal 2^-24, -0, +infinity.
  const uint8_t f16[] = {0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00, 0x00, 0x80, 0x00, 0x7c};
  std::vector<float> out(6);
  dequantize_ggml(ggml_type::f16, f16, 6, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], std::ldexp(1.0f, -24));
  EXPECT_EQ(bits_of(out[4]), 0x80000000u);
  EXPECT_EQ(out[5], std::numeric_limits<float>::infinity());

  // BF16: 1 (0x3f80), -5 (0xc0a0), the smallest subnormal 2^-133 (0x0001), -infinity (0xff80).
  const uint8_t bf16[] = {0x80, 0x3f, 0xa0, 0xc0, 0x01, 0x00, 0x80, 0xff};
  dequantize_ggml(ggml_type::bf16, bf16, 4, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -5.0f);
  EXPECT_EQ(out[2], std::ldexp(1.0f, -133));
  EXPECT_EQ(out[3], -std::numeric_limits<float>::infinity());

  // F32 is copied bit for bit, a NaN payload included, from an odd (unaligned) address.
  const uint32_t f32_bits[] = {0x3f800000u, 0x7fc01234u, 0x80000001u};
  std::vector<uint8_t> unaligned(1 + sizeof f32_bits);
  std::memcpy(unaligned.data() + 1, f32_bits, sizeof f32_bits);
  dequantize_ggml(ggml_type::f32, unaligned.data() + 1, 3, out.data());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(bits_of(out[i]), f32_bits[i]) << i;
}

TEST(GgmlBlocks, RandomBlocksMatchThePerElementFormula) {
  struct Case {
    uint32_t type;
    int64_t block_bytes;
    int scales;   // leading fp16 fields per block: d, and m for Q4_1
  };
  const Case cases[] = {{ggml_type::q8_0, 34, 1}, {ggml_type::q4_0, 18, 1}, {ggml_type::q4_1, 20, 2}};
  std::mt19937 generator(2024);
  for (const Case& c : cases) {
    SCOPED_TRACE(ggml_type_name(c.type));
    const int64_t blocks = 37, n = blocks * 32;
    // One spare leading byte so the blocks start at an odd address, as they may in a mapped file.
    std::vector<uint8_t> buffer(1 + blocks * c.block_bytes);
    for (uint8_t& byte : buffer) byte = static_cast<uint8_t>(generator());
    uint8_t* data = buffer.data() + 1;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int s = 0; s < c.scales; ++s) {
        const uint16_t scale = random_finite_half(generator);
        data[b * c.block_bytes + 2 * s] = static_cast<uint8_t>(scale & 0xff);
        data[b * c.block_bytes + 2 * s + 1] = static_cast<uint8_t>(scale >> 8);
      }
    }
    std::vector<float> decoded(n);
    dequantize_ggml(c.type, data, n, decoded.data());
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(bits_of(decoded[i]), bits_of(reference_element(c.type, data, i))) << "element " << i;
  }

  // F16 and BF16 over random finite patterns, every exponent (subnormals included).
  for (const uint32_t type : {ggml_type::f16, ggml_type::bf16}) {
    SCOPED_TRACE(ggml_type_name(type));
    const int64_t n = 4096;
    std::vector<uint8_t> data(2 * n);
    for (int64_t i = 0; i < n; ++i) {
      uint16_t bits;
      if (type == ggml_type::f16) bits = random_finite_half(generator);
      else do bits = static_cast<uint16_t>(generator()); while (((bits >> 7) & 0xff) == 0xff);
      data[2 * i] = static_cast<uint8_t>(bits & 0xff);
      data[2 * i + 1] = static_cast<uint8_t>(bits >> 8);
    }
    std::vector<float> decoded(n);
    dequantize_ggml(type, data.data(), n, decoded.data());
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(bits_of(decoded[i]), bits_of(reference_element(type, data.data(), i))) << "element " << i;
  }
}

TEST(GgmlBlocks, TypeTableFollowsTheBlockLayouts) {
  // Bytes per block from ggml-common.h's structs (fp16 fields 2 bytes, K-quant superblocks of 256).
  struct Layout {
    uint32_t id;
    const char* name;
    int64_t elements;
    uint64_t bytes;
  };
  const Layout layouts[] = {
      {0, "F32", 1, 4},
      {1, "F16", 1, 2},
      {30, "BF16", 1, 2},
      {2, "Q4_0", 32, 2 + 32 / 2},                        // d, 32 nibbles
      {3, "Q4_1", 32, 2 + 2 + 32 / 2},                    // d, m, 32 nibbles
      {6, "Q5_0", 32, 2 + 4 + 32 / 2},                    // d, high bits, 32 nibbles
      {8, "Q8_0", 32, 2 + 32},                            // d, 32 int8
      {9, "Q8_1", 32, 2 + 2 + 32},                        // d, s, 32 int8
      {10, "Q2_K", 256, 256 / 16 + 256 / 4 + 2 + 2},      // scales, 2-bit quants, d, dmin
      {12, "Q4_K", 256, 2 + 2 + 12 + 256 / 2},            // d, dmin, 6-bit scales, nibbles
      {14, "Q6_K", 256, 256 / 2 + 256 / 4 + 256 / 16 + 2},  // low 4 bits, high 2 bits, scales, d
      {15, "Q8_K", 256, 4 + 256 + 256 / 16 * 2},          // fp32 d, int8 quants, int16 sums
  };
  for (const Layout& layout : layouts) {
    SCOPED_TRACE(layout.name);
    const GgmlTypeInfo* info = ggml_type_info(layout.id);
    ASSERT_NE(info, nullptr);
    EXPECT_STREQ(info->name, layout.name);
    EXPECT_EQ(info->block_elements, layout.elements);
    EXPECT_EQ(info->block_bytes, layout.bytes);
    EXPECT_EQ(ggml_type_name(layout.id), layout.name);
  }
  EXPECT_EQ(ggml_type_info(4), nullptr);   // Q4_2, removed from ggml long ago
  EXPECT_EQ(ggml_type_name(200), "type 200");
  for (uint32_t id = 0; id < 64; ++id) {
    const bool expected = id == ggml_type::f32 || id == ggml_type::f16 || id == ggml_type::bf16 ||
                          id == ggml_type::q8_0 || id == ggml_type::q4_0 || id == ggml_type::q4_1;
    EXPECT_EQ(ggml_type_dequantizable(id), expected) << id;
  }
}

TEST(GgmlBlocks, RefusesWhatItCannotDecode) {
  std::vector<uint8_t> data(256, 0);
  std::vector<float> out(256);
  EXPECT_THROW(dequantize_ggml(12 /* Q4_K */, data.data(), 256, out.data()), std::invalid_argument);
  EXPECT_THROW(dequantize_ggml(200, data.data(), 1, out.data()), std::invalid_argument);
  EXPECT_THROW(dequantize_ggml(ggml_type::q8_0, data.data(), 16, out.data()), std::invalid_argument);
  EXPECT_THROW(dequantize_ggml(ggml_type::q4_1, data.data(), -32, out.data()), std::invalid_argument);
  dequantize_ggml(ggml_type::q4_1, nullptr, 0, nullptr);   // nothing to read or write
}

}  // namespace
}  // namespace qlora::kernels
