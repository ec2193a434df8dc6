// metrics.jsonl, the run folder's step-by-step record: one JSON object per line, a training step or
// an evaluation. MetricsLine is its one schema: `qlora train` writes it, `qlora report` reads it.
#pragma once

#include <cstdint>
#include <fstream>
#include <limits>
#include <optional>
#include <string>

#include "common/json.h"

namespace qlora::launcher {

struct MetricsLine {
  enum class Kind { training, evaluation };
  static constexpr double kMissing = std::numeric_limits<double>::quiet_NaN();

  Kind kind = Kind::training;
  int64_t step = 0;                  // 1-based: the step just finished
  double loss = kMissing;            // training loss, or the held-out loss of an evaluation
  double perplexity = kMissing;      // evaluation only: exp(loss)
  // Training only; an older or newer writer's line may lack any of them (NaN, or -1 for the peak).
  double learning_rate = kMissing;
  double gradient_norm = kMissing;
  double tokens_per_second = kMissing;
  double step_seconds = kMissing;
  double gather_wait_seconds = kMissing;
  double reduce_wait_seconds = kMissing;
  int64_t peak_bytes_rank0 = -1;
};

// The line's JSON object, keys as in metrics.jsonl: a training line also carries
// communication_seconds (gather wait + reduce wait); fields the line lacks are left out.
Json metrics_json(const MetricsLine& line);

// One parsed line: "eval_loss" makes it an evaluation, else "loss" a training step, else it is a
// kind this reader does not know (empty). Throws FormatError "<label>: <what>" for a line without an
// integral, non-negative "step" or with a known field that is not a number.
std::optional<MetricsLine> read_metrics_line(const Json& value, const std::string& label);

// Rank 0's metrics.jsonl: appended to after a resume, else started afresh; every line is flushed
// whole, so a killed run leaves at most its last line cut short. A line that cannot be written (a
// full disk) throws UserError naming the file rather than leaving a silent gap.
class MetricsFile {
 public:
  MetricsFile() = default;  // writes nothing (other ranks, tests without a run folder)
  MetricsFile(const std::string& path, bool append);
  void write(const MetricsLine& line);

 private:
  std::ofstream file_;
  std::string path_;
};

}  // namespace qlora::launcher
