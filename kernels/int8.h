// LLM.int8 weights as bitsandbytes' Linear8bitLt stores them (`.weight` int8 [out, in] and `.SCB`
// fp32 [out]): the weight is first cast to float16; SCB = max |w| of each row; CB = round half to
// even of float(w) * scale with scale = (1.0f / SCB) * 127.0f, rounded after each operation (torch
// computes `127.0 / SCB` as reciprocal(SCB) * 127, so a plain division would move exact halves).
// An all-zero row stores SCB 0 and codes 0. Dequantization is bitsandbytes' int8_vectorwise_dequant:
// (float(CB) * SCB) * 7.874015718698502e-3f (1/127), rounded after each multiply. (On a GPU
// bitsandbytes uses __fdividef(127, SCB), an approximate reciprocal whose last bit may differ.)
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace qlora::kernels {

// weights: rows x cols float16 bit patterns, row-major.
void quantize_int8_rows(const uint16_t* fp16_weights, int64_t rows, int64_t cols, int8_t* codes,
                        float* row_absmax);
// Any float dtype: cast to float16 (round to nearest even) first, as Linear8bitLt does.
void quantize_int8_rows(DType input_dtype, const void* weights, int64_t rows, int64_t cols, int8_t* codes,
                        float* row_absmax);
void dequantize_int8_rows(const int8_t* codes, const float* row_absmax, int64_t rows, int64_t cols,
                          float* output);

}  // namespace qlora::kernels
