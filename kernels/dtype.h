// Element types of stored tensors and the scalar conversions between them. The converter and the
// store see bf16/fp16 as raw 16-bit patterns so that no layer below LibTorch needs a half type.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace qlora::kernels {

enum class DType { f32, f16, bf16, u8, i8, i32, i64 };

std::string dtype_name(DType dtype);           // "float32", "float16", "bfloat16", "uint8", ...
bool parse_dtype_name(const std::string& name, DType* dtype);  // false when unknown
int dtype_size(DType dtype);

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

// Round to nearest even, as torch's float->bfloat16 cast does; NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding_bias) >> 16);
}

float fp16_to_float(uint16_t bits);
uint16_t float_to_fp16(float value);  // round to nearest even, overflow to infinity

// Widens n elements of a float-like dtype (f32, f16, bf16) into fp32.
void convert_to_float(DType source_dtype, const void* source, int64_t n, float* destination);

}  // namespace qlora::kernels
