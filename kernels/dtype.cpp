// Scalar dtype conversions (IEEE half and bfloat16 <-> fp32) used when importing checkpoints.
#include "kernels/dtype.h"

#include <cassert>
#include <cmath>

namespace qlora::kernels {

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::u8: return "uint8";
    case DType::i8: return "int8";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
  }
  return "unknown";
}

bool parse_dtype_name(const std::string& name, DType* dtype) {
  static const struct { const char* name; DType dtype; } known[] = {
      {"float32", DType::f32}, {"float16", DType::f16}, {"bfloat16", DType::bf16},
      {"uint8", DType::u8},    {"int8", DType::i8},     {"int32", DType::i32},
      {"int64", DType::i64}};
  for (const auto& entry : known) {
    if (name == entry.name) {
      *dtype = entry.dtype;
      return true;
    }
  }
  return false;
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::u8: case DType::i8: return 1;
    case DType::i64: return 8;
  }
  return 0;
}

float fp16_to_float(uint16_t bits) {
  uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t result;
  if (exponent == 0x1f) {
    result = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    result = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    result = sign;
  } else {
    // Subnormal half: renormalise into a normal float.
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    result = sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &result, sizeof value);
  return value;
}

uint16_t float_to_fp16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // rounds to or beyond infinity
  if (magnitude < 0x38800000u) {
    // Result is subnormal (or zero): scale so the half ulp is 1, then round half to even.
    float absolute;
    std::memcpy(&absolute, &magnitude, sizeof absolute);
    float scaled = absolute * 16777216.0f;  // 2^24
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  uint32_t rounding_bias = 0xfffu + ((magnitude >> 13) & 1u);
  magnitude += rounding_bias;
  return sign | static_cast<uint16_t>(((magnitude >> 13) - (112u << 10)) & 0x7fffu);
}

void convert_to_float(DType source_dtype, const void* source, int64_t n, float* destination) {
  switch (source_dtype) {
    case DType::f32:
      std::memcpy(destination, source, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::bf16: {
      const auto* half_bits = static_cast<const uint16_t*>(source);
      for (int64_t i = 0; i < n; ++i) destination[i] = bf16_to_float(half_bits[i]);
      return;
    }
    case DType::f16: {
      const auto* half_bits = static_cast<const uint16_t*>(source);
      for (int64_t i = 0; i < n; ++i) destination[i] = fp16_to_float(half_bits[i]);
      return;
    }
    default:
      assert(false && "convert_to_float: not a float dtype");
  }
}

}  // namespace qlora::kernels
