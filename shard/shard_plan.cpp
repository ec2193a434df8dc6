// Block-aligned balanced partition of a quantized tensor over ranks.
#include "shard/shard_plan.h"

#include <algorithm>
#include <cassert>

#include "kernels/double_quant.h"

namespace qlora::shard {

int64_t QuantGeometry::nested_blocks() const {
  return double_quant ? kernels::nested_block_count(blocks()) : 0;
}

int64_t QuantGeometry::blocks_per_cut() const { return double_quant ? kernels::kNestedBlocksize : 1; }

int64_t QuantGeometry::stored_bytes() const {
  return code_bytes() + blocks() * absmax_bytes_per_block() + nested_blocks() * static_cast<int64_t>(sizeof(float));
}

int64_t max_world_for(const QuantGeometry& geometry) {
  return (geometry.blocks() + geometry.blocks_per_cut() - 1) / geometry.blocks_per_cut();
}

ShardRange shard_range(const QuantGeometry& geometry, int rank, int world) {
  const int64_t units = max_world_for(geometry);
  assert(world >= 1 && rank >= 0 && rank < world && world <= units);
  const int64_t base = units / world;
  const int64_t extra = units % world;
  const int64_t unit_begin = rank * base + std::min<int64_t>(rank, extra);
  const int64_t unit_end = unit_begin + base + (rank < extra ? 1 : 0);
  const int64_t per_unit = geometry.blocks_per_cut();
  ShardRange range;
  range.block_begin = unit_begin * per_unit;
  range.block_end = std::min(geometry.blocks(), unit_end * per_unit);
  range.element_begin = range.block_begin * geometry.blocksize;
  range.element_end = std::min(geometry.numel, range.block_end * geometry.blocksize);
  if (geometry.code_bits == 4) {
    range.byte_begin = range.element_begin / 2;  // blocksize is even, so this is exact
    range.byte_end = (range.element_end + 1) / 2;
  } else {
    range.byte_begin = range.element_begin;
    range.byte_end = range.element_end;
  }
  if (geometry.double_quant) {
    range.nested_begin = unit_begin;
    range.nested_end = unit_end;
  }
  return range;
}

int64_t shard_bytes(const QuantGeometry& geometry, const ShardRange& range) {
  return range.bytes() + range.blocks() * geometry.absmax_bytes_per_block() +
         range.nested_blocks() * static_cast<int64_t>(sizeof(float));
}

ShardRange shard_range(int64_t numel, int64_t blocksize, int rank, int world) {
  return shard_range(QuantGeometry{numel, blocksize}, rank, world);
}

int64_t max_world_for(int64_t numel, int64_t blocksize) { return max_world_for(QuantGeometry{numel, blocksize}); }

VocabRange vocab_range(int64_t vocab, int rank, int world) {
  assert(world >= 1 && rank >= 0 && rank < world && vocab >= world);
  const int64_t base = vocab / world;
  const int64_t remainder = vocab % world;
  VocabRange range;
  range.begin = rank * base + std::min<int64_t>(rank, remainder);
  range.end = range.begin + base + (rank < remainder ? 1 : 0);
  return range;
}

}  // namespace qlora::shard
