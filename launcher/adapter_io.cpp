// PEFT adapter export and import.
#include "launcher/adapter_io.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/atomic_file.h"
#include "common/json.h"
#include "launcher/errors.h"
#include "shard/safetensors.h"

namespace qlora::launcher {
namespace {

// A rank beyond any real adapter (the largest published ones use a few thousand) would ask for
// terabytes before any shape check could name the field.
constexpr int64_t kLargestRank = 65536;

// Ranks and scales a model can be built from; FormatError naming the field otherwise.
void check_lora_numbers(const model::LoraConfig& lora, const std::string& path) {
  auto check_rank = [&](const std::string& field, int64_t rank) {
    if (rank < 1 || rank > kLargestRank)
      throw FormatError(path + ": " + field + " is " + std::to_string(rank) + ", outside 1.." + std::to_string(kLargestRank),
                        "the adapter_config.json is damaged or not a LoRA adapter's");
  };
  auto check_alpha = [&](const std::string& field, double alpha) {
    if (!std::isfinite(alpha) || alpha <= 0)
      throw FormatError(path + ": " + field + " must be a positive number, not " + std::to_string(alpha),
                        "the adapter_config.json is damaged");
  };
  check_rank("r", lora.r);
  check_alpha("lora_alpha", lora.alpha);
  if (!(lora.dropout >= 0 && lora.dropout < 1)) throw FormatError(path + ": lora_dropout must be in [0, 1)");
  for (const auto& [key, rank] : lora.rank_pattern) check_rank("rank_pattern." + key, rank);
  for (const auto& [key, alpha] : lora.alpha_pattern) check_alpha("alpha_pattern." + key, alpha);
}

// adapter_config.json's LoRA settings; FormatError naming `path` for a field of the wrong kind.
model::LoraConfig read_lora_config(const Json& config, const std::string& path) {
  if (json_string_or(config, "peft_type", "", path) != "LORA")
    throw UserError(path + ": peft_type is not LORA", "only LoRA adapters are supported");
  model::LoraConfig lora;
  lora.r = json_int(config, "r", path);
  lora.alpha = json_double_or(config, "lora_alpha", 8.0, path);
  lora.dropout = json_double_or(config, "lora_dropout", 0.0, path);
  lora.use_rslora = json_bool_or(config, "use_rslora", false, path);
  lora.use_dora = json_bool_or(config, "use_dora", false, path);
  const auto targets = config.find("target_modules");
  if (targets == config.end()) throw FormatError(path + ": missing field \"target_modules\"");
  lora.target_modules.clear();
  for (const auto& target : targets->is_array() ? *targets : Json::array({*targets})) {
    if (!target.is_string()) throw FormatError(path + ": \"target_modules\" must hold module names (strings)");
    lora.target_modules.push_back(target.get<std::string>());
  }
  const auto ranks = config.find("rank_pattern");
  if (ranks != config.end() && ranks->is_object())
    for (const auto& [key, value] : ranks->items()) lora.rank_pattern[key] = json_as_int(value, path + ": rank_pattern." + key);
  const auto alphas = config.find("alpha_pattern");
  if (alphas != config.end() && alphas->is_object())
    for (const auto& [key, value] : alphas->items()) {
      if (!value.is_number()) throw FormatError(path + ": alpha_pattern." + key + " must be a number");
      lora.alpha_pattern[key] = value.get<double>();
    }
  check_lora_numbers(lora, path);
  return lora;
}

}  // namespace

void write_peft_adapter(const std::string& directory, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const model::LoraConfig& config, const std::string& base_model) {
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  if (error) throw UserError("cannot create adapter folder " + directory + ": " + error.message());
  shard::SafetensorsWriter writer;
  for (const auto& [name, tensor] : tensors) {
    auto contiguous = tensor.detach().to(torch::kFloat).contiguous();
    writer.add(name, kernels::DType::f32, contiguous.sizes().vec(), contiguous.data_ptr(),
               static_cast<size_t>(contiguous.numel()) * sizeof(float));
  }
  writer.set_metadata("format", "pt");
  writer.write(directory + "/adapter_model.safetensors");

  Json adapter_config;
  adapter_config["peft_type"] = "LORA";
  adapter_config["task_type"] = "CAUSAL_LM";
  adapter_config["base_model_name_or_path"] = base_model;
  adapter_config["r"] = config.r;
  adapter_config["lora_alpha"] = config.alpha;
  adapter_config["lora_dropout"] = config.dropout;
  adapter_config["target_modules"] = config.resolved_targets();
  adapter_config["bias"] = "none";
  adapter_config["fan_in_fan_out"] = false;
  adapter_config["use_rslora"] = config.use_rslora;
  adapter_config["use_dora"] = config.use_dora;
  adapter_config["init_lora_weights"] = config.init == "gaussian" ? Json("gaussian") : Json(true);
  adapter_config["modules_to_save"] = nullptr;
  adapter_config["layers_to_transform"] = nullptr;
  adapter_config["layers_pattern"] = nullptr;
  Json rank_pattern = Json::object();
  for (const auto& [key, rank] : config.rank_pattern) rank_pattern[key] = rank;
  Json alpha_pattern = Json::object();
  for (const auto& [key, alpha] : config.alpha_pattern) alpha_pattern[key] = alpha;
  adapter_config["rank_pattern"] = rank_pattern;
  adapter_config["alpha_pattern"] = alpha_pattern;
  adapter_config["inference_mode"] = true;
  adapter_config["revision"] = nullptr;
  adapter_config["peft_version"] = "0.13.2";
  write_file_atomically(directory + "/adapter_config.json", dump_json(adapter_config, 2) + "\n");
}

model::LoraConfig read_peft_adapter_config(const std::string& directory) {
  const std::string config_path = directory + "/adapter_config.json";
  std::ifstream config_file(config_path);
  if (!config_file) throw UserError("cannot read " + config_path, "point --adapter at a folder saved by qlora or PEFT");
  std::stringstream text;
  text << config_file.rdbuf();
  return read_lora_config(parse_json(text.str(), config_path), config_path);
}

void load_peft_adapter(const std::string& directory, model::LlamaModelImpl& model) {
  const std::string config_path = directory + "/adapter_config.json";
  const model::LoraConfig lora = read_peft_adapter_config(directory);
  try {
    model.add_lora(lora, 0);
  } catch (const std::invalid_argument& error) {
    throw UserError(config_path + ": " + error.what());
  }
  const std::string weights_path = directory + "/adapter_model.safetensors";
  auto weights = shard::SafetensorsFile::open(weights_path);
  torch::NoGradGuard no_grad;
  for (auto& [name, parameter] : model.named_lora_parameters()) {
    const auto* entry = weights->find(name);
    if (entry == nullptr) throw UserError(weights_path + ": missing tensor '" + name + "'");
    if (entry->shape != parameter.sizes().vec() || !entry->dtype_known ||
        (entry->dtype != kernels::DType::f32 && entry->dtype != kernels::DType::f16 && entry->dtype != kernels::DType::bf16))
      throw UserError(weights_path + ": tensor '" + name + "' has the wrong shape or dtype for this model");
    std::vector<float> values(static_cast<size_t>(parameter.numel()));
    kernels::convert_to_float(entry->dtype, weights->data(*entry), parameter.numel(), values.data());
    std::memcpy(parameter.data_ptr<float>(), values.data(), values.size() * sizeof(float));
  }
}

}  // namespace qlora::launcher
