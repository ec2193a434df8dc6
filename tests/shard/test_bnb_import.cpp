// Pre-quantized bitsandbytes checkpoints (tests/fixtures/bnb, scripts/make_bnb_checkpoint_fixtures.py:
// transformers + bitsandbytes 0.50 save_pretrained) import byte for byte; the converter's
// --double-quant, --quant-type int8 and --keep-unquantized reproduce bitsandbytes' bytes from the
// 16-bit source; double-quantized and int8 stores shard at the right boundaries for any world size.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "common/json.h"
#include "kernels/double_quant.h"
#include "kernels/dtype.h"
#include "kernels/int8.h"
#include "kernels/nf4.h"
#include "shard/converter.h"
#include "shard/model_store.h"
#include "shard/safetensors.h"
#include "shard/shard_plan.h"
#include "support/test_support.h"

namespace qlora::shard {
namespace {

using testing_support::shared_temp_dir;

std::string fixture(const std::string& name) {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/fixtures/bnb/" + name;
}

std::string convert_fixture(const std::string& variant, const ConvertOptions& options = {},
                            const std::string& suffix = "") {
  const std::string out = shared_temp_dir(MPI_COMM_SELF) + "/" + variant + suffix + ".h5";
  convert_hf_directory(fixture(variant), out, options);
  return out;
}

std::vector<uint8_t> checkpoint_bytes(const SafetensorsCheckpoint& checkpoint, const std::string& name) {
  const auto& entry = checkpoint.entry(name);
  const uint8_t* data = checkpoint.data(name);
  return std::vector<uint8_t>(data, data + (entry.end - entry.begin));
}

struct StoredBytes {
  std::vector<uint8_t> codes;
  std::vector<uint8_t> absmax;   // fp32 values or uint8 codes, as stored
  std::vector<uint8_t> nested;
};

StoredBytes read_whole(const ModelStore& store, const std::string& name) {
  const StoredTensor& tensor = store.tensor(name);
  const ShardRange whole = shard_range(tensor.geometry, 0, 1);
  StoredBytes bytes;
  bytes.codes.resize(whole.bytes());
  bytes.absmax.resize(whole.blocks() * tensor.geometry.absmax_bytes_per_block());
  bytes.nested.resize(whole.nested_blocks() * sizeof(float));
  store.read_quantized(name, whole, bytes.codes.data(), bytes.absmax.data(),
                       reinterpret_cast<float*>(bytes.nested.data()));
  return bytes;
}

// The whole tensor dequantized to fp32 from the store, through the kernels' public decoders.
std::vector<float> dequantize_whole(const ModelStore& store, const std::string& name) {
  const StoredTensor& tensor = store.tensor(name);
  const StoredBytes bytes = read_whole(store, name);
  std::vector<float> values(tensor.numel);
  if (tensor.geometry.code_bits == 8) {
    kernels::dequantize_int8_rows(reinterpret_cast<const int8_t*>(bytes.codes.data()),
                                  reinterpret_cast<const float*>(bytes.absmax.data()), tensor.shape[0], tensor.shape[1],
                                  values.data());
    return values;
  }
  std::vector<float> absmax(tensor.geometry.blocks());
  if (tensor.geometry.double_quant)
    kernels::dequantize_absmax(bytes.absmax.data(), reinterpret_cast<const float*>(bytes.nested.data()),
                               tensor.nested_offset, tensor.geometry.blocks(), absmax.data());
  else
    std::memcpy(absmax.data(), bytes.absmax.data(), absmax.size() * sizeof(float));
  const auto type = store.header().quant_type == "fp4" ? kernels::QuantType::fp4 : kernels::QuantType::nf4;
  kernels::dequantize_4bit(type, bytes.codes.data(), absmax.data(), tensor.numel, tensor.geometry.blocksize,
                           values.data());
  return values;
}

std::vector<std::string> block_linears(const ModelStore& store) {
  std::vector<std::string> names;
  for (const auto& tensor : store.tensors())
    if (ModelConfig::is_block_linear(tensor.name)) names.push_back(tensor.name);
  return names;
}

// ---- import of pre-quantized checkpoints ----------------------------------------------------------

void expect_four_bit_import_is_bytewise(const std::string& variant, const char* quant_type, bool nested) {
  SCOPED_TRACE(variant);
  auto store = ModelStore::open(convert_fixture(variant));
  auto checkpoint = SafetensorsCheckpoint::open_directory(fixture(variant));
  EXPECT_EQ(store->header().quant_method, "bnb-4bit");
  EXPECT_EQ(store->header().quant_type, quant_type);
  EXPECT_EQ(store->header().blocksize, 64);
  EXPECT_EQ(store->header().double_quant, nested);
  const auto names = block_linears(*store);
  ASSERT_EQ(names.size(), 14u);
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    const StoredTensor& tensor = store->tensor(name);
    ASSERT_TRUE(tensor.quantized);
    EXPECT_EQ(tensor.dtype, kernels::DType::bf16) << "the quant_state's dtype";
    const StoredBytes bytes = read_whole(*store, name);
    EXPECT_EQ(bytes.codes, checkpoint_bytes(*checkpoint, name));
    EXPECT_EQ(bytes.absmax, checkpoint_bytes(*checkpoint, name + ".absmax"));
    if (nested) {
      EXPECT_EQ(bytes.nested, checkpoint_bytes(*checkpoint, name + ".nested_absmax"));
      const auto state_bytes = checkpoint_bytes(*checkpoint, name + ".quant_state.bitsandbytes__" + quant_type);
      const Json state = parse_json(std::string(state_bytes.begin(), state_bytes.end()), name);
      EXPECT_EQ(tensor.nested_offset, static_cast<float>(state.at("nested_offset").get<double>()));
    } else {
      EXPECT_TRUE(bytes.nested.empty());
    }
  }
  // Embeddings, norms and LM head stay as saved (bf16).
  const auto& embed = checkpoint->entry("model.embed_tokens.weight");
  std::vector<uint8_t> dense((embed.end - embed.begin));
  store->read_dense("model.embed_tokens.weight", dense.data());
  EXPECT_EQ(dense, checkpoint_bytes(*checkpoint, "model.embed_tokens.weight"));
}

TEST(BitsandbytesImport, Nf4WithDoubleQuantizationIsCopiedByteForByte) {
  expect_four_bit_import_is_bytewise("nf4_double_quant", "nf4", true);
}

TEST(BitsandbytesImport, Nf4AndFp4WithoutDoubleQuantizationAreCopiedByteForByte) {
  expect_four_bit_import_is_bytewise("nf4", "nf4", false);
  expect_four_bit_import_is_bytewise("fp4", "fp4", false);
}

TEST(BitsandbytesImport, Int8CodesAndRowScalesAreCopiedByteForByte) {
  auto store = ModelStore::open(convert_fixture("int8"));
  auto checkpoint = SafetensorsCheckpoint::open_directory(fixture("int8"));
  EXPECT_EQ(store->header().quant_method, "bnb-8bit");
  EXPECT_EQ(store->header().quant_type, "int8");
  for (const auto& name : block_linears(*store)) {
    SCOPED_TRACE(name);
    const StoredTensor& tensor = store->tensor(name);
    ASSERT_TRUE(tensor.quantized);
    EXPECT_EQ(tensor.geometry.code_bits, 8);
    EXPECT_EQ(tensor.geometry.blocksize, tensor.shape[1]) << "one scale per row";
    const StoredBytes bytes = read_whole(*store, name);
    EXPECT_EQ(bytes.codes, checkpoint_bytes(*checkpoint, name));
    EXPECT_EQ(bytes.absmax, checkpoint_bytes(*checkpoint, name.substr(0, name.size() - 7) + ".SCB"));
  }
}

TEST(BitsandbytesImport, DequantizedWeightsEqualBitsandbytesOwnDequantization) {
  // The reference is bitsandbytes' dequantize_4bit / int8_vectorwise_dequant of the saved bytes.
  // It decodes 4-bit weights into the quant_state dtype (bf16 here): round ours the same way and
  // they must agree exactly; int8 decodes in fp32 and must agree exactly as is.
  for (const std::string variant : {"nf4_double_quant", "nf4", "fp4", "int8"}) {
    SCOPED_TRACE(variant);
    auto store = ModelStore::open(convert_fixture(variant));
    auto expected = SafetensorsFile::open(fixture(variant + "/expected.safetensors"));
    for (const std::string module : {"model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.v_proj"}) {
      SCOPED_TRACE(module);
      std::vector<float> ours = dequantize_whole(*store, module + ".weight");
      if (variant != "int8")
        for (float& value : ours) value = kernels::bf16_to_float(kernels::float_to_bf16(value));
      const auto& entry = expected->at(module + ".dequantized");
      ASSERT_EQ(entry.numel(), static_cast<int64_t>(ours.size()));
      const auto* reference = reinterpret_cast<const float*>(expected->data(entry));
      int64_t mismatches = 0;
      for (size_t i = 0; i < ours.size(); ++i) mismatches += ours[i] != reference[i];
      EXPECT_EQ(mismatches, 0);
    }
  }
}

// ---- the converter reproduces bitsandbytes' bytes from the 16-bit source ----------------------------

TEST(Converter, DoubleQuantizationReproducesBitsandbytesBytesFromTheSource) {
  ConvertOptions options;
  options.double_quant = true;
  options.backend = kernels::BitsandbytesBackend::cpu;  // the fixtures were quantized without a GPU
  auto store = ModelStore::open(convert_fixture("source", options, "-double-quant"));
  auto checkpoint = SafetensorsCheckpoint::open_directory(fixture("nf4_double_quant"));
  EXPECT_TRUE(store->header().double_quant);
  EXPECT_EQ(store->header().format_version, kStoreFormatVersion);
  for (const auto& name : block_linears(*store)) {
    SCOPED_TRACE(name);
    const StoredBytes bytes = read_whole(*store, name);
    EXPECT_EQ(bytes.codes, checkpoint_bytes(*checkpoint, name));
    EXPECT_EQ(bytes.absmax, checkpoint_bytes(*checkpoint, name + ".absmax"));
    EXPECT_EQ(bytes.nested, checkpoint_bytes(*checkpoint, name + ".nested_absmax"));
  }
  // 0.5 + 1/64 + 4/(64*256) bytes per quantized parameter (FACTS.md), against 0.5625 without.
  const StoredTensor& gate = store->tensor("model.layers.0.mlp.gate_proj.weight");
  EXPECT_NEAR(static_cast<double>(gate.geometry.stored_bytes()) / gate.numel, 0.5 + 1.0 / 64 + 4.0 / (64 * 256), 1e-4);
}

TEST(Converter, Int8ReproducesBitsandbytesBytesFromTheSource) {
  ConvertOptions options;
  options.int8 = true;
  auto store = ModelStore::open(convert_fixture("source", options, "-int8"));
  auto checkpoint = SafetensorsCheckpoint::open_directory(fixture("int8"));
  EXPECT_EQ(store->header().quant_method, "bnb-8bit");
  for (const auto& name : block_linears(*store)) {
    SCOPED_TRACE(name);
    EXPECT_EQ(store->tensor(name).dtype, kernels::DType::bf16) << "the source dtype";
    const StoredBytes bytes = read_whole(*store, name);
    EXPECT_EQ(bytes.codes, checkpoint_bytes(*checkpoint, name));
    EXPECT_EQ(bytes.absmax, checkpoint_bytes(*checkpoint, name.substr(0, name.size() - 7) + ".SCB"));
  }
}

TEST(Converter, KeepUnquantizedLeavesTheListedModulesInTheSourceDtype) {
  ConvertOptions options;
  options.keep_unquantized = "lm_head,down_proj,layers.1.self_attn.q_proj";
  const std::string path = convert_fixture("source", options, "-keep");
  auto store = ModelStore::open(path);
  auto checkpoint = SafetensorsCheckpoint::open_directory(fixture("source"));
  EXPECT_EQ(store->header().unquantized_modules, options.keep_unquantized);
  int dense = 0;
  for (const auto& name : block_linears(*store)) {
    const bool kept = name.find("down_proj") != std::string::npos || name == "model.layers.1.self_attn.q_proj.weight";
    EXPECT_EQ(store->tensor(name).quantized, !kept) << name;
    if (!kept) continue;
    ++dense;
    std::vector<uint8_t> bytes(store->tensor(name).numel * 2);
    store->read_dense(name, bytes.data());
    EXPECT_EQ(bytes, checkpoint_bytes(*checkpoint, name)) << name;
  }
  EXPECT_EQ(dense, 3);
  EXPECT_FALSE(store->tensor("lm_head.weight").quantized);
  // A suffix matches whole name components only.
  EXPECT_TRUE(module_listed("model.layers.3.mlp.down_proj.weight", "up_proj,down_proj"));
  EXPECT_FALSE(module_listed("model.layers.3.mlp.down_proj.weight", "proj"));
  EXPECT_FALSE(module_listed("model.layers.3.mlp.down_proj.weight", ""));
}

// ---- bad bitsandbytes checkpoints ---------------------------------------------------------------------

// Copies a fixture folder, letting `edit` change its tensors (name -> bytes) or its config.json text.
std::string edited_copy(const std::string& variant, const std::string& label,
                        const std::function<void(std::map<std::string, std::pair<SafetensorsEntry, std::vector<uint8_t>>>&,
                                                 std::string&)>& edit) {
  const std::string folder = shared_temp_dir(MPI_COMM_SELF) + "/" + variant + "-" + label;
  std::filesystem::create_directories(folder);
  auto file = SafetensorsFile::open(fixture(variant + "/model.safetensors"));
  std::map<std::string, std::pair<SafetensorsEntry, std::vector<uint8_t>>> tensors;
  for (const auto& entry : file->entries())
    tensors[entry.name] = {entry, std::vector<uint8_t>(file->data(entry), file->data(entry) + (entry.end - entry.begin))};
  std::ifstream config_in(fixture(variant + "/config.json"));
  std::string config((std::istreambuf_iterator<char>(config_in)), std::istreambuf_iterator<char>());
  edit(tensors, config);
  SafetensorsWriter writer;
  for (auto& [name, tensor] : tensors)
    writer.add(name, tensor.first.dtype, tensor.first.shape, tensor.second.data(), tensor.second.size());
  writer.write(folder + "/model.safetensors");
  std::ofstream(folder + "/config.json") << config;
  return folder;
}

void expect_refused(const std::string& folder, const std::vector<std::string>& fragments) {
  try {
    convert_hf_directory(folder, folder + ".h5", ConvertOptions{});
    FAIL() << folder << " converted";
  } catch (const FormatError& error) {
    for (const auto& fragment : fragments)
      EXPECT_NE(std::string(error.what()).find(fragment), std::string::npos) << error.what();
  }
  EXPECT_FALSE(std::filesystem::exists(folder + ".h5"));
}

TEST(BitsandbytesImport, BadCheckpointsAreRefusedNamingTheTensor) {
  const std::string k_proj = "model.layers.0.self_attn.k_proj.weight";
  expect_refused(edited_copy("nf4_double_quant", "no-nested", [&](auto& tensors, std::string&) {
                   tensors.erase(k_proj + ".nested_absmax");
                 }),
                 {k_proj + ".nested_absmax", "nested absmax"});
  expect_refused(edited_copy("nf4", "bad-map", [&](auto& tensors, std::string&) {
                   auto& map = tensors[k_proj + ".quant_map"].second;
                   float first = 0.5f;
                   std::memcpy(map.data(), &first, sizeof first);
                 }),
                 {k_proj + ".quant_map", "NF4 table"});
  expect_refused(edited_copy("nf4", "bad-state", [&](auto& tensors, std::string&) {
                   auto& state = tensors[k_proj + ".quant_state.bitsandbytes__nf4"].second;
                   state.back() = 'x';
                 }),
                 {k_proj + ".quant_state.bitsandbytes__nf4", "invalid JSON"});
  expect_refused(edited_copy("nf4", "short-absmax", [&](auto& tensors, std::string&) {
                   auto& absmax = tensors[k_proj + ".absmax"];
                   absmax.first.shape = {absmax.first.shape[0] - 1};
                   absmax.second.resize(absmax.second.size() - 4);
                 }),
                 {k_proj + ".absmax", "elements"});
  expect_refused(edited_copy("int8", "format", [&](auto& tensors, std::string&) {
                   tensors["model.layers.0.self_attn.k_proj.weight_format"].second[0] = 1;
                 }),
                 {"weight_format", "row-major"});
  expect_refused(edited_copy("nf4", "gptq", [&](auto&, std::string& config) {
                   config.replace(config.find("\"bitsandbytes\""), 14, "\"gptq\"");
                 }),
                 {"config.json", "gptq"});
  expect_refused(edited_copy("nf4", "says-8bit", [&](auto&, std::string& config) {
                   config.replace(config.find("\"load_in_4bit\": true"), 20, "\"load_in_4bit\": false");
                   config.replace(config.find("\"load_in_8bit\": false"), 21, "\"load_in_8bit\": true");
                 }),
                 {"self_attn.q_proj.weight", "stored 4-bit", "load_in_8bit"});
}

// ---- shard cuts for double quantization and int8, any world size ---------------------------------

TEST(ShardPlan, DoubleQuantizedAndInt8TensorsSplitAtTheirBoundariesForAnyWorld) {
  ConvertOptions double_quant;
  double_quant.double_quant = true;
  double_quant.blocksize = 32;
  ConvertOptions int8;
  int8.int8 = true;
  for (const ConvertOptions& options : {double_quant, int8}) {
    const std::string path = shared_temp_dir(MPI_COMM_SELF) + (options.int8 ? "/tiny-int8.h5" : "/tiny-dq.h5");
    convert_synthetic("tiny", path, options);
    auto reference = ModelStore::open(path);
    uint64_t quantized_total = 0;
    double one_unit_per_tensor = 0;  // how far a balanced cut can stray from total / N
    int64_t smallest_world_limit = 1 << 30;
    for (const auto& tensor : reference->tensors()) {
      if (!tensor.quantized) continue;
      quantized_total += tensor.geometry.stored_bytes();
      one_unit_per_tensor += static_cast<double>(shard_bytes(tensor.geometry, shard_range(tensor.geometry, 0,
                                                                                          max_world_for(tensor.geometry))));
      smallest_world_limit = std::min(smallest_world_limit, max_world_for(tensor.geometry));
    }
    // tiny's k_proj: 128 x 256 = 32768 weights = 1024 blocks of 32 = 4 second-level blocks.
    EXPECT_EQ(smallest_world_limit, options.int8 ? 128 : 4);
    for (int world = 1; world <= 4; ++world) {
      SCOPED_TRACE("world " + std::to_string(world));
      std::vector<uint64_t> bytes_read(world);
      for (const auto& tensor : reference->tensors()) {
        if (!tensor.quantized) continue;
        const StoredBytes whole = read_whole(*reference, tensor.name);
        StoredBytes rebuilt{std::vector<uint8_t>(whole.codes.size()), std::vector<uint8_t>(whole.absmax.size()),
                            std::vector<uint8_t>(whole.nested.size())};
        int64_t previous_end = 0;
        for (int rank = 0; rank < world; ++rank) {
          const ShardRange range = shard_range(tensor.geometry, rank, world);
          EXPECT_EQ(range.block_begin, previous_end);
          EXPECT_EQ(range.block_begin % tensor.geometry.blocks_per_cut(), 0) << "cut inside a second-level block";
          if (tensor.geometry.double_quant) {
            EXPECT_EQ(range.nested_begin * 256, range.block_begin);
          }
          previous_end = range.block_end;
          auto store = ModelStore::open(path);
          const int64_t absmax_size = tensor.geometry.absmax_bytes_per_block();
          store->read_quantized(tensor.name, range, rebuilt.codes.data() + range.byte_begin,
                                rebuilt.absmax.data() + range.block_begin * absmax_size,
                                reinterpret_cast<float*>(rebuilt.nested.data()) + range.nested_begin);
          EXPECT_EQ(static_cast<int64_t>(store->bytes_read()), shard_bytes(tensor.geometry, range));
          bytes_read[rank] += store->bytes_read();
        }
        EXPECT_EQ(previous_end, tensor.geometry.blocks());
        EXPECT_EQ(rebuilt.codes, whole.codes) << tensor.name;
        EXPECT_EQ(rebuilt.absmax, whole.absmax) << tensor.name;
        EXPECT_EQ(rebuilt.nested, whole.nested) << tensor.name;
      }
      // Each rank reads total / N of the quantized bytes give or take one cut unit per tensor.
      for (int rank = 0; rank < world; ++rank) {
        EXPECT_NEAR(static_cast<double>(bytes_read[rank]), static_cast<double>(quantized_total) / world,
                    one_unit_per_tensor)
            << "rank " << rank;
        if (world == 4) std::printf("%s world 4 rank %d reads %.4f of the quantized bytes\n",
                                    options.int8 ? "int8" : "double-quant", rank,
                                    static_cast<double>(bytes_read[rank]) / quantized_total);
      }
    }
  }
}

}  // namespace
}  // namespace qlora::shard
