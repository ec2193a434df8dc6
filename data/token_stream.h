// Training data as token streams: the text files of a --data source, and a sequence of token ids held
// in memory or read in slices from an HDF5 token file (HDF5 hyperslabs), so a rank reads only the
// rows it trains on, never the whole corpus.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace qlora::data {

// The text files of a source: the file itself, or every *.txt / *.md file under a folder (sorted by
// path). Throws UserError for a missing source or one without any non-empty file.
std::vector<std::filesystem::path> text_source_files(const std::string& path);
// All of them concatenated, as UTF-8 bytes.
std::string read_text_source(const std::string& path);

// Byte-level tokens (token = byte value), the tokenizer of synthetic models.
std::vector<int64_t> byte_tokens(const std::string& text);

// A sequence of token ids, in memory or in an HDF5 token file (docs/FORMAT.md, "Token files").
class TokenStream {
 public:
  static std::shared_ptr<TokenStream> in_memory(std::vector<int32_t> tokens);
  // Throws UserError naming the file when it is not a readable token file.
  static std::shared_ptr<TokenStream> open_file(const std::string& path);
  ~TokenStream();

  int64_t size() const { return size_; }
  // Tokens [begin, end) as int64 into `out`; a token file reads just that hyperslab.
  void read(int64_t begin, int64_t end, int64_t* out) const;
  // Tokens this object has handed out so far (tests: each rank reads only its rows).
  uint64_t tokens_read() const { return tokens_read_; }
  // The largest id in the stream; for a file without the max_token attribute it is scanned.
  int64_t max_token() const;
  const std::string& path() const { return path_; }   // "" in memory

 private:
  TokenStream() = default;
  std::vector<int32_t> memory_;
  std::string path_;
  int64_t file_ = -1;
  int64_t dataset_ = -1;
  int64_t size_ = 0;
  mutable int64_t max_token_ = -1;
  mutable uint64_t tokens_read_ = 0;
};

}  // namespace qlora::data
