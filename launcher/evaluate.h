// Evaluation: mean next-token loss and perplexity of a model, with or without a PEFT adapter, over
// consecutive windows of a text (`qlora eval`, and the trainer's held-out evaluation).
#pragma once

#include <cstdint>
#include <string>

#include "cluster/communicator.h"
#include "data/batch_sampler.h"
#include "launcher/data_loading.h"
#include "model/llama.h"

namespace qlora::launcher {

// Collective. Every rank runs the same number of forwards (each gathers blocks collectively) over
// its share of the first `window_count` windows (rounded down to a multiple of the world size);
// loss sums and token counts are all-reduced, so the result is the mean over all those tokens.
double mean_token_loss(model::LlamaModelImpl& model, const data::BatchSampler& windows, int64_t window_count,
                       int64_t rows_per_forward, cluster::Communicator& communicator);

struct EvalOptions {
  std::string model_path;
  std::string adapter_dir;        // empty: the base model alone
  std::string data_path;          // empty: the embedded Austen excerpt
  int64_t sequence_length = 128;
  int64_t max_windows = 64;
  int64_t micro_batch = 8;
  ExampleOptions examples;        // how .jsonl/.json data becomes examples (load_data_examples)
};

struct EvalResult {
  double loss = 0;
  double perplexity = 0;
  int64_t windows = 0;
  int64_t tokens = 0;
};

EvalResult run_evaluation(const EvalOptions& options, cluster::Communicator& communicator);

}  // namespace qlora::launcher
