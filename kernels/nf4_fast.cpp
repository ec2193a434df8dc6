// Fast paths of the 4-bit codecs (nf4.h): AVX2 kernels chosen at run time, a scalar fallback, and the
// split of large tensors over the kernel thread pool. The file compiles without -mavx2: only the
// functions marked QLORA_AVX2 use those instructions, and only after the CPU said it has them.
// Results are bit-identical to the reference (nf4.cpp) because every value goes through the same IEEE
// operations: one multiply (or divide) per element, compares against the same fp32 thresholds.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels/codec_detail.h"
#include "kernels/dtype.h"
#include "kernels/nf4.h"
#include "kernels/parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QLORA_HAVE_X86 1
// No "fma": the compiler must not fuse a multiply and an add the reference rounds separately.
#define QLORA_AVX2 __attribute__((target("avx2,f16c")))
#else
#define QLORA_HAVE_X86 0
#endif

namespace qlora::kernels {
namespace {

// Below this many elements a tensor is not worth waking other threads for.
constexpr int64_t kMinElementsPerChunk = 64 * 1024;
// Outputs larger than a last-level cache slice bypass the caches (non-temporal stores): they cannot
// stay cached anyway, and skipping the read-for-ownership of each destination line saves a third of
// the traffic. Smaller outputs are stored normally so the matrix product that reads them finds them
// in cache. Measured on this project's machines (32 MiB L3 per core complex; sysconf reports the whole
// socket's, so it is not asked): streaming a 16 MiB output halves the store rate, a 64 MiB one gains 30%.
constexpr int64_t kStreamingOutputBytes = int64_t{32} << 20;

SimdLevel detect_simd_level() {
#if QLORA_HAVE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return SimdLevel::avx2;
#endif
  return SimdLevel::scalar;
}

std::atomic<int> chosen_level{-1};

bool use_avx2() { return simd_level() == SimdLevel::avx2; }

bool aligned_to(const void* pointer, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

// ---- scalar fast paths: a per-block table instead of a multiply per element -----------------------

template <typename Output, typename Convert>
void dequantize_blocks_scalar(const float* codes, const uint8_t* packed, const float* absmax, int64_t n,
                              int64_t blocksize, int64_t first_block, int64_t last_block, Output* output,
                              Convert convert) {
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    Output table[16];
    for (int k = 0; k < 16; ++k) table[k] = convert(codes[k] * absmax[block]);
    int64_t i = begin;
    for (; i + 1 < end; i += 2) {
      const uint8_t byte = packed[i / 2];
      output[i] = table[byte >> 4];
      output[i + 1] = table[byte & 0x0f];
    }
    if (i < end) output[i] = table[packed[i / 2] >> 4];
  }
}

#if QLORA_HAVE_X86

// ---- AVX2 dequantization ---------------------------------------------------------------------------

// 16 nibbles of 8 packed bytes, in element order (high nibble first), one per byte.
QLORA_AVX2 static inline __m128i unpack_nibbles(__m128i bytes) {
  const __m128i low_mask = _mm_set1_epi8(0x0f);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
  const __m128i low = _mm_and_si128(bytes, low_mask);
  return _mm_unpacklo_epi8(high, low);
}

// table[index] for 8 lanes of a 16-entry fp32 table held in two registers.
QLORA_AVX2 static inline __m256 lookup16(__m256 table_low, __m256 table_high, __m256i index) {
  const __m256 from_low = _mm256_permutevar8x32_ps(table_low, index);
  const __m256 from_high = _mm256_permutevar8x32_ps(table_high, index);
  const __m256 take_high = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
  return _mm256_blendv_ps(from_low, from_high, take_high);
}

QLORA_AVX2 static inline void store8(float* destination, __m256 values, bool stream) {
  if (stream) {
    _mm_stream_ps(destination, _mm256_castps256_ps128(values));
    _mm_stream_ps(destination + 4, _mm256_extractf128_ps(values, 1));
  } else {
    _mm256_storeu_ps(destination, values);
  }
}

QLORA_AVX2 void dequantize_blocks_f32_avx2(const float* codes, const uint8_t* packed, const float* absmax,
                                           int64_t n, int64_t blocksize, int64_t first_block,
                                           int64_t last_block, float* output, bool stream) {
  const __m256 codes_low = _mm256_loadu_ps(codes);
  const __m256 codes_high = _mm256_loadu_ps(codes + 8);
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const float scale = absmax[block];
    const __m256 scale_vector = _mm256_set1_ps(scale);
    const __m256 table_low = _mm256_mul_ps(codes_low, scale_vector);
    const __m256 table_high = _mm256_mul_ps(codes_high, scale_vector);
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
      const __m128i nibbles =
          unpack_nibbles(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2)));
      store8(output + i, lookup16(table_low, table_high, _mm256_cvtepu8_epi32(nibbles)), stream);
      store8(output + i + 8, lookup16(table_low, table_high, _mm256_cvtepu8_epi32(_mm_srli_si128(nibbles, 8))),
             stream);
    }
    for (; i < end; ++i) {
      const uint8_t byte = packed[i / 2];
      output[i] = codes[(i % 2 == 0) ? (byte >> 4) : (byte & 0x0f)] * scale;
    }
  }
  if (stream) _mm_sfence();
}

// 8 floats -> 8 bf16 patterns in the low halves of 32-bit lanes: round to nearest even, NaN quieted
// (the same arithmetic as float_to_bf16).
QLORA_AVX2 static inline __m256i bf16_lanes(__m256 values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lowest_kept_bit = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lowest_kept_bit);
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  const __m256i quieted = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quieted, is_nan);
}

// 16 floats (two registers) -> 16 bf16 patterns in element order.
QLORA_AVX2 static inline __m256i to_bf16x16(__m256 first, __m256 second) {
  const __m256i packed = _mm256_packus_epi32(bf16_lanes(first), bf16_lanes(second));
  return _mm256_permute4x64_epi64(packed, 0xd8);  // packus interleaves 128-bit halves
}

// 8 floats -> 8 fp16 patterns, round to nearest even; NaN becomes sign|0x7e00 as float_to_fp16 does.
QLORA_AVX2 static inline __m128i fp16x8(__m256 values) {
  const __m128i halves = _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_UNORD_Q));
  const __m128i nan_mask = _mm_packs_epi32(_mm256_castsi256_si128(is_nan), _mm256_extracti128_si256(is_nan, 1));
  const __m128i sign = _mm_and_si128(halves, _mm_set1_epi16(static_cast<short>(0x8000)));
  const __m128i canonical = _mm_or_si128(sign, _mm_set1_epi16(0x7e00));
  return _mm_blendv_epi8(halves, canonical, nan_mask);
}

QLORA_AVX2 static inline __m256i to_fp16x16(__m256 first, __m256 second) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(fp16x8(first)), fp16x8(second), 1);
}

QLORA_AVX2 static inline void store16(uint16_t* destination, __m128i values, bool stream) {
  if (stream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(destination), values);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(destination), values);
  }
}

// The 16 decoded values of a block are computed once as 16-bit patterns; every element is then a
// byte-shuffle lookup into the low-byte and high-byte planes of that table.
template <bool Fp16>
QLORA_AVX2 void dequantize_blocks_16bit_avx2(const float* codes, const uint8_t* packed, const float* absmax,
                                             int64_t n, int64_t blocksize, int64_t first_block,
                                             int64_t last_block, uint16_t* output, bool stream) {
  const __m256 codes_low = _mm256_loadu_ps(codes);
  const __m256 codes_high = _mm256_loadu_ps(codes + 8);
  // Within each 128-bit lane: even bytes (low halves) first, then odd bytes (high halves).
  const __m256i split_bytes = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                               0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i low_mask = _mm_set1_epi8(0x0f);
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    const __m256 scale = _mm256_set1_ps(absmax[block]);
    const __m256 values_low = _mm256_mul_ps(codes_low, scale);
    const __m256 values_high = _mm256_mul_ps(codes_high, scale);
    const __m256i table = Fp16 ? to_fp16x16(values_low, values_high) : to_bf16x16(values_low, values_high);
    alignas(32) uint16_t table_entries[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(table_entries), table);
    // [low bytes 0-7 | high bytes 0-7 || low bytes 8-15 | high bytes 8-15] -> planes.
    const __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(table, split_bytes), 0xd8);
    const __m128i low_plane = _mm256_castsi256_si128(planes);
    const __m128i high_plane = _mm256_extracti128_si256(planes, 1);
    const __m256i low_plane2 = _mm256_broadcastsi128_si256(low_plane);
    const __m256i high_plane2 = _mm256_broadcastsi128_si256(high_plane);
    int64_t i = begin;
    for (; i + 32 <= end; i += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2));
      const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask);
      const __m128i low = _mm_and_si128(bytes, low_mask);
      const __m256i nibbles = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(high, low)),
                                                      _mm_unpackhi_epi8(high, low), 1);
      const __m256i low_bytes = _mm256_shuffle_epi8(low_plane2, nibbles);
      const __m256i high_bytes = _mm256_shuffle_epi8(high_plane2, nibbles);
      const __m256i first = _mm256_unpacklo_epi8(low_bytes, high_bytes);   // elements 0-7 | 16-23
      const __m256i second = _mm256_unpackhi_epi8(low_bytes, high_bytes);  // elements 8-15 | 24-31
      const __m256i out0 = _mm256_permute2x128_si256(first, second, 0x20);
      const __m256i out1 = _mm256_permute2x128_si256(first, second, 0x31);
      store16(output + i, _mm256_castsi256_si128(out0), stream);
      store16(output + i + 8, _mm256_extracti128_si256(out0, 1), stream);
      store16(output + i + 16, _mm256_castsi256_si128(out1), stream);
      store16(output + i + 24, _mm256_extracti128_si256(out1, 1), stream);
    }
    for (; i + 16 <= end; i += 16) {
      const __m128i nibbles = unpack_nibbles(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2)));
      const __m128i low_bytes = _mm_shuffle_epi8(low_plane, nibbles);
      const __m128i high_bytes = _mm_shuffle_epi8(high_plane, nibbles);
      store16(output + i, _mm_unpacklo_epi8(low_bytes, high_bytes), stream);
      store16(output + i + 8, _mm_unpackhi_epi8(low_bytes, high_bytes), stream);
    }
    for (; i < end; ++i) {
      const uint8_t byte = packed[i / 2];
      output[i] = table_entries[(i % 2 == 0) ? (byte >> 4) : (byte & 0x0f)];
    }
  }
  if (stream) _mm_sfence();
}

// ---- AVX2 quantization -----------------------------------------------------------------------------

struct VectorRule {
  __m256 thresholds[15];
  __m256i nibble_low;   // nibble_of_bucket[0..7]
  __m256i nibble_high;  // nibble_of_bucket[8..15]
  bool identity;        // NF4: the bucket is the nibble
};

QLORA_AVX2 static VectorRule make_vector_rule(const detail::RoundingRule& rule) {
  VectorRule vector_rule;
  for (int k = 0; k < 15; ++k) vector_rule.thresholds[k] = _mm256_set1_ps(rule.thresholds[k]);
  int32_t nibbles[16];
  bool identity = true;
  for (int k = 0; k < 16; ++k) {
    nibbles[k] = rule.nibble_of_bucket[k];
    identity = identity && nibbles[k] == k;
  }
  vector_rule.nibble_low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles));
  vector_rule.nibble_high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibbles + 8));
  vector_rule.identity = identity;
  return vector_rule;
}

// Nibbles of 8 scaled values, one per 32-bit lane.
QLORA_AVX2 static inline __m256i nibbles8(const VectorRule& rule, __m256 scaled) {
  __m256i bucket = _mm256_setzero_si256();
  for (int k = 0; k < 15; ++k) {
    // An all-ones compare mask is -1: subtracting it counts the thresholds exceeded.
    bucket = _mm256_sub_epi32(bucket, _mm256_castps_si256(_mm256_cmp_ps(scaled, rule.thresholds[k], _CMP_GT_OQ)));
  }
  if (rule.identity) return bucket;
  const __m256 from_low = _mm256_permutevar8x32_ps(_mm256_castsi256_ps(rule.nibble_low), bucket);
  const __m256 from_high = _mm256_permutevar8x32_ps(_mm256_castsi256_ps(rule.nibble_high), bucket);
  const __m256 take_high = _mm256_castsi256_ps(_mm256_slli_epi32(bucket, 28));
  return _mm256_castps_si256(_mm256_blendv_ps(from_low, from_high, take_high));
}

// 16 nibbles (two registers of 32-bit lanes, element order) -> 8 packed bytes, high nibble first.
QLORA_AVX2 static inline uint64_t pack16(__m256i first, __m256i second) {
  const __m256i shift = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  const __m256i pairs = _mm256_hadd_epi32(_mm256_sllv_epi32(first, shift), _mm256_sllv_epi32(second, shift));
  // hadd leaves bytes in the order 0 1 4 5 | 2 3 6 7.
  const __m256i ordered = _mm256_permutevar8x32_epi32(pairs, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
  const __m256i gather_low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                    0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i bytes = _mm256_shuffle_epi8(ordered, gather_low_bytes);
  const uint32_t low = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_castsi256_si128(bytes)));
  const uint32_t high = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm256_extracti128_si256(bytes, 1)));
  return static_cast<uint64_t>(low) | (static_cast<uint64_t>(high) << 32);
}

// One block of `count` fp32 values at `input`; its bytes start at `packed`.
QLORA_AVX2 void quantize_block_avx2(QuantType type, BitsandbytesBackend backend, const VectorRule& rule,
                                    const float* input, int64_t count, bool partial, uint8_t* packed,
                                    float* absmax_slot) {
  const __m256 magnitude_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 maximum = _mm256_setzero_ps();
  __m256 unordered = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 x = _mm256_loadu_ps(input + i);
    maximum = _mm256_max_ps(maximum, _mm256_and_ps(x, magnitude_mask));
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, maximum);
  float block_max = 0.0f;
  for (float lane : lanes) block_max = std::fmax(block_max, lane);
  bool has_nan = _mm256_movemask_ps(unordered) != 0;
  for (; i < count; ++i) {
    block_max = std::fmax(block_max, std::fabs(input[i]));
    has_nan = has_nan || std::isnan(input[i]);
  }
  const detail::BlockScale scale = detail::block_scale(block_max, partial, backend);
  // Blocks whose scaled values can be NaN (zero or tiny absmax on cuda, non-finite input) follow the
  // literal reference, where NaN's code depends on the decision tree's shape.
  if (has_nan || !std::isfinite(block_max) || !std::isfinite(scale.factor)) {
    detail::quantize_block_reference(type, backend, input, 0, count, partial, packed, absmax_slot);
    return;
  }
  *absmax_slot = scale.stored_absmax;
  const __m256 factor = _mm256_set1_ps(scale.factor);
  i = 0;
  for (; i + 16 <= count; i += 16) {
    __m256 first = _mm256_loadu_ps(input + i);
    __m256 second = _mm256_loadu_ps(input + i + 8);
    first = scale.divide ? _mm256_div_ps(first, factor) : _mm256_mul_ps(first, factor);
    second = scale.divide ? _mm256_div_ps(second, factor) : _mm256_mul_ps(second, factor);
    const uint64_t bytes = pack16(nibbles8(rule, first), nibbles8(rule, second));
    std::memcpy(packed + i / 2, &bytes, sizeof bytes);
  }
  for (; i < count; ++i) {
    const float scaled = scale.divide ? input[i] / scale.factor : input[i] * scale.factor;
    const uint8_t nibble = detail::round_reference(type, backend, scaled);
    if (i % 2 == 0) {
      packed[i / 2] = static_cast<uint8_t>(nibble << 4);
    } else {
      packed[i / 2] |= nibble;
    }
  }
  if (count % 2 != 0) packed[count / 2] |= detail::padding_nibble(type, backend, scale);
}

// Widens 16-bit patterns to fp32 exactly (bf16: shift; fp16: F16C, exact including subnormals).
QLORA_AVX2 void widen_avx2(DType dtype, const uint16_t* source, int64_t count, float* destination) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source + i));
    const __m256 widened = dtype == DType::bf16
                               ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))
                               : _mm256_cvtph_ps(halves);
    _mm256_storeu_ps(destination + i, widened);
  }
  convert_to_float(dtype, source + i, count - i, destination + i);
}

#endif  // QLORA_HAVE_X86

#if QLORA_HAVE_X86
// Blocks [first_block, last_block) of an input of any float dtype.
QLORA_AVX2 void quantize_blocks_avx2(QuantType type, BitsandbytesBackend backend, DType dtype, const void* input,
                                     int64_t n, int64_t blocksize, int64_t first_block, int64_t last_block,
                                     uint8_t* packed, float* absmax) {
  std::vector<float> widened(dtype == DType::f32 ? 0 : static_cast<size_t>(blocksize));
  const VectorRule rule = make_vector_rule(detail::rounding_rule(type, backend));
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t count = std::min(n, begin + blocksize) - begin;
    const float* block_input = static_cast<const float*>(input) + begin;
    if (dtype != DType::f32) {
      widen_avx2(dtype, static_cast<const uint16_t*>(input) + begin, count, widened.data());
      block_input = widened.data();
    }
    quantize_block_avx2(type, backend, rule, block_input, count, count < blocksize, packed + begin / 2,
                        &absmax[block]);
  }
}
#endif

void quantize_blocks_scalar(QuantType type, BitsandbytesBackend backend, DType dtype, const void* input,
                            int64_t n, int64_t blocksize, int64_t first_block, int64_t last_block,
                            uint8_t* packed, float* absmax) {
  std::vector<float> widened(dtype == DType::f32 ? 0 : static_cast<size_t>(blocksize));
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t begin = block * blocksize;
    const int64_t count = std::min(n, begin + blocksize) - begin;
    const float* block_input = static_cast<const float*>(input) + begin;
    if (dtype != DType::f32) {
      convert_to_float(dtype, static_cast<const uint16_t*>(input) + begin, count, widened.data());
      block_input = widened.data();
    }
    detail::quantize_block_reference(type, backend, block_input, 0, count, count < blocksize, packed + begin / 2,
                                      &absmax[block]);
  }
}

void require_positive_blocksize(int64_t blocksize) {
  if (blocksize <= 0) throw std::invalid_argument("4-bit codec: blocksize must be positive");
}

int64_t blocks_per_chunk(int64_t blocksize) { return std::max<int64_t>(1, kMinElementsPerChunk / blocksize); }

bool should_stream(const void* output, int64_t output_bytes, int64_t blocksize, int64_t element_size) {
  // Streaming stores need 16-byte aligned destinations; each block starts at one when its byte size
  // is a multiple of 16 (blocks end on vector boundaries too).
  return output_bytes > kStreamingOutputBytes && aligned_to(output, 16) && (blocksize * element_size) % 16 == 0;
}

}  // namespace

SimdLevel best_simd_level() {
  static const SimdLevel best = detect_simd_level();
  return best;
}

SimdLevel simd_level() {
  const int chosen = chosen_level.load(std::memory_order_relaxed);
  return chosen < 0 ? best_simd_level() : static_cast<SimdLevel>(chosen);
}

void set_simd_level(SimdLevel level) {
  if (level == SimdLevel::avx2 && best_simd_level() != SimdLevel::avx2) level = SimdLevel::scalar;
  chosen_level.store(static_cast<int>(level), std::memory_order_relaxed);
}

void quantize_4bit(QuantType type, DType input_dtype, const void* input, int64_t n, int64_t blocksize,
                   uint8_t* packed, float* absmax, BitsandbytesBackend backend) {
  require_positive_blocksize(blocksize);
  if (input_dtype != DType::f32 && input_dtype != DType::bf16 && input_dtype != DType::f16) {
    throw std::invalid_argument("quantize_4bit: input must be float32, float16 or bfloat16, not " +
                                dtype_name(input_dtype));
  }
  if (n <= 0) return;
  if (blocksize % 2 != 0) {
    // Odd blocks share bytes with their neighbours: only the reference handles them.
    std::vector<float> widened(static_cast<size_t>(n));
    convert_to_float(input_dtype, input, n, widened.data());
    quantize_4bit_reference(type, widened.data(), n, blocksize, packed, absmax, backend);
    return;
  }
  const int64_t blocks = quant_block_count(n, blocksize);
  parallel_for(blocks, blocks_per_chunk(blocksize), [&](int64_t first, int64_t last) {
#if QLORA_HAVE_X86
    if (use_avx2()) {
      quantize_blocks_avx2(type, backend, input_dtype, input, n, blocksize, first, last, packed, absmax);
      return;
    }
#endif
    quantize_blocks_scalar(type, backend, input_dtype, input, n, blocksize, first, last, packed, absmax);
  });
}

void quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax, BitsandbytesBackend backend) {
  quantize_4bit(type, DType::f32, input, n, blocksize, packed, absmax, backend);
}

void quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax) {
  quantize_4bit(type, DType::f32, input, n, blocksize, packed, absmax, BitsandbytesBackend::cuda);
}

void dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                     int64_t blocksize, float* output) {
  require_positive_blocksize(blocksize);
  if (n <= 0) return;
  if (blocksize % 2 != 0) {
    dequantize_4bit_reference(type, packed, absmax, n, blocksize, output);
    return;
  }
  const float* codes = code_table(type);
  const bool stream = should_stream(output, n * 4, blocksize, 4);
  parallel_for(quant_block_count(n, blocksize), blocks_per_chunk(blocksize), [&](int64_t first, int64_t last) {
#if QLORA_HAVE_X86
    if (use_avx2()) {
      dequantize_blocks_f32_avx2(codes, packed, absmax, n, blocksize, first, last, output, stream);
      return;
    }
#endif
    dequantize_blocks_scalar(codes, packed, absmax, n, blocksize, first, last, output,
                             [](float value) { return value; });
  });
}

namespace {

template <bool Fp16>
void dequantize_16bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                      uint16_t* output) {
  require_positive_blocksize(blocksize);
  if (n <= 0) return;
  if (blocksize % 2 != 0) {
    if (Fp16) {
      dequantize_4bit_fp16_reference(type, packed, absmax, n, blocksize, output);
    } else {
      dequantize_4bit_bf16_reference(type, packed, absmax, n, blocksize, output);
    }
    return;
  }
  const float* codes = code_table(type);
  const bool stream = should_stream(output, n * 2, blocksize, 2);
  parallel_for(quant_block_count(n, blocksize), blocks_per_chunk(blocksize), [&](int64_t first, int64_t last) {
#if QLORA_HAVE_X86
    if (use_avx2()) {
      dequantize_blocks_16bit_avx2<Fp16>(codes, packed, absmax, n, blocksize, first, last, output, stream);
      return;
    }
#endif
    dequantize_blocks_scalar(codes, packed, absmax, n, blocksize, first, last, output,
                             [](float value) { return Fp16 ? float_to_fp16(value) : float_to_bf16(value); });
  });
}

}  // namespace

void dequantize_4bit_bf16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, uint16_t* output) {
  dequantize_16bit<false>(type, packed, absmax, n, blocksize, output);
}

void dequantize_4bit_fp16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, uint16_t* output) {
  dequantize_16bit<true>(type, packed, absmax, n, blocksize, output);
}

void dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                     int64_t blocksize, DType output_dtype, void* output) {
  switch (output_dtype) {
    case DType::f32:
      dequantize_4bit(type, packed, absmax, n, blocksize, static_cast<float*>(output));
      return;
    case DType::bf16:
      dequantize_4bit_bf16(type, packed, absmax, n, blocksize, static_cast<uint16_t*>(output));
      return;
    case DType::f16:
      dequantize_4bit_fp16(type, packed, absmax, n, blocksize, static_cast<uint16_t*>(output));
      return;
    default:
      break;
  }
  throw std::invalid_argument("dequantize_4bit: output dtype must be float32, float16 or bfloat16, not " +
                              dtype_name(output_dtype));
}

}  // namespace qlora::kernels
