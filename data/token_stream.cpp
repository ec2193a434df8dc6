// Text sources and token streams (memory or HDF5 hyperslabs).
#include "data/token_stream.h"

#include <hdf5.h>

#include <algorithm>
#include <cassert>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/errors.h"
#include "data/token_cache.h"
#include "shard/hdf5_file.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot read data file " + path.string(), "check the path and its permissions");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

// ---- text sources -------------------------------------------------------------------------------

std::vector<fs::path> text_source_files(const std::string& path) {
  std::error_code error;
  const fs::path source(path);
  if (fs::is_regular_file(source, error)) {
    if (fs::file_size(source, error) == 0)
      throw UserError("data file " + path + " is empty", "point --data at a text file or folder");
    return {source};
  }
  if (!fs::is_directory(source, error))
    throw UserError("no such data file or folder: " + path, "point --data at a text file or a folder of .txt files");
  std::vector<fs::path> files;
  for (const auto& entry : fs::recursive_directory_iterator(source, error)) {
    const auto extension = entry.path().extension().string();
    if (entry.is_regular_file() && (extension == ".txt" || extension == ".md") && entry.file_size() > 0)
      files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  if (files.empty())
    throw UserError("data folder " + path + " holds no non-empty .txt or .md file", "add text files to it");
  return files;
}

std::string read_text_source(const std::string& path) {
  std::string text;
  for (const auto& file : text_source_files(path)) text += read_file(file);
  return text;
}

std::vector<int64_t> byte_tokens(const std::string& text) {
  std::vector<int64_t> tokens(text.size());
  for (size_t i = 0; i < text.size(); ++i) tokens[i] = static_cast<unsigned char>(text[i]);
  return tokens;
}

// ---- token streams -------------------------------------------------------------------------------

std::shared_ptr<TokenStream> TokenStream::in_memory(std::vector<int32_t> tokens) {
  std::shared_ptr<TokenStream> stream(new TokenStream());
  stream->size_ = static_cast<int64_t>(tokens.size());
  stream->memory_ = std::move(tokens);
  return stream;
}

std::shared_ptr<TokenStream> TokenStream::open_file(const std::string& path) {
  shard::h5::silence_hdf5_errors();
  const std::string hint = "pass a text file or folder, or an HDF5 file with a 1-D integer dataset 'tokens'";
  if (!is_hdf5_file(path)) throw UserError(path + ": not an HDF5 token file", hint);
  std::shared_ptr<TokenStream> stream(new TokenStream());
  stream->path_ = path;
  stream->file_ = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (stream->file_ < 0) throw UserError(path + ": cannot open the HDF5 file (unreadable or truncated)", hint);
  const hid_t file = static_cast<hid_t>(stream->file_);
  if (H5Lexists(file, "tokens", H5P_DEFAULT) <= 0) throw UserError(path + ": no dataset 'tokens'", hint);
  stream->dataset_ = H5Dopen2(file, "tokens", H5P_DEFAULT);
  const hid_t dataset = static_cast<hid_t>(stream->dataset_);
  shard::h5::Handle space(H5Dget_space(dataset), H5Sclose);
  shard::h5::Handle type(H5Dget_type(dataset), H5Tclose);
  hsize_t length = 0;
  if (dataset < 0 || H5Sget_simple_extent_ndims(space.get()) != 1 || H5Tget_class(type.get()) != H5T_INTEGER)
    throw UserError(path + ": dataset 'tokens' is not a 1-D integer dataset", hint);
  H5Sget_simple_extent_dims(space.get(), &length, nullptr);
  stream->size_ = static_cast<int64_t>(length);
  shard::h5::Handle root(H5Gopen2(file, "/", H5P_DEFAULT), H5Gclose);
  if (shard::h5::has_attribute(root.get(), "max_token"))
    stream->max_token_ = shard::h5::read_int_attribute(root.get(), "max_token", path);
  return stream;
}

TokenStream::~TokenStream() {
  if (dataset_ >= 0) H5Dclose(static_cast<hid_t>(dataset_));
  if (file_ >= 0) H5Fclose(static_cast<hid_t>(file_));
}

void TokenStream::read(int64_t begin, int64_t end, int64_t* out) const {
  assert(begin >= 0 && begin <= end && end <= size_);
  tokens_read_ += static_cast<uint64_t>(end - begin);
  if (end == begin) return;
  if (file_ < 0) {
    std::copy(memory_.begin() + begin, memory_.begin() + end, out);
    return;
  }
  const hid_t dataset = static_cast<hid_t>(dataset_);
  hsize_t offset = static_cast<hsize_t>(begin), count = static_cast<hsize_t>(end - begin);
  shard::h5::Handle file_space(H5Dget_space(dataset), H5Sclose);
  H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &offset, nullptr, &count, nullptr);
  shard::h5::Handle memory_space(H5Screate_simple(1, &count, nullptr), H5Sclose);
  if (H5Dread(dataset, H5T_NATIVE_INT64, memory_space.get(), file_space.get(), H5P_DEFAULT, out) < 0)
    throw UserError(path_ + ": cannot read tokens " + std::to_string(begin) + ".." + std::to_string(end) +
                    " (truncated or corrupt file?)");
}

int64_t TokenStream::max_token() const {
  if (max_token_ >= 0 || size_ == 0) return max_token_;
  const uint64_t counted = tokens_read_;
  std::vector<int64_t> block;
  for (int64_t begin = 0; begin < size_; begin += 1 << 20) {
    const int64_t end = std::min<int64_t>(size_, begin + (1 << 20));
    block.resize(static_cast<size_t>(end - begin));
    read(begin, end, block.data());
    for (int64_t token : block) max_token_ = std::max(max_token_, token);
  }
  tokens_read_ = counted;   // a validation scan, not training reads
  return max_token_;
}

}  // namespace qlora::data
