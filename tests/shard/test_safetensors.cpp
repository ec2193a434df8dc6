// Tests for the safetensors reader, checkpoint-directory reader and writer: write/read round trips,
// one hand-crafted malformed file per rejection rule (each message must name the file and tensor),
// and sharded checkpoints with an index.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/json.h"
#include "shard/safetensors.h"

namespace qlora::shard {
namespace {

using kernels::DType;
namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = ::testing::TempDir() + "qlora_safetensors_XXXXXX";
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    directory_ = pattern;
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(directory_, ignored);
  }

  std::string path(const std::string& name) const { return directory_ + "/" + name; }

  static void write_bytes(const std::string& file, const std::string& bytes) {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    ASSERT_TRUE(out.good());
  }

  // A file with the given header text; the length prefix says header.size() unless overridden.
  std::string craft(const std::string& name, const std::string& header, size_t data_bytes,
                    int64_t declared_length = -1) const {
    const uint64_t length = declared_length < 0 ? header.size() : static_cast<uint64_t>(declared_length);
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((length >> (8 * i)) & 0xff);
    bytes += header;
    bytes.append(data_bytes, '\x5a');
    const std::string file = path(name);
    write_bytes(file, bytes);
    return file;
  }

  // Opening must fail with a FormatError whose message contains every fragment.
  static void expect_rejected(const std::string& file, std::initializer_list<std::string> fragments) {
    expect_error([&] { SafetensorsFile::open(file); }, fragments);
  }

  static void expect_error(const std::function<void()>& action, std::initializer_list<std::string> fragments) {
    try {
      action();
      ADD_FAILURE() << "expected a FormatError";
    } catch (const FormatError& error) {
      const std::string message = error.what();
      for (const std::string& fragment : fragments) {
        EXPECT_NE(message.find(fragment), std::string::npos) << "'" << fragment << "' not in: " << message;
      }
    }
  }

  std::string directory_;
};

template <typename T>
std::vector<T> read_values(const uint8_t* data, size_t count) {
  std::vector<T> values(count);
  std::memcpy(values.data(), data, count * sizeof(T));
  return values;
}

uint64_t header_length_of(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  unsigned char prefix[8] = {};
  in.read(reinterpret_cast<char*>(prefix), 8);
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | prefix[i];
  return length;
}

// ---- writer and reader round trip ---------------------------------------------------------------

TEST_F(SafetensorsTest, WriteThenReadBack) {
  const std::vector<float> weights = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc000, 0x7f80};
  const std::vector<int64_t> ids = {-1, int64_t{1} << 40};
  const std::vector<uint8_t> codes = {0x12, 0x34, 0x56};
  const int8_t scalar = -7;
  const std::vector<int32_t> counts = {5, 6};
  const std::vector<uint16_t> halves = {0x3c00};

  SafetensorsWriter writer;
  writer.add("model.weight", DType::f32, {2, 3}, weights.data(), weights.size() * 4);
  writer.add("a.bf16", DType::bf16, {3}, bf16.data(), bf16.size() * 2);
  writer.add("ids", DType::i64, {2}, ids.data(), ids.size() * 8);
  writer.add("codes", DType::u8, {3, 1}, codes.data(), codes.size());
  writer.add("scalar", DType::i8, {}, &scalar, 1);
  writer.add("empty", DType::f32, {0, 4}, nullptr, 0);
  writer.add("counts", DType::i32, {2}, counts.data(), 8);
  writer.add("half", DType::f16, {1, 1}, halves.data(), 2);
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "caf\xc3\xa9 \"quoted\"");
  const std::string file = path("round_trip.safetensors");
  writer.write(file);

  const auto reader = SafetensorsFile::open(file);
  EXPECT_EQ(reader->path(), file);
  EXPECT_EQ(reader->file_size(), fs::file_size(file));
  EXPECT_EQ(reader->metadata().size(), 2u);
  EXPECT_EQ(reader->metadata().at("format"), "pt");
  EXPECT_EQ(reader->metadata().at("note"), "caf\xc3\xa9 \"quoted\"");
  ASSERT_EQ(reader->entries().size(), 8u);

  const SafetensorsEntry& weight = reader->at("model.weight");
  EXPECT_EQ(weight.name, "model.weight");
  EXPECT_EQ(weight.dtype_code, "F32");
  EXPECT_TRUE(weight.dtype_known);
  EXPECT_EQ(weight.dtype, DType::f32);
  EXPECT_EQ(weight.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(weight.numel(), 6);
  EXPECT_EQ(weight.end - weight.begin, 24u);
  EXPECT_EQ(read_values<float>(reader->data(weight), 6), weights);

  EXPECT_EQ(reader->at("a.bf16").dtype, DType::bf16);
  EXPECT_EQ(reader->at("a.bf16").dtype_code, "BF16");
  EXPECT_EQ(read_values<uint16_t>(reader->data(reader->at("a.bf16")), 3), bf16);
  EXPECT_EQ(reader->at("ids").dtype_code, "I64");
  EXPECT_EQ(read_values<int64_t>(reader->data(reader->at("ids")), 2), ids);
  EXPECT_EQ(reader->at("codes").dtype_code, "U8");
  EXPECT_EQ(reader->at("codes").shape, (std::vector<int64_t>{3, 1}));
  EXPECT_EQ(read_values<uint8_t>(reader->data(reader->at("codes")), 3), codes);
  EXPECT_EQ(reader->at("scalar").dtype_code, "I8");
  EXPECT_TRUE(reader->at("scalar").shape.empty());
  EXPECT_EQ(reader->at("scalar").numel(), 1);
  EXPECT_EQ(static_cast<int8_t>(*reader->data(reader->at("scalar"))), -7);
  EXPECT_EQ(reader->at("empty").numel(), 0);
  EXPECT_EQ(reader->at("empty").begin, reader->at("empty").end);
  EXPECT_EQ(reader->at("counts").dtype, DType::i32);
  EXPECT_EQ(read_values<int32_t>(reader->data(reader->at("counts")), 2), counts);
  EXPECT_EQ(reader->at("half").dtype, DType::f16);
  EXPECT_EQ(reader->at("half").dtype_code, "F16");

  EXPECT_EQ(reader->find("absent"), nullptr);
  ASSERT_NE(reader->find("ids"), nullptr);
  EXPECT_EQ(reader->find("ids")->name, "ids");
}

TEST_F(SafetensorsTest, WriterPadsHeaderAndLaysOutInNameOrder) {
  const std::vector<uint8_t> three = {1, 2, 3};
  const std::vector<float> two = {1.0f, 2.0f};
  SafetensorsWriter writer;
  writer.add("b", DType::u8, {3}, three.data(), 3);
  writer.add("a", DType::f32, {2}, two.data(), 8);
  writer.add("c", DType::u8, {3}, three.data(), 3);
  const std::string file = path("layout.safetensors");
  writer.write(file);

  const uint64_t header_length = header_length_of(file);
  EXPECT_EQ(header_length % 8, 0u);
  EXPECT_EQ(fs::file_size(file), 8 + header_length + 14);

  // The header is the JSON object followed only by space padding.
  std::ifstream in(file, std::ios::binary);
  std::string header(header_length, '\0');
  in.seekg(8);
  in.read(header.data(), static_cast<std::streamsize>(header_length));
  ASSERT_EQ(header.front(), '{');
  const size_t close = header.find_last_of('}');
  EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos);
  EXPECT_FALSE(parse_json(header, file).contains("__metadata__"));  // none was set

  const auto reader = SafetensorsFile::open(file);
  EXPECT_EQ(reader->at("a").begin, 0u);
  EXPECT_EQ(reader->at("a").end, 8u);
  EXPECT_EQ(reader->at("b").begin, 8u);
  EXPECT_EQ(reader->at("c").begin, 11u);
  EXPECT_EQ(reader->at("c").end, 14u);
  // The data section starts 8-byte aligned, so the first tensor is aligned inside the mapping.
  EXPECT_EQ(reinterpret_cast<uintptr_t>(reader->data(reader->at("a"))) % 8, 0u);
  ASSERT_EQ(reader->entries().size(), 3u);
  EXPECT_EQ(reader->entries()[0].name, "a");
  EXPECT_EQ(reader->entries()[2].name, "c");
}

TEST_F(SafetensorsTest, EmptyWriterProducesAValidFile) {
  const std::string file = path("empty.safetensors");
  SafetensorsWriter().write(file);
  const auto reader = SafetensorsFile::open(file);
  EXPECT_TRUE(reader->entries().empty());
  EXPECT_TRUE(reader->metadata().empty());
  EXPECT_EQ(header_length_of(file) % 8, 0u);
}

TEST_F(SafetensorsTest, WriterReplacesAtomicallyAndLeavesNoTemporaries) {
  const std::string file = path("adapter.safetensors");
  const std::vector<float> first = {1.0f};
  const std::vector<float> second = {2.0f, 3.0f};
  SafetensorsWriter one;
  one.add("w", DType::f32, {1}, first.data(), 4);
  one.write(file);
  const auto old_reader = SafetensorsFile::open(file);

  SafetensorsWriter two;
  two.add("w", DType::f32, {2}, second.data(), 8);
  two.write(file);
  // The old mapping stays valid: rename replaced the directory entry, not the bytes under it.
  EXPECT_EQ(read_values<float>(old_reader->data(old_reader->at("w")), 1), first);
  const auto new_reader = SafetensorsFile::open(file);
  EXPECT_EQ(read_values<float>(new_reader->data(new_reader->at("w")), 2), second);

  size_t entries = 0;
  for (const auto& item : fs::directory_iterator(directory_)) {
    ++entries;
    EXPECT_EQ(item.path().filename(), "adapter.safetensors");
  }
  EXPECT_EQ(entries, 1u);
}

TEST_F(SafetensorsTest, WriterReportsIoFailureWithThePath) {
  SafetensorsWriter writer;
  const std::string file = path("no_such_directory/out.safetensors");
  expect_error([&] { writer.write(file); }, {file});
}

TEST_F(SafetensorsTest, WriterRejectsMisuse) {
  const std::vector<float> values = {1.0f, 2.0f, 3.0f};
  SafetensorsWriter writer;
  EXPECT_THROW(writer.add("short", DType::f32, {2, 2}, values.data(), 12), std::invalid_argument);
  EXPECT_THROW(writer.add("negative", DType::f32, {-1, 3}, values.data(), 12), std::invalid_argument);
  EXPECT_THROW(writer.add("__metadata__", DType::f32, {3}, values.data(), 12), std::invalid_argument);
  writer.add("ok", DType::f32, {3}, values.data(), 12);
  EXPECT_THROW(writer.add("ok", DType::f32, {3}, values.data(), 12), std::invalid_argument);
}

TEST_F(SafetensorsTest, AcceptsCodesQloraDoesNotComputeWith) {
  // 16 + 3 + 2 + 1 + 2 + 8 = 32 data bytes, contiguous in this order.
  const std::string header =
      R"({"f64": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]},)"
      R"( "fp8": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [16, 19]},)"
      R"( "fp4": {"dtype": "F4", "shape": [2, 2], "data_offsets": [19, 21]},)"
      R"( "mask": {"dtype": "BOOL", "shape": [1], "data_offsets": [21, 22]},)"
      R"( "half": {"dtype": "U16", "shape": [1], "data_offsets": [22, 24]},)"
      R"( "big": {"dtype": "U64", "shape": [1], "data_offsets": [24, 32]}})";
  const auto reader = SafetensorsFile::open(craft("codes.safetensors", header, 32));
  ASSERT_EQ(reader->entries().size(), 6u);
  for (const SafetensorsEntry& entry : reader->entries()) {
    SCOPED_TRACE(entry.name);
    EXPECT_FALSE(entry.dtype_known);
  }
  EXPECT_EQ(reader->at("fp8").dtype_code, "F8_E4M3");
  EXPECT_EQ(reader->at("fp4").end - reader->at("fp4").begin, 2u);
  // Entries come back in data order, which readers streaming the file rely on.
  EXPECT_EQ(reader->entries()[0].name, "f64");
  EXPECT_EQ(reader->entries()[5].name, "big");
}

TEST_F(SafetensorsTest, AcceptsUnpaddedAndSpacePaddedHeaders) {
  const auto reader = SafetensorsFile::open(
      craft("plain.safetensors", R"({"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}   )", 3));
  EXPECT_EQ(reader->at("x").numel(), 3);
}

// ---- every rejection, on a crafted file -----------------------------------------------------------

TEST_F(SafetensorsTest, RejectsMissingFile) {
  const std::string file = path("missing.safetensors");
  expect_rejected(file, {file, "cannot open"});
}

TEST_F(SafetensorsTest, RejectsFileShorterThanEightBytes) {
  const std::string file = path("tiny.safetensors");
  write_bytes(file, std::string("\x05\0\0\0\0", 5));
  expect_rejected(file, {file, "5 bytes"});
  write_bytes(file, "");
  expect_rejected(file, {file, "0 bytes"});
}

TEST_F(SafetensorsTest, RejectsHugeHeaderLength) {
  const std::string file = craft("huge.safetensors", "{}", 0, 100'000'001);
  expect_rejected(file, {file, "100000001", "limit"});
  // Lengths that would wrap an unsigned "8 + length" sum.
  const std::string wrapping = craft("wrap.safetensors", "{}", 0, INT64_MAX);
  expect_rejected(wrapping, {wrapping, "9223372036854775807", "limit"});
}

TEST_F(SafetensorsTest, RejectsHeaderLengthPastEndOfFile) {
  const std::string file = craft("past_end.safetensors", "{}", 0, 64);
  expect_rejected(file, {file, "header length 64", "end of the"});
  const std::string under_limit = craft("under_limit.safetensors", "{}", 0, 99'999'999);
  expect_rejected(under_limit, {under_limit, "header length 99999999", "end of the"});
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotJson) {
  const std::string file = craft("garbage.safetensors", R"({"x": )", 0);
  expect_rejected(file, {file, "header: invalid JSON", "line 1, column 7"});
  const std::string empty = craft("empty_header.safetensors", "", 0);
  expect_rejected(empty, {empty, "not a JSON object"});
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotAnObject) {
  const std::string file = craft("array.safetensors", "[1, 2]", 0);
  expect_rejected(file, {file, "not a JSON object"});
  const std::string spaced = craft("spaced.safetensors", "  {}", 0);
  expect_rejected(spaced, {spaced, "not a JSON object"});
}

// Readers disagree on which of two same-named entries wins, so the second must not quietly
// replace the first (here it would turn an F32 tensor into an I32 one).
TEST_F(SafetensorsTest, RejectsHeaderRepeatingATensorName) {
  const std::string file = craft("repeated.safetensors",
                                 R"({"x.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
                                 R"( "x.weight": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}})",
                                 4);
  expect_rejected(file, {file, "header: invalid JSON", "repeats a key"});
}

TEST_F(SafetensorsTest, RejectsHeaderNestedTooDeeply) {
  const std::string deep = std::string(300, '[') + std::string(300, ']');
  const std::string file = craft("deep.safetensors", R"({"__metadata__": {"k": )" + deep + "}}", 0);
  expect_rejected(file, {file, "header: invalid JSON", "nesting deeper than 256 levels"});
}

TEST_F(SafetensorsTest, RejectsEntryThatIsNotAnObject) {
  const std::string file = craft("entry.safetensors", R"({"x.weight": [1, 2]})", 0);
  expect_rejected(file, {file, "tensor 'x.weight'", "not a JSON object"});
}

TEST_F(SafetensorsTest, RejectsEntryMissingFields) {
  const std::string no_dtype = craft("no_dtype.safetensors", R"({"x.weight": {"shape": [1], "data_offsets": [0, 4]}})", 4);
  expect_rejected(no_dtype, {no_dtype, "tensor 'x.weight'", "'dtype'"});
  const std::string no_shape = craft("no_shape.safetensors", R"({"x.weight": {"dtype": "F32", "data_offsets": [0, 4]}})", 4);
  expect_rejected(no_shape, {no_shape, "tensor 'x.weight'", "'shape'"});
  const std::string no_offsets = craft("no_offsets.safetensors", R"({"x.weight": {"dtype": "F32", "shape": [1]}})", 4);
  expect_rejected(no_offsets, {no_offsets, "tensor 'x.weight'", "'data_offsets'"});
}

TEST_F(SafetensorsTest, RejectsEntryFieldsOfTheWrongType) {
  struct Case {
    const char* entry;
    const char* fragment;
  };
  const Case cases[] = {
      {R"({"dtype": 32, "shape": [1], "data_offsets": [0, 4]})", "'dtype' is not a string"},
      {R"({"dtype": "F32", "shape": 1, "data_offsets": [0, 4]})", "'shape' is not an array"},
      {R"({"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]})", "'shape' holds \"1\""},
      {R"({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]})", "'shape' holds 1.5"},
      {R"({"dtype": "F32", "shape": [1], "data_offsets": "0-4"})", "'data_offsets'"},
      {R"({"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]})", "'data_offsets'"},
      {R"({"dtype": "F32", "shape": [1], "data_offsets": [0]})", "'data_offsets'"},
      {R"({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]})", "'data_offsets'"},
      {R"({"dtype": "F32", "shape": [1], "data_offsets": [0, 4.5]})", "'data_offsets'"},
      {R"({"dtype": "F32", "shape": [1], "data_offsets": [0, 1e30]})", "'data_offsets'"},
  };
  int index = 0;
  for (const Case& item : cases) {
    SCOPED_TRACE(item.entry);
    const std::string file =
        craft("types" + std::to_string(index++) + ".safetensors", std::string(R"({"x.weight": )") + item.entry + "}", 4);
    expect_rejected(file, {file, "tensor 'x.weight'", item.fragment});
  }
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  const std::string file = craft("dtype.safetensors", R"({"x.weight": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}})", 1);
  expect_rejected(file, {file, "tensor 'x.weight'", "unknown dtype 'Q4'"});
  // Codes are case-sensitive in the format.
  const std::string lower = craft("lower.safetensors", R"({"x.weight": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}})", 4);
  expect_rejected(lower, {lower, "tensor 'x.weight'", "unknown dtype 'f32'"});
}

TEST_F(SafetensorsTest, RejectsNegativeDimensions) {
  const std::string file = craft("negative.safetensors", R"({"x.weight": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 0]}})", 0);
  expect_rejected(file, {file, "tensor 'x.weight'", "negative dimension -2"});
}

TEST_F(SafetensorsTest, RejectsElementCountOverflow) {
  const std::string file = craft(
      "overflow.safetensors",
      R"({"x.weight": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0);
  expect_rejected(file, {file, "tensor 'x.weight'", "overflows"});
  // numel fits but numel * 8 bytes does not.
  const std::string bytes = craft(
      "byte_overflow.safetensors",
      R"({"x.weight": {"dtype": "I64", "shape": [4611686018427387904], "data_offsets": [0, 0]}})", 0);
  expect_rejected(bytes, {bytes, "tensor 'x.weight'", "overflows"});
}

TEST_F(SafetensorsTest, RejectsSubByteSizesThatAreNotWholeBytes) {
  const std::string file = craft("f4.safetensors", R"({"x.weight": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}})", 2);
  expect_rejected(file, {file, "tensor 'x.weight'", "12 bits"});
}

TEST_F(SafetensorsTest, RejectsByteLengthMismatch) {
  const std::string file = craft("model.safetensors", R"({"x.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})", 12);
  expect_rejected(file, {file + ": tensor 'x.weight': data_offsets [0, 12] hold 12 bytes but F32 [2, 2] needs 16"});
}

TEST_F(SafetensorsTest, RejectsBeginAfterEnd) {
  const std::string file = craft("reversed.safetensors", R"({"x.weight": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}})", 4);
  expect_rejected(file, {file, "tensor 'x.weight'", "[4, 0]", "begin after"});
}

TEST_F(SafetensorsTest, RejectsOffsetsOutsideTheDataSection) {
  const std::string file = craft("outside.safetensors", R"({"x.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4);
  expect_rejected(file, {file, "tensor 'x.weight'", "[0, 8]", "outside the data section"});
}

TEST_F(SafetensorsTest, RejectsOverlappingTensors) {
  const std::string file = craft(
      "overlap.safetensors",
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12);
  expect_rejected(file, {file, "tensor 'b'", "overlap", "tensor 'a'"});
  // Two tensors claiming the very same bytes.
  const std::string same = craft(
      "same.safetensors",
      R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
      R"( "b": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}})", 4);
  expect_rejected(same, {same, "tensor 'b'", "overlap", "tensor 'a'"});
}

TEST_F(SafetensorsTest, RejectsHoles) {
  const std::string file = craft(
      "hole.safetensors",
      R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},)"
      R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})", 12);
  expect_rejected(file, {file, "tensor 'b'", "hole", "[4, 8]"});
  const std::string leading = craft("leading.safetensors", R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})", 4);
  expect_rejected(leading, {leading, "tensor 'a'", "hole", "[0, 2]"});
}

TEST_F(SafetensorsTest, RejectsDataNotEndingAtEndOfFile) {
  const std::string file = craft("trailing.safetensors", R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 6);
  expect_rejected(file, {file, "ends at byte 4", "6 bytes"});
  const std::string no_tensors = craft("no_tensors.safetensors", "{}", 3);
  expect_rejected(no_tensors, {no_tensors, "ends at byte 0", "3 bytes"});
}

TEST_F(SafetensorsTest, RejectsNonStringMetadata) {
  const std::string file = craft("metadata.safetensors", R"({"__metadata__": {"format": "pt", "step": 10}})", 0);
  expect_rejected(file, {file, "__metadata__", "'step'"});
  const std::string not_object = craft("metadata_array.safetensors", R"({"__metadata__": ["pt"]})", 0);
  expect_rejected(not_object, {not_object, "__metadata__", "not a JSON object"});
}

TEST_F(SafetensorsTest, AtNamesFileAndTensor) {
  const std::vector<uint8_t> byte = {1};
  SafetensorsWriter writer;
  writer.add("present", DType::u8, {1}, byte.data(), 1);
  const std::string file = path("lookup.safetensors");
  writer.write(file);
  const auto reader = SafetensorsFile::open(file);
  expect_error([&] { reader->at("absent.weight"); }, {file, "tensor 'absent.weight'"});

  // An entry that does not fit this file is refused rather than turned into a wild pointer.
  SafetensorsEntry foreign = reader->at("present");
  foreign.begin = 0;
  foreign.end = 1u << 20;
  expect_error([&] { reader->data(foreign); }, {file, "tensor 'present'"});
}

// ---- checkpoint directories ---------------------------------------------------------------------

class SafetensorsCheckpointTest : public SafetensorsTest {
 protected:
  // Writes a shard holding float tensors whose values are [base, base + 1, ...].
  void write_shard(const std::string& name, const std::vector<std::pair<std::string, float>>& tensors) {
    SafetensorsWriter writer;
    for (const auto& [tensor, base] : tensors) {
      const std::vector<float> values = {base, base + 1.0f};
      writer.add(tensor, DType::f32, {2}, values.data(), 8);
    }
    writer.write(path(name));
  }

  void write_index(const std::string& text) { write_bytes(path("model.safetensors.index.json"), text); }
};

TEST_F(SafetensorsCheckpointTest, SingleFile) {
  write_shard("model.safetensors", {{"model.norm.weight", 1.0f}, {"lm_head.weight", 5.0f}});
  const auto checkpoint = SafetensorsCheckpoint::open_directory(directory_);
  EXPECT_EQ(checkpoint->tensor_names(), (std::vector<std::string>{"lm_head.weight", "model.norm.weight"}));
  EXPECT_EQ(checkpoint->entry("lm_head.weight").shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(read_values<float>(checkpoint->data("lm_head.weight"), 2), (std::vector<float>{5.0f, 6.0f}));
  EXPECT_EQ(checkpoint->file_of("model.norm.weight").path(), path("model.safetensors"));
  expect_error([&] { checkpoint->entry("absent"); }, {directory_, "tensor 'absent'"});
  // A trailing slash on the directory is harmless.
  EXPECT_EQ(SafetensorsCheckpoint::open_directory(directory_ + "/")->tensor_names().size(), 2u);
}

TEST_F(SafetensorsCheckpointTest, ShardedWithIndex) {
  write_shard("model-00001-of-00002.safetensors", {{"model.embed_tokens.weight", 0.0f}, {"model.layers.0.mlp.up_proj.weight", 10.0f}});
  write_shard("model-00002-of-00002.safetensors", {{"model.norm.weight", 20.0f}, {"lm_head.weight", 30.0f},
                                                   {"unlisted.weight", 40.0f}});
  write_index(R"({
    "metadata": {"total_size": 32},
    "weight_map": {
      "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
      "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
      "model.norm.weight": "model-00002-of-00002.safetensors",
      "lm_head.weight": "model-00002-of-00002.safetensors"
    }
  })");
  const auto checkpoint = SafetensorsCheckpoint::open_directory(directory_);
  // Lookups go through the weight map, so a tensor present in a shard but unlisted is not visible.
  EXPECT_EQ(checkpoint->tensor_names(),
            (std::vector<std::string>{"lm_head.weight", "model.embed_tokens.weight",
                                      "model.layers.0.mlp.up_proj.weight", "model.norm.weight"}));
  EXPECT_EQ(read_values<float>(checkpoint->data("model.layers.0.mlp.up_proj.weight"), 2),
            (std::vector<float>{10.0f, 11.0f}));
  EXPECT_EQ(read_values<float>(checkpoint->data("lm_head.weight"), 2), (std::vector<float>{30.0f, 31.0f}));
  EXPECT_EQ(checkpoint->file_of("model.norm.weight").path(), path("model-00002-of-00002.safetensors"));
  EXPECT_EQ(checkpoint->file_of("model.embed_tokens.weight").path(), path("model-00001-of-00002.safetensors"));
  EXPECT_EQ(checkpoint->entry("model.norm.weight").dtype, DType::f32);
  expect_error([&] { checkpoint->data("unlisted.weight"); }, {"tensor 'unlisted.weight'"});
}

TEST_F(SafetensorsCheckpointTest, RejectsInvalidIndexJson) {
  write_index(R"({"weight_map": {)");
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); },
               {path("model.safetensors.index.json"), "invalid JSON"});
}

TEST_F(SafetensorsCheckpointTest, RejectsIndexWithoutWeightMap) {
  write_index(R"({"metadata": {"total_size": 0}})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); },
               {path("model.safetensors.index.json"), "weight_map"});
  write_index(R"({"weight_map": ["model-00001.safetensors"]})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); },
               {path("model.safetensors.index.json"), "weight_map", "not a JSON object"});
}

TEST_F(SafetensorsCheckpointTest, RejectsMissingShard) {
  write_shard("model-00001-of-00002.safetensors", {{"a", 0.0f}});
  write_index(R"({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); },
               {path("model.safetensors.index.json"), "model-00002-of-00002.safetensors", "tensor 'b'", "missing"});
}

TEST_F(SafetensorsCheckpointTest, RejectsTensorAbsentFromItsShard) {
  write_shard("model-00001-of-00001.safetensors", {{"a", 0.0f}});
  write_index(R"({"weight_map": {"a": "model-00001-of-00001.safetensors", "ghost.weight": "model-00001-of-00001.safetensors"}})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); },
               {"tensor 'ghost.weight'", path("model-00001-of-00001.safetensors")});
}

TEST_F(SafetensorsCheckpointTest, RejectsBadShardNames) {
  write_index(R"({"weight_map": {"a": 3}})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); }, {"tensor 'a'", "not a file name"});
  // The escaping shard really exists, so only the name check can stop it from loading.
  write_shard("outside.safetensors", {{"a", 0.0f}});
  const std::string inner = path("checkpoint");
  fs::create_directory(inner);
  write_bytes(inner + "/model.safetensors.index.json", R"({"weight_map": {"a": "../outside.safetensors"}})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(inner); },
               {"tensor 'a'", "../outside.safetensors", "not a relative path inside"});
  write_bytes(inner + "/model.safetensors.index.json", R"({"weight_map": {"a": ")" + path("outside.safetensors") + R"("}})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(inner); }, {"tensor 'a'", "not a relative path inside"});
}

TEST_F(SafetensorsCheckpointTest, PassesOnShardFormatErrors) {
  craft("model-00001-of-00001.safetensors", R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", 4);
  write_index(R"({"weight_map": {"a": "model-00001-of-00001.safetensors"}})");
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); },
               {path("model-00001-of-00001.safetensors"), "tensor 'a'", "needs 8"});
}

TEST_F(SafetensorsCheckpointTest, RejectsDirectoryWithoutCheckpoint) {
  expect_error([&] { SafetensorsCheckpoint::open_directory(directory_); },
               {directory_, "model.safetensors", "model.safetensors.index.json"});
  const std::string absent = path("absent");
  expect_error([&] { SafetensorsCheckpoint::open_directory(absent); }, {absent, "not a directory"});
}

}  // namespace
}  // namespace qlora::shard
