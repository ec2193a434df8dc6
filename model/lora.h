// LoRA adapters as PEFT defines them: out += B(A(dropout(x))) * scaling, A Kaiming-uniform
// (a = sqrt(5)) or gaussian (std 1/r), B zero, scaling alpha/r or alpha/sqrt(r) with rsLoRA.
#pragma once

#include <ATen/core/Generator.h>
#include <torch/torch.h>

#include <cstdint>
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
  std::string init = "kaiming";   // or "gaussian"
  double scaling() const;
  // The seven projection names selected by target_modules; throws std::invalid_argument naming an
  // unknown target.
  std::vector<std::string> resolved_targets() const;
};

class LoraAdapterImpl : public torch::nn::Module {
 public:
  LoraAdapterImpl(int64_t in_features, int64_t out_features, const LoraConfig& config, at::Generator& init_generator);
  // x: [..., in]; returns the update [..., out]. `dropout_generator` may be null when dropout is 0.
  torch::Tensor forward(const torch::Tensor& x, at::Generator* dropout_generator);

  torch::Tensor lora_A;  // [r, in]
  torch::Tensor lora_B;  // [out, r]
  double scaling;
  double dropout;
};
TORCH_MODULE(LoraAdapter);

}  // namespace qlora::model
