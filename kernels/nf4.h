// 4-bit blockwise codecs (NF4, FP4) with bitsandbytes' exact semantics: code tables, nearest-code
// rounding with ties to the lower code, element 2i in the high nibble, one fp32 absmax per block.
// Every fast path has a plain reference beside it with the same signature and bit-identical output.
#pragma once

#include <cstdint>

namespace qlora::kernels {

enum class QuantType { nf4, fp4 };

// The 16 values a nibble decodes to (before scaling by the block's absmax), index = nibble.
const float* code_table(QuantType type);

inline int64_t quant_block_count(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }
inline int64_t packed_byte_count(int64_t n) { return (n + 1) / 2; }

// packed: packed_byte_count(n) bytes; absmax: quant_block_count(n, blocksize) floats.
// An all-zero block stores absmax 0 and the code of 0.0; it dequantizes to zeros.
void quantize_4bit_reference(QuantType type, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* packed, float* absmax);
void dequantize_4bit_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                               int64_t blocksize, float* output);

// Fast paths: same contract and results as the reference ones. `packed` must start at an even
// element (any block boundary does), so a shard of whole blocks is dequantized by offsetting both
// pointers.
void quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax);
void dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                     int64_t blocksize, float* output);

}  // namespace qlora::kernels
