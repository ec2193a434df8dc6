// Training data as token streams, and the deterministic global batches every rank agrees on.
// The stream is packed into consecutive windows of --seq-len + 1 tokens (neighbours share one
// token: the last target of a window is the first input of the next); the batch of step s takes
// global rows s*B .. s*B+B-1 of an endless sequence of epochs, each a seeded permutation of all
// windows, so the batch is a function of (seed, s) only, any world size sees the same global batch,
// and rank r reads only its contiguous share of the rows from the stream (HDF5 hyperslabs for a
// token file), never the whole corpus.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cluster/communicator.h"
#include "shard/model_store.h"
#include "shard/tokenizer.h"

namespace qlora::launcher {

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

class BatchSampler {
 public:
  // Windows over tokens [begin, end) of `stream`.
  BatchSampler(std::shared_ptr<const TokenStream> stream, int64_t begin, int64_t end, int64_t sequence_length,
               int64_t global_batch, uint64_t seed);
  // The whole of an in-memory stream.
  BatchSampler(std::vector<int64_t> tokens, int64_t sequence_length, int64_t global_batch, uint64_t seed);

  // Rows [rank*global/world, (rank+1)*global/world) of step `step`'s global batch: inputs and
  // next-token targets, each int64 [rows, sequence_length].
  std::pair<torch::Tensor, torch::Tensor> batch(int64_t step, int rank, int world) const;
  int64_t token_count() const { return end_ - begin_; }
  // Packed windows of sequence_length + 1 tokens that fit.
  int64_t window_count() const;
  // For evaluation: rows [rank*count/world, (rank+1)*count/world) of the first `count` windows, in order.
  std::pair<torch::Tensor, torch::Tensor> sequential(int64_t count, int rank, int world) const;
  const TokenStream& stream() const { return *stream_; }

 private:
  // Reads window `window` into row `row` of inputs and targets.
  void fill_row(int64_t window, int64_t row, int64_t* inputs, int64_t* targets, std::vector<int64_t>& buffer) const;
  std::shared_ptr<const TokenStream> stream_;
  int64_t begin_;
  int64_t end_;
  int64_t sequence_length_;
  int64_t global_batch_;
  uint64_t seed_;
};

// The position of `index` in a seeded permutation of [0, count) (a Feistel network with cycle
// walking: no table, the same answer on every rank).
uint64_t permuted_index(uint64_t index, uint64_t count, uint64_t key);

// The tokens of --data (or --eval-data) for the model in `store`, on every rank of `communicator`:
// an HDF5 token file is used as it is; text is tokenized by the store's tokenizer into a cached token
// file (see token_cache.h) by rank 0 while the others wait, then every rank opens it; an empty path
// tokenizes the embedded demo text in memory. Collective; user errors surface on every rank.
std::shared_ptr<TokenStream> load_data_tokens(const std::string& data_path, const shard::ModelStore& store,
                                              cluster::Communicator& communicator, bool quiet = false);

}  // namespace qlora::launcher
