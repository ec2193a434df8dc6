// Scalar reference of the 4-bit codecs declared in nf4.h. Written for clarity: one element at a time,
// FP4 on the cuda backend through bitsandbytes' literal decision tree (rounding_rules.h).
#include "kernels/nf4.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/codec_detail.h"

namespace qlora::kernels {

using detail::kFp4Codes;
using detail::kNf4Codes;

uint8_t detail::round_reference(QuantType type, BitsandbytesBackend backend, float scaled) {
  if (type == QuantType::fp4 && backend == BitsandbytesBackend::cuda) return fp4_cuda_tree(scaled);
  return detail::round_with_rule(detail::rounding_rule(type, backend), scaled);
}

namespace {

template <typename Convert>
void dequantize_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, Convert convert) {
  const float* codes = code_table(type);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t nibble = (i % 2 == 0) ? (byte >> 4) : (byte & 0x0f);
    convert(i, codes[nibble] * absmax[i / blocksize]);
  }
}

}  // namespace

namespace detail {

const RoundingRule& rounding_rule(QuantType type, BitsandbytesBackend backend) {
  static const RoundingRule nf4_cuda = make_rounding_rule(QuantType::nf4, BitsandbytesBackend::cuda);
  static const RoundingRule nf4_cpu = make_rounding_rule(QuantType::nf4, BitsandbytesBackend::cpu);
  static const RoundingRule fp4_cuda = make_rounding_rule(QuantType::fp4, BitsandbytesBackend::cuda);
  static const RoundingRule fp4_cpu = make_rounding_rule(QuantType::fp4, BitsandbytesBackend::cpu);
  if (type == QuantType::nf4) return backend == BitsandbytesBackend::cuda ? nf4_cuda : nf4_cpu;
  return backend == BitsandbytesBackend::cuda ? fp4_cuda : fp4_cpu;
}

BlockScale block_scale(float block_max, bool partial, BitsandbytesBackend backend) {
  if (backend == BitsandbytesBackend::cuda) return {block_max, 1.0f / block_max, false};
  const float clamped = std::max(block_max, kCpuAbsmaxFloor);
  if (partial) return {clamped, clamped, true};
  return {block_max, 1.0f / clamped, false};
}

void quantize_block_reference(QuantType type, BitsandbytesBackend backend, const float* input,
                              int64_t begin, int64_t end, bool partial, uint8_t* packed, float* absmax_slot) {
  float block_max = 0.0f;
  for (int64_t i = begin; i < end; ++i) block_max = std::fmax(block_max, std::fabs(input[i]));
  const BlockScale scale = block_scale(block_max, partial, backend);
  *absmax_slot = scale.stored_absmax;
  for (int64_t i = begin; i < end; ++i) {
    const float scaled = scale.divide ? input[i] / scale.factor : input[i] * scale.factor;
    const uint8_t nibble = round_reference(type, backend, scaled);
    if ((i - begin) % 2 == 0) {
      packed[i / 2] = static_cast<uint8_t>(nibble << 4);
    } else {
      packed[i / 2] |= nibble;
    }
  }
  if ((end - begin) % 2 != 0) packed[(end - 1) / 2] |= padding_nibble(type, backend, scale);
}

uint8_t padding_nibble(QuantType type, BitsandbytesBackend backend, const BlockScale& scale) {
  // The CUDA kernel loads the missing element as 0 and scales it; the torch backend pads after scaling.
  const float scaled = backend == BitsandbytesBackend::cuda ? 0.0f * scale.factor : 0.0f;
  return round_reference(type, backend, scaled);
}

}  // namespace detail

const float* code_table(QuantType type) { return type == QuantType::nf4 ? kNf4Codes : kFp4Codes; }

void quantize_4bit_reference(QuantType type, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* packed, float* absmax, BitsandbytesBackend backend) {
  const int64_t blocks = quant_block_count(n, blocksize);
  if (blocksize % 2 != 0) {
    // Bytes straddle blocks; quantize each element into a zeroed buffer one nibble at a time.
    std::fill(packed, packed + packed_byte_count(n), uint8_t{0});
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t begin = block * blocksize;
      const int64_t end = std::min(n, begin + blocksize);
      float block_max = 0.0f;
      for (int64_t i = begin; i < end; ++i) block_max = std::fmax(block_max, std::fabs(input[i]));
      const auto scale = detail::block_scale(block_max, end - begin < blocksize, backend);
      absmax[block] = scale.stored_absmax;
      for (int64_t i = begin; i < end; ++i) {
        const float scaled = scale.divide ? input[i] / scale.factor : input[i] * scale.factor;
        const uint8_t nibble = detail::round_reference(type, backend, scaled);
        packed[i / 2] |= (i % 2 == 0) ? static_cast<uint8_t>(nibble << 4) : nibble;
      }
      if (end == n && n % 2 != 0) packed[n / 2] |= detail::padding_nibble(type, backend, scale);
    }
    return;
  }
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    detail::quantize_block_reference(type, backend, input, begin, end, end - begin < blocksize, packed,
                                      &absmax[block]);
  }
}

void quantize_4bit_reference(QuantType type, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* packed, float* absmax) {
  quantize_4bit_reference(type, input, n, blocksize, packed, absmax, BitsandbytesBackend::cuda);
}

void dequantize_4bit_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                               int64_t blocksize, float* output) {
  dequantize_reference(type, packed, absmax, n, blocksize, [&](int64_t i, float value) { output[i] = value; });
}

void dequantize_4bit_bf16_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                    int64_t blocksize, uint16_t* output) {
  dequantize_reference(type, packed, absmax, n, blocksize,
                       [&](int64_t i, float value) { output[i] = float_to_bf16(value); });
}

void dequantize_4bit_fp16_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                    int64_t blocksize, uint16_t* output) {
  dequantize_reference(type, packed, absmax, n, blocksize,
                       [&](int64_t i, float value) { output[i] = float_to_fp16(value); });
}

}  // namespace qlora::kernels
