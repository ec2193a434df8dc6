// Per-rank memory prediction for a training job: exact sizes for stored state (the same shard
// arithmetic the runtime uses) and a tensor count of the decoder block for activations.
#include "launcher/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>

#include "cluster/block_gather.h"
#include "common/format.h"
#include "common/log.h"
#include "launcher/errors.h"
#include "model/chunked_loss.h"
#include "shard/model_store.h"
#include "shard/shard_plan.h"

namespace qlora::launcher {
namespace {

shard::ModelConfig llama_shape(int64_t layers, int64_t hidden, int64_t intermediate, int64_t heads, int64_t kv_heads,
                               int64_t vocab, int64_t context, double rope_theta) {
  shard::ModelConfig config;
  config.architecture = "llama";
  config.num_hidden_layers = layers;
  config.hidden_size = hidden;
  config.intermediate_size = intermediate;
  config.num_attention_heads = heads;
  config.num_key_value_heads = kv_heads;
  config.head_dim = hidden / heads;
  config.vocab_size = vocab;
  config.max_position_embeddings = context;
  config.rope_theta = rope_theta;
  config.torch_dtype = "bfloat16";
  return config;
}

const std::map<std::string, shard::ModelConfig>& presets() {
  static const std::map<std::string, shard::ModelConfig> table = [] {
    std::map<std::string, shard::ModelConfig> result;
    result["llama-2-7b"] = llama_shape(32, 4096, 11008, 32, 32, 32000, 4096, 10000.0);
    result["llama-2-70b"] = llama_shape(80, 8192, 28672, 64, 8, 32000, 4096, 10000.0);
    result["llama-3-8b"] = llama_shape(32, 4096, 14336, 32, 8, 128256, 8192, 500000.0);
    result["llama-3-70b"] = llama_shape(80, 8192, 28672, 64, 8, 128256, 8192, 500000.0);
    auto llama_405b = llama_shape(126, 16384, 53248, 128, 8, 128256, 131072, 500000.0);
    llama_405b.rope_scaling.type = "llama3";
    llama_405b.rope_scaling.factor = 8.0;
    result["llama-3.1-405b"] = llama_405b;
    auto mistral = llama_shape(32, 4096, 14336, 32, 8, 32000, 32768, 1000000.0);
    mistral.architecture = "mistral";
    result["mistral-7b"] = mistral;
    return result;
  }();
  return table;
}

int64_t dtype_bytes(const std::string& dtype) {
  if (dtype == "float32" || dtype == "fp32") return 4;
  return 2;  // bfloat16 / float16
}

// The element counts of one micro-batch's activations, in the decoder's own variable names.
struct Shape {
  int64_t tokens, hidden, intermediate, query, key_value, scores;
};

// The adapters of one block: A(x) columns summed over the adapted projections, their parameters,
// the input features that dropout masks, and the projection inputs autograd keeps for the adapters'
// gradients when there is no dropout (each distinct input once).
struct BlockAdapters {
  int64_t rows = 0;
  int64_t elements = 0;
  int64_t dropout_inputs = 0;
  int64_t kept_inputs = 0;
  // DoRA: output columns autograd keeps for the magnitudes' gradients (the unscaled product per
  // adapted projection; with dropout the dropped input's base product and the update, twice that),
  // and the widest adapted output, which a projection holds once more while it scales.
  int64_t dora_saved_columns = 0;
  int64_t dora_attention_input_columns = 0;  // of which q, k and v's, alive until the attention's backward
  int64_t dora_widest_output = 0;
};

// Tensors alive at the peak of one block run without autograd (the checkpointed forward). The block
// drops its locals as soon as nothing reads them, so the attention and the MLP peak separately:
// softmax holds the scores and their probabilities next to v; the MLP holds gate, up and their
// product next to the residual stream, and a projection its dequantized weight and output.
int64_t block_peak_without_grad(const Shape& s, const BlockAdapters& adapters, int64_t weight_elements,
                                int64_t mask_bytes, int64_t element) {
  const int64_t during_softmax = s.tokens * (s.hidden + s.key_value) + 2 * s.scores;
  const int64_t during_mlp = s.tokens * (3 * s.hidden + 4 * s.intermediate);  // gate; up's product, A(x)B, sum
  const int64_t during_projection =
      s.tokens * (3 * s.hidden + 2 * s.intermediate + adapters.dora_widest_output) + weight_elements;
  return std::max({during_softmax, during_mlp, during_projection}) * element + mask_bytes;
}

// Tensors autograd saves for one block's backward: the block input and the residual sum (read by
// the norms), two norm-sized statistics tensors each, the grouped query copy, k and v, the softmax
// output, gate and up (SwiGLU recomputes silu), the adapters' inputs and A(x), and under dropout a
// mask and the masked input per adapted input.
int64_t block_saved_for_backward(const Shape& s, const BlockAdapters& adapters, int64_t mask_bytes, int64_t element) {
  int64_t elements = s.tokens * (4 * s.hidden + 2 + s.query + 2 * s.key_value + 2 * s.intermediate);
  elements += s.scores;
  elements += s.tokens * (adapters.kept_inputs + adapters.rows + 2 * adapters.dropout_inputs + adapters.dora_saved_columns);
  return elements * element + mask_bytes;
}

struct Activations {
  int64_t forward = 0, backward = 0, logits = 0;
};

BlockAdapters block_adapters(const shard::ModelConfig& config, const model::LoraConfig& lora) {
  std::vector<std::string> targets;
  try {
    targets = lora.resolved_targets();
  } catch (const std::exception& error) {
    throw UserError(std::string("--lora-targets: ") + error.what(), "use q_proj ... down_proj or all-linear");
  }
  BlockAdapters adapters;
  // The input each projection reads: q/k/v share the normed input, gate/up the normed MLP input.
  std::map<std::string, int64_t> kept_input_width;
  for (const auto& linear : shard::block_linear_names()) {
    const std::string target = linear.substr(linear.find('.') + 1);
    if (std::find(targets.begin(), targets.end(), target) == targets.end()) continue;
    const auto shape = config.expected_shape(shard::layer_prefix(0) + linear + ".weight");
    const int64_t r = lora.for_module(shard::layer_prefix(0) + linear).r;
    adapters.rows += r;
    adapters.elements += r * (shape[0] + shape[1]);
    if (lora.use_dora) {
      adapters.elements += shape[0];  // the magnitude vector
      adapters.dora_saved_columns += (lora.dropout > 0 ? 2 : 1) * shape[0];
      if (target == "q_proj" || target == "k_proj" || target == "v_proj")
        adapters.dora_attention_input_columns += (lora.dropout > 0 ? 2 : 1) * shape[0];
      adapters.dora_widest_output = std::max(adapters.dora_widest_output, shape[0]);
    }
    if (lora.dropout > 0) {
      adapters.dropout_inputs += shape[1];
    } else {
      const bool attention_input = target == "q_proj" || target == "k_proj" || target == "v_proj";
      const bool mlp_input = target == "gate_proj" || target == "up_proj";
      kept_input_width[attention_input ? "normed" : mlp_input ? "normed_mlp" : target] = shape[1];
    }
  }
  for (const auto& input : kept_input_width) adapters.kept_inputs += input.second;
  return adapters;
}

Activations activations(const shard::ModelConfig& config, const PlanJob& job, const BlockAdapters& adapters,
                        bool checkpointing, int64_t lm_head_copy_bytes) {
  const int64_t element = dtype_bytes(job.compute_dtype);
  const int64_t batch = job.micro_batch;
  const int64_t sequence = job.sequence_length;
  Shape s{};
  s.tokens = batch * sequence;
  s.hidden = config.hidden_size;
  s.intermediate = config.intermediate_size;
  s.query = config.num_attention_heads * config.head_dim;
  s.key_value = config.num_key_value_heads * config.head_dim;
  s.scores = batch * config.num_attention_heads * sequence * sequence;
  // The causal mask (bool), one copy per query group, shared by every block.
  const int64_t mask_bytes = sequence * sequence * (config.num_attention_heads / config.num_key_value_heads);
  const int64_t layers = config.num_hidden_layers;
  const int64_t largest_weight = config.hidden_size * std::max(config.intermediate_size, s.query);

  const int64_t hidden_bytes = s.tokens * s.hidden * element;
  // Over several ranks the loss runs every rank's rows (gathered) against this rank's vocabulary
  // slice, a chunk sized for the largest slice at a time.
  const int64_t world = job.world;
  const int64_t largest_slice = shard::vocab_range(config.vocab_size, 0, job.world).rows();
  const int64_t chunk_rows = std::min(world * s.tokens, model::default_chunk_rows(largest_slice));
  const int64_t logits_chunk = chunk_rows * largest_slice * element;
  Activations result;
  result.logits = logits_chunk;
  const int64_t final_norm = 2 * hidden_bytes;
  // The loss forms its input gradient in forward (a chunk's logits and log-softmax at a time), so
  // its backward only scales the saved gradient. Over several ranks it exponentiates the logits in
  // place (one chunk, not two) but holds the gathered hidden states and a chunk's share of the gradient.
  const int64_t loss_forward =
      hidden_bytes + lm_head_copy_bytes +
      (world > 1 ? logits_chunk + world * hidden_bytes + 2 * chunk_rows * s.hidden * element : 2 * logits_chunk);
  // The embedding lookup over several ranks: every rank's rows, then this rank's copy.
  const int64_t embedding_lookup = world > 1 ? (world + 1) * hidden_bytes : hidden_bytes;
  const int64_t loss_backward = 2 * hidden_bytes;
  const int64_t saved = block_saved_for_backward(s, adapters, mask_bytes, element);
  // Backward through one block. Two moments compete: the MLP's backward (every saved tensor of the
  // block, the SwiGLU and projection gradient temporaries and one dequantized weight) and the
  // attention's (the MLP's saved tensors released; the probabilities' and scores' gradients). The
  // temporaries' coefficients were fitted with the counting allocator (fp32, LibTorch 1.13) on models
  // with intermediate/hidden 2.75 and 5.5, GQA and MHA, sequence lengths 64-1024; test_plan guards them.
  const int64_t hidden_elements = s.tokens * s.hidden;
  const int64_t intermediate_elements = s.tokens * s.intermediate;
  // DoRA's kept products go with their phase: the MLP's and o_proj's are released before the
  // attention's backward (measured: only q, k and v's remain at its peak).
  const int64_t dora_released_before_attention =
      s.tokens * (adapters.dora_saved_columns - adapters.dora_attention_input_columns);
  const int64_t block_backward =
      saved + std::max(7 * intermediate_elements / 3 - hidden_elements / 2 + largest_weight,
                       9 * s.scores / 4 - 3 * intermediate_elements - 6 * hidden_elements -
                           dora_released_before_attention) * element;
  if (checkpointing) {
    const int64_t kept_inputs = layers * hidden_bytes;
    result.forward = std::max({kept_inputs + block_peak_without_grad(s, adapters, largest_weight, mask_bytes, element),
                               kept_inputs + hidden_bytes + final_norm + loss_forward, embedding_lookup});
    result.backward = std::max(kept_inputs + final_norm + loss_backward, kept_inputs + hidden_bytes + block_backward);
  } else {
    const int64_t kept = hidden_bytes + layers * saved;
    result.forward = std::max(kept + std::max(largest_weight * element, final_norm + loss_forward), embedding_lookup);
    result.backward = kept + final_norm + std::max(loss_backward, block_backward - saved);
  }
  return result;
}

}  // namespace

PlanJob plan_job_for(const TrainOptions& options, int world) {
  const BatchSplit split = split_batch(options, world);
  PlanJob job;
  job.world = world;
  job.micro_batch = split.micro_batch;
  job.accumulation_steps = split.micro_steps;
  job.sequence_length = options.sequence_length;
  job.lora = options.lora;
  job.checkpointing = options.prepare.use_gradient_checkpointing;
  job.embeddings_16bit = options.prepare.keep_embeddings_16bit;
  job.gather_slots = options.gather_slots;
  return job;
}

bool is_plan_preset(const std::string& name) { return presets().count(name) != 0; }

shard::ModelConfig plan_preset(const std::string& name) {
  auto found = presets().find(name);
  if (found == presets().end()) {
    std::string known;
    for (const auto& entry : presets()) known += (known.empty() ? "" : ", ") + entry.first;
    throw UserError("unknown model preset '" + name + "'", "known presets: " + known + "; or give a model.h5 / config.json");
  }
  return found->second;
}

std::vector<std::string> plan_preset_names() {
  std::vector<std::string> names;
  for (const auto& entry : presets()) names.push_back(entry.first);
  return names;
}

Plan make_plan(const std::string& model_name, const shard::ModelConfig& config, const PlanJob& job) {
  if (job.world < 1) throw UserError("--world must be at least 1");
  if (job.micro_batch < 1 || job.sequence_length < 1)
    throw UserError("--micro-batch and --seq-len must be positive");
  if (job.quant != "nf4" && job.quant != "fp4" && job.quant != "int8" && job.quant != "none")
    throw UserError("--quant '" + job.quant + "' is not planned", "use nf4, fp4, int8 or none");
  if (job.optimizer != "adamw" && job.optimizer != "sgd")
    throw UserError("--optimizer '" + job.optimizer + "' is not known", "use adamw or sgd");
  if (job.compute_dtype != "fp32" && job.compute_dtype != "bf16")
    throw UserError("--compute-dtype '" + job.compute_dtype + "' is not known", "use fp32 or bf16");
  if (job.blocksize < 16 || job.blocksize % 2 != 0) throw UserError("--blocksize must be an even number >= 16");
  if (job.world > config.vocab_size)
    throw UserError("--world " + std::to_string(job.world) + " is more ranks than the vocabulary's " +
                        std::to_string(config.vocab_size) + " rows (embedding and LM head are split over the ranks)",
                    "use at most " + std::to_string(config.vocab_size) + " ranks");
  Plan plan;
  plan.model_name = model_name;
  plan.config = config;
  plan.job = job;
  plan.parameters = config.parameter_count();
  plan.nodes = job.gpus_per_node > 0 ? (job.world + job.gpus_per_node - 1) / job.gpus_per_node : 1;
  const bool quantized = job.quant != "none";
  const int64_t source_element = dtype_bytes(job.source_dtype);
  const int64_t layers = config.num_hidden_layers;

  // One block's layout is every block's: the same seven shapes, laid out and cut exactly as a store
  // with these settings lays them out (shard::quant_geometry, shard::module_listed).
  for (const auto& module : job.keep_unquantized)
    if (module.rfind("model.layers.", 0) == 0)
      throw UserError("the planner assumes every block alike; '" + module + "' names one layer's module",
                      "plan with projection names (e.g. down_proj) instead");
  shard::StoreHeader store_layout;
  store_layout.quant_method = job.quant == "int8" ? "bnb-8bit" : "bnb-4bit";
  store_layout.blocksize = job.blocksize;
  store_layout.double_quant = job.double_quant && job.quant != "int8";
  for (const auto& module : job.keep_unquantized)
    store_layout.unquantized_modules += (store_layout.unquantized_modules.empty() ? "" : ",") + module;
  std::vector<cluster::QuantizedTensorSpec> specs;
  int64_t kept_linear_elements = 0;   // projections kept in 16 bits (then upcast by preparation)
  for (const auto& linear : shard::block_linear_names()) {
    const std::string name = shard::layer_prefix(0) + linear + ".weight";
    const auto shape = config.expected_shape(name);
    if (!quantized || shard::module_listed(name, store_layout.unquantized_modules)) {
      kept_linear_elements += shape[0] * shape[1];
      continue;
    }
    const shard::QuantGeometry geometry = shard::quant_geometry(store_layout, shape);
    if (shard::max_world_for(geometry) < job.world)
      throw UserError("--world " + std::to_string(job.world) + " is more ranks than " + linear + " has cut units (" +
                          std::to_string(shard::max_world_for(geometry)) + ")",
                      "use fewer ranks, a smaller --blocksize, or no --double-quant");
    specs.push_back({linear, geometry, 0.0f});
  }
  const cluster::FlatShardLayout layout(specs, job.world);
  auto segment_bytes = [&](int rank) { return specs.empty() ? int64_t{0} : layout.segment_bytes(rank); };
  int64_t gathered = 0;
  for (int rank = 0; rank < job.world; ++rank) gathered += segment_bytes(rank);
  plan.quantized_store_bytes = gathered * layers;

  // Replicated state after preparation: norms (fp32), biases, the linears when unquantized.
  const int64_t hidden = config.hidden_size;
  int64_t norm_elements = (2 * layers + 1) * hidden;
  int64_t bias_elements = config.attention_bias ? layers * (config.num_attention_heads + 2 * config.num_key_value_heads) *
                                                      config.head_dim
                                                : 0;
  // Embedding and LM head: each rank holds its slice of the vocabulary's rows.
  auto embedding_elements = [&](int rank) {
    return shard::vocab_range(config.vocab_size, rank, job.world).rows() * hidden;
  };
  const int64_t embedding_tensors = config.tie_word_embeddings ? 1 : 2;
  const int64_t embedding_element = job.embeddings_16bit ? source_element : 4;
  // With 16-bit embeddings the loss casts the LM head slice to fp32 for the duration of the loss.
  const int64_t lm_head_copy = job.embeddings_16bit && job.compute_dtype == "fp32" ? embedding_elements(0) * 4 : 0;

  const BlockAdapters adapters = block_adapters(config, job.lora);
  const int64_t adapter_elements = adapters.elements * layers;

  const Activations checkpointed = activations(config, job, adapters, true, lm_head_copy);
  const Activations full = activations(config, job, adapters, false, lm_head_copy);
  const Activations& chosen = job.checkpointing ? checkpointed : full;

  for (int rank = 0; rank < job.world; ++rank) {
    RankPlan row;
    row.rank = rank;
    row.quantized_weights = segment_bytes(rank) * layers;
    if (job.offload_weights) std::swap(row.quantized_weights, row.offloaded);
    row.replicated_parameters = norm_elements * 4 + bias_elements * 4 +
                                layers * kept_linear_elements * 4;
    row.embeddings = embedding_elements(rank) * embedding_tensors * embedding_element;
    row.adapters = adapter_elements * 4;
    row.gradients = 2 * adapter_elements * 4;   // .grad plus the flat reduction buckets
    row.optimizer_state = job.optimizer == "adamw" ? 2 * adapter_elements * 4 : 0;
    row.gather_buffers =
        gathered > 0 && (job.world > 1 || job.offload_weights) ? std::max(1, job.gather_slots) * gathered : 0;
    row.forward_activations = chosen.forward;
    row.backward_activations = chosen.backward;
    row.activations_checkpointed = std::max(checkpointed.forward, checkpointed.backward);
    row.activations_full = std::max(full.forward, full.backward);
    row.logits = chosen.logits;
    row.resident = row.quantized_weights + row.replicated_parameters + row.embeddings + row.adapters + row.gradients +
                   row.optimizer_state + row.gather_buffers;
    row.peak = row.resident + std::max(chosen.forward, chosen.backward);
    plan.peak_bytes = std::max(plan.peak_bytes, row.peak);
    plan.ranks.push_back(row);
  }
  plan.required_bytes = plan.peak_bytes + job.overhead;
  plan.fits = job.device_memory <= 0 || plan.required_bytes <= job.device_memory;

  // Communication of one optimizer step, per rank: every micro-batch gathers each block in forward
  // and again in backward (all but the blocks still in the pool); the adapters' gradients are
  // all-reduced once (ring: 2 (N-1)/N of the bytes).
  if (job.world > 1) {
    const int64_t received_per_gather = gathered - segment_bytes(0);
    const int64_t backward_gathers = std::max<int64_t>(0, layers - std::max(1, job.gather_slots));
    plan.gather_bytes_per_step = job.accumulation_steps * (layers + backward_gathers) * received_per_gather;
    plan.reduce_bytes_per_step = 2 * (job.world - 1) * (adapter_elements * 4) / job.world;
    // The vocabulary-parallel embedding and loss, per micro-batch of T tokens a rank: all-gathers of
    // every rank's token ids, hidden states and targets ((N-1) T of each), and ring all-reduces over
    // all N T rows of the embedding rows and the loss gradient (fp32 [N T, hidden] each) and of the
    // row statistics (max, exp sum, target logit: 3 floats a row).
    const int64_t tokens = job.micro_batch * job.sequence_length;
    const int64_t others = job.world - 1;
    const int64_t gathered_bytes = others * tokens * (8 + hidden * 4 + 8);
    const int64_t all_reduced_bytes = 2 * others * tokens * (2 * hidden * 4 + 3 * 4);
    plan.vocab_parallel_bytes_per_step = job.accumulation_steps * (gathered_bytes + all_reduced_bytes);
  }
  return plan;
}

std::vector<FitPoint> fit_search(const std::string& model_name, const shard::ModelConfig& config, const PlanJob& job) {
  std::vector<int64_t> lengths;
  for (int64_t length = 256; length <= config.max_position_embeddings; length *= 2) lengths.push_back(length);
  if (std::find(lengths.begin(), lengths.end(), job.sequence_length) == lengths.end())
    lengths.push_back(job.sequence_length);
  std::sort(lengths.begin(), lengths.end());
  std::vector<FitPoint> points;
  for (const int64_t length : lengths) {
    PlanJob trial = job;
    trial.sequence_length = length;
    FitPoint point;
    point.sequence_length = length;
    // Peak grows monotonically with the micro-batch: double, then bisect.
    auto fits = [&](int64_t batch) {
      trial.micro_batch = batch;
      const Plan plan = make_plan(model_name, config, trial);
      if (plan.fits) point.peak_bytes = plan.peak_bytes;
      return plan.fits;
    };
    if (!fits(1)) {
      point.micro_batch = 0;
      points.push_back(point);
      continue;
    }
    int64_t good = 1, bad = 2;
    while (bad <= (int64_t{1} << 20) && fits(bad)) {
      good = bad;
      bad *= 2;
    }
    while (bad - good > 1) {
      const int64_t middle = (good + bad) / 2;
      (fits(middle) ? good : bad) = middle;
    }
    fits(good);
    point.micro_batch = good;
    points.push_back(point);
  }
  return points;
}

namespace {
// Each per-rank figure as the table labels it and plan.json names it.
struct Field {
  const char* label;
  const char* json_key;
  int64_t RankPlan::*member;
};
const std::vector<Field>& fields() {
  static const std::vector<Field> list = {
      {"quantized weights (4-bit shard)", "quantized_weights", &RankPlan::quantized_weights},
      {"replicated parameters", "replicated_parameters", &RankPlan::replicated_parameters},
      {"embeddings + LM head", "embeddings", &RankPlan::embeddings},
      {"adapters", "adapters", &RankPlan::adapters},
      {"gradients (+ reduce buckets)", "gradients", &RankPlan::gradients},
      {"optimizer state", "optimizer_state", &RankPlan::optimizer_state},
      {"gather buffers", "gather_buffers", &RankPlan::gather_buffers},
      {"activations, forward peak", "forward_activations", &RankPlan::forward_activations},
      {"activations, backward peak", "backward_activations", &RankPlan::backward_activations},
      {"  of which logits chunk", "logits", &RankPlan::logits},
      {"activations with checkpointing", "activations_checkpointed", &RankPlan::activations_checkpointed},
      {"activations without checkpointing", "activations_full", &RankPlan::activations_full},
      {"peak", "peak", &RankPlan::peak},
      {"host memory (offloaded shards)", "offloaded", &RankPlan::offloaded},
  };
  return list;
}
}  // namespace

std::string format_plan(const Plan& plan) {
  std::ostringstream out;
  const auto& job = plan.job;
  const auto& config = plan.config;
  char line[512];
  std::snprintf(line, sizeof line,
                "model %s: %lld layers, hidden %lld, intermediate %lld, heads %lld/%lld, vocab %lld, %.2f B parameters\n",
                plan.model_name.c_str(), static_cast<long long>(config.num_hidden_layers),
                static_cast<long long>(config.hidden_size), static_cast<long long>(config.intermediate_size),
                static_cast<long long>(config.num_attention_heads), static_cast<long long>(config.num_key_value_heads),
                static_cast<long long>(config.vocab_size), static_cast<double>(plan.parameters) / 1e9);
  out << line;
  std::snprintf(line, sizeof line,
                "job: %d ranks on %d node(s), micro-batch %lld x %lld tokens, %lld accumulation step(s), %s r=%lld on %zu "
                "projections, %s%s blocksize %lld, checkpointing %s, embeddings %s, optimizer %s, compute %s\n",
                job.world, plan.nodes, static_cast<long long>(job.micro_batch),
                static_cast<long long>(job.sequence_length), static_cast<long long>(job.accumulation_steps),
                job.lora.use_dora ? "DoRA" : "LoRA", static_cast<long long>(job.lora.r), job.lora.resolved_targets().size(), job.quant.c_str(),
                job.double_quant ? " + double quantization," : ",", static_cast<long long>(job.blocksize),
                job.checkpointing ? "on" : "off", job.embeddings_16bit ? "16-bit" : "fp32", job.optimizer.c_str(),
                job.compute_dtype.c_str());
  out << line << "\n";

  // Ranks differ only by their shard's rounding: show each rank for small jobs, min/max/mean otherwise.
  const bool every_rank = plan.ranks.size() <= 4;
  std::snprintf(line, sizeof line, "%-36s", "per rank");
  out << line;
  if (every_rank) {
    for (const auto& row : plan.ranks) {
      std::snprintf(line, sizeof line, "%12s", ("rank " + std::to_string(row.rank)).c_str());
      out << line;
    }
  } else {
    std::snprintf(line, sizeof line, "%12s%12s%12s", "min", "max", "mean");
    out << line;
  }
  out << "\n";
  for (const auto& field : fields()) {
    std::snprintf(line, sizeof line, "%-36s", field.label);
    out << line;
    if (every_rank) {
      for (const auto& row : plan.ranks) {
        std::snprintf(line, sizeof line, "%12s", format_bytes(row.*field.member).c_str());
        out << line;
      }
    } else {
      int64_t low = INT64_MAX, high = 0;
      double sum = 0;
      for (const auto& row : plan.ranks) {
        low = std::min(low, row.*field.member);
        high = std::max(high, row.*field.member);
        sum += static_cast<double>(row.*field.member);
      }
      std::snprintf(line, sizeof line, "%12s%12s%12s", format_bytes(low).c_str(), format_bytes(high).c_str(),
                    format_bytes(static_cast<int64_t>(sum / static_cast<double>(plan.ranks.size()))).c_str());
      out << line;
    }
    out << "\n";
  }
  out << "\n";
  std::snprintf(line, sizeof line,
                "communication per rank and step: %s all-gathered 4-bit blocks, %s all-reduced gradients, %s "
                "vocabulary-parallel embedding and loss\n",
                format_bytes(plan.gather_bytes_per_step).c_str(), format_bytes(plan.reduce_bytes_per_step).c_str(),
                format_bytes(plan.vocab_parallel_bytes_per_step).c_str());
  out << line;
  if (job.device_memory > 0) {
    std::snprintf(line, sizeof line, "needs %s per rank (peak %s + overhead %s) of %s: %s\n",
                  format_bytes(plan.required_bytes).c_str(), format_bytes(plan.peak_bytes).c_str(),
                  format_bytes(job.overhead).c_str(), format_bytes(job.device_memory).c_str(),
                  plan.fits ? "FITS" : "DOES NOT FIT");
  } else {
    std::snprintf(line, sizeof line, "needs %s per rank (peak %s + overhead %s); give --device-memory to check a fit\n",
                  format_bytes(plan.required_bytes).c_str(), format_bytes(plan.peak_bytes).c_str(),
                  format_bytes(job.overhead).c_str());
  }
  out << line;
  return out.str();
}

std::string format_fit(const std::vector<FitPoint>& points, const Plan& plan) {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof line, "largest micro-batch per sequence length within %s per rank:\n",
                format_bytes(plan.job.device_memory).c_str());
  out << line;
  std::snprintf(line, sizeof line, "%12s %12s %12s\n", "seq-len", "micro-batch", "peak");
  out << line;
  for (const auto& point : points) {
    std::snprintf(line, sizeof line, "%12lld %12s %12s\n", static_cast<long long>(point.sequence_length),
                  point.micro_batch > 0 ? std::to_string(point.micro_batch).c_str() : "none",
                  point.micro_batch > 0 ? format_bytes(point.peak_bytes).c_str() : "-");
    out << line;
  }
  return out.str();
}

Json plan_json(const Plan& plan, const std::vector<FitPoint>* fit) {
  Json json;
  json["model"] = plan.model_name;
  json["config"] = plan.config.to_json();
  const PlanJob& job = plan.job;
  Json job_json;
  job_json["world"] = job.world;
  job_json["nodes"] = plan.nodes;
  job_json["gpus_per_node"] = job.gpus_per_node;
  job_json["global_batch"] = job.world * job.micro_batch * job.accumulation_steps;
  job_json["micro_batch"] = job.micro_batch;
  job_json["sequence_length"] = job.sequence_length;
  job_json["accumulation_steps"] = job.accumulation_steps;
  job_json["lora_r"] = job.lora.r;
  job_json["lora_rank_pattern"] = job.lora.rank_pattern;
  job_json["lora_dropout"] = job.lora.dropout;
  job_json["lora_use_dora"] = job.lora.use_dora;
  job_json["lora_targets"] = job.lora.resolved_targets();
  job_json["quant"] = job.quant;
  job_json["blocksize"] = job.blocksize;
  job_json["double_quant"] = job.double_quant;
  job_json["checkpointing"] = job.checkpointing;
  job_json["embeddings_16bit"] = job.embeddings_16bit;
  job_json["gather_slots"] = job.gather_slots;
  job_json["optimizer"] = job.optimizer;
  job_json["compute_dtype"] = job.compute_dtype;
  job_json["offload_weights"] = job.offload_weights;
  json["job"] = job_json;
  Json ranks = Json::array();
  for (const auto& row : plan.ranks) {
    Json entry;
    entry["rank"] = row.rank;
    for (const auto& field : fields()) entry[field.json_key] = row.*field.member;
    entry["resident"] = row.resident;
    ranks.push_back(entry);
  }
  json["per_rank"] = ranks;
  json["parameters"] = plan.parameters;
  json["quantized_store_bytes"] = plan.quantized_store_bytes;
  json["gather_bytes_per_step"] = plan.gather_bytes_per_step;
  json["reduce_bytes_per_step"] = plan.reduce_bytes_per_step;
  json["vocab_parallel_bytes_per_step"] = plan.vocab_parallel_bytes_per_step;
  json["communication_bytes_per_step"] =
      plan.gather_bytes_per_step + plan.reduce_bytes_per_step + plan.vocab_parallel_bytes_per_step;
  json["peak_bytes"] = plan.peak_bytes;
  json["overhead_bytes"] = job.overhead;
  json["required_bytes"] = plan.required_bytes;
  json["device_memory_bytes"] = job.device_memory;
  json["fits"] = plan.fits;
  if (fit != nullptr) {
    Json points = Json::array();
    for (const auto& point : *fit) {
      Json entry;
      entry["sequence_length"] = point.sequence_length;
      entry["micro_batch"] = point.micro_batch;
      entry["peak_bytes"] = point.peak_bytes;
      points.push_back(entry);
    }
    json["fit"] = points;
  }
  return json;
}

int64_t parse_byte_size(const std::string& text, const std::string& option) {
  size_t consumed = 0;
  double value = 0;
  try {
    value = std::stod(text, &consumed);
  } catch (const std::exception&) {
    consumed = 0;
  }
  std::string unit = text.substr(consumed);
  static const std::map<std::string, double> units = {
      {"", 1.0},          {"B", 1.0},       {"KB", 1e3},         {"MB", 1e6},         {"GB", 1e9},
      {"TB", 1e12},       {"KiB", 1024.0},  {"MiB", 1048576.0},  {"GiB", 1073741824.0}, {"TiB", 1099511627776.0},
      {"K", 1024.0},      {"M", 1048576.0}, {"G", 1073741824.0}, {"T", 1099511627776.0}};
  auto found = units.find(unit);
  if (consumed == 0 || found == units.end() || value < 0 || !std::isfinite(value))
    throw UserError(option + ": '" + text + "' is not a size", "e.g. 80GiB, 24GB, 512MiB or a byte count");
  return static_cast<int64_t>(std::llround(value * found->second));
}

}  // namespace qlora::launcher
