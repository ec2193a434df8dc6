// Exposed communication of a training step: the share of step time a rank spends blocked on
// collectives (waiting for 4-bit block gathers and for gradient reductions), with and without
// prefetching and overlapped bucketed reduction. Run under mpirun with 2 or 4 ranks; writes
// bench/results/exposed-communication-np<N>.json. Model: synthetic "small" (8 layers, hidden 512).
#include <mpi.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "bench/bench_mpi.h"
#include "cluster/mpi_communicator.h"
#include "common/json.h"
#include "launcher/threads.h"
#include "launcher/train.h"
#include "shard/converter.h"

int main(int argc, char** argv) {
  qlora::bench::MpiSession mpi(&argc, &argv);
  const int rank = mpi.rank;
  const int world = mpi.world;
  const int64_t steps = argc > 1 ? std::atoll(argv[1]) : 12;
  const std::string model_path = "/tmp/qlora-bench-small.h5";
  if (rank == 0) {
    qlora::shard::ConvertOptions options;
    qlora::shard::convert_synthetic("small", model_path, options);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  auto communicator = qlora::cluster::make_mpi_communicator(MPI_COMM_WORLD);
  auto layout = qlora::cluster::discover_rank_layout(MPI_COMM_WORLD);
  const int threads = qlora::launcher::assign_threads(layout, 0);

  struct Variant {
    const char* name;
    bool prefetch;
    bool overlap;
    double bucket_mb;
  };
  const Variant variants[] = {{"no prefetch, one reduction after backward", false, false, 1024},
                              {"prefetch, one reduction after backward", true, false, 1024},
                              {"no prefetch, overlapped 1 MiB buckets", false, true, 1},
                              {"prefetch, overlapped 1 MiB buckets", true, true, 1}};
  if (rank == 0)
    std::printf("# %d ranks, %lld steps of 8 x 128 tokens, synthetic small (8 blocks, hidden 512)\n# %-44s %9s %9s %9s %9s\n",
                world, static_cast<long long>(steps), "variant", "step s", "gather s", "reduce s", "exposed");
  qlora::Json rows = qlora::Json::array();
  for (const auto& variant : variants) {
    qlora::launcher::TrainOptions options;
    options.model_path = model_path;
    options.steps = steps;
    options.global_batch = 8;
    options.sequence_length = 128;
    options.write_outputs = false;
    options.quiet = true;
    options.threads = threads;
    options.prefetch = variant.prefetch;
    options.overlap_reduce = variant.overlap;
    options.bucket_mb = variant.bucket_mb;
    const auto result = qlora::launcher::run_training(options, *communicator);
    // The slowest rank decides the step; report the largest blocked time over ranks.
    double step_seconds = static_cast<double>(steps) * 8 * 128 / result.tokens_per_second / steps;
    double gather = result.gather.wait_seconds / steps;
    double reduce = result.reduce_wait_seconds / steps;
    MPI_Allreduce(MPI_IN_PLACE, &gather, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &reduce, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &step_seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    const double exposed = (gather + reduce) / step_seconds;
    if (rank == 0) {
      std::printf("  %-44s %9.4f %9.4f %9.4f %8.1f%%\n", variant.name, step_seconds, gather, reduce, 100 * exposed);
      qlora::Json row;
      row["variant"] = variant.name;
      row["prefetch"] = variant.prefetch;
      row["overlap_reduce"] = variant.overlap;
      row["bucket_mb"] = variant.bucket_mb;
      row["step_seconds"] = step_seconds;
      row["gather_wait_seconds_per_step"] = gather;
      row["reduce_wait_seconds_per_step"] = reduce;
      row["exposed_share"] = exposed;
      rows.push_back(row);
    }
  }
  if (rank == 0) {
    qlora::Json result;
    result["benchmark"] = "exposed_communication";
    result["ranks"] = world;
    result["steps"] = steps;
    result["rows"] = rows;
    const std::string path = std::string(QLORA_RESULTS_DIR) + "/exposed-communication-np" + std::to_string(world) + ".json";
    std::ofstream(path) << qlora::dump_json(result, 2) << "\n";
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}
