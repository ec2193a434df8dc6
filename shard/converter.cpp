// Conversion into the 4-bit store: decoder-block linear weights are quantized (NF4/FP4, bitsandbytes
// layout); embeddings, norms and the LM head keep their source dtype, as transformers does.
#include "shard/converter.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <vector>

#include "common/hash.h"
#include "common/json.h"
#include "kernels/double_quant.h"
#include "kernels/dtype.h"
#include "kernels/ggml_blocks.h"
#include "kernels/int8.h"
#include "kernels/nf4.h"
#include "shard/bnb_checkpoint.h"
#include "shard/gguf.h"
#include "shard/llama_tensor_map.h"
#include "shard/safetensors.h"
#include "shard/tokenizer_source.h"

namespace qlora::shard {
namespace {

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  return numel;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

StoreHeader header_for(const ModelConfig& config, const ConvertOptions& options, const std::string& source,
                       const std::string& tokenizer) {
  StoreHeader header;
  header.config = config;
  header.quant_method = !options.quantize ? "none" : options.int8 ? "bnb-8bit" : "bnb-4bit";
  header.quant_type = !options.quantize ? "none" : options.int8 ? "int8" : options.quant_type == kernels::QuantType::nf4 ? "nf4" : "fp4";
  header.blocksize = options.quantize && options.int8 ? 0 : options.blocksize;
  header.double_quant = options.quantize && !options.int8 && options.double_quant;
  header.unquantized_modules = options.quantize ? options.keep_unquantized : "";
  header.compute_dtype = "float32";
  header.tokenizer = tokenizer;
  header.source = source;
  return header;
}

bool quantizes(const std::string& name, const ConvertOptions& options) {
  return options.quantize && ModelConfig::is_block_linear(name) && !module_listed(name, options.keep_unquantized);
}

void validate_options(const ConvertOptions& options) {
  const int64_t blocksize = options.blocksize;
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    throw FormatError("blocksize " + std::to_string(blocksize) + " is not a power of two in [32, 4096]");
  if (options.int8 && options.double_quant)
    throw FormatError("double quantization applies to 4-bit absmax only; int8 has one fp32 scale per row");
}

// Quantizes one fp32 tensor and appends it to the store; refuses non-finite weights by name.
void write_quantized(ModelStoreWriter& writer, const std::string& name, const std::vector<int64_t>& shape,
                     kernels::DType source_dtype, const std::vector<float>& values, const ConvertOptions& options,
                     const std::string& source, ConvertSummary& summary) {
  const int64_t numel = static_cast<int64_t>(values.size());
  for (int64_t i = 0; i < numel; ++i) {
    if (!std::isfinite(values[i]))
      throw FormatError(source + ": tensor '" + name + "' contains " + (std::isnan(values[i]) ? "NaN" : "Inf") +
                        " at element " + std::to_string(i) + "; refusing to quantize it");
  }
  summary.quantized_parameters += numel;
  if (options.int8) {
    const int64_t rows = shape.front();
    std::vector<int8_t> codes(numel);
    std::vector<float> row_absmax(rows);
    kernels::quantize_int8_rows(kernels::DType::f32, values.data(), rows, numel / rows, codes.data(), row_absmax.data());
    writer.add_int8(name, shape, source_dtype, codes.data(), row_absmax.data());
    summary.store_bytes += codes.size() + row_absmax.size() * sizeof(float);
    return;
  }
  std::vector<uint8_t> codes(kernels::packed_byte_count(numel));
  std::vector<float> absmax(kernels::quant_block_count(numel, options.blocksize));
  kernels::quantize_4bit(options.quant_type, values.data(), numel, options.blocksize, codes.data(), absmax.data(),
                         options.backend);
  summary.store_bytes += codes.size();
  if (!options.double_quant) {
    writer.add_quantized(name, shape, source_dtype, codes.data(), absmax.data());
    summary.store_bytes += absmax.size() * sizeof(float);
    return;
  }
  const int64_t blocks = static_cast<int64_t>(absmax.size());
  const float offset = kernels::absmax_offset(absmax.data(), blocks);
  std::vector<uint8_t> absmax_codes(blocks);
  std::vector<float> nested_absmax(kernels::nested_block_count(blocks));
  kernels::quantize_absmax(absmax.data(), blocks, offset, absmax_codes.data(), nested_absmax.data(), options.backend);
  writer.add_double_quantized(name, shape, source_dtype, codes.data(), absmax_codes.data(), nested_absmax.data(), offset);
  summary.store_bytes += absmax_codes.size() + nested_absmax.size() * sizeof(float);
}

void count_tensor(ConvertSummary& summary, int64_t numel, uint64_t source_bytes, int64_t tensor_total,
                  const std::string& name, const ConvertProgress& progress) {
  summary.parameters += numel;
  summary.source_bytes += source_bytes;
  ++summary.tensors;
  if (progress) progress(summary.tensors, tensor_total, name);
}

ConvertSummary finish_conversion(ModelStoreWriter& writer, const Fnv1a64& checksum,
                                 std::chrono::steady_clock::time_point start, ConvertSummary summary) {
  writer.set_source_checksum(checksum.hex());
  writer.finish();
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

}  // namespace

ModelConfig synthetic_config(const std::string& preset) {
  // A config.json gives any shape random weights: what sizing tests and the planner's checks need.
  if (std::filesystem::path(preset).extension() == ".json") return read_config_file(preset);
  ModelConfig config;
  config.architecture = "llama";
  config.num_attention_heads = 8;
  config.num_key_value_heads = 4;
  config.vocab_size = 512;
  config.max_position_embeddings = 1024;
  config.rms_norm_eps = 1e-5;
  config.rope_theta = 10000.0;
  config.tie_word_embeddings = false;
  config.torch_dtype = "bfloat16";
  if (preset == "tiny") {
    config.hidden_size = 256;
    config.intermediate_size = 688;
    config.num_hidden_layers = 4;
  } else if (preset == "micro") {
    config.hidden_size = 64;
    config.intermediate_size = 172;
    config.num_hidden_layers = 2;
    config.num_attention_heads = 4;
    config.num_key_value_heads = 2;
  } else if (preset == "smollm2-135m") {
    // The shape of SmolLM2-135M (Llama architecture), for benchmarks; weights are random.
    config.hidden_size = 576;
    config.intermediate_size = 1536;
    config.num_hidden_layers = 30;
    config.num_attention_heads = 9;
    config.num_key_value_heads = 3;
    config.vocab_size = 49152;
    config.tie_word_embeddings = true;
    config.rope_theta = 100000.0;
    config.max_position_embeddings = 8192;
  } else if (preset == "small") {
    config.hidden_size = 512;
    config.intermediate_size = 1376;
    config.num_hidden_layers = 8;
  } else {
    throw FormatError("unknown synthetic preset '" + preset + "' (known: micro, tiny, small, smollm2-135m, or a config.json path)");
  }
  config.head_dim = config.hidden_size / config.num_attention_heads;
  return config;
}

ConvertSummary convert_synthetic(const std::string& preset, const std::string& out_path,
                                 const ConvertOptions& options, const ConvertProgress& progress) {
  validate_options(options);
  const auto start = std::chrono::steady_clock::now();
  const ModelConfig config = synthetic_config(preset);
  ModelStoreWriter writer(out_path, header_for(config, options, "synthetic:" + preset, "bytes"));
  std::mt19937_64 generator(options.seed);
  Fnv1a64 checksum;
  ConvertSummary summary;
  const auto names = config.tensor_names();
  for (const auto& name : names) {
    const std::vector<int64_t> shape = config.expected_shape(name);
    const int64_t numel = numel_of(shape);
    // Scales chosen so activations and logits start O(1): embeddings unit variance, linears
    // 1/sqrt(fan_in), norms one. A random base is enough for the machinery; it is not a language model.
    const bool is_norm = shape.size() == 1;
    const double std_dev = name == "model.embed_tokens.weight" ? 1.0 : 1.0 / std::sqrt(double(shape.back()));
    std::normal_distribution<float> normal(0.0f, static_cast<float>(std_dev));
    std::vector<float> values(numel);
    for (auto& value : values) value = is_norm ? 1.0f : normal(generator);
    if (quantizes(name, options)) {
      // The synthetic checkpoint "is" bf16, as real ones are: round first, then quantize.
      for (auto& value : values) value = kernels::bf16_to_float(kernels::float_to_bf16(value));
      checksum.update(values.data(), values.size() * sizeof(float));
      write_quantized(writer, name, shape, kernels::DType::bf16, values, options, "synthetic:" + preset, summary);
    } else {
      std::vector<uint16_t> bf16(numel);
      for (int64_t i = 0; i < numel; ++i) bf16[i] = kernels::float_to_bf16(values[i]);
      checksum.update(bf16.data(), bf16.size() * sizeof(uint16_t));
      writer.add_dense(name, shape, kernels::DType::bf16, bf16.data());
      summary.store_bytes += bf16.size() * sizeof(uint16_t);
    }
    count_tensor(summary, numel, numel * 2, static_cast<int64_t>(names.size()), name, progress);
  }
  return finish_conversion(writer, checksum, start, summary);
}

namespace {

// A 16/32-bit float tensor of the checkpoint whose shape is the one config.json implies.
const SafetensorsEntry& checked_float_entry(const SafetensorsCheckpoint& checkpoint, const std::string& name,
                                            const ModelConfig& config) {
  const SafetensorsEntry& entry = checkpoint.entry(name);
  const std::string where = checkpoint.file_of(name).path() + ": tensor '" + name + "'";
  const auto expected = config.expected_shape(name);
  if (entry.shape != expected)
    throw FormatError(where + " has shape " + shape_text(entry.shape) + " but config.json implies " +
                      shape_text(expected));
  if (!entry.dtype_known || (entry.dtype != kernels::DType::f32 && entry.dtype != kernels::DType::f16 &&
                             entry.dtype != kernels::DType::bf16))
    throw FormatError(where + " has dtype " + entry.dtype_code + "; expected F32, F16 or BF16");
  return entry;
}

// A pre-quantized bitsandbytes checkpoint: quantized block linears are copied byte for byte (codes,
// absmax or its nested form, int8 rows and SCB); everything else as in a plain import. The store
// takes the checkpoint's own blocksize, type and nesting, which every quantized weight must share.
ConvertSummary import_bnb_checkpoint(const std::string& directory, const SafetensorsCheckpoint& checkpoint,
                                     const ModelConfig& config, const Json& quantization_config,
                                     const std::string& out_path, const ConvertProgress& progress,
                                     std::chrono::steady_clock::time_point start) {
  const std::string config_path = (std::filesystem::path(directory) / "config.json").string();
  const BnbQuantizationConfig bnb = parse_bnb_quantization_config(quantization_config, config_path);
  ConvertOptions options;
  options.int8 = bnb.load_in_8bit;
  options.quant_type = bnb.quant_type;
  options.double_quant = bnb.load_in_4bit && bnb.double_quant;
  const auto names = config.tensor_names();
  bool blocksize_seen = false;
  for (const auto& name : names) {
    const bool four_bit = is_bnb_4bit_weight(checkpoint, name);
    const bool eight_bit = is_bnb_8bit_weight(checkpoint, name);
    const std::string where = (checkpoint.contains(name) ? checkpoint.file_of(name).path() : directory) +
                              ": tensor '" + name + "'";
    if (!four_bit && !eight_bit) {
      // transformers leaves llm_int8_skip_modules in 16-bit: the store lists them as kept.
      if (ModelConfig::is_block_linear(name))
        options.keep_unquantized += (options.keep_unquantized.empty() ? "" : ",") + name.substr(0, name.size() - 7);
      continue;
    }
    if (!ModelConfig::is_block_linear(name))
      throw FormatError(where + " is quantized, but a qlora store quantizes only decoder-block linear weights "
                        "(convert the 16-bit original, or quantize with llm_int8_skip_modules covering it)");
    if (four_bit != bnb.load_in_4bit)
      throw FormatError(where + " is stored " + (four_bit ? "4-bit" : "8-bit") + " but " + config_path +
                        " says load_in_" + (bnb.load_in_4bit ? "4bit" : "8bit"));
    if (!four_bit) continue;
    const Bnb4bitWeight weight = read_bnb_4bit_weight(checkpoint, name, config.expected_shape(name));
    if (weight.quant_type != bnb.quant_type || weight.nested != bnb.double_quant)
      throw FormatError(where + ": its quant_state (" + (weight.quant_type == kernels::QuantType::nf4 ? "nf4" : "fp4") +
                        (weight.nested ? ", nested" : "") + ") contradicts quantization_config in " + config_path);
    if (blocksize_seen && weight.blocksize != options.blocksize)
      throw FormatError(where + ": blocksize " + std::to_string(weight.blocksize) + " differs from the " +
                        std::to_string(options.blocksize) + " of earlier weights; a store has one blocksize");
    options.blocksize = weight.blocksize;
    blocksize_seen = true;
  }

  ModelStoreWriter writer(out_path, header_for(config, options, std::filesystem::path(directory).filename().string(),
                                               "none"));
  writer.set_chat_template(chat_template_from_hf_directory(directory));
  Fnv1a64 checksum;
  ConvertSummary summary;
  for (const auto& name : names) {
    const auto shape = config.expected_shape(name);
    const int64_t numel = numel_of(shape);
    uint64_t source_bytes = 0;
    if (is_bnb_4bit_weight(checkpoint, name)) {
      const Bnb4bitWeight weight = read_bnb_4bit_weight(checkpoint, name, shape);
      const int64_t blocks = kernels::quant_block_count(numel, weight.blocksize);
      checksum.update(weight.codes, kernels::packed_byte_count(numel));
      if (weight.nested) {
        checksum.update(weight.absmax_codes, blocks);
        writer.add_double_quantized(name, shape, weight.dtype, weight.codes, weight.absmax_codes, weight.nested_absmax,
                                    weight.nested_offset);
        summary.store_bytes += kernels::packed_byte_count(numel) + blocks +
                               kernels::nested_block_count(blocks) * sizeof(float);
      } else {
        checksum.update(weight.absmax, blocks * sizeof(float));
        writer.add_quantized(name, shape, weight.dtype, weight.codes, weight.absmax);
        summary.store_bytes += kernels::packed_byte_count(numel) + blocks * sizeof(float);
      }
      summary.quantized_parameters += numel;
      source_bytes = weight.source_bytes;
    } else if (is_bnb_8bit_weight(checkpoint, name)) {
      const Bnb8bitWeight weight = read_bnb_8bit_weight(checkpoint, name, shape);
      checksum.update(weight.codes, numel);
      checksum.update(weight.row_absmax, shape.front() * sizeof(float));
      // Linear8bitLt quantizes the weight cast to float16, so that is the dtype it was made from.
      writer.add_int8(name, shape, kernels::DType::f16, weight.codes, weight.row_absmax);
      summary.store_bytes += numel + shape.front() * sizeof(float);
      summary.quantized_parameters += numel;
      source_bytes = weight.source_bytes;
    } else {
      const SafetensorsEntry& entry = checked_float_entry(checkpoint, name, config);
      checksum.update(checkpoint.data(name), entry.end - entry.begin);
      writer.add_dense(name, shape, entry.dtype, checkpoint.data(name));
      summary.store_bytes += entry.end - entry.begin;
      source_bytes = entry.end - entry.begin;
    }
    count_tensor(summary, numel, source_bytes, static_cast<int64_t>(names.size()), name, progress);
  }
  return finish_conversion(writer, checksum, start, summary);
}

}  // namespace

ConvertSummary convert_hf_directory(const std::string& directory, const std::string& out_path,
                                    const ConvertOptions& options, const ConvertProgress& progress) {
  validate_options(options);
  const auto start = std::chrono::steady_clock::now();
  const std::string config_path = (std::filesystem::path(directory) / "config.json").string();
  std::ifstream config_file(config_path, std::ios::binary);
  if (!config_file) throw FormatError(config_path + ": cannot read (is --from a Hugging Face model folder?)");
  std::stringstream config_text;
  config_text << config_file.rdbuf();
  const Json config_json = parse_json(config_text.str(), config_path);
  const ModelConfig config = ModelConfig::from_json(config_json, config_path);
  auto checkpoint = SafetensorsCheckpoint::open_directory(directory);
  if (config_json.contains("quantization_config"))
    return import_bnb_checkpoint(directory, *checkpoint, config, config_json.at("quantization_config"), out_path,
                                 progress, start);

  ModelStoreWriter writer(out_path, header_for(config, options, std::filesystem::path(directory).filename().string(),
                                               "none"));
  writer.add_tokenizer(tokenizer_from_hf_directory(directory, options.check_tokenizer));
  writer.set_chat_template(chat_template_from_hf_directory(directory));
  Fnv1a64 checksum;
  ConvertSummary summary;
  const auto names = config.tensor_names();
  for (const auto& name : names) {
    const SafetensorsEntry& entry = checked_float_entry(*checkpoint, name, config);
    const uint8_t* data = checkpoint->data(name);
    const int64_t numel = entry.numel();
    checksum.update(data, entry.end - entry.begin);
    if (quantizes(name, options)) {
      std::vector<float> values(numel);
      kernels::convert_to_float(entry.dtype, data, numel, values.data());
      write_quantized(writer, name, entry.shape, entry.dtype, values, options, checkpoint->file_of(name).path(),
                      summary);
    } else {
      writer.add_dense(name, entry.shape, entry.dtype, data);
      summary.store_bytes += entry.end - entry.begin;
    }
    count_tensor(summary, numel, entry.end - entry.begin, static_cast<int64_t>(names.size()), name, progress);
  }
  return finish_conversion(writer, checksum, start, summary);
}

ConvertSummary convert_gguf_file(const std::string& gguf_path, const std::string& out_path,
                                 const ConvertOptions& options, const ConvertProgress& progress) {
  validate_options(options);
  const auto start = std::chrono::steady_clock::now();
  const auto file = GgufFile::open(gguf_path);
  const ModelConfig config = llama_config_from_gguf(*file);

  // A tensor the Llama model has no place for (biases, extra norms of another architecture) would
  // change what the model computes; refuse it rather than drop it. rope_freqs.weight is read into
  // the config's rope scaling.
  const auto names = config.tensor_names();
  const std::set<std::string> wanted(names.begin(), names.end());
  std::map<std::string, const GgufTensor*> by_hf_name;
  for (const GgufTensor& tensor : file->tensors()) {
    if (tensor.name == "rope_freqs.weight") continue;
    const std::string hf_name = llama_hf_tensor_name(tensor.name);
    if (hf_name.empty() || wanted.count(hf_name) == 0)
      throw FormatError(gguf_path + ": tensor '" + tensor.name + "' has no counterpart in a Llama model of this "
                        "configuration; qlora cannot convert it without changing what the model computes");
    by_hf_name.emplace(hf_name, &tensor);
  }

  ModelStoreWriter writer(out_path,
                          header_for(config, options, std::filesystem::path(gguf_path).filename().string(), "gguf"));
  writer.add_tokenizer(tokenizer_from_gguf(*file));
  writer.set_chat_template(chat_template_from_gguf(*file));
  Fnv1a64 checksum;
  ConvertSummary summary;
  std::vector<uint8_t> reordered;
  std::vector<float> values;
  for (const auto& name : names) {
    const auto found = by_hf_name.find(name);
    if (found == by_hf_name.end())
      throw FormatError(gguf_path + ": no tensor '" + llama_gguf_tensor_name(name) + "' (Hugging Face '" + name +
                        "'), which the model's metadata implies");
    const GgufTensor& tensor = *found->second;
    const std::string where = gguf_path + ": tensor '" + tensor.name + "'";
    const auto expected = config.expected_shape(name);
    if (tensor.shape != expected)
      throw FormatError(where + " has shape " + shape_text(tensor.shape) + " but the metadata implies " +
                        shape_text(expected));
    if (!kernels::ggml_type_dequantizable(tensor.type))
      throw FormatError(where + " is " + kernels::ggml_type_name(tensor.type) +
                        ", which qlora cannot import (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
    const uint8_t* data = file->data(tensor);
    checksum.update(data, tensor.bytes);

    // Whole rows move, so Q and K go back to Hugging Face order before any decoding, whatever the type.
    auto ends_with = [&name](const std::string& suffix) {
      return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    };
    const bool is_q = ends_with(".q_proj.weight");
    const bool is_k = ends_with(".k_proj.weight");
    if (is_q || is_k) {
      const int64_t rows = tensor.shape.front();
      reordered.resize(tensor.bytes);
      unpermute_llama_rows(data, reordered.data(), rows, tensor.bytes / static_cast<uint64_t>(rows),
                           is_q ? config.num_attention_heads : config.num_key_value_heads);
      data = reordered.data();
    }

    namespace ggml_type = kernels::ggml_type;
    const bool dense_type =
        tensor.type == ggml_type::f32 || tensor.type == ggml_type::f16 || tensor.type == ggml_type::bf16;
    const kernels::DType dense_dtype = tensor.type == ggml_type::f16    ? kernels::DType::f16
                                       : tensor.type == ggml_type::bf16 ? kernels::DType::bf16
                                                                        : kernels::DType::f32;
    const int64_t numel = tensor.numel();
    if (quantizes(name, options)) {
      values.resize(static_cast<size_t>(numel));
      kernels::dequantize_ggml(tensor.type, data, numel, values.data());
      write_quantized(writer, name, tensor.shape, dense_dtype, values, options, gguf_path, summary);
    } else if (dense_type) {
      writer.add_dense(name, tensor.shape, dense_dtype, data);
      summary.store_bytes += tensor.bytes;
    } else {
      values.resize(static_cast<size_t>(numel));
      kernels::dequantize_ggml(tensor.type, data, numel, values.data());
      writer.add_dense(name, tensor.shape, kernels::DType::f32, values.data());
      summary.store_bytes += static_cast<uint64_t>(numel) * sizeof(float);
    }
    count_tensor(summary, numel, tensor.bytes, static_cast<int64_t>(names.size()), name, progress);
  }
  return finish_conversion(writer, checksum, start, summary);
}

}  // namespace qlora::shard
