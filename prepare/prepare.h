// The k-bit preparation protocol (PEFT's prepare_model_for_kbit_training) and the trainer's safety
// rules. Run it after loading and before attaching adapters, as PEFT users do.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/llama.h"
#include "common/errors.h"

namespace qlora::prepare {

enum class QuantizationMethod { bnb_4bit, bnb_8bit, gptq, aqlm, eetq, hqq, torchao, awq, none };

std::string method_name(QuantizationMethod method);
// From the store's quant_method attribute; unknown strings are a PrepareError.
QuantizationMethod detect_quantization_method(const shard::StoreHeader& header);
bool is_quantized(QuantizationMethod method);

struct PrepareOptions {
  bool use_gradient_checkpointing = true;
  bool use_reentrant = true;          // gradient_checkpointing_kwargs {"use_reentrant": ...}; PEFT's default
  bool keep_embeddings_16bit = false; // not PEFT: keeps embed_tokens / lm_head in their 16-bit dtype
};

struct PrepareReport {
  QuantizationMethod method = QuantizationMethod::none;
  int64_t parameters_frozen = 0;      // tensors
  int64_t elements_frozen = 0;
  std::vector<std::string> upcast;    // names cast fp16/bf16 -> fp32
  int64_t upcast_added_bytes = 0;
  std::vector<std::string> kept_16bit;
  bool gradient_checkpointing = false;
  bool input_require_grads_hook = false;
  std::string summary() const;        // multi-line, for the banner
};

struct PrepareError : UserError {
  using UserError::UserError;
};

PrepareReport prepare_model_for_kbit_training(model::LlamaModelImpl& model, const PrepareOptions& options);

// The trainer's rules, checked after adapters are attached: a quantized model needs adapters; some
// quantization methods cannot be trained at all. Throws PrepareError with the reason and a hint.
void check_trainable(model::LlamaModelImpl& model, QuantizationMethod method);

}  // namespace qlora::prepare
