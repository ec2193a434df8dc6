// GGUF (llama.cpp's model format, versions 2 and 3): a memory-mapped reader that bounds-checks every
// header field, typed access to the metadata and tensors (decoded to fp32 by kernels/ggml_blocks.h),
// and the Llama model config a GGUF file's metadata describes. How its tensors map onto Hugging
// Face's (names, Q/K row order) is shard/llama_tensor_map.h.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ggml_blocks.h"
#include "shard/model_config.h"

namespace qlora::shard {

// Metadata value types, numbered as the GGUF specification numbers them.
enum class GgufType : uint32_t {
  uint8 = 0, int8 = 1, uint16 = 2, int16 = 3, uint32 = 4, int32 = 5, float32 = 6, boolean = 7,
  string = 8, array = 9, uint64 = 10, int64 = 11, float64 = 12,
};
std::string gguf_type_name(GgufType type);   // "uint8", ..., "array"; "type N" when out of range

struct GgufMetadata {
  std::string key;
  GgufType type = GgufType::uint8;
  GgufType element_type = GgufType::uint8;  // arrays only
  uint64_t count = 1;                       // arrays: element count
  uint64_t offset = 0;                      // file offset of the value (arrays: of the first element)
  uint64_t bytes = 0;                       // bytes the value (arrays: the elements) occupy
};

struct GgufTensor {
  std::string name;
  // Row-major, outermost first, as PyTorch and Hugging Face write shapes: a linear weight is
  // [out, in]. GGUF itself lists dimensions innermost first; this is that list reversed.
  std::vector<int64_t> shape;
  uint32_t type = kernels::ggml_type::f32;  // a ggml type id
  uint64_t offset = 0;                      // relative to the data section
  uint64_t bytes = 0;
  int64_t numel() const;
};

class GgufFile {
 public:
  // Maps the file and validates magic, version (2 or 3), counts, every key, value type, string
  // and array length (nested arrays at most kMaxArrayNesting deep), general.alignment, and each
  // tensor's name, dimensions, type, alignment and extent (inside the file, no two overlapping).
  // Throws FormatError naming the file and, where there is one, the key or tensor.
  static std::unique_ptr<GgufFile> open(const std::string& path);
  // The same checks on an image already in memory; `bytes` must outlive the result. `label`
  // stands in for the path in messages. The fuzzer's entry point.
  static std::unique_ptr<GgufFile> parse(const uint8_t* bytes, uint64_t size, const std::string& label);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  static constexpr int kMaxArrayNesting = 8;
  static constexpr uint64_t kDefaultAlignment = 32;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }   // file offset of the tensor data section
  uint64_t file_size() const { return size_; }

  const std::vector<GgufMetadata>& metadata() const { return metadata_; }
  const GgufMetadata* find_key(const std::string& key) const;   // nullptr when absent
  bool has_key(const std::string& key) const { return find_key(key) != nullptr; }

  // Typed getters throw FormatError (naming file and key) when the key is absent or its type does
  // not fit: get_int takes every integer type (a uint64 above INT64_MAX is refused), get_float
  // float32/float64 and integers, the array getters arrays of those element types. Nested arrays
  // are validated but only their length is exposed.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  uint64_t get_array_length(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;
  std::vector<double> get_float_array(const std::string& key) const;
  // With a fallback for an absent key (a present key of the wrong type still throws).
  std::string get_string(const std::string& key, const std::string& fallback) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_float(const std::string& key, double fallback) const;

  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find_tensor(const std::string& name) const;   // nullptr when absent
  const GgufTensor& tensor(const std::string& name) const;        // FormatError when absent
  const uint8_t* data(const GgufTensor& tensor) const;            // pointer into the mapping
  // numel() floats; FormatError naming the tensor for a type qlora cannot dequantize.
  void dequantize(const GgufTensor& tensor, float* output) const;
  std::vector<float> dequantize(const GgufTensor& tensor) const;

 private:
  GgufFile() = default;
  void parse_image();
  const GgufMetadata& require(const std::string& key) const;

  std::string path_;
  const uint8_t* bytes_ = nullptr;
  uint64_t size_ = 0;
  bool owns_mapping_ = false;
  uint32_t version_ = 0;
  uint64_t alignment_ = kDefaultAlignment;
  uint64_t data_offset_ = 0;
  std::vector<GgufMetadata> metadata_;
  std::map<std::string, size_t> key_index_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// ---- the Llama config ------------------------------------------------------------------------

// The model config from llama.* metadata: embedding_length, feed_forward_length, block_count,
// attention.head_count(_kv), attention.key_length, attention.layer_norm_rms_epsilon,
// rope.freq_base, context_length; vocabulary size from tokenizer.ggml.tokens (else llama.vocab_size,
// else token_embd's rows); tied embeddings when output.weight is absent; llama3 rope scaling
// recognised from the rope_freqs.weight factors llama.cpp's converter writes. FormatError for
// another architecture, a missing or non-positive field, or a rope scaling qlora cannot express.
ModelConfig llama_config_from_gguf(const GgufFile& file);

}  // namespace qlora::shard
