// The training loop: load the rank's shard, prepare, attach LoRA, then per step forward with
// checkpointed blocks, backward, averaged all-reduce of adapter gradients, clipping, AdamW; measure
// memory around every phase; rank 0 writes the adapter, metrics and memory report.
#include "launcher/train.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cluster/gradient_reducer.h"
#include "common/atomic_file.h"
#include "common/hash.h"
#include "common/log.h"
#include "launcher/adapter_io.h"
#include "launcher/checkpoint.h"
#include "launcher/data.h"
#include "launcher/demo.h"
#include "launcher/evaluate.h"
#include "launcher/optimizer.h"
#include "launcher/errors.h"
#include "shard/converter.h"
#include "shard/json.h"

namespace qlora::launcher {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }


// FNV-1a over every adapter's bytes: equal on all ranks unless their replicas drifted apart.
std::string adapter_checksum(model::LlamaModelImpl& model) {
  Fnv1a64 hash;
  for (const auto& parameter : model.lora_parameters()) {
    auto contiguous = parameter.detach().contiguous();
    hash.update(contiguous.data_ptr(), static_cast<size_t>(contiguous.numel()) * contiguous.element_size());
  }
  return hash.hex();
}

}  // namespace

void check_adapters_agree(cluster::Communicator& communicator, model::LlamaModelImpl& model, int64_t step) {
  const auto checksums = communicator.gather_to_root(adapter_checksum(model));
  int drifted = 0;
  std::string ranks;
  for (size_t rank = 1; rank < checksums.size(); ++rank) {
    if (checksums[rank] == checksums[0]) continue;
    drifted = 1;
    ranks += (ranks.empty() ? "" : ",") + std::to_string(rank);
  }
  communicator.broadcast(&drifted, sizeof drifted, 0);
  if (!drifted) return;
  int64_t length = static_cast<int64_t>(ranks.size());
  communicator.broadcast(&length, sizeof length, 0);
  ranks.resize(static_cast<size_t>(length));
  communicator.broadcast(ranks.data(), length, 0);
  throw JobError("adapter replicas drifted apart at step " + std::to_string(step) + ": rank(s) " + ranks +
                 " differ from rank 0 (a reduction was lost or a rank computed differently)");
}

namespace {

std::string format_duration(double seconds) {
  const int64_t total = static_cast<int64_t>(seconds + 0.5);
  char text[32];
  if (total >= 3600)
    std::snprintf(text, sizeof text, "%lld:%02lld:%02lld", static_cast<long long>(total / 3600),
                  static_cast<long long>(total / 60 % 60), static_cast<long long>(total % 60));
  else
    std::snprintf(text, sizeof text, "%lld:%02lld", static_cast<long long>(total / 60), static_cast<long long>(total % 60));
  return text;
}

// mpirun hands its ranks a pseudo-terminal even when its own output goes to a file, so a rank's
// isatty() says nothing under a launcher: draw the bar only for a plain process on a terminal.
bool draws_on_a_terminal() {
  return isatty(fileno(stdout)) != 0 && std::getenv("OMPI_COMM_WORLD_SIZE") == nullptr &&
         std::getenv("SLURM_STEP_ID") == nullptr;
}

// One line per step in logs; on a terminal, a bar redrawn in place.
class Progress {
 public:
  Progress(int64_t first_step, int64_t steps, bool enabled, const std::string& style)
      : first_step_(first_step), steps_(steps), enabled_(enabled && log::is_root()),
        terminal_(style == "bar" || (style == "auto" && draws_on_a_terminal())), start_(Clock::now()) {}
  void step(int64_t step, double loss, double learning_rate, double tokens_per_second, double step_seconds) {
    if (!enabled_) return;
    const double elapsed = seconds_since(start_);
    const double eta = elapsed / static_cast<double>(step - first_step_) * static_cast<double>(steps_ - step);
    char line[256];
    if (terminal_) {
      const int width = 24;
      const int filled = static_cast<int>(width * step / std::max<int64_t>(1, steps_));
      std::string bar(static_cast<size_t>(filled), '#');
      bar.resize(width, '.');
      std::snprintf(line, sizeof line, "\r[%s] step %lld/%lld  loss %.4f  lr %.2e  %.0f tokens/s  ETA %s   ",
                    bar.c_str(), static_cast<long long>(step), static_cast<long long>(steps_), loss, learning_rate,
                    tokens_per_second, format_duration(eta).c_str());
      std::fputs(line, stdout);
      if (step == steps_) std::fputs("\n", stdout);
      std::fflush(stdout);
    } else {
      std::snprintf(line, sizeof line, "step %4lld/%lld  loss %.4f  lr %.2e  %8.0f tokens/s  %.3f s/step  ETA %s",
                    static_cast<long long>(step), static_cast<long long>(steps_), loss, learning_rate,
                    tokens_per_second, step_seconds, format_duration(eta).c_str());
      log::banner(line);
    }
  }
  // Lines that interrupt the bar start on a fresh line.
  void message(const std::string& text) {
    if (!log::is_root()) return;
    if (enabled_ && terminal_) std::fputs("\n", stdout);
    log::banner(text);
  }

 private:
  int64_t first_step_;
  int64_t steps_;
  bool enabled_;
  bool terminal_;
  Clock::time_point start_;
};

std::atomic<int> g_stop_signal{0};

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
  if (options.steps < 1) throw UserError("--steps must be at least 1");
  if (options.sequence_length < 2) throw UserError("--seq-len must be at least 2");
  if (options.global_batch < 1) throw UserError("--global-batch must be at least 1");
  if (options.global_batch % world != 0)
    throw UserError("--global-batch " + std::to_string(options.global_batch) + " does not divide over " +
                        std::to_string(world) + " ranks",
                    "use a multiple of the world size, e.g. --global-batch " + std::to_string(world * 4));
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

void request_stop(int signal_number) { g_stop_signal.store(signal_number); }

TrainResult run_training(const TrainOptions& options, cluster::Communicator& communicator,
                         const std::function<void(model::LlamaModelImpl&)>& inspect) {
  const int rank = communicator.rank();
  const int world = communicator.size();
  validate_options(options, world);
  if (options.model_path.empty()) throw UserError("no model given", "pass --model model.h5 (see qlora convert)");
  cluster::MemoryCounter::install();
  const auto run_start = Clock::now();

  TrainResult result;
  cluster::MemoryReport& memory = result.memory;
  memory.rank = rank;
  std::unique_ptr<shard::ModelStore> store;
  std::unique_ptr<BatchSampler> sampler;
  std::unique_ptr<BatchSampler> eval_windows;
  int64_t eval_window_count = 0;
  model::LlamaModel model{nullptr};
  const int64_t rows_per_rank = options.global_batch / world;
  const int64_t micro_batch = options.micro_batch > 0 ? options.micro_batch : rows_per_rank;
  const int64_t micro_steps = rows_per_rank / micro_batch;

  // Everything a user can get wrong surfaces here, on every rank at once (see run_collectively).
  run_collectively(communicator, [&] {
    if (rows_per_rank % micro_batch != 0)
      throw UserError("--micro-batch " + std::to_string(micro_batch) + " does not divide the " +
                          std::to_string(rows_per_rank) + " sequences each rank gets per step",
                      "pick a divisor of --global-batch / ranks");
    store = shard::ModelStore::open(options.model_path);
    check_world_fits(*store, world);
  });
  // The data, tokenized by the model's own tokenizer (collective: rank 0 builds the token cache).
  const auto tokens = load_data_tokens(options.data_path, *store, communicator, options.quiet);
  const auto eval_tokens = options.eval_data_path.empty()
                               ? nullptr
                               : load_data_tokens(options.eval_data_path, *store, communicator, options.quiet);
  run_collectively(communicator, [&] {
    int64_t train_end = tokens->size();
    if (eval_tokens) {
      eval_windows = std::make_unique<BatchSampler>(eval_tokens, 0, eval_tokens->size(), options.sequence_length,
                                                    options.global_batch, options.seed);
    } else if (options.eval_fraction > 0) {
      const auto held_out = static_cast<int64_t>(static_cast<double>(tokens->size()) * options.eval_fraction);
      train_end -= held_out;
      if (held_out > 0)
        eval_windows = std::make_unique<BatchSampler>(tokens, train_end, tokens->size(), options.sequence_length,
                                                      options.global_batch, options.seed);
    }
    sampler = std::make_unique<BatchSampler>(tokens, 0, train_end, options.sequence_length, options.global_batch,
                                             options.seed);
    if (sampler->token_count() < options.sequence_length + 2)
      throw UserError("the training text has " + std::to_string(sampler->token_count()) +
                          " tokens, fewer than --seq-len + 2",
                      "use more text or a shorter --seq-len");
    if (eval_windows) {
      eval_window_count = std::min(options.eval_batches * options.global_batch, eval_windows->window_count());
      if (eval_window_count < world)
        throw UserError("the evaluation text holds " + std::to_string(eval_windows->window_count()) +
                            " windows of --seq-len + 1 tokens, fewer than the " + std::to_string(world) + " ranks",
                        "use more evaluation text, a larger --eval-fraction, or --eval-fraction 0");
    }

    torch::manual_seed(options.seed);
    model = model::LlamaModel(*store, communicator, options.gather_slots);
    memory.quantized_weights = model->load_memory().quantized;
    memory.gather_buffers = model->load_memory().gather_pool;

    int64_t before = cluster::MemoryCounter::current_bytes();
    result.preparation = prepare::prepare_model_for_kbit_training(*model, options.prepare);
    memory.replicated_parameters =
        model->load_memory().replicated + (cluster::MemoryCounter::current_bytes() - before);

    before = cluster::MemoryCounter::current_bytes();
    model->add_lora(options.lora, options.seed);
    memory.adapters = cluster::MemoryCounter::current_bytes() - before;
    prepare::check_trainable(*model, result.preparation.method);
  });
  if (!options.banner.empty()) log::banner(options.banner);
  log::banner(result.preparation.summary());
  model->train();

  auto parameters = model->lora_parameters();
  int64_t adapter_parameters = 0;
  for (const auto& parameter : parameters) adapter_parameters += parameter.numel();
  char lora_line[200];
  std::snprintf(lora_line, sizeof lora_line, "lora: r=%lld alpha=%g dropout=%g on %zu projections, %lld trainable parameters",
                static_cast<long long>(options.lora.r), options.lora.alpha, options.lora.dropout, parameters.size() / 2,
                static_cast<long long>(adapter_parameters));
  log::banner(lora_line);

  // Backward produces gradients from the last block to the first: bucket them in that order.
  std::vector<torch::Tensor> ready_order(parameters.rbegin(), parameters.rend());
  const int64_t before_bucket = cluster::MemoryCounter::current_bytes();
  cluster::GradientReducer reducer(communicator, ready_order, static_cast<int64_t>(options.bucket_mb * 1048576.0),
                                   options.overlap_reduce);
  const int64_t bucket_bytes = cluster::MemoryCounter::current_bytes() - before_bucket;
  model->gatherer().set_prefetch(options.prefetch);
  AdamWOptions adam;
  adam.weight_decay = options.weight_decay;
  AdamW optimizer(parameters, adam);
  Schedule schedule;
  schedule.kind = options.lr_schedule;
  schedule.peak = options.learning_rate;
  schedule.warmup_steps = options.warmup_steps;
  schedule.total_steps = options.steps;
  const std::string base_model = store->header().source.empty() ? options.model_path : store->header().source;

  int64_t first_step = 0;
  if (!options.resume.empty()) {
    std::string from = options.resume;
    if (from == "auto") {
      // Rank 0 decides (it is the one that writes checkpoints) and tells the others.
      std::string found = rank == 0 ? latest_checkpoint(options.out_dir) : "";
      int64_t length = static_cast<int64_t>(found.size());
      communicator.broadcast(&length, sizeof length, 0);
      found.resize(static_cast<size_t>(length));
      communicator.broadcast(found.data(), length, 0);
      from = found;
    }
    if (!from.empty()) {
      const CheckpointInfo info = load_checkpoint(from, communicator, *model, optimizer);
      if (info.seed != options.seed || info.global_batch != options.global_batch ||
          info.sequence_length != options.sequence_length)
        log::banner("warning: resuming with a different seed, global batch or sequence length than " + from +
                             " was trained with; the data order will not continue where it stopped");
      first_step = info.step;
      log::banner("resumed from " + from + " at step " + std::to_string(first_step));
    } else {
      log::banner("--resume auto: no checkpoint under " + options.out_dir + "/checkpoints; starting fresh");
    }
  }
  result.first_step = first_step;

  std::ofstream metrics;
  if (options.write_outputs && rank == 0) {
    std::filesystem::create_directories(options.out_dir);
    metrics.open(options.out_dir + "/metrics.jsonl", first_step > 0 ? std::ios::app : std::ios::trunc);
    if (!options.resolved_config.empty())
      write_file_atomically(options.out_dir + (first_step > 0 ? "/config-resumed.json" : "/config.json"),
                            options.resolved_config);
  }
  auto write_metrics = [&](const shard::Json& line) {
    if (metrics.is_open()) metrics << line.dump() << "\n" << std::flush;
  };
  auto save = [&](int64_t step, const std::string& directory) {
    if (!options.write_outputs || rank != 0) return;
    CheckpointInfo info;
    info.step = step;
    info.seed = options.seed;
    info.global_batch = options.global_batch;
    info.sequence_length = options.sequence_length;
    save_checkpoint(directory, *model, optimizer, info, base_model);
  };
  auto run_evaluation = [&](int64_t step, Progress& progress) {
    if (!eval_windows) return;
    const double loss = mean_token_loss(*model, *eval_windows, eval_window_count, micro_batch, communicator);
    result.eval_losses.emplace_back(step, loss);
    char line[160];
    std::snprintf(line, sizeof line, "eval  step %lld: loss %.4f  perplexity %.2f  (%lld windows of %lld tokens)",
                  static_cast<long long>(step), loss, std::exp(loss),
                  static_cast<long long>(eval_window_count / world * world),
                  static_cast<long long>(options.sequence_length));
    if (!options.quiet) progress.message(line);
    shard::Json entry;
    entry["step"] = step;
    entry["eval_loss"] = loss;
    entry["eval_perplexity"] = std::exp(loss);
    write_metrics(entry);
  };

  int64_t overall_peak = cluster::MemoryCounter::peak_bytes();
  const int64_t tokens_per_step = options.global_batch * options.sequence_length;
  double communication_seconds = 0.0;
  int bad_steps_in_a_row = 0;
  bool measured_step = false;
  Progress progress(first_step, options.steps, !options.quiet, options.progress);
  const auto training_start = Clock::now();
  int64_t step = first_step;
  for (; step < options.steps; ++step) {
    // A stop request (SIGTERM/SIGUSR1) is honoured only when every rank has seen the same answer.
    float stop = static_cast<float>(g_stop_signal.load() != 0);
    communicator.all_reduce(&stop, 1, cluster::ReduceOp::sum);
    if (stop > 0) {
      const std::string directory = options.out_dir + "/checkpoints/step-" + std::to_string(step);
      save(step, directory);
      communicator.barrier();
      progress.message("stop requested (signal): checkpoint saved at step " + std::to_string(step) + " in " + directory +
                       "; rerun with --resume auto to continue");
      throw Preempted("stopped at step " + std::to_string(step) + " on request");
    }

    const auto step_start = Clock::now();
    const double gather_wait_before = model->gatherer().stats().wait_seconds;
    const double learning_rate = schedule.at(step);
    auto [inputs, targets] = sampler->batch(step, rank, world);

    double local_loss = 0.0;
    overall_peak = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
    const int64_t resident = cluster::MemoryCounter::current_bytes();
    for (int64_t micro = 0; micro < micro_steps; ++micro) {
      model->set_dropout_rows(options.seed, step, rank * rows_per_rank + micro * micro_batch);
      auto micro_inputs = inputs.narrow(0, micro * micro_batch, micro_batch);
      auto micro_targets = targets.narrow(0, micro * micro_batch, micro_batch);
      cluster::MemoryCounter::reset_peak();
      auto loss = model->next_token_loss(micro_inputs, micro_targets);
      memory.forward_activation_peak =
          std::max(memory.forward_activation_peak, cluster::MemoryCounter::peak_bytes() - resident);
      if (!loss.requires_grad())
        throw UserError("no gradient can reach the adapters: the loss does not depend on any trainable parameter",
                        "with reentrant gradient checkpointing the input embeddings' output must require grad "
                        "(the preparation protocol's hook); do not disable it");
      overall_peak = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
      cluster::MemoryCounter::reset_peak();
      reducer.begin_step(micro + 1 == micro_steps);
      (loss / static_cast<double>(micro_steps)).backward();
      memory.backward_activation_peak =
          std::max(memory.backward_activation_peak, cluster::MemoryCounter::peak_bytes() - resident);
      local_loss += loss.item<double>() / static_cast<double>(micro_steps);
    }
    const double reduce_wait_seconds = reducer.finish_step();
    communication_seconds += reduce_wait_seconds;
    const double global_loss = communicator.all_reduce_scalar(local_loss, cluster::ReduceOp::average);
    // The reduced gradients are identical on every rank, so is their norm and the decision below.
    const double gradient_norm =
        torch::nn::utils::clip_grad_norm_(parameters, options.max_grad_norm > 0 ? options.max_grad_norm : 1e30);
    if (!measured_step) memory.gradients = cluster::MemoryCounter::current_bytes() - resident + bucket_bytes;

    if (!std::isfinite(global_loss) || !std::isfinite(gradient_norm)) {
      optimizer.zero_grad();
      ++result.skipped_steps;
      progress.message("warning: step " + std::to_string(step + 1) + " skipped: loss " + std::to_string(global_loss) +
                       ", gradient norm " + std::to_string(gradient_norm));
      if (++bad_steps_in_a_row >= options.max_bad_steps)
        throw UserError(std::to_string(bad_steps_in_a_row) + " steps in a row had a non-finite loss or gradient (last: step " +
                            std::to_string(step + 1) + "); stopping without writing a checkpoint of this state",
                        "lower --lr, add --warmup-steps, or check the data; earlier checkpoints are intact");
      continue;
    }
    bad_steps_in_a_row = 0;
    optimizer.step(learning_rate);
    // Counted from the moments themselves: after a resume they exist before the first step.
    memory.optimizer_state = optimizer.state_bytes();
    measured_step = true;
    optimizer.zero_grad();

    if (options.check_every > 0 && ((step + 1) % options.check_every == 0 || step + 1 == options.steps))
      check_adapters_agree(communicator, *model, step + 1);
    result.losses.push_back(global_loss);
    const double step_seconds = seconds_since(step_start);
    result.step_seconds.push_back(step_seconds);
    progress.step(step + 1, global_loss, learning_rate, tokens_per_step / step_seconds, step_seconds);
    shard::Json line;
    line["step"] = step + 1;
    line["loss"] = global_loss;
    line["lr"] = learning_rate;
    line["grad_norm"] = gradient_norm;
    line["tokens_per_second"] = tokens_per_step / step_seconds;
    line["step_seconds"] = step_seconds;
    const double gather_wait_seconds = model->gatherer().stats().wait_seconds - gather_wait_before;
    line["gather_wait_seconds"] = gather_wait_seconds;
    line["reduce_wait_seconds"] = reduce_wait_seconds;
    line["communication_seconds"] = reduce_wait_seconds + gather_wait_seconds;
    line["peak_bytes_rank0"] = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
    write_metrics(line);
    if (options.eval_every > 0 && (step + 1) % options.eval_every == 0 && step + 1 < options.steps)
      run_evaluation(step + 1, progress);
    if (options.save_every > 0 && (step + 1) % options.save_every == 0 && step + 1 < options.steps) {
      save(step + 1, options.out_dir + "/checkpoints/step-" + std::to_string(step + 1));
      if (rank == 0) prune_checkpoints(options.out_dir, options.keep_checkpoints);
    }
  }
  const double training_seconds = seconds_since(training_start);
  run_evaluation(options.steps, progress);
  overall_peak = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
  memory.peak_total = overall_peak;
  result.seconds = seconds_since(run_start);
  const int64_t steps_run = options.steps - first_step;
  result.tokens_per_second = steps_run > 0 ? static_cast<double>(tokens_per_step * steps_run) / training_seconds : 0.0;
  result.gather = model->gatherer().stats();
  result.reduce_wait_seconds = communication_seconds;
  result.all_memory = cluster::gather_memory_reports(communicator, memory);

  if (rank == 0 && !options.quiet) {
    std::ostringstream summary;
    summary << "trained " << steps_run << " steps in " << training_seconds << " s ("
            << static_cast<int64_t>(result.tokens_per_second) << " tokens/s over " << world << " rank"
            << (world > 1 ? "s" : "") << "); waiting on rank 0: gradient all-reduce " << communication_seconds
            << " s (" << reducer.bucket_count() << " bucket" << (reducer.bucket_count() > 1 ? "s" : "")
            << "), 4-bit gathers " << result.gather.wait_seconds << " s";
    log::banner(summary.str());
    log::banner("memory per rank (measured by the counting allocator):");
    log::banner(cluster::format_memory_table(result.all_memory));
  }
  if (options.write_outputs && rank == 0) {
    write_peft_adapter(options.out_dir + "/final", model->named_lora_parameters(), options.lora, base_model);
    save(options.steps, options.out_dir + "/checkpoints/step-" + std::to_string(options.steps));
    prune_checkpoints(options.out_dir, options.keep_checkpoints);
    write_file_atomically(options.out_dir + "/memory.json", cluster::memory_reports_json(result.all_memory));
    if (!options.quiet) log::banner("adapter written to " + options.out_dir + "/final (PEFT format)");
  }
  if (inspect) inspect(*model);
  return result;
}

}  // namespace qlora::launcher
