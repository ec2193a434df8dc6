// A rank that dies mid-step must not leave the others hanging in a collective: the job ends within
// 60 seconds, non-zero, with a message naming the lost rank. Also the two watchdog paths mpirun
// alone would not cover: a frozen rank (SIGSTOP) ends the job through the heartbeat timeout, or
// through --collective-timeout naming the wait that got stuck.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "support/test_support.h"

namespace qlora {
namespace {

struct FaultRun {
  std::string log;      // the job's output with "exit=N" and the signal and end times
  double seconds = -1;  // from the signal to the end of the job
};

// Starts a long 2-rank mpirun job, waits until it is training, sends `signal` to the rank whose
// OMPI_COMM_WORLD_RANK is 1, then times how long the job takes to end.
FaultRun signal_rank_one(const std::string& name, const std::string& signal, const std::string& environment,
                         const std::string& train_options) {
  const std::string folder = testing_support::shared_temp_dir();
  const std::string model = testing_support::synthetic_store("tiny");
  const std::string log = folder + "/" + name + ".log";
  const std::string script =
      "bash -c '"
      "(env " + environment + " timeout 120 mpirun -np 2 --oversubscribe --allow-run-as-root " +
      testing_support::qlora_binary() + " train --model " + model +
      " --steps 100000 --seq-len 32 --global-batch 4 " + train_options + " --out " + folder + "/" + name + " > " +
      log + " 2>&1; echo exit=$? >> " + log + ") & "
      "for i in $(seq 1 600); do grep -q \"step    3/\" " + log + " 2>/dev/null && break; sleep 0.1; done; "
      "for p in $(pgrep -f \"" + folder + "/" + name + "\"); do "
      "  if tr \"\\0\" \"\\n\" < /proc/$p/environ 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1; then kill -" + signal +
      " $p; fi; "
      "done; "
      "signalled=$(date +%s.%N); wait; echo signalled=$signalled ended=$(date +%s.%N) >> " + log + "'";
  std::string output;
  testing_support::run_command(script, &output);
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  FaultRun run;
  run.log = text.str();
  const auto signalled_at = run.log.find("signalled=");
  const auto ended_at = run.log.find("ended=");
  if (signalled_at != std::string::npos && ended_at != std::string::npos)
    run.seconds = std::stod(run.log.substr(ended_at + 6)) - std::stod(run.log.substr(signalled_at + 10));
  std::printf("%s: job ended %.2f s after SIG%s\n", name.c_str(), run.seconds, signal.c_str());
  return run;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

TEST(Faults, KillingRankOneMidTrainingEndsEveryRankQuickly) {
  const FaultRun run = signal_rank_one("fault-run", "KILL", "", "");
  ASSERT_TRUE(contains(run.log, "step    3/")) << run.log;
  EXPECT_TRUE(contains(run.log, "process rank 1")) << run.log;
  EXPECT_FALSE(contains(run.log, "exit=0")) << run.log;
  ASSERT_GE(run.seconds, 0) << run.log;
  EXPECT_LT(run.seconds, 60) << run.log;
}

// A stopped process keeps its sockets open: only the missing heartbeats give it away. The collective
// timeout is off, so the heartbeat timeout (shortened through the environment) is what ends the job.
TEST(Faults, AFrozenRankIsLostAfterTheHeartbeatTimeout) {
  const FaultRun run =
      signal_rank_one("frozen-run", "STOP", "QLORA_HEARTBEAT_TIMEOUT=2", "--collective-timeout 0");
  ASSERT_TRUE(contains(run.log, "step    3/")) << run.log;
  EXPECT_TRUE(contains(run.log, "[rank 0] error: lost rank 1 (pid ")) << run.log;
  EXPECT_TRUE(contains(run.log, "no heartbeat for 2 s")) << run.log;
  EXPECT_TRUE(contains(run.log, "exit=3")) << run.log;
  // 1-2 s until the silence passes 2 s (heartbeats come every second), 2 s of grace, then the abort.
  ASSERT_GE(run.seconds, 0) << run.log;
  EXPECT_GT(run.seconds, 2.5) << run.log;
  EXPECT_LT(run.seconds, 15.0) << run.log;
}

// With the default heartbeat timeout (30 s), a 2 s collective timeout comes first and names the wait.
TEST(Faults, AWaitPastTheCollectiveTimeoutAbortsNamingTheCall) {
  const FaultRun run = signal_rank_one("stuck-run", "STOP", "", "--collective-timeout 2");
  ASSERT_TRUE(contains(run.log, "step    3/")) << run.log;
  EXPECT_TRUE(contains(run.log, "[rank 0] error: MPI_")) << run.log;
  EXPECT_TRUE(contains(run.log, "for the other ranks (--collective-timeout 2): a rank is stuck or lost")) << run.log;
  EXPECT_FALSE(contains(run.log, "lost rank 1")) << run.log;
  EXPECT_TRUE(contains(run.log, "exit=3")) << run.log;
  ASSERT_GE(run.seconds, 0) << run.log;
  EXPECT_GT(run.seconds, 1.5) << run.log;  // rank 0 may have entered its wait just before the signal
  EXPECT_LT(run.seconds, 15.0) << run.log;
}

}  // namespace
}  // namespace qlora
