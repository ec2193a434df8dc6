// MPI start-up shared by the benchmarks that run as one process or under mpirun: initialises MPI
// for threaded collectives, knows this rank and the world, tags log lines, finalises on scope exit.
#pragma once

#include <mpi.h>

#include "common/log.h"

namespace qlora::bench {

struct MpiSession {
  MpiSession(int* argc, char*** argv) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    log::set_rank(rank, world);
  }
  ~MpiSession() { MPI_Finalize(); }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank = 0;
  int world = 1;
};

}  // namespace qlora::bench
