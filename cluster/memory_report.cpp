// The memory table rank 0 prints after training and memory.json: the gathered per-rank figures as
// text. The table's layout is what users read and compare between runs, so it changes only on purpose.
#include "cluster/memory_report.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "common/format.h"
#include "common/json.h"

namespace qlora::cluster {
namespace {

struct Column {
  const char* title;
  int64_t MemoryReport::*field;
};
const Column kColumns[] = {
    {"4-bit shard", &MemoryReport::quantized_weights},
    {"replicated", &MemoryReport::replicated_parameters},
    {"adapters", &MemoryReport::adapters},
    {"gradients", &MemoryReport::gradients},
    {"optimizer", &MemoryReport::optimizer_state},
    {"gather bufs", &MemoryReport::gather_buffers},
    {"fwd act peak", &MemoryReport::forward_activation_peak},
    {"bwd act peak", &MemoryReport::backward_activation_peak},
    {"peak total", &MemoryReport::peak_total},
};

}  // namespace

std::string format_memory_table(const std::vector<MemoryReport>& reports) {
  std::ostringstream out;
  char cell[64];
  std::snprintf(cell, sizeof cell, "%-6s", "rank");
  out << cell;
  for (const auto& column : kColumns) {
    std::snprintf(cell, sizeof cell, " %13s", column.title);
    out << cell;
  }
  out << '\n';
  auto row = [&](const std::string& label, auto value_of) {
    std::snprintf(cell, sizeof cell, "%-6s", label.c_str());
    out << cell;
    for (const auto& column : kColumns) {
      std::snprintf(cell, sizeof cell, " %13s", format_bytes(value_of(column)).c_str());
      out << cell;
    }
    out << '\n';
  };
  for (const auto& report : reports)
    row(std::to_string(report.rank), [&](const Column& column) { return double(report.*(column.field)); });
  if (reports.size() > 1) {
    row("min", [&](const Column& column) {
      int64_t value = reports[0].*(column.field);
      for (const auto& report : reports) value = std::min(value, report.*(column.field));
      return double(value);
    });
    row("max", [&](const Column& column) {
      int64_t value = reports[0].*(column.field);
      for (const auto& report : reports) value = std::max(value, report.*(column.field));
      return double(value);
    });
    row("mean", [&](const Column& column) {
      double total = 0;
      for (const auto& report : reports) total += double(report.*(column.field));
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
    entry["quantized_weights_bytes"] = report.quantized_weights;
    entry["replicated_parameters_bytes"] = report.replicated_parameters;
    entry["adapters_bytes"] = report.adapters;
    entry["gradients_bytes"] = report.gradients;
    entry["optimizer_state_bytes"] = report.optimizer_state;
    entry["gather_buffers_bytes"] = report.gather_buffers;
    entry["forward_activation_peak_bytes"] = report.forward_activation_peak;
    entry["backward_activation_peak_bytes"] = report.backward_activation_peak;
    entry["peak_total_bytes"] = report.peak_total;
    ranks.push_back(entry);
  }
  Json root;
  root["measured_by"] = "counting CPU allocator (LibTorch tensors)";
  root["ranks"] = ranks;
  return dump_json(root, 2) + "\n";
}

}  // namespace qlora::cluster
