// Next-token cross-entropy of lm_head(hidden) computed a chunk of rows at a time, so the full
// [tokens, vocab] logits (plus their softmax and gradient) never exist at once: for a 49K-token
// vocabulary and 1K tokens that is 600 MB the loss no longer holds. When a gradient is needed,
// forward also forms d(loss)/d(hidden) chunk by chunk. The LM head weight must be frozen (QLoRA).
// The vocabulary-parallel forms do the same when each rank holds only a slice of the LM head's rows,
// and look up input embeddings from row slices.
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "cluster/communicator.h"
#include "shard/shard_plan.h"

namespace qlora::model {

// hidden: [rows, hidden] (the final-normed states), weight: [vocab, hidden], targets: int64 [rows].
// Returns the mean (or, with sum = true, the summed) cross-entropy as a 0-d tensor; differentiable
// with respect to `hidden` only.
torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                    const torch::Tensor& targets, bool sum = false, int64_t chunk_rows = 0);

// The same loss when this rank holds only rows [vocab_begin, vocab_begin + weight_slice.size(0)) of
// the LM head (shard::vocab_range of vocab_size over the communicator's ranks) and every rank brings
// its own hidden rows and targets (data parallel). Collective: every rank calls it, and every rank
// runs the same chunks over all ranks' rows (gathered): per chunk, its slice of the logits, an
// all-reduce of the row maxima, an all-reduce of the exp sums and the target logits (each owned by one
// rank), and, when a gradient is needed, an all-reduce of (softmax - onehot) slice @ weight slice, of
// which each rank keeps its own rows. Returns this rank's rows' mean (or sum). One rank: exactly
// chunked_cross_entropy, no collective.
torch::Tensor vocab_parallel_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight_slice,
                                           int64_t vocab_begin, int64_t vocab_size, const torch::Tensor& targets,
                                           cluster::Communicator& communicator, bool sum = false,
                                           int64_t chunk_rows = 0);

// The input embedding's rows for this rank's `tokens` (int64, any shape) as fp32 [..., hidden], when
// this rank holds rows `vocab` of the embedding (`weight_slice`). Collective: every rank gathers the
// rows it holds for every rank's tokens and the ranks' contributions are summed (all-reduce), which
// reproduces one rank's lookup bitwise. One rank: a plain lookup, no collective.
torch::Tensor vocab_parallel_embedding(const torch::Tensor& weight_slice, const shard::VocabRange& vocab,
                                       const torch::Tensor& tokens, cluster::Communicator& communicator);

// Every rank's rows of `local` (a contiguous [rows, ...] fp32 or int64 tensor; the row count may
// differ between ranks), concatenated in rank order; `offset` receives where this rank's rows start.
torch::Tensor all_gather_rows(const torch::Tensor& local, cluster::Communicator& communicator, int64_t* offset);

// Rows per chunk keeping one chunk's logits near `target_bytes` of fp32.
int64_t default_chunk_rows(int64_t vocab, int64_t target_bytes = 32ll << 20);

}  // namespace qlora::model
