// What a training job may be, checked the same way wherever a job is described (train, plan, tests):
// option checks, the batch split, whether the model divides over the world; and the embedded demo
// model a job without --model trains.
#include "launcher/train.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "common/errors.h"
#include "shard/converter.h"

namespace qlora::launcher {
namespace {

void check_global_batch_divides(const TrainOptions& options, int world) {
  if (options.global_batch % world != 0)
    throw UserError("--global-batch " + std::to_string(options.global_batch) + " does not divide over " +
                        std::to_string(world) + " ranks",
                    "use a multiple of the world size, e.g. --global-batch " + std::to_string(world * 4));
}

}  // namespace

void check_world_fits(const shard::ModelStore& store, int world) {
  const int64_t vocab = store.header().config.vocab_size;
  if (world > vocab)
    throw UserError("world size " + std::to_string(world) + " is larger than the vocabulary of " +
                        std::to_string(vocab) + " tokens in " + store.path() +
                        " (the embedding and LM head rows are split over the ranks, at least one each)",
                    "run with at most " + std::to_string(vocab) + " ranks");
  for (const auto& tensor : store.tensors()) {
    if (!tensor.quantized) continue;
    const int64_t limit = shard::max_world_for(tensor.geometry);
    if (world > limit)
      throw UserError("world size " + std::to_string(world) + " is larger than the " + std::to_string(limit) +
                          (tensor.geometry.double_quant ? " second-level (256-block) units" : " quantization blocks") +
                          " of tensor '" + tensor.name + "' in " + store.path(),
                      "run with at most " + std::to_string(limit) + " ranks, or convert with a smaller --blocksize" +
                          (tensor.geometry.double_quant ? " or without --double-quant" : ""));
  }
}

void validate_options(const TrainOptions& options, int world) {
  if (options.lora.target_modules.empty()) throw UserError("--lora-targets is empty", "e.g. --lora-targets all-linear");
  if (options.steps < 1) throw UserError("--steps must be at least 1");
  if (options.sequence_length < 2) throw UserError("--seq-len must be at least 2");
  if (options.global_batch < 1) throw UserError("--global-batch must be at least 1");
  check_global_batch_divides(options, world);
  if (options.learning_rate <= 0) throw UserError("--lr must be positive");
  if (options.lora.r < 1) throw UserError("--lora-r must be at least 1");
  for (const auto& [key, rank] : options.lora.rank_pattern)
    if (rank < 1) throw UserError("--lora-rank-pattern: rank of '" + key + "' must be at least 1");
  if (options.lora.dropout < 0 || options.lora.dropout >= 1) throw UserError("--lora-dropout must be in [0, 1)");
  if (options.lora.init != "kaiming" && options.lora.init != "gaussian")
    throw UserError("--lora-init must be kaiming or gaussian");
  if (options.gather_slots < 1) throw UserError("--gather-slots must be at least 1");
  if (options.bucket_mb <= 0) throw UserError("--bucket-mb must be positive");
  if (options.check_every < 0) throw UserError("--check-every must be 0 (never) or positive");
  if (options.lr_schedule != "constant" && options.lr_schedule != "cosine")
    throw UserError("--lr-schedule must be constant or cosine");
  if (options.warmup_steps < 0) throw UserError("--warmup-steps must not be negative");
  if (options.micro_batch < 0) throw UserError("--micro-batch must be positive (or 0: the rank's whole share)");
  if (options.eval_fraction < 0 || options.eval_fraction > 0.5) throw UserError("--eval-fraction must be in [0, 0.5]");
  if (options.eval_every < 0 || options.eval_batches < 1) throw UserError("--eval-every must be >= 0, --eval-batches >= 1");
  if (options.save_every < 0) throw UserError("--save-every must be 0 (final only) or positive");
  if (options.max_bad_steps < 1) throw UserError("--max-bad-steps must be at least 1");
  if (options.progress != "auto" && options.progress != "bar" && options.progress != "lines")
    throw UserError("--progress must be auto, bar or lines");
  try {
    options.lora.resolved_targets();
  } catch (const std::invalid_argument& error) {
    throw UserError(error.what(), "fix --lora-targets");
  }
}

BatchSplit split_batch(const TrainOptions& options, int world) {
  check_global_batch_divides(options, world);
  BatchSplit split;
  split.rows_per_rank = options.global_batch / world;
  split.micro_batch = options.micro_batch > 0 ? options.micro_batch : split.rows_per_rank;
  if (split.rows_per_rank % split.micro_batch != 0)
    throw UserError("--micro-batch " + std::to_string(split.micro_batch) + " does not divide the " +
                        std::to_string(split.rows_per_rank) + " sequences each rank gets per step",
                    "pick a divisor of --global-batch / ranks");
  split.micro_steps = split.rows_per_rank / split.micro_batch;
  return split;
}

std::string ensure_demo_model(cluster::Communicator& communicator, const cluster::RankLayout& layout, uint64_t seed) {
  const char* temporary = std::getenv("TMPDIR");
  const std::filesystem::path folder =
      std::filesystem::path(temporary ? temporary : "/tmp") / ("qlora-demo-" + std::to_string(getuid()));
  const std::string path = (folder / ("synthetic-tiny-seed" + std::to_string(seed) + ".h5")).string();
  // One writer per node (the node-local rank 0); the store appears atomically by rename.
  if (layout.local_rank == 0 && !std::filesystem::exists(path)) {
    std::filesystem::create_directories(folder);
    shard::ConvertOptions convert_options;
    convert_options.seed = seed;
    shard::convert_synthetic("tiny", path, convert_options);
  }
  communicator.barrier();
  return path;
}

}  // namespace qlora::launcher
