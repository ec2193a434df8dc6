// The Llama-family decoder on LibTorch: each rank holds its 4-bit shard of every block's linear
// weights, gathers a block just before it runs (prefetching the next one), dequantizes each linear
// into a temporary fp32 weight, and adds LoRA on the targeted projections. Norms are replicated in
// their stored dtype until the preparation protocol upcasts them; the input embedding and LM head are
// row-sharded over the vocabulary (each rank holds a balanced slice of rows, shard::vocab_range), so
// the lookup and the loss combine the ranks' slices with collectives (none on one rank).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cluster/block_gather.h"
#include "cluster/communicator.h"
#include "common/errors.h"
#include "model/lora.h"
#include "shard/model_store.h"

namespace qlora::model {

// Thrown for model/adapter combinations a user asked for that cannot work (bad target, ...).
struct ModelError : UserError {
  using UserError::UserError;
};

class LlamaModelImpl;

// Per-sequence-length tables every block's attention shares, built once by the model.
struct AttentionTables {
  torch::Tensor cos, sin;              // rotary tables [seq, head_dim]
  torch::Tensor query_cos, query_sin;  // the same times 1/sqrt(head_dim): the query carries the score scale
  torch::Tensor causal_mask;           // [group * seq, seq] bool, true above the diagonal of each group's rows
};

class DecoderBlockImpl : public torch::nn::Module {
 public:
  DecoderBlockImpl(const shard::ModelConfig& config, int64_t layer, kernels::QuantType quant_type);
  // With output_value_read = false (a checkpointed block recomputed only for its graph) the down
  // projection's frozen product, whose value nothing reads, is not computed: its backward still is.
  // `dropout_rows` says which global-batch sequences `hidden` holds; the block adds its layer, the
  // sequence length and each projection to draw the adapters' dropout masks.
  torch::Tensor forward(const torch::Tensor& hidden, const AttentionTables& tables, const DropoutSource& dropout_rows,
                        bool output_value_read = true);
  void add_lora(const LoraConfig& config, at::Generator& init_generator);
  void attach_gatherer(cluster::BlockGatherer* gatherer) { gatherer_ = gatherer; }
  // A new fp32 tensor holding projection `tensor_index` (block_linear_names order), dequantized from
  // this block's gathered bytes (gathering them if they are not in the pool), or a copy of it when
  // the store keeps it unquantized.
  torch::Tensor dequantize_weight(size_t tensor_index);
  // Backward walks the blocks in reverse: start gathering the one before this while it computes.
  void prefetch_previous_block() {
    if (layer > 0 && gatherer_ != nullptr) gatherer_->prefetch(static_cast<size_t>(layer - 1));
  }
  // Projection `tensor_index` is quantized and is tensor `gathered_index` of this block's layout.
  void set_quantized(size_t tensor_index, int gathered_index) { gathered_index_[tensor_index] = gathered_index; }

  int64_t layer;
  torch::Tensor input_layernorm;
  torch::Tensor post_attention_layernorm;
  std::map<std::string, torch::Tensor> biases;     // "q_proj" -> bias, when the config has them
  // The projections kept unquantized (all of them in a quant_method none store), replicated, in
  // block_linear_names order; undefined where the projection is quantized.
  std::vector<torch::Tensor> dense_weights;
  std::map<std::string, LoraAdapter> adapters;     // "q_proj" -> adapter

 private:
  torch::Tensor project(const std::string& name, size_t tensor_index, const torch::Tensor& x,
                        const DropoutSource& dropout_source, bool value_read = true);
  shard::ModelConfig config_;
  std::vector<std::vector<int64_t>> linear_shapes_;  // [out, in] per projection, block_linear_names order
  cluster::BlockGatherer* gatherer_ = nullptr;
  kernels::QuantType quant_type_;
  std::vector<int> gathered_index_;   // per projection: index in the gathered layout, -1 when dense
};
TORCH_MODULE(DecoderBlock);

struct CheckpointingMode {
  bool enabled = false;
  bool reentrant = true;
};

class LlamaModelImpl : public torch::nn::Module {
 public:
  // Reads the replicated tensors and this rank's shard of every quantized one from `store`.
  LlamaModelImpl(const shard::ModelStore& store, cluster::Communicator& communicator, int gather_slots = 2);

  // tokens: int64 [batch, seq] -> logits fp32 [batch, seq, vocab]. Over several ranks this is a
  // collective that gathers the ranks' logits slices (evaluation and tests: not differentiable there).
  torch::Tensor forward(const torch::Tensor& tokens);
  // The final-normed hidden states fp32 [batch, seq, hidden], what the LM head multiplies; with
  // chunked_cross_entropy this trains without materialising the logits. Collective over several
  // ranks (the embedding lookup sums the ranks' rows); each rank passes its own tokens.
  torch::Tensor final_hidden(const torch::Tensor& tokens);
  // Next-token loss of `targets` (same shape as tokens): mean, or summed with sum = true, over this
  // rank's tokens. Collective over several ranks (vocab_parallel_cross_entropy).
  torch::Tensor next_token_loss(const torch::Tensor& tokens, const torch::Tensor& targets, bool sum = false);
  // The vocabulary rows [begin, end) this rank holds of embed_tokens and lm_head.
  const shard::VocabRange& vocab_range() const { return vocab_range_; }

  const shard::ModelConfig& config() const { return config_; }
  const shard::StoreHeader& store_header() const { return header_; }
  cluster::BlockGatherer& gatherer() { return *gatherer_; }

  // Every floating parameter under its Hugging Face name (LoRA under PEFT's
  // "base_model.model.<module>.lora_A.weight" naming once adapters exist; DoRA's magnitudes as
  // "<module>.lora_magnitude_vector").
  std::vector<std::pair<std::string, torch::Tensor>> named_model_parameters();
  std::vector<std::pair<std::string, torch::Tensor>> named_lora_parameters();
  std::vector<torch::Tensor> lora_parameters();
  std::vector<torch::Tensor> block_lora_parameters(size_t index);
  bool has_adapters() const { return !lora_config_.target_modules.empty() && lora_attached_; }
  const LoraConfig& lora_config() const { return lora_config_; }

  void add_lora(const LoraConfig& config, uint64_t seed);
  void set_gradient_checkpointing(CheckpointingMode mode) { checkpointing_ = mode; }
  CheckpointingMode gradient_checkpointing() const { return checkpointing_; }
  // The preparation protocol's "make the input embeddings' output require grad" hook: LibTorch has
  // no forward hooks, so the embedding honours this flag instead.
  void set_input_require_grads(bool enabled) { input_require_grads_ = enabled; }
  bool input_require_grads() const { return input_require_grads_; }
  // The training forwards that follow hold sequences [first_global_row, first_global_row + batch) of
  // step `step`'s global batch. LoRA dropout masks are a function of these and of each token's layer,
  // projection and position (DropoutSource), never of the rank or the micro-batch split, so every
  // world size and accumulation split drops the same features of the same token.
  void set_dropout_rows(uint64_t seed, int64_t step, int64_t first_global_row);
  const DropoutSource& dropout_rows() const { return dropout_rows_; }

  // Runs block `index` on `hidden` (gathering its weights), drawing dropout masks for `dropout_rows`;
  // used by the checkpoint functions, which pass the rows of their first forward when recomputing.
  // output_value_read = false: the caller only back-propagates through the result (checkpoint
  // recomputation), so work that only feeds the value is skipped.
  torch::Tensor run_block(size_t index, const torch::Tensor& hidden, const DropoutSource& dropout_rows,
                          bool output_value_read = true);
  void prefetch_block(size_t index) { gatherer_->prefetch(index); }
  size_t block_count() const { return blocks_.size(); }
  // Block `index` and the model's communicator, for decoders that run the blocks themselves (KV-cached
  // generation, model/generation.h).
  DecoderBlockImpl& block(size_t index) { return *blocks_[index]; }
  cluster::Communicator& communicator() { return communicator_; }
  bool quantized_blocks() const { return quantized_blocks_; }

  // Allocator deltas measured while loading (zero unless the counting allocator is installed).
  struct LoadMemory {
    int64_t replicated = 0;   // norms, biases, this rank's embedding and LM head rows, as stored
    int64_t embeddings = 0;   // of which the embedding and LM head rows (once when tied)
    int64_t quantized = 0;    // this rank's quantized segments
    int64_t gather_pool = 0;  // gathered-block slots
  };
  const LoadMemory& load_memory() const { return load_memory_; }

  torch::Tensor embed_tokens;  // rows vocab_range() of the input embedding
  torch::Tensor final_norm;
  torch::Tensor lm_head;       // rows vocab_range() of the LM head; aliases embed_tokens when tied

 private:
  void ensure_attention_tables(int64_t sequence_length);

  shard::ModelConfig config_;
  shard::StoreHeader header_;
  cluster::Communicator& communicator_;
  std::vector<DecoderBlock> blocks_;
  std::unique_ptr<cluster::BlockGatherer> gatherer_;
  LoraConfig lora_config_;
  bool lora_attached_ = false;
  bool quantized_blocks_ = true;
  CheckpointingMode checkpointing_;
  bool input_require_grads_ = false;
  DropoutSource dropout_rows_;  // seed, step and first global row; the block fills in the rest
  LoadMemory load_memory_;
  shard::VocabRange vocab_range_;
  AttentionTables attention_tables_;  // for the sequence length of the last forward
};
TORCH_MODULE(LlamaModel);

// Dequantizes one tensor of a gathered block into a new fp32 tensor of `shape`: 4-bit codes times
// absmax (decoded first from its nested form under double quantization), or int8 rows times SCB/127.
torch::Tensor dequantize_gathered(const cluster::GatheredBlock& block, size_t tensor_index, kernels::QuantType type,
                                  at::IntArrayRef shape);

// HF-style RMSNorm: fp32 statistics, then weight * normed cast to the weight's dtype.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// Rotary inverse frequencies, llama3 scaling applied when configured.
torch::Tensor rotary_inverse_frequencies(const shard::ModelConfig& config);

}  // namespace qlora::model
