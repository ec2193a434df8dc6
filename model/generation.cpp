// KV-cached decoding of the Llama decoder and transformers-style token sampling.
#include "model/generation.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/chunked_loss.h"

namespace qlora::model {
namespace {

torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// x [rows, in] times projection `tensor_index` of `block` (dequantized just in time), its bias, and
// its adapter's update. The model is in eval mode, so adapters apply no dropout.
torch::Tensor project(DecoderBlockImpl& block, const char* name, size_t tensor_index, const torch::Tensor& x) {
  auto output = torch::matmul(x, block.dequantize_weight(tensor_index).t());
  auto bias = block.biases.find(name);
  if (bias != block.biases.end()) output = output + bias->second.to(output.scalar_type());
  auto adapter = block.adapters.find(name);
  if (adapter != block.adapters.end()) adapter->second->add_update(output, x, DropoutSource{});
  return output;
}

}  // namespace

CachedDecoder::CachedDecoder(LlamaModelImpl& model, int64_t capacity)
    : model_(model), communicator_(model.communicator()),
      inverse_frequencies_(rotary_inverse_frequencies(model.config())) {
  keys_.resize(model_.block_count());
  values_.resize(model_.block_count());
  ensure_capacity(std::max<int64_t>(capacity, 1));
}

void CachedDecoder::ensure_capacity(int64_t needed) {
  if (needed <= capacity_) return;
  const int64_t grown = std::max(needed, capacity_ * 2);
  const auto& config = model_.config();
  for (size_t index = 0; index < keys_.size(); ++index) {
    auto keys = torch::zeros({config.num_key_value_heads, grown, config.head_dim}, torch::kFloat);
    auto values = torch::zeros_like(keys);
    if (length_ > 0) {
      keys.narrow(1, 0, length_).copy_(keys_[index].narrow(1, 0, length_));
      values.narrow(1, 0, length_).copy_(values_[index].narrow(1, 0, length_));
    }
    keys_[index] = keys;
    values_[index] = values;
  }
  capacity_ = grown;
}

void CachedDecoder::truncate(int64_t new_length) {
  TORCH_CHECK(new_length >= 0 && new_length <= length_, "truncate past the cached length");
  length_ = new_length;
}

torch::Tensor CachedDecoder::run_block(size_t index, const torch::Tensor& hidden, const torch::Tensor& cos,
                                       const torch::Tensor& sin, const torch::Tensor& query_cos,
                                       const torch::Tensor& query_sin) {
  DecoderBlockImpl& block = model_.block(index);
  const auto& config = model_.config();
  const int64_t count = hidden.size(0);
  const int64_t heads = config.num_attention_heads;
  const int64_t kv_heads = config.num_key_value_heads;
  const int64_t group = heads / kv_heads;
  const int64_t head_dim = config.head_dim;
  const int64_t total = length_ + count;

  auto normed = rms_norm(hidden, block.input_layernorm, config.rms_norm_eps).to(torch::kFloat);
  auto q = project(block, "q_proj", 0, normed).view({count, heads, head_dim}).transpose(0, 1);
  auto k = project(block, "k_proj", 1, normed).view({count, kv_heads, head_dim}).transpose(0, 1);
  auto v = project(block, "v_proj", 2, normed).view({count, kv_heads, head_dim}).transpose(0, 1);
  // As in the full forward, the query's tables carry 1/sqrt(head_dim).
  q = apply_rotary(q, query_cos, query_sin);
  keys_[index].narrow(1, length_, count).copy_(apply_rotary(k, cos, sin));
  values_[index].narrow(1, length_, count).copy_(v);
  const auto keys = keys_[index].narrow(1, 0, total);
  const auto values = values_[index].narrow(1, 0, total);

  // Grouped-query attention: the `group` query heads of one kv head stack into [group * count] rows.
  auto grouped_query = q.reshape({kv_heads, group * count, head_dim});
  auto scores = torch::matmul(grouped_query, keys.transpose(-2, -1));
  if (count > 1) {
    // New token i sits at position length_ + i and sees keys up to it.
    auto key_positions = torch::arange(total, torch::kLong).unsqueeze(0);
    auto query_positions = torch::arange(length_, total, torch::kLong).unsqueeze(1);
    auto mask = (key_positions > query_positions).repeat({group, 1});
    scores.masked_fill_(mask, -std::numeric_limits<float>::infinity());
  }
  auto attention = torch::matmul(torch::softmax(scores, -1), values);
  attention = attention.view({heads, count, head_dim}).transpose(0, 1).reshape({count, heads * head_dim});
  auto after_attention = hidden + project(block, "o_proj", 3, attention);

  auto normed_mlp = rms_norm(after_attention, block.post_attention_layernorm, config.rms_norm_eps).to(torch::kFloat);
  auto product = torch::silu(project(block, "gate_proj", 4, normed_mlp)) * project(block, "up_proj", 5, normed_mlp);
  return after_attention + project(block, "down_proj", 6, product);
}

torch::Tensor CachedDecoder::full_vocabulary_logits(const torch::Tensor& hidden) {
  const auto slice_logits = torch::matmul(hidden, model_.lm_head.to(torch::kFloat).t()).contiguous();
  const int world = communicator_.size();
  if (world == 1) return slice_logits;
  // Every rank holds the same rows (the same tokens), so one all-gather of the slices gives each rank
  // every column: rank r's block is [rows, its vocabulary rows].
  const int64_t rows = hidden.size(0);
  const int64_t vocab = model_.config().vocab_size;
  std::vector<int64_t> byte_counts;
  for (int r = 0; r < world; ++r)
    byte_counts.push_back(rows * shard::vocab_range(vocab, r, world).rows() * static_cast<int64_t>(sizeof(float)));
  auto every_slice = torch::empty({rows * vocab}, torch::kFloat);
  communicator_.all_gather(slice_logits.data_ptr(), every_slice.data_ptr(), byte_counts);
  std::vector<torch::Tensor> columns;
  for (int r = 0; r < world; ++r) {
    const auto range = shard::vocab_range(vocab, r, world);
    columns.push_back(every_slice.narrow(0, rows * range.begin, rows * range.rows()).view({rows, range.rows()}));
  }
  return torch::cat(columns, 1);
}

torch::Tensor CachedDecoder::append(const std::vector<int64_t>& tokens, bool all_positions) {
  TORCH_CHECK(!tokens.empty(), "append needs at least one token");
  torch::NoGradGuard no_grad;
  const int64_t count = static_cast<int64_t>(tokens.size());
  ensure_capacity(length_ + count);
  auto token_tensor = torch::tensor(tokens, torch::kLong).view({1, count});
  auto hidden = vocab_parallel_embedding(model_.embed_tokens, model_.vocab_range(), token_tensor, communicator_)
                    .view({count, -1});

  auto positions = torch::arange(length_, length_ + count, torch::kFloat);
  auto frequencies = torch::outer(positions, inverse_frequencies_);
  auto angles = torch::cat({frequencies, frequencies}, -1);
  const auto cos = angles.cos();
  const auto sin = angles.sin();
  const double score_scale = 1.0 / std::sqrt(static_cast<double>(model_.config().head_dim));
  const auto query_cos = cos * score_scale;
  const auto query_sin = sin * score_scale;

  const size_t blocks = model_.block_count();
  for (size_t index = 0; index < blocks; ++index) {
    if (model_.quantized_blocks()) {
      model_.gatherer().acquire(index);  // now, so the next block's prefetch overlaps this one's compute
      if (index + 1 < blocks) model_.prefetch_block(index + 1);
    }
    hidden = run_block(index, hidden, cos, sin, query_cos, query_sin);
  }
  length_ += count;
  auto normed = rms_norm(hidden, model_.final_norm, model_.config().rms_norm_eps).to(torch::kFloat);
  if (!all_positions) return full_vocabulary_logits(normed.narrow(0, count - 1, 1)).view({-1});
  return full_vocabulary_logits(normed);
}

// ---- sampling ------------------------------------------------------------------------------------

torch::Tensor sampling_distribution(const torch::Tensor& logits, double temperature, double top_p) {
  TORCH_CHECK(temperature > 0, "sampling needs a positive temperature");
  auto scaled = logits.to(torch::kFloat).reshape({-1}) / temperature;
  if (top_p < 1.0) {
    // transformers' TopPLogitsWarper: ascending sort, cumulative softmax, remove where <= 1 - top_p,
    // always keep the last (most probable) one.
    auto sorted = torch::sort(scaled, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto& sorted_logits = std::get<0>(sorted);
    const auto& sorted_indices = std::get<1>(sorted);
    auto cumulative = torch::softmax(sorted_logits, 0).cumsum(0);
    auto remove_sorted = cumulative <= static_cast<float>(1.0 - top_p);
    remove_sorted[-1] = false;
    auto remove = torch::zeros_like(remove_sorted).scatter(0, sorted_indices, remove_sorted);
    scaled = scaled.masked_fill(remove, -std::numeric_limits<float>::infinity());
  }
  return torch::softmax(scaled, 0);
}

int64_t pick_from_distribution(const torch::Tensor& probabilities, double u) {
  const auto flat = probabilities.to(torch::kDouble).contiguous().reshape({-1});
  const double* values = flat.data_ptr<double>();
  const int64_t count = flat.numel();
  double running = 0.0;
  int64_t last_nonzero = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (values[i] <= 0.0) continue;
    last_nonzero = i;
    running += values[i];
    if (running > u) return i;
  }
  return last_nonzero;
}

TokenSampler::TokenSampler(const SamplingOptions& options) : options_(options), generator_(options.seed) {}

int64_t TokenSampler::next(const torch::Tensor& logits) {
  if (options_.temperature <= 0.0) return logits.reshape({-1}).argmax().item<int64_t>();
  const double u = static_cast<double>(generator_() >> 11) * 0x1.0p-53;
  return pick_from_distribution(sampling_distribution(logits, options_.temperature, options_.top_p), u);
}

}  // namespace qlora::model
