// Counting, caching CPU allocator for LibTorch, and the per-rank figures ranks send to rank 0.
//
// Why a cache: a training step allocates and frees the same large activation buffers every time.
// glibc hands blocks above its mmap threshold back to the kernel on free, so each step faulted in
// and zeroed fresh pages again - 11% of a 2-rank training profile was the kernel clearing pages.
// Freed blocks of 64 KiB and more are therefore kept by size and handed out again. The cache never
// lets the live plus cached bytes exceed the highest live total seen so far by more than 10% (it
// evicts the least recently freed first). QLORA_ALLOCATOR_CACHE=0 turns it off.
#include "cluster/memory.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>


namespace qlora::cluster {
namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_lifetime_peak{0};  // never reset: the cache's bound
std::atomic<bool> g_installed{false};

void raise_to(std::atomic<int64_t>& peak_value, int64_t now) {
  int64_t peak = peak_value.load();
  while (now > peak && !peak_value.compare_exchange_weak(peak, now)) {
  }
}

void note_allocation(int64_t bytes) {
  const int64_t now = g_current.fetch_add(bytes) + bytes;
  raise_to(g_peak, now);
  raise_to(g_lifetime_peak, now);
}

constexpr size_t kSmallestCachedBytes = 64 * 1024;
// Live plus cached bytes may reach this multiple of the highest live total. With no headroom a
// checkpointed step's shifting buffer sizes made the cache evict and re-fault 2.9 GB per step (from a
// recorded allocation trace of the SmolLM2-shape benchmark); 10% brought that to 0.14 GB.
constexpr double kCacheHeadroom = 1.10;

// Freed blocks waiting for a request of the same size; the least recently freed go first.
class BlockCache {
 public:
  bool enabled() const { return enabled_; }

  // A cached block of exactly `bytes` (the most recently freed one), or an empty DataPtr.
  c10::DataPtr take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = by_size_.find(bytes);
    if (found == by_size_.end() || found->second.empty()) return {};
    const auto entry = found->second.back();
    found->second.pop_back();
    c10::DataPtr block = std::move(entry->block);
    by_age_.erase(entry);
    cached_bytes_ -= static_cast<int64_t>(bytes);
    return block;
  }

  // Before a fresh allocation that brings the live total to `live_after`: frees the least recently
  // cached blocks until live plus cached fits the bound.
  void make_room(int64_t live_after) {
    std::vector<c10::DataPtr> evicted;  // freed after the lock is released
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto bound = std::max(static_cast<int64_t>(kCacheHeadroom * static_cast<double>(g_lifetime_peak.load())),
                                  live_after);
      while (!by_age_.empty() && live_after + cached_bytes_ > bound) {
        const auto oldest = by_age_.begin();
        auto& same_size = by_size_[oldest->bytes];
        assert(!same_size.empty() && same_size.front() == oldest);
        same_size.pop_front();
        cached_bytes_ -= static_cast<int64_t>(oldest->bytes);
        evicted.push_back(std::move(oldest->block));
        by_age_.erase(oldest);
      }
    }
  }

  void put(size_t bytes, c10::DataPtr block) {
    std::lock_guard<std::mutex> lock(mutex_);
    by_age_.push_back(Entry{bytes, std::move(block)});
    by_size_[bytes].push_back(std::prev(by_age_.end()));
    cached_bytes_ += static_cast<int64_t>(bytes);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  void release_all() {
    std::list<Entry> released;
    std::lock_guard<std::mutex> lock(mutex_);
    released.swap(by_age_);
    by_size_.clear();
    cached_bytes_ = 0;
  }

 private:
  struct Entry {
    size_t bytes;
    c10::DataPtr block;
  };
  static bool enabled_by_environment() {
    const char* value = std::getenv("QLORA_ALLOCATOR_CACHE");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }
  const bool enabled_ = enabled_by_environment();
  std::mutex mutex_;
  std::list<Entry> by_age_;  // oldest first
  std::unordered_map<size_t, std::deque<std::list<Entry>::iterator>> by_size_;  // oldest first per size
  int64_t cached_bytes_ = 0;
};

BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache;  // outlives every tensor, even static ones
  return *cache;
}

bool cacheable(size_t bytes) { return bytes >= kSmallestCachedBytes && block_cache().enabled(); }

// What the deleter needs: the wrapped allocation (freed with it, or cached) and its size.
struct CountedAllocation {
  c10::DataPtr inner;
  int64_t bytes;
};

void release(void* context) {
  auto* allocation = static_cast<CountedAllocation*>(context);
  g_current.fetch_sub(allocation->bytes);
  const auto bytes = static_cast<size_t>(allocation->bytes);
  if (cacheable(bytes)) block_cache().put(bytes, std::move(allocation->inner));
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
    c10::DataPtr inner;
    if (cacheable(bytes)) {
      inner = block_cache().take(bytes);
      if (!inner) block_cache().make_room(g_current.load() + static_cast<int64_t>(bytes));
    }
    if (!inner) inner = inner_->allocate(bytes);
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
int64_t MemoryCounter::cached_bytes() { return block_cache().cached_bytes(); }
void MemoryCounter::release_cache() { block_cache().release_all(); }
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

std::vector<MemoryReport> gather_memory_reports(Communicator& communicator, const MemoryReport& report) {
  std::vector<MemoryReport> reports;
  for (const auto& record : communicator.gather_to_root(report.to_record()))
    reports.push_back(MemoryReport::from_record(record));
  return reports;
}

}  // namespace qlora::cluster
