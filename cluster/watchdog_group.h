// What the fault watchdog needs from the job around it: its place in the world, three small setup
// exchanges, and a way to end every rank. MPI provides it in production; tests provide a world of
// hundreds of forked processes, which mpirun on two cores could not start.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace qlora::cluster {

class WatchdogGroup {
 public:
  virtual ~WatchdogGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Collective: every rank's `bytes` bytes at `data` become rank 0's.
  virtual void broadcast_from_root(void* data, size_t bytes) = 0;
  // Collective: whether every rank passed the same value.
  virtual bool all_equal(uint64_t value) = 0;
  // Sends `bytes` bytes at `mine` to each of `peers` and receives theirs into `theirs` (peers.size()
  // records of `bytes`, in the order of `peers`). Every peer makes the same call naming this rank.
  virtual void exchange_with(const std::vector<int>& peers, const void* mine, size_t bytes, void* theirs) = 0;
  // Ends every rank of the job with `exit_code`, this one included (the reason is already logged).
  [[noreturn]] virtual void end_job(int exit_code) = 0;
};

// Over `comm` (not owned; it must outlive the group). end_job is MPI_Abort, which also ends ranks
// that cannot end themselves (a frozen one, one without a watchdog link) under mpirun and srun.
std::unique_ptr<WatchdogGroup> make_mpi_watchdog_group(MPI_Comm comm);

}  // namespace qlora::cluster
