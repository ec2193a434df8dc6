// Evaluation of a model (with an adapter, if given) over a text.
#include "launcher/evaluate.h"

#include <cmath>

#include "launcher/adapter_io.h"
#include "launcher/data_loading.h"
#include "launcher/errors.h"
#include "launcher/train.h"
#include "prepare/prepare.h"

namespace qlora::launcher {

double mean_token_loss(model::LlamaModelImpl& model, const data::BatchSampler& windows, int64_t window_count,
                       int64_t rows_per_forward, cluster::Communicator& communicator) {
  const int world = communicator.size();
  const int64_t per_rank = window_count / world;
  if (per_rank == 0) return std::nan("");
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  double loss_sum = 0.0;
  double token_count = 0.0;
  const auto [inputs, targets] = windows.sequential(per_rank * world, communicator.rank(), world);
  for (int64_t row = 0; row < per_rank; row += rows_per_forward) {
    const int64_t rows = std::min(rows_per_forward, per_rank - row);
    loss_sum += model.next_token_loss(inputs.narrow(0, row, rows), targets.narrow(0, row, rows), /*sum=*/true)
                    .item<double>();
    token_count += static_cast<double>(targets.narrow(0, row, rows).numel());
  }
  if (was_training) model.train();
  // fp32 sums: token counts stay exact below 2^24 per reduction; loss sums keep ~7 digits.
  float totals[2] = {static_cast<float>(loss_sum), static_cast<float>(token_count)};
  communicator.all_reduce(totals, 2, cluster::ReduceOp::sum);
  return static_cast<double>(totals[0]) / static_cast<double>(totals[1]);
}

EvalResult run_evaluation(const EvalOptions& options, cluster::Communicator& communicator) {
  std::unique_ptr<shard::ModelStore> store;
  std::unique_ptr<data::BatchSampler> windows;
  model::LlamaModel model{nullptr};
  int64_t window_count = 0;
  run_collectively(communicator, [&] {
    if (options.sequence_length < 2) throw UserError("--seq-len must be at least 2");
    if (options.max_windows < 1 || options.micro_batch < 1) throw UserError("--windows and --micro-batch must be positive");
    store = shard::ModelStore::open(options.model_path);
  });
  const auto tokens = load_data_tokens(options.data_path, *store, communicator, true);
  run_collectively(communicator, [&] {
    windows = std::make_unique<data::BatchSampler>(tokens, 0, tokens->size(), options.sequence_length, 1, 0);
    window_count = std::min(options.max_windows, windows->window_count()) / communicator.size() * communicator.size();
    if (window_count == 0)
      throw UserError("the evaluation text is too short for one window of --seq-len + 1 tokens per rank");
    check_world_fits(*store, communicator.size());
    model = model::LlamaModel(*store, communicator);
    prepare::PrepareOptions prepare_options;
    prepare_options.use_gradient_checkpointing = false;
    prepare::prepare_model_for_kbit_training(*model, prepare_options);
    if (!options.adapter_dir.empty()) load_peft_adapter(options.adapter_dir, *model);
  });
  EvalResult result;
  result.loss = mean_token_loss(*model, *windows, window_count, options.micro_batch, communicator);
  result.perplexity = std::exp(result.loss);
  result.windows = window_count;
  result.tokens = window_count * options.sequence_length;
  return result;
}

}  // namespace qlora::launcher
