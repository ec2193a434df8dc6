// Counting CPU allocator for LibTorch and the per-rank memory table.
#include "cluster/memory.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <sstream>

#include "cluster/log.h"
#include "shard/json.h"

namespace qlora::cluster {
namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<bool> g_installed{false};

void note_allocation(int64_t bytes) {
  const int64_t now = g_current.fetch_add(bytes) + bytes;
  int64_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

// What the deleter needs: the wrapped allocation (freed with it) and its size.
struct CountedAllocation {
  c10::DataPtr inner;
  int64_t bytes;
};

void release(void* context) {
  auto* allocation = static_cast<CountedAllocation*>(context);
  g_current.fetch_sub(allocation->bytes);
  delete allocation;
}

class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}

  // LibTorch 2.3 made allocate() non-const and added copy_data(); support both generations.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  c10::DataPtr allocate(size_t bytes) override { return allocate_counted(bytes); }
  void copy_data(void* destination, const void* source, std::size_t count) const override {
    default_copy_data(destination, source, count);
  }
#else
  c10::DataPtr allocate(size_t bytes) const override { return allocate_counted(bytes); }
#endif
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

 private:
  c10::DataPtr allocate_counted(size_t bytes) const {
    c10::DataPtr inner = inner_->allocate(bytes);
    void* data = inner.get();
    const c10::Device device = inner.device();
    auto* allocation = new CountedAllocation{std::move(inner), static_cast<int64_t>(bytes)};
    note_allocation(static_cast<int64_t>(bytes));
    return c10::DataPtr(data, allocation, &release, device);
  }
  c10::Allocator* inner_;
};

}  // namespace

void MemoryCounter::install() {
  if (g_installed.exchange(true)) return;
  static CountingAllocator allocator(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&allocator, /*priority=*/100);
}
bool MemoryCounter::installed() { return g_installed.load(); }
int64_t MemoryCounter::current_bytes() { return g_current.load(); }
int64_t MemoryCounter::peak_bytes() { return g_peak.load(); }
void MemoryCounter::reset_peak() { g_peak.store(g_current.load()); }

std::string MemoryReport::to_record() const {
  std::ostringstream out;
  out << rank << ' ' << quantized_weights << ' ' << replicated_parameters << ' ' << adapters << ' ' << gradients
      << ' ' << optimizer_state << ' ' << gather_buffers << ' ' << forward_activation_peak << ' '
      << backward_activation_peak << ' ' << peak_total;
  return out.str();
}

MemoryReport MemoryReport::from_record(const std::string& record) {
  MemoryReport report;
  std::istringstream in(record);
  in >> report.rank >> report.quantized_weights >> report.replicated_parameters >> report.adapters >>
      report.gradients >> report.optimizer_state >> report.gather_buffers >> report.forward_activation_peak >>
      report.backward_activation_peak >> report.peak_total;
  return report;
}

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
      std::snprintf(cell, sizeof cell, " %13s", log::format_bytes(value_of(column)).c_str());
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
  shard::Json::Array ranks;
  for (const auto& report : reports) {
    shard::Json entry;
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
  shard::Json root;
  root["measured_by"] = "counting CPU allocator (LibTorch tensors)";
  root["ranks"] = ranks;
  return root.dump(2) + "\n";
}

std::vector<MemoryReport> gather_memory_reports(Communicator& communicator, const MemoryReport& report) {
  std::vector<MemoryReport> reports;
  for (const auto& record : communicator.gather_to_root(report.to_record()))
    reports.push_back(MemoryReport::from_record(record));
  return reports;
}

}  // namespace qlora::cluster
