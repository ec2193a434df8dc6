// Reads and validates Llama-family config.json fields and derives the tensor inventory from them.
#include "shard/model_config.h"

#include "shard/safetensors.h"

#include <cmath>
#include <fstream>
#include <sstream>

namespace qlora::shard {

const std::vector<std::string>& block_linear_names() {
  static const std::vector<std::string> names = {
      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  return names;
}

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

namespace {

// Fields every later layer divides by, allocates from or exponentiates: a zero, negative or absurd
// value here must end as a message naming the field, not as a crash or a petabyte allocation.
void check_ranges(const ModelConfig& config, bool head_dim_given, const std::string& source) {
  auto bounded = [&](const char* field, int64_t value, int64_t most) {
    if (value < 1 || value > most)
      throw FormatError(source + ": " + field + " is " + std::to_string(value) + ", outside 1.." +
                        std::to_string(most));
  };
  bounded("hidden_size", config.hidden_size, int64_t{1} << 20);
  bounded("intermediate_size", config.intermediate_size, int64_t{1} << 22);
  bounded("num_hidden_layers", config.num_hidden_layers, 4096);
  bounded("num_attention_heads", config.num_attention_heads, 4096);
  bounded("num_key_value_heads", config.num_key_value_heads, config.num_attention_heads);
  bounded("vocab_size", config.vocab_size, int64_t{1} << 24);
  bounded("max_position_embeddings", config.max_position_embeddings, int64_t{1} << 26);
  if (!head_dim_given && config.hidden_size % config.num_attention_heads != 0)
    throw FormatError(source + ": hidden_size (" + std::to_string(config.hidden_size) +
                      ") is not a multiple of num_attention_heads (" + std::to_string(config.num_attention_heads) +
                      ") and no head_dim is given");
  bounded("head_dim", config.head_dim, 4096);
  bounded("num_attention_heads x head_dim", config.num_attention_heads * config.head_dim, int64_t{1} << 20);
  auto positive = [&](const char* field, double value) {
    if (!(value > 0.0) || !std::isfinite(value))
      throw FormatError(source + ": " + field + " must be a positive finite number, not " + std::to_string(value));
  };
  positive("rms_norm_eps", config.rms_norm_eps);
  positive("rope_theta", config.rope_theta);
  if (!config.rope_scaling.type.empty()) {
    positive("rope_scaling.factor", config.rope_scaling.factor);
    positive("rope_scaling.low_freq_factor", config.rope_scaling.low_freq_factor);
    positive("rope_scaling.high_freq_factor", config.rope_scaling.high_freq_factor);
    bounded("rope_scaling.original_max_position_embeddings", config.rope_scaling.original_max_position_embeddings,
            int64_t{1} << 26);
  }
}

}  // namespace

ModelConfig ModelConfig::from_json(const Json& json, const std::string& source) {
  if (!json.is_object()) throw FormatError(source + ": the model config is not a JSON object");
  ModelConfig config;
  auto required = [&](const char* key) -> int64_t {
    if (!json.contains(key)) throw FormatError(source + ": missing field '" + key + "'");
    const Json& value = json.at(key);
    if (!value.is_number() || value.get<double>() <= 0)
      throw FormatError(source + ": field '" + key + "' must be a positive integer");
    return json_int(json, key, source);
  };
  config.architecture = json_string_or(json, "model_type", "llama", source);
  if (config.architecture != "llama" && config.architecture != "mistral" && config.architecture != "qwen2")
    throw FormatError(source + ": unsupported model_type '" + config.architecture +
                      "' (supported: llama, mistral, qwen2)");
  config.hidden_size = required("hidden_size");
  config.intermediate_size = required("intermediate_size");
  config.num_hidden_layers = required("num_hidden_layers");
  config.num_attention_heads = required("num_attention_heads");
  config.num_key_value_heads = json_int_or(json, "num_key_value_heads", config.num_attention_heads, source);
  config.head_dim = json_int_or(json, "head_dim", config.hidden_size / config.num_attention_heads, source);
  config.vocab_size = required("vocab_size");
  config.max_position_embeddings = json_int_or(json, "max_position_embeddings", 2048, source);
  config.rms_norm_eps = json_double_or(json, "rms_norm_eps", 1e-5, source);
  config.rope_theta = json_double_or(json, "rope_theta", 10000.0, source);
  config.tie_word_embeddings = json_bool_or(json, "tie_word_embeddings", false, source);
  config.attention_bias = json_bool_or(json, "attention_bias", config.architecture == "qwen2", source);
  config.torch_dtype = json_string_or(json, "torch_dtype", "bfloat16", source);
  // transformers 5 folds rope_theta and rope_scaling into one rope_parameters object.
  const std::string scaling_key =
      json.contains("rope_parameters") && json.at("rope_parameters").is_object() ? "rope_parameters" : "rope_scaling";
  const std::string scaling_source = source + ": " + scaling_key;
  if (scaling_key == "rope_parameters")
    config.rope_theta = json_double_or(json.at(scaling_key), "rope_theta", config.rope_theta, scaling_source);
  if (json.contains(scaling_key) && json.at(scaling_key).is_object()) {
    const Json& scaling = json.at(scaling_key);
    config.rope_scaling.type =
        json_string_or(scaling, "rope_type", json_string_or(scaling, "type", "", scaling_source), scaling_source);
    if (config.rope_scaling.type == "default") config.rope_scaling.type.clear();
    if (!config.rope_scaling.type.empty() && config.rope_scaling.type != "llama3")
      throw FormatError(source + ": unsupported rope_scaling type '" + config.rope_scaling.type + "'");
    config.rope_scaling.factor = json_double_or(scaling, "factor", 8.0, scaling_source);
    config.rope_scaling.low_freq_factor = json_double_or(scaling, "low_freq_factor", 1.0, scaling_source);
    config.rope_scaling.high_freq_factor = json_double_or(scaling, "high_freq_factor", 4.0, scaling_source);
    config.rope_scaling.original_max_position_embeddings =
        json_int_or(scaling, "original_max_position_embeddings", 8192, scaling_source);
  }
  check_ranges(config, json.contains("head_dim") && !json.at("head_dim").is_null(), source);
  if (config.num_attention_heads % config.num_key_value_heads != 0)
    throw FormatError(source + ": num_attention_heads (" + std::to_string(config.num_attention_heads) +
                      ") is not a multiple of num_key_value_heads (" +
                      std::to_string(config.num_key_value_heads) + ")");
  if (config.head_dim % 2 != 0) throw FormatError(source + ": head_dim must be even for rotary embeddings");
  return config;
}

Json ModelConfig::to_json() const {
  Json json = Json::object();
  json["model_type"] = architecture;
  json["architectures"] = Json::array({architecture == "qwen2"     ? "Qwen2ForCausalLM"
                                       : architecture == "mistral" ? "MistralForCausalLM"
                                                                    : "LlamaForCausalLM"});
  json["hidden_size"] = hidden_size;
  json["intermediate_size"] = intermediate_size;
  json["num_hidden_layers"] = num_hidden_layers;
  json["num_attention_heads"] = num_attention_heads;
  json["num_key_value_heads"] = num_key_value_heads;
  json["head_dim"] = head_dim;
  json["vocab_size"] = vocab_size;
  json["max_position_embeddings"] = max_position_embeddings;
  json["rms_norm_eps"] = rms_norm_eps;
  json["rope_theta"] = rope_theta;
  json["tie_word_embeddings"] = tie_word_embeddings;
  json["attention_bias"] = attention_bias;
  json["torch_dtype"] = torch_dtype;
  if (!rope_scaling.type.empty()) {
    Json scaling;
    scaling["rope_type"] = rope_scaling.type;
    scaling["factor"] = rope_scaling.factor;
    scaling["low_freq_factor"] = rope_scaling.low_freq_factor;
    scaling["high_freq_factor"] = rope_scaling.high_freq_factor;
    scaling["original_max_position_embeddings"] = rope_scaling.original_max_position_embeddings;
    json["rope_scaling"] = scaling;
  }
  return json;
}

std::vector<std::string> ModelConfig::tensor_names() const {
  std::vector<std::string> names = {"model.embed_tokens.weight"};
  for (int64_t layer = 0; layer < num_hidden_layers; ++layer) {
    const std::string prefix = layer_prefix(layer);
    names.push_back(prefix + "input_layernorm.weight");
    names.push_back(prefix + "post_attention_layernorm.weight");
    for (const auto& linear : block_linear_names()) {
      names.push_back(prefix + linear + ".weight");
      if (attention_bias && (linear == "self_attn.q_proj" || linear == "self_attn.k_proj" ||
                             linear == "self_attn.v_proj"))
        names.push_back(prefix + linear + ".bias");
    }
  }
  names.push_back("model.norm.weight");
  if (!tie_word_embeddings) names.push_back("lm_head.weight");
  return names;
}

namespace {
bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

std::vector<int64_t> ModelConfig::expected_shape(const std::string& name) const {
  const int64_t q_width = num_attention_heads * head_dim;
  const int64_t kv_width = num_key_value_heads * head_dim;
  if (name == "model.embed_tokens.weight" || name == "lm_head.weight") return {vocab_size, hidden_size};
  if (ends_with(name, "norm.weight")) return {hidden_size};
  if (ends_with(name, "q_proj.weight")) return {q_width, hidden_size};
  if (ends_with(name, "k_proj.weight") || ends_with(name, "v_proj.weight")) return {kv_width, hidden_size};
  if (ends_with(name, "q_proj.bias")) return {q_width};
  if (ends_with(name, "k_proj.bias") || ends_with(name, "v_proj.bias")) return {kv_width};
  if (ends_with(name, "o_proj.weight")) return {hidden_size, q_width};
  if (ends_with(name, "gate_proj.weight") || ends_with(name, "up_proj.weight"))
    return {intermediate_size, hidden_size};
  if (ends_with(name, "down_proj.weight")) return {hidden_size, intermediate_size};
  return {};
}

bool ModelConfig::is_block_linear(const std::string& name) {
  if (name.rfind("model.layers.", 0) != 0 || !ends_with(name, ".weight")) return false;
  for (const auto& linear : block_linear_names())
    if (ends_with(name, "." + linear + ".weight")) return true;
  return false;
}

int64_t ModelConfig::parameter_count() const {
  int64_t total = 0;
  for (const auto& name : tensor_names()) {
    int64_t numel = 1;
    for (int64_t dim : expected_shape(name)) numel *= dim;
    total += numel;
  }
  return total;
}

}  // namespace qlora::shard

namespace qlora::shard {

ModelConfig read_config_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw FormatError(path + ": cannot read the model config");
  std::stringstream text;
  text << file.rdbuf();
  return ModelConfig::from_json(parse_json(text.str(), path), path);
}

}  // namespace qlora::shard
