// safetensors: a memory-mapped reader that bounds-checks every header field, a sharded-checkpoint
// index reader, and a writer (used for adapters and test fixtures).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/errors.h"
#include "kernels/dtype.h"

namespace qlora::shard {

// Every user-caused input problem is reported as a FormatError (common/errors.h) whose message
// names the file and, where relevant, the tensor.
struct SafetensorsEntry {
  std::string name;
  std::string dtype_code;           // as written: "F32", "F16", "BF16", "U8", "I8", "I32", "I64", ...
  kernels::DType dtype;             // valid when the code is one qlora understands
  bool dtype_known = false;
  std::vector<int64_t> shape;
  uint64_t begin = 0;               // relative to the data section
  uint64_t end = 0;
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Maps the file and validates the header: length (<= 100,000,000 and inside the file), JSON
  // object, entries with dtype/shape/data_offsets, end-begin equal to numel*size, offsets inside the
  // data, no overlaps, no holes, data ending exactly at end of file. Throws FormatError.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  // The same checks on a file image already in memory; `bytes` must outlive the result and
  // `label` stands in for the path in messages. The fuzzer's entry point.
  static std::unique_ptr<SafetensorsFile> parse(const uint8_t* bytes, uint64_t size, const std::string& label);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;   // nullptr when absent
  const SafetensorsEntry& at(const std::string& name) const;     // FormatError when absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const uint8_t* data(const SafetensorsEntry& entry) const;      // pointer into the mapping
  uint64_t file_size() const { return file_size_; }

 private:
  SafetensorsFile() = default;
  void parse_image();   // validates the image at mapping_ and fills the entries
  std::string path_;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  const uint8_t* mapping_ = nullptr;
  bool owns_mapping_ = false;   // false for parse(): the caller's bytes
  uint64_t file_size_ = 0;
  uint64_t data_offset_ = 0;
};

// A Hugging Face checkpoint directory: model.safetensors, or model.safetensors.index.json plus its
// shards. Tensor lookup goes through the weight map. Throws FormatError.
class SafetensorsCheckpoint {
 public:
  static std::unique_ptr<SafetensorsCheckpoint> open_directory(const std::string& directory);
  std::vector<std::string> tensor_names() const;                 // sorted
  bool contains(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;
  const uint8_t* data(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> file_of_tensor_;
};

// Collects tensors and writes one safetensors file atomically (temporary file, then rename).
// Header padded with spaces to a multiple of 8; tensors laid out in name order.
class SafetensorsWriter {
 public:
  void add(const std::string& name, kernels::DType dtype, std::vector<int64_t> shape, const void* data,
           size_t bytes);                                        // copies the bytes
  void set_metadata(const std::string& key, const std::string& value);
  void write(const std::string& path) const;                     // throws FormatError on I/O failure

 private:
  struct Pending {
    kernels::DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::map<std::string, Pending> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A safetensors file planned before any of its data exists: the header bytes (8-byte length, JSON
// padded with spaces to a multiple of 8) and each tensor's absolute byte range in the file, laid out
// contiguously in the order given. Several writers can then fill disjoint tensors of one file at
// known offsets (qlora merge under mpirun); SafetensorsFile::open reads the result.
struct SafetensorsTensorSpec {
  std::string name;
  kernels::DType dtype;
  std::vector<int64_t> shape;
};
struct SafetensorsLayout {
  std::string header;                  // the first header.size() bytes of the file
  std::vector<uint64_t> file_offsets;  // per tensor, in the order given: where its bytes start
  std::vector<uint64_t> tensor_bytes;  // per tensor: numel * dtype size
  uint64_t file_size = 0;
};
// std::invalid_argument for a duplicate or reserved name (a caller's bug); FormatError when the
// header would exceed the format's limit.
SafetensorsLayout plan_safetensors(const std::vector<SafetensorsTensorSpec>& tensors,
                                   const std::map<std::string, std::string>& metadata);

}  // namespace qlora::shard
