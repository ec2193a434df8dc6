// CUDA kernels of the 4-bit codecs (nf4_cuda.h). Dequantization is a streaming kernel: each thread
// turns 4 packed bytes into 8 outputs with one 32-bit load and vector stores, the 16 decoded values
// of the code table sit in shared memory. Quantization gives each quantization block to one warp.
// Compiled without fast math so the arithmetic is IEEE, like the CPU reference.
#include "kernels/cuda/nf4_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/rounding_rules.h"

namespace qlora::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Kernel arguments are copied by value, so the tables travel with every launch.
struct CodeTable {
  float values[16];
};

CodeTable code_table_of(QuantType type) {
  CodeTable table;
  const float* source = type == QuantType::nf4 ? detail::kNf4Codes : detail::kFp4Codes;
  for (int i = 0; i < 16; ++i) table.values[i] = source[i];
  return table;
}

int grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  // Grid-stride loops cover the rest; this many blocks saturates any current GPU.
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

struct Float32Out {
  using type = float;
  __device__ static float convert(float value) { return value; }
};
struct Bfloat16Out {
  using type = uint16_t;
  __device__ static uint16_t convert(float value) { return __bfloat16_as_ushort(__float2bfloat16_rn(value)); }
};
struct Float16Out {
  using type = uint16_t;
  __device__ static uint16_t convert(float value) { return __half_as_ushort(__float2half_rn(value)); }
};

// Every thread decodes one packed byte per step. Used when pointers or the blocksize do not allow
// the vector kernel.
template <typename Out>
__global__ void dequantize_bytes(CodeTable table, const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                 int64_t n, int64_t blocksize, typename Out::type* __restrict__ output) {
  const int64_t bytes = (n + 1) / 2;
  for (int64_t byte = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; byte < bytes;
       byte += int64_t{gridDim.x} * blockDim.x) {
    const uint8_t value = packed[byte];
    const int64_t first = byte * 2;
    output[first] = Out::convert(table.values[value >> 4] * absmax[first / blocksize]);
    if (first + 1 < n) output[first + 1] = Out::convert(table.values[value & 0x0f] * absmax[(first + 1) / blocksize]);
  }
}

// Every thread decodes 8 elements (4 bytes, one block since blocksize % 8 == 0) per step.
template <typename Out>
__global__ void dequantize_words(CodeTable table, const uint32_t* __restrict__ packed,
                                 const float* __restrict__ absmax, int64_t groups, int64_t blocksize,
                                 typename Out::type* __restrict__ output) {
  __shared__ float codes[16];
  if (threadIdx.x < 16) codes[threadIdx.x] = table.values[threadIdx.x];
  __syncthreads();
  for (int64_t group = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; group < groups;
       group += int64_t{gridDim.x} * blockDim.x) {
    const uint32_t word = __ldg(packed + group);
    const float scale = __ldg(absmax + group * 8 / blocksize);
    typename Out::type values[8];
#pragma unroll
    for (int byte = 0; byte < 4; ++byte) {
      const uint32_t value = (word >> (8 * byte)) & 0xff;  // little-endian: byte 0 holds elements 0, 1
      values[2 * byte] = Out::convert(codes[value >> 4] * scale);
      values[2 * byte + 1] = Out::convert(codes[value & 0x0f] * scale);
    }
    if constexpr (sizeof(typename Out::type) == 4) {
      float4* destination = reinterpret_cast<float4*>(output + group * 8);
      destination[0] = make_float4(values[0], values[1], values[2], values[3]);
      destination[1] = make_float4(values[4], values[5], values[6], values[7]);
    } else {
      uint4 packed_out;
      packed_out.x = static_cast<uint32_t>(values[0]) | (static_cast<uint32_t>(values[1]) << 16);
      packed_out.y = static_cast<uint32_t>(values[2]) | (static_cast<uint32_t>(values[3]) << 16);
      packed_out.z = static_cast<uint32_t>(values[4]) | (static_cast<uint32_t>(values[5]) << 16);
      packed_out.w = static_cast<uint32_t>(values[6]) | (static_cast<uint32_t>(values[7]) << 16);
      *reinterpret_cast<uint4*>(output + group * 8) = packed_out;
    }
  }
}

bool aligned_to(const void* pointer, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

template <typename Out>
cudaError_t launch_dequantize(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                              int64_t blocksize, typename Out::type* output, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (blocksize <= 0 || blocksize % 2 != 0) return cudaErrorInvalidValue;
  const CodeTable table = code_table_of(type);
  const int64_t groups = n / 8;
  const bool vector_ok = blocksize % 8 == 0 && aligned_to(packed, 4) && aligned_to(output, 16);
  if (vector_ok && groups > 0) {
    dequantize_words<Out><<<grid_for(groups), kThreads, 0, stream>>>(
        table, reinterpret_cast<const uint32_t*>(packed), absmax, groups, blocksize, output);
    const int64_t done = groups * 8;
    if (done < n) {
      // The tail is under 8 elements and starts on a block-aligned byte: decode it bytewise.
      dequantize_bytes<Out><<<1, kThreads, 0, stream>>>(table, packed + done / 2, absmax + done / blocksize,
                                                        n - done, blocksize, output + done);
    }
  } else {
    dequantize_bytes<Out><<<grid_for((n + 1) / 2), kThreads, 0, stream>>>(table, packed, absmax, n, blocksize,
                                                                           output);
  }
  return cudaGetLastError();
}

struct QuantizeParameters {
  detail::RoundingRule rule;
  uint8_t nan_nibble;
  bool cpu_backend;
};

__device__ uint8_t round_scaled(const QuantizeParameters& parameters, float scaled) {
  if (scaled != scaled) return parameters.nan_nibble;
  int bucket = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) bucket += scaled > parameters.rule.thresholds[k] ? 1 : 0;
  return parameters.rule.nibble_of_bucket[bucket];
}

// One warp per quantization block: lanes reduce the absmax, then each lane packs whole bytes.
__global__ void quantize_blocks(QuantizeParameters parameters, const float* __restrict__ input, int64_t n,
                                int64_t blocksize, uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_grid = int64_t{gridDim.x} * (blockDim.x / 32);
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  for (int64_t block = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32; block < blocks;
       block += warps_per_grid) {
    const int64_t begin = block * blocksize;
    const int64_t count = min(blocksize, n - begin);
    float block_max = 0.0f;
    for (int64_t i = lane; i < count; i += 32) block_max = fmaxf(block_max, fabsf(input[begin + i]));
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, offset));
    // The same scaling as detail::block_scale, in IEEE arithmetic.
    const bool partial = count < blocksize;
    float stored = block_max;
    float factor = __frcp_rn(block_max);
    bool divide = false;
    if (parameters.cpu_backend) {
      const float clamped = fmaxf(block_max, detail::kCpuAbsmaxFloor);
      factor = partial ? clamped : __frcp_rn(clamped);
      stored = partial ? clamped : block_max;
      divide = partial;
    }
    if (lane == 0) absmax[block] = stored;
    const int64_t bytes = (count + 1) / 2;
    for (int64_t byte = lane; byte < bytes; byte += 32) {
      const int64_t i = begin + byte * 2;
      const float first = divide ? __fdiv_rn(input[i], factor) : __fmul_rn(input[i], factor);
      uint8_t value = static_cast<uint8_t>(round_scaled(parameters, first) << 4);
      if (byte * 2 + 1 < count) {
        const float second = divide ? __fdiv_rn(input[i + 1], factor) : __fmul_rn(input[i + 1], factor);
        value |= round_scaled(parameters, second);
      } else {
        // bitsandbytes pads an odd count with a 0: scaled on cuda, already scaled on cpu.
        value |= round_scaled(parameters, parameters.cpu_backend ? 0.0f : __fmul_rn(0.0f, factor));
      }
      packed[begin / 2 + byte] = value;
    }
  }
}

}  // namespace

cudaError_t dequantize_4bit(QuantType type, const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                            float* output, cudaStream_t stream) {
  return launch_dequantize<Float32Out>(type, packed, absmax, n, blocksize, output, stream);
}

cudaError_t dequantize_4bit_bf16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                 int64_t blocksize, uint16_t* output, cudaStream_t stream) {
  return launch_dequantize<Bfloat16Out>(type, packed, absmax, n, blocksize, output, stream);
}

cudaError_t dequantize_4bit_fp16(QuantType type, const uint8_t* packed, const float* absmax, int64_t n,
                                 int64_t blocksize, uint16_t* output, cudaStream_t stream) {
  return launch_dequantize<Float16Out>(type, packed, absmax, n, blocksize, output, stream);
}

cudaError_t quantize_4bit(QuantType type, const float* input, int64_t n, int64_t blocksize, uint8_t* packed,
                          float* absmax, BitsandbytesBackend backend, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (blocksize <= 0 || blocksize % 2 != 0) return cudaErrorInvalidValue;
  QuantizeParameters parameters;
  parameters.rule = detail::make_rounding_rule(type, backend);
  parameters.nan_nibble = detail::nan_nibble(type, backend);
  parameters.cpu_backend = backend == BitsandbytesBackend::cpu;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t warps_per_block = kThreads / 32;
  const int64_t grid = (blocks + warps_per_block - 1) / warps_per_block;
  quantize_blocks<<<static_cast<int>(grid < 65535 * 8 ? grid : 65535 * 8), kThreads, 0, stream>>>(
      parameters, input, n, blocksize, packed, absmax);
  return cudaGetLastError();
}

}  // namespace qlora::kernels::cuda
