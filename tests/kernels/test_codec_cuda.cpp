// The CUDA 4-bit kernels (kernels/cuda/) against the CPU reference, bit for bit. Built only when the
// CUDA toolkit is (QLORA_HAVE_CUDA); skipped on a machine without a GPU.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "kernels/nf4.h"

#if defined(QLORA_HAVE_CUDA) && QLORA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/nf4_cuda.h"

namespace qlora::kernels {
namespace {

bool have_gpu() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

// A device copy of a host vector, freed at scope exit.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t count) : count_(count) {
    void* memory = nullptr;
    EXPECT_EQ(cudaMalloc(&memory, (count + 16) * sizeof(T)), cudaSuccess);
    data_ = static_cast<T*>(memory);
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    EXPECT_EQ(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() { return data_; }
  std::vector<T> read(size_t offset = 0) const {
    std::vector<T> host(count_);
    EXPECT_EQ(cudaMemcpy(host.data(), data_ + offset, count_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return host;
  }

 private:
  T* data_ = nullptr;
  size_t count_;
};

std::vector<float> weight_like(int64_t n, int64_t blocksize, uint32_t seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> values(static_cast<size_t>(n));
  for (auto& value : values) value = normal(generator);
  for (int64_t i = 0; i < std::min(n, blocksize); ++i) values[i] = 0.0f;  // a zero block
  for (int64_t i = blocksize; i < std::min(n, 2 * blocksize); ++i) values[i] *= 1e-38f;  // reciprocal overflows
  return values;
}

TEST(CudaCodecs, QuantizationMatchesCpuReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
    for (auto backend : {BitsandbytesBackend::cuda, BitsandbytesBackend::cpu}) {
      for (int64_t blocksize : {32, 64, 256, 4096}) {
        for (int64_t n : {blocksize * 37, blocksize * 37 + 13}) {
          SCOPED_TRACE(::testing::Message() << "n=" << n << " blocksize=" << blocksize);
          const auto input = weight_like(n, blocksize, static_cast<uint32_t>(n));
          std::vector<uint8_t> expected(static_cast<size_t>(packed_byte_count(n)));
          std::vector<float> expected_absmax(static_cast<size_t>(quant_block_count(n, blocksize)));
          quantize_4bit_reference(type, input.data(), n, blocksize, expected.data(), expected_absmax.data(), backend);
          DeviceBuffer<float> device_input(input);
          DeviceBuffer<uint8_t> device_packed(expected.size());
          DeviceBuffer<float> device_absmax(expected_absmax.size());
          ASSERT_EQ(cuda::quantize_4bit(type, device_input.get(), n, blocksize, device_packed.get(),
                                        device_absmax.get(), backend, nullptr),
                    cudaSuccess);
          EXPECT_EQ(device_packed.read(), expected);
          const auto absmax = device_absmax.read();
          EXPECT_EQ(0, std::memcmp(absmax.data(), expected_absmax.data(), absmax.size() * 4));
        }
      }
    }
  }
}

TEST(CudaCodecs, DequantizationMatchesCpuReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 generator(17);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(1e-3f, 10.0f);
  for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
    for (int64_t blocksize : {2, 32, 64, 4096}) {
      for (int64_t n : {blocksize * 21, blocksize * 21 + 5}) {
        for (size_t output_offset : {size_t{0}, size_t{1}}) {
          SCOPED_TRACE(::testing::Message() << "n=" << n << " blocksize=" << blocksize << " offset=" << output_offset);
          std::vector<uint8_t> packed(static_cast<size_t>(packed_byte_count(n)));
          for (auto& value : packed) value = static_cast<uint8_t>(byte(generator));
          std::vector<float> absmax(static_cast<size_t>(quant_block_count(n, blocksize)));
          for (auto& value : absmax) value = scale(generator);
          DeviceBuffer<uint8_t> device_packed(packed);
          DeviceBuffer<float> device_absmax(absmax);

          std::vector<float> expected(static_cast<size_t>(n));
          dequantize_4bit_reference(type, packed.data(), absmax.data(), n, blocksize, expected.data());
          DeviceBuffer<float> output(static_cast<size_t>(n));
          ASSERT_EQ(cuda::dequantize_4bit(type, device_packed.get(), device_absmax.get(), n, blocksize,
                                          output.get() + output_offset, nullptr),
                    cudaSuccess);
          const auto actual = output.read(output_offset);
          EXPECT_EQ(0, std::memcmp(actual.data(), expected.data(), expected.size() * 4));

          std::vector<uint16_t> expected16(static_cast<size_t>(n));
          DeviceBuffer<uint16_t> output16(static_cast<size_t>(n));
          dequantize_4bit_bf16_reference(type, packed.data(), absmax.data(), n, blocksize, expected16.data());
          ASSERT_EQ(cuda::dequantize_4bit_bf16(type, device_packed.get(), device_absmax.get(), n, blocksize,
                                               output16.get() + output_offset, nullptr),
                    cudaSuccess);
          EXPECT_EQ(output16.read(output_offset), expected16) << "bf16";
          dequantize_4bit_fp16_reference(type, packed.data(), absmax.data(), n, blocksize, expected16.data());
          ASSERT_EQ(cuda::dequantize_4bit_fp16(type, device_packed.get(), device_absmax.get(), n, blocksize,
                                               output16.get() + output_offset, nullptr),
                    cudaSuccess);
          EXPECT_EQ(output16.read(output_offset), expected16) << "fp16";
        }
      }
    }
  }
}

TEST(CudaCodecs, OddBlocksizeIsRefused) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  EXPECT_EQ(cuda::dequantize_4bit(QuantType::nf4, nullptr, nullptr, 10, 3, nullptr, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace qlora::kernels

#else

TEST(CudaCodecs, NotBuilt) { GTEST_SKIP() << "built without the CUDA toolkit"; }

#endif
