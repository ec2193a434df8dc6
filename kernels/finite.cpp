// Non-finite value scan (finite.h). Chunks are OR-reduced without early exit so the compiler can
// vectorize them; only a flagged chunk is searched element by element.
#include "kernels/finite.h"

#include <cstring>

namespace qlora::kernels {
namespace {

constexpr int64_t kChunk = 1024;

template <typename Bits>
Bits bits_at(const void* values, int64_t i) {
  Bits bits;
  std::memcpy(&bits, static_cast<const unsigned char*>(values) + i * static_cast<int64_t>(sizeof(Bits)), sizeof bits);
  return bits;
}

// Exponent bits all ones means infinity or NaN, in each format.
template <typename Bits, Bits ExponentMask>
int64_t first_with_full_exponent(const void* values, int64_t n) {
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t end = begin + kChunk < n ? begin + kChunk : n;
    bool flagged = false;
    for (int64_t i = begin; i < end; ++i) flagged |= (bits_at<Bits>(values, i) & ExponentMask) == ExponentMask;
    if (!flagged) continue;
    for (int64_t i = begin; i < end; ++i) {
      if ((bits_at<Bits>(values, i) & ExponentMask) == ExponentMask) return i;
    }
  }
  return -1;
}

}  // namespace

int64_t first_non_finite(const float* values, int64_t n) {
  return first_with_full_exponent<uint32_t, 0x7f800000u>(values, n);
}

int64_t first_non_finite(DType dtype, const void* values, int64_t n) {
  switch (dtype) {
    case DType::f32:
      return first_non_finite(static_cast<const float*>(values), n);
    case DType::bf16:
      return first_with_full_exponent<uint16_t, 0x7f80u>(values, n);
    case DType::f16:
      return first_with_full_exponent<uint16_t, 0x7c00u>(values, n);
    default:
      return -1;  // integer tensors are always finite
  }
}

void require_finite(const std::string& tensor_name, DType dtype, const void* values, int64_t n) {
  const int64_t index = first_non_finite(dtype, values, n);
  if (index < 0) return;
  float value = 0.0f;
  if (dtype == DType::f32) {
    std::memcpy(&value, static_cast<const float*>(values) + index, sizeof value);
  } else {
    uint16_t bits;
    std::memcpy(&bits, static_cast<const uint16_t*>(values) + index, sizeof bits);
    value = dtype == DType::bf16 ? bf16_to_float(bits) : fp16_to_float(bits);
  }
  const char* kind = value != value ? "NaN" : (value > 0 ? "+inf" : "-inf");
  throw NonFiniteWeight("tensor '" + tensor_name + "' holds " + kind + " at element " + std::to_string(index) +
                        "; refusing to quantize it");
}

}  // namespace qlora::kernels
