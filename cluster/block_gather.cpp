// Flat shard layout arithmetic and the slot pool behind BlockGatherer.
#include "cluster/block_gather.h"

#include <algorithm>
#include <cassert>
#include <chrono>

#include "kernels/nf4.h"

namespace qlora::cluster {
namespace {
int64_t align8(int64_t value) { return (value + 7) & ~int64_t{7}; }
}  // namespace

FlatShardLayout::FlatShardLayout(std::vector<QuantizedTensorSpec> tensors, int world)
    : tensors_(std::move(tensors)), world_(world) {
  ranges_.resize(world);
  codes_offsets_.resize(world);
  absmax_offsets_.resize(world);
  nested_offsets_.resize(world);
  segment_bytes_.resize(world);
  segment_offsets_.resize(world);
  for (int rank = 0; rank < world; ++rank) {
    int64_t offset = 0;
    for (const auto& tensor : tensors_) {
      const shard::ShardRange range = shard::shard_range(tensor.geometry, rank, world);
      ranges_[rank].push_back(range);
      codes_offsets_[rank].push_back(offset);
      offset = align8(offset + range.bytes());
      absmax_offsets_[rank].push_back(offset);
      offset = align8(offset + range.blocks() * tensor.geometry.absmax_bytes_per_block());
      nested_offsets_[rank].push_back(offset);
      offset = align8(offset + range.nested_blocks() * static_cast<int64_t>(sizeof(float)));
    }
    segment_bytes_[rank] = offset;
    segment_offsets_[rank] = gathered_bytes_;
    gathered_bytes_ += offset;
  }
}

std::vector<QuantizedPiece> GatheredBlock::pieces(size_t tensor) const {
  std::vector<QuantizedPiece> result;
  for (int rank = 0; rank < layout_->world(); ++rank) {
    const shard::ShardRange& range = layout_->range(rank, tensor);
    if (range.elements() == 0) continue;
    const uint8_t* segment = base_ + layout_->segment_offset(rank);
    const bool nested = layout_->tensors()[tensor].geometry.double_quant;
    const uint8_t* absmax = segment + layout_->absmax_offset(rank, tensor);
    result.push_back({segment + layout_->codes_offset(rank, tensor),
                      nested ? nullptr : reinterpret_cast<const float*>(absmax), nested ? absmax : nullptr,
                      nested ? reinterpret_cast<const float*>(segment + layout_->nested_offset(rank, tensor)) : nullptr,
                      range.element_begin, range.elements(), range.blocks()});
  }
  return result;
}

BlockGatherer::BlockGatherer(Communicator& communicator, std::vector<FlatShardLayout> layouts,
                             std::vector<torch::Tensor> local_segments, int slots)
    : communicator_(communicator), layouts_(std::move(layouts)), local_segments_(std::move(local_segments)) {
  assert(layouts_.size() == local_segments_.size());
  if (communicator_.size() == 1) return;  // a single rank holds every byte already: no pool
  int64_t largest = 0;
  for (const auto& layout : layouts_) largest = std::max(largest, layout.gathered_bytes());
  slots_.resize(static_cast<size_t>(std::max(1, slots)));
  for (auto& slot : slots_) slot.buffer = torch::empty({largest}, torch::kUInt8);
}

BlockGatherer::~BlockGatherer() {
  for (auto& slot : slots_)
    if (slot.pending) slot.pending->wait();
}

int64_t BlockGatherer::pool_bytes() const {
  int64_t total = 0;
  for (const auto& slot : slots_) total += slot.buffer.numel();
  return total;
}

BlockGatherer::Slot* BlockGatherer::find_slot(size_t block) {
  for (auto& slot : slots_)
    if (slot.block == static_cast<int64_t>(block)) return &slot;
  return nullptr;
}

BlockGatherer::Slot& BlockGatherer::start_gather(size_t block) {
  // Evict the least recently used slot that is not the block currently in use.
  Slot* victim = nullptr;
  for (auto& slot : slots_) {
    if (pinned_block_ >= 0 && slot.block == pinned_block_ && slots_.size() > 1) continue;
    if (victim == nullptr || slot.last_use < victim->last_use) victim = &slot;
  }
  assert(victim != nullptr);
  if (victim->pending) victim->pending->wait();
  const FlatShardLayout& layout = layouts_[block];
  std::vector<int64_t> counts(layout.world());
  for (int rank = 0; rank < layout.world(); ++rank) counts[rank] = layout.segment_bytes(rank);
  victim->block = static_cast<int64_t>(block);
  victim->last_use = ++clock_;
  victim->pending = communicator_.all_gather_async(local_segments_[block].data_ptr<uint8_t>(),
                                                   victim->buffer.data_ptr<uint8_t>(), counts);
  ++stats_.gathers;
  stats_.bytes_received += layout.gathered_bytes();
  return *victim;
}

void BlockGatherer::prefetch(size_t block) {
  if (!prefetch_enabled_ || slots_.size() < 2 || block >= layouts_.size() || find_slot(block) != nullptr) return;
  start_gather(block);
}

void BlockGatherer::poll() {
  for (auto& slot : slots_)
    if (slot.pending) slot.pending->test();
}

GatheredBlock BlockGatherer::acquire(size_t block) {
  assert(block < layouts_.size());
  if (communicator_.size() == 1) return GatheredBlock(&layouts_[block], local_segments_[block].data_ptr<uint8_t>());
  Slot* slot = find_slot(block);
  if (slot == nullptr)
    slot = &start_gather(block);
  else if (!slot->pending)
    ++stats_.reuses;
  if (slot->pending) {
    const auto start = std::chrono::steady_clock::now();
    slot->pending->wait();
    slot->pending.reset();
    stats_.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  slot->last_use = ++clock_;
  pinned_block_ = static_cast<int64_t>(block);
  return GatheredBlock(&layouts_[block], slot->buffer.data_ptr<uint8_t>());
}

}  // namespace qlora::cluster
