// Aborts the job, with a message naming the cause, when a rank is lost or a collective wait never
// finishes, so that no rank hangs in a collective after a failure elsewhere.
//
// Why a side channel: with Debian's OpenMPI 4.1.4 (no ULFM; MPI_ERRORS_RETURN set) MPI_Test and
// MPI_Wait never return an error after a peer is SIGKILLed, and under `srun --mpi=pmix` nothing tells
// the survivors either (no PMIx event reaches them; SLURM ends the step only when the dead rank
// shared its node with another rank, or with --kill-on-bad-exit). mpirun ends the job itself. So
// every pair of ranks keeps a TCP connection of its own, serviced by a thread: the kernel closes a
// dead process's sockets, so a killed or crashed peer shows as end-of-file within milliseconds, and
// a once-a-second heartbeat byte covers a peer whose node or network went away. A rank that finishes
// normally says goodbye first, so its exit is not mistaken for a loss. Costs: one thread waking four
// times a second and world - 1 sockets per rank (IPv4; mind RLIMIT_NOFILE beyond ~1000 ranks).
#pragma once

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace qlora::cluster {

// Default for `qlora train --collective-timeout`. Legitimate waits in one collective are bounded by
// how far ranks drift apart: model loading from shared storage (each rank reads its own slices, at
// the file system's pace), rank 0 writing a checkpoint while the others wait at the next collective,
// and first-step allocation. Those take seconds to a few minutes even for 70B models; ten minutes is
// well above them, yet ends a truly stuck job long before it burns a multi-hour allocation.
constexpr double kDefaultCollectiveTimeoutSeconds = 600.0;

struct FaultWatchdogSettings {
  double heartbeat_interval_seconds = 1.0;
  // A connected peer not heard from for this long is lost. Only a frozen process or a dead node or
  // network gets here (a dead process is seen at once). Environment: QLORA_HEARTBEAT_TIMEOUT.
  double heartbeat_timeout_seconds = 30.0;
  double collective_timeout_seconds = kDefaultCollectiveTimeoutSeconds;  // 0: no bound
  // Between the message about a lost peer and the abort: lets mpirun (or srun --kill-on-bad-exit)
  // report the original failure and end the job its own way first.
  double exit_grace_seconds = 2.0;
  double setup_timeout_seconds = 15.0;  // connecting to every peer at construction

  static FaultWatchdogSettings from_environment();
};

// One per communicator of more than one rank. Construction is collective over `comm`.
class FaultWatchdog {
 public:
  static constexpr int kExitLostRank = 3;

  FaultWatchdog(MPI_Comm comm, FaultWatchdogSettings settings);
  // Says goodbye to every peer: this rank's exit from here on is not a failure. Waits at most 2 s for
  // the peers to close their ends (milliseconds when they are alive).
  ~FaultWatchdog();
  FaultWatchdog(const FaultWatchdog&) = delete;
  FaultWatchdog& operator=(const FaultWatchdog&) = delete;

  void set_collective_timeout(double seconds) { collective_timeout_seconds_.store(seconds); }
  double collective_timeout() const { return collective_timeout_seconds_.load(); }
  // Peers with a live watchdog connection (the others are covered by the collective timeout only).
  int connected_peers() const { return connected_peers_.load(); }

  // Brackets a blocking wait of the calling thread (one at a time): past the collective timeout the
  // watchdog aborts the job naming `call` (a string literal).
  void begin_wait(const char* call);
  void end_wait();

 private:
  enum class Link { accepting, connecting, awaiting_reply, connected, finished, unreachable };
  struct Peer {
    int rank = -1;
    std::string host;
    uint32_t pid = 0;
    Link link = Link::accepting;
    int fd = -1;
    std::vector<uint32_t> candidates;  // IPv4 addresses to try, network byte order
    uint16_t port = 0;
    size_t next_candidate = 0;
    std::chrono::steady_clock::time_point attempt_started;
    std::chrono::steady_clock::time_point last_heard;
    uint8_t hello[16] = {0};
    size_t hello_bytes = 0;
  };
  struct Unidentified {  // accepted, hello not read yet
    int fd = -1;
    uint8_t hello[16] = {0};
    size_t hello_bytes = 0;
    std::chrono::steady_clock::time_point accepted;
  };

  void exchange_endpoints();
  void run();
  void service(int poll_milliseconds);
  void accept_connections(std::chrono::steady_clock::time_point now);
  void read_unidentified(Unidentified& pending, std::chrono::steady_clock::time_point now);
  void finish_connect(Peer& peer, std::chrono::steady_clock::time_point now);
  void read_reply(Peer& peer, std::chrono::steady_clock::time_point now);
  void read_link(Peer& peer, std::chrono::steady_clock::time_point now);
  void try_next_candidate(Peer& peer, std::chrono::steady_clock::time_point now);
  void close_link(Peer& peer, Link state);
  bool setup_complete() const;
  void count_connected();
  [[noreturn]] void lose(const Peer& peer, const std::string& reason);
  [[noreturn]] void end_job(const std::string& message, double grace_seconds);
  void check_wait(std::chrono::steady_clock::time_point now);

  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  FaultWatchdogSettings settings_;
  uint64_t token_ = 0;  // shared by the ranks of this watchdog: a connection from anything else is refused
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::vector<Peer> peers_;
  std::vector<Unidentified> unidentified_;
  std::chrono::steady_clock::time_point last_heartbeat_;
  std::chrono::steady_clock::time_point last_service_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> ending_{false};
  std::atomic<int> connected_peers_{0};
  std::atomic<double> collective_timeout_seconds_;
  std::atomic<int64_t> wait_started_nanoseconds_{0};  // steady clock; 0 when not waiting
  std::atomic<const char*> wait_call_{nullptr};
};

// RAII form of begin_wait/end_wait; a null watchdog makes it a no-op.
class CollectiveWait {
 public:
  CollectiveWait(FaultWatchdog* watchdog, const char* call) : watchdog_(watchdog) {
    if (watchdog_ != nullptr) watchdog_->begin_wait(call);
  }
  ~CollectiveWait() {
    if (watchdog_ != nullptr) watchdog_->end_wait();
  }
  CollectiveWait(const CollectiveWait&) = delete;
  CollectiveWait& operator=(const CollectiveWait&) = delete;

 private:
  FaultWatchdog* watchdog_;
};

}  // namespace qlora::cluster
