// Rank 0's presentation of the gathered memory reports: the per-rank table printed after training
// and memory.json, which `qlora report` and scripts/calibrate_plan.py read back.
#pragma once

#include <string>
#include <vector>

#include "cluster/memory.h"

namespace qlora::cluster {

// The per-rank table plus min / max / mean rows (when there is more than one rank), ready to print.
std::string format_memory_table(const std::vector<MemoryReport>& reports);
// The same figures as pretty-printed JSON, in bytes, ending in a newline.
std::string memory_reports_json(const std::vector<MemoryReport>& reports);

}  // namespace qlora::cluster
