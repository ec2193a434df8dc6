// What a training job may be, checked the same way wherever a job is described (train, plan, tests):
// option checks, the batch split, whether the model divides over the world; and the embedded demo
// model a job without --model trains.
#include "launcher/train.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <filesystem>

#include "common/errors.h"
#include "common/log.h"
#include "launcher/errors.h"
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

void warn_if_beyond_context(const shard::ModelStore& store, int64_t sequence_length) {
  const int64_t context = store.header().config.max_position_embeddings;
  if (sequence_length <= context) return;
  log::banner("warning: --seq-len " + std::to_string(sequence_length) + " exceeds the " + std::to_string(context) +
              "-token context of " + store.path() + " (max_position_embeddings); positions beyond it were never "
              "trained and quality usually drops there. Use --seq-len " + std::to_string(context) +
              " or less unless you mean to extend the context");
}

void validate_options(const TrainOptions& options, int world) {
  if (options.lora.target_modules.empty()) throw UserError("--lora-targets is empty", "e.g. --lora-targets all-linear");
  if (options.steps < 1) throw UserError("--steps must be at least 1");
  if (options.sequence_length < 2) throw UserError("--seq-len must be at least 2");
  if (options.global_batch < 1) throw UserError("--global-batch must be at least 1");
  check_global_batch_divides(options, world);
  if (!std::isfinite(options.learning_rate) || options.learning_rate <= 0)
    throw UserError("--lr must be a positive number, not " + std::to_string(options.learning_rate), "e.g. --lr 2e-4");
  if (options.lora.r < 1 || options.lora.r > 65536) throw UserError("--lora-r must be in 1..65536");
  for (const auto& [key, rank] : options.lora.rank_pattern)
    if (rank < 1 || rank > 65536) throw UserError("--lora-rank-pattern: rank of '" + key + "' must be in 1..65536");
  if (!(options.lora.dropout >= 0 && options.lora.dropout < 1)) throw UserError("--lora-dropout must be in [0, 1)");
  if (!std::isfinite(options.lora.alpha) || options.lora.alpha <= 0)
    throw UserError("--lora-alpha must be a positive number, not " + std::to_string(options.lora.alpha),
                    "e.g. --lora-alpha 16 (the adapter is scaled by alpha / r)");
  for (const auto& [key, alpha] : options.lora.alpha_pattern)
    if (!std::isfinite(alpha) || alpha <= 0)
      throw UserError("--lora-alpha-pattern: alpha of '" + key + "' must be a positive number");
  if (!std::isfinite(options.weight_decay) || options.weight_decay < 0)
    throw UserError("--weight-decay must be a non-negative number");
  if (!std::isfinite(options.max_grad_norm) || options.max_grad_norm < 0)
    throw UserError("--max-grad-norm must be 0 (off) or a positive number");
  // Every count below is multiplied into token and byte totals: bound them well inside int64.
  constexpr int64_t kMostTokensPerStep = int64_t{1} << 40;
  if (options.global_batch > kMostTokensPerStep / options.sequence_length ||
      options.sequence_length > kMostTokensPerStep)
    throw UserError("--global-batch " + std::to_string(options.global_batch) + " x --seq-len " +
                        std::to_string(options.sequence_length) + " exceeds 2^40 tokens per step",
                    "use a global batch and sequence length of a real job");
  if (options.steps > kMostTokensPerStep) throw UserError("--steps " + std::to_string(options.steps) + " is beyond any real job");
  if (options.lora.init != "kaiming" && options.lora.init != "gaussian")
    throw UserError("--lora-init must be kaiming or gaussian");
  if (options.gather_slots < 1) throw UserError("--gather-slots must be at least 1");
  if (!(options.bucket_mb > 0 && options.bucket_mb < 1e6)) throw UserError("--bucket-mb must be positive (and below 1e6)");
  if (options.check_every < 0) throw UserError("--check-every must be 0 (never) or positive");
  if (options.lr_schedule != "constant" && options.lr_schedule != "cosine")
    throw UserError("--lr-schedule must be constant or cosine");
  if (options.warmup_steps < 0) throw UserError("--warmup-steps must not be negative");
  if (options.micro_batch < 0) throw UserError("--micro-batch must be positive (or 0: the rank's whole share)");
  if (!(options.eval_fraction >= 0 && options.eval_fraction <= 0.5)) throw UserError("--eval-fraction must be in [0, 0.5]");
  if (options.eval_every < 0 || options.eval_batches < 1) throw UserError("--eval-every must be >= 0, --eval-batches >= 1");
  if (options.save_every < 0) throw UserError("--save-every must be 0 (final only) or positive");
  if (options.max_bad_steps < 1) throw UserError("--max-bad-steps must be at least 1");
  if (options.resume_mismatch != "refuse" && options.resume_mismatch != "warn")
    throw UserError("--resume-mismatch must be refuse or warn", "warn resumes a checkpoint of another run anyway");
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

namespace {

// The user's folder for the embedded demo model under $TMPDIR, a name anyone can predict.
std::filesystem::path demo_folder() {
  const char* temporary = std::getenv("TMPDIR");
  return std::filesystem::path(temporary != nullptr && *temporary ? temporary : "/tmp") /
         ("qlora-demo-" + std::to_string(getuid()));
}

// Creates `folder` 0700, or refuses it when it is a link, another user's, or open to others' writes
// (whoever controls it could swap the store or redirect the write).
void check_private_demo_folder(const std::filesystem::path& folder) {
  const std::string hint = "remove it, or set TMPDIR to a folder of your own";
  if (::mkdir(folder.c_str(), 0700) != 0 && errno != EEXIST)
    throw UserError("cannot create the demo model's folder " + folder.string() + ": " + std::strerror(errno),
                    "set TMPDIR to a writable folder");
  struct stat info {};
  if (::lstat(folder.c_str(), &info) != 0 || !S_ISDIR(info.st_mode))
    throw UserError("the demo model's folder " + folder.string() + " is not a folder (a link or a file)", hint);
  if (info.st_uid != getuid() || (info.st_mode & (S_IWGRP | S_IWOTH)) != 0)
    throw UserError("the demo model's folder " + folder.string() + " belongs to another user or is writable by others",
                    hint);
}

}  // namespace

std::string ensure_demo_model(cluster::Communicator& communicator, const cluster::RankLayout& layout, uint64_t seed) {
  const std::string path = (demo_folder() / ("synthetic-tiny-seed" + std::to_string(seed) + ".h5")).string();
  // One writer per node (the node-local rank 0); the store appears atomically by rename.
  run_collectively(communicator, [&] {
    if (layout.local_rank != 0) return;
    check_private_demo_folder(demo_folder());
    if (std::filesystem::exists(path)) return;
    shard::ConvertOptions convert_options;
    convert_options.seed = seed;
    shard::convert_synthetic("tiny", path, convert_options);
  });
  return path;
}

}  // namespace qlora::launcher
