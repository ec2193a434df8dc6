// Scalar reference and table-driven fast paths of the 4-bit codecs declared in nf4.h.
#include "kernels/nf4.h"

#include <algorithm>
#include <cmath>

namespace qlora::kernels {
namespace {

// bitsandbytes' NF4 table (float32), nibble 7 is exactly 0.
constexpr float kNf4Codes[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Midpoints between adjacent NF4 codes; a value equal to a midpoint takes the lower code.
constexpr float kNf4Midpoints[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
    0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};

// bitsandbytes' FP4 (e2m1, bit 3 = sign) values divided by 12 so that the largest magnitude is 1.
constexpr float kFp4Codes[16] = {
    0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f,
    3.0f / 12.0f, -0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, -4.0f / 12.0f,
    -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f};

uint8_t nearest_nf4(float scaled) {
  int code = 0;
  for (float midpoint : kNf4Midpoints) code += scaled > midpoint ? 1 : 0;
  return static_cast<uint8_t>(code);
}

// FP4 rounding as bitsandbytes' dQuantizeFP4 decision tree (sign bit, then magnitude thresholds).
uint8_t nearest_fp4(float scaled) {
  uint8_t sign = scaled < 0.0f ? 0b1000 : 0;
  float x = std::fabs(scaled);
  if (x > 0.29166667f) {
    if (x > 0.583333f) return sign | (x > 0.8333333f ? 0b0011 : 0b0010);
    return sign | (x > 0.4166667f ? 0b0101 : 0b0100);
  }
  if (x > 0.0859375f) return sign | (x > 0.20833333f ? 0b0111 : 0b0110);
  return sign | (x > 0.00260417f ? 0b0001 : 0b0000);
}

uint8_t nearest_code(QuantType type, float scaled) {
  return type == QuantType::nf4 ? nearest_nf4(scaled) : nearest_fp4(scaled);
}

void quantize_blocks(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                     float* absmax) {
  const int64_t blocks = quant_block_count(n, blocksize);
  std::fill(packed, packed + packed_byte_count(n), uint8_t{0});
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    float block_max = 0.0f;
    for (int64_t i = begin; i < end; ++i) block_max = std::max(block_max, std::fabs(input[i]));
    absmax[block] = block_max;
    const float inverse = block_max > 0.0f ? 1.0f / block_max : 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t code = nearest_code(type, input[i] * inverse);
      packed[i / 2] |= (i % 2 == 0) ? static_cast<uint8_t>(code << 4) : code;
    }
  }
}

}  // namespace

const float* code_table(QuantType type) { return type == QuantType::nf4 ? kNf4Codes : kFp4Codes; }

void quantize_4bit_reference(QuantType type, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* packed, float* absmax) {
  quantize_blocks(type, input, n, blocksize, packed, absmax);
}

void dequantize_4bit_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                               int64_t blocksize, float* output) {
  const float* codes = code_table(type);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t nibble = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
    output[i] = codes[nibble] * absmax[i / blocksize];
  }
}

void quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax) {
  quantize_blocks(type, input, n, blocksize, packed, absmax);
}

void dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                     int64_t blocksize, float* output) {
  // One byte decodes two elements; blocks are even-sized so a byte never straddles two blocks.
  const float* codes = code_table(type);
  const int64_t blocks = quant_block_count(n, blocksize);
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float scale = absmax[block];
    int64_t i = begin;
    for (; i + 1 < end; i += 2) {
      const uint8_t byte = packed[i / 2];
      output[i] = codes[byte >> 4] * scale;
      output[i + 1] = codes[byte & 0x0f] * scale;
    }
    if (i < end) output[i] = codes[packed[i / 2] >> 4] * scale;
  }
}

}  // namespace qlora::kernels
