// Evaluation and PEFT adapter loading.
#include "launcher/evaluate.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "launcher/data_loading.h"
#include "launcher/demo.h"
#include "launcher/errors.h"
#include "launcher/train.h"
#include "prepare/prepare.h"
#include "shard/json.h"
#include "shard/safetensors.h"

namespace qlora::launcher {

double mean_token_loss(model::LlamaModelImpl& model, const data::BatchSampler& windows, int64_t window_count,
                       int64_t rows_per_forward, cluster::Communicator& communicator) {
  const int world = communicator.size();
  const int64_t per_rank = window_count / world;
  if (per_rank == 0) return std::nan("");
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  double loss_sum = 0.0;
  double token_count = 0.0;
  const auto [inputs, targets] = windows.sequential(per_rank * world, communicator.rank(), world);
  for (int64_t row = 0; row < per_rank; row += rows_per_forward) {
    const int64_t rows = std::min(rows_per_forward, per_rank - row);
    loss_sum += model.next_token_loss(inputs.narrow(0, row, rows), targets.narrow(0, row, rows), /*sum=*/true)
                    .item<double>();
    token_count += static_cast<double>(targets.narrow(0, row, rows).numel());
  }
  if (was_training) model.train();
  // fp32 sums: token counts stay exact below 2^24 per reduction; loss sums keep ~7 digits.
  float totals[2] = {static_cast<float>(loss_sum), static_cast<float>(token_count)};
  communicator.all_reduce(totals, 2, cluster::ReduceOp::sum);
  return static_cast<double>(totals[0]) / static_cast<double>(totals[1]);
}

void load_peft_adapter(const std::string& directory, model::LlamaModelImpl& model) {
  const std::string config_path = directory + "/adapter_config.json";
  std::ifstream config_file(config_path);
  if (!config_file) throw UserError("cannot read " + config_path, "point --adapter at a folder saved by qlora or PEFT");
  std::stringstream text;
  text << config_file.rdbuf();
  model::LoraConfig lora;
  try {
    const auto config = shard::Json::parse(text.str());
    if (config.get_string("peft_type", "") != "LORA")
      throw UserError(config_path + ": peft_type is not LORA", "only LoRA adapters are supported");
    lora.r = config.at("r").as_int();
    lora.alpha = config.get_double("lora_alpha", 8.0);
    lora.dropout = config.get_double("lora_dropout", 0.0);
    lora.use_rslora = config.get_bool("use_rslora", false);
    if (config.get_bool("use_dora", false)) throw UserError(config_path + ": DoRA adapters are not supported");
    lora.target_modules.clear();
    const auto& targets = config.at("target_modules");
    if (targets.is_string()) {
      lora.target_modules.push_back(targets.as_string());
    } else {
      for (const auto& target : targets.as_array()) lora.target_modules.push_back(target.as_string());
    }
    if (config.contains("rank_pattern") && config.at("rank_pattern").is_object())
      for (const auto& [key, value] : config.at("rank_pattern").as_object()) lora.rank_pattern[key] = value.as_int();
    if (config.contains("alpha_pattern") && config.at("alpha_pattern").is_object())
      for (const auto& [key, value] : config.at("alpha_pattern").as_object()) lora.alpha_pattern[key] = value.as_double();
  } catch (const shard::JsonError& error) {
    throw UserError(config_path + ": " + error.what());
  }
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

EvalResult run_evaluation(const EvalOptions& options, cluster::Communicator& communicator) {
  std::unique_ptr<shard::ModelStore> store;
  std::unique_ptr<data::BatchSampler> windows;
  model::LlamaModel model{nullptr};
  int64_t window_count = 0;
  run_collectively(communicator, [&] {
    if (options.sequence_length < 2) throw UserError("--seq-len must be at least 2");
    if (options.max_windows < 1 || options.micro_batch < 1) throw UserError("--windows and --micro-batch must be positive");
    store = shard::ModelStore::open(options.model_path);
  });
  const auto tokens = load_data_tokens(options.data_path, *store, communicator, true);
  run_collectively(communicator, [&] {
    windows = std::make_unique<data::BatchSampler>(tokens, 0, tokens->size(), options.sequence_length, 1, 0);
    window_count = std::min(options.max_windows, windows->window_count()) / communicator.size() * communicator.size();
    if (window_count == 0)
      throw UserError("the evaluation text is too short for one window of --seq-len + 1 tokens per rank");
    check_world_fits(*store, communicator.size());
    model = model::LlamaModel(*store, communicator);
    prepare::PrepareOptions prepare_options;
    prepare_options.use_gradient_checkpointing = false;
    prepare::prepare_model_for_kbit_training(*model, prepare_options);
    if (!options.adapter_dir.empty()) load_peft_adapter(options.adapter_dir, *model);
  });
  EvalResult result;
  result.loss = mean_token_loss(*model, *windows, window_count, options.micro_batch, communicator);
  result.perplexity = std::exp(result.loss);
  result.windows = window_count;
  result.tokens = window_count * options.sequence_length;
  return result;
}

}  // namespace qlora::launcher
