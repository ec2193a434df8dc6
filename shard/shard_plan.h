// Which part of each quantized tensor a rank owns: FSDP-style flat sharding cut at quantization-block
// boundaries, balanced so ranks differ by at most one block. Every layer that moves shard bytes
// (store reads, gathers, the planner) derives offsets from here and nowhere else.
#pragma once

#include <cstdint>
#include <string>

namespace qlora::shard {

struct ShardRange {
  int64_t block_begin = 0;    // quantization blocks [block_begin, block_end)
  int64_t block_end = 0;
  int64_t element_begin = 0;  // elements of the flattened tensor
  int64_t element_end = 0;
  int64_t byte_begin = 0;     // packed 4-bit code bytes
  int64_t byte_end = 0;

  int64_t blocks() const { return block_end - block_begin; }
  int64_t elements() const { return element_end - element_begin; }
  int64_t bytes() const { return byte_end - byte_begin; }
};

// Precondition (asserted): 0 <= rank < world <= block count; check with world_fits first.
ShardRange shard_range(int64_t numel, int64_t blocksize, int rank, int world);

// The largest world size a tensor of numel elements can be sharded over (its block count).
int64_t max_world_for(int64_t numel, int64_t blocksize);

}  // namespace qlora::shard
