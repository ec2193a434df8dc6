// Llama-family decoder with sharded 4-bit blocks, LoRA and block-level gradient checkpointing.
#include "model/llama.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cassert>
#include <cmath>

#include "cluster/memory.h"
#include "kernels/double_quant.h"
#include "kernels/int8.h"
#include "kernels/nf4.h"
#include "model/chunked_loss.h"

namespace qlora::model {
namespace {

torch::ScalarType torch_dtype(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::f32: return torch::kFloat;
    case kernels::DType::f16: return torch::kHalf;
    case kernels::DType::bf16: return torch::kBFloat16;
    case kernels::DType::u8: return torch::kUInt8;
    case kernels::DType::i8: return torch::kInt8;
    case kernels::DType::i32: return torch::kInt;
    case kernels::DType::i64: return torch::kLong;
  }
  return torch::kFloat;
}

torch::Tensor read_dense_tensor(const shard::ModelStore& store, const std::string& name) {
  const shard::StoredTensor& stored = store.tensor(name);
  auto tensor = torch::empty(stored.shape, torch::TensorOptions().dtype(torch_dtype(stored.dtype)));
  store.read_dense(name, tensor.data_ptr());
  return tensor;
}

// Rows `range` of a [vocab, hidden] tensor, read as one hyperslab.
torch::Tensor read_vocab_rows(const shard::ModelStore& store, const std::string& name, const shard::VocabRange& range) {
  const shard::StoredTensor& stored = store.tensor(name);
  auto shape = stored.shape;
  shape[0] = range.rows();
  auto tensor = torch::empty(shape, torch::TensorOptions().dtype(torch_dtype(stored.dtype)));
  store.read_dense_rows(name, range.begin, range.end, tensor.data_ptr());
  return tensor;
}

// q, k: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim].
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// A checkpointed block keeps the dropout rows of its first forward, so its recomputation in backward
// draws the same masks whatever the model has been told since.
void save_dropout_rows(torch::autograd::AutogradContext* context, const DropoutSource& rows) {
  context->saved_data["dropout_seed"] = static_cast<int64_t>(rows.seed);
  context->saved_data["dropout_step"] = rows.step;
  context->saved_data["dropout_first_global_row"] = rows.first_global_row;
}

DropoutSource saved_dropout_rows(torch::autograd::AutogradContext* context) {
  DropoutSource rows;
  rows.seed = static_cast<uint64_t>(context->saved_data["dropout_seed"].toInt());
  rows.step = context->saved_data["dropout_step"].toInt();
  rows.first_global_row = context->saved_data["dropout_first_global_row"].toInt();
  return rows;
}

// Reentrant checkpoint of one decoder block (PEFT's default, use_reentrant=True): forward keeps
// only the block input; backward re-gathers, recomputes with grad and back-propagates into the LoRA
// leaves. Like PyTorch's, it produces gradients only if its input requires grad.
struct ReentrantBlockCheckpoint : public torch::autograd::Function<ReentrantBlockCheckpoint> {
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor hidden, int64_t index,
                               int64_t model_address) {
    auto* model = reinterpret_cast<LlamaModelImpl*>(model_address);
    context->save_for_backward({hidden});
    context->saved_data["index"] = index;
    context->saved_data["model"] = model_address;
    save_dropout_rows(context, model->dropout_rows());
    torch::NoGradGuard no_grad;
    return model->run_block(static_cast<size_t>(index), hidden, model->dropout_rows());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* model = reinterpret_cast<LlamaModelImpl*>(context->saved_data["model"].toInt());
    const auto index = static_cast<size_t>(context->saved_data["index"].toInt());
    auto hidden = context->get_saved_variables()[0].detach().requires_grad_(true);
    torch::Tensor output;
    {
      torch::AutoGradMode enable_grad(true);
      output = model->run_block(index, hidden, saved_dropout_rows(context), /*output_value_read=*/false);
    }
    if (index > 0) model->prefetch_block(index - 1);
    torch::autograd::backward({output}, {grad_outputs[0]});
    return {hidden.grad(), torch::Tensor(), torch::Tensor()};
  }
};

// Non-reentrant flavour: the adapters are explicit inputs, so gradients flow to them whether or not
// the block input requires grad, and no input-embedding hook is needed.
struct NonReentrantBlockCheckpoint : public torch::autograd::Function<NonReentrantBlockCheckpoint> {
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor hidden, int64_t index,
                               int64_t model_address, at::TensorList adapter_parameters) {
    auto* model = reinterpret_cast<LlamaModelImpl*>(model_address);
    context->save_for_backward({hidden});
    context->saved_data["index"] = index;
    context->saved_data["model"] = model_address;
    context->saved_data["hidden_requires_grad"] = hidden.requires_grad();
    context->saved_data["adapter_count"] = static_cast<int64_t>(adapter_parameters.size());
    save_dropout_rows(context, model->dropout_rows());
    torch::NoGradGuard no_grad;
    return model->run_block(static_cast<size_t>(index), hidden, model->dropout_rows());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* model = reinterpret_cast<LlamaModelImpl*>(context->saved_data["model"].toInt());
    const auto index = static_cast<size_t>(context->saved_data["index"].toInt());
    const bool hidden_requires_grad = context->saved_data["hidden_requires_grad"].toBool();
    auto hidden = context->get_saved_variables()[0].detach().requires_grad_(hidden_requires_grad);
    torch::Tensor output;
    torch::autograd::variable_list inputs;
    {
      torch::AutoGradMode enable_grad(true);
      output = model->run_block(index, hidden, saved_dropout_rows(context), /*output_value_read=*/false);
    }
    if (index > 0) model->prefetch_block(index - 1);
    if (hidden_requires_grad) inputs.push_back(hidden);
    for (const auto& parameter : model->block_lora_parameters(index)) inputs.push_back(parameter);
    auto grads = torch::autograd::grad({output}, inputs, {grad_outputs[0]}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    torch::autograd::variable_list result = {hidden_requires_grad ? grads[0] : torch::Tensor(), torch::Tensor(),
                                             torch::Tensor()};
    for (size_t i = hidden_requires_grad ? 1 : 0; i < grads.size(); ++i) result.push_back(grads[i]);
    return result;
  }
};

// silu(gate) * up that saves only its two inputs: autograd's own composition also keeps silu(gate),
// a third intermediate-sized tensor per block; backward recomputes it from gate instead.
struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor gate, torch::Tensor up) {
    context->save_for_backward({gate, up});
    return torch::silu(gate) * up;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = context->get_saved_variables();
    const auto& gate = saved[0];
    const auto& up = saved[1];
    const auto& grad = grad_outputs[0];
    auto grad_up = grad * torch::silu(gate);
    auto grad_gate = at::silu_backward(grad * up, gate);
    return {grad_gate, grad_up};
  }
};

// A frozen 4-bit linear, y = x W^T. Like bitsandbytes' MatMul4Bit it keeps no fp32 weight for
// backward: the weight exists only while one product needs it, and backward dequantizes it again
// (grad_x = grad_y W; W is frozen, so x is not saved either).
struct FrozenQuantizedLinear : public torch::autograd::Function<FrozenQuantizedLinear> {
  // value_read = false returns zeros of the product's shape: for the last projection of a block
  // recomputed only to back-propagate, the product's value reaches nothing, and skipping it saves a
  // dequantization and a quarter of the recomputed block's FLOPs.
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor x, int64_t block_address,
                               int64_t tensor_index, int64_t out_features, bool value_read) {
    auto* block = reinterpret_cast<DecoderBlockImpl*>(block_address);
    context->saved_data["block"] = block_address;
    context->saved_data["tensor"] = tensor_index;
    if (!value_read) {
      auto sizes = x.sizes().vec();
      sizes.back() = out_features;
      return torch::zeros(sizes, x.options());
    }
    return torch::matmul(x, block->dequantize_weight(static_cast<size_t>(tensor_index)).t());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* block = reinterpret_cast<DecoderBlockImpl*>(context->saved_data["block"].toInt());
    const auto tensor_index = static_cast<size_t>(context->saved_data["tensor"].toInt());
    auto grad_input = torch::matmul(grad_outputs[0], block->dequantize_weight(tensor_index));
    block->prefetch_previous_block();
    return {grad_input, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// The same frozen product for a DoRA projection, whose caller has already dequantized W (it also
// needs it for the weight norm): forward uses that weight and keeps no reference to it; backward
// dequantizes again like FrozenQuantizedLinear.
struct FrozenLinearGivenWeight : public torch::autograd::Function<FrozenLinearGivenWeight> {
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor x, torch::Tensor weight,
                               int64_t block_address, int64_t tensor_index) {
    context->saved_data["block"] = block_address;
    context->saved_data["tensor"] = tensor_index;
    return torch::matmul(x, weight.t());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* block = reinterpret_cast<DecoderBlockImpl*>(context->saved_data["block"].toInt());
    const auto tensor_index = static_cast<size_t>(context->saved_data["tensor"].toInt());
    auto grad_input = torch::matmul(grad_outputs[0], block->dequantize_weight(tensor_index));
    block->prefetch_previous_block();
    return {grad_input, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor dequantize_gathered(const cluster::GatheredBlock& block, size_t tensor_index, kernels::QuantType type,
                                  at::IntArrayRef shape) {
  auto weight = torch::empty(shape, torch::kFloat);
  float* output = weight.data_ptr<float>();
  const cluster::QuantizedTensorSpec& spec = block.layout().tensors()[tensor_index];
  const int64_t blocksize = spec.geometry.blocksize;
  std::vector<float> decoded_absmax;
  for (const auto& piece : block.pieces(tensor_index)) {
    float* destination = output + piece.element_begin;
    if (spec.geometry.code_bits == 8) {
      kernels::dequantize_int8_rows(reinterpret_cast<const int8_t*>(piece.codes), piece.absmax, piece.blocks, blocksize,
                                    destination);
    } else if (piece.absmax_codes != nullptr) {
      // A piece starts on a second-level block, so its nested absmax index from zero.
      decoded_absmax.resize(static_cast<size_t>(piece.blocks));
      kernels::dequantize_absmax(piece.absmax_codes, piece.nested_absmax, spec.nested_offset, piece.blocks,
                                 decoded_absmax.data());
      kernels::dequantize_4bit(type, piece.codes, decoded_absmax.data(), piece.elements, blocksize, destination);
    } else {
      kernels::dequantize_4bit(type, piece.codes, piece.absmax, piece.elements, blocksize, destination);
    }
  }
  return weight;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  auto statistics_input = x.to(torch::kFloat);
  auto variance = statistics_input.pow(2).mean(-1, /*keepdim=*/true);
  auto normed = statistics_input * torch::rsqrt(variance + eps);
  return weight * normed.to(weight.scalar_type());
}

torch::Tensor rotary_inverse_frequencies(const shard::ModelConfig& config) {
  const int64_t dim = config.head_dim;
  auto inverse = torch::empty({dim / 2}, torch::kDouble);
  auto* values = inverse.data_ptr<double>();
  for (int64_t i = 0; i < dim / 2; ++i) {
    double frequency = 1.0 / std::pow(config.rope_theta, static_cast<double>(2 * i) / static_cast<double>(dim));
    if (config.rope_scaling.type == "llama3") {
      const auto& scaling = config.rope_scaling;
      const double original = static_cast<double>(scaling.original_max_position_embeddings);
      const double low_wavelength = original / scaling.high_freq_factor;
      const double high_wavelength = original / scaling.low_freq_factor;
      const double wavelength = 2.0 * M_PI / frequency;
      if (wavelength > high_wavelength) {
        frequency = frequency / scaling.factor;
      } else if (wavelength >= low_wavelength) {
        const double smooth = (original / wavelength - scaling.low_freq_factor) /
                              (scaling.high_freq_factor - scaling.low_freq_factor);
        frequency = (1.0 - smooth) * frequency / scaling.factor + smooth * frequency;
      }
    }
    values[i] = frequency;
  }
  return inverse.to(torch::kFloat);
}

// ---- decoder block -------------------------------------------------------------------------------

DecoderBlockImpl::DecoderBlockImpl(const shard::ModelConfig& config, int64_t layer_index,
                                   kernels::QuantType quant_type)
    : layer(layer_index), config_(config), quant_type_(quant_type) {
  for (const auto& linear : shard::block_linear_names())
    linear_shapes_.push_back(config_.expected_shape(shard::layer_prefix(layer) + linear + ".weight"));
  dense_weights.resize(linear_shapes_.size());
  gathered_index_.assign(linear_shapes_.size(), -1);
}

void DecoderBlockImpl::add_lora(const LoraConfig& config, at::Generator& init_generator) {
  const auto& names = shard::block_linear_names();
  for (const auto& target : config.resolved_targets()) {
    for (size_t index = 0; index < names.size(); ++index) {
      const std::string& full_name = names[index];
      if (full_name.substr(full_name.find('.') + 1) != target) continue;
      const std::string module_name = shard::layer_prefix(layer) + full_name;
      const auto& shape = linear_shapes_[index];
      auto adapter = LoraAdapter(shape[1], shape[0], config.for_module(module_name), init_generator);
      if (adapter->use_dora()) adapter->initialise_magnitude(dequantize_weight(index));
      adapters.insert_or_assign(target, register_module("lora_" + target, adapter));
    }
  }
}

torch::Tensor DecoderBlockImpl::dequantize_weight(size_t tensor_index) {
  if (gathered_index_[tensor_index] < 0) return dense_weights[tensor_index].to(torch::kFloat);
  const cluster::GatheredBlock weights = gatherer_->acquire(static_cast<size_t>(layer));
  auto weight = dequantize_gathered(weights, static_cast<size_t>(gathered_index_[tensor_index]), quant_type_,
                                    linear_shapes_[tensor_index]);
  gatherer_->poll();
  return weight;
}

torch::Tensor DecoderBlockImpl::project(const std::string& name, size_t tensor_index, const torch::Tensor& x,
                                        const DropoutSource& dropout_source, bool value_read) {
  // Two-dimensional rows, so the adapter can add its update into the frozen product in place.
  const int64_t out_features = linear_shapes_[tensor_index][0];
  const auto rows = x.reshape({-1, x.size(-1)});
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  auto adapter = adapters.find(name);
  auto bias = biases.find(name);
  DropoutSource projection_source = dropout_source;
  projection_source.projection = static_cast<int64_t>(tensor_index);
  if (adapter != adapters.end() && adapter->second->use_dora()) {
    // One dequantization serves the weight norm and the frozen product. value_read is not honoured:
    // the magnitude's gradient reads the product's value.
    const auto weight = dequantize_weight(tensor_index);
    const auto block_address = reinterpret_cast<int64_t>(this);
    const auto frozen_product = [&](const torch::Tensor& input) {
      return FrozenLinearGivenWeight::apply(input, weight, block_address, static_cast<int64_t>(tensor_index));
    };
    auto output = adapter->second->dora_output(rows, weight, frozen_product, projection_source);
    // PEFT scales the product without the bias and adds the bias unscaled.
    if (bias != biases.end()) output = output + bias->second.to(output.scalar_type());
    return output.view(sizes);
  }
  auto output = FrozenQuantizedLinear::apply(rows, reinterpret_cast<int64_t>(this), static_cast<int64_t>(tensor_index),
                                             out_features, value_read);
  if (bias != biases.end()) output = output + bias->second.to(output.scalar_type());
  if (adapter != adapters.end()) adapter->second->add_update(output, rows, projection_source);
  return output.view(sizes);
}

torch::Tensor DecoderBlockImpl::forward(const torch::Tensor& hidden, const AttentionTables& tables,
                                        const DropoutSource& dropout_rows, bool output_value_read) {
  const int64_t batch = hidden.size(0);
  const int64_t sequence = hidden.size(1);
  DropoutSource dropout_source = dropout_rows;
  dropout_source.layer = layer;
  dropout_source.sequence_length = sequence;
  const int64_t heads = config_.num_attention_heads;
  const int64_t kv_heads = config_.num_key_value_heads;
  const int64_t group = heads / kv_heads;
  const int64_t head_dim = config_.head_dim;

  // Locals are dropped as soon as nothing reads them: autograd keeps what backward needs, and without
  // autograd (a checkpointed forward) the block's peak is then one phase's tensors, not all of them.
  torch::Tensor attention;
  {
    auto normed = rms_norm(hidden, input_layernorm, config_.rms_norm_eps).to(torch::kFloat);
    auto q = project("q_proj", 0, normed, dropout_source).view({batch, sequence, heads, head_dim}).transpose(1, 2);
    auto k = project("k_proj", 1, normed, dropout_source).view({batch, sequence, kv_heads, head_dim}).transpose(1, 2);
    auto v = project("v_proj", 2, normed, dropout_source).view({batch, sequence, kv_heads, head_dim}).transpose(1, 2);
    normed.reset();
    // The query's rotary tables carry 1/sqrt(head_dim), so the scores need no scaling pass of their own.
    q = apply_rotary(q, tables.query_cos, tables.query_sin);
    k = apply_rotary(k, tables.cos, tables.sin);
    // Grouped-query attention without repeating k and v: head h reads kv head h / group, so the
    // `group` query heads of one kv head stack into [group * seq] rows against that head's keys.
    auto grouped_query = q.reshape({batch, kv_heads, group * sequence, head_dim});
    q.reset();
    auto scores = torch::matmul(grouped_query, k.transpose(-2, -1));
    grouped_query.reset();
    k.reset();
    scores.masked_fill_(tables.causal_mask, -std::numeric_limits<float>::infinity());
    auto probabilities = torch::softmax(scores, -1);
    scores.reset();
    attention = torch::matmul(probabilities, v);
  }
  attention = attention.view({batch, heads, sequence, head_dim}).transpose(1, 2).reshape({batch, sequence, heads * head_dim});
  auto after_attention = hidden + project("o_proj", 3, attention, dropout_source);
  attention.reset();

  torch::Tensor product;
  {
    auto normed_mlp = rms_norm(after_attention, post_attention_layernorm, config_.rms_norm_eps).to(torch::kFloat);
    auto gate = project("gate_proj", 4, normed_mlp, dropout_source);
    auto up = project("up_proj", 5, normed_mlp, dropout_source);
    normed_mlp.reset();
    product = SwiGlu::apply(gate, up);
  }
  auto mlp = project("down_proj", 6, product, dropout_source, output_value_read);
  product.reset();
  return after_attention + mlp;
}

// ---- model ---------------------------------------------------------------------------------------

LlamaModelImpl::LlamaModelImpl(const shard::ModelStore& store, cluster::Communicator& communicator, int gather_slots)
    : config_(store.header().config), header_(store.header()), communicator_(communicator) {
  const int rank = communicator.rank();
  const int world = communicator.size();
  const auto quant_type = header_.quant_type == "fp4" ? kernels::QuantType::fp4 : kernels::QuantType::nf4;
  int64_t quantized_bytes = 0;
  const int64_t memory_at_start = cluster::MemoryCounter::current_bytes();
  quantized_blocks_ = false;
  for (const auto& stored : store.tensors()) quantized_blocks_ = quantized_blocks_ || stored.quantized;

  if (config_.vocab_size < world)
    throw ModelError("the vocabulary of " + std::to_string(config_.vocab_size) + " tokens cannot be split over " +
                     std::to_string(world) + " ranks (each rank holds at least one embedding row); use at most " +
                     std::to_string(config_.vocab_size) + " ranks");
  vocab_range_ = shard::vocab_range(config_.vocab_size, rank, world);
  embed_tokens =
      register_parameter("embed_tokens", read_vocab_rows(store, "model.embed_tokens.weight", vocab_range_), false);
  if (config_.tie_word_embeddings)
    lm_head = embed_tokens;
  else
    lm_head = register_parameter("lm_head", read_vocab_rows(store, "lm_head.weight", vocab_range_), false);
  load_memory_.embeddings = cluster::MemoryCounter::current_bytes() - memory_at_start;
  final_norm = register_parameter("norm", read_dense_tensor(store, "model.norm.weight"), false);

  std::vector<cluster::FlatShardLayout> layouts;
  std::vector<torch::Tensor> segments;
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    const std::string prefix = shard::layer_prefix(layer);
    auto block = DecoderBlock(config_, layer, quant_type);
    block->input_layernorm =
        block->register_parameter("input_layernorm", read_dense_tensor(store, prefix + "input_layernorm.weight"), false);
    block->post_attention_layernorm = block->register_parameter(
        "post_attention_layernorm", read_dense_tensor(store, prefix + "post_attention_layernorm.weight"), false);
    if (config_.attention_bias) {
      for (const char* projection : {"q_proj", "k_proj", "v_proj"}) {
        block->biases[projection] = block->register_parameter(
            std::string(projection) + "_bias", read_dense_tensor(store, prefix + "self_attn." + projection + ".bias"),
            false);
      }
    }
    std::vector<cluster::QuantizedTensorSpec> specs;
    const auto& linears = shard::block_linear_names();
    for (size_t t = 0; t < linears.size(); ++t) {
      const std::string name = prefix + linears[t] + ".weight";
      const shard::StoredTensor& stored = store.tensor(name);
      if (stored.quantized) {
        block->set_quantized(t, static_cast<int>(specs.size()));
        specs.push_back({name, stored.geometry, stored.nested_offset});
      } else {
        block->dense_weights[t] = block->register_parameter(linears[t].substr(linears[t].find('.') + 1) + "_weight",
                                                            read_dense_tensor(store, name), false);
      }
    }
    if (!quantized_blocks_) {
      blocks_.push_back(register_module("layers_" + std::to_string(layer), block));
      continue;
    }
    cluster::FlatShardLayout layout(specs, world);
    const int64_t before_segment = cluster::MemoryCounter::current_bytes();
    auto segment = torch::zeros({layout.segment_bytes(rank)}, torch::kUInt8);
    quantized_bytes += cluster::MemoryCounter::current_bytes() - before_segment;
    uint8_t* base = segment.data_ptr<uint8_t>();
    for (size_t t = 0; t < specs.size(); ++t) {
      store.read_quantized(specs[t].name, layout.range(rank, t), base + layout.codes_offset(rank, t),
                           base + layout.absmax_offset(rank, t),
                           reinterpret_cast<float*>(base + layout.nested_offset(rank, t)));
    }
    block->register_buffer("quantized_shard", segment);
    layouts.push_back(std::move(layout));
    segments.push_back(segment);
    blocks_.push_back(register_module("layers_" + std::to_string(layer), block));
  }
  const int64_t before_pool = cluster::MemoryCounter::current_bytes();
  gatherer_ = std::make_unique<cluster::BlockGatherer>(communicator_, std::move(layouts), std::move(segments),
                                                       gather_slots);
  load_memory_.gather_pool = cluster::MemoryCounter::current_bytes() - before_pool;
  if (quantized_blocks_)
    for (auto& block : blocks_) block->attach_gatherer(gatherer_.get());
  load_memory_.quantized = quantized_bytes;
  load_memory_.replicated = before_pool - memory_at_start - quantized_bytes;
}

std::vector<std::pair<std::string, torch::Tensor>> LlamaModelImpl::named_model_parameters() {
  std::vector<std::pair<std::string, torch::Tensor>> named = {{"model.embed_tokens.weight", embed_tokens}};
  for (const auto& block : blocks_) {
    const std::string prefix = shard::layer_prefix(block->layer);
    named.emplace_back(prefix + "input_layernorm.weight", block->input_layernorm);
    named.emplace_back(prefix + "post_attention_layernorm.weight", block->post_attention_layernorm);
    for (const auto& [projection, bias] : block->biases) named.emplace_back(prefix + "self_attn." + projection + ".bias", bias);
    for (size_t t = 0; t < block->dense_weights.size(); ++t)
      if (block->dense_weights[t].defined())
        named.emplace_back(prefix + shard::block_linear_names()[t] + ".weight", block->dense_weights[t]);
  }
  named.emplace_back("model.norm.weight", final_norm);
  if (!config_.tie_word_embeddings) named.emplace_back("lm_head.weight", lm_head);
  for (auto& entry : named_lora_parameters()) named.push_back(std::move(entry));
  return named;
}

std::vector<std::pair<std::string, torch::Tensor>> LlamaModelImpl::named_lora_parameters() {
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& block : blocks_) {
    for (const auto& full_name : shard::block_linear_names()) {
      const std::string projection = full_name.substr(full_name.find('.') + 1);
      auto adapter = block->adapters.find(projection);
      if (adapter == block->adapters.end()) continue;
      const std::string module = "base_model.model." + shard::layer_prefix(block->layer) + full_name;
      named.emplace_back(module + ".lora_A.weight", adapter->second->lora_A);
      named.emplace_back(module + ".lora_B.weight", adapter->second->lora_B);
      // PEFT's key has no ".weight" here (the fixture's adapter_model.safetensors shows it).
      if (adapter->second->use_dora())
        named.emplace_back(module + ".lora_magnitude_vector", adapter->second->lora_magnitude_vector);
    }
  }
  return named;
}

std::vector<torch::Tensor> LlamaModelImpl::lora_parameters() {
  std::vector<torch::Tensor> parameters;
  for (auto& [name, parameter] : named_lora_parameters()) parameters.push_back(parameter);
  return parameters;
}

std::vector<torch::Tensor> LlamaModelImpl::block_lora_parameters(size_t index) {
  std::vector<torch::Tensor> parameters;
  for (const auto& full_name : shard::block_linear_names()) {
    auto adapter = blocks_[index]->adapters.find(full_name.substr(full_name.find('.') + 1));
    if (adapter == blocks_[index]->adapters.end()) continue;
    parameters.push_back(adapter->second->lora_A);
    parameters.push_back(adapter->second->lora_B);
    if (adapter->second->use_dora()) parameters.push_back(adapter->second->lora_magnitude_vector);
  }
  return parameters;
}

void LlamaModelImpl::add_lora(const LoraConfig& config, uint64_t seed) {
  lora_config_ = config;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& block : blocks_) block->add_lora(config, generator);
  lora_attached_ = !named_lora_parameters().empty();
}

void LlamaModelImpl::ensure_attention_tables(int64_t sequence_length) {
  if (attention_tables_.cos.defined() && attention_tables_.cos.size(0) == sequence_length) return;
  auto inverse = rotary_inverse_frequencies(config_);
  auto positions = torch::arange(sequence_length, torch::kFloat);
  auto frequencies = torch::outer(positions, inverse);
  auto angles = torch::cat({frequencies, frequencies}, -1);
  AttentionTables tables;
  tables.cos = angles.cos();
  tables.sin = angles.sin();
  const double score_scale = 1.0 / std::sqrt(static_cast<double>(config_.head_dim));
  tables.query_cos = tables.cos * score_scale;
  tables.query_sin = tables.sin * score_scale;
  const int64_t group = config_.num_attention_heads / config_.num_key_value_heads;
  tables.causal_mask =
      torch::ones({sequence_length, sequence_length}, torch::kBool).triu(1).repeat({group, 1});
  attention_tables_ = std::move(tables);
}

void LlamaModelImpl::set_dropout_rows(uint64_t seed, int64_t step, int64_t first_global_row) {
  dropout_rows_.seed = seed;
  dropout_rows_.step = step;
  dropout_rows_.first_global_row = first_global_row;
}

torch::Tensor LlamaModelImpl::run_block(size_t index, const torch::Tensor& hidden, const DropoutSource& dropout_rows,
                                        bool output_value_read) {
  const int64_t sequence = hidden.size(1);
  if (quantized_blocks_) gatherer_->acquire(index);
  // final_hidden built the tables for this sequence length; a recomputing checkpoint reuses them.
  assert(attention_tables_.cos.defined() && attention_tables_.cos.size(0) == sequence);
  return blocks_[index]->forward(hidden, attention_tables_, dropout_rows, output_value_read);
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& tokens) {
  auto hidden = final_hidden(tokens);
  if (communicator_.size() == 1) return torch::linear(hidden, lm_head.to(torch::kFloat));
  TORCH_CHECK(!(hidden.requires_grad() && torch::GradMode::is_enabled()),
              "full logits over several ranks are not differentiable: train with next_token_loss");
  // Every rank's rows times this rank's slice, then every rank's slice of this rank's rows.
  int64_t own_begin = 0;
  const auto all_hidden = all_gather_rows(hidden.detach().reshape({-1, hidden.size(-1)}), communicator_, &own_begin);
  const auto slice_logits = torch::matmul(all_hidden, lm_head.to(torch::kFloat).t()).contiguous();
  const int world = communicator_.size();
  const int64_t total_rows = all_hidden.size(0);
  std::vector<int64_t> byte_counts;
  for (int r = 0; r < world; ++r)
    byte_counts.push_back(total_rows * shard::vocab_range(config_.vocab_size, r, world).rows() *
                          static_cast<int64_t>(sizeof(float)));
  auto every_slice = torch::empty({total_rows * config_.vocab_size}, torch::kFloat);
  communicator_.all_gather(slice_logits.data_ptr(), every_slice.data_ptr(), byte_counts);
  std::vector<torch::Tensor> own_columns;
  const int64_t own_rows = hidden.numel() / hidden.size(-1);
  for (int r = 0; r < world; ++r) {
    const auto range = shard::vocab_range(config_.vocab_size, r, world);
    own_columns.push_back(every_slice.narrow(0, total_rows * range.begin, total_rows * range.rows())
                              .view({total_rows, range.rows()})
                              .narrow(0, own_begin, own_rows));
  }
  auto sizes = hidden.sizes().vec();
  sizes.back() = config_.vocab_size;
  return torch::cat(own_columns, 1).view(sizes);
}

torch::Tensor LlamaModelImpl::next_token_loss(const torch::Tensor& tokens, const torch::Tensor& targets, bool sum) {
  auto hidden = final_hidden(tokens);
  return vocab_parallel_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), lm_head, vocab_range_.begin,
                                      config_.vocab_size, targets.reshape({-1}), communicator_, sum);
}

torch::Tensor LlamaModelImpl::final_hidden(const torch::Tensor& tokens) {
  ensure_attention_tables(tokens.size(1));
  auto hidden = vocab_parallel_embedding(embed_tokens, vocab_range_, tokens, communicator_);
  if (input_require_grads_) hidden.requires_grad_(true);
  const int64_t model_address = reinterpret_cast<int64_t>(this);
  for (size_t index = 0; index < blocks_.size(); ++index) {
    if (quantized_blocks_) {
      gatherer_->acquire(index);  // gather now so the prefetch below overlaps this block's compute
      if (index + 1 < blocks_.size()) gatherer_->prefetch(index + 1);
    }
    if (checkpointing_.enabled && is_training() && torch::GradMode::is_enabled()) {
      if (checkpointing_.reentrant) {
        hidden = ReentrantBlockCheckpoint::apply(hidden, static_cast<int64_t>(index), model_address);
      } else {
        // Passed as a TensorList so autograd registers each adapter as an input of the function.
        const auto adapters = block_lora_parameters(index);
        hidden = NonReentrantBlockCheckpoint::apply(hidden, static_cast<int64_t>(index), model_address,
                                                    at::TensorList(adapters));
      }
    } else {
      hidden = run_block(index, hidden, dropout_rows_);
    }
  }
  return rms_norm(hidden, final_norm, config_.rms_norm_eps).to(torch::kFloat);
}

}  // namespace qlora::model
