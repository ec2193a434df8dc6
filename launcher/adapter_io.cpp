// PEFT adapter export.
#include "launcher/adapter_io.h"

#include <filesystem>
#include <fstream>

#include "common/atomic_file.h"
#include "launcher/errors.h"
#include "shard/json.h"
#include "shard/safetensors.h"

namespace qlora::launcher {

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

  shard::Json adapter_config;
  adapter_config["peft_type"] = "LORA";
  adapter_config["task_type"] = "CAUSAL_LM";
  adapter_config["base_model_name_or_path"] = base_model;
  adapter_config["r"] = config.r;
  adapter_config["lora_alpha"] = config.alpha;
  adapter_config["lora_dropout"] = config.dropout;
  shard::Json::Array targets;
  for (const auto& target : config.resolved_targets()) targets.emplace_back(target);
  adapter_config["target_modules"] = targets;
  adapter_config["bias"] = "none";
  adapter_config["fan_in_fan_out"] = false;
  adapter_config["use_rslora"] = config.use_rslora;
  adapter_config["use_dora"] = false;
  adapter_config["init_lora_weights"] = config.init == "gaussian" ? shard::Json("gaussian") : shard::Json(true);
  adapter_config["modules_to_save"] = nullptr;
  adapter_config["layers_to_transform"] = nullptr;
  adapter_config["layers_pattern"] = nullptr;
  shard::Json rank_pattern = shard::Json::Object{};
  for (const auto& [key, rank] : config.rank_pattern) rank_pattern[key] = rank;
  shard::Json alpha_pattern = shard::Json::Object{};
  for (const auto& [key, alpha] : config.alpha_pattern) alpha_pattern[key] = alpha;
  adapter_config["rank_pattern"] = rank_pattern;
  adapter_config["alpha_pattern"] = alpha_pattern;
  adapter_config["inference_mode"] = true;
  adapter_config["revision"] = nullptr;
  adapter_config["peft_version"] = "0.13.2";
  write_file_atomically(directory + "/adapter_config.json", adapter_config.dump(2) + "\n");
}

}  // namespace qlora::launcher
