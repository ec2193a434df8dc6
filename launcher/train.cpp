// The training loop, in three parts: open_run loads the rank's shard and the data, prepares the
// model, attaches LoRA and resumes from a checkpoint; train_step is one optimizer step; finish_run
// evaluates, reports memory and writes the adapter. Between steps the loop honours stop requests,
// shows progress, appends to metrics.jsonl, and evaluates and checkpoints when asked to.
#include "launcher/train.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>
#include <sstream>

#include "cluster/gradient_reducer.h"
#include "cluster/memory_report.h"
#include "common/atomic_file.h"
#include "common/hash.h"
#include "common/log.h"
#include "data/batch_sampler.h"
#include "launcher/adapter_io.h"
#include "launcher/checkpoint.h"
#include "launcher/data_loading.h"
#include "launcher/errors.h"
#include "launcher/evaluate.h"
#include "launcher/metrics.h"
#include "launcher/optimizer.h"
#include "launcher/progress.h"
#include "launcher/run_folder.h"

namespace qlora::launcher {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

std::atomic<int> g_stop_signal{0};

// FNV-1a over every adapter's bytes: equal on all ranks unless their replicas drifted apart.
std::string adapter_checksum(model::LlamaModelImpl& model) {
  Fnv1a64 hash;
  for (const auto& parameter : model.lora_parameters()) {
    auto contiguous = parameter.detach().contiguous();
    hash.update(contiguous.data_ptr(), static_cast<size_t>(contiguous.numel()) * contiguous.element_size());
  }
  return hash.hex();
}

// The memory report's per-phase figures, from the counting allocator: activation peaks above the
// state resident when the step began, the gradients as the first applied step holds them, and the
// peak over the whole run.
class StepMemory {
 public:
  explicit StepMemory(cluster::MemoryReport& report)
      : report_(report), overall_peak_(cluster::MemoryCounter::peak_bytes()) {}

  void begin_step() {
    overall_peak_ = overall_peak();
    resident_ = cluster::MemoryCounter::current_bytes();
  }
  // Each phase's peak is measured from its own start.
  void begin_forward() { cluster::MemoryCounter::reset_peak(); }
  void end_forward() {
    report_.forward_activation_peak = std::max(report_.forward_activation_peak, above_resident());
    overall_peak_ = overall_peak();
  }
  void begin_backward() { cluster::MemoryCounter::reset_peak(); }
  void end_backward() { report_.backward_activation_peak = std::max(report_.backward_activation_peak, above_resident()); }
  void gradients_reduced(int64_t bucket_bytes) {
    if (!applied_a_step_) report_.gradients = cluster::MemoryCounter::current_bytes() - resident_ + bucket_bytes;
  }
  // Counted from the moments themselves: after a resume they exist before the first step.
  void optimizer_stepped(int64_t optimizer_bytes) {
    report_.optimizer_state = optimizer_bytes;
    applied_a_step_ = true;
  }
  int64_t overall_peak() const { return std::max(overall_peak_, cluster::MemoryCounter::peak_bytes()); }

 private:
  int64_t above_resident() const { return cluster::MemoryCounter::peak_bytes() - resident_; }

  cluster::MemoryReport& report_;
  int64_t overall_peak_;
  int64_t resident_ = 0;
  bool applied_a_step_ = false;
};

// Everything a run holds from open_run to finish_run.
struct Run {
  Run(const TrainOptions& run_options, cluster::Communicator& run_communicator)
      : options(run_options), communicator(run_communicator), rank(run_communicator.rank()),
        world(run_communicator.size()), start(Clock::now()) {
    result.memory.rank = rank;
  }

  const TrainOptions& options;
  cluster::Communicator& communicator;
  const int rank;
  const int world;
  const Clock::time_point start;
  TrainResult result;
  std::unique_ptr<shard::ModelStore> store;
  std::string base_model;                      // named in the adapter's config
  std::unique_ptr<data::BatchSampler> sampler;
  std::unique_ptr<data::BatchSampler> eval_windows;  // null: no evaluation
  int64_t eval_window_count = 0;
  BatchSplit batch;
  model::LlamaModel model{nullptr};
  std::vector<torch::Tensor> parameters;       // the adapters
  std::unique_ptr<cluster::GradientReducer> reducer;
  int64_t bucket_bytes = 0;
  std::optional<AdamW> optimizer;
  Schedule schedule;
  int64_t first_step = 0;
  MetricsFile metrics;
  RunIdentity identity;                        // recorded in checkpoints, checked on resume
  std::optional<StepMemory> memory;
  std::optional<Progress> progress;
  Clock::time_point training_start;
  int bad_steps_in_a_row = 0;
};

// ---- open_run ------------------------------------------------------------------------------------

// Training windows and the evaluation windows: the separate evaluation text, or a held-out tail.
void cut_windows(Run& run, const std::shared_ptr<data::TokenStream>& tokens, const std::shared_ptr<data::TokenStream>& eval_tokens) {
  const TrainOptions& options = run.options;
  int64_t train_end = tokens->size();
  if (eval_tokens) {
    run.eval_windows = std::make_unique<data::BatchSampler>(eval_tokens, 0, eval_tokens->size(), options.sequence_length,
                                                      options.global_batch, options.seed);
  } else if (options.eval_fraction > 0) {
    const auto held_out = static_cast<int64_t>(static_cast<double>(tokens->size()) * options.eval_fraction);
    train_end -= held_out;
    if (held_out > 0)
      run.eval_windows = std::make_unique<data::BatchSampler>(tokens, train_end, tokens->size(), options.sequence_length,
                                                        options.global_batch, options.seed);
  }
  run.sampler = std::make_unique<data::BatchSampler>(tokens, 0, train_end, options.sequence_length, options.global_batch,
                                               options.seed);
  if (run.sampler->token_count() < options.sequence_length + 2)
    throw UserError("the training text has " + std::to_string(run.sampler->token_count()) +
                        " tokens, fewer than --seq-len + 2",
                    "use more text or a shorter --seq-len");
  if (run.eval_windows) {
    run.eval_window_count = std::min(options.eval_batches * options.global_batch, run.eval_windows->window_count());
    if (run.eval_window_count < run.world)
      throw UserError("the evaluation text holds " + std::to_string(run.eval_windows->window_count()) +
                          " windows of --seq-len + 1 tokens, fewer than the " + std::to_string(run.world) + " ranks",
                      "use more evaluation text, a larger --eval-fraction, or --eval-fraction 0");
  }
}

// The rank's shard of the model, prepared for k-bit training, with adapters attached; the memory
// report's resident figures measured around each part.
void build_model(Run& run) {
  cluster::MemoryReport& memory = run.result.memory;
  torch::manual_seed(run.options.seed);
  run.model = model::LlamaModel(*run.store, run.communicator, run.options.gather_slots);
  memory.quantized_weights = run.model->load_memory().quantized;
  memory.gather_buffers = run.model->load_memory().gather_pool;

  int64_t before = cluster::MemoryCounter::current_bytes();
  run.result.preparation = prepare::prepare_model_for_kbit_training(*run.model, run.options.prepare);
  memory.replicated_parameters =
      run.model->load_memory().replicated + (cluster::MemoryCounter::current_bytes() - before);

  before = cluster::MemoryCounter::current_bytes();
  run.model->add_lora(run.options.lora, run.options.seed);
  memory.adapters = cluster::MemoryCounter::current_bytes() - before;
  prepare::check_trainable(*run.model, run.result.preparation.method);
}

// Everything a user can get wrong surfaces here, on every rank at once (see run_collectively).
void load_model_and_data(Run& run) {
  const TrainOptions& options = run.options;
  run_collectively(run.communicator, [&] {
    run.batch = split_batch(options, run.world);
    run.store = shard::ModelStore::open(options.model_path);
    check_world_fits(*run.store, run.world);
  });
  warn_if_beyond_context(*run.store, options.sequence_length);
  // The data, tokenized by the model's own tokenizer (collective: rank 0 builds the token cache).
  const auto tokens = load_data_tokens(options.data_path, *run.store, run.communicator, options.quiet);
  const auto eval_tokens = options.eval_data_path.empty()
                               ? nullptr
                               : load_data_tokens(options.eval_data_path, *run.store, run.communicator, options.quiet);
  run_collectively(run.communicator, [&] {
    cut_windows(run, tokens, eval_tokens);
    build_model(run);
  });
  run.base_model = run.store->header().source.empty() ? options.model_path : run.store->header().source;
  run.identity = run_identity(options, *run.store, tokens->size());
}

// The adapters' gradient reducer, optimizer and schedule.
void attach_training_state(Run& run) {
  const TrainOptions& options = run.options;
  run.parameters = run.model->lora_parameters();
  int64_t adapter_parameters = 0;
  for (const auto& parameter : run.parameters) adapter_parameters += parameter.numel();
  char lora_line[200];
  // DoRA adds a magnitude vector to each projection's two matrices.
  const size_t tensors_per_projection = options.lora.use_dora ? 3 : 2;
  std::snprintf(lora_line, sizeof lora_line, "%s: r=%lld alpha=%g dropout=%g on %zu projections, %lld trainable parameters",
                options.lora.use_dora ? "dora" : "lora", static_cast<long long>(options.lora.r), options.lora.alpha,
                options.lora.dropout, run.parameters.size() / tensors_per_projection,
                static_cast<long long>(adapter_parameters));
  log::banner(lora_line);

  // Backward produces gradients from the last block to the first: bucket them in that order.
  std::vector<torch::Tensor> ready_order(run.parameters.rbegin(), run.parameters.rend());
  const int64_t before_bucket = cluster::MemoryCounter::current_bytes();
  run.reducer = std::make_unique<cluster::GradientReducer>(
      run.communicator, ready_order, static_cast<int64_t>(options.bucket_mb * 1048576.0), options.overlap_reduce);
  run.bucket_bytes = cluster::MemoryCounter::current_bytes() - before_bucket;
  run.model->gatherer().set_prefetch(options.prefetch);
  AdamWOptions adam;
  adam.weight_decay = options.weight_decay;
  run.optimizer.emplace(run.parameters, adam);
  run.schedule.kind = options.lr_schedule;
  run.schedule.peak = options.learning_rate;
  run.schedule.warmup_steps = options.warmup_steps;
  run.schedule.total_steps = options.steps;
}

CheckpointInfo checkpoint_info(const Run& run, int64_t step) {
  const TrainOptions& options = run.options;
  CheckpointInfo info;
  info.identity = run.identity;
  info.step = step;
  info.seed = options.seed;
  info.global_batch = options.global_batch;
  info.sequence_length = options.sequence_length;
  return info;
}

// Rank 0's run folder: metrics.jsonl (appended to after a resume) and the options it ran with.
void open_run_folder(Run& run) {
  const TrainOptions& options = run.options;
  if (!options.write_outputs || run.rank != 0) return;
  const bool resumed = run.first_step > 0;
  std::error_code error;
  std::filesystem::create_directories(options.out_dir, error);
  if (error) throw UserError("cannot create --out " + options.out_dir + ": " + error.message());
  reconcile_metrics(options.out_dir, run.first_step);
  run.metrics = MetricsFile(options.out_dir + "/metrics.jsonl", /*append=*/true);
  if (!options.resolved_config.empty())
    write_file_atomically(options.out_dir + (resumed ? "/config-resumed.json" : "/config.json"), options.resolved_config);
}

std::unique_ptr<Run> open_run(const TrainOptions& options, cluster::Communicator& communicator) {
  validate_options(options, communicator.size());
  if (options.model_path.empty()) throw UserError("no model given", "pass --model model.h5 (see qlora convert)");
  cluster::MemoryCounter::install();
  auto run = std::make_unique<Run>(options, communicator);
  // Before anything is loaded: an unwritable --out or another run's folder ends the job at once.
  run_collectively(communicator, [&] {
    if (options.write_outputs && run->rank == 0) prepare_run_folder(options.out_dir, options.resume, options.overwrite);
  });
  load_model_and_data(*run);
  if (!options.banner.empty()) log::banner(options.banner);
  log::banner(run->result.preparation.summary());
  run->model->train();
  attach_training_state(*run);
  run->first_step = resume_training(options.resume, options.out_dir, checkpoint_info(*run, 0), communicator,
                                    *run->model, *run->optimizer, parse_resume_mismatch(options.resume_mismatch));
  run->result.first_step = run->first_step;
  open_run_folder(*run);
  run->memory.emplace(run->result.memory);
  run->progress.emplace(run->first_step, options.steps, !options.quiet, options.progress);
  run->training_start = Clock::now();
  return run;
}

// ---- train_step ----------------------------------------------------------------------------------

void require_gradient_path(const torch::Tensor& loss) {
  if (!loss.requires_grad())
    throw UserError("no gradient can reach the adapters: the loss does not depend on any trainable parameter",
                    "with reentrant gradient checkpointing the input embeddings' output must require grad "
                    "(the preparation protocol's hook); do not disable it");
}

// A non-finite loss or gradient norm (the same on every rank) skips the step; too many in a row end
// the run before a checkpoint can record the damage.
bool skip_non_finite_step(Run& run, int64_t step, double loss, double gradient_norm) {
  if (std::isfinite(loss) && std::isfinite(gradient_norm)) {
    run.bad_steps_in_a_row = 0;
    return false;
  }
  run.optimizer->zero_grad();
  ++run.result.skipped_steps;
  run.progress->message("warning: step " + std::to_string(step + 1) + " skipped: loss " + std::to_string(loss) +
                        ", gradient norm " + std::to_string(gradient_norm));
  if (++run.bad_steps_in_a_row >= run.options.max_bad_steps)
    throw UserError(std::to_string(run.bad_steps_in_a_row) + " steps in a row had a non-finite loss or gradient (last: step " +
                        std::to_string(step + 1) + "); stopping without writing a checkpoint of this state",
                    "lower --lr, add --warmup-steps, or check the data; earlier checkpoints are intact");
  return true;
}

struct StepOutcome {
  double loss = 0;               // mean over all ranks' sequences
  double learning_rate = 0;
  double gradient_norm = 0;      // before clipping
  double reduce_wait_seconds = 0;
};

// One optimizer step (0-based `step`): forward and backward over this rank's micro-batches, the
// gradients accumulating until the last backward all-reduces them bucket by bucket as they fill;
// then clipping and AdamW. Empty when the step was skipped.
std::optional<StepOutcome> train_step(Run& run, int64_t step) {
  StepOutcome outcome;
  outcome.learning_rate = run.schedule.at(step);
  auto [inputs, targets] = run.sampler->batch(step, run.rank, run.world);
  const int64_t rows = run.batch.micro_batch;
  const int64_t micro_steps = run.batch.micro_steps;
  double local_loss = 0.0;
  run.memory->begin_step();
  for (int64_t micro = 0; micro < micro_steps; ++micro) {
    run.model->set_dropout_rows(run.options.seed, step, run.rank * run.batch.rows_per_rank + micro * rows);
    run.memory->begin_forward();
    auto loss = run.model->next_token_loss(inputs.narrow(0, micro * rows, rows), targets.narrow(0, micro * rows, rows));
    run.memory->end_forward();
    require_gradient_path(loss);
    run.memory->begin_backward();
    run.reducer->begin_step(/*last_micro_step=*/micro + 1 == micro_steps);
    (loss / static_cast<double>(micro_steps)).backward();
    run.memory->end_backward();
    local_loss += loss.item<double>() / static_cast<double>(micro_steps);
  }
  outcome.reduce_wait_seconds = run.reducer->finish_step();
  run.result.reduce_wait_seconds += outcome.reduce_wait_seconds;
  outcome.loss = run.communicator.all_reduce_scalar(local_loss, cluster::ReduceOp::average);
  // The reduced gradients are identical on every rank, so is their norm and the decision below.
  const double clip = run.options.max_grad_norm > 0 ? run.options.max_grad_norm : 1e30;
  outcome.gradient_norm = torch::nn::utils::clip_grad_norm_(run.parameters, clip);
  run.memory->gradients_reduced(run.bucket_bytes);
  if (skip_non_finite_step(run, step, outcome.loss, outcome.gradient_norm)) return std::nullopt;

  run.optimizer->step(outcome.learning_rate);
  run.memory->optimizer_stepped(run.optimizer->state_bytes());
  run.optimizer->zero_grad();
  return outcome;
}

// ---- between steps -------------------------------------------------------------------------------

void save(Run& run, int64_t step, const std::string& directory) {
  if (!run.options.write_outputs || run.rank != 0) return;
  save_checkpoint(directory, *run.model, *run.optimizer, checkpoint_info(run, step), run.base_model);
}

// A stop request (SIGTERM/SIGUSR1) is honoured only when every rank has seen the same answer.
void stop_if_requested(Run& run, int64_t step) {
  float stop = static_cast<float>(g_stop_signal.load() != 0);
  run.communicator.all_reduce(&stop, 1, cluster::ReduceOp::sum);
  if (stop <= 0) return;
  const std::string directory = checkpoint_directory(run.options.out_dir, step);
  save(run, step, directory);
  run.communicator.barrier();
  run.progress->message("stop requested (signal): checkpoint saved at step " + std::to_string(step) + " in " +
                        directory + "; rerun with --resume auto to continue");
  throw Preempted("stopped at step " + std::to_string(step) + " on request");
}

void evaluate(Run& run, int64_t step) {
  if (!run.eval_windows) return;
  const TrainOptions& options = run.options;
  const double loss =
      mean_token_loss(*run.model, *run.eval_windows, run.eval_window_count, run.batch.micro_batch, run.communicator);
  run.result.eval_losses.emplace_back(step, loss);
  char line[160];
  std::snprintf(line, sizeof line, "eval  step %lld: loss %.4f  perplexity %.2f  (%lld windows of %lld tokens)",
                static_cast<long long>(step), loss, std::exp(loss),
                static_cast<long long>(run.eval_window_count / run.world * run.world),
                static_cast<long long>(options.sequence_length));
  if (!options.quiet) run.progress->message(line);
  MetricsLine entry;
  entry.kind = MetricsLine::Kind::evaluation;
  entry.step = step;
  entry.loss = loss;
  entry.perplexity = std::exp(loss);
  run.metrics.write(entry);
}

// After step `done` (1-based) was applied: the replica check, progress, its metrics line, and the
// evaluation and checkpoint that fall on it.
void record_step(Run& run, int64_t done, const StepOutcome& outcome, Clock::time_point step_start,
                 double gather_wait_before) {
  const TrainOptions& options = run.options;
  if (options.check_every > 0 && (done % options.check_every == 0 || done == options.steps))
    check_adapters_agree(run.communicator, *run.model, done);
  run.result.losses.push_back(outcome.loss);
  MetricsLine line;
  line.step = done;
  line.loss = outcome.loss;
  line.learning_rate = outcome.learning_rate;
  line.gradient_norm = outcome.gradient_norm;
  line.step_seconds = seconds_since(step_start);
  line.tokens_per_second = static_cast<double>(options.global_batch * options.sequence_length) / line.step_seconds;
  run.result.step_seconds.push_back(line.step_seconds);
  run.progress->step(done, outcome.loss, outcome.learning_rate, line.tokens_per_second, line.step_seconds);
  line.gather_wait_seconds = run.model->gatherer().stats().wait_seconds - gather_wait_before;
  line.reduce_wait_seconds = outcome.reduce_wait_seconds;
  line.peak_bytes_rank0 = run.memory->overall_peak();
  run.metrics.write(line);
  if (options.eval_every > 0 && done % options.eval_every == 0 && done < options.steps) evaluate(run, done);
  if (options.save_every > 0 && done % options.save_every == 0 && done < options.steps) {
    save(run, done, checkpoint_directory(options.out_dir, done));
    if (run.rank == 0) prune_checkpoints(options.out_dir, options.keep_checkpoints);
  }
}

// ---- finish_run ----------------------------------------------------------------------------------

void log_summary(const Run& run, double training_seconds, int64_t steps_run) {
  const TrainResult& result = run.result;
  std::ostringstream summary;
  summary << "trained " << steps_run << " steps in " << training_seconds << " s ("
          << static_cast<int64_t>(result.tokens_per_second) << " tokens/s over " << run.world << " rank"
          << (run.world > 1 ? "s" : "") << "); waiting on rank 0: gradient all-reduce " << result.reduce_wait_seconds
          << " s (" << run.reducer->bucket_count() << " bucket" << (run.reducer->bucket_count() > 1 ? "s" : "")
          << "), 4-bit gathers " << result.gather.wait_seconds << " s";
  log::banner(summary.str());
  log::banner("memory per rank (measured by the counting allocator):");
  log::banner(cluster::format_memory_table(result.all_memory));
}

void write_run_outputs(Run& run) {
  const TrainOptions& options = run.options;
  save_final_adapter(options.out_dir, *run.model, options.lora, run.base_model);
  save(run, options.steps, checkpoint_directory(options.out_dir, options.steps));
  prune_checkpoints(options.out_dir, options.keep_checkpoints);
  write_file_atomically(options.out_dir + "/memory.json", cluster::memory_reports_json(run.result.all_memory));
  if (!options.quiet) log::banner("adapter written to " + options.out_dir + "/final (PEFT format)");
}

TrainResult finish_run(Run& run, const std::function<void(model::LlamaModelImpl&)>& inspect) {
  const TrainOptions& options = run.options;
  TrainResult& result = run.result;
  const double training_seconds = seconds_since(run.training_start);
  evaluate(run, options.steps);
  result.memory.peak_total = run.memory->overall_peak();
  result.seconds = seconds_since(run.start);
  const int64_t steps_run = options.steps - run.first_step;
  const int64_t tokens_per_step = options.global_batch * options.sequence_length;
  result.tokens_per_second = steps_run > 0 ? static_cast<double>(tokens_per_step * steps_run) / training_seconds : 0.0;
  result.gather = run.model->gatherer().stats();
  result.all_memory = cluster::gather_memory_reports(run.communicator, result.memory);
  if (run.rank == 0 && !options.quiet) log_summary(run, training_seconds, steps_run);
  if (options.write_outputs && run.rank == 0) write_run_outputs(run);
  if (inspect) inspect(*run.model);
  return std::move(result);
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

void request_stop(int signal_number) { g_stop_signal.store(signal_number); }

TrainResult run_training(const TrainOptions& options, cluster::Communicator& communicator,
                         const std::function<void(model::LlamaModelImpl&)>& inspect) {
  const auto run = open_run(options, communicator);
  for (int64_t step = run->first_step; step < options.steps; ++step) {
    stop_if_requested(*run, step);
    const auto step_start = Clock::now();
    const double gather_wait_before = run->model->gatherer().stats().wait_seconds;
    if (const auto outcome = train_step(*run, step)) record_step(*run, step + 1, *outcome, step_start, gather_wait_before);
  }
  return finish_run(*run, inspect);
}

}  // namespace qlora::launcher
