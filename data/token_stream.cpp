// Text sources, token streams (memory or HDF5 hyperslabs), the packed-window sampler, and the
// collective loading of --data with the model's own tokenizer.
#include "launcher/data.h"

#include <hdf5.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/log.h"
#include "launcher/demo.h"
#include "launcher/errors.h"
#include "launcher/token_cache.h"
#include "shard/hdf5_file.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot read data file " + path.string(), "check the path and its permissions");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

uint64_t splitmix64(uint64_t value) {
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
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

// ---- sampling -------------------------------------------------------------------------------------

uint64_t permuted_index(uint64_t index, uint64_t count, uint64_t key) {
  if (count <= 1) return 0;
  int bits = 1;
  while ((uint64_t{1} << bits) < count) ++bits;
  const int half = (bits + 1) / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  // A balanced Feistel network permutes [0, 4^half), at most 4 x count; walking the cycle until
  // the value falls inside [0, count) restricts it to a permutation of [0, count).
  do {
    uint64_t left = index >> half, right = index & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t mixed = left ^ (splitmix64(right ^ key ^ (round * 0x632be59bd9b4e019ull)) & mask);
      left = right;
      right = mixed;
    }
    index = (left << half) | right;
  } while (index >= count);
  return index;
}

BatchSampler::BatchSampler(std::shared_ptr<const TokenStream> stream, int64_t begin, int64_t end,
                           int64_t sequence_length, int64_t global_batch, uint64_t seed)
    : stream_(std::move(stream)), begin_(begin), end_(end), sequence_length_(sequence_length),
      global_batch_(global_batch), seed_(seed) {}

BatchSampler::BatchSampler(std::vector<int64_t> tokens, int64_t sequence_length, int64_t global_batch, uint64_t seed)
    : BatchSampler(TokenStream::in_memory(std::vector<int32_t>(tokens.begin(), tokens.end())), 0,
                   static_cast<int64_t>(tokens.size()), sequence_length, global_batch, seed) {}

int64_t BatchSampler::window_count() const { return std::max<int64_t>(0, (token_count() - 1) / sequence_length_); }

void BatchSampler::fill_row(int64_t window, int64_t row, int64_t* inputs, int64_t* targets,
                            std::vector<int64_t>& buffer) const {
  buffer.resize(static_cast<size_t>(sequence_length_ + 1));
  const int64_t start = begin_ + window * sequence_length_;
  stream_->read(start, start + sequence_length_ + 1, buffer.data());
  std::copy(buffer.begin(), buffer.end() - 1, inputs + row * sequence_length_);
  std::copy(buffer.begin() + 1, buffer.end(), targets + row * sequence_length_);
}

std::pair<torch::Tensor, torch::Tensor> BatchSampler::batch(int64_t step, int rank, int world) const {
  const int64_t rows = global_batch_ / world;
  const int64_t first_row = rows * rank;
  const uint64_t windows = static_cast<uint64_t>(window_count());
  auto inputs = torch::empty({rows, sequence_length_}, torch::kLong);
  auto targets = torch::empty({rows, sequence_length_}, torch::kLong);
  std::vector<int64_t> buffer;
  for (int64_t row = 0; row < rows; ++row) {
    // Global row g of the endless sample order: epoch g / windows, position g % windows in that
    // epoch's permutation.
    const uint64_t global_row = static_cast<uint64_t>(step) * static_cast<uint64_t>(global_batch_) +
                                static_cast<uint64_t>(first_row + row);
    const uint64_t epoch = global_row / windows;
    const uint64_t key = splitmix64(seed_ ^ splitmix64(epoch + 0x5eed));
    const auto window = static_cast<int64_t>(permuted_index(global_row % windows, windows, key));
    fill_row(window, row, inputs.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), buffer);
  }
  return {inputs, targets};
}

std::pair<torch::Tensor, torch::Tensor> BatchSampler::sequential(int64_t count, int rank, int world) const {
  const int64_t rows = count / world;
  const int64_t first_window = rows * rank;
  auto inputs = torch::empty({rows, sequence_length_}, torch::kLong);
  auto targets = torch::empty({rows, sequence_length_}, torch::kLong);
  std::vector<int64_t> buffer;
  for (int64_t row = 0; row < rows; ++row)
    fill_row(first_window + row, row, inputs.data_ptr<int64_t>(), targets.data_ptr<int64_t>(), buffer);
  return {inputs, targets};
}

// ---- --data for a model ---------------------------------------------------------------------------

std::shared_ptr<TokenStream> load_data_tokens(const std::string& data_path, const shard::ModelStore& store,
                                              cluster::Communicator& communicator, bool quiet) {
  const int64_t model_vocabulary = store.header().config.vocab_size;
  std::shared_ptr<TokenStream> stream;
  std::string token_file;
  // Rank 0 tokenizes (or checks the cache) while the others wait; everyone learns the file's path.
  run_collectively(communicator, [&] {
    if (!data_path.empty() && is_hdf5_file(data_path)) {
      token_file = data_path;
      return;
    }
    const bool tokenizes = data_path.empty() || communicator.rank() == 0;
    if (!tokenizes) return;
    const shard::TokenizerSource source = shard::store_tokenizer_source(store);
    const auto tokenizer = shard::load_tokenizer(source, store.path() + ": /tokenizer");
    if (tokenizer->vocab_size() > model_vocabulary)
      throw UserError("the tokenizer of " + store.path() + " has " + std::to_string(tokenizer->vocab_size()) +
                      " tokens but the model's vocabulary only " + std::to_string(model_vocabulary));
    if (data_path.empty()) {
      stream = TokenStream::in_memory(tokenizer->encode(demo_text()));
      return;
    }
    const TokenCacheResult cache = ensure_token_cache(data_path, *tokenizer, source.checksum());
    token_file = cache.path;
    if (!quiet) {
      char line[512];
      std::snprintf(line, sizeof line, "data: %s %s %s (%lld tokens from %.1f MB of text, %s tokenizer, %.2f s)",
                    data_path.c_str(), cache.built ? "tokenized into" : "reusing", cache.path.c_str(),
                    static_cast<long long>(cache.tokens), static_cast<double>(cache.source_bytes) / 1e6,
                    tokenizer->kind().c_str(), cache.seconds);
      log::banner(line);
    }
  });
  if (stream) return stream;
  int64_t length = static_cast<int64_t>(token_file.size());
  communicator.broadcast(&length, sizeof length, 0);
  token_file.resize(static_cast<size_t>(length));
  communicator.broadcast(token_file.data(), length, 0);
  run_collectively(communicator, [&] {
    stream = TokenStream::open_file(token_file);
    // Foreign token files are scanned once, by rank 0; qlora's own carry their largest id.
    int64_t largest = communicator.rank() == 0 ? stream->max_token() : 0;
    if (largest >= model_vocabulary)
      throw UserError(token_file + " holds token id " + std::to_string(largest) + ", outside the model's vocabulary of " +
                          std::to_string(model_vocabulary),
                      "tokenize the data with this model's tokenizer");
  });
  return stream;
}

}  // namespace qlora::launcher
