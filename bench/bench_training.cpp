// Training throughput and MFU for the SmolLM2-135M shape (30 layers, hidden 576, vocab 49152, tied;
// random weights, NF4), micro-batch 4 x 256 tokens per rank, LoRA r=16 on all projections, with and
// without gradient checkpointing. MFU counts the useful FLOPs of a LoRA step on a frozen base
// (4 x linear parameters x tokens, plus attention), against this machine's fp32 GEMM peak measured
// in the same run. Run as one process or under mpirun; writes bench/results/training-np<N>.json.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>

#include "bench/bench_mpi.h"
#include "cluster/memory.h"
#include "cluster/mpi_communicator.h"
#include "common/json.h"
#include "launcher/threads.h"
#include "launcher/train.h"
#include "shard/converter.h"

namespace {

double measure_gemm_peak_gflops() {
  auto a = torch::randn({2048, 2048});
  auto b = torch::randn({2048, 2048});
  torch::matmul(a, b);
  const int repetitions = 8;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < repetitions; ++i) torch::matmul(a, b);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 2.0 * 2048.0 * 2048.0 * 2048.0 * repetitions / seconds / 1e9;
}

// Linux keeps a resettable high-water mark of resident memory: writing 5 to clear_refs resets it, so
// each configuration reports its own peak (loading plus training), not the earlier one's.
void reset_peak_resident_memory() {
  std::ofstream("/proc/self/clear_refs") << "5";
}

double peak_resident_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) * 1024.0;  // reported in kB
  return 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  qlora::bench::MpiSession mpi(&argc, &argv);
  const int rank = mpi.rank;
  const int world = mpi.world;
  const int64_t steps = std::max<int64_t>(2, argc > 1 ? std::atoll(argv[1]) : 4);
  const std::string model_path = "/tmp/qlora-bench-smollm2-shape.h5";
  if (rank == 0) {
    qlora::shard::ConvertOptions options;
    qlora::shard::convert_synthetic("smollm2-135m", model_path, options);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  auto communicator = qlora::cluster::make_mpi_communicator(MPI_COMM_WORLD);
  auto layout = qlora::cluster::discover_rank_layout(MPI_COMM_WORLD);
  const int threads = qlora::launcher::assign_threads(layout, 0);
  // The GEMM peak available to this rank, with every rank measuring at once like they train.
  MPI_Barrier(MPI_COMM_WORLD);
  double peak_gflops = measure_gemm_peak_gflops();
  MPI_Allreduce(MPI_IN_PLACE, &peak_gflops, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

  const auto config = qlora::shard::synthetic_config("smollm2-135m");
  double linear_parameters = 0;
  for (const auto& name : config.tensor_names())
    if (qlora::shard::ModelConfig::is_block_linear(name)) {
      const auto shape = config.expected_shape(name);
      linear_parameters += static_cast<double>(shape[0] * shape[1]);
    }
  linear_parameters += static_cast<double>(config.vocab_size * config.hidden_size);  // the LM head product
  const int64_t sequence = 256;
  // Attention per token: QK^T and PV, forward (2 x 2 x T x d_model) and backward (twice that), causal half.
  const double attention_flops_per_token =
      3.0 * 2.0 * 2.0 * sequence * config.num_attention_heads * config.head_dim * config.num_hidden_layers / 2.0;
  const double useful_flops_per_token = 4.0 * linear_parameters + attention_flops_per_token;

  qlora::Json rows = qlora::Json::array();
  if (rank == 0)
    std::printf("# SmolLM2-135M shape, %d rank(s) x %d thread(s), 4 x %lld tokens per rank per step, LoRA r=16; "
                "fp32 GEMM peak over all ranks %.1f GFLOP/s\n",
                world, threads, static_cast<long long>(sequence), peak_gflops);
  for (const bool checkpointing : {true, false}) {
    qlora::launcher::TrainOptions options;
    options.model_path = model_path;
    options.steps = steps;
    options.global_batch = 4 * world;
    options.sequence_length = sequence;
    options.lora.r = 16;
    options.lora.alpha = 32;
    options.learning_rate = 1e-4;
    options.eval_fraction = 0;
    options.write_outputs = false;
    options.quiet = true;
    options.threads = threads;
    options.prepare.use_gradient_checkpointing = checkpointing;
    // The previous configuration's cached blocks go back to the system before its peak is reset.
    qlora::cluster::MemoryCounter::release_cache();
    reset_peak_resident_memory();
    const auto result = qlora::launcher::run_training(options, *communicator);
    const double rank_peak_rss = peak_resident_bytes();
    double peak_rss = rank_peak_rss;
    double peak_rss_all_ranks = rank_peak_rss;
    MPI_Allreduce(MPI_IN_PLACE, &peak_rss, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &peak_rss_all_ranks, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    // Like the Python peer: the first step warms up (page faults, caches) and is not timed.
    double timed_seconds = 0;
    for (size_t step = 1; step < result.step_seconds.size(); ++step) timed_seconds += result.step_seconds[step];
    const double tokens_per_second =
        static_cast<double>(4 * sequence * world) * static_cast<double>(result.step_seconds.size() - 1) / timed_seconds;
    const double mfu = tokens_per_second * useful_flops_per_token / (peak_gflops * 1e9);
    if (rank == 0) {
      std::printf("  checkpointing %-3s  %8.1f tokens/s  MFU %.3f  peak tensor bytes %.2f GiB  peak RSS %.2f GiB/rank, %.2f GiB all ranks\n",
                  checkpointing ? "on" : "off", tokens_per_second, mfu,
                  static_cast<double>(result.memory.peak_total) / (1 << 30), peak_rss / (1 << 30),
                  peak_rss_all_ranks / (1 << 30));
      qlora::Json row;
      row["gradient_checkpointing"] = checkpointing;
      row["tokens_per_second"] = tokens_per_second;
      row["step_seconds"] = result.step_seconds;
      row["mfu"] = mfu;
      row["peak_tensor_bytes_rank0"] = result.memory.peak_total;
      row["peak_rss_bytes_max_rank"] = peak_rss;
      row["peak_rss_bytes_all_ranks"] = peak_rss_all_ranks;
      row["losses"] = result.losses;
      rows.push_back(row);
    }
  }
  if (rank == 0) {
    qlora::Json out;
    out["benchmark"] = "training_smollm2_shape";
    out["ranks"] = world;
    out["threads_per_rank"] = threads;
    out["steps"] = steps;
    out["tokens_per_step_per_rank"] = 4 * sequence;
    out["gemm_peak_gflops_all_ranks"] = peak_gflops;
    out["useful_flops_per_token"] = useful_flops_per_token;
    out["rows"] = rows;
    out["note"] = "peak RSS is each configuration's own (VmHWM reset before it): loading plus training; "
                  "the first step is not timed";
    const std::string path = std::string(QLORA_RESULTS_DIR) + "/training-np" + std::to_string(world) + ".json";
    std::ofstream(path) << qlora::dump_json(out, 2) << "\n";
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}
