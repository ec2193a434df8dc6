// Writes model.h5 from a Hugging Face safetensors checkpoint, a GGUF file or a synthetic random model,
// streaming one tensor at a time so peak memory stays near the largest tensor.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "shard/model_store.h"

namespace qlora::shard {

struct ConvertOptions {
  bool quantize = true;   // false: keep the block linears in their source dtype (quant_method none)
  kernels::QuantType quant_type = kernels::QuantType::nf4;
  bool int8 = false;      // LLM.int8 row-wise codes instead of 4-bit (quant_method bnb-8bit)
  int64_t blocksize = 64;
  bool double_quant = false;  // 4-bit: absmax quantized again as bitsandbytes' compress_statistics
  // Comma list of module-name suffixes kept in the source dtype (transformers' llm_int8_skip_modules).
  std::string keep_unquantized = "";
  // Which bitsandbytes quantizer's bytes to reproduce (kernels/nf4.h): cuda made the checkpoints in
  // the wild; tests pick cpu to compare with fixtures made without a GPU.
  kernels::BitsandbytesBackend backend = kernels::BitsandbytesBackend::cuda;
  uint64_t seed = 1234;   // synthetic models only
  // Hugging Face folders: whether qlora can use a tokenizer file, which decides between tokenizer.json
  // and tokenizer.model (see tokenizer_from_hf_directory); pass data::check_tokenizer.
  TokenizerCheck check_tokenizer;
};

struct ConvertSummary {
  int64_t tensors = 0;
  int64_t parameters = 0;
  int64_t quantized_parameters = 0;
  uint64_t source_bytes = 0;
  uint64_t store_bytes = 0;     // tensor data written (codes + absmax + dense)
  double seconds = 0.0;
};

// Presets for `--synthetic`: "micro" (2 layers, hidden 64, for tests), "tiny" (4 layers, hidden 256,
// 8 heads, 4 KV heads, vocab 512) and "small" (8 layers, hidden 512). FormatError if unknown.
ModelConfig synthetic_config(const std::string& preset);

// Called after each tensor with (tensors done, tensors total, name) for progress display.
using ConvertProgress = std::function<void(int64_t, int64_t, const std::string&)>;

ConvertSummary convert_synthetic(const std::string& preset, const std::string& out_path,
                                 const ConvertOptions& options, const ConvertProgress& progress = {});
// A Hugging Face folder. A pre-quantized bitsandbytes checkpoint (config.json quantization_config
// with load_in_4bit or load_in_8bit) is imported as it is: codes and statistics are copied byte for
// byte, and the quantization options are ignored (its own blocksize, type and nesting are kept).
ConvertSummary convert_hf_directory(const std::string& directory, const std::string& out_path,
                                    const ConvertOptions& options, const ConvertProgress& progress = {});

// A llama-architecture GGUF file (tensors F32, F16, BF16, Q8_0, Q4_0 or Q4_1). Block linears are
// dequantized to fp32, their Q/K rows put back into Hugging Face order, and quantized when
// options.quantize; every other tensor keeps its dtype when it is F32/F16/BF16 and is stored as
// fp32 otherwise. The tokenizer.* metadata is embedded as the store's /tokenizer (kind "gguf"); a Hugging
// Face folder's tokenizer.json or tokenizer.model likewise (see tokenizer_from_hf_directory).
ConvertSummary convert_gguf_file(const std::string& gguf_path, const std::string& out_path,
                                 const ConvertOptions& options, const ConvertProgress& progress = {});

}  // namespace qlora::shard
