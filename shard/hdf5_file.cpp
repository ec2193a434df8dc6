// HDF5 helper implementations.
#include "shard/hdf5_file.h"

#include "shard/safetensors.h"

namespace qlora::shard::h5 {

void silence_hdf5_errors() {
  static bool silenced = false;
  if (!silenced) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    silenced = true;
  }
}

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

void write_double_attribute(hid_t object, const char* name, double value, const std::string& path) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attribute(H5Acreate2(object, name, H5T_IEEE_F64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid() || H5Awrite(attribute.get(), H5T_NATIVE_DOUBLE, &value) < 0)
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

double read_double_attribute(hid_t object, const char* name, const std::string& where) {
  Handle attribute(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  if (!attribute.valid()) throw FormatError(where + ": missing attribute '" + name + "'");
  Handle space(H5Aget_space(attribute.get()), H5Sclose);
  Handle type(H5Aget_type(attribute.get()), H5Tclose);
  if (H5Sget_simple_extent_npoints(space.get()) != 1 || H5Tget_class(type.get()) != H5T_FLOAT)
    throw FormatError(where + ": attribute '" + name + "' is not a floating-point scalar");
  double value = 0;
  if (H5Aread(attribute.get(), H5T_NATIVE_DOUBLE, &value) < 0)
    throw FormatError(where + ": cannot read attribute '" + name + "'");
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

}  // namespace qlora::shard::h5
