// CUDA versions of the 4-bit codecs (kernels/nf4.h): plain host functions on device pointers that
// enqueue one kernel on `stream` and return the launch status. Same bytes and values as the CPU
// reference: the rounding thresholds are the CPU's own tables passed to the kernels, the reciprocal
// and the conversions are IEEE round-to-nearest (no fast math, no flush-to-zero). That is also where
// they differ from bitsandbytes' GPU build (--use_fast_math), by design: see nf4.h.
// No LibTorch here; the model layer wraps these around its tensors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/nf4.h"

namespace qlora::kernels::cuda {

// Dequantize n elements; `packed` starts at an even element (any block boundary), absmax has
// quant_block_count(n, blocksize) entries. blocksize must be even. bf16 / fp16 outputs are raw bits.
cudaError_t dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                            float* output, cudaStream_t stream);
cudaError_t dequantize_4bit_bf16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                 int64_t blocksize, uint16_t* output, cudaStream_t stream);
cudaError_t dequantize_4bit_fp16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                 int64_t blocksize, uint16_t* output, cudaStream_t stream);

// Quantize n fp32 elements into packed_byte_count(n) bytes and quant_block_count(n, blocksize) absmax
// values, as quantize_4bit_reference does for `backend`. blocksize must be even.
cudaError_t quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                          float* absmax, BitsandbytesBackend backend, cudaStream_t stream);

}  // namespace qlora::kernels::cuda
