// PEFT's preparation protocol step by step: detect, freeze, upcast, checkpoint (+ input hook).
#include "prepare/prepare.h"

#include <sstream>

#include "common/format.h"
#include "common/log.h"

namespace qlora::prepare {

std::string method_name(QuantizationMethod method) {
  switch (method) {
    case QuantizationMethod::bnb_4bit: return "bnb-4bit";
    case QuantizationMethod::bnb_8bit: return "bnb-8bit";
    case QuantizationMethod::gptq: return "gptq";
    case QuantizationMethod::aqlm: return "aqlm";
    case QuantizationMethod::eetq: return "eetq";
    case QuantizationMethod::hqq: return "hqq";
    case QuantizationMethod::torchao: return "torchao";
    case QuantizationMethod::awq: return "awq";
    case QuantizationMethod::none: return "none";
  }
  return "none";
}

QuantizationMethod detect_quantization_method(const shard::StoreHeader& header) {
  for (auto method : {QuantizationMethod::bnb_4bit, QuantizationMethod::bnb_8bit, QuantizationMethod::gptq,
                      QuantizationMethod::aqlm, QuantizationMethod::eetq, QuantizationMethod::hqq,
                      QuantizationMethod::torchao, QuantizationMethod::awq, QuantizationMethod::none})
    if (header.quant_method == method_name(method)) return method;
  throw PrepareError("unknown quantization method '" + header.quant_method + "' in the model store");
}

bool is_quantized(QuantizationMethod method) { return method != QuantizationMethod::none; }

namespace {
// PEFT skips the fp32 upcast for these: their kernels expect the 16-bit dtype they were made with.
bool skips_upcast(QuantizationMethod method) {
  return method == QuantizationMethod::gptq || method == QuantizationMethod::aqlm ||
         method == QuantizationMethod::eetq || method == QuantizationMethod::hqq ||
         method == QuantizationMethod::torchao;
}
}  // namespace

PrepareReport prepare_model_for_kbit_training(model::LlamaModelImpl& model, const PrepareOptions& options) {
  PrepareReport report;
  report.method = detect_quantization_method(model.store_header());

  // 1. Freeze every parameter (4-bit storage is a uint8 buffer and cannot require grad anyway).
  auto named = model.named_model_parameters();
  for (auto& [name, parameter] : named) {
    parameter.requires_grad_(false);
    ++report.parameters_frozen;
    report.elements_frozen += parameter.numel();
  }

  // 2. Upcast fp16/bf16 parameters that are not 4-bit storage to fp32, unless the method forbids it.
  if (!skips_upcast(report.method)) {
    torch::NoGradGuard no_grad;
    for (auto& [name, parameter] : named) {
      const auto dtype = parameter.scalar_type();
      if (dtype != torch::kHalf && dtype != torch::kBFloat16) continue;
      const bool embedding_or_head = name == "model.embed_tokens.weight" || name == "lm_head.weight";
      if (options.keep_embeddings_16bit && embedding_or_head) {
        report.kept_16bit.push_back(name);
        continue;
      }
      report.upcast_added_bytes += parameter.numel() * 2;  // 2 -> 4 bytes per element
      parameter.set_data(parameter.to(torch::kFloat));
      report.upcast.push_back(name);
    }
    // A tied LM head shares the embedding's storage handle; keep the alias intact after set_data.
    if (model.config().tie_word_embeddings) model.lm_head = model.embed_tokens;
  }

  // 3. Checkpointing only for quantized models; reentrant checkpointing needs the input hook.
  if (is_quantized(report.method) && options.use_gradient_checkpointing) {
    model.set_gradient_checkpointing({true, options.use_reentrant});
    report.gradient_checkpointing = true;
    if (options.use_reentrant) {
      model.set_input_require_grads(true);
      report.input_require_grads_hook = true;
    }
  }
  return report;
}

void check_trainable(model::LlamaModelImpl& model, QuantizationMethod method) {
  // PEFT itself trains on top of gptq/eetq/hqq/torchao kernels; this runtime carries only the
  // bitsandbytes codecs (4-bit and LLM.int8), so anything else is refused rather than silently mis-decoded.
  if (method != QuantizationMethod::bnb_4bit && method != QuantizationMethod::bnb_8bit &&
      method != QuantizationMethod::none)
    throw PrepareError("the model store is quantized with " + method_name(method) +
                       ", which this runtime cannot train (it has bitsandbytes 4-bit and 8-bit kernels only); "
                       "convert the 16-bit original with `qlora convert --from`");
  if (is_quantized(method) && !model.has_adapters())
    throw PrepareError("refusing to train a " + method_name(method) +
                       " quantized model without adapters: its base weights cannot be updated; "
                       "attach LoRA with --lora-targets");
}

std::string PrepareReport::summary() const {
  std::ostringstream out;
  out << "prepare: quantization " << method_name(method) << "; froze " << parameters_frozen << " tensors ("
      << elements_frozen << " parameters); upcast " << upcast.size() << " tensors to fp32 (+"
      << format_bytes(static_cast<double>(upcast_added_bytes)) << ")";
  if (!kept_16bit.empty()) out << "; kept " << kept_16bit.size() << " in 16-bit";
  out << "; gradient checkpointing " << (gradient_checkpointing ? "on" : "off");
  if (gradient_checkpointing) out << (input_require_grads_hook ? " (reentrant, input hook set)" : " (non-reentrant)");
  return out.str();
}

}  // namespace qlora::prepare
