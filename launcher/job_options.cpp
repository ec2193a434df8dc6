// Declarations and reading of the options train and plan share.
#include "launcher/job_options.h"

#include <sstream>
#include <utility>

#include "common/errors.h"

namespace po = boost::program_options;

namespace qlora::launcher {
namespace {

std::pair<std::string, std::string> split_assignment(const std::string& item, const std::string& option) {
  const auto equals = item.find('=');
  if (equals == std::string::npos || equals == 0 || equals + 1 == item.size())
    throw UserError(option + ": '" + item + "' is not MODULE=VALUE", "e.g. " + option + " down_proj=16");
  return {item.substr(0, equals), item.substr(equals + 1)};
}

void read_patterns(const po::variables_map& values, model::LoraConfig& lora) {
  for (const auto& item : split_list(values["lora-rank-pattern"].as<std::string>())) {
    const auto [key, value] = split_assignment(item, "--lora-rank-pattern");
    try {
      lora.rank_pattern[key] = std::stoll(value);
    } catch (const std::exception&) {
      throw UserError("--lora-rank-pattern: '" + value + "' is not an integer rank", "e.g. down_proj=16");
    }
  }
  for (const auto& item : split_list(values["lora-alpha-pattern"].as<std::string>())) {
    const auto [key, value] = split_assignment(item, "--lora-alpha-pattern");
    try {
      lora.alpha_pattern[key] = std::stod(value);
    } catch (const std::exception&) {
      throw UserError("--lora-alpha-pattern: '" + value + "' is not a number", "e.g. down_proj=32");
    }
  }
}

}  // namespace

void add_model_option(po::options_description& group) {
  group.add_options()
      ("model", po::value<std::string>(), "4-bit model store (qlora convert); omitted: the embedded synthetic demo model");
}

void add_batch_options(po::options_description& group) {
  const TrainOptions defaults;
  group.add_options()
      ("global-batch", po::value<int64_t>()->default_value(defaults.global_batch), "sequences per step over all ranks")
      ("seq-len", po::value<int64_t>()->default_value(defaults.sequence_length), "tokens per sequence")
      ("micro-batch", po::value<int64_t>()->default_value(defaults.micro_batch),
       "sequences per rank per forward; gradients accumulate over global-batch / ranks / micro-batch (0: no accumulation)");
}

void add_lora_options(po::options_description& group) {
  const model::LoraConfig defaults;
  group.add_options()
      ("lora-r", po::value<int64_t>()->default_value(defaults.r), "adapter rank")
      ("lora-alpha", po::value<double>()->default_value(defaults.alpha), "scaling numerator (alpha / r)")
      ("lora-dropout", po::value<double>()->default_value(defaults.dropout), "dropout on the adapter input")
      ("lora-targets", po::value<std::string>()->default_value("all-linear"),
       "comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all-linear")
      ("lora-init", po::value<std::string>()->default_value(defaults.init), "kaiming | gaussian")
      ("use-rslora", po::bool_switch(), "scale by alpha / sqrt(r)")
      ("lora-rank-pattern", po::value<std::string>()->default_value(""),
       "per-module ranks, e.g. down_proj=16,model.layers.0.self_attn.q_proj=4")
      ("lora-alpha-pattern", po::value<std::string>()->default_value(""), "per-module alphas, same syntax");
  // DoRA (PEFT's use_dora).
  group.add_options()
      ("use-dora", po::bool_switch(), "DoRA: also learn a magnitude per output row (PEFT's use_dora)");
}

void add_memory_options(po::options_description& group) {
  const TrainOptions defaults;
  group.add_options()
      ("checkpointing", po::value<std::string>()->default_value(checkpointing_name(defaults.prepare)),
       "reentrant | non-reentrant | off")
      ("keep-embeddings-16bit", po::bool_switch(), "do not upcast embeddings and LM head to fp32 (saves memory)")
      ("gather-slots", po::value<int>()->default_value(defaults.gather_slots), "gathered 4-bit blocks kept in memory");
}

void read_job_options(const po::variables_map& values, TrainOptions& options) {
  options.model_path = values.count("model") ? values["model"].as<std::string>() : "";
  options.global_batch = values["global-batch"].as<int64_t>();
  options.sequence_length = values["seq-len"].as<int64_t>();
  options.micro_batch = values["micro-batch"].as<int64_t>();
  options.lora.r = values["lora-r"].as<int64_t>();
  options.lora.alpha = values["lora-alpha"].as<double>();
  options.lora.dropout = values["lora-dropout"].as<double>();
  options.lora.target_modules = split_list(values["lora-targets"].as<std::string>());
  options.lora.init = values["lora-init"].as<std::string>();
  options.lora.use_rslora = values["use-rslora"].as<bool>();
  read_patterns(values, options.lora);
  options.lora.use_dora = values["use-dora"].as<bool>();
  const std::string checkpointing = values["checkpointing"].as<std::string>();
  if (checkpointing != "reentrant" && checkpointing != "non-reentrant" && checkpointing != "off")
    throw UserError("--checkpointing must be reentrant, non-reentrant or off");
  options.prepare.use_gradient_checkpointing = checkpointing != "off";
  options.prepare.use_reentrant = checkpointing == "reentrant";
  options.prepare.keep_embeddings_16bit = values["keep-embeddings-16bit"].as<bool>();
  options.gather_slots = values["gather-slots"].as<int>();
}

void add_example_options(po::options_description& group) {
  group.add_options()
      ("data-format", po::value<std::string>()->default_value("auto"),
       "instruction data (.jsonl/.json): auto | text | messages | prompt-completion | alpaca | sharegpt")
      ("train-on", po::value<std::string>()->default_value("auto"),
       "tokens in the loss: auto (completion for prompt-completion and Alpaca, else all) | all | completion | assistant")
      ("chat-template", po::value<std::string>()->default_value(""),
       "Jinja chat template file for conversations (default: the model's)");
}

void read_example_options(const po::variables_map& values, ExampleOptions& options) {
  options.format = data::parse_data_format(values["data-format"].as<std::string>());
  options.train_on = data::parse_train_on(values["train-on"].as<std::string>());
  options.chat_template_path = values["chat-template"].as<std::string>();
}

std::string checkpointing_name(const prepare::PrepareOptions& prepare) {
  if (!prepare.use_gradient_checkpointing) return "off";
  return prepare.use_reentrant ? "reentrant" : "non-reentrant";
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ','))
    if (!item.empty()) items.push_back(item);
  return items;
}

}  // namespace qlora::launcher
