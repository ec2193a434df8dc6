// HDF5 implementation of the model store. Layout (see docs/FORMAT.md):
//   /            attributes format, format_version, architecture, config_json, quant_*, ...
//   /tensors/<name>/codes          uint8 [ceil(numel/2)] (4-bit) or int8 [numel] (bnb-8bit)
//   /tensors/<name>/absmax         float32 [blocks], or uint8 [blocks] under double quantization
//   /tensors/<name>/nested_absmax  float32 [ceil(blocks/256)] (double quantization only)
//   /tensors/<name>/data           source dtype [numel]    (dense tensors; bf16/fp16 as uint16 bits)
// Each tensor group carries shape (int64[]), dtype (string) and quantized (int); nested_offset
// (float64) under double quantization.
//   /tokenizer   uint8 [n]: the tokenizer's source bytes, attributes kind, bos_token, eos_token (optional)
#include "shard/model_store.h"

#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cassert>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "common/hash.h"
#include "common/json.h"
#include "common/log.h"
#include "shard/hdf5_file.h"
#include "shard/safetensors.h"

namespace qlora::shard {
namespace {

using namespace h5;

constexpr const char* kFormatName = "qlora-4bit-store";

std::string tensor_group(const std::string& name) { return "/tensors/" + name; }

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  return numel;
}

// The first element of a float tensor that is NaN or Inf (by its exponent bits), or -1.
int64_t first_non_finite(kernels::DType dtype, const void* data, int64_t count) {
  if (dtype == kernels::DType::f32) {
    const auto* bytes = static_cast<const uint8_t*>(data);
    for (int64_t i = 0; i < count; ++i) {
      uint32_t word;
      std::memcpy(&word, bytes + 4 * i, sizeof word);
      if ((word & 0x7f800000u) == 0x7f800000u) return i;
    }
  } else if (dtype == kernels::DType::bf16 || dtype == kernels::DType::f16) {
    const uint16_t exponent = dtype == kernels::DType::bf16 ? 0x7f80 : 0x7c00;
    const auto* bytes = static_cast<const uint8_t*>(data);
    for (int64_t i = 0; i < count; ++i) {
      uint16_t half;
      std::memcpy(&half, bytes + 2 * i, sizeof half);
      if ((half & exponent) == exponent) return i;
    }
  }
  return -1;
}

// Stored tensor data carries FNV-1a 64 checksums over fixed 1 MiB pieces of each dataset, in a
// sibling dataset "<part>_fnv1a64" (int64, one per piece): a rank reading a slice verifies the pieces
// it touches, reading at most one piece's worth beyond each end of its slice.
constexpr int64_t kChecksumPieceBytes = int64_t{1} << 20;
constexpr const char* kChecksumSuffix = "_fnv1a64";

int64_t piece_checksum(const Fnv1a64& hash) { return static_cast<int64_t>(std::stoull(hash.hex(), nullptr, 16)); }

void write_with_checksums(hid_t group, const char* part, kernels::DType dtype, int64_t count, const void* data,
                          const std::string& where) {
  write_dataset(group, part, dtype, count, data, where);
  if (count <= 0) return;
  const int64_t element = kernels::dtype_size(dtype);
  const int64_t piece = kChecksumPieceBytes / element;
  std::vector<int64_t> checksums(static_cast<size_t>((count + piece - 1) / piece));
  const auto* bytes = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < checksums.size(); ++i) {
    const int64_t begin = static_cast<int64_t>(i) * piece;
    Fnv1a64 hash;
    hash.update(bytes + begin * element, static_cast<size_t>(std::min(piece, count - begin) * element));
    checksums[i] = piece_checksum(hash);
  }
  write_dataset(group, (std::string(part) + kChecksumSuffix).c_str(), kernels::DType::i64,
                static_cast<int64_t>(checksums.size()), checksums.data(), where);
}

}  // namespace

QuantGeometry quant_geometry(const StoreHeader& header, const std::vector<int64_t>& shape) {
  QuantGeometry geometry;
  geometry.numel = element_count(shape);
  if (header.quant_method == "bnb-8bit") {
    geometry.code_bits = 8;
    geometry.blocksize = shape.size() == 2 ? shape[1] : geometry.numel;
  } else {
    geometry.blocksize = header.blocksize;
    geometry.double_quant = header.double_quant;
  }
  return geometry;
}

bool module_listed(const std::string& tensor_name, const std::string& comma_separated_suffixes) {
  std::string module = tensor_name;
  const std::string weight = ".weight";
  if (module.size() > weight.size() && module.compare(module.size() - weight.size(), weight.size(), weight) == 0)
    module.resize(module.size() - weight.size());
  std::stringstream list(comma_separated_suffixes);
  std::string suffix;
  while (std::getline(list, suffix, ',')) {
    if (suffix.empty() || suffix.size() > module.size()) continue;
    if (module.compare(module.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    if (suffix.size() == module.size() || module[module.size() - suffix.size() - 1] == '.') return true;
  }
  return false;
}

// ---- reader --------------------------------------------------------------------------------------

std::unique_ptr<ModelStore> ModelStore::open(const std::string& path) {
  silence_hdf5_errors();
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error))
    throw FormatError(path + ": no such model file (create one with `qlora convert`)");
  if (H5Fis_hdf5(path.c_str()) <= 0)
    throw FormatError(path + ": not an HDF5 file (is it a safetensors or GGUF file? convert it with `qlora convert --from`)");
  std::unique_ptr<ModelStore> store(new ModelStore());
  store->path_ = path;
  store->file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (store->file_ < 0) throw FormatError(path + ": cannot open the HDF5 file (unreadable or truncated)");
  const hid_t file = static_cast<hid_t>(store->file_);
  Handle root(H5Gopen2(file, "/", H5P_DEFAULT), H5Gclose);
  if (!has_attribute(root.get(), "format") || read_string_attribute(root.get(), "format", path) != kFormatName)
    throw FormatError(path + ": not a qlora model store (no 'format' = '" + kFormatName + "' attribute)");
  StoreHeader& header = store->header_;
  header.format_version = static_cast<int>(read_int_attribute(root.get(), "format_version", path));
  if (header.format_version < 1)
    throw FormatError(path + ": invalid format version " + std::to_string(header.format_version));
  if (header.format_version > kStoreFormatVersion)
    throw FormatError(path + ": written by a newer qlora (format version " + std::to_string(header.format_version) +
                      ", this build reads up to " + std::to_string(kStoreFormatVersion) + "); upgrade qlora");
  const std::string config_source = path + " (config_json)";
  header.config =
      ModelConfig::from_json(parse_json(read_string_attribute(root.get(), "config_json", path), config_source),
                             config_source);
  header.quant_method = read_string_attribute(root.get(), "quant_method", path);
  header.quant_type = read_string_attribute(root.get(), "quant_type", path);
  header.blocksize = read_int_attribute(root.get(), "blocksize", path);
  header.double_quant = read_int_attribute(root.get(), "double_quant", path) != 0;
  header.compute_dtype = read_string_attribute(root.get(), "compute_dtype", path);
  header.tokenizer = read_string_attribute(root.get(), "tokenizer", path);
  header.source = read_string_attribute(root.get(), "source", path);
  header.source_checksum = read_string_attribute(root.get(), "source_checksum", path);
  if (has_attribute(root.get(), "chat_template"))
    header.chat_template = read_string_attribute(root.get(), "chat_template", path);
  if (has_attribute(root.get(), "unquantized_modules"))
    header.unquantized_modules = read_string_attribute(root.get(), "unquantized_modules", path);
  const bool quantized_store = header.quant_method != "none";
  const bool int8_store = header.quant_method == "bnb-8bit";
  if (int8_store) {
    if (header.quant_type != "int8" || header.double_quant)
      throw FormatError(path + ": a bnb-8bit store must have quant_type 'int8' and no double quantization");
  } else if (quantized_store) {
    if (header.blocksize < 2 || header.blocksize % 2 != 0)
      throw FormatError(path + ": invalid blocksize " + std::to_string(header.blocksize));
    if (header.quant_type != "nf4" && header.quant_type != "fp4")
      throw FormatError(path + ": unsupported quant_type '" + header.quant_type + "'");
  }

  for (const auto& name : header.config.tensor_names()) {
    const std::string group_path = tensor_group(name);
    const std::string where = path + ": tensor '" + name + "'";
    if (H5Lexists(file, "/tensors", H5P_DEFAULT) <= 0 || H5Lexists(file, group_path.c_str(), H5P_DEFAULT) <= 0)
      throw FormatError(where + " is missing from the store");
    Handle group(H5Gopen2(file, group_path.c_str(), H5P_DEFAULT), H5Gclose);
    StoredTensor tensor;
    tensor.name = name;
    tensor.shape = read_int_array_attribute(group.get(), "shape", where);
    if (tensor.shape != header.config.expected_shape(name))
      throw FormatError(where + ": stored shape contradicts the model config");
    if (!kernels::parse_dtype_name(read_string_attribute(group.get(), "dtype", where), &tensor.dtype))
      throw FormatError(where + ": unknown dtype");
    tensor.quantized = read_int_attribute(group.get(), "quantized", where) != 0;
    // Only decoder blocks' linear weights may be quantized, and all of them in a quantized store
    // except the modules it lists as kept in the source dtype.
    const bool expected_quantized = quantized_store && ModelConfig::is_block_linear(name) &&
                                    !module_listed(name, header.unquantized_modules);
    if (tensor.quantized != expected_quantized)
      throw FormatError(where + (tensor.quantized ? " is quantized but should not be" : " should be quantized but is not") +
                        " in a '" + header.quant_method + "' store");
    tensor.numel = element_count(tensor.shape);
    if (tensor.quantized) {
      tensor.geometry = quant_geometry(header, tensor.shape);
      if (header.double_quant) tensor.nested_offset = static_cast<float>(read_double_attribute(group.get(), "nested_offset", where));
    }
    store->tensors_.push_back(std::move(tensor));
  }
  // Stores converted before checksums existed still load; their data is read unverified.
  const std::string first_part = tensor_group(store->tensors_.front().name) +
                                 (store->tensors_.front().quantized ? "/codes" : "/data") + kChecksumSuffix;
  store->checksummed_ = H5Lexists(file, first_part.c_str(), H5P_DEFAULT) > 0;
  if (!store->checksummed_)
    log::banner("note: " + path + " has no tensor checksums (converted by an older qlora); its data is read unverified");
  return store;
}

ModelStore::~ModelStore() {
  if (file_ >= 0) H5Fclose(static_cast<hid_t>(file_));
}

bool ModelStore::contains(const std::string& name) const {
  for (const auto& tensor : tensors_)
    if (tensor.name == name) return true;
  return false;
}

const StoredTensor& ModelStore::tensor(const std::string& name) const {
  for (const auto& tensor : tensors_)
    if (tensor.name == name) return tensor;
  throw FormatError(path_ + ": no tensor '" + name + "' in the store");
}

void ModelStore::read_codes(const std::string& name, const ShardRange& range, uint8_t* codes) const {
  const StoredTensor& stored = tensor(name);
  assert(stored.quantized);
  const auto code_dtype = stored.geometry.code_bits == 8 ? kernels::DType::i8 : kernels::DType::u8;
  read_checked(name, "codes", code_dtype, stored.geometry.code_bytes(), range.byte_begin, range.byte_end, codes);
  bytes_read_ += static_cast<uint64_t>(range.bytes());
}

void ModelStore::read_absmax(const std::string& name, const ShardRange& range, float* absmax) const {
  const StoredTensor& stored = tensor(name);
  assert(stored.quantized && !stored.geometry.double_quant);
  read_checked(name, "absmax", kernels::DType::f32, stored.geometry.blocks(), range.block_begin, range.block_end,
               absmax);
  bytes_read_ += static_cast<uint64_t>(range.blocks()) * sizeof(float);
}

void ModelStore::read_absmax_codes(const std::string& name, const ShardRange& range, uint8_t* absmax_codes) const {
  const StoredTensor& stored = tensor(name);
  assert(stored.quantized && stored.geometry.double_quant);
  read_checked(name, "absmax", kernels::DType::u8, stored.geometry.blocks(), range.block_begin, range.block_end,
               absmax_codes);
  bytes_read_ += static_cast<uint64_t>(range.blocks());
}

void ModelStore::read_nested_absmax(const std::string& name, const ShardRange& range, float* nested_absmax) const {
  const StoredTensor& stored = tensor(name);
  assert(stored.quantized && stored.geometry.double_quant);
  read_checked(name, "nested_absmax", kernels::DType::f32, stored.geometry.nested_blocks(), range.nested_begin,
               range.nested_end, nested_absmax);
  bytes_read_ += static_cast<uint64_t>(range.nested_blocks()) * sizeof(float);
}

void ModelStore::read_quantized(const std::string& name, const ShardRange& range, uint8_t* codes, void* absmax,
                                float* nested_absmax) const {
  read_codes(name, range, codes);
  if (tensor(name).geometry.double_quant) {
    read_absmax_codes(name, range, static_cast<uint8_t*>(absmax));
    read_nested_absmax(name, range, nested_absmax);
  } else {
    read_absmax(name, range, static_cast<float*>(absmax));
  }
}

void ModelStore::read_dense(const std::string& name, void* destination) const {
  const StoredTensor& stored = tensor(name);
  assert(!stored.quantized);
  read_checked(name, "data", stored.dtype, stored.numel, 0, stored.numel, destination);
  bytes_read_ += static_cast<uint64_t>(stored.numel) * kernels::dtype_size(stored.dtype);
}

void ModelStore::read_dense_rows(const std::string& name, int64_t row_begin, int64_t row_end, void* destination) const {
  const StoredTensor& stored = tensor(name);
  assert(!stored.quantized);
  const int64_t rows = stored.shape.empty() ? 1 : stored.shape[0];
  if (row_begin < 0 || row_end < row_begin || row_end > rows)
    throw FormatError(path_ + ": tensor '" + name + "' has " + std::to_string(rows) + " rows, rows [" +
                      std::to_string(row_begin) + ", " + std::to_string(row_end) + ") were asked for");
  const int64_t row_elements = rows == 0 ? 0 : stored.numel / rows;
  const int64_t count = (row_end - row_begin) * row_elements;
  read_checked(name, "data", stored.dtype, stored.numel, row_begin * row_elements, row_end * row_elements, destination);
  bytes_read_ += static_cast<uint64_t>(count) * kernels::dtype_size(stored.dtype);
}

void ModelStore::read_checked(const std::string& name, const char* part, kernels::DType dtype, int64_t length,
                              int64_t begin, int64_t end, void* destination) const {
  const hid_t file = static_cast<hid_t>(file_);
  const std::string dataset = tensor_group(name) + "/" + part;
  const std::string where = path_ + ": tensor '" + name + "'";
  read_hyperslab(file, dataset, dtype, length, begin, end, destination, where);
  if (!checksummed_ || end <= begin) return;
  const std::string checksums_path = dataset + kChecksumSuffix;
  const int64_t element = kernels::dtype_size(dtype);
  const int64_t piece = kChecksumPieceBytes / element;
  const int64_t first = begin / piece;
  const int64_t last = (end - 1) / piece;
  std::vector<int64_t> expected(static_cast<size_t>(last - first + 1));
  read_hyperslab(file, checksums_path, kernels::DType::i64, (length + piece - 1) / piece, first, last + 1,
                 expected.data(), where);
  // The parts of the first and last pieces outside [begin, end) are read only to check the pieces.
  const int64_t head_begin = first * piece;
  const int64_t tail_end = std::min(length, (last + 1) * piece);
  std::vector<uint8_t> head(static_cast<size_t>((begin - head_begin) * element));
  std::vector<uint8_t> tail(static_cast<size_t>((tail_end - end) * element));
  if (!head.empty()) read_hyperslab(file, dataset, dtype, length, head_begin, begin, head.data(), where);
  if (!tail.empty()) read_hyperslab(file, dataset, dtype, length, end, tail_end, tail.data(), where);
  const auto* middle = static_cast<const uint8_t*>(destination);
  for (int64_t index = first; index <= last; ++index) {
    const int64_t piece_begin = index * piece;
    const int64_t piece_end = std::min(length, piece_begin + piece);
    Fnv1a64 hash;
    if (piece_begin < begin) hash.update(head.data() + (piece_begin - head_begin) * element, (begin - piece_begin) * element);
    const int64_t inside_begin = std::max(piece_begin, begin);
    const int64_t inside_end = std::min(piece_end, end);
    hash.update(middle + (inside_begin - begin) * element, static_cast<size_t>((inside_end - inside_begin) * element));
    if (piece_end > end) hash.update(tail.data(), static_cast<size_t>((piece_end - end) * element));
    if (piece_checksum(hash) != expected[static_cast<size_t>(index - first)])
      throw FormatError(where + ": its stored " + part + " (bytes " + std::to_string(piece_begin * element) + " to " +
                            std::to_string(piece_end * element) + ") do not match their checksum: the store is corrupt",
                        "convert the model again or restore the file from a copy; `qlora inspect --verify " + path_ +
                            "` checks every tensor");
  }
}

uint64_t ModelStore::verify_all() const {
  if (!checksummed_) return 0;
  uint64_t verified = 0;
  std::vector<uint8_t> buffer;
  auto verify_part = [&](const std::string& name, const char* part, kernels::DType dtype, int64_t length) {
    const int64_t element = kernels::dtype_size(dtype);
    const int64_t step = (int64_t{64} << 20) / element;  // 64 MiB at a time, whole checksum pieces
    buffer.resize(static_cast<size_t>(std::min(length, step) * element));
    for (int64_t begin = 0; begin < length; begin += step) {
      const int64_t end = std::min(length, begin + step);
      read_checked(name, part, dtype, length, begin, end, buffer.data());
      verified += static_cast<uint64_t>((end - begin) * element);
    }
  };
  for (const auto& stored : tensors_) {
    if (!stored.quantized) {
      verify_part(stored.name, "data", stored.dtype, stored.numel);
      continue;
    }
    verify_part(stored.name, "codes", stored.geometry.code_bits == 8 ? kernels::DType::i8 : kernels::DType::u8,
                stored.geometry.code_bytes());
    verify_part(stored.name, "absmax", stored.geometry.double_quant ? kernels::DType::u8 : kernels::DType::f32,
                stored.geometry.blocks());
    if (stored.geometry.double_quant)
      verify_part(stored.name, "nested_absmax", kernels::DType::f32, stored.geometry.nested_blocks());
  }
  return verified;
}

bool ModelStore::read_tokenizer(TokenizerSource* source) const {
  const hid_t file = static_cast<hid_t>(file_);
  if (H5Lexists(file, "/tokenizer", H5P_DEFAULT) <= 0) return false;
  const std::string where = path_ + ": /tokenizer";
  Handle dataset(H5Dopen2(file, "/tokenizer", H5P_DEFAULT), H5Dclose);
  Handle space(H5Dget_space(dataset.get()), H5Sclose);
  hsize_t length = 0;
  if (!dataset.valid() || H5Sget_simple_extent_ndims(space.get()) != 1 ||
      H5Sget_simple_extent_dims(space.get(), &length, nullptr) != 1)
    throw FormatError(where + ": not a one-dimensional byte dataset");
  source->kind = read_string_attribute(dataset.get(), "kind", where);
  source->bos_token = has_attribute(dataset.get(), "bos_token") ? read_string_attribute(dataset.get(), "bos_token", where) : "";
  source->eos_token = has_attribute(dataset.get(), "eos_token") ? read_string_attribute(dataset.get(), "eos_token", where) : "";
  source->bytes.resize(static_cast<size_t>(length));
  read_hyperslab(file, "/tokenizer", kernels::DType::u8, static_cast<int64_t>(length), 0, static_cast<int64_t>(length),
                 source->bytes.data(), where);
  return true;
}

uint64_t ModelStore::data_bytes() const {
  uint64_t total = 0;
  for (const auto& stored : tensors_) {
    if (stored.quantized)
      total += static_cast<uint64_t>(stored.geometry.stored_bytes());
    else
      total += static_cast<uint64_t>(stored.numel) * kernels::dtype_size(stored.dtype);
  }
  return total;
}

// ---- writer --------------------------------------------------------------------------------------

ModelStoreWriter::ModelStoreWriter(const std::string& path, const StoreHeader& header)
    : path_(path), partial_path_(path + ".partial-" + std::to_string(getpid())), header_(header) {
  silence_hdf5_errors();
  // Created exclusively (never through a link planted under the temporary's name); a leftover of an
  // earlier process with this id is unlinked first, which removes a link, not its target.
  std::remove(partial_path_.c_str());
  file_ = H5Fcreate(partial_path_.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT);
  if (file_ < 0)
    throw FormatError(path + ": cannot create the output file (does its folder exist and is it writable?)");
  const hid_t file = static_cast<hid_t>(file_);
  Handle tensors(H5Gcreate2(file, "/tensors", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
  if (!tensors.valid()) throw FormatError(path + ": cannot create group /tensors");
}

ModelStoreWriter::~ModelStoreWriter() {
  if (file_ >= 0) H5Fclose(static_cast<hid_t>(file_));
  if (!finished_) std::remove(partial_path_.c_str());
}

int64_t ModelStoreWriter::create_tensor_group(const std::string& name, const std::vector<int64_t>& shape,
                                              kernels::DType dtype, bool quantized) {
  const std::string where = path_ + ": tensor '" + name + "'";
  const hid_t group =
      H5Gcreate2(static_cast<hid_t>(file_), tensor_group(name).c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (group < 0) throw FormatError(where + ": cannot create its group (duplicate tensor?)");
  try {
    write_int_array_attribute(group, "shape", shape, where);
    write_string_attribute(group, "dtype", kernels::dtype_name(dtype), where);
    write_int_attribute(group, "quantized", quantized ? 1 : 0, where);
  } catch (...) {
    H5Gclose(group);
    throw;
  }
  return group;
}

void ModelStoreWriter::refuse_non_finite(const std::string& name, const char* part, kernels::DType dtype,
                                         const void* data, int64_t count) const {
  const int64_t at = first_non_finite(dtype, data, count);
  if (at < 0) return;
  float value = 0;
  kernels::convert_to_float(dtype, static_cast<const uint8_t*>(data) + at * kernels::dtype_size(dtype), 1, &value);
  throw FormatError("tensor '" + name + "' of " + (header_.source.empty() ? std::string("the source") : header_.source) +
                        " holds " + (std::isnan(value) ? "NaN" : "Inf") + " in its " + part + " (element " +
                        std::to_string(at) + "): the source is corrupt, or was saved from a run that diverged",
                    "convert an intact checkpoint; a store with non-finite weights or scales makes every loss NaN");
}

QuantGeometry ModelStoreWriter::geometry_for(const std::vector<int64_t>& shape) const {
  return quant_geometry(header_, shape);
}

void ModelStoreWriter::add_quantized(const std::string& name, const std::vector<int64_t>& shape,
                                     kernels::DType source_dtype, const uint8_t* codes, const float* absmax) {
  assert(header_.quant_method != "bnb-8bit" && !header_.double_quant);
  const QuantGeometry geometry = geometry_for(shape);
  Handle group(create_tensor_group(name, shape, source_dtype, true), H5Gclose);
  const std::string where = path_ + ": tensor '" + name + "'";
  refuse_non_finite(name, "absmax (quantization scales)", kernels::DType::f32, absmax, geometry.blocks());
  write_with_checksums(group.get(), "codes", kernels::DType::u8, geometry.code_bytes(), codes, where);
  write_with_checksums(group.get(), "absmax", kernels::DType::f32, geometry.blocks(), absmax, where);
}

void ModelStoreWriter::add_double_quantized(const std::string& name, const std::vector<int64_t>& shape,
                                            kernels::DType source_dtype, const uint8_t* codes,
                                            const uint8_t* absmax_codes, const float* nested_absmax,
                                            float nested_offset) {
  assert(header_.quant_method != "bnb-8bit" && header_.double_quant);
  const QuantGeometry geometry = geometry_for(shape);
  Handle group(create_tensor_group(name, shape, source_dtype, true), H5Gclose);
  const std::string where = path_ + ": tensor '" + name + "'";
  refuse_non_finite(name, "nested_offset", kernels::DType::f32, &nested_offset, 1);
  refuse_non_finite(name, "nested absmax", kernels::DType::f32, nested_absmax, geometry.nested_blocks());
  write_double_attribute(group.get(), "nested_offset", nested_offset, where);
  write_with_checksums(group.get(), "codes", kernels::DType::u8, geometry.code_bytes(), codes, where);
  write_with_checksums(group.get(), "absmax", kernels::DType::u8, geometry.blocks(), absmax_codes, where);
  write_with_checksums(group.get(), "nested_absmax", kernels::DType::f32, geometry.nested_blocks(), nested_absmax, where);
}

void ModelStoreWriter::add_int8(const std::string& name, const std::vector<int64_t>& shape,
                                kernels::DType source_dtype, const int8_t* codes, const float* row_absmax) {
  assert(header_.quant_method == "bnb-8bit" && shape.size() == 2);
  const QuantGeometry geometry = geometry_for(shape);
  Handle group(create_tensor_group(name, shape, source_dtype, true), H5Gclose);
  const std::string where = path_ + ": tensor '" + name + "'";
  refuse_non_finite(name, "row scales (SCB)", kernels::DType::f32, row_absmax, geometry.blocks());
  write_with_checksums(group.get(), "codes", kernels::DType::i8, geometry.code_bytes(), codes, where);
  write_with_checksums(group.get(), "absmax", kernels::DType::f32, geometry.blocks(), row_absmax, where);
}

void ModelStoreWriter::add_dense(const std::string& name, const std::vector<int64_t>& shape, kernels::DType dtype,
                                 const void* data) {
  refuse_non_finite(name, "values", dtype, data, element_count(shape));
  Handle group(create_tensor_group(name, shape, dtype, false), H5Gclose);
  write_with_checksums(group.get(), "data", dtype, element_count(shape), data, path_ + ": tensor '" + name + "'");
}

void ModelStoreWriter::set_source_checksum(const std::string& checksum) { header_.source_checksum = checksum; }

void ModelStoreWriter::add_tokenizer(const TokenizerSource& source) {
  if (source.kind.empty()) return;
  const std::string where = path_ + ": /tokenizer";
  Handle root(H5Gopen2(static_cast<hid_t>(file_), "/", H5P_DEFAULT), H5Gclose);
  write_dataset(root.get(), "tokenizer", kernels::DType::u8, static_cast<int64_t>(source.bytes.size()),
                source.bytes.data(), where);
  Handle dataset(H5Dopen2(root.get(), "tokenizer", H5P_DEFAULT), H5Dclose);
  write_string_attribute(dataset.get(), "kind", source.kind, where);
  write_string_attribute(dataset.get(), "bos_token", source.bos_token, where);
  write_string_attribute(dataset.get(), "eos_token", source.eos_token, where);
  header_.tokenizer = source.kind;
}

void ModelStoreWriter::set_chat_template(const std::string& chat_template) {
  // A root attribute lives in the object header, which HDF5's default file format caps at 64 KiB.
  if (chat_template.size() > 60000)
    throw FormatError(path_ + ": the chat template has " + std::to_string(chat_template.size()) +
                      " bytes; a model store holds at most 60000", "pass the template at training time with "
                      "--chat-template FILE instead");
  header_.chat_template = chat_template;
}

void ModelStoreWriter::finish() {
  const hid_t file = static_cast<hid_t>(file_);
  {
    Handle root(H5Gopen2(file, "/", H5P_DEFAULT), H5Gclose);
    write_string_attribute(root.get(), "format", kFormatName, path_);
    write_int_attribute(root.get(), "format_version", header_.format_version, path_);
    write_string_attribute(root.get(), "architecture", header_.config.architecture, path_);
    write_string_attribute(root.get(), "config_json", dump_json(header_.config.to_json()), path_);
    write_string_attribute(root.get(), "quant_method", header_.quant_method, path_);
    write_string_attribute(root.get(), "quant_type", header_.quant_type, path_);
    write_int_attribute(root.get(), "blocksize", header_.blocksize, path_);
    write_int_attribute(root.get(), "double_quant", header_.double_quant ? 1 : 0, path_);
    write_string_attribute(root.get(), "compute_dtype", header_.compute_dtype, path_);
    write_string_attribute(root.get(), "tokenizer", header_.tokenizer, path_);
    write_string_attribute(root.get(), "source", header_.source, path_);
    write_string_attribute(root.get(), "source_checksum", header_.source_checksum, path_);
    write_string_attribute(root.get(), "unquantized_modules", header_.unquantized_modules, path_);
    if (!header_.chat_template.empty())
      write_string_attribute(root.get(), "chat_template", header_.chat_template, path_);
  }
  if (H5Fclose(file) < 0) throw FormatError(path_ + ": cannot close the output file (disk full?)");
  file_ = -1;
  std::error_code error;
  std::filesystem::rename(partial_path_, path_, error);
  if (error) throw FormatError(path_ + ": cannot rename the finished store into place: " + error.message());
  finished_ = true;
}

}  // namespace qlora::shard
