// The memory planner behind `qlora plan`: predicts, per rank and before any allocation is claimed,
// the bytes every kind of training state takes (4-bit shards, replicated tensors, adapters,
// gradients, optimizer, gather pool, activations, logits) and whether the job fits the device.
// The activation terms count the tensors this runtime's decoder block keeps alive; a test checks
// the prediction against the counting allocator's measurements.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/json.h"
#include "launcher/train.h"
#include "model/lora.h"
#include "shard/model_config.h"

namespace qlora::launcher {

struct PlanJob {
  int world = 1;
  int gpus_per_node = 0;            // 0: every rank on one node
  int64_t device_memory = 0;        // bytes per rank to fit into; 0: nothing to fit against
  int64_t overhead = 0;             // bytes per rank outside tensors (CUDA context, NCCL buffers)
  int64_t micro_batch = 1;          // sequences per forward on each rank
  int64_t sequence_length = 2048;
  int64_t accumulation_steps = 1;   // micro-batches per optimizer step
  model::LoraConfig lora;
  std::string quant = "nf4";        // nf4 | fp4 | int8 (LLM.int8 rows) | none (16-bit linears, replicated)
  int64_t blocksize = 64;
  bool double_quant = false;
  std::string source_dtype = "bfloat16";  // dtype of the unquantized tensors in the store
  bool checkpointing = true;
  bool embeddings_16bit = false;    // keep embeddings / LM head in the source dtype
  std::string optimizer = "adamw";  // adamw (two fp32 moments) | sgd (no state)
  std::string compute_dtype = "fp32";  // activations: fp32 (this CPU runtime) or bf16
  int gather_slots = 2;
  bool offload_weights = false;    // 4-bit shards live in host memory; only gathered blocks on the device
  std::vector<std::string> keep_unquantized;  // projection suffixes kept in 16 bits (e.g. down_proj)
};

// The job `qlora train` runs with `options` on `world` ranks: the same micro-batch and gradient
// accumulation (split_batch), sequence length, adapters, checkpointing, embeddings and gather slots;
// the model's format and the devices stay at PlanJob's defaults. Throws what split_batch throws.
PlanJob plan_job_for(const TrainOptions& options, int world);

// Bytes of one rank, by kind. `peak` is the largest simultaneous total over a training step.
struct RankPlan {
  int rank = 0;
  int64_t quantized_weights = 0;
  int64_t replicated_parameters = 0;  // norms, biases (and the linears when unquantized)
  int64_t embeddings = 0;             // this rank's vocabulary rows of input embeddings + LM head (once when tied)
  int64_t adapters = 0;
  int64_t gradients = 0;              // adapter gradients + the reduction buckets
  int64_t optimizer_state = 0;
  int64_t gather_buffers = 0;
  int64_t forward_activations = 0;    // peak above the resident state, the configured mode
  int64_t backward_activations = 0;
  int64_t activations_checkpointed = 0;   // max(forward, backward) with checkpointing
  int64_t activations_full = 0;           // the same without checkpointing
  int64_t logits = 0;                 // the chunked LM-head loss's logits chunk (included above)
  int64_t offloaded = 0;              // host bytes (4-bit shards with offload_weights), not in peak
  int64_t resident = 0;               // everything but activations
  int64_t peak = 0;                   // resident + activations of the configured mode
};

struct Plan {
  std::string model_name;
  shard::ModelConfig config;
  PlanJob job;
  std::vector<RankPlan> ranks;
  int nodes = 1;
  int64_t parameters = 0;
  int64_t quantized_store_bytes = 0;    // codes + absmax (+ second level) of every block linear
  int64_t gather_bytes_per_step = 0;    // received by one rank
  int64_t reduce_bytes_per_step = 0;    // sent by one rank (ring all-reduce)
  int64_t vocab_parallel_bytes_per_step = 0;  // embedding lookup and loss across the vocabulary slices
  int64_t peak_bytes = 0;               // largest rank's peak
  int64_t required_bytes = 0;           // peak + overhead
  bool fits = true;
};

// Presets: llama-2-7b, llama-2-70b, llama-3-8b, llama-3-70b, llama-3.1-405b, mistral-7b.
bool is_plan_preset(const std::string& name);
shard::ModelConfig plan_preset(const std::string& name);
std::vector<std::string> plan_preset_names();

Plan make_plan(const std::string& model_name, const shard::ModelConfig& config, const PlanJob& job);

// For each sequence length (doubling from 256 up to the model's context, and the job's own length),
// the largest micro-batch that fits; micro_batch 0 where even one sequence does not.
struct FitPoint {
  int64_t sequence_length = 0;
  int64_t micro_batch = 0;
  int64_t peak_bytes = 0;
};
std::vector<FitPoint> fit_search(const std::string& model_name, const shard::ModelConfig& config, const PlanJob& job);

std::string format_plan(const Plan& plan);
std::string format_fit(const std::vector<FitPoint>& points, const Plan& plan);
Json plan_json(const Plan& plan, const std::vector<FitPoint>* fit = nullptr);

// "80GiB", "24GB", "512MiB", "1.5GiB" or a byte count; throws UserError naming `option`.
int64_t parse_byte_size(const std::string& text, const std::string& option);

}  // namespace qlora::launcher
