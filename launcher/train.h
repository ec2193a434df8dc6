// `qlora train`: the training loop as a library call (tests drive it in-process over any
// communicator) plus its options.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cluster/communicator.h"
#include "cluster/memory.h"
#include "cluster/rank_layout.h"
#include "launcher/data_loading.h"
#include "model/llama.h"
#include "model/lora.h"
#include "prepare/prepare.h"

namespace qlora::launcher {

struct TrainOptions {
  std::string model_path;          // empty: the embedded synthetic model
  std::string data_path;           // empty: the embedded Austen excerpt
  std::string out_dir = "runs/latest";
  int64_t steps = 50;
  int64_t global_batch = 8;        // sequences per optimizer step, over all ranks
  int64_t sequence_length = 128;
  int64_t micro_batch = 0;         // sequences per rank per forward; 0: all of the rank's share at once
  double learning_rate = 2e-3;
  std::string lr_schedule = "constant";  // constant | cosine
  int64_t warmup_steps = 0;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;      // 0 disables clipping
  uint64_t seed = 1234;
  model::LoraConfig lora;
  prepare::PrepareOptions prepare;
  int gather_slots = 2;
  bool prefetch = true;            // gather block i+1 while block i computes
  double bucket_mb = 25.0;         // gradient fusion bucket size
  bool overlap_reduce = true;      // reduce each bucket as soon as backward fills it
  int64_t check_every = 50;        // compare adapter checksums across ranks every K steps (0: never)
  int threads = 0;                 // 0: cores / ranks on the node
  std::string eval_data_path;      // separate evaluation text; empty: a held-out tail of the data
  double eval_fraction = 0.1;      // held-out share of the training text when eval_data_path is empty
  int64_t eval_every = 0;          // evaluate every K steps (0: only at the end)
  int64_t eval_batches = 4;        // evaluation windows = eval_batches x global_batch (at most)
  int64_t save_every = 0;          // checkpoint every K steps (0: only the final one)
  int keep_checkpoints = 3;        // newest checkpoints kept (0: all)
  std::string resume;              // "" | "auto" (newest complete checkpoint, if any) | a checkpoint folder
  std::string resume_mismatch = "refuse";  // refuse | warn: a checkpoint of another model, data, LoRA shape or seed
  bool overwrite = false;          // replace another run found in out_dir (else it is refused)
  int max_bad_steps = 3;           // consecutive non-finite steps tolerated before the run stops
  bool write_outputs = true;       // tests switch off the run folder
  bool quiet = false;              // no per-step lines
  std::string progress = "auto";   // auto (a bar on a terminal, lines otherwise) | bar | lines
  std::string banner;              // printed by rank 0 once setup has succeeded everywhere
  std::string resolved_config;     // saved as config.json in the run folder (the CLI's final option values)
  ExampleOptions examples;         // how .jsonl/.json data becomes examples (load_data_examples)
};

struct TrainResult {
  std::vector<double> losses;      // global mean loss per step (identical on every rank)
  cluster::MemoryReport memory;    // this rank's
  std::vector<cluster::MemoryReport> all_memory;  // rank 0 only
  prepare::PrepareReport preparation;
  double seconds = 0.0;
  double tokens_per_second = 0.0;
  std::vector<double> step_seconds;  // wall time of each step run, in order (benchmarks skip the first)
  cluster::GatherStats gather;
  double reduce_wait_seconds = 0.0;  // rank's time blocked finishing gradient reductions
  int64_t first_step = 0;          // 0, or the step a resumed run continued from
  int64_t skipped_steps = 0;       // steps skipped for a non-finite loss or gradient
  std::vector<std::pair<int64_t, double>> eval_losses;  // (step, loss)
};

// Throws UserError when `world` exceeds the vocabulary (embedding rows) or the quantization blocks
// of some tensor (a rank would hold nothing of it), naming it and the largest world that fits.
void check_world_fits(const shard::ModelStore& store, int world);

// Says (rank 0, once) when --seq-len exceeds the model's max_position_embeddings: positions past it
// were never trained and rotary embeddings extrapolate poorly there (transformers warns the same).
void warn_if_beyond_context(const shard::ModelStore& store, int64_t sequence_length);

// Throws UserError for options that cannot work (checked identically on every rank); the model
// path is checked when the run opens it.
void validate_options(const TrainOptions& options, int world);

// How a step's global batch is cut: each rank's share, the sequences of one forward, and the
// forwards whose gradients accumulate into one optimizer step.
struct BatchSplit {
  int64_t rows_per_rank = 0;
  int64_t micro_batch = 0;
  int64_t micro_steps = 0;   // gradient accumulation steps
};

// Throws UserError when --global-batch does not divide over `world` ranks or --micro-batch does not
// divide a rank's share.
BatchSplit split_batch(const TrainOptions& options, int world);

// Runs the whole job on `communicator`. `inspect`, if given, sees the trained model before it is
// destroyed (tests use it to check adapters and frozen weights).
TrainResult run_training(const TrainOptions& options, cluster::Communicator& communicator,
                         const std::function<void(model::LlamaModelImpl&)>& inspect = {});

// Asks the training loop to checkpoint and stop at the next step boundary (SIGTERM / SIGUSR1, as
// SLURM sends before a time limit). Async-signal-safe.
void request_stop(int signal_number);
// Exit code of a run that stopped on such a request after saving its checkpoint (EX_TEMPFAIL): a
// requeued job started with --resume auto continues from it.
constexpr int kExitPreempted = 75;
struct Preempted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Collective: compares a checksum of every rank's adapters with rank 0's; on any difference every
// rank throws JobError naming the ranks that drifted.
void check_adapters_agree(cluster::Communicator& communicator, model::LlamaModelImpl& model, int64_t step);

// Where the embedded demo model lives (created on first use by one rank per node).
std::string ensure_demo_model(cluster::Communicator& communicator, const cluster::RankLayout& layout, uint64_t seed);

}  // namespace qlora::launcher
