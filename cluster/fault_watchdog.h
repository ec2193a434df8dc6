// Aborts the job, with a message naming the cause, when a rank is lost, a rank fails on its own, or
// a collective wait never finishes, so that no rank hangs in a collective after a failure elsewhere.
//
// Why a side channel: with Debian's OpenMPI 4.1.4 (no ULFM; MPI_ERRORS_RETURN set) MPI_Test and
// MPI_Wait never return an error after a peer is SIGKILLed, and under `srun --mpi=pmix` nothing tells
// the survivors either (no PMIx event reaches them; SLURM ends the step only when the dead rank
// shared its node with another rank, or with --kill-on-bad-exit). mpirun ends the job itself. So the
// ranks keep TCP connections of their own, serviced by a thread: the kernel closes a dead process's
// sockets, so a killed or crashed neighbour shows as end-of-file within milliseconds, and a
// once-a-second heartbeat byte covers a neighbour whose node or network went away.
//
// Which connections: a binary tree over the ranks (rank r links to its parent (r - 1) / 2 and its
// children 2r + 1 and 2r + 2): at most 3 sockets per rank whatever the world size, and any rank
// reaches any other in at most 2 log2(N) hops. A dead rank is seen by its neighbours, which pass a
// notice on; every notice is forwarded along every other link at once, so every rank learns of it
// (and prints the lost rank's identity) within milliseconds. Removing ranks splits the tree, but
// every piece holds a neighbour of a removed rank, so every piece hears. A ring (2 sockets) would
// need N / 2 hops, and a star through rank 0 would give rank 0 N - 1 sockets and all the traffic:
// exactly the descriptor limit this layout exists to avoid (before it, world - 1 sockets per rank).
//
// How ranks end: a rank that finishes normally says goodbye, so its exit is not mistaken for a loss.
// A rank that ends with an error reports it (report_failure): its notice reaches every rank, and a
// rank that has not begun ending itself within failure_grace_seconds prints it and aborts the job
// with the failing rank's exit code. Ranks that fail together (a user error every rank sees) all end
// within that grace and exit on their own, printing nothing more.
#pragma once

#include <mpi.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cluster/watchdog_group.h"
#include "cluster/watchdog_wire.h"

namespace qlora::cluster {

// Default for `qlora train --collective-timeout`. Legitimate waits in one collective are bounded by
// how far ranks drift apart: model loading from shared storage (each rank reads its own slices, at
// the file system's pace), rank 0 writing a checkpoint while the others wait at the next collective,
// and first-step allocation. Those take seconds to a few minutes even for 70B models; ten minutes is
// well above them, yet ends a truly stuck job long before it burns a multi-hour allocation.
constexpr double kDefaultCollectiveTimeoutSeconds = 600.0;

struct FaultWatchdogSettings {
  double heartbeat_interval_seconds = 1.0;
  // A connected neighbour not heard from for this long is lost. Only a frozen process or a dead node
  // or network gets here (a dead process is seen at once). Environment: QLORA_HEARTBEAT_TIMEOUT.
  double heartbeat_timeout_seconds = 30.0;
  double collective_timeout_seconds = kDefaultCollectiveTimeoutSeconds;  // 0: no bound
  // Between the message about a lost rank and the abort: lets mpirun (or srun --kill-on-bad-exit)
  // report the original failure and end the job its own way first.
  double exit_grace_seconds = 2.0;
  double setup_timeout_seconds = 15.0;  // connecting to the tree neighbours at construction
  // How long a rank told of another's failure waits for its own end before aborting the job: ranks
  // that fail together reach their own error handling within milliseconds of each other.
  double failure_grace_seconds = 2.0;

  static FaultWatchdogSettings from_environment();
};

// The ranks `rank` keeps a watchdog link with: its parent first (none for rank 0), then its children.
std::vector<int> watchdog_tree_neighbours(int rank, int size);

// One per communicator of more than one rank. Construction is collective over the group.
class FaultWatchdog {
 public:
  static constexpr int kExitLostRank = 3;

  FaultWatchdog(MPI_Comm comm, FaultWatchdogSettings settings);
  FaultWatchdog(std::unique_ptr<WatchdogGroup> group, FaultWatchdogSettings settings);
  // Says goodbye to the neighbours (unless report_failure said this rank failed): this rank's exit
  // from here on is not a loss. Waits briefly for the neighbours to close their ends (milliseconds
  // when they are alive; after a failure, until they have ended or failure_grace_seconds + 2 s).
  ~FaultWatchdog();
  FaultWatchdog(const FaultWatchdog&) = delete;
  FaultWatchdog& operator=(const FaultWatchdog&) = delete;

  void set_collective_timeout(double seconds) { collective_timeout_seconds_.store(seconds); }
  double collective_timeout() const { return collective_timeout_seconds_.load(); }
  // Tree neighbours with a live watchdog link (at most 3). Ranks cut off by a missing link are
  // covered by the collective timeout only.
  int connected_peers() const { return connected_peers_.load(); }
  // The ranks this one links with (watchdog_tree_neighbours).
  const std::vector<int>& neighbours() const { return neighbour_ranks_; }

  // This rank is about to end with `exit_code` (not 0) because of `message`: tells every rank, so
  // that those still working abort the job with that code and message instead of waiting in a
  // collective. Returns once the notice is on its way (at most 1 s). Called once, from any thread.
  void report_failure(const std::string& message, int exit_code);

  // Brackets a blocking wait of the calling thread (one at a time): past the collective timeout the
  // watchdog aborts the job naming `call` (a string literal).
  void begin_wait(const char* call);
  void end_wait();

 private:
  using Clock = std::chrono::steady_clock;
  enum class Link { accepting, connecting, awaiting_reply, connected, finished, unreachable };
  struct Peer {
    int rank = -1;
    std::string host;
    uint32_t pid = 0;
    bool is_parent = false;  // we connect to the parent; children connect to us
    Link link = Link::accepting;
    int fd = -1;
    uint32_t address = 0;  // the parent's listen address and port, network byte order
    uint16_t port = 0;
    Clock::time_point attempt_started;
    Clock::time_point last_heard;
    watchdog_wire::Hello hello{};
    size_t hello_bytes = 0;
    std::string outgoing;  // bytes not yet accepted by the socket
    watchdog_wire::StreamReader reader;
    bool reported_failure = false;  // its own failure notice came: its end-of-file is expected
    bool write_closed = false;      // farewell: our side is shut down
  };
  struct Unidentified {  // accepted, hello not read yet
    int fd = -1;
    watchdog_wire::Hello hello{};
    size_t hello_bytes = 0;
    Clock::time_point accepted;
  };
  struct PendingFailure {
    watchdog_wire::Notice notice;
    Clock::time_point act_at;
  };

  void set_up_links();
  uint16_t open_listener(uint32_t address);
  void run();
  void service(int poll_milliseconds);
  void check_timers(Clock::time_point now);
  void accept_connections(Clock::time_point now);
  void read_unidentified(Unidentified& pending, Clock::time_point now);
  void start_connect(Peer& peer, Clock::time_point now);
  void finish_connect(Peer& peer, Clock::time_point now);
  void read_reply(Peer& peer, Clock::time_point now);
  void read_link(Peer& peer, Clock::time_point now);
  bool take_items(Peer& peer, Clock::time_point now);
  void on_notice(const Peer& from, const watchdog_wire::Notice& notice, Clock::time_point now);
  void send_own_failure();
  void queue_to_links(const std::string& bytes, const Peer* except);
  bool flush(Peer& peer);
  void flush_all();
  void say_farewell();
  void read_during_farewell(Peer& peer);
  void close_link(Peer& peer, Link state);
  void close_listener();
  bool setup_complete() const;
  void count_connected();
  void lose(Peer& peer, const std::string& reason);
  [[noreturn]] void end_job(const std::string& message, int exit_code, double grace_seconds);
  void check_wait(Clock::time_point now);
  void wake();

  std::unique_ptr<WatchdogGroup> group_;
  int rank_ = 0;
  int size_ = 1;
  FaultWatchdogSettings settings_;
  watchdog_wire::Token token_{};  // shared by this job's ranks: a connection from anything else is refused
  std::vector<int> neighbour_ranks_;
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::vector<Peer> peers_;  // one per neighbour, in neighbour_ranks_ order
  std::vector<Unidentified> unidentified_;
  Clock::time_point setup_deadline_;
  Clock::time_point last_heartbeat_;
  Clock::time_point last_service_;
  bool notice_forwarded_ = false;  // every rank passes on the first notice it gets, and only that one
  std::optional<PendingFailure> pending_failure_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> ending_{false};        // this watchdog is aborting the job
  std::atomic<bool> ending_itself_{false};  // this rank failed or is finishing: others' notices are moot
  std::atomic<int> connected_peers_{0};
  std::atomic<double> collective_timeout_seconds_;
  std::atomic<int64_t> wait_started_nanoseconds_{0};  // steady clock; 0 when not waiting
  std::atomic<const char*> wait_call_{nullptr};
  std::mutex failure_mutex_;
  std::condition_variable failure_sent_;
  std::optional<watchdog_wire::Notice> own_failure_;  // set by report_failure, sent by the thread
  bool own_failure_sent_ = false;
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
