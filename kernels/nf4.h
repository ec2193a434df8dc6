// 4-bit blockwise codecs (NF4, FP4) with bitsandbytes' exact semantics: code tables, nearest-code
// rounding with ties to the lower code, element 2i in the high nibble, one fp32 absmax per block.
// Every fast path has a plain reference beside it with the same contract and bit-identical output.
//
// bitsandbytes has two quantizers that disagree in corners, so the bytes to reproduce are named:
// - BitsandbytesBackend::cuda (the default): csrc/kernels.cu, which made the checkpoints in the wild.
//   scaled = x * (1.0f / absmax); NF4 rounds with strict `>` against its tree's decimal midpoints
//   (parsed to float, four of them sit one ulp off the fp32 midpoints: 0, 8, 12, 14); FP4 with the
//   literal thresholds of its decision tree (0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
//   0.4166667f, 0.583333f, 0.8333333f on |x|, sign bit when x < 0). An all-zero block stores absmax
//   0 and, through 0 * inf = NaN failing every comparison, code 0 (NF4: -1.0, so it decodes to -0.0);
//   a block whose absmax is below 1/FLT_MAX (~2.9e-39) scales by infinity the same way.
// - BitsandbytesBackend::cpu: bitsandbytes' pure-torch quantize_4bit (what runs without a GPU):
//   bucketize against (c[i] + c[i+1]) / 2 in fp32 of the sorted code table (ties lower), scaling by
//   1.0f / max(absmax, 1e-38f); the last, partial block is divided by max(absmax, 1e-38f) instead
//   and stores that clamped absmax. FP4 differs visibly: exact fp32 midpoints instead of the
//   truncated literals, and a tiny positive value gets nibble 8 (-0) while 0 and tiny negatives get 0.
// On a GPU bitsandbytes is built with --use_fast_math: its 1.0f / absmax is an approximate reciprocal
// and subnormals flush to zero, so a value within an ulp of a boundary, or a block of subnormals, can
// round differently there; here the reciprocal is IEEE.
//
// Decoding is the same on every backend: float(code[nibble]) * absmax in fp32, then rounded to
// nearest even into bf16 / fp16. Inputs must be finite (see finite.h); non-finite codes are unspecified.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace qlora::kernels {

enum class QuantType { nf4, fp4 };

enum class BitsandbytesBackend { cuda, cpu };

// The 16 values a nibble decodes to (before scaling by the block's absmax), index = nibble. FP4's
// nibble 8 is -0.0 as bitsandbytes' kernels decode it (its stored quant_map says +0.0).
const float* code_table(QuantType type);

inline int64_t quant_block_count(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }
inline int64_t packed_byte_count(int64_t n) { return (n + 1) / 2; }

// packed: packed_byte_count(n) bytes; absmax: quant_block_count(n, blocksize) floats. An odd n
// leaves the low nibble of the last byte 0. The overloads without a backend follow `cuda`.
void quantize_4bit_reference(QuantType type, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* packed, float* absmax);
void quantize_4bit_reference(QuantType type, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* packed, float* absmax, BitsandbytesBackend backend);
void dequantize_4bit_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                               int64_t blocksize, float* output);
// 16-bit outputs as raw bit patterns (see dtype.h).
void dequantize_4bit_bf16_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                    int64_t blocksize, uint16_t* output);
void dequantize_4bit_fp16_reference(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                    int64_t blocksize, uint16_t* output);

// Fast paths: same contract and results as the reference ones (AVX2 when the CPU has it, spread over
// kernel_threads() threads for large tensors). `packed` must start at an even element (any block
// boundary does), so a shard of whole blocks is dequantized by offsetting both pointers. They throw
// std::invalid_argument for a blocksize <= 0 or an input dtype that is not a float type.
void quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax);
void quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax, BitsandbytesBackend backend);
// 16-bit (or fp32) input: the same as widening to fp32 first, which is what bitsandbytes does.
void quantize_4bit(QuantType type, DType input_dtype, const void* input, int64_t n, int64_t blocksize,
                   uint8_t* packed, float* absmax, BitsandbytesBackend backend = BitsandbytesBackend::cuda);
void dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                     int64_t blocksize, float* output);
void dequantize_4bit_bf16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, uint16_t* output);
void dequantize_4bit_fp16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, uint16_t* output);
// Dequantizes into `output_dtype` (f32, bf16 or f16): the buffer a matrix product reads.
void dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                     int64_t blocksize, DType output_dtype, void* output);

// Which instruction set the fast paths use. Tests and the benchmark force `scalar` to compare; the
// default is the best the CPU supports.
enum class SimdLevel { scalar, avx2 };
SimdLevel simd_level();
SimdLevel best_simd_level();
void set_simd_level(SimdLevel level);  // clamped to best_simd_level()

}  // namespace qlora::kernels
