// Token files: a streaming HDF5 writer (chunked, extendible int32 dataset), the checksums that
// decide whether a cached file is current, and where caches live.
#include "data/token_cache.h"

#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "common/errors.h"
#include "common/hash.h"
#include "data/token_stream.h"
#include "shard/hdf5_file.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using shard::h5::Handle;

constexpr const char* kTokenFormat = "qlora-tokens";
constexpr int64_t kTokenFormatVersion = 1;
constexpr hsize_t kChunkTokens = 65536;
constexpr size_t kReadBlock = 4 << 20;

std::string host_name() {
  char name[256] = {};
  if (gethostname(name, sizeof name - 1) != 0) return "host";
  return name;
}

// The temporary a writer of `path` uses: "<path>.partial-<host>-<pid>".
std::string partial_prefix(const std::string& path) { return path + ".partial-" + host_name() + "-"; }

// Removes the temporaries of `path` written on this host by processes that no longer exist (a run
// killed while tokenizing, e.g. by a collective timeout); those of live processes are left alone.
void remove_abandoned_partials(const std::string& path) {
  const std::string prefix = fs::path(partial_prefix(path)).filename().string();
  std::error_code error;
  const fs::path folder = fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path();
  for (const auto& entry : fs::directory_iterator(folder, error)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string pid_text = name.substr(prefix.size());
    if (pid_text.empty() || pid_text.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
    if (::kill(pid, 0) != 0 && errno == ESRCH) fs::remove(entry.path(), error);
  }
}

// FNV-1a over each file's path relative to the source, its size and its bytes.
std::string source_checksum(const std::string& data_path, const std::vector<fs::path>& files, uint64_t* total_bytes) {
  Fnv1a64 hash;
  const fs::path root(data_path);
  std::vector<char> block(kReadBlock);
  *total_bytes = 0;
  for (const fs::path& file : files) {
    const std::string name = fs::is_directory(root) ? fs::relative(file, root).generic_string() : file.filename().string();
    hash.update(name.data(), name.size() + 0);
    const uint64_t size = fs::file_size(file);
    hash.update(&size, sizeof size);
    std::ifstream in(file, std::ios::binary);
    while (in) {
      in.read(block.data(), static_cast<std::streamsize>(block.size()));
      hash.update(block.data(), static_cast<size_t>(in.gcount()));
    }
    *total_bytes += size;
  }
  return hash.hex();
}

class TokenFileWriter {
 public:
  // An empty path makes a writer that is not ok().
  explicit TokenFileWriter(const std::string& path)
      : path_(path), partial_(partial_prefix(path) + std::to_string(getpid())) {
    shard::h5::silence_hdf5_errors();
    if (path.empty()) return;
    file_ = H5Fcreate(partial_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (file_ < 0) return;
    hsize_t initial = 0, unlimited = H5S_UNLIMITED;
    Handle space(H5Screate_simple(1, &initial, &unlimited), H5Sclose);
    Handle properties(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    H5Pset_chunk(properties.get(), 1, &kChunkTokens);
    dataset_ = H5Dcreate2(file_, "tokens", H5T_STD_I32LE, space.get(), H5P_DEFAULT, properties.get(), H5P_DEFAULT);
  }
  ~TokenFileWriter() {
    close();
    if (!finished_) std::remove(partial_.c_str());
  }
  bool ok() const { return file_ >= 0 && dataset_ >= 0; }

  void append(const std::vector<int32_t>& tokens) {
    if (tokens.empty()) return;
    hsize_t offset = static_cast<hsize_t>(size_), count = tokens.size();
    hsize_t new_size = offset + count;
    if (H5Dset_extent(dataset_, &new_size) < 0) fail("cannot extend the token dataset");
    Handle file_space(H5Dget_space(dataset_), H5Sclose);
    H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &offset, nullptr, &count, nullptr);
    Handle memory_space(H5Screate_simple(1, &count, nullptr), H5Sclose);
    if (H5Dwrite(dataset_, H5T_NATIVE_INT32, memory_space.get(), file_space.get(), H5P_DEFAULT, tokens.data()) < 0)
      fail("cannot write tokens (disk full?)");
    size_ += static_cast<int64_t>(count);
    for (int32_t token : tokens) max_token_ = std::max<int64_t>(max_token_, token);
  }

  void finish(const std::string& source, const std::string& source_checksum, const std::string& tokenizer_kind,
              const std::string& tokenizer_checksum, int64_t documents) {
    {
      Handle root(H5Gopen2(file_, "/", H5P_DEFAULT), H5Gclose);
      using namespace shard::h5;
      write_string_attribute(root.get(), "format", kTokenFormat, path_);
      write_int_attribute(root.get(), "format_version", kTokenFormatVersion, path_);
      write_string_attribute(root.get(), "source", source, path_);
      write_string_attribute(root.get(), "source_checksum", source_checksum, path_);
      write_string_attribute(root.get(), "tokenizer", tokenizer_kind, path_);
      write_string_attribute(root.get(), "tokenizer_checksum", tokenizer_checksum, path_);
      write_int_attribute(root.get(), "max_token", max_token_, path_);
      write_int_attribute(root.get(), "documents", documents, path_);
    }
    close();
    std::error_code error;
    fs::rename(partial_, path_, error);
    if (error) throw UserError("cannot move the token file into place at " + path_ + ": " + error.message());
    finished_ = true;
  }
  int64_t size() const { return size_; }

 private:
  [[noreturn]] void fail(const std::string& what) { throw UserError(path_ + ": " + what); }
  void close() {
    if (dataset_ >= 0) H5Dclose(dataset_);
    if (file_ >= 0) H5Fclose(file_);
    dataset_ = file_ = -1;
  }
  std::string path_;
  std::string partial_;
  hid_t file_ = -1;
  hid_t dataset_ = -1;
  int64_t size_ = 0;
  int64_t max_token_ = -1;
  bool finished_ = false;
};

// True when `path` is a qlora token file made from this source with this tokenizer.
bool is_current(const std::string& path, const std::string& source_checksum, const std::string& tokenizer_checksum,
                int64_t* tokens) {
  std::error_code error;
  if (!fs::is_regular_file(path, error) || !is_hdf5_file(path)) return false;
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.valid()) return false;
  Handle root(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose);
  using namespace shard::h5;
  for (const char* key : {"format", "source_checksum", "tokenizer_checksum"})
    if (!has_attribute(root.get(), key)) return false;
  if (read_string_attribute(root.get(), "format", path) != kTokenFormat ||
      read_string_attribute(root.get(), "source_checksum", path) != source_checksum ||
      read_string_attribute(root.get(), "tokenizer_checksum", path) != tokenizer_checksum)
    return false;
  Handle dataset(H5Dopen2(file.get(), "tokens", H5P_DEFAULT), H5Dclose);
  if (!dataset.valid()) return false;
  Handle space(H5Dget_space(dataset.get()), H5Sclose);
  hsize_t length = 0;
  H5Sget_simple_extent_dims(space.get(), &length, nullptr);
  *tokens = static_cast<int64_t>(length);
  return true;
}

// The last place in buffer[0, size) that begins a printable ASCII character right after a line
// break: cutting there keeps every pre-tokenizer piece whole. 0 when there is none.
size_t safe_cut(const std::string& buffer) {
  for (size_t position = buffer.size() - 1; position >= 1; --position) {
    const unsigned char c = static_cast<unsigned char>(buffer[position]);
    if (buffer[position - 1] == '\n' && c > 0x20 && c < 0x7F) return position;
  }
  return 0;
}

// Reads `file` in pieces cut at safe places and hands them, in order, to `consume`.
template <typename Consume>
void for_each_piece(const fs::path& file, size_t piece_bytes, Consume consume) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw UserError("cannot read data file " + file.string(), "check the path and its permissions");
  std::string buffer;
  std::vector<char> block(piece_bytes);
  while (true) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    buffer.append(block.data(), static_cast<size_t>(in.gcount()));
    const bool at_end = !in;
    if (buffer.empty()) break;
    size_t cut = at_end ? buffer.size() : safe_cut(buffer);
    // A single line longer than the read size: give up on a safe cut rather than grow without bound.
    if (cut == 0) {
      if (buffer.size() < 16 * piece_bytes) continue;
      cut = buffer.size();
    }
    consume(buffer.substr(0, cut));
    buffer.erase(0, cut);
    if (at_end) break;
  }
}

// Encodes the pieces of `file` on `threads` threads, a round of one piece per thread at a time,
// appending each round's ids in piece order.
void tokenize_file(const fs::path& file, const Tokenizer& tokenizer, const TokenizeSettings& settings,
                   TokenFileWriter& writer) {
  const size_t threads = settings.threads > 0 ? static_cast<size_t>(settings.threads)
                                              : std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::string> round;
  auto encode_round = [&] {
    std::vector<std::future<std::vector<int32_t>>> encoded;
    for (size_t i = 1; i < round.size(); ++i)
      encoded.push_back(std::async(std::launch::async, [&, i] { return tokenizer.encode(round[i]); }));
    if (!round.empty()) writer.append(tokenizer.encode(round[0]));
    for (auto& ids : encoded) writer.append(ids.get());
    round.clear();
  };
  for_each_piece(file, std::max<size_t>(settings.piece_bytes, 64), [&](std::string piece) {
    round.push_back(std::move(piece));
    if (round.size() == threads) encode_round();
  });
  encode_round();
}

std::string cache_folder() {
  if (const char* folder = std::getenv("QLORA_CACHE_DIR"); folder != nullptr && *folder) return folder;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg) return std::string(xdg) + "/qlora/tokens";
  if (const char* home = std::getenv("HOME"); home != nullptr && *home) return std::string(home) + "/.cache/qlora/tokens";
  return (fs::temp_directory_path() / ("qlora-tokens-" + std::to_string(getuid()))).string();
}

std::string without_trailing_slash(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return path;
}

}  // namespace

std::string token_cache_path(const std::string& data_path) { return without_trailing_slash(data_path) + ".tokens.h5"; }

std::string fallback_token_cache_path(const std::string& data_path) {
  std::error_code error;
  const std::string absolute = fs::absolute(without_trailing_slash(data_path), error).string();
  Fnv1a64 hash;
  hash.update(absolute.data(), absolute.size());
  return cache_folder() + "/" + fs::path(absolute).filename().string() + "-" + hash.hex() + ".tokens.h5";
}

bool is_hdf5_file(const std::string& path) {
  shard::h5::silence_hdf5_errors();
  std::error_code error;
  return fs::is_regular_file(path, error) && H5Fis_hdf5(path.c_str()) > 0;
}

TokenCacheResult ensure_token_cache(const std::string& data_path, const Tokenizer& tokenizer,
                                    const std::string& tokenizer_checksum, const TokenizeSettings& settings) {
  const auto start = std::chrono::steady_clock::now();
  const auto files = text_source_files(data_path);
  TokenCacheResult result;
  const std::string checksum = source_checksum(data_path, files, &result.source_bytes);
  const auto finish = [&] {
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return result;
  };
  for (const std::string& candidate : {token_cache_path(data_path), fallback_token_cache_path(data_path)}) {
    if (is_current(candidate, checksum, tokenizer_checksum, &result.tokens)) {
      result.path = candidate;
      return finish();
    }
  }
  result.path = token_cache_path(data_path);
  remove_abandoned_partials(result.path);
  remove_abandoned_partials(fallback_token_cache_path(data_path));
  // A folder without any write permission bit is read-only by intent, even to root (who could write).
  std::error_code error;
  const auto permissions = fs::status(fs::path(result.path).parent_path().empty() ? fs::path(".")
                                                                                   : fs::path(result.path).parent_path(),
                                      error).permissions();
  const bool writable_by_intent =
      (permissions & (fs::perms::owner_write | fs::perms::group_write | fs::perms::others_write)) != fs::perms::none;
  auto writer = std::make_unique<TokenFileWriter>(writable_by_intent ? result.path : std::string());
  if (!writer->ok()) {
    result.path = fallback_token_cache_path(data_path);
    fs::create_directories(fs::path(result.path).parent_path(), error);
    writer = std::make_unique<TokenFileWriter>(result.path);
    if (!writer->ok())
      throw UserError("cannot write a token cache next to " + data_path + " nor at " + result.path,
                      "make one of them writable, or set QLORA_CACHE_DIR to a writable folder");
  }
  const std::vector<int32_t> end_of_text = tokenizer.eos_id() >= 0 ? std::vector<int32_t>{tokenizer.eos_id()}
                                                                    : std::vector<int32_t>{};
  for (const fs::path& file : files) {
    tokenize_file(file, tokenizer, settings, *writer);
    writer->append(end_of_text);
  }
  result.tokens = writer->size();
  writer->finish(data_path, checksum, tokenizer.kind(), tokenizer_checksum, static_cast<int64_t>(files.size()));
  result.built = true;
  return finish();
}

void write_token_file(const std::string& path, const std::vector<int32_t>& tokens, const std::string& source_checksum,
                      const std::string& tokenizer_kind, const std::string& tokenizer_checksum) {
  TokenFileWriter writer(path);
  if (!writer.ok()) throw UserError("cannot create token file " + path);
  writer.append(tokens);
  writer.finish(path, source_checksum, tokenizer_kind, tokenizer_checksum, 1);
}

}  // namespace qlora::data
