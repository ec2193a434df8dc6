// The architecture hyper-parameters of a Llama-family model, as Hugging Face's config.json names
// them, plus the reader that validates them. Lives in shard/ because every format carries one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/json.h"

namespace qlora::shard {

struct RopeScaling {
  std::string type;                 // "" (none) or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture = "llama";   // model_type: llama, mistral, qwen2
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;          // qwen2 has q/k/v biases
  std::string torch_dtype = "bfloat16";

  // Throws FormatError (naming `source`) when a field is missing or inconsistent.
  static ModelConfig from_json(const qlora::Json& json, const std::string& source);
  qlora::Json to_json() const;

  // Hugging Face tensor names of this model, and the shape each must have.
  std::vector<std::string> tensor_names() const;
  std::vector<int64_t> expected_shape(const std::string& tensor_name) const;
  // Linear weights of the decoder blocks: the ones quantized to 4 bits.
  static bool is_block_linear(const std::string& tensor_name);
  int64_t parameter_count() const;
};

// Reads and validates a Hugging Face config.json file; FormatError names the file.
ModelConfig read_config_file(const std::string& path);

// The seven projections of a decoder block, in the order blocks store and gather them.
const std::vector<std::string>& block_linear_names();     // "self_attn.q_proj", ..., "mlp.down_proj"
std::string layer_prefix(int64_t layer);                  // "model.layers.<layer>."

}  // namespace qlora::shard
