// HDF5 implementation of the 4-bit model store. Layout (see docs/FORMAT.md):
//   /            attributes format, format_version, architecture, config_json, quant_*, ...
//   /tensors/<name>/codes   uint8 [ceil(numel/2)]   (quantized tensors)
//   /tensors/<name>/absmax  float32 [blocks]
//   /tensors/<name>/data    source dtype [numel]    (dense tensors; bf16/fp16 as uint16 bits)
// Each tensor group carries shape (int64[]), dtype (string) and quantized (int).
#include "shard/model_store.h"

#include <hdf5.h>

#include <cassert>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "shard/safetensors.h"

namespace qlora::shard {
namespace {

constexpr const char* kFormatName = "qlora-4bit-store";

void silence_hdf5_errors() {
  static bool silenced = false;
  if (!silenced) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    silenced = true;
  }
}

// Closes an HDF5 identifier when it goes out of scope.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~Handle() {
    if (id_ >= 0) closer_(id_);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_;
  Closer closer_;
};

hid_t storage_type(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::f32: return H5T_IEEE_F32LE;
    case kernels::DType::f16:
    case kernels::DType::bf16: return H5T_STD_U16LE;
    case kernels::DType::u8: return H5T_STD_U8LE;
    case kernels::DType::i8: return H5T_STD_I8LE;
    case kernels::DType::i32: return H5T_STD_I32LE;
    case kernels::DType::i64: return H5T_STD_I64LE;
  }
  return H5T_STD_U8LE;
}

hid_t memory_type(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::f32: return H5T_NATIVE_FLOAT;
    case kernels::DType::f16:
    case kernels::DType::bf16: return H5T_NATIVE_UINT16;
    case kernels::DType::u8: return H5T_NATIVE_UINT8;
    case kernels::DType::i8: return H5T_NATIVE_INT8;
    case kernels::DType::i32: return H5T_NATIVE_INT32;
    case kernels::DType::i64: return H5T_NATIVE_INT64;
  }
  return H5T_NATIVE_UINT8;
}

void write_string_attribute(hid_t object, const char* name, const std::string& value, const std::string& path) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), value.empty() ? 1 : value.size());
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attribute(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid() || H5Awrite(attribute.get(), type.get(), value.empty() ? "" : value.data()) < 0)
    throw FormatError(path + ": cannot write attribute '" + name + "'");
}

void write_int_attribute(hid_t object, const char* name, int64_t value, const std::string& path) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attribute(H5Acreate2(object, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid() || H5Awrite(attribute.get(), H5T_NATIVE_INT64, &value) < 0)
    throw FormatError(path + ": cannot write attribute '" + name + "'");
}

void write_int_array_attribute(hid_t object, const char* name, const std::vector<int64_t>& values,
                               const std::string& path) {
  hsize_t length = values.size();
  Handle space(length == 0 ? H5Screate(H5S_NULL) : H5Screate_simple(1, &length, nullptr), H5Sclose);
  Handle attribute(H5Acreate2(object, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid() || (length > 0 && H5Awrite(attribute.get(), H5T_NATIVE_INT64, values.data()) < 0))
    throw FormatError(path + ": cannot write attribute '" + name + "'");
}

bool has_attribute(hid_t object, const char* name) { return H5Aexists(object, name) > 0; }

std::string read_string_attribute(hid_t object, const char* name, const std::string& where) {
  Handle attribute(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid()) throw FormatError(where + ": missing attribute '" + name + "'");
  Handle type(H5Aget_type(attribute.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) > 0)
    throw FormatError(where + ": attribute '" + name + "' is not a fixed-length string");
  const size_t size = H5Tget_size(type.get());
  std::string value(size, '\0');
  Handle memory(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(memory.get(), size);
  H5Tset_strpad(memory.get(), H5T_STR_NULLPAD);
  if (H5Aread(attribute.get(), memory.get(), value.data()) < 0)
    throw FormatError(where + ": cannot read attribute '" + name + "'");
  value.resize(value.find('\0') == std::string::npos ? value.size() : value.find('\0'));
  return value;
}

int64_t read_int_attribute(hid_t object, const char* name, const std::string& where) {
  Handle attribute(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid()) throw FormatError(where + ": missing attribute '" + name + "'");
  Handle space(H5Aget_space(attribute.get()), H5Sclose);
  if (H5Sget_simple_extent_npoints(space.get()) != 1)
    throw FormatError(where + ": attribute '" + name + "' is not a scalar");
  int64_t value = 0;
  if (H5Aread(attribute.get(), H5T_NATIVE_INT64, &value) < 0)
    throw FormatError(where + ": cannot read attribute '" + name + "' as an integer");
  return value;
}

std::vector<int64_t> read_int_array_attribute(hid_t object, const char* name, const std::string& where) {
  Handle attribute(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid()) throw FormatError(where + ": missing attribute '" + name + "'");
  Handle space(H5Aget_space(attribute.get()), H5Sclose);
  const hssize_t count = H5Sget_simple_extent_npoints(space.get());
  if (count < 0 || count > 8) throw FormatError(where + ": attribute '" + name + "' has a bad length");
  std::vector<int64_t> values(static_cast<size_t>(count));
  if (count > 0 && H5Aread(attribute.get(), H5T_NATIVE_INT64, values.data()) < 0)
    throw FormatError(where + ": cannot read attribute '" + name + "'");
  return values;
}

void write_dataset(hid_t group, const char* name, kernels::DType dtype, int64_t count, const void* data,
                   const std::string& where) {
  hsize_t length = static_cast<hsize_t>(count);
  Handle space(H5Screate_simple(1, &length, nullptr), H5Sclose);
  Handle dataset(H5Dcreate2(group, name, storage_type(dtype), space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                 H5Dclose);
  if (!dataset.valid() || H5Dwrite(dataset.get(), memory_type(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0)
    throw FormatError(where + ": cannot write dataset '" + name + "' (disk full?)");
}

// Reads elements [begin, end) of a 1-D dataset, checking that it has the length the header implies.
void read_hyperslab(hid_t file, const std::string& dataset_path, kernels::DType dtype, int64_t expected_length,
                    int64_t begin, int64_t end, void* destination, const std::string& where) {
  Handle dataset(H5Dopen2(file, dataset_path.c_str(), H5P_DEFAULT), H5Dclose);
  if (!dataset.valid()) throw FormatError(where + ": missing dataset '" + dataset_path + "'");
  Handle space(H5Dget_space(dataset.get()), H5Sclose);
  hsize_t length = 0;
  if (H5Sget_simple_extent_ndims(space.get()) != 1 || H5Sget_simple_extent_dims(space.get(), &length, nullptr) != 1 ||
      static_cast<int64_t>(length) != expected_length)
    throw FormatError(where + ": dataset '" + dataset_path + "' has length " + std::to_string(length) +
                      ", expected " + std::to_string(expected_length));
  if (end <= begin) return;
  hsize_t offset = static_cast<hsize_t>(begin);
  hsize_t count = static_cast<hsize_t>(end - begin);
  H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, &offset, nullptr, &count, nullptr);
  Handle memory_space(H5Screate_simple(1, &count, nullptr), H5Sclose);
  if (H5Dread(dataset.get(), memory_type(dtype), memory_space.get(), space.get(), H5P_DEFAULT, destination) < 0)
    throw FormatError(where + ": cannot read dataset '" + dataset_path + "' (truncated or corrupt file?)");
}

std::string tensor_group(const std::string& name) { return "/tensors/" + name; }

}  // namespace

// ---- FNV-1a --------------------------------------------------------------------------------------

void Fnv1a64::update(const void* data, size_t bytes) {
  const auto* cursor = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < bytes; ++i) {
    state_ ^= cursor[i];
    state_ *= 1099511628211ull;
  }
}

std::string Fnv1a64::hex() const {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(state_));
  return text;
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
  if (header.format_version > kStoreFormatVersion)
    throw FormatError(path + ": written by a newer qlora (format version " + std::to_string(header.format_version) +
                      ", this build reads up to " + std::to_string(kStoreFormatVersion) + "); upgrade qlora");
  header.config = ModelConfig::from_json(Json::parse(read_string_attribute(root.get(), "config_json", path)),
                                         path + " (config_json)");
  header.quant_method = read_string_attribute(root.get(), "quant_method", path);
  header.quant_type = read_string_attribute(root.get(), "quant_type", path);
  header.blocksize = read_int_attribute(root.get(), "blocksize", path);
  header.double_quant = read_int_attribute(root.get(), "double_quant", path) != 0;
  header.compute_dtype = read_string_attribute(root.get(), "compute_dtype", path);
  header.tokenizer = read_string_attribute(root.get(), "tokenizer", path);
  header.source = read_string_attribute(root.get(), "source", path);
  header.source_checksum = read_string_attribute(root.get(), "source_checksum", path);
  if (header.blocksize < 2 || header.blocksize % 2 != 0)
    throw FormatError(path + ": invalid blocksize " + std::to_string(header.blocksize));
  const bool quantized_store = header.quant_method != "none";
  if (quantized_store && header.quant_type != "nf4" && header.quant_type != "fp4")
    throw FormatError(path + ": unsupported quant_type '" + header.quant_type + "'");

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
    // Exactly the decoder blocks' linear weights are 4-bit in a quantized store, none otherwise.
    if (tensor.quantized != (quantized_store && ModelConfig::is_block_linear(name)))
      throw FormatError(where + (tensor.quantized ? " is quantized but should not be" : " should be quantized but is not") +
                        " in a '" + header.quant_method + "' store");
    tensor.numel = 1;
    for (int64_t dim : tensor.shape) tensor.numel *= dim;
    store->tensors_.push_back(std::move(tensor));
  }
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
  read_hyperslab(static_cast<hid_t>(file_), tensor_group(name) + "/codes", kernels::DType::u8,
                 kernels::packed_byte_count(stored.numel), range.byte_begin, range.byte_end, codes,
                 path_ + ": tensor '" + name + "'");
  bytes_read_ += static_cast<uint64_t>(range.bytes());
}

void ModelStore::read_absmax(const std::string& name, const ShardRange& range, float* absmax) const {
  const StoredTensor& stored = tensor(name);
  assert(stored.quantized);
  read_hyperslab(static_cast<hid_t>(file_), tensor_group(name) + "/absmax", kernels::DType::f32,
                 kernels::quant_block_count(stored.numel, header_.blocksize), range.block_begin, range.block_end,
                 absmax, path_ + ": tensor '" + name + "'");
  bytes_read_ += static_cast<uint64_t>(range.blocks()) * sizeof(float);
}

void ModelStore::read_dense(const std::string& name, void* destination) const {
  const StoredTensor& stored = tensor(name);
  assert(!stored.quantized);
  read_hyperslab(static_cast<hid_t>(file_), tensor_group(name) + "/data", stored.dtype, stored.numel, 0,
                 stored.numel, destination, path_ + ": tensor '" + name + "'");
  bytes_read_ += static_cast<uint64_t>(stored.numel) * kernels::dtype_size(stored.dtype);
}

uint64_t ModelStore::data_bytes() const {
  uint64_t total = 0;
  for (const auto& stored : tensors_) {
    if (stored.quantized)
      total += kernels::packed_byte_count(stored.numel) +
               sizeof(float) * kernels::quant_block_count(stored.numel, header_.blocksize);
    else
      total += static_cast<uint64_t>(stored.numel) * kernels::dtype_size(stored.dtype);
  }
  return total;
}

// ---- writer --------------------------------------------------------------------------------------

ModelStoreWriter::ModelStoreWriter(const std::string& path, const StoreHeader& header)
    : path_(path), partial_path_(path + ".partial"), header_(header) {
  silence_hdf5_errors();
  file_ = H5Fcreate(partial_path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
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

void ModelStoreWriter::add_quantized(const std::string& name, const std::vector<int64_t>& shape,
                                     kernels::DType source_dtype, const uint8_t* codes, const float* absmax) {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  const std::string where = path_ + ": tensor '" + name + "'";
  Handle group(H5Gcreate2(static_cast<hid_t>(file_), tensor_group(name).c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
               H5Gclose);
  if (!group.valid()) throw FormatError(where + ": cannot create its group (duplicate tensor?)");
  write_int_array_attribute(group.get(), "shape", shape, where);
  write_string_attribute(group.get(), "dtype", kernels::dtype_name(source_dtype), where);
  write_int_attribute(group.get(), "quantized", 1, where);
  write_dataset(group.get(), "codes", kernels::DType::u8, kernels::packed_byte_count(numel), codes, where);
  write_dataset(group.get(), "absmax", kernels::DType::f32, kernels::quant_block_count(numel, header_.blocksize),
                absmax, where);
}

void ModelStoreWriter::add_dense(const std::string& name, const std::vector<int64_t>& shape, kernels::DType dtype,
                                 const void* data) {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  const std::string where = path_ + ": tensor '" + name + "'";
  Handle group(H5Gcreate2(static_cast<hid_t>(file_), tensor_group(name).c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
               H5Gclose);
  if (!group.valid()) throw FormatError(where + ": cannot create its group (duplicate tensor?)");
  write_int_array_attribute(group.get(), "shape", shape, where);
  write_string_attribute(group.get(), "dtype", kernels::dtype_name(dtype), where);
  write_int_attribute(group.get(), "quantized", 0, where);
  write_dataset(group.get(), "data", dtype, numel, data, where);
}

void ModelStoreWriter::set_source_checksum(const std::string& checksum) { header_.source_checksum = checksum; }

void ModelStoreWriter::finish() {
  const hid_t file = static_cast<hid_t>(file_);
  {
    Handle root(H5Gopen2(file, "/", H5P_DEFAULT), H5Gclose);
    write_string_attribute(root.get(), "format", kFormatName, path_);
    write_int_attribute(root.get(), "format_version", header_.format_version, path_);
    write_string_attribute(root.get(), "architecture", header_.config.architecture, path_);
    write_string_attribute(root.get(), "config_json", header_.config.to_json().dump(), path_);
    write_string_attribute(root.get(), "quant_method", header_.quant_method, path_);
    write_string_attribute(root.get(), "quant_type", header_.quant_type, path_);
    write_int_attribute(root.get(), "blocksize", header_.blocksize, path_);
    write_int_attribute(root.get(), "double_quant", header_.double_quant ? 1 : 0, path_);
    write_string_attribute(root.get(), "compute_dtype", header_.compute_dtype, path_);
    write_string_attribute(root.get(), "tokenizer", header_.tokenizer, path_);
    write_string_attribute(root.get(), "source", header_.source, path_);
    write_string_attribute(root.get(), "source_checksum", header_.source_checksum, path_);
  }
  if (H5Fclose(file) < 0) throw FormatError(path_ + ": cannot close the output file (disk full?)");
  file_ = -1;
  std::error_code error;
  std::filesystem::rename(partial_path_, path_, error);
  if (error) throw FormatError(path_ + ": cannot rename the finished store into place: " + error.message());
  finished_ = true;
}

}  // namespace qlora::shard
