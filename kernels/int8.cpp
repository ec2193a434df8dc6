// Row-wise int8 codec of LLM.int8 weights (int8.h), rows spread over the kernel threads.
#include "kernels/int8.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/codec_detail.h"
#include "kernels/parallel.h"

namespace qlora::kernels {
namespace {

constexpr float kInverse127 = 7.874015718698502e-3f;

int64_t rows_per_chunk(int64_t cols) { return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, cols)); }

void quantize_row(const float* row, int64_t cols, int8_t* codes, float* absmax) {
  float row_max = 0.0f;
  for (int64_t j = 0; j < cols; ++j) row_max = std::fmax(row_max, std::fabs(row[j]));
  *absmax = row_max;
  if (row_max == 0.0f) {
    // 0 * (127 / 0) is NaN, which bitsandbytes' conversions turn into 0.
    std::fill(codes, codes + cols, int8_t{0});
    return;
  }
  // torch evaluates 127.0 / SCB as reciprocal(SCB) * 127 (and the CUDA kernel's __fdividef is a
  // reciprocal times 127 too): two roundings, not one division.
  const float scale = detail::rounded(1.0f / row_max) * 127.0f;
  for (int64_t j = 0; j < cols; ++j) codes[j] = static_cast<int8_t>(std::nearbyint(row[j] * scale));
}

}  // namespace

void quantize_int8_rows(const uint16_t* fp16_weights, int64_t rows, int64_t cols, int8_t* codes,
                        float* row_absmax) {
  parallel_for(rows, rows_per_chunk(cols), [&](int64_t first, int64_t last) {
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = first; r < last; ++r) {
      convert_to_float(DType::f16, fp16_weights + r * cols, cols, row.data());
      quantize_row(row.data(), cols, codes + r * cols, &row_absmax[r]);
    }
  });
}

void quantize_int8_rows(DType input_dtype, const void* weights, int64_t rows, int64_t cols, int8_t* codes,
                        float* row_absmax) {
  if (input_dtype == DType::f16) {
    quantize_int8_rows(static_cast<const uint16_t*>(weights), rows, cols, codes, row_absmax);
    return;
  }
  if (input_dtype != DType::f32 && input_dtype != DType::bf16) {
    throw std::invalid_argument("quantize_int8_rows: input must be float32, float16 or bfloat16, not " +
                                dtype_name(input_dtype));
  }
  parallel_for(rows, rows_per_chunk(cols), [&](int64_t first, int64_t last) {
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = first; r < last; ++r) {
      if (input_dtype == DType::f32) {
        const float* source = static_cast<const float*>(weights) + r * cols;
        for (int64_t j = 0; j < cols; ++j) row[static_cast<size_t>(j)] = fp16_to_float(float_to_fp16(source[j]));
      } else {
        const uint16_t* source = static_cast<const uint16_t*>(weights) + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          row[static_cast<size_t>(j)] = fp16_to_float(float_to_fp16(bf16_to_float(source[j])));
        }
      }
      quantize_row(row.data(), cols, codes + r * cols, &row_absmax[r]);
    }
  });
}

void dequantize_int8_rows(const int8_t* codes, const float* row_absmax, int64_t rows, int64_t cols,
                          float* output) {
  parallel_for(rows, rows_per_chunk(cols), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float absmax = row_absmax[r];
      for (int64_t j = 0; j < cols; ++j) {
        output[r * cols + j] = detail::rounded(static_cast<float>(codes[r * cols + j]) * absmax) * kInverse127;
      }
    }
  });
}

}  // namespace qlora::kernels
