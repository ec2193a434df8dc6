// Small RAII and attribute/dataset helpers over HDF5's C API, shared by every HDF5 file qlora
// writes (the model store, trainer state). Errors become FormatError naming the file.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dtype.h"

namespace qlora::shard::h5 {

void silence_hdf5_errors();

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
  // Closes now and says whether HDF5 succeeded: a file's close is where its last writes happen, so
  // writers must check it rather than leave it to the destructor.
  bool close() {
    const hid_t id = id_;
    id_ = -1;
    return id < 0 || closer_(id) >= 0;
  }

 private:
  hid_t id_;
  Closer closer_;
};

hid_t storage_type(kernels::DType dtype);
hid_t memory_type(kernels::DType dtype);

void write_string_attribute(hid_t object, const char* name, const std::string& value, const std::string& path);
void write_int_attribute(hid_t object, const char* name, int64_t value, const std::string& path);
void write_double_attribute(hid_t object, const char* name, double value, const std::string& path);
void write_int_array_attribute(hid_t object, const char* name, const std::vector<int64_t>& values,
                               const std::string& path);
bool has_attribute(hid_t object, const char* name);
std::string read_string_attribute(hid_t object, const char* name, const std::string& where);
int64_t read_int_attribute(hid_t object, const char* name, const std::string& where);
double read_double_attribute(hid_t object, const char* name, const std::string& where);
std::vector<int64_t> read_int_array_attribute(hid_t object, const char* name, const std::string& where);

// 1-D datasets of `count` elements.
void write_dataset(hid_t group, const char* name, kernels::DType dtype, int64_t count, const void* data,
                   const std::string& where);
// Reads elements [begin, end) of a 1-D dataset, checking that it has the length the caller expects.
void read_hyperslab(hid_t file, const std::string& dataset_path, kernels::DType dtype, int64_t expected_length,
                    int64_t begin, int64_t end, void* destination, const std::string& where);

}  // namespace qlora::shard::h5
