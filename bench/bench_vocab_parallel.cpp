// The embedding lookup and LM-head loss (forward, which forms the input gradient, plus backward) of
// the SmolLM2-135M shape (vocab 49152, hidden 576, tied), 4 x 256 tokens per rank: every rank holding
// the whole table (the pre-vocabulary-parallel layout, timed here with the same kernels on one rank's
// view) against the vocabulary-parallel form with 1/N of the rows. Run under mpirun; writes
// bench/results/vocab-parallel-np<N>.json with the median of the repetitions.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <vector>

#include "bench/bench_mpi.h"
#include "cluster/mpi_communicator.h"
#include "cluster/rank_layout.h"
#include "common/json.h"
#include "launcher/threads.h"
#include "model/chunked_loss.h"
#include "shard/shard_plan.h"

namespace {

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  qlora::bench::MpiSession mpi(&argc, &argv);
  const int rank = mpi.rank;
  const int world = mpi.world;
  const int repetitions = argc > 1 ? std::atoi(argv[1]) : 7;
  auto communicator = qlora::cluster::make_mpi_communicator(MPI_COMM_WORLD);
  auto self = qlora::cluster::make_mpi_communicator(MPI_COMM_SELF);
  auto layout = qlora::cluster::discover_rank_layout(MPI_COMM_WORLD);
  const int threads = qlora::launcher::assign_threads(layout, 0);

  constexpr int64_t vocab = 49152;
  constexpr int64_t hidden_size = 576;
  constexpr int64_t tokens = 4 * 256;
  torch::manual_seed(5);
  const auto table = torch::randn({vocab, hidden_size}) * 0.02;
  const auto range = qlora::shard::vocab_range(vocab, rank, world);
  const auto slice = table.narrow(0, range.begin, range.rows()).clone();
  torch::manual_seed(100 + rank);
  const auto token_ids = torch::randint(0, vocab, {4, 256}, torch::kLong);
  const auto targets = torch::randint(0, vocab, {tokens}, torch::kLong);
  const auto hidden_values = torch::randn({tokens, hidden_size});

  // One measurement: the lookup, then the loss and its backward, as a training step runs them.
  auto run = [&](const torch::Tensor& weight, const qlora::shard::VocabRange& rows, qlora::cluster::Communicator& on) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto start = std::chrono::steady_clock::now();
    const auto embedded = qlora::model::vocab_parallel_embedding(weight, rows, token_ids, on);
    auto hidden = (hidden_values + embedded.reshape({tokens, hidden_size}) * 0).requires_grad_(true);
    auto loss = qlora::model::vocab_parallel_cross_entropy(hidden, weight, rows.begin, vocab, targets, on);
    loss.backward();
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return seconds;
  };
  std::vector<double> replicated, parallel;
  const qlora::shard::VocabRange whole{0, vocab};
  run(table, whole, *self);
  run(slice, range, *communicator);
  for (int i = 0; i < repetitions; ++i) {
    replicated.push_back(run(table, whole, *self));
    parallel.push_back(run(slice, range, *communicator));
  }
  const double replicated_seconds = median(replicated);
  const double parallel_seconds = median(parallel);
  if (rank == 0) {
    std::printf("# embedding + LM-head loss, vocab %lld x hidden %lld, %lld tokens per rank, %d rank(s) x %d thread(s)\n",
                static_cast<long long>(vocab), static_cast<long long>(hidden_size), static_cast<long long>(tokens), world,
                threads);
    std::printf("  whole table per rank      %8.1f ms  (%.1f MiB fp32 table)\n", replicated_seconds * 1e3,
                static_cast<double>(vocab * hidden_size * 4) / 1048576.0);
    std::printf("  vocabulary-parallel       %8.1f ms  (%.1f MiB fp32 slice on rank 0)\n", parallel_seconds * 1e3,
                static_cast<double>(range.rows() * hidden_size * 4) / 1048576.0);
    qlora::Json out;
    out["benchmark"] = "vocab_parallel_embedding_and_loss";
    out["ranks"] = world;
    out["threads_per_rank"] = threads;
    out["vocab"] = vocab;
    out["hidden"] = hidden_size;
    out["tokens_per_rank"] = tokens;
    out["repetitions"] = repetitions;
    out["whole_table_seconds_median"] = replicated_seconds;
    out["vocab_parallel_seconds_median"] = parallel_seconds;
    out["whole_table_bytes"] = vocab * hidden_size * 4;
    out["slice_bytes_rank0"] = range.rows() * hidden_size * 4;
    const std::string path = std::string(QLORA_RESULTS_DIR) + "/vocab-parallel-np" + std::to_string(world) + ".json";
    std::ofstream(path) << qlora::dump_json(out, 2) << "\n";
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}
