// Example files: the key that decides whether a cached file is current, the atomic HDF5 writer and
// the reader.
#include "data/example_cache.h"

#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "common/errors.h"
#include "common/hash.h"
#include "data/token_cache.h"
#include "shard/hdf5_file.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using shard::h5::Handle;

constexpr const char* kExampleFormat = "qlora-examples";
constexpr int64_t kExampleFormatVersion = 1;
constexpr const char* kTokenSuffix = ".tokens.h5";
constexpr const char* kExampleSuffix = ".examples.h5";

// Each field length-prefixed, so that no two different recipes hash the same stream.
void hash_field(Fnv1a64& hash, const std::string& field) {
  const uint64_t size = field.size();
  hash.update(&size, sizeof size);
  hash.update(field.data(), field.size());
}

std::string recipe_key(const std::string& data_path, const ExampleRecipe& recipe, uint64_t* source_bytes) {
  Fnv1a64 hash;
  hash_field(hash, std::string(kExampleFormat) + " " + std::to_string(kExampleFormatVersion));
  std::ifstream in(data_path, std::ios::binary);
  if (!in) throw UserError("cannot read data file " + data_path, "check the path and its permissions");
  std::vector<char> block(4 << 20);
  *source_bytes = 0;
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    hash.update(block.data(), static_cast<size_t>(in.gcount()));
    *source_bytes += static_cast<uint64_t>(in.gcount());
  }
  hash_field(hash, data_format_name(recipe.format));
  hash_field(hash, train_on_name(recipe.train_on));
  hash_field(hash, recipe.template_source);
  hash_field(hash, recipe.tokenizer_checksum);
  return hash.hex();
}

std::string attribute_or_empty(hid_t object, const char* name, const std::string& path) {
  return shard::h5::has_attribute(object, name) ? shard::h5::read_string_attribute(object, name, path) : "";
}

// True when `path` is an example file with this key; fills the summary fields of `result`.
bool is_current(const std::string& path, const std::string& key, ExampleCacheResult& result) {
  std::error_code error;
  if (!fs::is_regular_file(path, error) || !is_hdf5_file(path)) return false;
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.valid()) return false;
  Handle root(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose);
  using namespace shard::h5;
  if (attribute_or_empty(root.get(), "format", path) != kExampleFormat || attribute_or_empty(root.get(), "key", path) != key)
    return false;
  for (const char* name : {"examples", "tokens", "counted"})
    if (!has_attribute(root.get(), name)) return false;
  result.examples = read_int_attribute(root.get(), "examples", path);
  result.tokens = read_int_attribute(root.get(), "tokens", path);
  result.counted = read_int_attribute(root.get(), "counted", path);
  result.format = attribute_or_empty(root.get(), "data_format", path);
  result.train_on = attribute_or_empty(root.get(), "train_on", path);
  return true;
}

// The partial file is removed unless finish() renamed it into place.
class PartialFile {
 public:
  explicit PartialFile(const std::string& path) : path_(path), partial_(path + ".partial-" + std::to_string(getpid())) {}
  ~PartialFile() {
    if (!finished_) std::remove(partial_.c_str());
  }
  const std::string& partial() const { return partial_; }
  void finish() {
    std::error_code error;
    fs::rename(partial_, path_, error);
    if (error) throw UserError("cannot move the example file into place at " + path_ + ": " + error.message());
    finished_ = true;
  }

 private:
  std::string path_;
  std::string partial_;
  bool finished_ = false;
};

bool folder_writable_by_intent(const std::string& path) {
  std::error_code error;
  const fs::path folder = fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path();
  const auto permissions = fs::status(folder, error).permissions();
  return !error && (permissions & (fs::perms::owner_write | fs::perms::group_write | fs::perms::others_write)) != fs::perms::none;
}

bool can_create(const std::string& path) {
  const std::string probe = path + ".probe-" + std::to_string(getpid());
  std::ofstream out(probe, std::ios::binary);
  const bool ok = static_cast<bool>(out);
  out.close();
  std::remove(probe.c_str());
  return ok;
}

}  // namespace

std::string example_cache_path(const std::string& data_path) { return data_path + kExampleSuffix; }

std::string fallback_example_cache_path(const std::string& data_path) {
  std::string path = fallback_token_cache_path(data_path);
  const std::string suffix = kTokenSuffix;
  if (path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0)
    path.resize(path.size() - suffix.size());
  return path + kExampleSuffix;
}

void write_example_file(const std::string& path, const std::vector<TokenizedExample>& examples,
                        const std::vector<std::pair<std::string, std::string>>& attributes) {
  shard::h5::silence_hdf5_errors();
  std::vector<int32_t> tokens;
  std::vector<uint8_t> counted;
  std::vector<int64_t> offsets{0};
  int64_t max_token = -1, counted_tokens = 0;
  for (const TokenizedExample& example : examples) {
    if (example.tokens.size() != example.counted.size())
      throw std::logic_error("an example's mask and tokens differ in length");
    tokens.insert(tokens.end(), example.tokens.begin(), example.tokens.end());
    counted.insert(counted.end(), example.counted.begin(), example.counted.end());
    offsets.push_back(static_cast<int64_t>(tokens.size()));
    for (int32_t token : example.tokens) max_token = std::max<int64_t>(max_token, token);
    for (uint8_t bit : example.counted) counted_tokens += bit;
  }
  PartialFile partial(path);
  {
    Handle file(H5Fcreate(partial.partial().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
    if (!file.valid())
      throw UserError("cannot create example file " + partial.partial(), "check that its folder is writable");
    using namespace shard::h5;
    using kernels::DType;
    Handle root(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose);
    write_dataset(root.get(), "tokens", DType::i32, static_cast<int64_t>(tokens.size()), tokens.data(), path);
    write_dataset(root.get(), "counted", DType::u8, static_cast<int64_t>(counted.size()), counted.data(), path);
    write_dataset(root.get(), "offsets", DType::i64, static_cast<int64_t>(offsets.size()), offsets.data(), path);
    write_string_attribute(root.get(), "format", kExampleFormat, path);
    write_int_attribute(root.get(), "format_version", kExampleFormatVersion, path);
    write_int_attribute(root.get(), "examples", static_cast<int64_t>(examples.size()), path);
    write_int_attribute(root.get(), "tokens", static_cast<int64_t>(tokens.size()), path);
    write_int_attribute(root.get(), "counted", counted_tokens, path);
    write_int_attribute(root.get(), "max_token", max_token, path);
    for (const auto& [name, value] : attributes) write_string_attribute(root.get(), name.c_str(), value, path);
    if (H5Fflush(file.get(), H5F_SCOPE_GLOBAL) < 0) throw UserError(path + ": cannot write the example file (disk full?)");
  }
  partial.finish();
}

std::vector<TokenizedExample> read_example_file(const std::string& path) {
  shard::h5::silence_hdf5_errors();
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.valid()) throw FormatError(path + ": not an HDF5 file", "delete it; it is rebuilt from the data");
  using namespace shard::h5;
  using kernels::DType;
  Handle root(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose);
  if (attribute_or_empty(root.get(), "format", path) != kExampleFormat)
    throw FormatError(path + ": not a qlora example file (format attribute)");
  const int64_t count = read_int_attribute(root.get(), "examples", path);
  const int64_t total = read_int_attribute(root.get(), "tokens", path);
  std::vector<int64_t> offsets(static_cast<size_t>(count + 1));
  std::vector<int32_t> tokens(static_cast<size_t>(total));
  std::vector<uint8_t> counted(static_cast<size_t>(total));
  read_hyperslab(file.get(), "offsets", DType::i64, count + 1, 0, count + 1, offsets.data(), path);
  read_hyperslab(file.get(), "tokens", DType::i32, total, 0, total, tokens.data(), path);
  read_hyperslab(file.get(), "counted", DType::u8, total, 0, total, counted.data(), path);
  std::vector<TokenizedExample> examples(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t begin = offsets[static_cast<size_t>(i)], end = offsets[static_cast<size_t>(i + 1)];
    if (begin < 0 || end < begin || end > total) throw FormatError(path + ": offsets are not increasing within the tokens");
    examples[static_cast<size_t>(i)].tokens.assign(tokens.begin() + begin, tokens.begin() + end);
    examples[static_cast<size_t>(i)].counted.assign(counted.begin() + begin, counted.begin() + end);
  }
  return examples;
}

ExampleCacheResult ensure_example_cache(const std::string& data_path, const ExampleRecipe& recipe) {
  const auto start = std::chrono::steady_clock::now();
  ExampleCacheResult result;
  const std::string key = recipe_key(data_path, recipe, &result.source_bytes);
  const auto finish = [&] {
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
  };
  for (const std::string& candidate : {example_cache_path(data_path), fallback_example_cache_path(data_path)}) {
    if (is_current(candidate, key, result)) {
      result.path = candidate;
      return finish();
    }
  }
  const SftDataset dataset = read_sft_dataset(data_path, recipe.format);
  const TrainOn train_on = resolve_train_on(recipe.train_on, dataset);
  const std::vector<TokenizedExample> examples = tokenize_sft_dataset(dataset, *recipe.tokenizer, recipe.render, train_on);
  result.format = data_format_name(dataset.format);
  result.train_on = train_on_name(train_on);
  result.examples = static_cast<int64_t>(examples.size());
  for (const TokenizedExample& example : examples) {
    result.tokens += static_cast<int64_t>(example.tokens.size());
    for (uint8_t bit : example.counted) result.counted += bit;
  }
  // A folder without any write permission bit is read-only by intent, even to root (who could write).
  result.path = example_cache_path(data_path);
  if (!folder_writable_by_intent(result.path) || !can_create(result.path)) {
    result.path = fallback_example_cache_path(data_path);
    std::error_code error;
    fs::create_directories(fs::path(result.path).parent_path(), error);
    if (!can_create(result.path))
      throw UserError("cannot write an example cache next to " + data_path + " nor at " + result.path,
                      "make one of them writable, or set QLORA_CACHE_DIR to a writable folder");
  }
  write_example_file(result.path, examples,
                     {{"key", key}, {"source", data_path}, {"data_format", result.format}, {"train_on", result.train_on},
                      {"tokenizer", recipe.tokenizer->kind()}, {"tokenizer_checksum", recipe.tokenizer_checksum}});
  result.built = true;
  return finish();
}

}  // namespace qlora::data
