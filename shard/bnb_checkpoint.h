// Pre-quantized bitsandbytes checkpoints as transformers saves them (save_pretrained of a model
// loaded with BitsAndBytesConfig): reading and validating the per-weight entries so the importer can
// copy codes and statistics into the store byte for byte, without re-quantizing.
//   4-bit: W (U8 [n/2, 1]), W.absmax (F32, or U8 when nested), W.quant_map (F32 [16]),
//          W.nested_absmax, W.nested_quant_map (nested only), W.quant_state.bitsandbytes__nf4|fp4
//          (U8: UTF-8 JSON with quant_type, blocksize, dtype, shape, nested_* fields).
//   8-bit: M.weight (I8 [out, in]), M.SCB (F32 [out]), M.weight_format (U8, 0 = row-major).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/json.h"
#include "kernels/dtype.h"
#include "kernels/nf4.h"
#include "shard/safetensors.h"

namespace qlora::shard {

// config.json's quantization_config for quant_method "bitsandbytes".
struct BnbQuantizationConfig {
  bool load_in_4bit = false;
  bool load_in_8bit = false;
  kernels::QuantType quant_type = kernels::QuantType::nf4;
  bool double_quant = false;
};

// FormatError naming `where` for anything but a bitsandbytes 4-bit or 8-bit configuration.
BnbQuantizationConfig parse_bnb_quantization_config(const qlora::Json& quantization_config, const std::string& where);

struct Bnb4bitWeight {
  kernels::QuantType quant_type = kernels::QuantType::nf4;
  int64_t blocksize = 64;
  kernels::DType dtype = kernels::DType::bf16;  // the dtype it was quantized from
  bool nested = false;
  const uint8_t* codes = nullptr;               // ceil(numel / 2) bytes
  const float* absmax = nullptr;                // blocks floats (not nested)
  const uint8_t* absmax_codes = nullptr;        // blocks bytes (nested)
  const float* nested_absmax = nullptr;         // ceil(blocks / 256) floats (nested)
  float nested_offset = 0.0f;
  uint64_t source_bytes = 0;                    // every entry's bytes, for the summary
};

struct Bnb8bitWeight {
  const int8_t* codes = nullptr;                // rows * cols
  const float* row_absmax = nullptr;            // rows (SCB)
  uint64_t source_bytes = 0;
};

// Whether `weight_name` ("...q_proj.weight") is stored 4-bit / 8-bit in the checkpoint.
bool is_bnb_4bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name);
bool is_bnb_8bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name);

// Validates every entry against `shape` (from config.json) and the fixed code tables (quant_map must
// be bitsandbytes' NF4/FP4 table, nested_quant_map its signed dynamic map), then points into the
// mapped file. FormatError names the file and the entry.
Bnb4bitWeight read_bnb_4bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name,
                                   const std::vector<int64_t>& shape);
Bnb8bitWeight read_bnb_8bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name,
                                   const std::vector<int64_t>& shape);

}  // namespace qlora::shard
