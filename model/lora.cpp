// LoRA adapter initialisation and its in-place update of a frozen product.
#include "model/lora.h"

#include <cmath>
#include <stdexcept>

namespace qlora::model {

double LoraConfig::scaling() const {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

namespace {
template <typename Value>
const Value* longest_match(const std::map<std::string, Value>& pattern, const std::string& module_name) {
  const Value* found = nullptr;
  size_t found_length = 0;
  for (const auto& [key, value] : pattern) {
    const bool matches = module_name == key || (module_name.size() > key.size() &&
                                                module_name.compare(module_name.size() - key.size(), key.size(), key) == 0 &&
                                                module_name[module_name.size() - key.size() - 1] == '.');
    if (matches && key.size() >= found_length) {
      found = &value;
      found_length = key.size();
    }
  }
  return found;
}
}  // namespace

LoraConfig LoraConfig::for_module(const std::string& module_name) const {
  LoraConfig module = *this;
  if (const int64_t* rank = longest_match(rank_pattern, module_name)) module.r = *rank;
  if (const double* alpha = longest_match(alpha_pattern, module_name)) module.alpha = *alpha;
  return module;
}

std::vector<std::string> LoraConfig::resolved_targets() const {
  static const std::vector<std::string> all = {"q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};
  std::vector<std::string> resolved;
  for (const auto& target : target_modules) {
    if (target == "all-linear") return all;
    bool known = false;
    for (const auto& name : all) known = known || name == target;
    if (!known)
      throw std::invalid_argument("LoRA target module '" + target +
                                  "' does not exist in this model (known: q_proj, k_proj, v_proj, o_proj, "
                                  "gate_proj, up_proj, down_proj, all-linear)");
    resolved.push_back(target);
  }
  return resolved;
}

LoraAdapterImpl::LoraAdapterImpl(int64_t in_features, int64_t out_features, const LoraConfig& config,
                                 at::Generator& init_generator)
    : scaling(config.scaling()), dropout(config.dropout) {
  torch::NoGradGuard no_grad;
  auto a = torch::empty({config.r, in_features}, torch::kFloat);
  if (config.init == "gaussian") {
    a.normal_(0.0, 1.0 / static_cast<double>(config.r), init_generator);
  } else {
    // kaiming_uniform_(a=sqrt(5)) on [r, in]: gain sqrt(2/(1+5)), bound = gain*sqrt(3/fan_in) = 1/sqrt(in).
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    a.uniform_(-bound, bound, init_generator);
  }
  lora_A = register_parameter("lora_A", a);
  lora_B = register_parameter("lora_B", torch::zeros({out_features, config.r}, torch::kFloat));
}

void LoraAdapterImpl::add_update(torch::Tensor& output, const torch::Tensor& x, at::Generator* dropout_generator) {
  torch::Tensor input = x.to(lora_A.scalar_type());
  if (dropout > 0.0 && is_training()) {
    const double keep = 1.0 - dropout;
    auto mask = torch::empty_like(input);
    if (dropout_generator != nullptr)
      mask.bernoulli_(keep, *dropout_generator);
    else
      mask.bernoulli_(keep);
    input = input * mask / keep;
  }
  output.addmm_(torch::matmul(input, lora_A.t()), lora_B.t(), /*beta=*/1.0, /*alpha=*/scaling);
}

}  // namespace qlora::model
