// Which part of each quantized tensor (and of the vocabulary) a rank owns: FSDP-style flat sharding cut at quantization-block
// boundaries (and, under double quantization, at the boundaries of the second-level blocks of 256
// absmax values, so every rank's nested absmax are its own), balanced so ranks differ by at most one
// cut unit. Every layer that moves shard bytes (store reads, gathers, the planner) derives offsets
// from here and nowhere else.
#pragma once

#include <cstdint>
#include <string>

namespace qlora::shard {

// How a quantized tensor is stored (docs/FORMAT.md), which decides where it may be cut.
struct QuantGeometry {
  int64_t numel = 0;
  int64_t blocksize = 64;      // elements per absmax: a 4-bit block, or one row of an int8 weight
  int code_bits = 4;           // 4: two codes per byte (high nibble first); 8: one int8 code per element
  bool double_quant = false;   // absmax as uint8 codes plus one fp32 nested absmax per 256 of them

  int64_t blocks() const { return (numel + blocksize - 1) / blocksize; }
  int64_t code_bytes() const { return code_bits == 4 ? (numel + 1) / 2 : numel; }
  int64_t nested_blocks() const;                       // 0 without double quantization
  int64_t blocks_per_cut() const;                      // 256 under double quantization, else 1
  int64_t absmax_bytes_per_block() const { return double_quant ? 1 : 4; }
  int64_t stored_bytes() const;                        // codes + absmax (+ nested absmax)
};

struct ShardRange {
  int64_t block_begin = 0;    // quantization blocks [block_begin, block_end)
  int64_t block_end = 0;
  int64_t element_begin = 0;  // elements of the flattened tensor
  int64_t element_end = 0;
  int64_t byte_begin = 0;     // code bytes (packed 4-bit, or int8)
  int64_t byte_end = 0;
  int64_t nested_begin = 0;   // second-level blocks under double quantization, else [0, 0)
  int64_t nested_end = 0;

  int64_t blocks() const { return block_end - block_begin; }
  int64_t elements() const { return element_end - element_begin; }
  int64_t bytes() const { return byte_end - byte_begin; }
  int64_t nested_blocks() const { return nested_end - nested_begin; }
};

// Precondition (asserted): 0 <= rank < world <= max_world_for(geometry); check with it first.
ShardRange shard_range(const QuantGeometry& geometry, int rank, int world);
// Bytes of the store a rank reads for its range: codes, absmax and nested absmax.
int64_t shard_bytes(const QuantGeometry& geometry, const ShardRange& range);
// The largest world size a tensor can be sharded over (its number of cut units).
int64_t max_world_for(const QuantGeometry& geometry);

// The vocabulary rows [begin, end) of the input embedding and LM head a rank holds: a balanced cut
// (ranks differ by at most one row, the lower ranks take the remainder). Precondition (asserted):
// 0 <= rank < world <= vocab, so every rank owns at least one row.
struct VocabRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t rows() const { return end - begin; }
};
VocabRange vocab_range(int64_t vocab, int rank, int world);

// 4-bit, plain fp32 absmax (format version 1 stores).
ShardRange shard_range(int64_t numel, int64_t blocksize, int rank, int world);
int64_t max_world_for(int64_t numel, int64_t blocksize);

}  // namespace qlora::shard
