// LoRA adapters as PEFT defines them: out += B(A(dropout(x))) * scaling, A Kaiming-uniform
// (a = sqrt(5)) or gaussian (std 1/r), B zero, scaling alpha/r or alpha/sqrt(r) with rsLoRA; and
// DoRA (PEFT's use_dora), which adds a trainable magnitude per output row.
#pragma once

#include <functional>

#include <ATen/core/Generator.h>
#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qlora::model {

struct LoraConfig {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  // Hugging Face module names (q_proj ... down_proj) or "all-linear".
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  bool use_rslora = false;
  // DoRA: each adapted projection also learns m (one value per output row) and computes
  // (m / ||W + scaling B A||_row) (W x + scaling B A x), the norm treated as a constant.
  bool use_dora = false;
  std::string init = "kaiming";   // or "gaussian"
  // PEFT's rank_pattern / alpha_pattern: a key matches a module whose name equals it or ends with
  // "." + key (e.g. "down_proj" or "model.layers.0.self_attn.q_proj"); the longest match wins.
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  double scaling() const;
  // The configuration of one module (its name as in "model.layers.3.mlp.down_proj").
  LoraConfig for_module(const std::string& module_name) const;
  // The seven projection names selected by target_modules; throws std::invalid_argument naming an
  // unknown target.
  std::vector<std::string> resolved_targets() const;
};

// What an adapter's dropout mask is a function of. Every token's mask is a counter-based hash of
// (seed, step, its sequence's index in the global batch, layer, projection, position, feature), so
// any world size and any micro-batch split drop the same features of the same token, and a
// checkpointed block recomputed in backward draws the mask its first forward drew.
struct DropoutSource {
  uint64_t seed = 0;
  int64_t step = 0;               // optimizer step
  int64_t first_global_row = 0;   // index in the global batch of the first sequence of the input
  int64_t sequence_length = 1;    // input rows per sequence
  int64_t layer = 0;
  int64_t projection = 0;         // index in the block's projection order (q, k, v, o, gate, up, down)
};

// The inverted-dropout mask of an input of [rows, features] (rows = sequences x sequence_length):
// fp32, each element 1/keep with probability keep, else 0.
torch::Tensor dropout_mask(const DropoutSource& source, int64_t rows, int64_t features, double keep);

class LoraAdapterImpl : public torch::nn::Module {
 public:
  LoraAdapterImpl(int64_t in_features, int64_t out_features, const LoraConfig& config, at::Generator& init_generator);
  // Adds the update B(A(dropout(x))) * scaling into `output` ([rows, out], the frozen product) in
  // place: one GEMM with beta 1 and alpha = scaling, so neither the [rows, out] update nor its scaled
  // copy is materialised. x: [rows, in]; in training with dropout > 0, x is first multiplied by
  // dropout_mask(dropout_source, ...).
  void add_update(torch::Tensor& output, const torch::Tensor& x, const DropoutSource& dropout_source);

  // DoRA -------------------------------------------------------------------------------------------
  bool use_dora() const { return lora_magnitude_vector.defined(); }
  // Sets the magnitudes to the row norms of weight + scaling B A (PEFT's initialisation; B is zero
  // unless an adapter was loaded, so the base weight's norms). weight: the fp32 [out, in] base.
  void initialise_magnitude(const torch::Tensor& weight);
  // ||weight + scaling B A|| per output row, without gradient (the DoRA paper's section 4.3).
  torch::Tensor weight_norm(const torch::Tensor& weight) const;
  // The projection's output without its bias, as PEFT's DoRA computes it. `weight` is the
  // dequantized base (read only for the norm here; the caller drops it after this call) and
  // `frozen_product(input)` is input W^T, differentiable in input, keeping no copy of W. Without
  // dropout (or in evaluation): (m / norm) * (W x + scaling B A x). With dropout in training, PEFT
  // scales the base product of the dropped input: W x + (m / norm - 1) * W d(x) + (m / norm) *
  // scaling * B A d(x), d(x) the dropped input.
  using FrozenProduct = std::function<torch::Tensor(const torch::Tensor& input)>;
  torch::Tensor dora_output(const torch::Tensor& x, const torch::Tensor& weight, const FrozenProduct& frozen_product,
                            const DropoutSource& dropout_source);

  torch::Tensor lora_A;  // [r, in]
  torch::Tensor lora_B;  // [out, r]
  torch::Tensor lora_magnitude_vector;  // [out], DoRA only (undefined for plain LoRA)
  double scaling;
  double dropout;

 private:
  // x with this step's dropout mask applied in training (x itself otherwise), in the adapter's dtype.
  torch::Tensor dropped_input(const torch::Tensor& x, const DropoutSource& dropout_source) const;
};
TORCH_MODULE(LoraAdapter);

// Row norms of weight + scaling * lora_B lora_A ([out, in] + [out, r][r, in]) without forming the
// [out, in] product: ||W||^2 + 2 scaling rowsum((W A^T) .* B) + scaling^2 rowsum((B (A A^T)) .* B).
// Costs 2 out in r multiply-adds like forming B A, but no weight-sized temporary.
torch::Tensor dora_weight_norm(const torch::Tensor& weight, const torch::Tensor& lora_A, const torch::Tensor& lora_B,
                               double scaling);

// The fp32 weight a merged model holds for a base weight [out, in] and its adapter: W + scaling B A
// for LoRA; for DoRA (m / ||W + scaling B A||_row) * (W + scaling B A), PEFT's merge. For `qlora merge`.
torch::Tensor merged_weight(const torch::Tensor& base_fp32, const LoraAdapterImpl& adapter);

}  // namespace qlora::model
