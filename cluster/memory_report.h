// Rank 0's presentation of the gathered memory reports: the per-rank table printed after training
// and memory.json, which `qlora report` and scripts/calibrate_plan.py read back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cluster/memory.h"
#include "common/json.h"

namespace qlora::cluster {

// One figure of a MemoryReport as every presentation names it: the table's column, the report's
// description and memory.json's key. One list, so the writer and the readers cannot drift apart.
struct MemoryField {
  const char* column;
  const char* description;
  const char* json_key;
  int64_t MemoryReport::*member;
};
const std::vector<MemoryField>& memory_fields();

// The per-rank table plus min / max / mean rows (when there is more than one rank), ready to print.
std::string format_memory_table(const std::vector<MemoryReport>& reports);
// The same figures as pretty-printed JSON, in bytes, ending in a newline.
std::string memory_reports_json(const std::vector<MemoryReport>& reports);
// memory.json read back, sorted by rank; throws FormatError naming `origin` when it is damaged.
std::vector<MemoryReport> parse_memory_reports(const Json& root, const std::string& origin);

}  // namespace qlora::cluster
