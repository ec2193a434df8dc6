// Adapters in PEFT's on-disk format, both ways: adapter_model.safetensors (PEFT's key names, adapter
// name removed) and adapter_config.json. qlora writes them (each file atomically) and reads back its
// own or PEFT's.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "model/llama.h"
#include "model/lora.h"

namespace qlora::launcher {

void write_peft_adapter(const std::string& directory, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                        const model::LoraConfig& config, const std::string& base_model);

// The LoRA settings of `directory`/adapter_config.json (r, alpha, rsLoRA, targets, rank and alpha
// patterns). Throws UserError naming the file when it is missing, unreadable or not a LoRA adapter.
model::LoraConfig read_peft_adapter_config(const std::string& directory);

// Attaches the adapter saved in `directory` (from qlora or PEFT) to `model`. Throws UserError naming
// the file on a mismatch.
void load_peft_adapter(const std::string& directory, model::LlamaModelImpl& model);

}  // namespace qlora::launcher
