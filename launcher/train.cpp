// The training loop: load the rank's shard, prepare, attach LoRA, then per step forward with
// checkpointed blocks, backward, averaged all-reduce of adapter gradients, clipping, AdamW; measure
// memory around every phase; rank 0 writes the adapter, metrics and memory report.
#include "launcher/train.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cluster/gradient_reducer.h"
#include "cluster/log.h"
#include "launcher/adapter_io.h"
#include "launcher/data.h"
#include "launcher/demo.h"
#include "launcher/errors.h"
#include "shard/converter.h"
#include "shard/json.h"

namespace qlora::launcher {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Refuses world sizes that would leave a rank without a single quantization block of some tensor.
void check_world_fits(const shard::ModelStore& store, int world) {
  for (const auto& tensor : store.tensors()) {
    if (!tensor.quantized) continue;
    const int64_t limit = shard::max_world_for(tensor.numel, store.header().blocksize);
    if (world > limit)
      throw UserError("world size " + std::to_string(world) + " is larger than the " + std::to_string(limit) +
                          " quantization blocks of tensor '" + tensor.name + "' in " + store.path(),
                      "run with at most " + std::to_string(limit) + " ranks, or convert with a smaller --blocksize");
  }
}

// FNV-1a over every adapter's bytes: equal on all ranks unless their replicas drifted apart.
std::string adapter_checksum(model::LlamaModelImpl& model) {
  shard::Fnv1a64 hash;
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

std::string format_step_line(int64_t step, int64_t steps, double loss, double learning_rate, double tokens_per_second,
                             double step_seconds) {
  char line[200];
  std::snprintf(line, sizeof line, "step %4lld/%lld  loss %.4f  lr %.2e  %8.0f tokens/s  %.3f s/step",
                static_cast<long long>(step), static_cast<long long>(steps), loss, learning_rate, tokens_per_second,
                step_seconds);
  return line;
}

}  // namespace

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
  model::LlamaModel model{nullptr};

  // Everything a user can get wrong surfaces here, on every rank at once (see run_collectively).
  run_collectively(communicator, [&] {
    store = shard::ModelStore::open(options.model_path);
    check_world_fits(*store, world);
    const shard::ModelConfig& config = store->header().config;
    if (store->header().tokenizer != "bytes")
      cluster::log::banner("note: the model's own tokenizer is not supported yet; training on byte-level tokens");
    if (config.vocab_size < 256)
      throw UserError("model vocabulary (" + std::to_string(config.vocab_size) +
                      ") is smaller than the 256 byte-level tokens the data uses");
    const std::string text =
        options.data_path.empty() ? std::string(demo_text()) : read_text_source(options.data_path);
    sampler = std::make_unique<BatchSampler>(byte_tokens(text), options.sequence_length, options.global_batch,
                                             options.seed);
    if (sampler->token_count() < options.sequence_length + 2)
      throw UserError("the training text has " + std::to_string(sampler->token_count()) +
                          " tokens, fewer than --seq-len + 2",
                      "use more text or a shorter --seq-len");

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
  const shard::ModelConfig& config = store->header().config;
  if (!options.banner.empty()) cluster::log::banner(options.banner);
  cluster::log::banner(result.preparation.summary());
  model->train();

  auto parameters = model->lora_parameters();
  int64_t adapter_parameters = 0;
  for (const auto& parameter : parameters) adapter_parameters += parameter.numel();
  char lora_line[200];
  std::snprintf(lora_line, sizeof lora_line, "lora: r=%lld alpha=%g dropout=%g on %zu projections, %lld trainable parameters",
                static_cast<long long>(options.lora.r), options.lora.alpha, options.lora.dropout, parameters.size() / 2,
                static_cast<long long>(adapter_parameters));
  cluster::log::banner(lora_line);

  // Backward produces gradients from the last block to the first: bucket them in that order.
  std::vector<torch::Tensor> ready_order(parameters.rbegin(), parameters.rend());
  const int64_t before_bucket = cluster::MemoryCounter::current_bytes();
  cluster::GradientReducer reducer(communicator, ready_order, static_cast<int64_t>(options.bucket_mb * 1048576.0),
                                   options.overlap_reduce);
  const int64_t bucket_bytes = cluster::MemoryCounter::current_bytes() - before_bucket;
  model->gatherer().set_prefetch(options.prefetch);
  torch::optim::AdamW optimizer(parameters, torch::optim::AdamWOptions(options.learning_rate)
                                                .weight_decay(options.weight_decay)
                                                .betas({0.9, 0.999})
                                                .eps(1e-8));

  std::ofstream metrics;
  if (options.write_outputs && rank == 0) {
    std::filesystem::create_directories(options.out_dir);
    metrics.open(options.out_dir + "/metrics.jsonl", std::ios::trunc);
  }

  int64_t overall_peak = cluster::MemoryCounter::peak_bytes();
  const int64_t tokens_per_step = options.global_batch * options.sequence_length;
  double communication_seconds = 0.0;
  const auto training_start = Clock::now();
  for (int64_t step = 0; step < options.steps; ++step) {
    const auto step_start = Clock::now();
    const double gather_wait_before = model->gatherer().stats().wait_seconds;
    model->set_dropout_seed(options.seed * 1000003ull + static_cast<uint64_t>(step));
    auto [inputs, targets] = sampler->batch(step, rank, world);

    overall_peak = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
    const int64_t resident = cluster::MemoryCounter::current_bytes();
    cluster::MemoryCounter::reset_peak();
    auto logits = model->forward(inputs);
    auto loss = torch::nn::functional::cross_entropy(logits.view({-1, config.vocab_size}), targets.view({-1}));
    memory.forward_activation_peak =
        std::max(memory.forward_activation_peak, cluster::MemoryCounter::peak_bytes() - resident);
    if (!loss.requires_grad())
      throw UserError("no gradient can reach the adapters: the loss does not depend on any trainable parameter",
                      "with reentrant gradient checkpointing the input embeddings' output must require grad "
                      "(the preparation protocol's hook); do not disable it");

    overall_peak = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
    cluster::MemoryCounter::reset_peak();
    reducer.begin_step();
    loss.backward();
    memory.backward_activation_peak =
        std::max(memory.backward_activation_peak, cluster::MemoryCounter::peak_bytes() - resident);
    logits = torch::Tensor();
    const double local_loss = loss.item<double>();
    loss = torch::Tensor();

    communication_seconds += reducer.finish_step();
    if (options.max_grad_norm > 0) torch::nn::utils::clip_grad_norm_(parameters, options.max_grad_norm);
    if (step == 0) memory.gradients = cluster::MemoryCounter::current_bytes() - resident + bucket_bytes;

    const int64_t before_step = cluster::MemoryCounter::current_bytes();
    optimizer.step();
    if (step == 0) memory.optimizer_state = cluster::MemoryCounter::current_bytes() - before_step;
    optimizer.zero_grad();

    const double global_loss = communicator.all_reduce_scalar(local_loss, cluster::ReduceOp::average);
    if (options.check_every > 0 && ((step + 1) % options.check_every == 0 || step + 1 == options.steps))
      check_adapters_agree(communicator, *model, step + 1);
    if (!std::isfinite(global_loss))
      throw UserError("the loss became " + std::to_string(global_loss) + " at step " + std::to_string(step + 1),
                      "lower --lr or check the data");
    result.losses.push_back(global_loss);
    const double step_seconds = seconds_since(step_start);
    const double exposed_gather = model->gatherer().stats().wait_seconds - gather_wait_before;
    if (!options.quiet)
      cluster::log::banner(format_step_line(step + 1, options.steps, global_loss, options.learning_rate,
                                            tokens_per_step / step_seconds, step_seconds));
    if (metrics.is_open()) {
      shard::Json line;
      line["step"] = step + 1;
      line["loss"] = global_loss;
      line["lr"] = options.learning_rate;
      line["tokens_per_second"] = tokens_per_step / step_seconds;
      line["step_seconds"] = step_seconds;
      line["gather_wait_seconds"] = exposed_gather;
      line["peak_bytes_rank0"] = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
      metrics << line.dump() << "\n" << std::flush;
    }
  }
  const double training_seconds = seconds_since(training_start);
  overall_peak = std::max(overall_peak, cluster::MemoryCounter::peak_bytes());
  memory.peak_total = overall_peak;
  result.seconds = seconds_since(run_start);
  result.tokens_per_second = static_cast<double>(tokens_per_step * options.steps) / training_seconds;
  result.gather = model->gatherer().stats();
  result.reduce_wait_seconds = communication_seconds;
  result.all_memory = cluster::gather_memory_reports(communicator, memory);

  if (rank == 0 && !options.quiet) {
    std::ostringstream summary;
    summary << "trained " << options.steps << " steps in " << training_seconds << " s ("
            << static_cast<int64_t>(result.tokens_per_second) << " tokens/s over " << world << " rank"
            << (world > 1 ? "s" : "") << "); waiting on rank 0: gradient all-reduce " << communication_seconds
            << " s (" << reducer.bucket_count() << " bucket" << (reducer.bucket_count() > 1 ? "s" : "")
            << "), 4-bit gathers " << result.gather.wait_seconds << " s";
    cluster::log::banner(summary.str());
    cluster::log::banner("memory per rank (measured by the counting allocator):");
    cluster::log::banner(cluster::format_memory_table(result.all_memory));
  }
  if (options.write_outputs && rank == 0) {
    write_peft_adapter(options.out_dir + "/final", model->named_lora_parameters(), options.lora,
                       store->header().source.empty() ? options.model_path : store->header().source);
    write_file_atomically(options.out_dir + "/memory.json", cluster::memory_reports_json(result.all_memory));
    if (!options.quiet) cluster::log::banner("adapter written to " + options.out_dir + "/final (PEFT format)");
  }
  if (inspect) inspect(*model);
  return result;
}

}  // namespace qlora::launcher
