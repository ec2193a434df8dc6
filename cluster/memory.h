// Measured memory per rank: a counting (and block-caching) wrapper around LibTorch's CPU allocator
// (every tensor's bytes, current and peak), and the per-rank figures rank 0 gathers
// (cluster/memory_report.h turns them into the table and memory.json).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cluster/communicator.h"

namespace qlora::cluster {

class MemoryCounter {
 public:
  // Installs the counting allocator as LibTorch's CPU allocator (idempotent). Tensors allocated
  // before installation are not counted.
  static void install();
  static bool installed();
  static int64_t current_bytes();
  static int64_t peak_bytes();
  static void reset_peak();   // peak := current
  // Freed blocks the allocator keeps for reuse (not counted in current_bytes). Live plus cached
  // stays within 110% of the highest live total reached (or the live total, when that is higher).
  static int64_t cached_bytes();
  static void release_cache();
};

// The measured figures of one rank. Every value is a difference of allocator readings taken
// around the phase it names.
struct MemoryReport {
  int rank = 0;
  int64_t quantized_weights = 0;     // this rank's 4-bit shards (codes + absmax)
  int64_t replicated_parameters = 0; // norms, embeddings, LM head after preparation
  int64_t adapters = 0;              // LoRA A and B
  int64_t gradients = 0;             // adapter gradients (incl. the flat reduction buffer)
  int64_t optimizer_state = 0;       // AdamW moments
  int64_t gather_buffers = 0;        // pool of gathered 4-bit blocks
  int64_t forward_activation_peak = 0;   // peak above the resident state during forward
  int64_t backward_activation_peak = 0;  // peak above the resident state during backward
  int64_t peak_total = 0;            // the allocator's peak over the whole run

  std::string to_record() const;     // one line, for gather_to_root
  static MemoryReport from_record(const std::string& record);
};

// Collective: every rank passes its report, rank 0 gets them all (others get {}).
std::vector<MemoryReport> gather_memory_reports(Communicator& communicator, const MemoryReport& report);

}  // namespace qlora::cluster
