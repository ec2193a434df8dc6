// The fault watchdog at scale and its failure notices. A world of hundreds of ranks without MPI:
// each rank is a forked process running a real FaultWatchdog, its setup exchanges going through
// shared memory, its "abort the job" recorded and turned into an exit; the test counts each rank's
// sockets and times how long every rank takes to end after one is killed, frozen or fails. Then the
// same notices under `mpirun -np 3`, through the MPI communicator as qlora's main() uses it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <thread>

#include "cluster/fault_watchdog.h"
#include "cluster/watchdog_address.h"
#include "cluster/watchdog_wire.h"
#include "common/log.h"
#include "support/test_support.h"

namespace qlora::cluster {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kMaxRanks = 512;
constexpr size_t kRecordBytes = 256;
constexpr int kExitNobodyEnded = 42;  // a rank still waiting when the test gave up

int64_t now_nanoseconds() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

struct RankResult {
  int sockets = -1;          // open sockets once the watchdog is set up
  int neighbours = -1;
  int connected = -1;
  int64_t ended_at = 0;      // steady clock (one clock for every process) when it ended the job
  int64_t farewell_nanoseconds = 0;  // how long its destructor took, where one ran
  int64_t farewell_ended_at = 0;
};

// Lives in memory shared by the test and every rank's process (steady_clock is CLOCK_MONOTONIC,
// so its times compare across processes).
struct SharedWorld {
  pthread_barrier_t barrier;
  uint8_t broadcast[64];
  uint64_t values[kMaxRanks];
  uint8_t records[kMaxRanks][kRecordBytes];
  RankResult results[kMaxRanks];
  std::atomic<int> ready{0};
  pthread_barrier_t go;           // the forked ranks and the test: what the ranks do next starts now
  std::atomic<int64_t> go_at{0};
};

class ForkedGroup final : public WatchdogGroup {
 public:
  ForkedGroup(SharedWorld* world, int rank, int size) : world_(world), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void broadcast_from_root(void* data, size_t bytes) override {
    wait_for_all();
    if (rank_ == 0) std::memcpy(world_->broadcast, data, bytes);
    wait_for_all();
    std::memcpy(data, world_->broadcast, bytes);
  }
  bool all_equal(uint64_t value) override {
    wait_for_all();
    world_->values[rank_] = value;
    wait_for_all();
    return std::all_of(world_->values, world_->values + size_, [&](uint64_t other) { return other == value; });
  }
  void exchange_with(const std::vector<int>& peers, const void* mine, size_t bytes, void* theirs) override {
    wait_for_all();
    std::memcpy(world_->records[rank_], mine, bytes);
    wait_for_all();
    for (size_t i = 0; i < peers.size(); ++i)
      std::memcpy(static_cast<uint8_t*>(theirs) + i * bytes, world_->records[peers[i]], bytes);
  }
  [[noreturn]] void end_job(int exit_code) override {
    world_->results[rank_].ended_at = now_nanoseconds();
    _exit(exit_code);
  }

 private:
  void wait_for_all() { pthread_barrier_wait(&world_->barrier); }
  SharedWorld* world_;
  int rank_;
  int size_;
};

int count_open_sockets() {
  int sockets = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    char target[64] = {0};
    if (readlink(entry.path().c_str(), target, sizeof target - 1) > 0 && std::strncmp(target, "socket:", 7) == 0)
      ++sockets;
  }
  return sockets;
}

double seconds(int64_t nanoseconds) { return static_cast<double>(nanoseconds) * 1e-9; }

// What a rank does once every rank is set up, and after the test says go. Returning ends the rank
// as main() does: the watchdog is destroyed (goodbye or farewell), then the process exits.
using RankAction = std::function<int(FaultWatchdog& watchdog, int rank)>;

int wait_to_be_ended(FaultWatchdog&, int) {
  std::this_thread::sleep_for(std::chrono::seconds(60));
  return kExitNobodyEnded;
}

struct WorldOutcome {
  int size = 0;
  std::vector<pid_t> pids;
  std::vector<int> exit_codes;  // -signal for a rank ended by a signal
  std::vector<RankResult> results;
  std::vector<std::string> logs;
  int64_t go_at = 0;
  double setup_seconds = 0;
};

// Ranks [0, forked) are forked processes running a FaultWatchdog; the test process may play the
// others through play_rank().
class World {
 public:
  World(int size, FaultWatchdogSettings settings, RankAction action, int forked = -1)
      : size_(size), forked_(forked < 0 ? size : forked) {
    assert(size <= kMaxRanks);
    folder_ = testing_support::shared_temp_dir() + "/world-" + std::to_string(size) + "-" + std::to_string(counter_++);
    std::filesystem::create_directories(folder_);
    void* memory = mmap(nullptr, sizeof(SharedWorld), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert(memory != MAP_FAILED);
    world_ = new (memory) SharedWorld();
    pthread_barrierattr_t attributes;
    pthread_barrierattr_init(&attributes);
    pthread_barrierattr_setpshared(&attributes, PTHREAD_PROCESS_SHARED);
    pthread_barrier_init(&world_->barrier, &attributes, static_cast<unsigned>(size));
    pthread_barrier_init(&world_->go, &attributes, static_cast<unsigned>(forked_ + 1));
    started_ = Clock::now();
    for (int rank = 0; rank < forked_; ++rank) {
      const pid_t pid = fork();
      if (pid == 0) run_rank(rank, settings, action);
      pids_.push_back(pid);
    }
  }
  ~World() {
    for (const pid_t pid : pids_) kill(pid, SIGKILL);
    for (const pid_t pid : pids_) waitpid(pid, nullptr, 0);
    munmap(world_, sizeof(SharedWorld));
  }

  // Until every forked rank has set up its watchdog; false past `limit_seconds`.
  bool wait_until_ready(double limit_seconds) {
    const auto deadline = started_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(limit_seconds));
    while (world_->ready.load() < forked_ && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    setup_seconds_ = std::chrono::duration<double>(Clock::now() - started_).count();
    return world_->ready.load() == forked_;
  }
  ForkedGroup play_rank(int rank) { return ForkedGroup(world_, rank, size_); }
  pid_t pid(int rank) const { return pids_[rank]; }
  // Call once wait_until_ready() is true.
  int64_t go() {
    const int64_t at = now_nanoseconds();
    world_->go_at.store(at);
    pthread_barrier_wait(&world_->go);
    return at;
  }

  // Waits (at most `limit_seconds`) for every rank but `frozen` (killed after the others) to exit,
  // then gathers what each did.
  WorldOutcome finish(double limit_seconds, int frozen = -1) {
    WorldOutcome outcome;
    outcome.size = forked_;
    outcome.pids = pids_;
    outcome.exit_codes.assign(forked_, kExitNobodyEnded);
    std::vector<bool> done(forked_, false);
    if (frozen >= 0) done[frozen] = true;
    const auto deadline = Clock::now() + std::chrono::duration<double>(limit_seconds);
    for (int remaining = forked_ - (frozen >= 0 ? 1 : 0); remaining > 0 && Clock::now() < deadline;) {
      for (int rank = 0; rank < forked_; ++rank) {
        int status = 0;
        if (done[rank] || waitpid(pids_[rank], &status, WNOHANG) != pids_[rank]) continue;
        done[rank] = true;
        --remaining;
        outcome.exit_codes[rank] = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (frozen >= 0) {
      kill(pids_[frozen], SIGKILL);
      waitpid(pids_[frozen], nullptr, 0);
    }
    for (int rank = 0; rank < forked_; ++rank) {
      outcome.results.push_back(world_->results[rank]);
      outcome.logs.push_back(testing_support::read_file(log_path(rank)));
    }
    outcome.go_at = world_->go_at.load();
    outcome.setup_seconds = setup_seconds_;
    return outcome;
  }

 private:
  std::string log_path(int rank) const { return folder_ + "/rank-" + std::to_string(rank) + ".log"; }

  [[noreturn]] void run_rank(int rank, const FaultWatchdogSettings& settings, const RankAction& action) {
    const int log_fd = open(log_path(rank).c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    close(log_fd);
    log::set_rank(rank, size_);
    RankResult& result = world_->results[rank];
    int exit_code = 0;
    {
      const int inherited_sockets = count_open_sockets();  // the test process's own (MPI's)
      FaultWatchdog watchdog(std::make_unique<ForkedGroup>(world_, rank, size_), settings);
      result.sockets = count_open_sockets() - inherited_sockets;
      result.neighbours = static_cast<int>(watchdog.neighbours().size());
      result.connected = watchdog.connected_peers();
      world_->ready.fetch_add(1);
      pthread_barrier_wait(&world_->go);
      exit_code = action(watchdog, rank);
      result.farewell_nanoseconds = now_nanoseconds();
    }
    result.farewell_ended_at = now_nanoseconds();
    result.farewell_nanoseconds = result.farewell_ended_at - result.farewell_nanoseconds;
    _exit(exit_code);
  }

  static inline int counter_ = 0;
  int size_;
  int forked_;
  Clock::time_point started_;
  std::string folder_;
  SharedWorld* world_ = nullptr;
  std::vector<pid_t> pids_;
  double setup_seconds_ = 0;
};

FaultWatchdogSettings fast_settings() {
  FaultWatchdogSettings settings;
  settings.exit_grace_seconds = 0.5;
  settings.failure_grace_seconds = 1.0;
  settings.setup_timeout_seconds = 60.0;  // hundreds of processes on two shared cores start slowly
  return settings;
}

// Seconds from `from` until each rank in `ranks` ended the job; -1 for a rank that did not.
std::vector<double> end_delays(const WorldOutcome& outcome, int64_t from, const std::vector<int>& ranks) {
  std::vector<double> delays;
  for (const int rank : ranks)
    delays.push_back(outcome.results[rank].ended_at == 0 ? -1.0 : seconds(outcome.results[rank].ended_at - from));
  return delays;
}

std::vector<int> ranks_except(int size, int excluded) {
  std::vector<int> ranks;
  for (int rank = 0; rank < size; ++rank)
    if (rank != excluded) ranks.push_back(rank);
  return ranks;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? -1.0 : values[values.size() / 2];
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

constexpr int kWorld = 300;
// Added to the bounds of what a rank does while hundreds of others start or exit on two cores shared
// with other jobs: the design's figures are milliseconds, a loaded machine stalls a process for seconds.
constexpr double kSchedulingSlackSeconds = 3.0;
// 37: interior, linked to 18 (parent), 75 and 76 (children): killing it cuts the tree in three.
constexpr int kVictim = 37;

TEST(FaultWatchdogScale, EveryRankHoldsAtMostThreeSocketsAndLearnsOfAKilledRankWithinTwoSeconds) {
  World world(kWorld, fast_settings(), wait_to_be_ended);
  ASSERT_TRUE(world.wait_until_ready(120.0));
  const int64_t killed_at = world.go();
  kill(world.pid(kVictim), SIGKILL);
  const WorldOutcome outcome = world.finish(30.0);

  std::map<int, int> ranks_by_sockets;
  for (int rank = 0; rank < kWorld; ++rank) {
    const RankResult& result = outcome.results[rank];
    ++ranks_by_sockets[result.sockets];
    EXPECT_EQ(result.neighbours, static_cast<int>(watchdog_tree_neighbours(rank, kWorld).size())) << rank;
    EXPECT_EQ(result.connected, result.neighbours) << rank;
    EXPECT_EQ(result.sockets, result.neighbours) << "rank " << rank << ": one socket per tree link, listener closed";
  }
  const std::vector<int> survivors = ranks_except(kWorld, kVictim);
  const std::vector<double> delays = end_delays(outcome, killed_at, survivors);
  const double slowest = *std::max_element(delays.begin(), delays.end());
  std::printf("%d forked ranks: watchdogs set up %.2f s after the first fork; sockets per rank:", kWorld,
              outcome.setup_seconds);
  for (const auto& [sockets, ranks] : ranks_by_sockets) std::printf(" %d on %d ranks", sockets, ranks);
  std::printf("; rank %d SIGKILLed: every other rank ended the job %.3f s (median) / %.3f s (slowest) later, "
              "%.1f s of it the exit grace\n",
              kVictim, median(delays), slowest, fast_settings().exit_grace_seconds);

  const std::string lost = "lost rank " + std::to_string(kVictim) + " (pid " + std::to_string(world.pid(kVictim)) + " on ";
  for (size_t i = 0; i < survivors.size(); ++i) {
    const int rank = survivors[i];
    EXPECT_EQ(outcome.exit_codes[rank], FaultWatchdog::kExitLostRank) << rank << "\n" << outcome.logs[rank];
    EXPECT_TRUE(contains(outcome.logs[rank], "[rank " + std::to_string(rank) + "] error: " + lost)) << outcome.logs[rank];
    EXPECT_TRUE(contains(outcome.logs[rank], "its watchdog connection closed without a goodbye")) << outcome.logs[rank];
    // Its neighbours saw it themselves; every other rank names the neighbour that told the tree.
    const bool neighbour = rank == 18 || rank == 75 || rank == 76;
    EXPECT_EQ(contains(outcome.logs[rank], "(seen by rank "), !neighbour) << outcome.logs[rank];
    EXPECT_GE(delays[i], fast_settings().exit_grace_seconds) << rank;
    // Typically 50-250 ms after the grace.
    EXPECT_LT(delays[i], fast_settings().exit_grace_seconds + kSchedulingSlackSeconds) << rank;
  }
  EXPECT_EQ(outcome.exit_codes[kVictim], -SIGKILL);
}

// A frozen rank keeps its sockets open: only its neighbours' heartbeat timeout gives it away, and
// their notice reaches everyone else.
TEST(FaultWatchdogScale, AFrozenRankIsLostEverywhereAfterItsNeighboursHeartbeatTimeout) {
  FaultWatchdogSettings settings = fast_settings();
  settings.heartbeat_timeout_seconds = 2.0;
  World world(kWorld, settings, wait_to_be_ended);
  ASSERT_TRUE(world.wait_until_ready(120.0));
  const int64_t stopped_at = world.go();
  kill(world.pid(kVictim), SIGSTOP);
  const WorldOutcome outcome = world.finish(30.0, kVictim);
  const std::vector<int> survivors = ranks_except(kWorld, kVictim);
  const std::vector<double> delays = end_delays(outcome, stopped_at, survivors);
  std::printf("%d ranks: rank %d SIGSTOPped: every other rank ended the job %.3f s (median) / %.3f s (slowest) later "
              "(heartbeat timeout 2 s, heartbeats every 1 s, exit grace 0.5 s)\n",
              kWorld, kVictim, median(delays), *std::max_element(delays.begin(), delays.end()));
  for (size_t i = 0; i < survivors.size(); ++i) {
    const int rank = survivors[i];
    EXPECT_EQ(outcome.exit_codes[rank], FaultWatchdog::kExitLostRank) << rank << "\n" << outcome.logs[rank];
    EXPECT_TRUE(contains(outcome.logs[rank], "lost rank 37 (pid ")) << outcome.logs[rank];
    EXPECT_TRUE(contains(outcome.logs[rank], "no heartbeat for 2 s")) << outcome.logs[rank];
    // Silence passes 2 s between 2 and 3 s after the last heartbeat, then 0.5 s of grace.
    EXPECT_GT(delays[i], 2.0) << rank;
    EXPECT_LT(delays[i], 3.5 + kSchedulingSlackSeconds) << rank;
  }
}

// One rank fails with its own error (a user error only it saw): every other rank waits the failure
// grace, in case it is failing too, then ends the job with that rank's message and exit code.
TEST(FaultWatchdogScale, ARankFailingAloneEndsEveryRankWithItsMessageAndExitCode) {
  World world(kWorld, fast_settings(), [](FaultWatchdog& watchdog, int rank) {
    if (rank != kVictim) return wait_to_be_ended(watchdog, rank);
    watchdog.report_failure("cannot write /runs/a/checkpoints/step-7: No space left on device", 2);
    return 2;
  });
  ASSERT_TRUE(world.wait_until_ready(120.0));
  const int64_t failed_at = world.go();
  const WorldOutcome outcome = world.finish(30.0);
  const std::vector<int> others = ranks_except(kWorld, kVictim);
  const std::vector<double> delays = end_delays(outcome, failed_at, others);
  const double farewell = seconds(outcome.results[kVictim].farewell_nanoseconds);
  std::printf("%d ranks: rank %d failed: every other rank ended the job %.3f s (median) / %.3f s (slowest) later "
              "(failure grace 1 s); the failing rank's farewell took %.3f s\n",
              kWorld, kVictim, median(delays), *std::max_element(delays.begin(), delays.end()), farewell);
  EXPECT_EQ(outcome.exit_codes[kVictim], 2);
  EXPECT_EQ(outcome.logs[kVictim], "");  // main() prints its own error; the watchdog adds nothing
  // It stays until its neighbours have ended the job (their processes' exits close the links),
  // never longer than the grace + 2 s (plus slack: 299 processes exiting at once on two shared cores
  // take seconds to tear down, and their sockets close last).
  for (const int neighbour : {18, 75, 76})
    EXPECT_GT(outcome.results[kVictim].farewell_ended_at, outcome.results[neighbour].ended_at) << neighbour;
  EXPECT_LT(farewell, 3.0 + kSchedulingSlackSeconds);
  for (size_t i = 0; i < others.size(); ++i) {
    const int rank = others[i];
    EXPECT_EQ(outcome.exit_codes[rank], 2) << rank << "\n" << outcome.logs[rank];
    EXPECT_EQ(outcome.logs[rank], "[rank " + std::to_string(rank) +
                                      "] error: rank 37 failed (exit code 2): cannot write "
                                      "/runs/a/checkpoints/step-7: No space left on device; aborting every rank "
                                      "(exit code 2)\n");
    EXPECT_GE(delays[i], 1.0) << rank;
    EXPECT_LT(delays[i], 1.0 + kSchedulingSlackSeconds) << rank;
  }
}

// Every rank fails together, as with a user error every rank sees, some 0.6 s late (within the
// failure grace): each exits on its own with its code, nobody aborts, nothing is printed.
TEST(FaultWatchdogScale, RanksFailingTogetherEachExitOnTheirOwnSilently) {
  FaultWatchdogSettings settings = fast_settings();
  settings.failure_grace_seconds = 2.0;  // the default; two shared cores may delay a rank's wake-up
  World world(kWorld, settings, [](FaultWatchdog& watchdog, int rank) {
    std::this_thread::sleep_for(std::chrono::milliseconds(rank % 3 == 0 ? 600 : 0));
    watchdog.report_failure("world size 300 is larger than the 64 quantization blocks of tensor x", 2);
    return 2;
  });
  ASSERT_TRUE(world.wait_until_ready(120.0));
  world.go();
  const WorldOutcome outcome = world.finish(30.0);
  std::vector<double> farewells;
  for (int rank = 0; rank < kWorld; ++rank) {
    EXPECT_EQ(outcome.exit_codes[rank], 2) << rank;
    EXPECT_EQ(outcome.results[rank].ended_at, 0) << rank << " aborted the job";
    EXPECT_EQ(outcome.logs[rank], "") << rank;
    farewells.push_back(seconds(outcome.results[rank].farewell_nanoseconds));
  }
  const double slowest = *std::max_element(farewells.begin(), farewells.end());
  std::printf("%d ranks failing together, a third of them 0.6 s late: farewells %.3f s (median) / %.3f s (slowest)\n",
              kWorld, median(farewells), slowest);
  // A rank waits until each neighbour's own notice came (at most 0.6 s here) and its end closed.
  EXPECT_LT(median(farewells), 1.0);
  EXPECT_LT(slowest, settings.failure_grace_seconds + 2.0 + kSchedulingSlackSeconds);
}

TEST(FaultWatchdogScale, RanksFinishingNormallySayGoodbyeSilently) {
  World world(kWorld, fast_settings(), [](FaultWatchdog&, int rank) {
    std::this_thread::sleep_for(std::chrono::milliseconds(rank % 2 == 0 ? 300 : 0));
    return 0;
  });
  ASSERT_TRUE(world.wait_until_ready(120.0));
  world.go();
  const WorldOutcome outcome = world.finish(30.0);
  std::vector<double> farewells;
  for (int rank = 0; rank < kWorld; ++rank) {
    EXPECT_EQ(outcome.exit_codes[rank], 0) << rank;
    EXPECT_EQ(outcome.logs[rank], "") << rank;
    farewells.push_back(seconds(outcome.results[rank].farewell_nanoseconds));
  }
  const double slowest = *std::max_element(farewells.begin(), farewells.end());
  std::printf("%d ranks finishing normally, half of them 0.3 s late: goodbyes %.3f s (median) / %.3f s (slowest)\n",
              kWorld, median(farewells), slowest);
  EXPECT_LT(median(farewells), 1.0);  // milliseconds on an idle machine
  EXPECT_LT(slowest, 2.0 + kSchedulingSlackSeconds);  // the goodbye waits at most 2 s for a neighbour's close
}

// ---- binding and authentication ----

// The addresses of the listening IPv4 sockets on `port` in this network namespace.
std::vector<std::string> listening_addresses(uint32_t port) {
  std::ifstream table("/proc/net/tcp");
  std::string line;
  std::getline(table, line);  // header
  std::vector<std::string> addresses;
  while (std::getline(table, line)) {
    std::istringstream fields(line);
    std::string slot, local, remote, state;
    fields >> slot >> local >> remote >> state;
    const auto colon = local.find(':');
    if (state != "0A" || colon == std::string::npos || std::stoul(local.substr(colon + 1), nullptr, 16) != port) continue;
    addresses.push_back(format_ipv4(static_cast<uint32_t>(std::stoul(local.substr(0, colon), nullptr, 16))));
  }
  return addresses;
}

int connect_to_loopback(uint32_t port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in target{};
  target.sin_family = AF_INET;
  target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  target.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd, reinterpret_cast<sockaddr*>(&target), sizeof target) != 0) {
    close(fd);
    return -1;
  }
  timeval limit{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  return fd;
}

// Sends `hello` over a new connection; the rank the reply names, or -1 when the connection closes
// (or stays silent for 5 s) without a valid reply.
int hello_reply(uint32_t port, const watchdog_wire::Hello& hello, const watchdog_wire::Token& token, int* kept_fd) {
  const int fd = connect_to_loopback(port);
  if (fd < 0) return -1;
  watchdog_wire::Hello reply{};
  size_t held = 0;
  if (send(fd, hello.data(), hello.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(hello.size())) {
    while (held < reply.size()) {
      const ssize_t got = recv(fd, reply.data() + held, reply.size() - held, 0);
      if (got <= 0) break;
      held += static_cast<size_t>(got);
    }
  }
  const int rank = held == reply.size() ? watchdog_wire::decode_hello(reply.data(), token) : -1;
  if (kept_fd != nullptr && rank >= 0) {
    *kept_fd = fd;
  } else {
    close(fd);
  }
  return rank;
}

// Rank 0 listens on loopback only (both ranks share this host), links only with a hello that
// carries the job's token and a child's rank, and stops listening once its children are linked.
// The test process plays rank 1 by hand.
TEST(FaultWatchdogBinding, ListensOnLoopbackOnlyAndRefusesHellosWithoutTheTokenOrAChildsRank) {
  FaultWatchdogSettings settings = fast_settings();
  settings.setup_timeout_seconds = 30.0;
  World world(2, settings, [](FaultWatchdog&, int) { return 0; }, /*forked=*/1);
  ForkedGroup rank_one = world.play_rank(1);
  watchdog_wire::Token token{};
  rank_one.broadcast_from_root(token.data(), token.size());
  ASSERT_TRUE(rank_one.all_equal(host_identity()));
  watchdog_wire::HostRecord mine{};
  watchdog_wire::HostRecord parent{};
  rank_one.exchange_with({0}, &mine, sizeof mine, &parent);
  const watchdog_wire::ListenRecord not_listening{0, 0};
  watchdog_wire::ListenRecord listening{};
  rank_one.exchange_with({0}, &not_listening, sizeof not_listening, &listening);
  EXPECT_EQ(parent.pid, static_cast<uint32_t>(world.pid(0)));
  EXPECT_EQ(format_ipv4(listening.address), "127.0.0.1");
  ASSERT_NE(listening.port, 0u);
  EXPECT_EQ(listening_addresses(listening.port), std::vector<std::string>{"127.0.0.1"});

  watchdog_wire::Token wrong = token;
  wrong[15] ^= 1;  // one bit of 128
  EXPECT_EQ(hello_reply(listening.port, watchdog_wire::encode_hello(1, wrong), wrong, nullptr), -1);
  EXPECT_EQ(hello_reply(listening.port, watchdog_wire::encode_hello(2, token), token, nullptr), -1);  // not its child
  int link = -1;
  EXPECT_EQ(hello_reply(listening.port, watchdog_wire::encode_hello(1, token), token, &link), 0);
  ASSERT_TRUE(world.wait_until_ready(30.0));
  EXPECT_TRUE(listening_addresses(listening.port).empty());
  EXPECT_EQ(connect_to_loopback(listening.port), -1);  // refused: nothing listens any more
  const uint8_t goodbye = watchdog_wire::kGoodbye;
  EXPECT_EQ(send(link, &goodbye, 1, MSG_NOSIGNAL), 1);
  close(link);
  world.go();
  const WorldOutcome outcome = world.finish(10.0);
  EXPECT_EQ(outcome.results[0].connected, 1);
  EXPECT_EQ(outcome.results[0].sockets, 1);
  EXPECT_EQ(outcome.exit_codes[0], 0);
  EXPECT_EQ(outcome.logs[0], "");
}

// ---- under mpirun: the MPI communicator, as qlora's main() reports an error ----

struct MpirunJob {
  std::string output;
  int exit_code = -1;
  double seconds_after_failure = -1;  // from the (first) failure report to the end of mpirun
};

MpirunJob run_failing_job(const std::string& name, const std::string& arguments) {
  const std::string log = testing_support::shared_temp_dir() + "/" + name + ".log";
  const std::string command = "bash -c 'timeout 120 mpirun -np 3 --oversubscribe --allow-run-as-root " +
                              std::string(QLORA_FAILING_RANK_BINARY) + " " + arguments + " > " + log +
                              " 2>&1; echo exit=$? ended=$(date +%s.%N) >> " + log + "'";
  std::string ignored;
  testing_support::run_command(command, &ignored);
  MpirunJob job;
  job.output = testing_support::read_file(log);
  const auto exit_at = job.output.rfind("exit=");
  const auto ended_at = job.output.rfind("ended=");
  const auto reported_at = job.output.find("failure reported at ");
  if (exit_at != std::string::npos) job.exit_code = std::stoi(job.output.substr(exit_at + 5));
  if (ended_at != std::string::npos && reported_at != std::string::npos)
    job.seconds_after_failure =
        std::stod(job.output.substr(ended_at + 6)) - std::stod(job.output.substr(reported_at + 20));
  std::printf("%s: mpirun exited %d, %.2f s after the failure\n", name.c_str(), job.exit_code,
              job.seconds_after_failure);
  return job;
}

TEST(FailureNoticeUnderMpirun, AUserErrorOnRankOneEndsEveryRankWithItsMessageAndExitCode) {
  const MpirunJob job = run_failing_job("failing-rank-1", "1 2 0.5 0");
  EXPECT_EQ(job.exit_code, 2) << job.output;
  EXPECT_TRUE(contains(job.output, "[rank 1] error: cannot write checkpoint step-7 on rank 1: disk full")) << job.output;
  for (const int rank : {0, 2})
    EXPECT_TRUE(contains(job.output, "[rank " + std::to_string(rank) +
                                         "] error: rank 1 failed (exit code 2): cannot write checkpoint step-7 on "
                                         "rank 1: disk full; aborting every rank (exit code 2)"))
        << job.output;
  // 2 s of failure grace, then MPI_Abort; without the notice the others would wait out the 600 s
  // collective timeout.
  EXPECT_GT(job.seconds_after_failure, 1.9) << job.output;
  EXPECT_LT(job.seconds_after_failure, 10.0) << job.output;
}

TEST(FailureNoticeUnderMpirun, AJobErrorOnRankZeroEndsEveryRankWithExitCodeThree) {
  const MpirunJob job = run_failing_job("failing-rank-0", "0 3 0.5 0");
  EXPECT_EQ(job.exit_code, 3) << job.output;
  for (const int rank : {1, 2})
    EXPECT_TRUE(contains(job.output, "[rank " + std::to_string(rank) + "] error: rank 0 failed (exit code 3): ")) << job.output;
  EXPECT_GT(job.seconds_after_failure, 1.9) << job.output;
  EXPECT_LT(job.seconds_after_failure, 10.0) << job.output;
}

// An error every rank sees, reached up to 1 s apart: each rank exits 2 on its own after
// MPI_Finalize, as before the notices existed: no abort, no message about another rank.
TEST(FailureNoticeUnderMpirun, AnErrorEveryRankSeesEndsThemCleanlyWithoutAbort) {
  const MpirunJob job = run_failing_job("failing-together", "-1 2 0.2 0.5");
  EXPECT_EQ(job.exit_code, 2) << job.output;
  EXPECT_FALSE(contains(job.output, "failed (exit code")) << job.output;
  EXPECT_FALSE(contains(job.output, "MPI_ABORT")) << job.output;
  EXPECT_LT(job.seconds_after_failure, 10.0) << job.output;
}

}  // namespace
}  // namespace qlora::cluster
