// Double quantization of absmax values and the blockwise 8-bit codec under it (double_quant.h),
// reproducing both bitsandbytes backends' choice of code.
#include "kernels/double_quant.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels/codec_detail.h"

namespace qlora::kernels {
namespace {

// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) as bitsandbytes computes it in
// float32 (hexadecimal so every bit is explicit).
constexpr float kDynamicMap[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f,
    -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f,
    -0x1.b46666p-1f, -0x1.ad3334p-1f, -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f,
    -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f,
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f, -0x1.4f999ap-1f,
    -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f,
    -0x1.006666p-1f, -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f,
    -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f, -0x1.459998p-2f, -0x1.373334p-2f,
    -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f,
    -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f, -0x1.8851eep-4f,
    -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f,
    -0x1.433334p-4f, -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f,
    -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f,
    -0x1.88f5c2p-5f, -0x1.71eb86p-5f, -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f,
    -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f,
    -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f, -0x1.3e76c8p-7f,
    -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f,
    -0x1.ced914p-9f, -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f,
    -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f, -0x1.743e96p-14f, -0x1.15df66p-14f,
    -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f,
    0x0p+0f, 0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f, 0x1.6f0068p-15f,
    0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f,
    0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f,
    0x1.4fdf3ap-10f, 0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f,
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f,
    0x1.e978d4p-8f, 0x1.072b02p-7f, 0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c2ap-6f,
    0x1.fd70a4p-6f, 0x1.15c29p-5f, 0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f,
    0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f6p-5f,
    0x1.09999ap-4f, 0x1.151ebap-4f, 0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f,
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f,
    0x1.93d70ap-4f, 0x1.b66668p-4f, 0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f,
    0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3332p-3f,
    0x1.0cp-2f, 0x1.1a6668p-2f, 0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f,
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f,
    0x1.b8ccccp-2f, 0x1.c73334p-2f, 0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f,
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f, 0x1.2b999ap-1f,
    0x1.32ccccp-1f, 0x1.3ap-1f, 0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f,
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f,
    0x1.893334p-1f, 0x1.906666p-1f, 0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f,
    0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f,
    0x1.df999ap-1f, 0x1.e6ccccp-1f, 0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f
};

constexpr int kLookupSize = 65536;

// kernels.cu dQuantize<0>: descend 7 steps from the middle, then test against the fp32 midpoint of
// the pivot the descent ended on and its neighbour on x's side. NaN fails every comparison and
// walks down to index 0.
uint8_t nearest_code_cuda(const float* code, float x) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float value = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > value) {
      lower_pivot = pivot;
      lower = value;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = value;
      pivot -= step;
    }
    value = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > value) {
    const float midpoint = (upper + value) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + value) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

// The cpu backend's lookup table: entry i is the code nearest (by fp32 midpoints, ties lower) to the
// grid value -1 + 2i / 65535.
std::vector<uint8_t> build_lookup(const float* code) {
  float midpoints[255];
  for (int i = 0; i < 255; ++i) midpoints[i] = 0.5f * (code[i] + code[i + 1]);
  std::vector<uint8_t> lookup(kLookupSize);
  int code_index = 0;
  for (int i = 0; i < kLookupSize; ++i) {
    const float grid_value = -1.0f + (2.0f * static_cast<float>(i)) / static_cast<float>(kLookupSize - 1);
    while (code_index < 255 && midpoints[code_index] < grid_value) ++code_index;
    lookup[static_cast<size_t>(i)] = static_cast<uint8_t>(code_index);
  }
  return lookup;
}

int lookup_index(float scaled) {
  scaled = std::clamp(scaled, -1.0f, 1.0f);
  const float shifted = detail::rounded(detail::rounded((scaled + 1.0f) * 0.5f) * static_cast<float>(kLookupSize - 1));
  return static_cast<int>(shifted + 0.5f);
}

// One table per code array in use; the dynamic map's is built once.
std::shared_ptr<const std::vector<uint8_t>> lookup_for(const float* code) {
  static std::mutex mutex;
  static const float* cached_code = nullptr;
  static std::vector<float> cached_values;
  static std::shared_ptr<const std::vector<uint8_t>> cached;
  std::lock_guard<std::mutex> lock(mutex);
  if (cached && cached_code == code && std::equal(code, code + 256, cached_values.begin())) return cached;
  cached = std::make_shared<const std::vector<uint8_t>>(build_lookup(code));
  cached_code = code;
  cached_values.assign(code, code + 256);
  return cached;
}

void quantize_block_cuda(const float* code, const float* input, int64_t count, uint8_t* codes, float* absmax) {
  float block_max = 0.0f;
  for (int64_t i = 0; i < count; ++i) block_max = std::fmax(block_max, std::fabs(input[i]));
  *absmax = block_max;
  const float inverse = 1.0f / block_max;
  for (int64_t i = 0; i < count; ++i) codes[i] = nearest_code_cuda(code, input[i] * inverse);
}

void quantize_block_cpu(const std::vector<uint8_t>& lookup, const float* input, int64_t count, uint8_t* codes,
                        float* absmax) {
  float block_max = 0.0f;
  for (int64_t i = 0; i < count; ++i) block_max = std::max(block_max, std::fabs(input[i]));
  *absmax = block_max;
  if (block_max == 0.0f) {
    std::fill(codes, codes + count, uint8_t{0});
    return;
  }
  const float inverse = 1.0f / block_max;
  for (int64_t i = 0; i < count; ++i) codes[i] = lookup[static_cast<size_t>(lookup_index(input[i] * inverse))];
}

}  // namespace

const float* dynamic_map() { return kDynamicMap; }

float absmax_offset(const float* absmax, int64_t count) {
  if (count <= 0) return 0.0f;
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) sum += absmax[i];
  return static_cast<float>(sum) / static_cast<float>(count);
}

void quantize_8bit_blockwise(const float* code, const float* input, int64_t n, int64_t blocksize,
                             uint8_t* codes, float* block_absmax, BitsandbytesBackend backend) {
  std::shared_ptr<const std::vector<uint8_t>> lookup;
  if (backend == BitsandbytesBackend::cpu) lookup = lookup_for(code);
  for (int64_t begin = 0, block = 0; begin < n; begin += blocksize, ++block) {
    const int64_t count = std::min(blocksize, n - begin);
    if (backend == BitsandbytesBackend::cuda) {
      quantize_block_cuda(code, input + begin, count, codes + begin, &block_absmax[block]);
    } else {
      quantize_block_cpu(*lookup, input + begin, count, codes + begin, &block_absmax[block]);
    }
  }
}

void dequantize_8bit_blockwise(const float* code, const uint8_t* codes, const float* block_absmax, int64_t n,
                               int64_t blocksize, float* output) {
  for (int64_t i = 0; i < n; ++i) output[i] = code[codes[i]] * block_absmax[i / blocksize];
}

void quantize_absmax(const float* absmax, int64_t count, float offset, uint8_t* codes, float* nested_absmax,
                     BitsandbytesBackend backend) {
  std::vector<float> centred(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) centred[static_cast<size_t>(i)] = absmax[i] - offset;
  quantize_8bit_blockwise(kDynamicMap, centred.data(), count, kNestedBlocksize, codes, nested_absmax, backend);
}

void dequantize_absmax(const uint8_t* codes, const float* nested_absmax, float offset, int64_t count,
                       float* absmax) {
  for (int64_t i = 0; i < count; ++i) {
    absmax[i] = detail::rounded(kDynamicMap[codes[i]] * nested_absmax[i / kNestedBlocksize]) + offset;
  }
}

}  // namespace qlora::kernels
