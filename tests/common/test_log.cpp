// common/log.h: banners come from rank 0 alone and untagged; info, warnings and errors come from
// every rank, tagged "[rank r]" once the job has more than one rank, on stdout or stderr.
#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "common/log.h"

namespace qlora {
namespace {

// Each test sets the rank it plays; the log is process-wide state, so put back a single rank.
class LogTest : public ::testing::Test {
 protected:
  void TearDown() override { log::set_rank(0, 1); }

  // What `write` sends to stdout and to stderr.
  template <typename Write>
  static std::pair<std::string, std::string> captured(Write write) {
    ::testing::internal::CaptureStdout();
    ::testing::internal::CaptureStderr();
    write();
    std::string out = ::testing::internal::GetCapturedStdout();
    std::string err = ::testing::internal::GetCapturedStderr();
    return {out, err};
  }
};

TEST_F(LogTest, ASingleRankWritesUntaggedLines) {
  log::set_rank(0, 1);
  EXPECT_EQ(log::rank(), 0);
  EXPECT_TRUE(log::is_root());
  const auto [out, err] = captured([] {
    log::banner("qlora train: 2 ranks");
    log::info("step 1 loss 2.5");
    log::warn("no eval split");
    log::error("cannot read data.jsonl");
  });
  EXPECT_EQ(out, "qlora train: 2 ranks\nstep 1 loss 2.5\n");
  EXPECT_EQ(err, "warning: no eval split\nerror: cannot read data.jsonl\n");
}

TEST_F(LogTest, RankZeroOfManyPrintsBannersPlainAndTagsItsOtherLines) {
  log::set_rank(0, 4);
  EXPECT_TRUE(log::is_root());
  const auto [out, err] = captured([] {
    log::banner("model: tiny");
    log::info("loaded");
    log::warn("slow disk");
  });
  EXPECT_EQ(out, "model: tiny\n[rank 0] loaded\n");
  EXPECT_EQ(err, "[rank 0] warning: slow disk\n");
}

TEST_F(LogTest, OtherRanksPrintNoBannerAndTagEveryLine) {
  log::set_rank(3, 4);
  EXPECT_EQ(log::rank(), 3);
  EXPECT_FALSE(log::is_root());
  const auto [out, err] = captured([] {
    log::banner("model: tiny");
    log::info("shard 3 of 4");
    log::error("out of memory");
  });
  EXPECT_EQ(out, "[rank 3] shard 3 of 4\n");
  EXPECT_EQ(err, "[rank 3] error: out of memory\n");
}

TEST_F(LogTest, EmptyAndMultiByteLinesPassThroughUnchanged) {
  log::set_rank(1, 2);
  const auto [out, err] = captured([] {
    log::info("");
    log::info("tokens/s \xe2\x89\x88 1200");
  });
  EXPECT_EQ(out, "[rank 1] \n[rank 1] tokens/s \xe2\x89\x88 1200\n");
  EXPECT_EQ(err, "");
}

}  // namespace
}  // namespace qlora
