// GGUF v3 files planned before their tensor data exists: typed metadata, tensor infos, and every
// tensor's aligned offset, so the header is written once and tensors are filled in at known file
// offsets (by one process or several). The reader (shard/gguf.h) and llama.cpp read the result.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "shard/gguf.h"

namespace qlora::shard {

class GgufHeaderBuilder {
 public:
  static constexpr uint64_t kAlignment = 32;   // GGUF's default general.alignment

  // Scalars and arrays in the value types llama.cpp checks each key against (it refuses a key of
  // another type): counts and token ids uint32, hyper-parameters float32, ...
  void add_string(const std::string& key, const std::string& value);
  void add_uint32(const std::string& key, uint32_t value);
  void add_int32(const std::string& key, int32_t value);
  void add_float32(const std::string& key, float value);
  void add_bool(const std::string& key, bool value);
  void add_string_array(const std::string& key, const std::vector<std::string>& values);
  void add_float32_array(const std::string& key, const std::vector<float>& values);
  void add_int32_array(const std::string& key, const std::vector<int32_t>& values);
  bool has_key(const std::string& key) const;

  // A tensor of row-major `shape` (outermost first, as Hugging Face writes it; the file lists it
  // innermost first) and ggml type; returns its offset in the data section. std::invalid_argument
  // when the innermost dimension is not a whole number of the type's blocks or the name repeats.
  uint64_t add_tensor(const std::string& name, const std::vector<int64_t>& shape, uint32_t ggml_type);

  // The header: magic, version 3, counts, metadata, tensor infos, padding to the alignment. Tensor
  // data starts right after it, each tensor at header().size() + its offset.
  std::string header() const;
  // Bytes of the data section, the last tensor padded to the alignment as the gguf package writes it.
  uint64_t data_bytes() const { return data_bytes_; }

 private:
  void start(const std::string& key, GgufType type);
  template <typename T>
  void append(std::string& out, T value) const {
    out.append(reinterpret_cast<const char*>(&value), sizeof value);
  }
  void append_text(std::string& out, const std::string& text) const;

  std::string metadata_;
  uint64_t metadata_count_ = 0;
  std::vector<std::string> keys_;
  std::string tensor_infos_;
  std::vector<std::string> tensor_names_;
  uint64_t data_bytes_ = 0;
};

// Bytes a tensor of `numel` elements occupies as `ggml_type` (numel a multiple of its block size).
uint64_t ggml_tensor_bytes(uint32_t ggml_type, int64_t numel);

}  // namespace qlora::shard
