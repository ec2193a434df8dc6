// The deterministic global batches every rank agrees on. A token stream is packed into consecutive
// windows of --seq-len + 1 tokens (neighbours share one token: the last target of a window is the
// first input of the next); the batch of step s takes global rows s*B .. s*B+B-1 of an endless
// sequence of epochs, each a seeded permutation of all windows, so the batch is a function of
// (seed, s) only, any world size sees the same global batch, and rank r reads only its contiguous
// share of the rows from the stream.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "data/token_stream.h"

namespace qlora::data {

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

}  // namespace qlora::data
