// ggml's tensor types (the ids GGUF files store), the block layout of each, and fp32 decoding of the
// ones qlora imports: F32, F16, BF16 and the block formats Q8_0, Q4_0 and Q4_1. The GGUF reader
// (shard/gguf.h) uses the layouts to bounds-check every tensor, whatever its type.
#pragma once

#include <cstdint>
#include <string>

namespace qlora::kernels {

// Only the types qlora decodes get names here; ggml_type_info() knows the layout of every other one.
namespace ggml_type {
constexpr uint32_t f32 = 0;
constexpr uint32_t f16 = 1;
constexpr uint32_t q4_0 = 2;
constexpr uint32_t q4_1 = 3;
constexpr uint32_t q8_0 = 8;
constexpr uint32_t bf16 = 30;
}  // namespace ggml_type

struct GgmlTypeInfo {
  const char* name;         // "Q4_0", as ggml names it
  int64_t block_elements;   // elements per block (1 for plain types)
  uint64_t block_bytes;     // bytes per block
};
const GgmlTypeInfo* ggml_type_info(uint32_t type);   // nullptr for ids ggml does not define
std::string ggml_type_name(uint32_t type);           // "Q4_0", or "type N" when unknown
bool ggml_type_dequantizable(uint32_t type);         // F32, F16, BF16, Q8_0, Q4_0, Q4_1

// Decodes n elements of `type` (n a multiple of its block size) into fp32 exactly as ggml's
// dequantize_row_* does (and so as the gguf Python package does, bit for bit). `data` need not be
// aligned. Throws std::invalid_argument for a type outside ggml_type_dequantizable() or a partial
// block.
void dequantize_ggml(uint32_t type, const uint8_t* data, int64_t n, float* output);

// Encodes n fp32 values (n a multiple of 32) as Q8_0 blocks (34 bytes each: fp16 d, int8 q[32]) as
// ggml's quantize_row_q8_0_ref and the gguf Python package do: d = max|x| / 127, q = round half away
// from zero of x * (1/d), d stored as fp16; an all-zero block stores d = 0 and q = 0. Every value
// decodes to within d/2 of its input plus the fp16 rounding of d. Throws std::invalid_argument for a
// partial block.
void quantize_q8_0(const float* input, int64_t n, uint8_t* output);

}  // namespace qlora::kernels
