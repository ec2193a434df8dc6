// Validation of bitsandbytes' serialized quantization state (transformers' save_pretrained format).
#include "shard/bnb_checkpoint.h"

#include <cmath>
#include <cstring>
#include <string_view>

#include "kernels/double_quant.h"

namespace qlora::shard {
namespace {

const char* kStatePrefix = ".quant_state.bitsandbytes__";

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  return numel;
}

// The entry `name` with the given dtype and element count; FormatError naming the file otherwise.
const SafetensorsEntry& expect_entry(const SafetensorsCheckpoint& checkpoint, const std::string& name,
                                     kernels::DType dtype, int64_t numel, const std::string& what) {
  if (!checkpoint.contains(name))
    throw FormatError("checkpoint: no tensor '" + name + "' (" + what + "), which a bitsandbytes-quantized weight needs");
  const SafetensorsEntry& entry = checkpoint.entry(name);
  const std::string where = checkpoint.file_of(name).path() + ": tensor '" + name + "'";
  if (!entry.dtype_known || entry.dtype != dtype)
    throw FormatError(where + " has dtype " + entry.dtype_code + "; expected " + kernels::dtype_name(dtype) + " (" +
                      what + ")");
  if (entry.numel() != numel)
    throw FormatError(where + " has " + std::to_string(entry.numel()) + " elements; expected " + std::to_string(numel) +
                      " (" + what + ")");
  return entry;
}

// A stored code table must be the one qlora decodes with; +0 and -0 count as equal (bitsandbytes
// stores FP4's nibble 8 as +0 but decodes it as -0).
void expect_table(const SafetensorsCheckpoint& checkpoint, const std::string& name, const float* expected,
                  int64_t count, const std::string& what) {
  expect_entry(checkpoint, name, kernels::DType::f32, count, what);
  float stored[256];
  std::memcpy(stored, checkpoint.data(name), static_cast<size_t>(count) * sizeof(float));
  for (int64_t i = 0; i < count; ++i)
    if (!(stored[i] == expected[i]))
      throw FormatError(checkpoint.file_of(name).path() + ": tensor '" + name + "' entry " + std::to_string(i) + " is " +
                        std::to_string(stored[i]) + ", not bitsandbytes' " + what + " (" + std::to_string(expected[i]) +
                        "); qlora imports only the standard tables");
}

kernels::DType dtype_from_torch_name(const std::string& name, const std::string& where) {
  if (name == "bfloat16") return kernels::DType::bf16;
  if (name == "float16") return kernels::DType::f16;
  if (name == "float32") return kernels::DType::f32;
  throw FormatError(where + ": quant_state dtype '" + name + "' is not bfloat16, float16 or float32");
}

}  // namespace

BnbQuantizationConfig parse_bnb_quantization_config(const Json& quantization_config, const std::string& where) {
  const Json& config = quantization_config;
  const std::string label = where + ": quantization_config";
  BnbQuantizationConfig result;
  const std::string method = json_string_or(config, "quant_method", "", label);
  if (method != "bitsandbytes")
    throw FormatError(where + ": quantization_config.quant_method is '" + method +
                      "'; qlora imports only bitsandbytes checkpoints (or convert the 16-bit original)");
  result.load_in_4bit = json_bool_or(config, "load_in_4bit", json_bool_or(config, "_load_in_4bit", false, label), label);
  result.load_in_8bit = json_bool_or(config, "load_in_8bit", json_bool_or(config, "_load_in_8bit", false, label), label);
  if (result.load_in_4bit == result.load_in_8bit)
    throw FormatError(where + ": quantization_config must set exactly one of load_in_4bit and load_in_8bit");
  const std::string type = json_string_or(config, "bnb_4bit_quant_type", "fp4", label);
  if (type != "nf4" && type != "fp4") throw FormatError(where + ": bnb_4bit_quant_type '" + type + "' is not nf4 or fp4");
  result.quant_type = type == "nf4" ? kernels::QuantType::nf4 : kernels::QuantType::fp4;
  result.double_quant = json_bool_or(config, "bnb_4bit_use_double_quant", false, label);
  if (result.load_in_8bit && json_bool_or(config, "llm_int8_has_fp16_weight", false, label))
    throw FormatError(where + ": llm_int8_has_fp16_weight checkpoints keep 16-bit weights; convert them as a "
                      "plain checkpoint");
  return result;
}

bool is_bnb_4bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name) {
  return checkpoint.contains(weight_name + kStatePrefix + "nf4") ||
         checkpoint.contains(weight_name + kStatePrefix + "fp4");
}

bool is_bnb_8bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name) {
  const std::string suffix = ".weight";
  if (weight_name.size() <= suffix.size()) return false;
  return checkpoint.contains(weight_name.substr(0, weight_name.size() - suffix.size()) + ".SCB");
}

Bnb4bitWeight read_bnb_4bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name,
                                   const std::vector<int64_t>& shape) {
  Bnb4bitWeight weight;
  const bool nf4 = checkpoint.contains(weight_name + kStatePrefix + "nf4");
  const std::string state_name = weight_name + kStatePrefix + (nf4 ? "nf4" : "fp4");
  const std::string where = checkpoint.file_of(state_name).path() + ": tensor '" + state_name + "'";
  const SafetensorsEntry& state_entry = checkpoint.entry(state_name);
  if (!state_entry.dtype_known || state_entry.dtype != kernels::DType::u8)
    throw FormatError(where + " has dtype " + state_entry.dtype_code + "; expected U8 (JSON bytes)");
  const Json state = parse_json(std::string_view(reinterpret_cast<const char*>(checkpoint.data(state_name)),
                                                 static_cast<size_t>(state_entry.end - state_entry.begin)),
                                where);
  const int64_t numel = numel_of(shape);
  weight.quant_type = nf4 ? kernels::QuantType::nf4 : kernels::QuantType::fp4;
  const std::string quant_type = json_string_or(state, "quant_type", "", where);
  if (quant_type != (nf4 ? "nf4" : "fp4"))
    throw FormatError(where + ": quant_type '" + quant_type + "' contradicts the entry's name");
  weight.blocksize = json_int(state, "blocksize", where);
  if (weight.blocksize < 32 || weight.blocksize > 4096 || (weight.blocksize & (weight.blocksize - 1)) != 0)
    throw FormatError(where + ": blocksize " + std::to_string(weight.blocksize) + " is not a power of two in [32, 4096]");
  weight.dtype = dtype_from_torch_name(json_string_or(state, "dtype", "", where), where);
  if (!state.contains("shape") || !state["shape"].is_array())
    throw FormatError(where + ": field \"shape\" must be an array of integers");
  std::vector<int64_t> stored_shape;
  for (const Json& dim : state["shape"]) stored_shape.push_back(json_as_int(dim, where + ": an entry of \"shape\""));
  if (stored_shape != shape)
    throw FormatError(where + ": shape " + shape_text(stored_shape) + " but config.json implies " + shape_text(shape));
  weight.nested = state.contains("nested_offset");
  if (weight.nested) {
    if (json_int_or(state, "nested_blocksize", 0, where) != kernels::kNestedBlocksize ||
        json_string_or(state, "nested_dtype", "", where) != "float32")
      throw FormatError(where + ": nested statistics must use blocksize 256 and float32 (as bitsandbytes writes them)");
    weight.nested_offset = static_cast<float>(json_double(state, "nested_offset", where));
    if (!std::isfinite(weight.nested_offset)) throw FormatError(where + ": nested_offset is not finite");
  }

  const int64_t blocks = kernels::quant_block_count(numel, weight.blocksize);
  const SafetensorsEntry& codes =
      expect_entry(checkpoint, weight_name, kernels::DType::u8, kernels::packed_byte_count(numel), "packed 4-bit codes");
  weight.codes = checkpoint.data(weight_name);
  weight.source_bytes = (codes.end - codes.begin) + (state_entry.end - state_entry.begin);
  expect_table(checkpoint, weight_name + ".quant_map", kernels::code_table(weight.quant_type), 16,
               nf4 ? "NF4 table" : "FP4 table");
  weight.source_bytes += 16 * sizeof(float);
  if (weight.nested) {
    expect_entry(checkpoint, weight_name + ".absmax", kernels::DType::u8, blocks, "8-bit absmax codes");
    expect_entry(checkpoint, weight_name + ".nested_absmax", kernels::DType::f32, kernels::nested_block_count(blocks),
                 "nested absmax");
    expect_table(checkpoint, weight_name + ".nested_quant_map", kernels::dynamic_map(), 256, "signed dynamic map");
    weight.absmax_codes = checkpoint.data(weight_name + ".absmax");
    weight.nested_absmax = reinterpret_cast<const float*>(checkpoint.data(weight_name + ".nested_absmax"));
    weight.source_bytes += blocks + kernels::nested_block_count(blocks) * sizeof(float) + 256 * sizeof(float);
  } else {
    expect_entry(checkpoint, weight_name + ".absmax", kernels::DType::f32, blocks, "absmax");
    weight.absmax = reinterpret_cast<const float*>(checkpoint.data(weight_name + ".absmax"));
    weight.source_bytes += blocks * sizeof(float);
  }
  return weight;
}

Bnb8bitWeight read_bnb_8bit_weight(const SafetensorsCheckpoint& checkpoint, const std::string& weight_name,
                                   const std::vector<int64_t>& shape) {
  Bnb8bitWeight weight;
  const std::string module = weight_name.substr(0, weight_name.size() - std::string(".weight").size());
  const int64_t rows = shape.at(0);
  const SafetensorsEntry& codes = expect_entry(checkpoint, weight_name, kernels::DType::i8, numel_of(shape), "int8 codes");
  if (codes.shape != shape)
    throw FormatError(checkpoint.file_of(weight_name).path() + ": tensor '" + weight_name + "' has shape " +
                      shape_text(codes.shape) + " but config.json implies " + shape_text(shape));
  const SafetensorsEntry& scales = expect_entry(checkpoint, module + ".SCB", kernels::DType::f32, rows, "row absmax");
  weight.codes = reinterpret_cast<const int8_t*>(checkpoint.data(weight_name));
  weight.row_absmax = reinterpret_cast<const float*>(checkpoint.data(module + ".SCB"));
  weight.source_bytes = (codes.end - codes.begin) + (scales.end - scales.begin);
  // weight_format 0 is bitsandbytes' row-major layout; the GPU-tiled formats (col32, ...) were
  // dropped by bitsandbytes and cannot be read here.
  const std::string format_name = weight_name + "_format";
  if (checkpoint.contains(format_name)) {
    const SafetensorsEntry& format = expect_entry(checkpoint, format_name, kernels::DType::u8, 1, "weight format");
    if (*checkpoint.data(format_name) != 0)
      throw FormatError(checkpoint.file_of(format_name).path() + ": tensor '" + format_name + "' is " +
                        std::to_string(*checkpoint.data(format_name)) +
                        "; only row-major int8 weights (format 0) can be imported");
    weight.source_bytes += format.end - format.begin;
  }
  return weight;
}

}  // namespace qlora::shard
