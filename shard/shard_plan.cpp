// Block-aligned balanced partition of a quantized tensor over ranks.
#include "shard/shard_plan.h"

#include <algorithm>
#include <cassert>

#include "kernels/nf4.h"

namespace qlora::shard {

int64_t max_world_for(int64_t numel, int64_t blocksize) { return kernels::quant_block_count(numel, blocksize); }

ShardRange shard_range(int64_t numel, int64_t blocksize, int rank, int world) {
  const int64_t blocks = kernels::quant_block_count(numel, blocksize);
  assert(world >= 1 && rank >= 0 && rank < world && world <= blocks);
  const int64_t base = blocks / world;
  const int64_t extra = blocks % world;
  ShardRange range;
  range.block_begin = rank * base + std::min<int64_t>(rank, extra);
  range.block_end = range.block_begin + base + (rank < extra ? 1 : 0);
  range.element_begin = range.block_begin * blocksize;
  range.element_end = std::min(numel, range.block_end * blocksize);
  range.byte_begin = range.element_begin / 2;  // blocksize is even, so this is exact
  range.byte_end = kernels::packed_byte_count(range.element_end);
  return range;
}

}  // namespace qlora::shard
