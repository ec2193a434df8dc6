// qlora merge end to end, through the binary: merged weights against an independent reference
// (bitsandbytes' plain dequantization + scaling * B @ A in double), the merged folder converted back
// and run against the 4-bit model with the unmerged adapter (logits and loss), GGUF read back by the
// repo's reader (F16/BF16 exact to the cast, Q8_0 within its error bound, Q/K rows un-permuted),
// mismatched / unreadable adapters and a full disk (exit 2, nothing under the final name), and two
// ranks writing byte-identical output to one.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <set>

#include "cluster/mpi_communicator.h"
#include "common/json.h"
#include "data/tokenizer.h"
#include "kernels/double_quant.h"
#include "kernels/ggml_blocks.h"
#include "kernels/nf4.h"
#include "launcher/adapter_io.h"
#include "model/llama.h"
#include "prepare/prepare.h"
#include "shard/gguf.h"
#include "shard/llama_tensor_map.h"
#include "shard/model_store.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing_support::qlora_binary;
using testing_support::read_file;
using testing_support::run_command;
using testing_support::shared_temp_dir;

const char* kMpirun = "mpirun --oversubscribe --allow-run-as-root -np 2 ";

// A store converted by the binary (so double quantization and int8 are covered too), once per name.
std::string store_with(const std::string& name, const std::string& flags) {
  const std::string path = shared_temp_dir() + "/" + name + ".h5";
  if (!fs::exists(path)) {
    std::string output;
    EXPECT_EQ(run_command(qlora_binary() + " convert --synthetic micro --seed 7 " + flags + " --out " + path, &output), 0)
        << output;
  }
  return path;
}

// A seeded adapter with non-zero B on q, k, v, o, gate and down (not up), a rank and alpha pattern,
// so each module has its own scaling.
model::LoraConfig adapter_config() {
  model::LoraConfig config;
  config.r = 4;
  config.alpha = 8;
  config.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"};
  config.rank_pattern["down_proj"] = 2;
  config.alpha_pattern["model.layers.1.self_attn.k_proj"] = 3.0;
  return config;
}

std::string write_adapter(const std::string& name, const shard::ModelStore& store, uint64_t seed,
                          const model::LoraConfig& config = adapter_config()) {
  const std::string directory = shared_temp_dir() + "/" + name;
  torch::manual_seed(static_cast<int64_t>(seed));
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  const auto targets = config.resolved_targets();
  for (int64_t layer = 0; layer < store.header().config.num_hidden_layers; ++layer)
    for (const auto& full_name : shard::block_linear_names()) {
      const std::string projection = full_name.substr(full_name.find('.') + 1);
      if (std::find(targets.begin(), targets.end(), projection) == targets.end()) continue;
      const std::string module = shard::layer_prefix(layer) + full_name;
      const auto& shape = store.tensor(module + ".weight").shape;
      const int64_t r = config.for_module(module).r;
      tensors.emplace_back("base_model.model." + module + ".lora_A.weight", torch::randn({r, shape[1]}) * 0.2);
      tensors.emplace_back("base_model.model." + module + ".lora_B.weight", torch::randn({shape[0], r}) * 0.1);
    }
  launcher::write_peft_adapter(directory, tensors, config, store.path());
  return directory;
}

std::string run_merge_cli(const std::string& model, const std::string& adapter, const std::string& out, const std::string& flags,
                  int expected_exit = 0, const std::string& prefix = "") {
  std::string output;
  EXPECT_EQ(run_command(prefix + qlora_binary() + " merge --model " + model + " --adapter " + adapter + " --out " + out +
                            " " + flags,
                        &output),
            expected_exit)
      << output;
  return output;
}

// The independent reference of one merged tensor, in double: bitsandbytes' plain dequantization
// (the scalar reference decoder, absmax decoded from its nested form first) plus alpha/r * B @ A.
// `magnitude` (optional) receives |base| + scaling * sum |B||A| per element: the scale of fp32 rounding.
std::vector<double> reference_weight(const shard::ModelStore& store, const std::string& name, const std::string& adapter_dir,
                                     std::vector<double>* magnitude = nullptr) {
  const auto& tensor = store.tensor(name);
  std::vector<float> base(static_cast<size_t>(tensor.numel));
  if (!tensor.quantized) {
    std::vector<uint8_t> raw(static_cast<size_t>(tensor.numel) * kernels::dtype_size(tensor.dtype));
    store.read_dense(name, raw.data());
    kernels::convert_to_float(tensor.dtype, raw.data(), tensor.numel, base.data());
  } else {
    const auto whole = shard::shard_range(tensor.geometry, 0, 1);
    std::vector<uint8_t> codes(static_cast<size_t>(whole.bytes()));
    store.read_codes(name, whole, codes.data());
    std::vector<float> absmax(static_cast<size_t>(whole.blocks()));
    if (tensor.geometry.double_quant) {
      std::vector<uint8_t> absmax_codes(absmax.size());
      std::vector<float> nested(static_cast<size_t>(whole.nested_blocks()));
      store.read_absmax_codes(name, whole, absmax_codes.data());
      store.read_nested_absmax(name, whole, nested.data());
      const float* map = kernels::dynamic_map();
      for (size_t i = 0; i < absmax.size(); ++i) absmax[i] = map[absmax_codes[i]] * nested[i / 256] + tensor.nested_offset;
    } else {
      store.read_absmax(name, whole, absmax.data());
    }
    if (tensor.geometry.code_bits == 8) {
      const int64_t cols = tensor.shape[1];
      for (int64_t i = 0; i < tensor.numel; ++i)
        base[i] = (static_cast<float>(static_cast<int8_t>(codes[i])) * absmax[i / cols]) * 7.874015718698502e-3f;
    } else {
      kernels::dequantize_4bit_reference(store.header().quant_type == "fp4" ? kernels::QuantType::fp4 : kernels::QuantType::nf4,
                                         codes.data(), absmax.data(), tensor.numel, tensor.geometry.blocksize, base.data());
    }
  }
  std::vector<double> result(base.begin(), base.end());
  if (magnitude != nullptr)
    for (float value : base) magnitude->push_back(std::abs(value));
  if (adapter_dir.empty() || tensor.shape.size() != 2) return result;
  const std::string module = name.substr(0, name.size() - 7);   // without ".weight"
  auto weights = shard::SafetensorsFile::open(adapter_dir + "/adapter_model.safetensors");
  const auto* a = weights->find("base_model.model." + module + ".lora_A.weight");
  const auto* b = weights->find("base_model.model." + module + ".lora_B.weight");
  if (a == nullptr) return result;
  const auto config = launcher::read_peft_adapter_config(adapter_dir).for_module(module);
  const double scaling = config.alpha / static_cast<double>(config.r);
  const float* a_values = reinterpret_cast<const float*>(weights->data(*a));
  const float* b_values = reinterpret_cast<const float*>(weights->data(*b));
  const int64_t rows = tensor.shape[0], cols = tensor.shape[1], r = a->shape[0];
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t i = 0; i < cols; ++i) {
      double sum = 0, absolute = 0;
      for (int64_t k = 0; k < r; ++k) {
        const double product = static_cast<double>(b_values[o * r + k]) * a_values[k * cols + i];
        sum += product;
        absolute += std::abs(product);
      }
      result[static_cast<size_t>(o * cols + i)] += scaling * sum;
      if (magnitude != nullptr) (*magnitude)[static_cast<size_t>(o * cols + i)] += scaling * absolute;
    }
  return result;
}

std::vector<float> as_floats(const shard::SafetensorsCheckpoint& checkpoint, const std::string& name) {
  const auto& entry = checkpoint.entry(name);
  std::vector<float> values(static_cast<size_t>(entry.numel()));
  kernels::convert_to_float(entry.dtype, checkpoint.data(name), entry.numel(), values.data());
  return values;
}

void expect_matches_reference(const std::string& store_path, const std::string& adapter, const std::string& folder,
                              double relative_tolerance) {
  auto store = shard::ModelStore::open(store_path);
  auto merged = shard::SafetensorsCheckpoint::open_directory(folder);
  ASSERT_EQ(merged->tensor_names().size(), store->tensors().size());
  int changed = 0;
  for (const auto& tensor : store->tensors()) {
    std::vector<double> magnitude;
    const auto reference = reference_weight(*store, tensor.name, adapter, &magnitude);
    const auto values = as_floats(*merged, tensor.name);
    ASSERT_EQ(values.size(), reference.size()) << tensor.name;
    double worst = 0;
    for (size_t i = 0; i < values.size(); ++i)
      worst = std::max(worst, std::abs(values[i] - reference[i]) / (magnitude[i] + 1e-30));
    EXPECT_LE(worst, relative_tolerance) << tensor.name;
    const auto base = reference_weight(*store, tensor.name, "");
    changed += base != reference;
  }
  EXPECT_EQ(changed, 2 * 6);   // six targeted projections in each of the two layers
}

TEST(Merge, Fp32WeightsEqualTheIndependentReference) {
  for (const auto& [name, flags] : std::vector<std::pair<std::string, std::string>>{
           {"nf4", ""}, {"nf4_double", "--double-quant"}, {"fp4_128", "--quant-type fp4 --blocksize 128"},
           {"int8", "--quant-type int8"}}) {
    const std::string store_path = store_with(name, flags);
    auto store = shard::ModelStore::open(store_path);
    const std::string adapter = write_adapter("adapter_" + name, *store, 11);
    const std::string out = shared_temp_dir() + "/merged_fp32_" + name;
    const std::string output = run_merge_cli(store_path, adapter, out, "--dtype fp32");
    EXPECT_NE(output.find("merged 12 adapted linears into 21 tensors"), std::string::npos) << output;
    // fp32 addmm (r <= 4 products, one addition) against a double-precision sum: a few fp32 ulps of
    // the terms' magnitude (fp32 epsilon 1.2e-7).
    expect_matches_reference(store_path, adapter, out, 8e-7);
    const Json config = parse_json(read_file(out + "/config.json"), "config.json");
    EXPECT_EQ(config.at("torch_dtype"), "float32");
    EXPECT_FALSE(config.contains("quantization_config"));
    EXPECT_EQ(config.at("num_hidden_layers"), 2);
  }
}

TEST(Merge, Bf16ShardsCastTheFp32MergeOnceAndIndexThem) {
  const std::string store_path = store_with("nf4", "");
  auto store = shard::ModelStore::open(store_path);
  const std::string adapter = write_adapter("adapter_shards", *store, 12);
  const std::string fp32 = shared_temp_dir() + "/shards_fp32";
  const std::string bf16 = shared_temp_dir() + "/shards_bf16";
  run_merge_cli(store_path, adapter, fp32, "--dtype fp32");
  run_merge_cli(store_path, adapter, bf16, "--dtype bf16 --max-shard-size 60KB");
  const Json index = parse_json(read_file(bf16 + "/model.safetensors.index.json"), "index");
  EXPECT_EQ(index.at("weight_map").size(), 21u);
  uint64_t total = 0;
  std::set<std::string> shard_files;
  for (const auto& [name, file] : index.at("weight_map").items()) {
    shard_files.insert(file.get<std::string>());
    total += static_cast<uint64_t>(store->tensor(name).numel) * 2;
  }
  EXPECT_EQ(index.at("metadata").at("total_size").get<uint64_t>(), total);
  EXPECT_GE(shard_files.size(), 4u);
  for (const auto& file : shard_files) {
    EXPECT_NE(file.find("-of-0000" + std::to_string(shard_files.size())), std::string::npos) << file;
    // Each shard at most the limit, unless it holds one tensor larger than the limit.
    auto shard_file = shard::SafetensorsFile::open(bf16 + "/" + file);
    EXPECT_TRUE(shard_file->entries().size() == 1 || shard_file->file_size() - 0 <= 60'000 + 4096) << file;
  }
  auto exact = shard::SafetensorsCheckpoint::open_directory(fp32);
  auto cast = shard::SafetensorsCheckpoint::open_directory(bf16);
  for (const auto& name : exact->tensor_names()) {
    const auto values = as_floats(*exact, name);
    const auto& entry = cast->entry(name);
    ASSERT_EQ(entry.dtype, kernels::DType::bf16);
    const auto* bits = reinterpret_cast<const uint16_t*>(cast->data(name));
    for (size_t i = 0; i < values.size(); ++i) ASSERT_EQ(bits[i], kernels::float_to_bf16(values[i])) << name << " " << i;
  }
}

// Logits of a store (with or without an adapter) on fixed tokens, one rank.
torch::Tensor logits_of(const std::string& store_path, const std::string& adapter, const torch::Tensor& tokens,
                        double* loss) {
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  auto store = shard::ModelStore::open(store_path);
  model::LlamaModel model(*store, *communicator);
  // As qlora eval does: the preparation protocol upcasts a 4-bit model's 16-bit norms and
  // embeddings to fp32 (an fp32 merge then matches it; bf16 norms would round the activations).
  prepare::PrepareOptions prepare_options;
  prepare_options.use_gradient_checkpointing = false;
  prepare::prepare_model_for_kbit_training(*model, prepare_options);
  if (!adapter.empty()) launcher::load_peft_adapter(adapter, *model);
  torch::NoGradGuard no_grad;
  auto logits = model->forward(tokens);
  auto shifted = logits.slice(1, 0, -1).reshape({-1, logits.size(-1)});
  *loss = torch::nn::functional::cross_entropy(shifted, tokens.slice(1, 1).reshape(-1)).item<double>();
  return logits;
}

TEST(Merge, ConvertedBackItGivesTheUnmergedAdaptersLogits) {
  for (const std::string name : {"nf4", "nf4_double"}) {
    const std::string store_path = store_with(name, name == "nf4" ? "" : "--double-quant");
    auto store = shard::ModelStore::open(store_path);
    const std::string adapter = write_adapter("adapter_roundtrip_" + name, *store, 13);
    const std::string out = shared_temp_dir() + "/roundtrip_" + name;
    run_merge_cli(store_path, adapter, out, "--dtype fp32");
    std::string output;
    const std::string back = shared_temp_dir() + "/roundtrip_" + name + ".h5";
    ASSERT_EQ(run_command(qlora_binary() + " convert --from " + out + " --quant-type none --out " + back, &output), 0)
        << output;
    torch::manual_seed(5);
    const auto tokens = torch::randint(0, 512, {2, 48}, torch::kLong);
    double merged_loss = 0, adapter_loss = 0, base_loss = 0;
    const auto merged = logits_of(back, "", tokens, &merged_loss);
    const auto unmerged = logits_of(store_path, adapter, tokens, &adapter_loss);
    const auto base = logits_of(store_path, "", tokens, &base_loss);
    const double scale = unmerged.abs().max().item<double>();
    EXPECT_LE((merged - unmerged).abs().max().item<double>() / scale, 1e-4);
    EXPECT_NEAR(merged_loss, adapter_loss, 1e-4 * adapter_loss);
    // The adapter matters: without it the logits are far away.
    EXPECT_GT((base - unmerged).abs().max().item<double>() / scale, 1e-2);
  }
}

TEST(Merge, GgufReadsBackAsTheMergedWeights) {
  const std::string store_path = store_with("nf4", "");
  auto store = shard::ModelStore::open(store_path);
  const auto& config = store->header().config;
  const std::string adapter = write_adapter("adapter_gguf", *store, 14);
  const std::string fp32 = shared_temp_dir() + "/gguf_reference";
  run_merge_cli(store_path, adapter, fp32, "--dtype fp32");
  auto exact = shard::SafetensorsCheckpoint::open_directory(fp32);
  for (const std::string type : {"f16", "bf16", "q8_0"}) {
    const std::string path = shared_temp_dir() + "/merged_" + type + ".gguf";
    run_merge_cli(store_path, adapter, path, "--format gguf --gguf-type " + type);
    auto file = shard::GgufFile::open(path);
    EXPECT_EQ(file->version(), 3u);
    EXPECT_EQ(file->get_string("general.architecture"), "llama");
    const auto read_config = shard::llama_config_from_gguf(*file);
    EXPECT_EQ(read_config.hidden_size, config.hidden_size);
    EXPECT_EQ(read_config.num_key_value_heads, config.num_key_value_heads);
    EXPECT_EQ(read_config.intermediate_size, config.intermediate_size);
    EXPECT_EQ(read_config.vocab_size, config.vocab_size);
    EXPECT_EQ(file->tensors().size(), store->tensors().size());
    for (const auto& tensor : file->tensors()) {
      const std::string hf_name = shard::llama_hf_tensor_name(tensor.name);
      ASSERT_FALSE(hf_name.empty()) << tensor.name;
      EXPECT_EQ(tensor.shape, store->tensor(hf_name).shape) << tensor.name;
      auto values = file->dequantize(tensor);
      if (tensor.name.find("attn_q") != std::string::npos || tensor.name.find("attn_k") != std::string::npos) {
        std::vector<float> rows(values.size());
        shard::unpermute_llama_rows(reinterpret_cast<const uint8_t*>(values.data()), reinterpret_cast<uint8_t*>(rows.data()),
                                    tensor.shape[0], static_cast<uint64_t>(tensor.shape[1]) * sizeof(float),
                                    tensor.name.find("attn_q") != std::string::npos ? config.num_attention_heads
                                                                                     : config.num_key_value_heads);
        values = rows;
      }
      const auto expected = as_floats(*exact, hf_name);
      if (tensor.shape.size() == 1) {
        EXPECT_EQ(tensor.type, kernels::ggml_type::f32) << tensor.name;
        EXPECT_EQ(values, expected) << tensor.name;
        continue;
      }
      if (type != "q8_0") {
        EXPECT_EQ(tensor.type, type == "f16" ? kernels::ggml_type::f16 : kernels::ggml_type::bf16);
        for (size_t i = 0; i < values.size(); ++i) {
          const float cast = type == "f16" ? kernels::fp16_to_float(kernels::float_to_fp16(expected[i]))
                                           : kernels::bf16_to_float(kernels::float_to_bf16(expected[i]));
          ASSERT_EQ(values[i], cast) << tensor.name << " " << i;
        }
        continue;
      }
      // Rows of 172 (down_proj's input) are not whole 32-blocks: llama.cpp's fallback is F16.
      EXPECT_EQ(tensor.type, tensor.shape[1] % 32 == 0 ? kernels::ggml_type::q8_0 : kernels::ggml_type::f16) << tensor.name;
      if (tensor.type != kernels::ggml_type::q8_0) continue;
      const int64_t cols = tensor.shape[1];
      for (size_t block = 0; block < values.size() / 32; ++block) {
        // Compare in GGUF row order: blocks never straddle rows (cols % 32 == 0), so compare per
        // element through the un-permuted index, bounded by half a step plus d's fp16 rounding.
        float largest = 0;
        for (int j = 0; j < 32; ++j) largest = std::max(largest, std::abs(expected[block * 32 + j]));
        const double bound = largest / 127.0 * 0.5 + largest * std::ldexp(1.0, -11) + 1e-12;
        for (int j = 0; j < 32; ++j)
          ASSERT_LE(std::abs(values[block * 32 + j] - expected[block * 32 + j]), bound)
              << tensor.name << " block " << block << " cols " << cols;
      }
    }
  }
}


// A store converted from a folder with a byte-level BPE tokenizer.json: the GGUF's tokenizer.ggml.*
// keys, loaded by qlora's GGUF tokenizer, give the tokenizer.json's ids on the fixture texts (SmolLM2's
// Digits + ByteLevel layout and Llama 3's split expression), with the same bos / eos.
TEST(Merge, GgufCarriesATokenizerJsonsTokenizer) {
  const Json cases = parse_json(read_file(testing_support::source_dir() + "/tests/fixtures/tokenizers/cases.json"), "cases");
  for (const std::string name : {"austen_bpe", "austen_llama3"}) {
    const std::string folder = shared_temp_dir() + "/hf_" + name;
    fs::create_directories(folder);
    for (const std::string file : {"config.json", "model.safetensors"})
      fs::copy_file(testing_support::source_dir() + "/tests/fixtures/model/llama/hf/" + file, folder + "/" + file,
                    fs::copy_options::overwrite_existing);
    const std::string json_text = read_file(testing_support::source_dir() + "/tests/fixtures/tokenizers/" + name + ".json");
    testing_support::write_file(folder + "/tokenizer.json", json_text);
    testing_support::write_file(folder + "/tokenizer_config.json",
                                "{\"bos_token\": \"<|im_start|>\", \"eos_token\": \"<|endoftext|>\"}");
    std::string output;
    ASSERT_EQ(run_command(qlora_binary() + " convert --from " + folder + " --out " + folder + ".h5", &output), 0) << output;
    const std::string path = folder + ".gguf";
    EXPECT_EQ(run_command(qlora_binary() + " merge --model " + folder + ".h5 --out " + path + " --format gguf", &output), 0)
        << output;
    auto file = shard::GgufFile::open(path);
    EXPECT_EQ(file->get_string("tokenizer.ggml.pre"), name == "austen_bpe" ? "smollm" : "llama-bpe");
    EXPECT_EQ(file->find_key("tokenizer.ggml.token_type")->element_type, shard::GgufType::int32);
    const auto from_gguf = data::load_gguf_tokenizer(*file);
    const auto from_json = data::load_tokenizer_json(json_text, name);
    // austen_bpe names both tokens; austen_llama3 has neither, so the GGUF carries no ids for them.
    EXPECT_EQ(file->has_key("tokenizer.ggml.bos_token_id"), name == "austen_bpe");
    EXPECT_EQ(from_gguf->bos_id(), file->get_int("tokenizer.ggml.bos_token_id", -1));
    EXPECT_EQ(from_gguf->eos_id(), file->get_int("tokenizer.ggml.eos_token_id", -1));
    if (name == "austen_bpe") EXPECT_GE(from_gguf->eos_id(), 0);
    EXPECT_EQ(from_gguf->vocab_size(), from_json->vocab_size());
    int texts = 0;
    for (const auto& text : cases.at("texts")) {
      const std::string value = text.get<std::string>();
      EXPECT_EQ(from_gguf->encode(value), from_json->encode(value)) << name << ": " << value;
      ++texts;
    }
    EXPECT_GE(texts, 20);
  }
}

bool partial_or_final_left(const std::string& out) { return fs::exists(out) || fs::exists(out + ".partial"); }

TEST(Merge, MismatchedOrUnreadableAdaptersExit2LeavingNothing) {
  const std::string store_path = store_with("nf4", "");
  auto store = shard::ModelStore::open(store_path);
  const std::string out = shared_temp_dir() + "/refused";
  std::string output;

  // Shapes: an adapter for the hidden-256 model on the hidden-64 one.
  ASSERT_EQ(run_command(qlora_binary() + " convert --synthetic tiny --out " + shared_temp_dir() + "/tiny_store.h5", &output), 0);
  auto tiny = shard::ModelStore::open(shared_temp_dir() + "/tiny_store.h5");
  model::LoraConfig two_layers = adapter_config();
  const std::string tiny_adapter = write_adapter("adapter_tiny", *tiny, 15, two_layers);
  output = run_merge_cli(store_path, tiny_adapter, out, "", 2);
  EXPECT_NE(output.find("has shape"), std::string::npos) << output;
  EXPECT_FALSE(partial_or_final_left(out));

  // A target the architecture does not have.
  model::LoraConfig config = adapter_config();
  const std::string bad_targets = write_adapter("adapter_bad_targets", *store, 16, config);
  Json adapter_json = parse_json(read_file(bad_targets + "/adapter_config.json"), "adapter_config.json");
  adapter_json["target_modules"] = Json::array({"q_proj", "wqkv"});
  testing_support::write_file(bad_targets + "/adapter_config.json", dump_json(adapter_json));
  output = run_merge_cli(store_path, bad_targets, out, "", 2);
  EXPECT_NE(output.find("wqkv"), std::string::npos) << output;
  EXPECT_FALSE(partial_or_final_left(out));

  // Tensors the config does not target (it claims q_proj only, the file holds six projections).
  adapter_json["target_modules"] = Json::array({"q_proj"});
  testing_support::write_file(bad_targets + "/adapter_config.json", dump_json(adapter_json));
  output = run_merge_cli(store_path, bad_targets, out, "", 2);
  EXPECT_NE(output.find("has no counterpart"), std::string::npos) << output;

  // A missing tensor, and a truncated weights file.
  const std::string broken = write_adapter("adapter_broken", *store, 17);
  const std::string weights = read_file(broken + "/adapter_model.safetensors");
  testing_support::write_file(broken + "/adapter_model.safetensors", weights.substr(0, weights.size() / 2));
  output = run_merge_cli(store_path, broken, out, "", 2);
  EXPECT_NE(output.find("adapter_model.safetensors"), std::string::npos) << output;
  EXPECT_FALSE(partial_or_final_left(out));
  output = run_merge_cli(store_path, shared_temp_dir() + "/no_such_adapter", out, "", 2);
  EXPECT_NE(output.find("no such folder"), std::string::npos) << output;

  // An existing output is never replaced.
  testing_support::write_file(out + "/keep.txt", "mine");
  output = run_merge_cli(store_path, write_adapter("adapter_ok", *store, 18), out, "", 2);
  EXPECT_NE(output.find("already exists"), std::string::npos) << output;
  EXPECT_EQ(read_file(out + "/keep.txt"), "mine");
  fs::remove_all(out);
}

TEST(Merge, AFullDiskExits2AndLeavesNothingUnderTheFinalName) {
  const std::string store_path = store_with("nf4", "");
  auto store = shard::ModelStore::open(store_path);
  const std::string adapter = write_adapter("adapter_full", *store, 19);
  for (const std::string& format : {std::string("--dtype fp32"), std::string("--format gguf --gguf-type f16")}) {
    const std::string out = shared_temp_dir() + (format.find("gguf") != std::string::npos ? "/full.gguf" : "/full");
    // ulimit -f 64: writes past 64 KiB fail with EFBIG, as writes on a full disk fail with ENOSPC.
    // (PMIx's shared-memory store would hit the limit first in MPI_Init; its hash store does not.)
    std::string output;
    EXPECT_EQ(run_command("bash -c 'ulimit -f 64; PMIX_MCA_gds=hash " + qlora_binary() + " merge --model " + store_path + " --adapter " +
                              adapter + " --out " + out + " " + format + "'",
                          &output),
              2)
        << output;
    EXPECT_NE(output.find("File too large"), std::string::npos) << output;
    EXPECT_NE(output.find("free space"), std::string::npos) << output;
    EXPECT_FALSE(partial_or_final_left(out)) << out;
  }
}

TEST(Merge, TwoRanksWriteTheSameBytesAsOne) {
  const std::string store_path = store_with("nf4_double", "--double-quant");
  auto store = shard::ModelStore::open(store_path);
  const std::string adapter = write_adapter("adapter_ranks", *store, 20);
  for (const std::string& format : {std::string("--dtype bf16 --max-shard-size 80KB"), std::string("--format gguf --gguf-type q8_0")}) {
    const bool gguf = format.find("gguf") != std::string::npos;
    const std::string one = shared_temp_dir() + (gguf ? "/one_rank.gguf" : "/one_rank");
    const std::string two = shared_temp_dir() + (gguf ? "/two_ranks.gguf" : "/two_ranks");
    run_merge_cli(store_path, adapter, one, format);
    const std::string output = run_merge_cli(store_path, adapter, two, format, 0, kMpirun);
    EXPECT_NE(output.find("(2 ranks)"), std::string::npos) << output;
    std::vector<std::string> files;
    if (gguf) {
      files.push_back("");
    } else {
      for (const auto& entry : fs::directory_iterator(one)) files.push_back("/" + entry.path().filename().string());
      EXPECT_GE(files.size(), 4u);
      size_t count = 0;
      for ([[maybe_unused]] const auto& entry : fs::directory_iterator(two)) ++count;
      EXPECT_EQ(count, files.size());
    }
    for (const auto& file : files) EXPECT_TRUE(read_file(one + file) == read_file(two + file)) << file;
  }
}

}  // namespace
}  // namespace qlora
