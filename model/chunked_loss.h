// Next-token cross-entropy of lm_head(hidden) computed a chunk of rows at a time, so the full
// [tokens, vocab] logits (plus their softmax and gradient) never exist at once: for a 49K-token
// vocabulary and 1K tokens that is 600 MB the loss no longer holds. When a gradient is needed,
// forward also forms d(loss)/d(hidden) chunk by chunk. The LM head weight must be frozen (QLoRA).
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace qlora::model {

// hidden: [rows, hidden] (the final-normed states), weight: [vocab, hidden], targets: int64 [rows].
// Returns the mean (or, with sum = true, the summed) cross-entropy as a 0-d tensor; differentiable
// with respect to `hidden` only.
torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                    const torch::Tensor& targets, bool sum = false, int64_t chunk_rows = 0);

// Rows per chunk keeping one chunk's logits near `target_bytes` of fp32.
int64_t default_chunk_rows(int64_t vocab, int64_t target_bytes = 32ll << 20);

}  // namespace qlora::model
