// NaN / Inf detection for weights about to be quantized: a non-finite value would poison its whole
// block's absmax, so the converter refuses the tensor by name instead of storing garbage.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/dtype.h"

namespace qlora::kernels {

// Index of the first NaN or infinity, or -1 when every value is finite. dtype: f32, f16 or bf16.
int64_t first_non_finite(const float* values, int64_t n);
int64_t first_non_finite(DType dtype, const void* values, int64_t n);

inline bool all_finite(const float* values, int64_t n) { return first_non_finite(values, n) < 0; }
inline bool all_finite(DType dtype, const void* values, int64_t n) { return first_non_finite(dtype, values, n) < 0; }

struct NonFiniteWeight : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Throws NonFiniteWeight("tensor 'NAME' holds NaN at element I; refusing to quantize it") (or +inf /
// -inf) when the tensor is not all finite.
void require_finite(const std::string& tensor_name, DType dtype, const void* values, int64_t n);

}  // namespace qlora::kernels
