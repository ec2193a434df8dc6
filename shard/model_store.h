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
#include "shard/tokenizer.h"

namespace qlora::shard {

constexpr int kStoreFormatVersion = 1;

struct StoreHeader {
  int format_version = kStoreFormatVersion;
  ModelConfig config;
  std::string quant_method = "bnb-4bit";  // bnb-4bit, bnb-8bit, gptq, ..., none
  std::string quant_type = "nf4";         // nf4 or fp4 for bnb-4bit
  int64_t blocksize = 64;
  bool double_quant = false;
  std::string compute_dtype = "float32";
  std::string tokenizer = "bytes";        // "bytes" (token = byte value), or the kind of /tokenizer
  std::string source = "";                // what the store was converted from
  std::string source_checksum = "";       // FNV-1a 64 over the source's tensor bytes, hex
};

struct StoredTensor {
  std::string name;
  std::vector<int64_t> shape;
  kernels::DType dtype = kernels::DType::f32;  // the source dtype (also the storage dtype if dense)
  bool quantized = false;
  int64_t numel = 0;
};

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

  // The rank's slice of a quantized tensor: packed codes [byte_begin, byte_end) and absmax
  // [block_begin, block_end) of `range`, read as HDF5 hyperslabs into caller memory.
  void read_codes(const std::string& name, const ShardRange& range, uint8_t* codes) const;
  void read_absmax(const std::string& name, const ShardRange& range, float* absmax) const;
  // A whole unquantized tensor in its stored dtype (numel * dtype_size bytes).
  void read_dense(const std::string& name, void* destination) const;

  // The embedded /tokenizer (docs/FORMAT.md); false when the store has none.
  bool read_tokenizer(TokenizerSource* source) const;

  // Bytes of tensor data this reader has read so far (tests assert ranks read about total / N).
  uint64_t bytes_read() const { return bytes_read_; }
  // Total bytes of tensor data in the file (codes + absmax + dense tensors).
  uint64_t data_bytes() const;

 private:
  ModelStore() = default;
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
  void add_quantized(const std::string& name, const std::vector<int64_t>& shape, kernels::DType source_dtype,
                     const uint8_t* codes, const float* absmax);
  void add_dense(const std::string& name, const std::vector<int64_t>& shape, kernels::DType dtype,
                 const void* data);
  void set_source_checksum(const std::string& checksum);
  // Embeds the model's tokenizer as /tokenizer and sets the header's tokenizer to its kind; an empty
  // kind embeds nothing.
  void add_tokenizer(const TokenizerSource& source);
  void finish();

 private:
  // Creates /tensors/<name> with its shape, dtype and quantized attributes; returns the open group.
  int64_t create_tensor_group(const std::string& name, const std::vector<int64_t>& shape, kernels::DType dtype,
                              bool quantized);
  std::string path_;
  std::string partial_path_;
  StoreHeader header_;
  int64_t file_ = -1;
  bool finished_ = false;
};

// FNV-1a 64-bit, incremental; used for the store's source checksum.
class Fnv1a64 {
 public:
  void update(const void* data, size_t bytes);
  std::string hex() const;

 private:
  uint64_t state_ = 1469598103934665603ull;
};

}  // namespace qlora::shard
