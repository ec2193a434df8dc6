// Token files (HDF5, docs/FORMAT.md "Token files"): text tokenized once and kept next to its source
// (corpus.txt -> corpus.txt.tokens.h5, corpus/ -> corpus.tokens.h5), or in a cache folder when that
// is not writable. A token file records checksums of the source bytes and of the tokenizer; a file
// whose checksums no longer match is rebuilt, so editing the text or changing the model's tokenizer
// never trains on stale tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace qlora::data {

struct TokenCacheResult {
  std::string path;          // the token file to read
  bool built = false;        // false: an up-to-date file was reused
  double seconds = 0.0;      // checking (and building)
  int64_t tokens = 0;
  uint64_t source_bytes = 0;
};

// Where the token file of `data_path` lives when next to it, and in the fallback folder
// ($QLORA_CACHE_DIR, else $XDG_CACHE_HOME/qlora/tokens, else ~/.cache/qlora/tokens).
std::string token_cache_path(const std::string& data_path);
std::string fallback_token_cache_path(const std::string& data_path);

// How a corpus is tokenized when its cache is built: pieces of about `piece_bytes` each, cut after a
// line break, encoded by `threads` threads at once (0: every core) and written in order, so the ids
// are those of one thread.
struct TokenizeSettings {
  int threads = 0;
  size_t piece_bytes = size_t{4} << 20;
};

// Returns an up-to-date token file for the text at `data_path` tokenized by `tokenizer` (identified
// by `tokenizer_checksum`), building it when missing or stale. Documents (files) are separated by
// the tokenizer's end-of-text token when it has one. Large files are tokenized in pieces cut after
// a line break that precedes a printable ASCII character, which leaves byte-level BPE ids unchanged.
// The file is written under a temporary name holding this host and process id and renamed when
// complete; temporaries that a killed run left behind (its process gone) are removed first.
TokenCacheResult ensure_token_cache(const std::string& data_path, const Tokenizer& tokenizer,
                                    const std::string& tokenizer_checksum, const TokenizeSettings& settings = {});

// True when `path` is an HDF5 file (pre-tokenized input rather than text).
bool is_hdf5_file(const std::string& path);

// Writes a token file from tokens in memory (tests, and tools that pre-tokenize).
void write_token_file(const std::string& path, const std::vector<int32_t>& tokens, const std::string& source_checksum,
                      const std::string& tokenizer_kind, const std::string& tokenizer_checksum);

}  // namespace qlora::data
