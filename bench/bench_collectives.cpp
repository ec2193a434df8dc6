// nccl-tests-style sweep of the Communicator's all-reduce (sum, and average as training uses it) and
// all-gather against raw MPI calls of the same sizes in the same run (MPI_Allreduce sum,
// MPI_Allgather): time, algbw, busbw, wrong elements, and the busbw ratio qlora / raw.
// Run under mpirun: `mpirun -np 2 build/bench/bench_collectives`. Writes
// bench/results/collectives-np<N>.json.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_mpi.h"
#include "cluster/mpi_communicator.h"
#include "common/json.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Measurement {
  double seconds = 0;   // per call, max over ranks
  int64_t wrong = 0;    // elements that differ from the expected result, summed over ranks
};

// Times `call` (after two warm-up calls) for about a quarter second; collective over all ranks.
Measurement time_collective(const std::function<void()>& call, const std::function<int64_t()>& count_wrong) {
  call();
  call();
  int64_t wrong = count_wrong();
  MPI_Barrier(MPI_COMM_WORLD);
  auto start = Clock::now();
  call();
  double one = std::chrono::duration<double>(Clock::now() - start).count();
  MPI_Allreduce(MPI_IN_PLACE, &one, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const int iterations = std::max(3, std::min(2000, static_cast<int>(0.25 / std::max(one, 1e-7))));
  MPI_Barrier(MPI_COMM_WORLD);
  start = Clock::now();
  for (int i = 0; i < iterations; ++i) call();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count() / iterations;
  MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &wrong, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  return {seconds, wrong};
}

}  // namespace

int main(int argc, char** argv) {
  qlora::bench::MpiSession mpi(&argc, &argv);
  const int rank = mpi.rank;
  const int world = mpi.world;
  auto communicator = qlora::cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const int64_t largest = argc > 1 ? std::atoll(argv[1]) : (int64_t{64} << 20);

  if (rank == 0) {
    std::printf("# %d ranks; sizes are bytes per rank (all-reduce buffer) or per rank contribution (all-gather)\n", world);
    std::printf("# %-18s %-9s %12s | %10s %9s %9s %6s | %10s %9s %9s %6s | %6s\n", "op", "size", "elements",
                "qlora us", "algbw", "busbw", "wrong", "raw us", "algbw", "busbw", "wrong", "ratio");
  }
  qlora::Json rows = qlora::Json::array();
  for (const std::string op : {"all_reduce_sum", "all_reduce_average", "all_gather"}) {
    for (int64_t bytes = 1024; bytes <= largest; bytes *= 4) {
      Measurement ours;
      Measurement raw;
      double bus_factor = 1.0;
      double algorithm_bytes = static_cast<double>(bytes);
      if (op != "all_gather") {
        const auto reduce_op = op == "all_reduce_sum" ? qlora::cluster::ReduceOp::sum : qlora::cluster::ReduceOp::average;
        const int64_t count = bytes / 4;
        std::vector<float> buffer(count);
        auto fill = [&] {
          for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>((rank + 1) * (i % 7));
        };
        // Average of (r+1)*(i%7) over ranks r = (i%7)*(world+1)/2, exact in fp32 for these sizes.
        auto wrong_average = [&] {
          int64_t wrong = 0;
          for (int64_t i = 0; i < count; ++i)
            if (std::fabs(buffer[i] - static_cast<float>(i % 7) * (world + 1) / 2.0f) > 1e-5f) ++wrong;
          return wrong;
        };
        auto wrong_sum = [&] {
          int64_t wrong = 0;
          for (int64_t i = 0; i < count; ++i)
            if (buffer[i] != static_cast<float>((i % 7) * world * (world + 1) / 2)) ++wrong;
          return wrong;
        };
        ours = time_collective([&] { fill(); communicator->all_reduce(buffer.data(), count, reduce_op); },
                               [&] {
                                 fill();
                                 communicator->all_reduce(buffer.data(), count, reduce_op);
                                 return reduce_op == qlora::cluster::ReduceOp::sum ? wrong_sum() : wrong_average();
                               });
        raw = time_collective([&] { fill(); MPI_Allreduce(MPI_IN_PLACE, buffer.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); },
                              [&] { fill(); MPI_Allreduce(MPI_IN_PLACE, buffer.data(), static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); return wrong_sum(); });
        bus_factor = 2.0 * (world - 1) / world;
      } else {
        std::vector<uint8_t> send(bytes);
        std::vector<uint8_t> receive(bytes * world);
        for (int64_t i = 0; i < bytes; ++i) send[i] = static_cast<uint8_t>(rank * 31 + i);
        std::vector<int64_t> counts(world, bytes);
        auto wrong = [&] {
          int64_t mismatches = 0;
          for (int r = 0; r < world; ++r)
            for (int64_t i = 0; i < bytes; ++i)
              if (receive[r * bytes + i] != static_cast<uint8_t>(r * 31 + i)) ++mismatches;
          std::fill(receive.begin(), receive.end(), 0);
          return mismatches;
        };
        ours = time_collective([&] { communicator->all_gather(send.data(), receive.data(), counts); },
                               [&] { communicator->all_gather(send.data(), receive.data(), counts); return wrong(); });
        raw = time_collective([&] { MPI_Allgather(send.data(), static_cast<int>(bytes), MPI_BYTE, receive.data(), static_cast<int>(bytes), MPI_BYTE, MPI_COMM_WORLD); },
                              [&] { MPI_Allgather(send.data(), static_cast<int>(bytes), MPI_BYTE, receive.data(), static_cast<int>(bytes), MPI_BYTE, MPI_COMM_WORLD); return wrong(); });
        algorithm_bytes = static_cast<double>(bytes) * world;
        bus_factor = static_cast<double>(world - 1) / world;
      }
      const double ours_algbw = algorithm_bytes / ours.seconds / 1e9;
      const double raw_algbw = algorithm_bytes / raw.seconds / 1e9;
      const double ratio = raw.seconds / ours.seconds;
      if (rank == 0) {
        std::printf("  %-18s %-9lld %12lld | %10.1f %9.3f %9.3f %6lld | %10.1f %9.3f %9.3f %6lld | %6.3f\n", op.c_str(),
                    static_cast<long long>(bytes), static_cast<long long>(op == "all_gather" ? bytes : bytes / 4),
                    ours.seconds * 1e6, ours_algbw, ours_algbw * bus_factor, static_cast<long long>(ours.wrong),
                    raw.seconds * 1e6, raw_algbw, raw_algbw * bus_factor, static_cast<long long>(raw.wrong), ratio);
        qlora::Json row;
        row["op"] = op;
        row["bytes"] = bytes;
        row["qlora_seconds"] = ours.seconds;
        row["qlora_algbw_gbps"] = ours_algbw;
        row["qlora_busbw_gbps"] = ours_algbw * bus_factor;
        row["qlora_wrong"] = ours.wrong;
        row["raw_mpi_seconds"] = raw.seconds;
        row["raw_mpi_algbw_gbps"] = raw_algbw;
        row["raw_mpi_busbw_gbps"] = raw_algbw * bus_factor;
        row["raw_mpi_wrong"] = raw.wrong;
        row["busbw_ratio_qlora_over_raw"] = ratio;
        rows.push_back(row);
      }
    }
  }
  if (rank == 0) {
    qlora::Json result;
    result["benchmark"] = "collectives";
    result["ranks"] = world;
    result["machine"] = "2-core Debian 12 VM, shared-memory transport";
    result["rows"] = rows;
    const std::string path = std::string(QLORA_RESULTS_DIR) + "/collectives-np" + std::to_string(world) + ".json";
    std::ofstream(path) << qlora::dump_json(result, 2) << "\n";
    std::printf("wrote %s\n", path.c_str());
  }
  return 0;
}
