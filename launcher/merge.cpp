// qlora merge: W' = dequantize(W) + scaling * B @ A per adapted linear, in fp32, cast once to the
// output type. The output's layout (headers, every tensor's file and offset) is computed up front
// from the config alone, identically on every rank; rank 0 creates the files under a temporary name
// with their headers, each rank dequantizes, merges, encodes and writes its share of tensors at their
// offsets, and rank 0 adds the small JSON files and renames. Tensors, not files, are shared out: the
// cost is dequantization and the product, and a one-file model should use every rank too.
#include "launcher/merge.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <iostream>
#include <memory>

#include <boost/program_options.hpp>

#include "common/atomic_file.h"
#include "common/format.h"
#include "common/json.h"
#include "common/log.h"
#include "data/tokenizer.h"
#include "kernels/double_quant.h"
#include "kernels/ggml_blocks.h"
#include "kernels/int8.h"
#include "kernels/nf4.h"
#include "launcher/adapter_io.h"
#include "launcher/commands.h"
#include "launcher/errors.h"
#include "launcher/plan.h"
#include "launcher/threads.h"
#include "shard/gguf_writer.h"
#include "shard/llama_tensor_map.h"
#include "shard/model_store.h"
#include "shard/safetensors.h"

namespace qlora::launcher {
namespace {

namespace fs = std::filesystem;

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// ---- the adapter ---------------------------------------------------------------------------------

struct ModuleUpdate {
  const shard::SafetensorsEntry* lora_a = nullptr;  // [r, in]
  const shard::SafetensorsEntry* lora_b = nullptr;  // [out, r]
  double scaling = 0;
};

// The adapter's weights checked against the base: every targeted projection of every layer has
// A [r, in] and B [out, r] of the store's shapes and the config's rank, and nothing else is in the
// file. Keyed by the base weight's name ("model.layers.0.self_attn.q_proj.weight").
struct Adapter {
  std::unique_ptr<shard::SafetensorsFile> file;
  std::map<std::string, ModuleUpdate> updates;
};

Adapter open_adapter(const std::string& directory, const shard::ModelStore& store) {
  Adapter adapter;
  if (directory.empty()) return adapter;
  if (!fs::is_directory(directory))
    throw UserError("--adapter " + directory + ": no such folder", "point --adapter at runs/NAME/final or a PEFT adapter folder");
  const model::LoraConfig config = read_peft_adapter_config(directory);
  std::vector<std::string> targets;
  try {
    targets = config.resolved_targets();
  } catch (const std::invalid_argument& error) {
    throw UserError(directory + "/adapter_config.json: " + error.what(), "the adapter was trained on another architecture");
  }
  const std::string weights_path = directory + "/adapter_model.safetensors";
  if (!fs::is_regular_file(weights_path))
    throw UserError("cannot read " + weights_path, "the adapter folder must hold adapter_model.safetensors");
  adapter.file = shard::SafetensorsFile::open(weights_path);
  const auto& header = store.header();
  const std::string hint = "this adapter was trained on another base model than " + store.path();
  std::map<std::string, bool> used;
  for (const auto& entry : adapter.file->entries()) used[entry.name] = false;
  for (int64_t layer = 0; layer < header.config.num_hidden_layers; ++layer) {
    for (const auto& full_name : shard::block_linear_names()) {
      const std::string projection = full_name.substr(full_name.find('.') + 1);
      if (std::find(targets.begin(), targets.end(), projection) == targets.end()) continue;
      const std::string module = shard::layer_prefix(layer) + full_name;
      const auto& base = store.tensor(module + ".weight");
      const int64_t rank = config.for_module(module).r;
      ModuleUpdate update;
      update.scaling = config.for_module(module).scaling();
      const std::pair<const char*, std::vector<int64_t>> parts[] = {{"lora_A", {rank, base.shape[1]}},
                                                                    {"lora_B", {base.shape[0], rank}}};
      for (const auto& [part, shape] : parts) {
        const std::string key = "base_model.model." + module + "." + part + ".weight";
        const auto* entry = adapter.file->find(key);
        if (entry == nullptr)
          throw UserError(weights_path + ": missing tensor '" + key + "' (adapter_config.json targets " + projection + ")", hint);
        if (!entry->dtype_known || (entry->dtype != kernels::DType::f32 && entry->dtype != kernels::DType::f16 &&
                                    entry->dtype != kernels::DType::bf16))
          throw UserError(weights_path + ": tensor '" + key + "' is " + entry->dtype_code + ", not a float type");
        if (entry->shape != shape)
          throw UserError(weights_path + ": tensor '" + key + "' has shape " + format_shape(entry->shape) +
                              " but the base model's " + module + " needs " + format_shape(shape),
                          hint);
        (std::string(part) == "lora_A" ? update.lora_a : update.lora_b) = entry;
        used[key] = true;
      }
      adapter.updates[module + ".weight"] = update;
    }
  }
  for (const auto& [key, consumed] : used)
    if (!consumed)
      throw UserError(weights_path + ": tensor '" + key + "' has no counterpart among the base model's targeted modules",
                      hint + " (or adapter_config.json's target_modules does not list it)");
  return adapter;
}

torch::Tensor entry_as_float(const shard::SafetensorsFile& file, const shard::SafetensorsEntry& entry) {
  auto values = torch::empty(entry.shape, torch::kFloat);
  kernels::convert_to_float(entry.dtype, file.data(entry), entry.numel(), values.data_ptr<float>());
  return values;
}

// ---- one merged tensor ---------------------------------------------------------------------------

// The base weight as fp32, decoded from the store exactly as bitsandbytes' dequantize_4bit (or
// int8_vectorwise_dequant) computes it in fp32; dense tensors widened from their stored dtype.
torch::Tensor base_weight(const shard::ModelStore& store, const shard::StoredTensor& tensor) {
  auto weight = torch::empty(tensor.shape, torch::kFloat);
  float* output = weight.data_ptr<float>();
  if (!tensor.quantized) {
    std::vector<uint8_t> raw(static_cast<size_t>(tensor.numel) * kernels::dtype_size(tensor.dtype));
    store.read_dense(tensor.name, raw.data());
    kernels::convert_to_float(tensor.dtype, raw.data(), tensor.numel, output);
    return weight;
  }
  const auto& geometry = tensor.geometry;
  const shard::ShardRange whole = shard::shard_range(geometry, 0, 1);
  std::vector<uint8_t> codes(static_cast<size_t>(whole.bytes()));
  store.read_codes(tensor.name, whole, codes.data());
  std::vector<float> absmax(static_cast<size_t>(whole.blocks()));
  if (geometry.double_quant) {
    std::vector<uint8_t> absmax_codes(static_cast<size_t>(whole.blocks()));
    std::vector<float> nested(static_cast<size_t>(whole.nested_blocks()));
    store.read_absmax_codes(tensor.name, whole, absmax_codes.data());
    store.read_nested_absmax(tensor.name, whole, nested.data());
    kernels::dequantize_absmax(absmax_codes.data(), nested.data(), tensor.nested_offset, whole.blocks(), absmax.data());
  } else {
    store.read_absmax(tensor.name, whole, absmax.data());
  }
  if (geometry.code_bits == 8) {
    kernels::dequantize_int8_rows(reinterpret_cast<const int8_t*>(codes.data()), absmax.data(), tensor.shape[0],
                                  tensor.shape[1], output);
  } else {
    const auto type = store.header().quant_type == "fp4" ? kernels::QuantType::fp4 : kernels::QuantType::nf4;
    kernels::dequantize_4bit(type, codes.data(), absmax.data(), tensor.numel, geometry.blocksize, output);
  }
  return weight;
}

torch::Tensor merged_weight(const shard::ModelStore& store, const Adapter& adapter, const std::string& name) {
  torch::NoGradGuard no_grad;
  auto weight = base_weight(store, store.tensor(name));
  const auto update = adapter.updates.find(name);
  if (update != adapter.updates.end()) {
    const auto lora_a = entry_as_float(*adapter.file, *update->second.lora_a);
    const auto lora_b = entry_as_float(*adapter.file, *update->second.lora_b);
    weight.addmm_(lora_b, lora_a, /*beta=*/1.0, /*alpha=*/update->second.scaling);
  }
  return weight;
}

// ---- the output plan -----------------------------------------------------------------------------

struct PlannedTensor {
  std::string source;            // store tensor name; empty for llama3's computed rope_freqs
  std::string name;              // name in the output
  std::vector<int64_t> shape;    // row-major
  kernels::DType dtype = kernels::DType::f32;    // hf
  uint32_t ggml_type = kernels::ggml_type::f32;  // gguf
  size_t file = 0;
  uint64_t offset = 0;           // absolute, in its file
  uint64_t bytes = 0;
  int rank = 0;
};

struct PlannedFile {
  std::string name;              // relative to the output folder (hf) or the output file itself (gguf)
  std::string header;
  uint64_t size = 0;
};

struct OutputPlan {
  std::vector<PlannedTensor> tensors;
  std::vector<PlannedFile> files;
  std::string output_dtype;
};

kernels::DType output_dtype_of(const std::string& option, const shard::ModelConfig& config) {
  std::string name = option;
  if (name == "auto") name = config.torch_dtype;
  if (name == "bf16" || name == "bfloat16") return kernels::DType::bf16;
  if (name == "fp16" || name == "float16" || name == "f16") return kernels::DType::f16;
  if (name == "fp32" || name == "float32" || name == "f32") return kernels::DType::f32;
  throw UserError("--dtype must be bf16, fp16, fp32 or auto (got '" + option + "')");
}

uint32_t ggml_type_of(const std::string& option) {
  if (option == "f16") return kernels::ggml_type::f16;
  if (option == "bf16") return kernels::ggml_type::bf16;
  if (option == "q8_0") return kernels::ggml_type::q8_0;
  throw UserError("--gguf-type must be f16, bf16 or q8_0 (got '" + option + "')");
}

// Largest tensors first, each to the rank with the fewest bytes so far: the same on every rank.
void assign_ranks(std::vector<PlannedTensor>& tensors, int world) {
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tensors[a].bytes > tensors[b].bytes; });
  std::vector<uint64_t> load(static_cast<size_t>(world), 0);
  for (size_t index : order) {
    const auto lightest = std::min_element(load.begin(), load.end()) - load.begin();
    tensors[index].rank = static_cast<int>(lightest);
    load[static_cast<size_t>(lightest)] += tensors[index].bytes;
  }
}

std::string shard_file_name(size_t index, size_t count) {
  if (count == 1) return "model.safetensors";
  char name[64];
  std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

OutputPlan plan_hf(const shard::ModelStore& store, kernels::DType dtype, int64_t max_shard_bytes) {
  OutputPlan plan;
  plan.output_dtype = kernels::dtype_name(dtype);
  // Shards cut in model order, as transformers' save_pretrained does: a shard closes when the next
  // tensor would take it past the limit (a single larger tensor gets a shard of its own).
  std::vector<std::vector<shard::SafetensorsTensorSpec>> shards(1);
  uint64_t shard_bytes = 0;
  for (const auto& name : store.header().config.tensor_names()) {
    const auto& stored = store.tensor(name);
    const uint64_t bytes = static_cast<uint64_t>(stored.numel) * kernels::dtype_size(dtype);
    if (!shards.back().empty() && shard_bytes + bytes > static_cast<uint64_t>(max_shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back({name, dtype, stored.shape});
    shard_bytes += bytes;
    PlannedTensor tensor;
    tensor.source = name;
    tensor.name = name;
    tensor.shape = stored.shape;
    tensor.dtype = dtype;
    tensor.file = shards.size() - 1;
    plan.tensors.push_back(tensor);
  }
  size_t next = 0;
  for (size_t index = 0; index < shards.size(); ++index) {
    const auto layout = shard::plan_safetensors(shards[index], {{"format", "pt"}});
    plan.files.push_back({shard_file_name(index, shards.size()), layout.header, layout.file_size});
    for (size_t i = 0; i < shards[index].size(); ++i, ++next) {
      plan.tensors[next].offset = layout.file_offsets[i];
      plan.tensors[next].bytes = layout.tensor_bytes[i];
    }
  }
  return plan;
}

// llama.cpp's rope_freqs.weight for llama3 rope scaling: per frequency, how much the scaling divides it.
std::vector<float> llama3_rope_factors(const shard::ModelConfig& config) {
  const auto& scaling = config.rope_scaling;
  const double original = static_cast<double>(scaling.original_max_position_embeddings);
  const double low_wavelength = original / scaling.high_freq_factor;
  const double high_wavelength = original / scaling.low_freq_factor;
  std::vector<float> factors;
  for (int64_t i = 0; i < config.head_dim / 2; ++i) {
    const double frequency =
        1.0 / std::pow(config.rope_theta, static_cast<double>(2 * i) / static_cast<double>(config.head_dim));
    const double wavelength = 2.0 * M_PI / frequency;
    double factor = 1.0;
    if (wavelength > high_wavelength) {
      factor = scaling.factor;
    } else if (wavelength >= low_wavelength) {
      const double smooth = (original / wavelength - scaling.low_freq_factor) /
                            (scaling.high_freq_factor - scaling.low_freq_factor);
      factor = 1.0 / ((1.0 - smooth) / scaling.factor + smooth);
    }
    factors.push_back(static_cast<float>(factor));
  }
  return factors;
}

// The store's tokenizer, or kind "" with a warning when it carries none: a merged model without
// tokenizer files is still worth writing.
shard::TokenizerSource stored_tokenizer(const shard::ModelStore& store) {
  try {
    return shard::store_tokenizer_source(store);
  } catch (const FormatError& error) {
    log::warn(std::string(error.what()) + " - the output gets no tokenizer");
    return {};
  }
}

// The llama.cpp pre-tokenizer name of a tokenizer.json's pre_tokenizer, for the three byte-level
// layouts qlora's own GGUF tokenizer implements; "" for any other.
std::string gguf_pre_tokenizer_name(const Json& pre_tokenizer) {
  const auto byte_level_with_regex = [](const Json& node, bool use_regex) {
    return node.is_object() && node.value("type", "") == "ByteLevel" && node.value("use_regex", true) == use_regex &&
           !node.value("add_prefix_space", false);
  };
  if (byte_level_with_regex(pre_tokenizer, true)) return "gpt2";
  if (!pre_tokenizer.is_object() || pre_tokenizer.value("type", "") != "Sequence") return "";
  const Json& steps = pre_tokenizer.contains("pretokenizers") ? pre_tokenizer.at("pretokenizers") : Json::array();
  if (steps.size() != 2 || !steps[0].is_object()) return "";
  if (steps[0].value("type", "") == "Digits" && steps[0].value("individual_digits", false) &&
      byte_level_with_regex(steps[1], true))
    return "smollm";
  const std::string llama3 =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  if (steps[0].value("type", "") == "Split" && steps[0].contains("pattern") && steps[0].at("pattern").is_object() &&
      steps[0].at("pattern").value("Regex", "") == llama3 && byte_level_with_regex(steps[1], false))
    return "llama-bpe";
  return "";
}

// tokenizer.ggml.* from a byte-level BPE tokenizer.json (the converse of tokenizer_json_from_gguf):
// tokens by id (ids nothing names become "[PAD<id>]", type unused), special added tokens as control
// (type 3), other added tokens as user-defined (type 4), merges as "left right". False (nothing
// added) for another model or pre-tokenizer.
bool add_gguf_tokenizer_from_json(const shard::TokenizerSource& source, shard::GgufHeaderBuilder& builder) {
  const Json tokenizer = parse_json(source.bytes, "tokenizer.json");
  if (!tokenizer.contains("model") || tokenizer.at("model").value("type", "") != "BPE") return false;
  const std::string pre = gguf_pre_tokenizer_name(tokenizer.value("pre_tokenizer", Json()));
  if (pre.empty()) return false;
  const Json& model = tokenizer.at("model");
  std::map<int64_t, std::pair<std::string, int32_t>> by_id;   // id -> token, type
  for (const auto& [token, id] : model.at("vocab").items()) by_id[id.get<int64_t>()] = {token, 1};
  if (tokenizer.contains("added_tokens"))
    for (const auto& added : tokenizer.at("added_tokens"))
      by_id[added.at("id").get<int64_t>()] = {added.at("content").get<std::string>(), added.value("special", true) ? 3 : 4};
  if (by_id.empty() || by_id.begin()->first < 0) return false;
  const int64_t count = by_id.rbegin()->first + 1;
  std::vector<std::string> tokens(static_cast<size_t>(count));
  std::vector<int32_t> types(static_cast<size_t>(count), 5);
  for (int64_t id = 0; id < count; ++id) tokens[static_cast<size_t>(id)] = "[PAD" + std::to_string(id) + "]";
  for (const auto& [id, entry] : by_id) tokens[static_cast<size_t>(id)] = entry.first, types[static_cast<size_t>(id)] = entry.second;
  std::vector<std::string> merges;
  for (const auto& merge : model.value("merges", Json::array()))
    merges.push_back(merge.is_string() ? merge.get<std::string>()
                                       : merge.at(0).get<std::string>() + " " + merge.at(1).get<std::string>());
  builder.add_string("tokenizer.ggml.model", "gpt2");
  builder.add_string("tokenizer.ggml.pre", pre);
  builder.add_string_array("tokenizer.ggml.tokens", tokens);
  builder.add_int32_array("tokenizer.ggml.token_type", types);
  builder.add_string_array("tokenizer.ggml.merges", merges);
  for (const auto& [key, name] : {std::pair<const char*, std::string>{"tokenizer.ggml.bos_token_id", source.bos_token},
                                  {"tokenizer.ggml.eos_token_id", source.eos_token}}) {
    const auto found = std::find(tokens.begin(), tokens.end(), name);
    if (!name.empty() && found != tokens.end()) builder.add_uint32(key, static_cast<uint32_t>(found - tokens.begin()));
  }
  return true;
}

// tokenizer.* keys re-typed as llama.cpp reads them: the store's copy widened integers to int64 and
// floats to float64, and llama.cpp refuses a token id that is not uint32 or a token_type array that
// is not int32.
void add_gguf_tokenizer(const shard::ModelStore& store, shard::GgufHeaderBuilder& builder) {
  const auto source = stored_tokenizer(store);
  if (source.kind.empty()) return;
  if (source.kind == "tokenizer.json" && add_gguf_tokenizer_from_json(source, builder)) return;
  if (source.kind != "gguf") {
    log::warn("the model store's tokenizer is '" + source.kind +
              "': the GGUF carries no tokenizer.* metadata (llama.cpp needs one; convert from a GGUF model to keep it)");
    return;
  }
  auto image = shard::GgufFile::parse(reinterpret_cast<const uint8_t*>(source.bytes.data()), source.bytes.size(),
                                      store.path() + " (tokenizer)");
  for (const auto& entry : image->metadata()) {
    const std::string& key = entry.key;
    switch (entry.type) {
      case shard::GgufType::string: builder.add_string(key, image->get_string(key)); break;
      case shard::GgufType::boolean: builder.add_bool(key, image->get_bool(key)); break;
      case shard::GgufType::float32:
      case shard::GgufType::float64: builder.add_float32(key, static_cast<float>(image->get_float(key))); break;
      case shard::GgufType::array:
        if (entry.element_type == shard::GgufType::string) {
          builder.add_string_array(key, image->get_string_array(key));
        } else if (entry.element_type == shard::GgufType::float32 || entry.element_type == shard::GgufType::float64) {
          const auto values = image->get_float_array(key);
          builder.add_float32_array(key, std::vector<float>(values.begin(), values.end()));
        } else {
          const auto values = image->get_int_array(key);
          builder.add_int32_array(key, std::vector<int32_t>(values.begin(), values.end()));
        }
        break;
      default: builder.add_uint32(key, static_cast<uint32_t>(image->get_int(key))); break;
    }
  }
}

OutputPlan plan_gguf(const shard::ModelStore& store, uint32_t matrix_type, const std::string& model_name) {
  const auto& config = store.header().config;
  if (config.architecture != "llama" && config.architecture != "mistral")
    throw UserError("GGUF export writes llama.cpp's Llama layout, and this model is " + config.architecture,
                    "use --format hf");
  OutputPlan plan;
  plan.output_dtype = kernels::ggml_type_name(matrix_type);
  shard::GgufHeaderBuilder builder;
  const uint32_t file_type = matrix_type == kernels::ggml_type::q8_0 ? 7 : matrix_type == kernels::ggml_type::bf16 ? 32 : 1;
  builder.add_string("general.architecture", "llama");
  builder.add_string("general.name", model_name);
  builder.add_uint32("general.file_type", file_type);
  builder.add_uint32("general.quantization_version", 2);
  builder.add_uint32("llama.vocab_size", static_cast<uint32_t>(config.vocab_size));
  builder.add_uint32("llama.context_length", static_cast<uint32_t>(config.max_position_embeddings));
  builder.add_uint32("llama.embedding_length", static_cast<uint32_t>(config.hidden_size));
  builder.add_uint32("llama.block_count", static_cast<uint32_t>(config.num_hidden_layers));
  builder.add_uint32("llama.feed_forward_length", static_cast<uint32_t>(config.intermediate_size));
  builder.add_uint32("llama.rope.dimension_count", static_cast<uint32_t>(config.head_dim));
  builder.add_uint32("llama.attention.head_count", static_cast<uint32_t>(config.num_attention_heads));
  builder.add_uint32("llama.attention.head_count_kv", static_cast<uint32_t>(config.num_key_value_heads));
  builder.add_uint32("llama.attention.key_length", static_cast<uint32_t>(config.head_dim));
  builder.add_uint32("llama.attention.value_length", static_cast<uint32_t>(config.head_dim));
  builder.add_float32("llama.rope.freq_base", static_cast<float>(config.rope_theta));
  builder.add_float32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(config.rms_norm_eps));
  add_gguf_tokenizer(store, builder);

  std::vector<PlannedTensor> tensors;
  if (config.rope_scaling.type == "llama3") {
    PlannedTensor rope;
    rope.name = "rope_freqs.weight";
    rope.shape = {config.head_dim / 2};
    tensors.push_back(rope);
  }
  for (const auto& name : config.tensor_names()) {
    const auto& stored = store.tensor(name);
    PlannedTensor tensor;
    tensor.source = name;
    tensor.name = shard::llama_gguf_tensor_name(name);
    if (tensor.name.empty()) throw UserError("tensor " + name + " has no llama.cpp name", "use --format hf");
    tensor.shape = stored.shape;
    // Norms stay F32 as llama.cpp's converter keeps them; Q8_0 needs rows of whole 32-blocks, and
    // llama.cpp falls back to F16 for a row that is not.
    tensor.ggml_type = stored.shape.size() == 1 ? kernels::ggml_type::f32
                       : (matrix_type == kernels::ggml_type::q8_0 && stored.shape.back() % 32 != 0)
                           ? kernels::ggml_type::f16
                           : matrix_type;
    tensors.push_back(tensor);
  }
  std::vector<uint64_t> relative;
  for (auto& tensor : tensors) {
    relative.push_back(builder.add_tensor(tensor.name, tensor.shape, tensor.ggml_type));
    int64_t numel = 1;
    for (int64_t dimension : tensor.shape) numel *= dimension;
    tensor.bytes = shard::ggml_tensor_bytes(tensor.ggml_type, numel);
  }
  const std::string header = builder.header();
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].offset = header.size() + relative[i];
  plan.files.push_back({"", header, header.size() + builder.data_bytes()});
  plan.tensors = std::move(tensors);
  return plan;
}

// ---- encoding and writing ------------------------------------------------------------------------

std::string encode(const PlannedTensor& tensor, const torch::Tensor& values, bool gguf) {
  const float* input = values.data_ptr<float>();
  const int64_t n = values.numel();
  std::string out(tensor.bytes, '\0');
  auto* bytes = reinterpret_cast<uint8_t*>(out.data());
  const bool to_f32 = gguf ? tensor.ggml_type == kernels::ggml_type::f32 : tensor.dtype == kernels::DType::f32;
  const bool to_f16 = gguf ? tensor.ggml_type == kernels::ggml_type::f16 : tensor.dtype == kernels::DType::f16;
  const bool to_bf16 = gguf ? tensor.ggml_type == kernels::ggml_type::bf16 : tensor.dtype == kernels::DType::bf16;
  if (to_f32) {
    std::memcpy(bytes, input, static_cast<size_t>(n) * sizeof(float));
  } else if (to_f16 || to_bf16) {
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t half = to_f16 ? kernels::float_to_fp16(input[i]) : kernels::float_to_bf16(input[i]);
      std::memcpy(bytes + 2 * i, &half, sizeof half);
    }
  } else {
    kernels::quantize_q8_0(input, n, bytes);
  }
  return out;
}

[[noreturn]] void write_failed(const std::string& path, int error_number) {
  const bool full = error_number == ENOSPC || error_number == EFBIG || error_number == EDQUOT;
  throw UserError("cannot write " + path + ": " + std::strerror(error_number),
                  full ? "the output file system is full (or a file-size limit was hit): free space or choose "
                         "another --out"
                       : "check that the output folder is writable");
}

class OutputFile {
 public:
  OutputFile(const std::string& path, bool create) : path_(path) {
    fd_ = ::open(path.c_str(), create ? (O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC) : (O_WRONLY | O_CLOEXEC), 0644);
    if (fd_ < 0) write_failed(path, errno);
  }
  ~OutputFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  void write_at(uint64_t offset, const void* data, size_t size) {
    const auto* cursor = static_cast<const uint8_t*>(data);
    while (size > 0) {
      const ssize_t written = ::pwrite(fd_, cursor, std::min<size_t>(size, size_t{1} << 30), static_cast<off_t>(offset));
      if (written < 0) {
        if (errno == EINTR) continue;
        write_failed(path_, errno);
      }
      cursor += written, offset += static_cast<uint64_t>(written), size -= static_cast<size_t>(written);
    }
  }
  void set_size(uint64_t size) {
    if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) write_failed(path_, errno);
  }
  void sync() {
    if (::fsync(fd_) != 0) write_failed(path_, errno);
  }

 private:
  std::string path_;
  int fd_ = -1;
};

// A line redrawn in place on a terminal (plain process only: mpirun hands ranks a pseudo-terminal
// even when its output goes to a file).
class MergeProgress {
 public:
  MergeProgress(bool enabled, int64_t total)
      : enabled_(enabled && log::is_root() && isatty(fileno(stdout)) != 0 &&
                 std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr && std::getenv("SLURM_STEP_ID") == nullptr),
        total_(total), start_(std::chrono::steady_clock::now()) {}
  void tensor_done(const std::string& name) {
    if (!enabled_) return;
    ++done_;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::printf("\r  merging %lld/%lld  %-44s %6.1f s", static_cast<long long>(done_), static_cast<long long>(total_),
                name.c_str(), seconds);
    std::fflush(stdout);
  }
  void finish() {
    if (enabled_) std::printf("\r%100s\r", ""), std::fflush(stdout);
  }

 private:
  bool enabled_;
  int64_t total_;
  int64_t done_ = 0;
  std::chrono::steady_clock::time_point start_;
};

// This process image's peak resident set: VmHWM, not getrusage's ru_maxrss, which keeps the peak of
// the process before exec (a Python parent with torch loaded reported 0.9 GiB for a 0.38 GiB merge).
int64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<int64_t>(usage.ru_maxrss) * 1024;
}

// A tokenizer.json for a byte-level BPE tokenizer that came from GGUF metadata (tokenizer.ggml.model
// "gpt2"), as transformers' GGUF loader builds one: vocabulary and merges, the pre-tokenizer
// tokenizer.ggml.pre names, control tokens (type 3) as special added tokens and user-defined ones
// (type 4) as plain added tokens. Empty when the metadata is another kind or names an unknown
// pre-tokenizer, so nothing misleading is written.
std::string tokenizer_json_from_gguf(const shard::GgufFile& image, std::string* bos_token, std::string* eos_token) {
  if (image.get_string("tokenizer.ggml.model", "") != "gpt2") return "";
  const std::string pre = image.get_string("tokenizer.ggml.pre", "default");
  Json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  Json pre_tokenizer;
  if (pre == "default" || pre == "gpt2") {
    pre_tokenizer = byte_level;
  } else if (pre == "smollm") {
    pre_tokenizer = {{"type", "Sequence"},
                     {"pretokenizers", Json::array({Json{{"type", "Digits"}, {"individual_digits", true}}, byte_level})}};
  } else if (pre == "llama-bpe" || pre == "llama3") {
    byte_level["use_regex"] = false;
    const std::string expression =
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    pre_tokenizer = {{"type", "Sequence"},
                     {"pretokenizers", Json::array({Json{{"type", "Split"}, {"pattern", {{"Regex", expression}}},
                                                         {"behavior", "Isolated"}, {"invert", false}},
                                                    byte_level})}};
  } else {
    return "";
  }
  const auto tokens = image.get_string_array("tokenizer.ggml.tokens");
  std::vector<int64_t> types(tokens.size(), 1);
  if (image.has_key("tokenizer.ggml.token_type")) types = image.get_int_array("tokenizer.ggml.token_type");
  Json vocabulary = Json::object();
  Json added = Json::array();
  for (size_t id = 0; id < tokens.size(); ++id) {
    vocabulary[tokens[id]] = id;
    if (id < types.size() && (types[id] == 3 || types[id] == 4))
      added.push_back({{"id", id}, {"content", tokens[id]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", types[id] == 4}, {"special", types[id] == 3}});
  }
  Json merges = Json::array();
  if (image.has_key("tokenizer.ggml.merges"))
    for (const auto& merge : image.get_string_array("tokenizer.ggml.merges")) merges.push_back(merge);
  const int64_t bos = image.get_int("tokenizer.ggml.bos_token_id", -1);
  const int64_t eos = image.get_int("tokenizer.ggml.eos_token_id", -1);
  if (bos >= 0 && bos < static_cast<int64_t>(tokens.size())) *bos_token = tokens[static_cast<size_t>(bos)];
  if (eos >= 0 && eos < static_cast<int64_t>(tokens.size())) *eos_token = tokens[static_cast<size_t>(eos)];
  Json tokenizer = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
                    {"normalizer", nullptr}, {"pre_tokenizer", pre_tokenizer},
                    {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false},
                                        {"use_regex", true}}},
                    {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
                                 {"use_regex", true}}},
                    {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                               {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                               {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
                               {"vocab", vocabulary}, {"merges", merges}}}};
  return dump_json(tokenizer) + "\n";
}

// config.json, generation_config.json and the tokenizer files, beside the weights.
void write_hf_side_files(const shard::ModelStore& store, const std::string& folder, kernels::DType dtype) {
  const auto& header = store.header();
  Json config = header.config.to_json();
  config["torch_dtype"] = kernels::dtype_name(dtype);
  config.erase("quantization_config");
  const auto source = stored_tokenizer(store);
  int32_t bos = -1, eos = -1;
  if (source.kind != "bytes" && !source.kind.empty()) {
    const auto tokenizer = data::load_tokenizer(source, store.path() + " (tokenizer)");
    bos = tokenizer->bos_id();
    eos = tokenizer->eos_id();
  }
  Json generation = Json::object();
  if (bos >= 0) config["bos_token_id"] = bos, generation["bos_token_id"] = bos;
  if (eos >= 0) config["eos_token_id"] = eos, generation["eos_token_id"] = eos;
  write_file_atomically(folder + "/config.json", dump_json(config, 2) + "\n");
  if (!generation.empty()) {
    generation["_from_model_config"] = true;
    write_file_atomically(folder + "/generation_config.json", dump_json(generation, 2) + "\n");
  }
  Json tokenizer_config = Json::object();
  tokenizer_config["model_max_length"] = header.config.max_position_embeddings;
  if (source.kind == "tokenizer.json") {
    write_file_atomically(folder + "/tokenizer.json", source.bytes);
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast";
    tokenizer_config["clean_up_tokenization_spaces"] = false;
    if (!source.bos_token.empty()) tokenizer_config["bos_token"] = source.bos_token;
    if (!source.eos_token.empty()) tokenizer_config["eos_token"] = source.eos_token;
  } else if (source.kind == "gguf") {
    auto image = shard::GgufFile::parse(reinterpret_cast<const uint8_t*>(source.bytes.data()), source.bytes.size(),
                                        store.path() + " (tokenizer)");
    std::string bos_token, eos_token;
    const std::string text = tokenizer_json_from_gguf(*image, &bos_token, &eos_token);
    if (text.empty()) {
      log::warn("the model store's GGUF tokenizer is not byte-level BPE with a known pre-tokenizer: the folder gets "
                "no tokenizer files");
      return;
    }
    write_file_atomically(folder + "/tokenizer.json", text);
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast";
    tokenizer_config["clean_up_tokenization_spaces"] = false;
    if (!bos_token.empty()) tokenizer_config["bos_token"] = bos_token;
    if (!eos_token.empty()) tokenizer_config["eos_token"] = eos_token;
  } else if (source.kind == "sentencepiece") {
    write_file_atomically(folder + "/tokenizer.model", source.bytes);
    tokenizer_config["tokenizer_class"] = "LlamaTokenizer";
  } else {
    if (!source.kind.empty())
      log::warn("the model store's tokenizer is '" + source.kind + "': the folder gets no tokenizer files");
    return;
  }
  write_file_atomically(folder + "/tokenizer_config.json", dump_json(tokenizer_config, 2) + "\n");
}

void write_hf_index(const OutputPlan& plan, const std::string& folder) {
  if (plan.files.size() < 2) return;
  Json index;
  uint64_t total = 0;
  Json weight_map = Json::object();
  for (const auto& tensor : plan.tensors) {
    total += tensor.bytes;
    weight_map[tensor.name] = plan.files[tensor.file].name;
  }
  index["metadata"]["total_size"] = total;
  index["weight_map"] = weight_map;
  write_file_atomically(folder + "/model.safetensors.index.json", dump_json(index, 2) + "\n");
}

// The removal of a partial output when a later phase fails, on rank 0.
void remove_partial(const std::string& partial) {
  std::error_code ignored;
  fs::remove_all(partial, ignored);
}

}  // namespace

MergeSummary run_merge(const MergeOptions& options, cluster::Communicator& communicator) {
  const auto start = std::chrono::steady_clock::now();
  // A file-size limit (ulimit -f) must fail a write with EFBIG, reported as such, not kill the rank.
  std::signal(SIGXFSZ, SIG_IGN);
  // Every tensor's buffers (tens of MB) are allocated and freed in turn. glibc raises its mmap
  // threshold after each such free, after which same-sized buffers come from the heap, fragment it and
  // are never returned: the peak then grew with the model (0.99 GiB for 24 layers against 0.62 for 12).
  // A fixed threshold keeps large buffers in their own mappings, returned on free.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  const bool gguf = options.format == "gguf";
  const bool root = communicator.rank() == 0;
  if (options.format != "hf" && !gguf) throw UserError("--format must be hf or gguf (got '" + options.format + "')");
  if (options.max_shard_bytes <= 0) throw UserError("--max-shard-size must be positive");
  std::unique_ptr<shard::ModelStore> store;
  Adapter adapter;
  OutputPlan plan;
  kernels::DType dtype = kernels::DType::f32;
  const std::string out = fs::path(options.out).lexically_normal().string();
  const std::string final_path = (!out.empty() && out.back() == '/') ? out.substr(0, out.size() - 1) : out;
  const std::string partial = final_path + ".partial";
  run_collectively(communicator, [&] {
    if (final_path.empty()) throw UserError("--out is required");
    store = shard::ModelStore::open(options.model_path);
    adapter = open_adapter(options.adapter_dir, *store);
    if (gguf) {
      plan = plan_gguf(*store, ggml_type_of(options.gguf_type), fs::path(options.model_path).stem().string());
    } else {
      dtype = output_dtype_of(options.dtype, store->header().config);
      plan = plan_hf(*store, dtype, options.max_shard_bytes);
    }
    if (fs::exists(final_path))
      throw UserError("--out " + final_path + " already exists", "remove it or choose another --out");
    const auto parent = fs::path(final_path).parent_path();
    if (!parent.empty() && !fs::is_directory(parent))
      throw UserError("output folder " + parent.string() + " does not exist", "create it first");
  });
  assign_ranks(plan.tensors, communicator.size());

  // Rank 0 lays the files out (headers written, full size reserved) under the temporary name.
  run_collectively(communicator, [&] {
    if (!root) return;
    remove_partial(partial);   // left by a run that was killed
    try {
      if (!gguf) {
        std::error_code error;
        fs::create_directory(partial, error);
        if (error) write_failed(partial, error.value());
      }
      for (const auto& file : plan.files) {
        OutputFile output(gguf ? partial : partial + "/" + file.name, /*create=*/true);
        output.write_at(0, file.header.data(), file.header.size());
        output.set_size(file.size);
      }
    } catch (...) {
      remove_partial(partial);
      throw;
    }
  });

  int64_t merged = 0, parameters = 0;
  try {
    run_collectively(communicator, [&] {
      int64_t mine = 0;
      for (const auto& tensor : plan.tensors) mine += tensor.rank == communicator.rank();
      MergeProgress progress(options.progress, mine);
      std::vector<std::unique_ptr<OutputFile>> files(plan.files.size());
      for (const auto& tensor : plan.tensors) {
        int64_t numel = 1;
        for (int64_t dimension : tensor.shape) numel *= dimension;
        parameters += tensor.source.empty() ? 0 : numel;
        merged += adapter.updates.count(tensor.source);
        if (tensor.rank != communicator.rank()) continue;
        auto& file = files[tensor.file];
        if (!file) file = std::make_unique<OutputFile>(gguf ? partial : partial + "/" + plan.files[tensor.file].name, false);
        torch::Tensor values;
        if (tensor.source.empty()) {
          const auto factors = llama3_rope_factors(store->header().config);
          values = torch::tensor(factors, torch::kFloat);
        } else {
          values = merged_weight(*store, adapter, tensor.source);
        }
        const auto& config = store->header().config;
        const bool query = tensor.name.find("attn_q.weight") != std::string::npos;
        const bool key = tensor.name.find("attn_k.weight") != std::string::npos;
        if (gguf && (query || key)) {
          auto permuted = torch::empty_like(values);
          shard::permute_llama_rows(reinterpret_cast<const uint8_t*>(values.data_ptr<float>()),
                                    reinterpret_cast<uint8_t*>(permuted.data_ptr<float>()), values.size(0),
                                    static_cast<uint64_t>(values.size(1)) * sizeof(float),
                                    query ? config.num_attention_heads : config.num_key_value_heads);
          values = permuted;
        }
        const std::string bytes = encode(tensor, values, gguf);
        values = torch::Tensor();
        file->write_at(tensor.offset, bytes.data(), bytes.size());
        progress.tensor_done(tensor.name);
      }
      progress.finish();
    });
    // Rank 0 makes the files durable, adds the small files and publishes the whole.
    run_collectively(communicator, [&] {
      if (!root) return;
      for (const auto& file : plan.files) OutputFile(gguf ? partial : partial + "/" + file.name, false).sync();
      if (!gguf) {
        write_hf_side_files(*store, partial, dtype);
        write_hf_index(plan, partial);
      }
      sync_path(partial);
      std::error_code error;
      fs::rename(partial, final_path, error);
      if (error) write_failed(final_path, error.value());
      const auto parent = fs::path(final_path).parent_path();
      sync_path(parent.empty() ? "." : parent.string());
    });
  } catch (...) {
    if (root) remove_partial(partial);
    throw;
  }

  MergeSummary summary;
  summary.tensors = static_cast<int64_t>(plan.tensors.size());
  summary.parameters = parameters;
  summary.merged_modules = merged;
  summary.output_dtype = plan.output_dtype;
  for (const auto& file : plan.files) summary.bytes += file.size;
  if (gguf) {
    summary.files.push_back(final_path);
  } else if (root) {
    for (const auto& entry : fs::directory_iterator(final_path)) summary.files.push_back(entry.path().filename().string());
    std::sort(summary.files.begin(), summary.files.end());
  }
  // Peaks gathered as text: a float all-reduce would round byte counts above 16 MiB.
  for (const auto& record : communicator.gather_to_root(std::to_string(peak_rss_bytes())))
    summary.peak_rss_bytes = std::max<int64_t>(summary.peak_rss_bytes, std::stoll(record));
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

// ---- the command ---------------------------------------------------------------------------------

int run_merge(const std::vector<std::string>& arguments, CommandContext& context) {
  namespace po = boost::program_options;
  MergeOptions merge;
  po::options_description options("qlora merge options");
  options.add_options()
      ("help,h", "show this help")
      ("model", po::value<std::string>(), "4-bit model store (model.h5)")
      ("adapter", po::value<std::string>()->default_value(""), "PEFT adapter folder (runs/NAME/final or PEFT's); empty: the base alone")
      ("out", po::value<std::string>(), "output folder (hf) or file (gguf); must not exist")
      ("format", po::value<std::string>()->default_value(merge.format), "hf (Hugging Face folder) | gguf (llama.cpp)")
      ("dtype", po::value<std::string>()->default_value(merge.dtype), "hf weights: bf16 | fp16 | fp32 | auto (the config's torch_dtype)")
      ("max-shard-size", po::value<std::string>()->default_value("5GB"), "hf: largest safetensors shard, e.g. 2GB, 500MiB")
      ("gguf-type", po::value<std::string>()->default_value(merge.gguf_type), "gguf matrices: f16 | bf16 | q8_0 (norms stay F32)")
      ("threads", po::value<int>()->default_value(0), "compute threads per rank (0: cores / ranks on the node)")
      ("progress", po::value<bool>()->default_value(true), "redraw a progress line on a terminal (1|0)");
  po::variables_map values;
  try {
    po::store(po::command_line_parser(arguments).options(options).run(), values);
    po::notify(values);
  } catch (const po::error& error) {
    throw UserError(error.what(), "see `qlora merge --help`");
  }
  const std::string synopsis =
      "usage: [mpirun -np N] qlora merge --model model.h5 --adapter runs/a/final --out merged/ [--format hf|gguf]";
  if (values.count("help")) {
    if (log::is_root()) std::cout << synopsis << "\n\n" << options << std::flush;
    return 0;
  }
  if (!values.count("model") || !values.count("out"))
    throw UserError("--model and --out are required", synopsis);
  merge.model_path = values["model"].as<std::string>();
  merge.adapter_dir = values["adapter"].as<std::string>();
  merge.out = values["out"].as<std::string>();
  merge.format = values["format"].as<std::string>();
  merge.dtype = values["dtype"].as<std::string>();
  merge.gguf_type = values["gguf-type"].as<std::string>();
  merge.max_shard_bytes = parse_byte_size(values["max-shard-size"].as<std::string>(), "--max-shard-size");
  merge.progress = values["progress"].as<bool>();
  if (merge.format == "gguf" && !values["dtype"].defaulted())
    throw UserError("--dtype applies to --format hf", "for GGUF choose the matrix type with --gguf-type f16|bf16|q8_0");
  assign_threads(context.layout, values["threads"].as<int>());
  const auto summary = run_merge(merge, context.communicator);
  std::string files;
  for (size_t i = 0; i < summary.files.size(); ++i) files += (i ? ", " : "") + summary.files[i];
  char line[512];
  std::snprintf(line, sizeof line,
                "merged %lld adapted linears into %lld tensors (%lld parameters, %s) -> %s: %s written in %.2f s, "
                "peak RSS %s per rank (%d rank%s)",
                static_cast<long long>(summary.merged_modules), static_cast<long long>(summary.tensors),
                static_cast<long long>(summary.parameters), summary.output_dtype.c_str(), merge.out.c_str(),
                format_bytes(static_cast<double>(summary.bytes)).c_str(), summary.seconds,
                format_bytes(static_cast<double>(summary.peak_rss_bytes)).c_str(), context.layout.world,
                context.layout.world > 1 ? "s" : "");
  log::banner(line);
  if (merge.format == "hf") log::banner("  " + files);
  return 0;
}

}  // namespace qlora::launcher
