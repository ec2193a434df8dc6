// The numbers behind the 4-bit rounding of both bitsandbytes backends, and the rules built from them
// (see nf4.h for what differs). Header-only so the CUDA kernels (kernels/cuda/) use the very same
// thresholds as the CPU paths without linking to them.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/nf4.h"

namespace qlora::kernels::detail {

// Every rounding rule of the 4-bit codecs is "count the thresholds the scaled value is strictly
// greater than, then map that bucket to a nibble". That form vectorizes as compares and adds.
struct RoundingRule {
  float thresholds[15];  // ascending
  uint8_t nibble_of_bucket[16];
};

// bitsandbytes' NF4 table (float32), nibble 7 is exactly 0.
inline constexpr float kNf4Codes[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Thresholds of bitsandbytes' CUDA dQuantizeNF4 tree: the midpoints of adjacent codes written as
// decimals. Parsed straight to float, four of them (0, 8, 12, 14) land one ulp away from the fp32
// midpoints (c[i] + c[i+1]) / 2 the torch backend computes: the exact midpoints are float ties and
// the 16-digit decimals sit on one side of them. So the backends disagree on those four boundaries.
inline constexpr float kNf4CudaThresholds[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
    0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};

// FP4 (e2m1, bit 3 = sign) values of 0, 0.0625, 8, 12, 4, 6, 2, 3 divided by 12, written as
// bitsandbytes' CUDA lookup table writes them (each equals the fp32 quotient by 12).
inline constexpr float kFp4Codes[16] = {
    0.0f, 0.005208333333f, 0.66666667f, 1.0f, 0.33333333f, 0.5f, 0.16666667f, 0.25f,
    -0.0f, -0.005208333333f, -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f};

// The thresholds on |x| of bitsandbytes' CUDA dQuantizeFP4, in its own (truncated) decimals, and
// the magnitude bits of the code between consecutive thresholds.
inline constexpr float kFp4CudaMagnitudeThresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                                  0.4166667f,  0.583333f,  0.8333333f};
inline constexpr uint8_t kFp4MagnitudeBits[8] = {0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011};

// The order in which the torch backend sorts the FP4 table (argsort; its nibble 0 (+0) comes before
// nibble 8, which its table also holds as +0). Bucket b of the sorted table is nibble kFp4CpuOrder[b].
inline constexpr uint8_t kFp4CpuOrder[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};

// The torch backend clamps the divisor to this (a float32 subnormal) so an all-zero block scales to 0.
inline constexpr float kCpuAbsmaxFloor = 1e-38f;

// FP4 on the cuda backend, literally as the decision tree: sign from x < 0, then |x| thresholds.
inline uint8_t fp4_cuda_tree(float scaled) {
  const uint8_t sign = scaled < 0.0f ? 0b1000 : 0;
  const float magnitude = std::fabs(scaled);
  if (magnitude > 0.29166667f) {
    if (magnitude > 0.583333f) return sign | (magnitude > 0.8333333f ? 0b0011 : 0b0010);
    return sign | (magnitude > 0.4166667f ? 0b0101 : 0b0100);
  }
  if (magnitude > 0.0859375f) return sign | (magnitude > 0.20833333f ? 0b0111 : 0b0110);
  return sign | (magnitude > 0.00260417f ? 0b0001 : 0b0000);
}

inline RoundingRule make_nf4_rule(BitsandbytesBackend backend) {
  RoundingRule rule{};
  for (int i = 0; i < 15; ++i) {
    rule.thresholds[i] = backend == BitsandbytesBackend::cuda ? kNf4CudaThresholds[i]
                                                              : (kNf4Codes[i] + kNf4Codes[i + 1]) / 2.0f;
  }
  for (int i = 0; i < 16; ++i) rule.nibble_of_bucket[i] = static_cast<uint8_t>(i);
  return rule;
}

// The CUDA tree as 15 signed thresholds, so the fast path can count instead of branch. For x < 0,
// |x| > t is x < -t, i.e. not (x > -nextup(t)); x >= 0 (including -0.0) is x > -denorm_min.
inline RoundingRule make_fp4_cuda_rule() {
  RoundingRule rule{};
  const float infinity = std::numeric_limits<float>::infinity();
  for (int i = 0; i < 7; ++i) {
    rule.thresholds[i] = -std::nextafter(kFp4CudaMagnitudeThresholds[6 - i], infinity);
    rule.thresholds[8 + i] = kFp4CudaMagnitudeThresholds[i];
  }
  rule.thresholds[7] = -std::numeric_limits<float>::denorm_min();
  for (int bucket = 0; bucket < 8; ++bucket) {
    rule.nibble_of_bucket[bucket] = static_cast<uint8_t>(0b1000 | kFp4MagnitudeBits[7 - bucket]);
    rule.nibble_of_bucket[8 + bucket] = kFp4MagnitudeBits[bucket];
  }
  return rule;
}

// torch.bucketize against the fp32 midpoints of the sorted table (both zeros are +0 there).
inline RoundingRule make_fp4_cpu_rule() {
  RoundingRule rule{};
  float sorted[16];
  for (int i = 0; i < 16; ++i) sorted[i] = kFp4Codes[kFp4CpuOrder[i]] == 0.0f ? 0.0f : kFp4Codes[kFp4CpuOrder[i]];
  for (int i = 0; i < 15; ++i) rule.thresholds[i] = (sorted[i] + sorted[i + 1]) / 2.0f;
  for (int i = 0; i < 16; ++i) rule.nibble_of_bucket[i] = kFp4CpuOrder[i];
  return rule;
}

inline RoundingRule make_rounding_rule(QuantType type, BitsandbytesBackend backend) {
  if (type == QuantType::nf4) return make_nf4_rule(backend);
  return backend == BitsandbytesBackend::cuda ? make_fp4_cuda_rule() : make_fp4_cpu_rule();
}

// The nibble a NaN scaled value gets (an all-zero block on the cuda backend scales 0 by infinity):
// no comparison holds, so the CUDA FP4 tree ends at 0 and every counting rule at bucket 0.
inline uint8_t nan_nibble(QuantType type, BitsandbytesBackend backend) {
  if (type == QuantType::fp4 && backend == BitsandbytesBackend::cuda) return 0;
  return make_rounding_rule(type, backend).nibble_of_bucket[0];
}

}  // namespace qlora::kernels::detail
