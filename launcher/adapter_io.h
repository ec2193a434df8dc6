// Writes a trained adapter in PEFT's on-disk format: adapter_model.safetensors (PEFT's key names,
// adapter name removed) and adapter_config.json, each written atomically.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "model/lora.h"

namespace qlora::launcher {

void write_peft_adapter(const std::string& directory, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const model::LoraConfig& config, const std::string& base_model);


}  // namespace qlora::launcher
