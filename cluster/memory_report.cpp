// The memory table rank 0 prints after training and memory.json: the gathered per-rank figures as
// text. The table's layout is what users read and compare between runs, so it changes only on purpose.
#include "cluster/memory_report.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "common/format.h"
#include "common/json.h"

namespace qlora::cluster {
const std::vector<MemoryField>& memory_fields() {
  static const std::vector<MemoryField> fields = {
      {"4-bit shard", "quantized weights", "quantized_weights_bytes", &MemoryReport::quantized_weights},
      {"replicated", "replicated parameters", "replicated_parameters_bytes", &MemoryReport::replicated_parameters},
      {"adapters", "adapters", "adapters_bytes", &MemoryReport::adapters},
      {"gradients", "gradients", "gradients_bytes", &MemoryReport::gradients},
      {"optimizer", "optimizer state", "optimizer_state_bytes", &MemoryReport::optimizer_state},
      {"gather bufs", "gather buffers", "gather_buffers_bytes", &MemoryReport::gather_buffers},
      {"fwd act peak", "forward activation peak", "forward_activation_peak_bytes",
       &MemoryReport::forward_activation_peak},
      {"bwd act peak", "backward activation peak", "backward_activation_peak_bytes",
       &MemoryReport::backward_activation_peak},
      {"peak total", "peak total", "peak_total_bytes", &MemoryReport::peak_total},
  };
  return fields;
}

std::string format_memory_table(const std::vector<MemoryReport>& reports) {
  std::ostringstream out;
  char cell[64];
  std::snprintf(cell, sizeof cell, "%-6s", "rank");
  out << cell;
  for (const auto& field : memory_fields()) {
    std::snprintf(cell, sizeof cell, " %13s", field.column);
    out << cell;
  }
  out << '\n';
  auto row = [&](const std::string& label, auto value_of) {
    std::snprintf(cell, sizeof cell, "%-6s", label.c_str());
    out << cell;
    for (const auto& field : memory_fields()) {
      std::snprintf(cell, sizeof cell, " %13s", format_bytes(value_of(field.member)).c_str());
      out << cell;
    }
    out << '\n';
  };
  for (const auto& report : reports)
    row(std::to_string(report.rank), [&](auto member) { return double(report.*member); });
  if (reports.size() > 1) {
    row("min", [&](auto member) {
      int64_t value = reports[0].*member;
      for (const auto& report : reports) value = std::min(value, report.*member);
      return double(value);
    });
    row("max", [&](auto member) {
      int64_t value = reports[0].*member;
      for (const auto& report : reports) value = std::max(value, report.*member);
      return double(value);
    });
    row("mean", [&](auto member) {
      double total = 0;
      for (const auto& report : reports) total += double(report.*member);
      return total / double(reports.size());
    });
  }
  return out.str();
}

std::string memory_reports_json(const std::vector<MemoryReport>& reports) {
  Json ranks = Json::array();
  for (const auto& report : reports) {
    Json entry;
    entry["rank"] = report.rank;
    for (const auto& field : memory_fields()) entry[field.json_key] = report.*field.member;
    ranks.push_back(entry);
  }
  Json root;
  root["measured_by"] = "counting CPU allocator (LibTorch tensors)";
  root["ranks"] = ranks;
  return dump_json(root, 2) + "\n";
}

std::vector<MemoryReport> parse_memory_reports(const Json& root, const std::string& origin) {
  const auto ranks = root.is_object() ? root.find("ranks") : root.end();
  if (ranks == root.end() || !ranks->is_array()) throw FormatError(origin + ": no \"ranks\" array");
  std::vector<MemoryReport> reports;
  for (const auto& entry : *ranks) {
    MemoryReport report;
    report.rank = static_cast<int>(json_int(entry, "rank", origin));
    for (const auto& field : memory_fields()) report.*field.member = json_int_or(entry, field.json_key, 0, origin);
    reports.push_back(report);
  }
  std::sort(reports.begin(), reports.end(), [](const auto& a, const auto& b) { return a.rank < b.rank; });
  return reports;
}

}  // namespace qlora::cluster
