// Training text as tokens, and the deterministic global batches every rank agrees on: the batch of
// step s is a function of (seed, s) only, and rank r takes its contiguous share of its rows, so any
// world size sees the same global batch.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::launcher {

// Reads a text file, or every *.txt / *.md file under a folder (sorted by path), as UTF-8 bytes.
// Throws UserError for a missing, unreadable or empty source.
std::string read_text_source(const std::string& path);

// Byte-level tokens (token = byte value), the tokenizer of synthetic models.
std::vector<int64_t> byte_tokens(const std::string& text);

class BatchSampler {
 public:
  BatchSampler(std::vector<int64_t> tokens, int64_t sequence_length, int64_t global_batch, uint64_t seed);
  // Rows [rank*global/world, (rank+1)*global/world) of step `step`'s global batch: inputs and
  // next-token targets, each int64 [rows, sequence_length].
  std::pair<torch::Tensor, torch::Tensor> batch(int64_t step, int rank, int world) const;
  int64_t token_count() const { return static_cast<int64_t>(tokens_.size()); }
  // Consecutive, non-overlapping windows (for evaluation): how many fit, and rows
  // [rank*count/world, (rank+1)*count/world) of the first `count` of them.
  int64_t window_count() const;
  std::pair<torch::Tensor, torch::Tensor> sequential(int64_t count, int rank, int world) const;

 private:
  std::vector<int64_t> tokens_;
  int64_t sequence_length_;
  int64_t global_batch_;
  uint64_t seed_;
};

}  // namespace qlora::launcher
