// metrics.jsonl's one schema: a line train writes reads back as the same MetricsLine, with the key
// names other tools (and older runs) rely on; damaged lines are FormatErrors naming the line.
#include <gtest/gtest.h>

#include <cmath>

#include "common/json.h"
#include "launcher/metrics.h"

namespace qlora::launcher {
namespace {

MetricsLine training_line() {
  MetricsLine line;
  line.step = 7;
  line.loss = 3.25;
  line.learning_rate = 2e-4;
  line.gradient_norm = 0.875;
  line.tokens_per_second = 1536.5;
  line.step_seconds = 0.125;
  line.gather_wait_seconds = 0.0625;
  line.reduce_wait_seconds = 0.03125;
  line.peak_bytes_rank0 = int64_t{21478924};
  return line;
}

MetricsLine read_back(const MetricsLine& written) {
  const auto read = read_metrics_line(parse_json(dump_json(metrics_json(written)), "line"), "line");
  EXPECT_TRUE(read.has_value());
  return read.value_or(MetricsLine{});
}

TEST(Metrics, TrainingLineRoundTripsWithItsKeyNames) {
  const MetricsLine written = training_line();
  const Json json = metrics_json(written);
  EXPECT_EQ(json_int(json, "step", "line"), 7);
  EXPECT_EQ(json_double(json, "loss", "line"), 3.25);
  EXPECT_EQ(json_double(json, "lr", "line"), 2e-4);
  EXPECT_EQ(json_double(json, "grad_norm", "line"), 0.875);
  EXPECT_EQ(json_double(json, "tokens_per_second", "line"), 1536.5);
  EXPECT_EQ(json_double(json, "step_seconds", "line"), 0.125);
  EXPECT_EQ(json_double(json, "gather_wait_seconds", "line"), 0.0625);
  EXPECT_EQ(json_double(json, "reduce_wait_seconds", "line"), 0.03125);
  EXPECT_EQ(json_double(json, "communication_seconds", "line"), 0.09375);
  EXPECT_EQ(json_int(json, "peak_bytes_rank0", "line"), 21478924);
  EXPECT_EQ(json.size(), 10u);

  const MetricsLine read = read_back(written);
  EXPECT_EQ(read.kind, MetricsLine::Kind::training);
  EXPECT_EQ(read.step, 7);
  EXPECT_EQ(read.loss, 3.25);
  EXPECT_EQ(read.learning_rate, 2e-4);
  EXPECT_EQ(read.gradient_norm, 0.875);
  EXPECT_EQ(read.tokens_per_second, 1536.5);
  EXPECT_EQ(read.step_seconds, 0.125);
  EXPECT_EQ(read.gather_wait_seconds, 0.0625);
  EXPECT_EQ(read.reduce_wait_seconds, 0.03125);
  EXPECT_EQ(read.peak_bytes_rank0, 21478924);
}

TEST(Metrics, EvaluationLineRoundTrips) {
  MetricsLine written;
  written.kind = MetricsLine::Kind::evaluation;
  written.step = 50;
  written.loss = 3.0599;
  written.perplexity = std::exp(3.0599);
  const Json json = metrics_json(written);
  EXPECT_EQ(json.size(), 3u);
  EXPECT_EQ(json_double(json, "eval_loss", "line"), 3.0599);
  const MetricsLine read = read_back(written);
  EXPECT_EQ(read.kind, MetricsLine::Kind::evaluation);
  EXPECT_EQ(read.step, 50);
  EXPECT_EQ(read.loss, 3.0599);
  EXPECT_DOUBLE_EQ(read.perplexity, std::exp(3.0599));
}

TEST(Metrics, FieldsAnOlderWriterLeftOutReadAsMissing) {
  MetricsLine written = training_line();
  written.reduce_wait_seconds = MetricsLine::kMissing;  // runs before the field existed
  written.peak_bytes_rank0 = -1;
  const Json json = metrics_json(written);
  EXPECT_FALSE(json.contains("reduce_wait_seconds"));
  EXPECT_FALSE(json.contains("communication_seconds"));
  EXPECT_FALSE(json.contains("peak_bytes_rank0"));
  const MetricsLine read = read_back(written);
  EXPECT_TRUE(std::isnan(read.reduce_wait_seconds));
  EXPECT_EQ(read.peak_bytes_rank0, -1);
  EXPECT_EQ(read.gather_wait_seconds, 0.0625);
  // An evaluation line without its perplexity gets exp(loss).
  const auto evaluation = read_metrics_line(parse_json(R"({"step": 4, "eval_loss": 2.0})", "line"), "line");
  ASSERT_TRUE(evaluation.has_value());
  EXPECT_EQ(evaluation->kind, MetricsLine::Kind::evaluation);
  EXPECT_DOUBLE_EQ(evaluation->perplexity, std::exp(2.0));
}

std::string error_of(const std::string& text) {
  try {
    read_metrics_line(parse_json(text, "metrics.jsonl line 3"), "metrics.jsonl line 3");
  } catch (const FormatError& error) {
    return error.what();
  }
  return "(no error)";
}

TEST(Metrics, DamagedLinesNameTheLineAndTheField) {
  EXPECT_EQ(error_of("[1, 2]"), "metrics.jsonl line 3: not a JSON object");
  EXPECT_EQ(error_of(R"({"loss": 2.0})"), "metrics.jsonl line 3: no numeric \"step\"");
  EXPECT_EQ(error_of(R"({"step": 2.5, "loss": 2.0})"), "metrics.jsonl line 3: \"step\" is not an integer");
  EXPECT_EQ(error_of(R"({"step": -1, "loss": 2.0})"), "metrics.jsonl line 3: \"step\" is negative");
  EXPECT_EQ(error_of(R"({"step": 1, "loss": "high"})"), "metrics.jsonl line 3: \"loss\" is not a number");
  EXPECT_EQ(error_of(R"({"step": 1, "loss": 2.0, "lr": null})"), "metrics.jsonl line 3: \"lr\" is not a number");
  // A kind of line this reader does not know is neither an error nor read.
  EXPECT_FALSE(read_metrics_line(parse_json(R"({"step": 1, "note": "x"})", "line"), "line").has_value());
}

}  // namespace
}  // namespace qlora::launcher
