// A rank that dies mid-step must not leave the others hanging in a collective: the job ends within
// 60 seconds, non-zero, with a message naming the lost rank.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "support/test_support.h"

namespace qlora {
namespace {

TEST(Faults, KillingRankOneMidTrainingEndsEveryRankQuickly) {
  const std::string folder = testing_support::shared_temp_dir();
  const std::string model = testing_support::synthetic_store("tiny");
  const std::string log = folder + "/fault.log";
  // Start a long run, wait until it is training, SIGKILL the rank whose OMPI_COMM_WORLD_RANK is 1,
  // then time how long the job takes to end.
  const std::string script =
      "bash -c '"
      "(mpirun -np 2 --oversubscribe --allow-run-as-root " + testing_support::qlora_binary() + " train --model " +
      model + " --steps 100000 --seq-len 32 --global-batch 4 --out " + folder + "/fault-run > " + log +
      " 2>&1; echo exit=$? >> " + log + ") & "
      "for i in $(seq 1 600); do grep -q \"step    3/\" " + log + " 2>/dev/null && break; sleep 0.1; done; "
      "for p in $(pgrep -f \"fault-run\"); do "
      "  if tr \"\\0\" \"\\n\" < /proc/$p/environ 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1; then kill -9 $p; fi; "
      "done; "
      "start=$(date +%s); wait; echo seconds=$(( $(date +%s) - start )) >> " + log + "'";
  std::string output;
  testing_support::run_command(script, &output);
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  const std::string report = text.str();
  ASSERT_NE(report.find("step    3/"), std::string::npos) << report;
  EXPECT_NE(report.find("process rank 1"), std::string::npos) << report;
  EXPECT_EQ(report.find("exit=0"), std::string::npos) << report;
  const auto seconds_at = report.find("seconds=");
  ASSERT_NE(seconds_at, std::string::npos) << report;
  EXPECT_LT(std::stoi(report.substr(seconds_at + 8)), 60) << report;
}

}  // namespace
}  // namespace qlora
