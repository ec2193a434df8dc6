// Sharded quantized parameters of one decoder block and their all-gather with prefetch.
// Every rank holds one flat byte segment per block: for each tensor, its slice of codes (packed 4-bit
// or int8), then its slice of absmax (fp32, or uint8 under double quantization), then its nested
// absmax under double quantization, each 8-byte aligned. Gathering concatenates the ranks' segments; a tensor is then
// read as pieces, one per rank, each a run of whole quantization blocks, so nothing is copied after
// the gather and dequantization reads straight from the gathered buffer.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cluster/communicator.h"
#include "shard/shard_plan.h"

namespace qlora::cluster {

struct QuantizedTensorSpec {
  std::string name;
  shard::QuantGeometry geometry;
  float nested_offset = 0.0f;   // double quantization: added to every decoded absmax
};

class FlatShardLayout {
 public:
  FlatShardLayout(std::vector<QuantizedTensorSpec> tensors, int world);

  int world() const { return world_; }
  const std::vector<QuantizedTensorSpec>& tensors() const { return tensors_; }
  const shard::ShardRange& range(int rank, size_t tensor) const { return ranges_[rank][tensor]; }
  int64_t segment_bytes(int rank) const { return segment_bytes_[rank]; }
  int64_t segment_offset(int rank) const { return segment_offsets_[rank]; }  // in the gathered buffer
  int64_t codes_offset(int rank, size_t tensor) const { return codes_offsets_[rank][tensor]; }   // in a segment
  int64_t absmax_offset(int rank, size_t tensor) const { return absmax_offsets_[rank][tensor]; }
  int64_t nested_offset(int rank, size_t tensor) const { return nested_offsets_[rank][tensor]; }
  int64_t gathered_bytes() const { return gathered_bytes_; }

 private:
  std::vector<QuantizedTensorSpec> tensors_;
  int world_;
  std::vector<std::vector<shard::ShardRange>> ranges_;
  std::vector<std::vector<int64_t>> codes_offsets_;
  std::vector<std::vector<int64_t>> absmax_offsets_;
  std::vector<std::vector<int64_t>> nested_offsets_;
  std::vector<int64_t> segment_bytes_;
  std::vector<int64_t> segment_offsets_;
  int64_t gathered_bytes_ = 0;
};

// One rank's run of whole quantization blocks of a tensor (whole second-level blocks under double
// quantization), inside a gathered buffer.
struct QuantizedPiece {
  const uint8_t* codes;            // packed 4-bit, or int8 for 8-bit tensors
  const float* absmax;             // fp32 absmax, or nullptr under double quantization
  const uint8_t* absmax_codes;     // double quantization: one code per block, else nullptr
  const float* nested_absmax;      // double quantization: one per 256 blocks, else nullptr
  int64_t element_begin;
  int64_t elements;
  int64_t blocks;
};

// A gathered block: every tensor readable as its per-rank pieces. Valid until the gatherer reuses
// the slot (at the earliest, two acquires later).
class GatheredBlock {
 public:
  GatheredBlock(const FlatShardLayout* layout, const uint8_t* base) : layout_(layout), base_(base) {}
  const FlatShardLayout& layout() const { return *layout_; }
  std::vector<QuantizedPiece> pieces(size_t tensor) const;

 private:
  const FlatShardLayout* layout_;
  const uint8_t* base_;
};

struct GatherStats {
  int64_t gathers = 0;          // collectives issued
  int64_t reuses = 0;           // acquires served by a block already in a slot
  int64_t bytes_received = 0;   // gathered bytes, all ranks' segments
  double wait_seconds = 0.0;    // time acquire() spent blocked on a gather (exposed communication)
};

// Owns each block's local segment and a small pool of gathered slots. acquire(i) returns block i,
// gathering it if needed; prefetch(i) starts gathering block i without waiting.
class BlockGatherer {
 public:
  BlockGatherer(Communicator& communicator, std::vector<FlatShardLayout> layouts,
                std::vector<torch::Tensor> local_segments, int slots = 2);
  ~BlockGatherer();

  size_t blocks() const { return layouts_.size(); }
  const FlatShardLayout& layout(size_t block) const { return layouts_[block]; }
  const torch::Tensor& local_segment(size_t block) const { return local_segments_[block]; }

  GatheredBlock acquire(size_t block);
  // No-op with prefetching disabled, with a single slot (it would evict the block in use), or when
  // the block is already in the pool.
  void prefetch(size_t block);
  void set_prefetch(bool enabled) { prefetch_enabled_ = enabled; }
  // Drives in-flight gathers forward. MPI has no progress thread here (OpenMPI reports none), so a
  // non-blocking gather only advances inside MPI calls; the model calls this between operations.
  void poll();
  // Bytes of the gather pool (allocated at construction so the memory report can attribute it).
  int64_t pool_bytes() const;
  const GatherStats& stats() const { return stats_; }

 private:
  struct Slot {
    torch::Tensor buffer;
    int64_t block = -1;
    std::unique_ptr<PendingCollective> pending;
    uint64_t last_use = 0;
  };
  Slot* find_slot(size_t block);
  Slot& start_gather(size_t block);

  Communicator& communicator_;
  std::vector<FlatShardLayout> layouts_;
  std::vector<torch::Tensor> local_segments_;
  std::vector<Slot> slots_;
  uint64_t clock_ = 0;
  int64_t pinned_block_ = -1;   // the block last acquired: never evicted by a prefetch
  bool prefetch_enabled_ = true;
  GatherStats stats_;
};

}  // namespace qlora::cluster
