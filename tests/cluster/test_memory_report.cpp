// Rank 0's memory report: the per-rank table printed after training and memory.json, pinned to the
// exact text (column widths, binary units, the min / max / mean rows, halves rounding to even) that
// users and scripts/calibrate_plan.py read.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cluster/memory_report.h"
#include "common/json.h"

namespace qlora::cluster {
namespace {

constexpr int64_t kKiB = 1024, kMiB = 1024 * kKiB, kGiB = 1024 * kMiB;

std::vector<MemoryReport> two_ranks() {
  MemoryReport first;
  first.rank = 0;
  first.quantized_weights = 1536;
  first.replicated_parameters = 0;
  first.adapters = 3 * kMiB;
  first.gradients = 512;
  first.optimizer_state = 5 * kGiB + kGiB / 2;
  first.gather_buffers = 1023;
  first.forward_activation_peak = kKiB;
  first.backward_activation_peak = 2 * kGiB + kGiB / 2;
  first.peak_total = 7 * kGiB;
  MemoryReport second;
  second.rank = 1;
  second.quantized_weights = 2048;
  second.replicated_parameters = 4096;
  second.adapters = 3 * kMiB;
  second.gradients = 513;
  second.optimizer_state = 5 * kGiB;
  second.gather_buffers = 1025;
  second.forward_activation_peak = 3 * kKiB;
  second.backward_activation_peak = kGiB;
  second.peak_total = 6 * kGiB + kGiB / 4;
  return {first, second};
}

TEST(MemoryReportTable, ColumnsRowsAndSummaries) {
  // The mean of 512 and 513 bytes (512.5) and of 7 and 6.25 GiB (6.625 GiB) round to even.
  const std::string expected =
      "rank     4-bit shard    replicated      adapters     gradients     optimizer   gather bufs  fwd act peak  bwd act peak    peak total\n"
      "0           1.50 KiB           0 B      3.00 MiB         512 B      5.50 GiB        1023 B      1.00 KiB      2.50 GiB      7.00 GiB\n"
      "1           2.00 KiB      4.00 KiB      3.00 MiB         513 B      5.00 GiB      1.00 KiB      3.00 KiB      1.00 GiB      6.25 GiB\n"
      "min         1.50 KiB           0 B      3.00 MiB         512 B      5.00 GiB        1023 B      1.00 KiB      1.00 GiB      6.25 GiB\n"
      "max         2.00 KiB      4.00 KiB      3.00 MiB         513 B      5.50 GiB      1.00 KiB      3.00 KiB      2.50 GiB      7.00 GiB\n"
      "mean        1.75 KiB      2.00 KiB      3.00 MiB         512 B      5.25 GiB      1.00 KiB      2.00 KiB      1.75 GiB      6.62 GiB\n";
  EXPECT_EQ(format_memory_table(two_ranks()), expected);
}

TEST(MemoryReportTable, OneRankHasNoSummaryRows) {
  const std::vector<MemoryReport> one = {two_ranks()[1]};
  const std::string expected =
      "rank     4-bit shard    replicated      adapters     gradients     optimizer   gather bufs  fwd act peak  bwd act peak    peak total\n"
      "1           2.00 KiB      4.00 KiB      3.00 MiB         513 B      5.00 GiB      1.00 KiB      3.00 KiB      1.00 GiB      6.25 GiB\n";
  EXPECT_EQ(format_memory_table(one), expected);
}

TEST(MemoryReportJson, PrettyPrintedWithSortedKeysInBytes) {
  const std::string expected = R"json({
  "measured_by": "counting CPU allocator (LibTorch tensors)",
  "ranks": [
    {
      "adapters_bytes": 3145728,
      "backward_activation_peak_bytes": 1073741824,
      "forward_activation_peak_bytes": 3072,
      "gather_buffers_bytes": 1025,
      "gradients_bytes": 513,
      "optimizer_state_bytes": 5368709120,
      "peak_total_bytes": 6710886400,
      "quantized_weights_bytes": 2048,
      "rank": 1,
      "replicated_parameters_bytes": 4096
    }
  ]
}
)json";
  EXPECT_EQ(memory_reports_json({two_ranks()[1]}), expected);

  // Two ranks in the order given; every figure survives a parse exactly.
  const Json both = parse_json(memory_reports_json(two_ranks()), "memory.json");
  ASSERT_EQ(both.at("ranks").size(), 2u);
  EXPECT_EQ(json_int(both.at("ranks")[0], "rank", "memory.json"), 0);
  EXPECT_EQ(json_int(both.at("ranks")[0], "peak_total_bytes", "memory.json"), 7 * kGiB);
  EXPECT_EQ(json_int(both.at("ranks")[1], "backward_activation_peak_bytes", "memory.json"), kGiB);
  EXPECT_EQ(memory_reports_json({}),
            "{\n  \"measured_by\": \"counting CPU allocator (LibTorch tensors)\",\n  \"ranks\": []\n}\n");
}

TEST(MemoryReport, JsonReadsBackEveryFigureSortedByRank) {
  auto reports = two_ranks();
  std::swap(reports[0], reports[1]);
  const auto read = parse_memory_reports(parse_json(memory_reports_json(reports), "memory.json"), "memory.json");
  ASSERT_EQ(read.size(), 2u);
  for (size_t i = 0; i < read.size(); ++i) {
    EXPECT_EQ(read[i].rank, two_ranks()[i].rank);
    for (const auto& field : memory_fields()) EXPECT_EQ(read[i].*field.member, two_ranks()[i].*field.member) << field.json_key;
  }
  EXPECT_THROW(parse_memory_reports(parse_json("{\"ranks\": 3}", "memory.json"), "memory.json"), FormatError);
  EXPECT_THROW(parse_memory_reports(parse_json("{\"ranks\": [{\"rank\": \"x\"}]}", "memory.json"), "memory.json"),
               FormatError);
}

}  // namespace
}  // namespace qlora::cluster
