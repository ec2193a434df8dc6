// Double quantization of the 4-bit absmax values (bitsandbytes' compress_statistics, QLoRA's
// "double quant"): offset = mean(absmax); absmax - offset quantized blockwise (256 per block) to 8
// bits with bitsandbytes' signed dynamic map; reconstruction code[q] * nested_absmax + offset.
//
// The two bitsandbytes backends pick the 8-bit code differently (see nf4.h for the names):
// - cuda: x * (1.0f / block_absmax), then kernels.cu's dQuantize: a 7-step descent from index 127
//   and a final fp32 midpoint test whose exact ties go to the index the descent ended on.
// - cpu: x * (1.0f / block_absmax) looked up in a 65536-entry table over [-1, 1]
//   (index = trunc(((x + 1) * 0.5) * 65535 + 0.5), entry = nearest code by fp32 midpoints of the
//   grid value), so values within 1.5e-5 of each other share a code and some codes near 0 are
//   unreachable. An all-zero block stores absmax 0 and codes 0.
// Reconstruction is the same everywhere: float(code[q] * nested_absmax) + offset, two roundings.
#pragma once

#include <cstdint>

#include "kernels/nf4.h"

namespace qlora::kernels {

constexpr int64_t kNestedBlocksize = 256;

// bitsandbytes' create_dynamic_map(signed=True): 256 ascending fp32 values, index 127 is 0 and
// index 255 is 1; index 0 is -0.99296875 (not -1).
const float* dynamic_map();

inline int64_t nested_block_count(int64_t absmax_count) {
  return (absmax_count + kNestedBlocksize - 1) / kNestedBlocksize;
}

// mean(absmax) as torch computes it in fp32: the sum rounded to fp32, then divided by the count.
// (The sum is taken in double; torch's pairwise fp32 sum agrees except in the last bit of rare sums,
// so importers read the stored nested_offset instead of recomputing it.)
float absmax_offset(const float* absmax, int64_t count);

// General blockwise 8-bit codec with a 256-entry ascending code table.
// codes: n bytes; block_absmax: ceil(n / blocksize) floats.
void quantize_8bit_blockwise(const float* code, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* codes, float* block_absmax,
                             BitsandbytesBackend backend = BitsandbytesBackend::cuda);
void dequantize_8bit_blockwise(const float* code, const uint8_t* codes, const float* block_absmax, int64_t n,
                               int64_t blocksize, float* output);

// The nested quantization of `count` absmax values with a given offset:
// codes: count bytes; nested_absmax: nested_block_count(count) floats.
void quantize_absmax(const float* absmax, int64_t count, float offset, uint8_t* codes, float* nested_absmax,
                     BitsandbytesBackend backend = BitsandbytesBackend::cuda);
// absmax[i] = dynamic_map()[codes[i]] * nested_absmax[i / 256] + offset.
void dequantize_absmax(const uint8_t* codes, const float* nested_absmax, float offset, int64_t count,
                       float* absmax);

}  // namespace qlora::kernels
