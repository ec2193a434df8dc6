// Autoregressive decoding with a key/value cache: the prompt runs once (prefill), then each new token
// runs alone against every block's cached keys and values, adapters applied, without autograd. Works
// on the sharded model: blocks are gathered per step through the model's BlockGatherer and the
// vocabulary-parallel LM head's slices are combined, so every rank holds the same full logits and
// every rank picks the same token (sampled identically, then broadcast from rank 0 to be certain).
// Sampling follows transformers' generate: logits / temperature, then TopPLogitsWarper's nucleus.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cluster/communicator.h"
#include "model/llama.h"

namespace qlora::model {

// Runs one sequence through `model` incrementally. Collective over the model's communicator: every
// rank calls append with the same tokens.
class CachedDecoder {
 public:
  // `capacity` is a hint (prompt + new tokens); the cache grows past it when needed.
  CachedDecoder(LlamaModelImpl& model, int64_t capacity = 256);

  // Runs `tokens` after the ones already cached and returns fp32 logits over the whole vocabulary:
  // [tokens.size(), vocab] with all_positions, else the last position's [vocab].
  torch::Tensor append(const std::vector<int64_t>& tokens, bool all_positions = false);
  int64_t length() const { return length_; }
  // Forgets the cached sequence (the next append starts at position 0).
  void reset() { length_ = 0; }
  // Drops the cached tail so `new_length` positions remain (a chat turn resent with another ending).
  void truncate(int64_t new_length);

 private:
  torch::Tensor run_block(size_t index, const torch::Tensor& hidden, const torch::Tensor& cos,
                          const torch::Tensor& sin, const torch::Tensor& query_cos, const torch::Tensor& query_sin);
  torch::Tensor full_vocabulary_logits(const torch::Tensor& hidden);
  void ensure_capacity(int64_t needed);

  LlamaModelImpl& model_;
  cluster::Communicator& communicator_;
  torch::Tensor inverse_frequencies_;
  std::vector<torch::Tensor> keys_;    // per block [kv_heads, capacity, head_dim], rotary applied
  std::vector<torch::Tensor> values_;  // per block [kv_heads, capacity, head_dim]
  int64_t capacity_ = 0;
  int64_t length_ = 0;
};

struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy (argmax)
  double top_p = 1.0;        // 1: no nucleus filtering
  uint64_t seed = 0;
};

// The distribution a sampler draws from, fp32 [vocab]: softmax(logits / temperature) restricted to
// transformers' top-p nucleus. Sorting ascending, a token is removed when the cumulative probability
// up to and including it is <= 1 - top_p; the most probable token always stays. Temperature must be
// > 0 here.
torch::Tensor sampling_distribution(const torch::Tensor& logits, double temperature, double top_p);

// Picks tokens from full-vocabulary logits: argmax at temperature 0, else one draw from
// sampling_distribution with a seeded 64-bit Mersenne Twister (u = 53 random bits / 2^53; the first
// token whose cumulative probability in vocabulary order exceeds u), so a seed gives the same tokens
// on every rank, every platform and every LibTorch version.
class TokenSampler {
 public:
  explicit TokenSampler(const SamplingOptions& options);
  int64_t next(const torch::Tensor& logits);

 private:
  SamplingOptions options_;
  std::mt19937_64 generator_;
};

// Index of the token the draw u in [0, 1) selects from probabilities (any shape, summing to ~1): the
// first whose running sum in index order exceeds u, the last nonzero one if rounding leaves u past all.
int64_t pick_from_distribution(const torch::Tensor& probabilities, double u);

}  // namespace qlora::model
