// Generation throughput of the KV-cached decoder on the SmolLM2-135M GGUF converted two ways
// (unquantized fp32, and NF4 with blocks gathered per step): prefill tokens/s on a 128-token prompt
// and greedy decode tokens/s over 32 new tokens (each a full pass over the 30 blocks plus the LM
// head), median of 3 runs, on however many ranks mpirun starts. The 1-minute load average is recorded
// because this machine's 2 cores are shared.
// Usage: [mpirun -np N] bench_generate /path/SmolLM2-135M-Instruct.Q4_1.gguf  -> bench/results/generate-npN.json
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "bench_mpi.h"
#include "cluster/mpi_communicator.h"
#include "cluster/rank_layout.h"
#include "common/json.h"
#include "launcher/threads.h"
#include "model/generation.h"
#include "prepare/prepare.h"
#include "shard/converter.h"
#include "shard/model_store.h"

namespace {

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  qlora::bench::MpiSession mpi(&argc, &argv);
  if (argc < 2) {
    if (mpi.rank == 0) std::fprintf(stderr, "usage: bench_generate SmolLM2-135M-Instruct.Q4_1.gguf\n");
    return 2;
  }
  const std::string gguf = argv[1];
  auto communicator = qlora::cluster::make_mpi_communicator(MPI_COMM_WORLD);
  auto layout = qlora::cluster::discover_rank_layout(MPI_COMM_WORLD);
  const int threads = qlora::launcher::assign_threads(layout, 0);
  constexpr int64_t prompt_tokens = 128;
  constexpr int64_t new_tokens = 32;
  qlora::Json out;
  out["ranks"] = mpi.world;
  out["threads_per_rank"] = threads;
  out["prompt_tokens"] = prompt_tokens;
  out["new_tokens"] = new_tokens;
  for (const bool quantize : {false, true}) {
    const std::string name = quantize ? "nf4" : "fp32";
    const std::string path = "/tmp/qlora-bench-generate-" + name + ".h5";
    if (mpi.rank == 0) {
      qlora::shard::ConvertOptions options;
      options.quantize = quantize;
      qlora::shard::convert_gguf_file(gguf, path, options);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    auto store = qlora::shard::ModelStore::open(path);
    qlora::model::LlamaModel model(*store, *communicator);
    qlora::prepare::PrepareOptions prepare_options;
    prepare_options.use_gradient_checkpointing = false;
    qlora::prepare::prepare_model_for_kbit_training(*model, prepare_options);
    model->add_lora(qlora::model::LoraConfig{}, 1);  // r 8 on all seven projections, as a trained adapter
    model->eval();
    std::vector<int64_t> prompt;
    for (int64_t i = 0; i < prompt_tokens; ++i) prompt.push_back((i * 7919 + 13) % 49152);
    qlora::model::CachedDecoder decoder(*model, prompt_tokens + new_tokens);
    qlora::model::TokenSampler greedy(qlora::model::SamplingOptions{0.0, 1.0, 0});
    std::vector<double> prefill_rates, decode_rates;
    for (int run = 0; run < 3; ++run) {
      decoder.reset();
      MPI_Barrier(MPI_COMM_WORLD);
      auto start = std::chrono::steady_clock::now();
      auto logits = decoder.append(prompt);
      const double prefill = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      start = std::chrono::steady_clock::now();
      for (int64_t step = 0; step < new_tokens; ++step) logits = decoder.append({greedy.next(logits)});
      const double decode = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      prefill_rates.push_back(static_cast<double>(prompt_tokens) / prefill);
      decode_rates.push_back(static_cast<double>(new_tokens) / decode);
    }
    double load[1] = {0};
    getloadavg(load, 1);
    if (mpi.rank == 0) {
      std::printf("%-5s %d rank(s) x %d thread(s): prefill %.1f tokens/s, decode %.2f tokens/s (load average %.1f)\n",
                  name.c_str(), mpi.world, threads, median(prefill_rates), median(decode_rates), load[0]);
      out[name] = {{"prefill_tokens_per_s", median(prefill_rates)},
                   {"decode_tokens_per_s", median(decode_rates)},
                   {"load_average_1min", load[0]}};
    }
  }
  if (mpi.rank == 0) {
    const std::string path = std::string(QLORA_RESULTS_DIR) + "/generate-np" + std::to_string(mpi.world) + ".json";
    std::ofstream(path) << qlora::dump_json(out, 2) << "\n";
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}
