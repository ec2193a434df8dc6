// A job whose ranks fail the way qlora's main() handles an error, for the failure-notice tests in
// test_fault_watchdog_scale.cpp: the failing ranks print their error, report it through the
// communicator and exit with its code; the others wait in a barrier that only the failures end.
//
//   watchdog_failing_rank FAILING EXIT_CODE DELAY STAGGER
// FAILING: the rank that fails, or -1 for every rank (an error every rank sees). A failing rank r
// fails DELAY + r * STAGGER seconds after the communicator is made.
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "cluster/mpi_communicator.h"
#include "common/log.h"

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s FAILING EXIT_CODE DELAY STAGGER\n", argv[0]);
    MPI_Finalize();
    return 64;
  }
  const int failing = std::atoi(argv[1]);
  const int failure_code = std::atoi(argv[2]);
  const double delay = std::atof(argv[3]);
  const double stagger = std::atof(argv[4]);
  int exit_code = 0;
  {
    auto communicator = qlora::cluster::make_mpi_communicator(MPI_COMM_WORLD);
    const int rank = communicator->rank();
    qlora::log::set_rank(rank, communicator->size());
    if (failing == rank || failing == -1) {
      std::this_thread::sleep_for(std::chrono::duration<double>(delay + rank * stagger));
      const std::string message = "cannot write checkpoint step-7 on rank " + std::to_string(rank) + ": disk full";
      const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
      std::printf("failure reported at %.3f\n", now);
      std::fflush(stdout);
      qlora::log::error(message);
      communicator->report_failure(message, failure_code);
      exit_code = failure_code;
    } else {
      communicator->barrier();
    }
  }
  MPI_Finalize();
  return exit_code;
}
