// Internals shared by the 4-bit reference (nf4.cpp) and the fast paths (nf4_fast.cpp): rounding rules
// as sorted thresholds, block scaling per bitsandbytes backend. Not part of the public API.
#pragma once

#include <cstdint>

#include "kernels/nf4.h"
#include "kernels/rounding_rules.h"

namespace qlora::kernels::detail {

// Forces `value` to be rounded to fp32 where it stands: with -march=native the compiler could
// otherwise fuse the multiply before it with a later add (FMA), which bitsandbytes does not do.
inline float rounded(float value) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(value));
#elif defined(__GNUC__)
  asm("" : "+r"(value));
#else
  volatile float barrier = value;
  value = barrier;
#endif
  return value;
}

// Built once per (type, backend).
const RoundingRule& rounding_rule(QuantType type, BitsandbytesBackend backend);

// bucket -> nibble through the rule; NaN lands in bucket 0 (no comparison holds).
inline uint8_t round_with_rule(const RoundingRule& rule, float scaled) {
  int bucket = 0;
  for (float threshold : rule.thresholds) bucket += scaled > threshold ? 1 : 0;
  return rule.nibble_of_bucket[bucket];
}

// How one block is brought to [-1, 1]. `stored_absmax` is what the absmax array receives.
struct BlockScale {
  float stored_absmax;
  float factor;   // multiply by it, unless divide is set
  bool divide;    // the cpu backend divides its last, partial block by stored_absmax
};

// block_max: max |x| over the block; partial: the block is the last and shorter than blocksize.
BlockScale block_scale(float block_max, bool partial, BitsandbytesBackend backend);

// The nibble of one scaled value, as the reference rounds it (FP4 on cuda through the literal tree).
uint8_t round_reference(QuantType type, BitsandbytesBackend backend, float scaled);

// bitsandbytes pads an odd element count with a 0 whose nibble fills the last byte's low half.
uint8_t padding_nibble(QuantType type, BitsandbytesBackend backend, const BlockScale& scale);

// The scalar reference for one block [begin, end) of the input, writing whole bytes of `packed`
// (begin is even). Used by the reference and by the fast paths for blocks they leave to it.
void quantize_block_reference(QuantType type, BitsandbytesBackend backend, const float* input,
                              int64_t begin, int64_t end, bool partial, uint8_t* packed, float* absmax_slot);

}  // namespace qlora::kernels::detail
