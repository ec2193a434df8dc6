// The MPI form of the watchdog's group: a broadcast, an all-reduce and neighbour sends at setup, and
// MPI_Abort at the end.
#include "cluster/watchdog_group.h"

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "common/log.h"

namespace qlora::cluster {
namespace {

// Point-to-point messages of the setup exchange; the communicator carries no other point-to-point
// traffic (collectives use their own context), so one tag cannot be confused with anything.
constexpr int kExchangeTag = 0x5157;

void check_setup(int result, const char* call, MPI_Comm comm) {
  if (result == MPI_SUCCESS) return;
  char reason[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  MPI_Error_string(result, reason, &length);
  log::error(std::string("fault watchdog setup: ") + call + " failed: " + reason + "; aborting every rank");
  MPI_Abort(comm, 3);
  std::abort();
}

class MpiWatchdogGroup final : public WatchdogGroup {
 public:
  explicit MpiWatchdogGroup(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void broadcast_from_root(void* data, size_t bytes) override {
    check_setup(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, 0, comm_), "MPI_Bcast", comm_);
  }

  bool all_equal(uint64_t value) override {
    // min(value) == max(value), with max(value) = ~min(~value): one all-reduce.
    uint64_t mine[2] = {value, ~value};
    uint64_t least[2] = {0, 0};
    check_setup(MPI_Allreduce(mine, least, 2, MPI_UINT64_T, MPI_MIN, comm_), "MPI_Allreduce", comm_);
    return least[0] == ~least[1];
  }

  void exchange_with(const std::vector<int>& peers, const void* mine, size_t bytes, void* theirs) override {
    std::vector<MPI_Request> requests(2 * peers.size(), MPI_REQUEST_NULL);
    auto* received = static_cast<char*>(theirs);
    for (size_t i = 0; i < peers.size(); ++i) {
      check_setup(MPI_Irecv(received + i * bytes, static_cast<int>(bytes), MPI_BYTE, peers[i], kExchangeTag, comm_,
                            &requests[2 * i]),
                  "MPI_Irecv", comm_);
      check_setup(MPI_Isend(mine, static_cast<int>(bytes), MPI_BYTE, peers[i], kExchangeTag, comm_,
                            &requests[2 * i + 1]),
                  "MPI_Isend", comm_);
    }
    check_setup(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE), "MPI_Waitall",
                comm_);
  }

  [[noreturn]] void end_job(int exit_code) override {
    // Should MPI_Abort ever stall, the exit still comes; no destructors, no MPI_Finalize (which would
    // wait for the ranks that are gone).
    std::thread([exit_code] {
      std::this_thread::sleep_for(std::chrono::seconds(10));
      std::_Exit(exit_code);
    }).detach();
    MPI_Abort(comm_, exit_code);
    std::_Exit(exit_code);
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

std::unique_ptr<WatchdogGroup> make_mpi_watchdog_group(MPI_Comm comm) { return std::make_unique<MpiWatchdogGroup>(comm); }

}  // namespace qlora::cluster
