// `qlora report runs/NAME`: reads a run folder (metrics.jsonl, memory.json, config.json,
// checkpoints/, final/) and writes PNG plots of the loss curves, learning rate, throughput and
// per-rank memory, plus report.md summarising the run with the images linked.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cluster/memory.h"
#include "common/json.h"
#include "launcher/metrics.h"

namespace qlora::launcher {

struct RunRecord {
  std::string directory;
  std::vector<MetricsLine> steps;            // training lines, ascending; after a resume the newest line of a step wins
  std::vector<MetricsLine> evaluations;      // evaluation lines, ascending, same rule
  std::vector<cluster::MemoryReport> memory; // empty when memory.json is absent (a stopped run)
  Json config;                               // config.json (or config-resumed.json); null if absent
  std::string config_file;                   // which of the two, "" if neither
  bool resumed = false;                      // config-resumed.json exists
  std::vector<std::string> checkpoints;      // checkpoints/step-K names, ascending by K
  bool has_final_adapter = false;
  int64_t replaced_lines = 0;                // lines superseded by a later line for the same step
  std::vector<std::string> warnings;         // said in the report and on stdout
};

// Reads a run folder. Throws UserError naming the file (and line) for a missing folder, a missing
// or empty metrics.jsonl, a line that is not a JSON object with a numeric step, or a corrupt
// memory.json / config.json. A last line cut short (no newline: the writer was killed mid-line) is
// skipped with a warning instead.
RunRecord load_run(const std::string& directory);

// The file names (relative to the report folder) write_report creates, in the order it links them.
struct ReportImages {
  std::string loss;           // always
  std::string learning_rate;  // "" when no line holds a learning rate
  std::string throughput;     // "" when no line holds tokens/s
  std::string memory;         // "" without memory.json
};

// report.md's text for `run`, linking `images`.
std::string report_markdown(const RunRecord& run, const ReportImages& images);

// Writes the images and report.md into out_dir (created if needed); returns the images written.
ReportImages write_report(const RunRecord& run, const std::string& out_dir);

}  // namespace qlora::launcher
