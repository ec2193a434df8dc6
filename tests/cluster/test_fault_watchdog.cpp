// FaultWatchdog on its own, with short settings, in small jobs started by this test: a peer that stops
// heart-beating (SIGSTOP keeps its sockets open) is reported by name within the heartbeat timeout,
// a peer that says goodbye and falls silent is not a failure, and a wait past the collective timeout
// aborts naming the call, both for a bare begin_wait and for MpiCommunicator's blocking and
// non-blocking waits. tests/cluster/test_faults.cpp covers the same paths through whole training runs.
//
// A scenario that ends in an abort cannot run inside the test process, so each one is a test of this
// binary (WatchdogScenario.*) that only runs when QLORA_WATCHDOG_SCENARIO is set; the tests above it
// start it (under mpirun for two ranks) and read its output, each line stamped with its arrival time.
#include <gtest/gtest.h>
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cluster/fault_watchdog.h"
#include "cluster/mpi_communicator.h"
#include "common/log.h"
#include "support/test_support.h"

namespace qlora::cluster {
namespace {

double epoch_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void sleep_seconds(double seconds) { std::this_thread::sleep_for(std::chrono::duration<double>(seconds)); }

bool in_scenario() { return std::getenv("QLORA_WATCHDOG_SCENARIO") != nullptr; }

// Prints "<what> at <epoch seconds>" at once, for the parent to time the scenario from.
void mark(const std::string& what) {
  std::printf("%s at %.6f\n", what.c_str(), epoch_seconds());
  std::fflush(stdout);
}

// Short enough for a fast test, long enough that a loaded machine does not trip them by accident.
FaultWatchdogSettings short_settings() {
  FaultWatchdogSettings settings;
  settings.heartbeat_timeout_seconds = 2.0;
  settings.collective_timeout_seconds = 0.0;
  settings.exit_grace_seconds = 0.3;
  return settings;
}

struct StampedLine {
  double arrived = 0.0;  // epoch seconds, as seen by the parent
  std::string text;
};

struct ScenarioRun {
  int exit_code = -1;
  std::vector<StampedLine> lines;
  std::string output;  // every line, unstamped

  // Arrival time of the first line containing `part`, or NaN.
  double arrival_of(const std::string& part) const {
    for (const auto& line : lines)
      if (line.text.find(part) != std::string::npos) return line.arrived;
    return std::nan("");
  }
  // The time a child printed with mark(what), or NaN.
  double marked(const std::string& what) const {
    const std::string key = what + " at ";
    for (const auto& line : lines) {
      const auto at = line.text.find(key);
      if (at != std::string::npos) return std::stod(line.text.substr(at + key.size()));
    }
    return std::nan("");
  }
  bool contains(const std::string& part) const { return output.find(part) != std::string::npos; }
};

// Runs WatchdogScenario.<name> of this binary, on `ranks` ranks under mpirun or (0) as a singleton.
ScenarioRun run_scenario(const std::string& name, int ranks) {
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string launcher =
      ranks > 0 ? "mpirun -np " + std::to_string(ranks) + " --oversubscribe --bind-to none --allow-run-as-root " : "";
  // bash stamps each line as it arrives ($EPOCHREALTIME: no process per line); `timeout` ends a
  // scenario that hangs, SIGKILL included for a stopped rank.
  const std::string script = "bash -c 'QLORA_WATCHDOG_SCENARIO=1 timeout -k 5 60 " + launcher + self +
                             " --gtest_filter=WatchdogScenario." + name +
                             " 2>&1 | while IFS= read -r line; do echo \"$EPOCHREALTIME $line\"; done; "
                             "echo \"$EPOCHREALTIME exit=${PIPESTATUS[0]}\"'";
  std::string output;
  testing_support::run_command(script, &output);
  ScenarioRun run;
  std::istringstream stream(output);
  std::string line;
  while (std::getline(stream, line)) {
    const auto space = line.find(' ');
    if (space == std::string::npos) continue;
    StampedLine stamped{std::stod(line.substr(0, space)), line.substr(space + 1)};
    if (stamped.text.rfind("exit=", 0) == 0) run.exit_code = std::stoi(stamped.text.substr(5));
    run.output += stamped.text + "\n";
    run.lines.push_back(stamped);
  }
  std::printf("scenario %s: exit %d\n", name.c_str(), run.exit_code);
  return run;
}

// ---- Scenarios (run by the tests below, in their own jobs) ----

// Rank 1 freezes itself after both watchdogs connected; rank 0 idles until its watchdog ends the job.
TEST(WatchdogScenario, PeerStopsHeartbeating) {
  if (!in_scenario()) GTEST_SKIP() << "started by FaultWatchdog.ReportsAPeerThatStopsHeartbeating";
  int rank = 0;
  int world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  log::set_rank(rank, world);
  FaultWatchdog watchdog(MPI_COMM_WORLD, short_settings());
  ASSERT_EQ(watchdog.connected_peers(), static_cast<int>(watchdog_tree_neighbours(rank, world).size()));
  std::printf("rank %d pid %d\n", rank, static_cast<int>(getpid()));
  std::fflush(stdout);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 1) {
    mark("freezing");
    raise(SIGSTOP);
  }
  sleep_seconds(30.0);
  ADD_FAILURE() << "rank " << rank << " was not ended by its watchdog";
}

// Rank 1 says goodbye (destroys its watchdog) and stays silent for 2.6 s: with its last heartbeat up
// to 1.25 s before that, well past the 2 s heartbeat timeout and the 250 ms between looks.
TEST(WatchdogScenario, PeerSaysGoodbye) {
  if (!in_scenario()) GTEST_SKIP() << "started by FaultWatchdog.APeerThatSaidGoodbyeIsNotLost";
  int rank = 0;
  int world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  log::set_rank(rank, world);
  auto watchdog = std::make_unique<FaultWatchdog>(MPI_COMM_WORLD, short_settings());
  ASSERT_EQ(watchdog->connected_peers(), 1);
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank == 1) {
    watchdog.reset();
    sleep_seconds(2.6);
  } else {
    const auto start = std::chrono::steady_clock::now();
    while (watchdog->connected_peers() != 0 && std::chrono::steady_clock::now() - start < std::chrono::seconds(5))
      sleep_seconds(0.01);
    const double noticed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(watchdog->connected_peers(), 0);
    // The goodbye is read by the watchdog thread, which wakes at least every 250 ms.
    EXPECT_LT(noticed, 1.5) << "the goodbye took " << noticed << " s to be noticed";
    sleep_seconds(2.6 - noticed);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  mark("rank " + std::to_string(rank) + " finished");
}

// One process, no peers: only the collective timeout can end it. Four waits of 0.3 s (2 s in all)
// under a 0.8 s timeout survive, as each wait is timed on its own; the fifth never ends.
TEST(WatchdogScenario, WaitsAgainstTheCollectiveTimeout) {
  if (!in_scenario()) GTEST_SKIP() << "started by FaultWatchdog.OnlyAWaitPastTheCollectiveTimeoutAbortsNamingTheCall";
  FaultWatchdogSettings settings = short_settings();
  settings.collective_timeout_seconds = 0.8;
  FaultWatchdog watchdog(MPI_COMM_SELF, settings);
  EXPECT_EQ(watchdog.connected_peers(), 0);
  for (int i = 0; i < 4; ++i) {
    watchdog.begin_wait("short wait");
    sleep_seconds(0.3);
    watchdog.end_wait();
    sleep_seconds(0.2);
  }
  mark("survived");
  watchdog.begin_wait("MPI_Allreduce (scenario)");
  sleep_seconds(30.0);
  ADD_FAILURE() << "the wait was not ended by the watchdog";
}

// Rank 1 stays away (alive, heart-beating); rank 0 waits in the collective `call` under a 1 s timeout.
void communicator_wait_scenario(const std::string& call) {
  int rank = 0;
  int world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  log::set_rank(rank, world);
  auto communicator = make_mpi_communicator(MPI_COMM_WORLD);
  communicator->set_collective_timeout(1.0);
  if (rank == 1) {
    sleep_seconds(30.0);
    ADD_FAILURE() << "rank 1 was not ended by rank 0's abort";
    return;
  }
  mark("waiting");
  float value = 1.0f;
  if (call == "barrier") communicator->barrier();
  if (call == "all_reduce_async") communicator->all_reduce_async(&value, 1, ReduceOp::sum)->wait();
  ADD_FAILURE() << "the " << call << " returned without rank 1";
}

// Rank 1 is busy for 2.5 s (as rank 0 is while tokenizing a corpus) under a 1 s timeout: inside an
// UnboundedWait the others wait it out; afterwards the bound is back and ends the next long wait.
TEST(WatchdogScenario, UnboundedWaitOutlastsTheTimeout) {
  if (!in_scenario()) GTEST_SKIP() << "started by FaultWatchdog.AnUnboundedWaitLiftsTheTimeoutUntilItEnds";
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  log::set_rank(rank, world);
  auto communicator = make_mpi_communicator(MPI_COMM_WORLD);
  communicator->set_collective_timeout(1.0);
  {
    const UnboundedWait busy(*communicator);
    EXPECT_EQ(communicator->collective_timeout(), 0.0);
    if (rank == 1) sleep_seconds(2.5);
    communicator->barrier();
  }
  EXPECT_EQ(communicator->collective_timeout(), 1.0);
  mark("waited out");
  if (rank == 1) {
    sleep_seconds(30.0);
    ADD_FAILURE() << "rank 1 was not ended by rank 0's abort";
    return;
  }
  communicator->barrier();
  ADD_FAILURE() << "the barrier returned without rank 1";
}

TEST(WatchdogScenario, CommunicatorBarrierWithoutPeer) {
  if (!in_scenario()) GTEST_SKIP() << "started by FaultWatchdog.CommunicatorWaitsAreNamedWhenTheyTimeOut";
  communicator_wait_scenario("barrier");
}

TEST(WatchdogScenario, CommunicatorAsyncWaitWithoutPeer) {
  if (!in_scenario()) GTEST_SKIP() << "started by FaultWatchdog.CommunicatorWaitsAreNamedWhenTheyTimeOut";
  communicator_wait_scenario("all_reduce_async");
}

// ---- The tests ----

TEST(FaultWatchdog, SettingsComeFromTheEnvironmentOrTheDefaults) {
  if (in_scenario()) GTEST_SKIP();
  unsetenv("QLORA_HEARTBEAT_TIMEOUT");
  const FaultWatchdogSettings defaults = FaultWatchdogSettings::from_environment();
  EXPECT_EQ(defaults.heartbeat_interval_seconds, 1.0);
  EXPECT_EQ(defaults.heartbeat_timeout_seconds, 30.0);
  EXPECT_EQ(defaults.collective_timeout_seconds, 600.0);
  EXPECT_EQ(defaults.exit_grace_seconds, 2.0);
  EXPECT_EQ(defaults.setup_timeout_seconds, 15.0);
  setenv("QLORA_HEARTBEAT_TIMEOUT", "2.5", 1);
  EXPECT_EQ(FaultWatchdogSettings::from_environment().heartbeat_timeout_seconds, 2.5);
  // Not a positive number of seconds: the default stays (with a warning).
  for (const char* invalid : {"abc", "-1", "0", "3s", "", "inf", "nan"}) {
    setenv("QLORA_HEARTBEAT_TIMEOUT", invalid, 1);
    EXPECT_EQ(FaultWatchdogSettings::from_environment().heartbeat_timeout_seconds, 30.0) << "'" << invalid << "'";
  }
  unsetenv("QLORA_HEARTBEAT_TIMEOUT");
}

TEST(FaultWatchdog, ASingleRankWatchdogHasNoPeersAndAnAdjustableTimeout) {
  if (in_scenario()) GTEST_SKIP();
  FaultWatchdogSettings settings = short_settings();
  settings.collective_timeout_seconds = 42.0;
  FaultWatchdog watchdog(MPI_COMM_SELF, settings);
  EXPECT_EQ(watchdog.connected_peers(), 0);
  EXPECT_EQ(watchdog.collective_timeout(), 42.0);
  watchdog.set_collective_timeout(0.0);
  EXPECT_EQ(watchdog.collective_timeout(), 0.0);
}

// Within the stated time: the frozen rank's last heartbeat came at most one interval plus one look
// (1.25 s) before it froze, and the watchdog looks every 250 ms, so the 2 s timeout reports the loss
// 0.75 to 2.25 s after the freeze (allowing 1 s more for a loaded machine); the job ends after the
// 0.3 s grace.
TEST(FaultWatchdog, ReportsAPeerThatStopsHeartbeating) {
  if (in_scenario()) GTEST_SKIP();
  const ScenarioRun run = run_scenario("PeerStopsHeartbeating", 2);
  const auto pid_at = run.output.find("rank 1 pid ");
  ASSERT_NE(pid_at, std::string::npos) << run.output;
  const std::string pid = run.output.substr(pid_at + 11, run.output.find('\n', pid_at) - pid_at - 11);
  EXPECT_TRUE(run.contains("[rank 0] error: lost rank 1 (pid " + pid + " on ")) << run.output;
  EXPECT_TRUE(run.contains("no heartbeat for 2 s: its node or network is down, or the process is frozen; aborting "
                           "every rank (exit code 3)"))
      << run.output;
  EXPECT_FALSE(run.contains("was not ended by its watchdog")) << run.output;
  EXPECT_EQ(run.exit_code, FaultWatchdog::kExitLostRank) << run.output;
  const double reported = run.arrival_of("error: lost rank 1") - run.marked("freezing");
  const double ended = run.arrival_of("exit=") - run.marked("freezing");
  std::printf("lost peer reported %.2f s and job ended %.2f s after the freeze\n", reported, ended);
  EXPECT_GT(reported, 0.7) << run.output;
  EXPECT_LT(reported, 3.25) << run.output;
  EXPECT_GT(ended, reported + 0.25) << run.output;
  EXPECT_LT(ended, reported + 3.0) << run.output;
}

// Both ranks finish normally although rank 1 sent nothing for 2.6 s, past the 2 s heartbeat timeout:
// its goodbye told rank 0 the closed connection was no loss.
TEST(FaultWatchdog, APeerThatSaidGoodbyeIsNotLost) {
  if (in_scenario()) GTEST_SKIP();
  const ScenarioRun run = run_scenario("PeerSaysGoodbye", 2);
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_FALSE(run.contains("lost rank")) << run.output;
  EXPECT_FALSE(run.contains("Failure")) << run.output;
  EXPECT_FALSE(std::isnan(run.marked("rank 0 finished"))) << run.output;
  EXPECT_FALSE(std::isnan(run.marked("rank 1 finished"))) << run.output;
}

TEST(FaultWatchdog, OnlyAWaitPastTheCollectiveTimeoutAbortsNamingTheCall) {
  if (in_scenario()) GTEST_SKIP();
  const ScenarioRun run = run_scenario("WaitsAgainstTheCollectiveTimeout", 0);
  EXPECT_FALSE(run.contains("short wait has waited")) << run.output;
  // The seconds waited are printed rounded: 1 here, unless a loaded machine delayed the look.
  EXPECT_TRUE(run.contains("error: MPI_Allreduce (scenario) has waited ")) << run.output;
  EXPECT_TRUE(run.contains(" s for the other ranks (--collective-timeout 0.8): a rank is stuck or lost; aborting every "
                           "rank (exit code 3)"))
      << run.output;
  EXPECT_EQ(run.exit_code, FaultWatchdog::kExitLostRank) << run.output;
  // Reported at the first look (every 250 ms) past 0.8 s, allowing 1 s for a loaded machine.
  const double reported = run.arrival_of("has waited") - run.marked("survived");
  std::printf("collective timeout reported %.2f s into the wait\n", reported);
  EXPECT_GT(reported, 0.8) << run.output;
  EXPECT_LT(reported, 2.05) << run.output;
}

TEST(FaultWatchdog, AnUnboundedWaitLiftsTheTimeoutUntilItEnds) {
  if (in_scenario()) GTEST_SKIP();
  const ScenarioRun run = run_scenario("UnboundedWaitOutlastsTheTimeout", 2);
  EXPECT_FALSE(std::isnan(run.marked("waited out"))) << run.output;
  EXPECT_TRUE(run.contains("[rank 0] error: MPI_Barrier has waited ")) << run.output;
  EXPECT_EQ(run.exit_code, FaultWatchdog::kExitLostRank) << run.output;
}

// MpiCommunicator brackets its waits for the watchdog: the abort names the blocking call, or the
// non-blocking collective a wait() was completing.
TEST(FaultWatchdog, CommunicatorWaitsAreNamedWhenTheyTimeOut) {
  if (in_scenario()) GTEST_SKIP();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"CommunicatorBarrierWithoutPeer", "[rank 0] error: MPI_Barrier has waited "},
      {"CommunicatorAsyncWaitWithoutPeer", "[rank 0] error: MPI_Wait (all-reduce) has waited "}};
  for (const auto& [scenario, message] : cases) {
    const ScenarioRun run = run_scenario(scenario, 2);
    std::printf("%s reported %.2f s into the wait\n", scenario.c_str(), run.arrival_of("has waited") - run.marked("waiting"));
    // The timeout is the first error; rank 1 may report rank 0 lost once the abort has begun.
    const auto first_error = run.output.find("error: ");
    ASSERT_NE(first_error, std::string::npos) << run.output;
    EXPECT_EQ(run.output.find(message), first_error - 9) << run.output;
    EXPECT_TRUE(run.contains(" s for the other ranks (--collective-timeout 1): a rank is stuck or lost")) << run.output;
    EXPECT_EQ(run.exit_code, FaultWatchdog::kExitLostRank) << run.output;
    const double reported = run.arrival_of("has waited") - run.marked("waiting");
    EXPECT_GT(reported, 1.0) << run.output;
    EXPECT_LT(reported, 2.25) << run.output;
  }
}

}  // namespace
}  // namespace qlora::cluster
