// common/hash.h: the four-lane FNV-1a checksum of sources, token caches and adapter replicas. Fixed
// values pin the definition (docs/FORMAT.md "Checksums"); a plain byte-by-byte statement of the same
// definition must agree for every length and every way of splitting the stream.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common/hash.h"

namespace qlora {
namespace {

constexpr uint64_t kOffsetBasis = 14695981039346656037ull;
constexpr uint64_t kPrime = 1099511628211ull;

// The definition read literally: whole 32-byte groups feed word k (little-endian) into lane k, the
// remaining bytes feed lane 0 one at a time, and the result is FNV-1a 64 over the lanes' 32 bytes.
std::string checksum_by_definition(const std::vector<uint8_t>& bytes) {
  uint64_t lanes[4] = {kOffsetBasis, kOffsetBasis, kOffsetBasis, kOffsetBasis};
  const size_t whole_groups = bytes.size() / 32;
  for (size_t group = 0; group < whole_groups; ++group) {
    for (int lane = 0; lane < 4; ++lane) {
      uint64_t word = 0;
      for (int byte = 7; byte >= 0; --byte) word = (word << 8) | bytes[group * 32 + lane * 8 + byte];
      lanes[lane] = (lanes[lane] ^ word) * kPrime;
    }
  }
  for (size_t i = whole_groups * 32; i < bytes.size(); ++i) lanes[0] = (lanes[0] ^ bytes[i]) * kPrime;
  uint64_t state = kOffsetBasis;
  for (const uint64_t lane : lanes)
    for (int byte = 0; byte < 8; ++byte) state = (state ^ ((lane >> (8 * byte)) & 0xff)) * kPrime;
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(state));
  return text;
}

std::string checksum_whole(const std::vector<uint8_t>& bytes) {
  Fnv1a64 hash;
  hash.update(bytes.data(), bytes.size());
  return hash.hex();
}

// Expected values from an independent Python implementation of the definition.
TEST(Fnv1a64, FixedValuesPinTheDefinition) {
  EXPECT_EQ(Fnv1a64().hex(), "939e3a8b38c8fe25");
  Fnv1a64 word;
  word.update("qlora", 5);
  EXPECT_EQ(word.hex(), "dd1e6fd5325eacf8");
  std::vector<uint8_t> counting(100);
  for (size_t i = 0; i < counting.size(); ++i) counting[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(checksum_whole(counting), "741ca261447f7485");
  EXPECT_EQ(checksum_by_definition(counting), "741ca261447f7485");
}

TEST(Fnv1a64, AnySplitOfTheStreamGivesTheSameValue) {
  std::vector<uint8_t> bytes(100);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i);
  for (size_t first : {1, 7, 31, 32, 33, 64, 99}) {
    Fnv1a64 split;
    split.update(bytes.data(), first);
    const size_t middle = std::min<size_t>(3, bytes.size() - first);
    split.update(bytes.data() + first, middle);
    split.update(bytes.data() + first + middle, bytes.size() - first - middle);
    EXPECT_EQ(split.hex(), "741ca261447f7485") << "split at " << first;
  }
}

TEST(Fnv1a64, AgreesWithTheDefinitionForEveryLengthAndRandomSplits) {
  std::mt19937 generator(20240613);
  std::uniform_int_distribution<int> byte_value(0, 255);
  for (size_t length = 0; length <= 200; ++length) {
    std::vector<uint8_t> bytes(length);
    for (auto& byte : bytes) byte = static_cast<uint8_t>(byte_value(generator));
    const std::string expected = checksum_by_definition(bytes);
    ASSERT_EQ(checksum_whole(bytes), expected) << "length " << length;
    Fnv1a64 pieces;
    size_t offset = 0;
    while (offset < length) {
      const size_t piece = std::min<size_t>(length - offset, std::uniform_int_distribution<size_t>(0, 40)(generator));
      pieces.update(bytes.data() + offset, piece);
      offset += piece;
    }
    EXPECT_EQ(pieces.hex(), expected) << "length " << length;
  }
}

TEST(Fnv1a64, EveryByteAndItsPositionMatter) {
  std::vector<uint8_t> bytes(96, 0);
  const std::string zeros = checksum_whole(bytes);
  for (size_t position : {0, 7, 8, 31, 32, 95}) {
    std::vector<uint8_t> flipped = bytes;
    flipped[position] = 1;
    EXPECT_NE(checksum_whole(flipped), zeros) << "position " << position;
  }
  // The same byte in different lanes of a group must not collide.
  std::vector<uint8_t> lane0 = bytes, lane1 = bytes;
  lane0[0] = 1;
  lane1[8] = 1;
  EXPECT_NE(checksum_whole(lane0), checksum_whole(lane1));
  // hex() reads the state without consuming it.
  Fnv1a64 hash;
  hash.update(bytes.data(), 40);
  EXPECT_EQ(hash.hex(), hash.hex());
  hash.update(bytes.data() + 40, 56);
  EXPECT_EQ(hash.hex(), zeros);
}

}  // namespace
}  // namespace qlora
