// The model on every store layout: imported bitsandbytes checkpoints (tests/fixtures/bnb) give
// transformers' logits on the quantized model; double-quantized and int8 weights dequantize from
// gathered shards of any world size to exactly the whole tensor's values; kept-unquantized
// projections are used as stored.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "cluster/block_gather.h"
#include "cluster/mpi_communicator.h"
#include "kernels/double_quant.h"
#include "kernels/int8.h"
#include "model/llama.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora::model {
namespace {

std::string bnb_fixture(const std::string& name) {
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  return std::string(source != nullptr ? source : ".") + "/tests/fixtures/bnb/" + name;
}

torch::Tensor read_tensor(const shard::SafetensorsFile& file, const std::string& name) {
  const auto& entry = file.at(name);
  auto tensor = torch::empty(entry.shape, entry.dtype == kernels::DType::i64 ? torch::kLong : torch::kFloat);
  std::memcpy(tensor.data_ptr(), file.data(entry), entry.end - entry.begin);
  return tensor;
}

// Logits of the imported checkpoint against two references made from the same saved bytes:
// - transformers' Llama in fp32 with each weight replaced by bitsandbytes' fp32 dequantization: the
//   same arithmetic as qlora up to summation order, so 1e-5 of the largest logit;
// - transformers running the checkpoint with bitsandbytes' CPU kernels (what a user gets): those
//   compute the 4-bit and 8-bit products at reduced precision (the 4-bit weight is decoded into its
//   bf16 quant_state dtype first), so 2e-2 of the largest logit for 4-bit, 5e-3 for int8, and the
//   same arg-max on at least 95% of positions.
TEST(StoreFormats, ImportedBitsandbytesCheckpointsGiveTransformersLogits) {
  struct Case {
    const char* variant;
    double kernel_tolerance;
  };
  for (const Case& test_case : {Case{"nf4_double_quant", 2e-2}, Case{"nf4", 2e-2}, Case{"fp4", 2e-2},
                                Case{"int8", 5e-3}}) {
    SCOPED_TRACE(test_case.variant);
    const std::string path =
        testing_support::shared_temp_dir(MPI_COMM_SELF) + "/import-" + test_case.variant + ".h5";
    shard::convert_hf_directory(bnb_fixture(test_case.variant), path, shard::ConvertOptions{});
    auto store = shard::ModelStore::open(path);
    auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
    LlamaModel model(*store, *communicator);
    // As eval and train do: the 16-bit norms, embeddings and LM head upcast to fp32 (the references
    // were computed with dtype float32).
    prepare::prepare_model_for_kbit_training(*model, prepare::PrepareOptions{});
    auto expected = shard::SafetensorsFile::open(bnb_fixture(std::string(test_case.variant) + "/expected.safetensors"));
    torch::NoGradGuard no_grad;
    const auto logits = model->forward(read_tensor(*expected, "input_ids"));
    auto relative = [&](const torch::Tensor& reference) {
      return (logits - reference).abs().max().item<double>() / reference.abs().max().item<double>();
    };
    const auto exact_reference = read_tensor(*expected, "logits_fp32_dequantized");
    const auto kernel_reference = read_tensor(*expected, "logits");
    const double exact_error = relative(exact_reference);
    const double kernel_error = relative(kernel_reference);
    const auto top1_agreement =
        (logits.argmax(-1) == kernel_reference.argmax(-1)).to(torch::kFloat).mean().item<double>();
    std::printf("%-17s logits vs fp32-dequantized transformers %.3g, vs bitsandbytes kernels %.3g (top-1 agreement "
                "%.3f)\n",
                test_case.variant, exact_error, kernel_error, top1_agreement);
    EXPECT_LT(exact_error, 1e-5);
    EXPECT_LT(kernel_error, test_case.kernel_tolerance);
    EXPECT_GE(top1_agreement, 0.95);
  }
}

// Every rank's segment read from the store and laid side by side is exactly what the all-gather
// delivers; dequantizing from it must give the whole tensor's values for every world size.
TEST(StoreFormats, ShardedDoubleQuantAndInt8WeightsDequantizeLikeTheWholeTensorForAnyWorld) {
  shard::ConvertOptions double_quant;
  double_quant.double_quant = true;
  double_quant.blocksize = 32;
  shard::ConvertOptions int8;
  int8.int8 = true;
  for (const shard::ConvertOptions& options : {double_quant, int8}) {
    const std::string path = testing_support::shared_temp_dir(MPI_COMM_SELF) +
                             (options.int8 ? "/gather-int8.h5" : "/gather-dq.h5");
    shard::convert_synthetic("tiny", path, options);
    auto store = shard::ModelStore::open(path);
    const std::string prefix = shard::layer_prefix(2);
    std::vector<cluster::QuantizedTensorSpec> specs;
    for (const auto& linear : shard::block_linear_names()) {
      const auto& stored = store->tensor(prefix + linear + ".weight");
      specs.push_back({stored.name, stored.geometry, stored.nested_offset});
    }
    // The whole tensors, decoded without any sharding.
    std::vector<torch::Tensor> whole;
    {
      cluster::FlatShardLayout single(specs, 1);
      std::vector<uint8_t> buffer(single.gathered_bytes());
      for (size_t t = 0; t < specs.size(); ++t)
        store->read_quantized(specs[t].name, single.range(0, t), buffer.data() + single.codes_offset(0, t),
                              buffer.data() + single.absmax_offset(0, t),
                              reinterpret_cast<float*>(buffer.data() + single.nested_offset(0, t)));
      cluster::GatheredBlock block(&single, buffer.data());
      for (size_t t = 0; t < specs.size(); ++t)
        whole.push_back(dequantize_gathered(block, t, kernels::QuantType::nf4, store->tensor(specs[t].name).shape));
    }
    // An independent decode of one tensor as a check on the single-rank path itself.
    {
      const auto& stored = store->tensor(specs[1].name);
      const auto range = shard::shard_range(stored.geometry, 0, 1);
      std::vector<uint8_t> codes(range.bytes());
      std::vector<float> values(stored.numel);
      if (options.int8) {
        std::vector<float> scales(range.blocks());
        store->read_codes(stored.name, range, codes.data());
        store->read_absmax(stored.name, range, scales.data());
        kernels::dequantize_int8_rows(reinterpret_cast<const int8_t*>(codes.data()), scales.data(), stored.shape[0],
                                      stored.shape[1], values.data());
      } else {
        std::vector<uint8_t> absmax_codes(range.blocks());
        std::vector<float> nested(range.nested_blocks()), absmax(range.blocks());
        store->read_quantized(stored.name, range, codes.data(), absmax_codes.data(), nested.data());
        kernels::dequantize_absmax(absmax_codes.data(), nested.data(), stored.nested_offset, range.blocks(),
                                   absmax.data());
        kernels::dequantize_4bit(kernels::QuantType::nf4, codes.data(), absmax.data(), stored.numel, 32, values.data());
      }
      EXPECT_TRUE(torch::equal(whole[1].flatten(), torch::from_blob(values.data(), {stored.numel}, torch::kFloat)));
    }
    for (int world = 2; world <= 4; ++world) {
      cluster::FlatShardLayout layout(specs, world);
      std::vector<uint8_t> gathered(layout.gathered_bytes());
      for (int rank = 0; rank < world; ++rank) {
        uint8_t* segment = gathered.data() + layout.segment_offset(rank);
        for (size_t t = 0; t < specs.size(); ++t)
          store->read_quantized(specs[t].name, layout.range(rank, t), segment + layout.codes_offset(rank, t),
                                segment + layout.absmax_offset(rank, t),
                                reinterpret_cast<float*>(segment + layout.nested_offset(rank, t)));
      }
      cluster::GatheredBlock block(&layout, gathered.data());
      for (size_t t = 0; t < specs.size(); ++t) {
        const auto sharded = dequantize_gathered(block, t, kernels::QuantType::nf4, store->tensor(specs[t].name).shape);
        EXPECT_TRUE(torch::equal(sharded, whole[t])) << (options.int8 ? "int8 " : "double-quant ") << specs[t].name
                                                     << " world " << world;
      }
    }
  }
}

DecoderBlockImpl& first_block(LlamaModel& model) {
  for (const auto& child : model->named_children())
    if (child.key() == "layers_0") return *std::dynamic_pointer_cast<DecoderBlockImpl>(child.value());
  throw std::logic_error("no layers_0");
}

TEST(StoreFormats, KeptUnquantizedProjectionsAreUsedAsStored) {
  const std::string folder = testing_support::shared_temp_dir(MPI_COMM_SELF);
  shard::ConvertOptions options;
  shard::convert_synthetic("micro", folder + "/keep-none.h5", options);
  options.keep_unquantized = "down_proj";
  shard::convert_synthetic("micro", folder + "/keep-down.h5", options);
  options.keep_unquantized = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";
  shard::convert_synthetic("micro", folder + "/keep-all.h5", options);
  options.quantize = false;
  shard::convert_synthetic("micro", folder + "/dense.h5", options);
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_SELF);
  auto quantized_store = shard::ModelStore::open(folder + "/keep-none.h5");
  auto kept_store = shard::ModelStore::open(folder + "/keep-down.h5");
  auto all_kept_store = shard::ModelStore::open(folder + "/keep-all.h5");
  auto dense_store = shard::ModelStore::open(folder + "/dense.h5");
  LlamaModel quantized(*quantized_store, *communicator);
  LlamaModel kept(*kept_store, *communicator);
  LlamaModel all_kept(*all_kept_store, *communicator);
  LlamaModel dense(*dense_store, *communicator);
  torch::NoGradGuard no_grad;
  // down_proj (index 6) comes from the stored bf16 values; the six others are the NF4 ones.
  for (size_t t = 0; t < 7; ++t) {
    const auto& expected_from = t == 6 ? dense : quantized;
    EXPECT_TRUE(torch::equal(first_block(kept).dequantize_weight(t),
                             first_block(const_cast<LlamaModel&>(expected_from)).dequantize_weight(t)))
        << "projection " << t;
  }
  // Keeping every projection is the unquantized model, to the bit.
  torch::manual_seed(3);
  const auto tokens = torch::randint(0, 512, {2, 16}, torch::kLong);
  EXPECT_TRUE(torch::equal(all_kept->forward(tokens), dense->forward(tokens)));
  EXPECT_EQ(all_kept_store->header().quant_method, "bnb-4bit");
  int down_proj_parameters = 0;
  for (const auto& [name, parameter] : kept->named_model_parameters())
    if (name.find("down_proj.weight") != std::string::npos) {
      ++down_proj_parameters;
      auto stored = torch::empty(parameter.sizes(), torch::kBFloat16);
      kept_store->read_dense(name, stored.data_ptr());
      EXPECT_TRUE(torch::equal(parameter, stored)) << name;
    }
  EXPECT_EQ(down_proj_parameters, 2);
}

}  // namespace
}  // namespace qlora::model
