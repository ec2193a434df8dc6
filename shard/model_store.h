// model.h5, the world-size-independent 4-bit model store (docs/FORMAT.md is the normative spec):
// a writer that streams tensors in, and a reader from which each rank reads only its hyperslabs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/nf4.h"
#include "shard/model_config.h"
#include "shard/shard_plan.h"
#include "shard/tokenizer_source.h"

namespace qlora::shard {

// 2 added double quantization, LLM.int8 tensors (bnb-8bit) and block linears kept unquantized.
constexpr int kStoreFormatVersion = 2;

struct StoreHeader {
  int format_version = kStoreFormatVersion;
  ModelConfig config;
  std::string quant_method = "bnb-4bit";  // bnb-4bit, bnb-8bit, gptq, ..., none
  std::string quant_type = "nf4";         // nf4 or fp4 for bnb-4bit, int8 for bnb-8bit
  int64_t blocksize = 64;                 // 4-bit only (bnb-8bit scales whole rows: 0)
  bool double_quant = false;              // 4-bit absmax stored as uint8 + nested fp32 (compress_statistics)
  std::string unquantized_modules = "";   // comma list of module-name suffixes kept in the source dtype
  std::string compute_dtype = "float32";
  std::string tokenizer = "bytes";        // "bytes" (token = byte value), or the kind of /tokenizer
  std::string source = "";                // what the store was converted from
  std::string source_checksum = "";       // FNV-1a 64 over the source's tensor bytes, hex
  std::string chat_template = "";         // the model's Jinja chat template; empty when it has none
};

struct StoredTensor {
  std::string name;
  std::vector<int64_t> shape;
  kernels::DType dtype = kernels::DType::f32;  // the source dtype (also the storage dtype if dense)
  bool quantized = false;
  int64_t numel = 0;
  QuantGeometry geometry;     // quantized tensors: how codes and absmax are laid out and cut
  float nested_offset = 0.0f; // double quantization: the mean absmax added back after decoding
};

// How a block linear of `shape` is laid out in a store with this header.
QuantGeometry quant_geometry(const StoreHeader& header, const std::vector<int64_t>& shape);

// Whether `tensor_name` (".weight" stripped) ends with one of the comma-separated module suffixes,
// at a '.' boundary: "down_proj" matches model.layers.3.mlp.down_proj, "proj" matches nothing.
bool module_listed(const std::string& tensor_name, const std::string& comma_separated_suffixes);

class ModelStore {
 public:
  // Throws FormatError naming the path for a missing, unreadable, foreign or newer-version file.
  static std::unique_ptr<ModelStore> open(const std::string& path);
  ~ModelStore();

  const std::string& path() const { return path_; }
  const StoreHeader& header() const { return header_; }
  const std::vector<StoredTensor>& tensors() const { return tensors_; }
  const StoredTensor& tensor(const std::string& name) const;  // FormatError when absent
  bool contains(const std::string& name) const;

  // The rank's slice of a quantized tensor, read as HDF5 hyperslabs into caller memory: code bytes
  // [byte_begin, byte_end) (packed 4-bit, or int8 for bnb-8bit), and absmax [block_begin, block_end):
  // fp32 (int8: one per row, bitsandbytes' SCB), or under double quantization uint8 codes plus the
  // nested fp32 absmax [nested_begin, nested_end).
  void read_codes(const std::string& name, const ShardRange& range, uint8_t* codes) const;
  void read_absmax(const std::string& name, const ShardRange& range, float* absmax) const;
  void read_absmax_codes(const std::string& name, const ShardRange& range, uint8_t* absmax_codes) const;
  void read_nested_absmax(const std::string& name, const ShardRange& range, float* nested_absmax) const;
  // All of the above for `range`: absmax receives fp32 values or uint8 codes as the tensor stores
  // them; nested_absmax is ignored without double quantization.
  void read_quantized(const std::string& name, const ShardRange& range, uint8_t* codes, void* absmax,
                      float* nested_absmax) const;
  // A whole unquantized tensor in its stored dtype (numel * dtype_size bytes).
  void read_dense(const std::string& name, void* destination) const;
  // Rows [row_begin, row_end) of an unquantized tensor (along its first dimension), one hyperslab:
  // (row_end - row_begin) * row elements * dtype_size bytes. FormatError when out of range.
  void read_dense_rows(const std::string& name, int64_t row_begin, int64_t row_end, void* destination) const;

  // The embedded /tokenizer (docs/FORMAT.md); false when the store has none.
  bool read_tokenizer(TokenizerSource* source) const;
  // The model's chat template (root attribute chat_template); empty when the store has none.
  const std::string& chat_template() const { return header_.chat_template; }

  // Whether the store carries checksums over its tensor data (stores converted before them do not).
  // With them every read above verifies the 1 MiB pieces it touches and throws FormatError naming
  // the tensor when one differs.
  bool has_checksums() const { return checksummed_; }
  // Reads and verifies every tensor's data; returns the bytes verified (0 without checksums).
  uint64_t verify_all() const;

  // Bytes of tensor data this reader has read so far (tests assert ranks read about total / N).
  uint64_t bytes_read() const { return bytes_read_; }
  // Total bytes of tensor data in the file (codes + absmax + nested absmax + dense tensors).
  uint64_t data_bytes() const;

 private:
  ModelStore() = default;
  // Elements [begin, end) of the tensor's dataset `part` (codes, absmax, nested_absmax, data) of
  // `length` elements, verified against its checksums when the store has them.
  void read_checked(const std::string& name, const char* part, kernels::DType dtype, int64_t length, int64_t begin,
                    int64_t end, void* destination) const;
  bool checksummed_ = false;
  std::string path_;
  int64_t file_ = -1;
  StoreHeader header_;
  std::vector<StoredTensor> tensors_;
  mutable uint64_t bytes_read_ = 0;
};

// Writes a store to `path + ".partial"` and renames it on finish(), so a crash never leaves a
// file that looks complete. Tensors are written as they come: memory stays at one tensor.
class ModelStoreWriter {
 public:
  ModelStoreWriter(const std::string& path, const StoreHeader& header);
  ~ModelStoreWriter();  // removes the partial file unless finish() ran
  // A 4-bit tensor with fp32 absmax (header.double_quant false).
  void add_quantized(const std::string& name, const std::vector<int64_t>& shape, kernels::DType source_dtype,
                     const uint8_t* codes, const float* absmax);
  // A 4-bit tensor under double quantization (header.double_quant true): absmax_codes one byte per
  // block, nested_absmax one float per 256 blocks, and the tensor's offset.
  void add_double_quantized(const std::string& name, const std::vector<int64_t>& shape, kernels::DType source_dtype,
                            const uint8_t* codes, const uint8_t* absmax_codes, const float* nested_absmax,
                            float nested_offset);
  // An LLM.int8 weight [rows, cols] (header.quant_method bnb-8bit): int8 codes and fp32 row absmax.
  void add_int8(const std::string& name, const std::vector<int64_t>& shape, kernels::DType source_dtype,
                const int8_t* codes, const float* row_absmax);
  void add_dense(const std::string& name, const std::vector<int64_t>& shape, kernels::DType dtype,
                 const void* data);
  void set_source_checksum(const std::string& checksum);
  // Stores the model's chat template as the root attribute chat_template (nothing when empty).
  void set_chat_template(const std::string& chat_template);
  // Embeds the model's tokenizer as /tokenizer and sets the header's tokenizer to its kind; an empty
  // kind embeds nothing.
  void add_tokenizer(const TokenizerSource& source);
  void finish();

 private:
  // Creates /tensors/<name> with its shape, dtype and quantized attributes; returns the open group.
  int64_t create_tensor_group(const std::string& name, const std::vector<int64_t>& shape, kernels::DType dtype,
                              bool quantized);
  QuantGeometry geometry_for(const std::vector<int64_t>& shape) const;
  // FormatError naming the tensor when `count` float values at `data` hold a NaN or Inf: a store
  // never keeps weights or scales that would make every loss non-finite.
  void refuse_non_finite(const std::string& name, const char* part, kernels::DType dtype, const void* data,
                         int64_t count) const;
  std::string path_;
  std::string partial_path_;
  StoreHeader header_;
  int64_t file_ = -1;
  bool finished_ = false;
};

}  // namespace qlora::shard
