// LoRA adapter initialisation, its in-place update of a frozen product, DoRA's magnitude-scaled
// output and weight norms, and the dropout masks that are a function of each token's place in the
// global batch.
#include "model/lora.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cassert>
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
  // The magnitudes depend on the base weight, which the adapter never holds: the block that owns the
  // weight sets them (initialise_magnitude) right after building the adapter, or a loader copies them.
  if (config.use_dora)
    lora_magnitude_vector = register_parameter("lora_magnitude_vector", torch::zeros({out_features}, torch::kFloat));
}

namespace {
constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ull;

// splitmix64's output function: a bijection under which consecutive inputs look independent.
uint64_t mix64(uint64_t value) {
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

uint64_t combine(uint64_t key, int64_t coordinate) {
  return mix64(key ^ mix64(static_cast<uint64_t>(coordinate) + kGoldenGamma));
}
}  // namespace

torch::Tensor dropout_mask(const DropoutSource& source, int64_t rows, int64_t features, double keep) {
  assert(keep > 0.0 && keep <= 1.0);
  assert(source.sequence_length > 0 && rows % source.sequence_length == 0);
  auto mask = torch::empty({rows, features}, torch::kFloat);
  float* values = mask.data_ptr<float>();
  const float kept = static_cast<float>(1.0 / keep);
  // A 32-bit uniform u keeps its feature when u < threshold, with probability threshold / 2^32 = keep.
  const auto threshold = static_cast<uint64_t>(std::llround(keep * 4294967296.0));
  const uint64_t projection_key =
      combine(combine(combine(mix64(source.seed + kGoldenGamma), source.step), source.layer), source.projection);
  const int64_t pairs = features / 2;
  // Each token's features are the splitmix64 stream of its own key, two 32-bit draws per output,
  // so a row's values do not depend on which rows share the call or on how threads split them.
  const int64_t rows_per_task = std::max<int64_t>(1, 32768 / std::max<int64_t>(features, 1));
  at::parallel_for(0, rows, rows_per_task, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t sequence = source.first_global_row + row / source.sequence_length;
      const uint64_t token_key = combine(combine(projection_key, sequence), row % source.sequence_length);
      float* out = values + row * features;
      for (int64_t pair = 0; pair < pairs; ++pair) {
        const uint64_t bits = mix64(token_key + static_cast<uint64_t>(pair + 1) * kGoldenGamma);
        out[2 * pair] = (bits & 0xffffffffull) < threshold ? kept : 0.0f;
        out[2 * pair + 1] = (bits >> 32) < threshold ? kept : 0.0f;
      }
      if (features % 2 != 0) {
        const uint64_t bits = mix64(token_key + static_cast<uint64_t>(pairs + 1) * kGoldenGamma);
        out[features - 1] = (bits & 0xffffffffull) < threshold ? kept : 0.0f;
      }
    }
  });
  return mask;
}

torch::Tensor LoraAdapterImpl::dropped_input(const torch::Tensor& x, const DropoutSource& dropout_source) const {
  torch::Tensor input = x.to(lora_A.scalar_type());
  if (dropout > 0.0 && is_training()) {
    // The hash runs on the host (the model computes on CPUs); .to() is a no-op there.
    input = input * dropout_mask(dropout_source, input.size(0), input.size(1), 1.0 - dropout).to(input.options());
  }
  return input;
}

void LoraAdapterImpl::add_update(torch::Tensor& output, const torch::Tensor& x, const DropoutSource& dropout_source) {
  output.addmm_(torch::matmul(dropped_input(x, dropout_source), lora_A.t()), lora_B.t(), /*beta=*/1.0,
                /*alpha=*/scaling);
}

torch::Tensor dora_weight_norm(const torch::Tensor& weight, const torch::Tensor& lora_A, const torch::Tensor& lora_B,
                               double scaling) {
  torch::NoGradGuard no_grad;
  const auto w = weight.to(torch::kFloat);
  const auto a = lora_A.detach().to(torch::kFloat);
  const auto b = lora_B.detach().to(torch::kFloat);
  auto squared = w.norm(2, {1}).pow(2);
  squared.add_((torch::matmul(w, a.t()) * b).sum(1), 2.0 * scaling);
  squared.add_((torch::matmul(b, torch::matmul(a, a.t())) * b).sum(1), scaling * scaling);
  // Rounding can take an exactly cancelling row a hair below zero.
  return squared.clamp_min_(0.0).sqrt_();
}

torch::Tensor LoraAdapterImpl::weight_norm(const torch::Tensor& weight) const {
  return dora_weight_norm(weight, lora_A, lora_B, scaling);
}

void LoraAdapterImpl::initialise_magnitude(const torch::Tensor& weight) {
  assert(use_dora());
  torch::NoGradGuard no_grad;
  lora_magnitude_vector.copy_(weight_norm(weight));
}

torch::Tensor LoraAdapterImpl::dora_output(const torch::Tensor& x, const torch::Tensor& weight,
                                           const FrozenProduct& frozen_product, const DropoutSource& dropout_source) {
  assert(use_dora());
  // Only the magnitude receives a gradient through the scale; the norm is a constant.
  const auto scale = (lora_magnitude_vector / weight_norm(weight)).view({1, -1});
  if (dropout > 0.0 && is_training()) {
    const auto dropped = dropped_input(x, dropout_source);
    const auto update = torch::matmul(torch::matmul(dropped, lora_A.t()), lora_B.t()) * scaling;
    return frozen_product(x) + (scale - 1.0) * frozen_product(dropped) + scale * update;
  }
  // W x + scaling B A x in one buffer (the GEMM adds into the frozen product), then scaled per row.
  auto combined = frozen_product(x);
  combined.addmm_(torch::matmul(x.to(lora_A.scalar_type()), lora_A.t()), lora_B.t(), /*beta=*/1.0,
                  /*alpha=*/scaling);
  return combined * scale;
}

torch::Tensor merged_weight(const torch::Tensor& base_fp32, const LoraAdapterImpl& adapter) {
  torch::NoGradGuard no_grad;
  auto merged = base_fp32.to(torch::kFloat).addmm(adapter.lora_B.detach(), adapter.lora_A.detach(), /*beta=*/1.0,
                                                  /*alpha=*/adapter.scaling);
  if (!adapter.use_dora()) return merged;
  // PEFT's merge takes the norm of the merged rows directly: the weight is formed here anyway.
  const auto norm = merged.norm(2, {1}, /*keepdim=*/true);
  return merged.mul_(adapter.lora_magnitude_vector.detach().view({-1, 1}) / norm);
}

}  // namespace qlora::model
