// The fast 4-bit paths (AVX2 and scalar, threaded) against the plain reference, bit for bit, over
// random tensors, awkward sizes and alignments, and blocks that force the fallbacks; plus the
// worker pool they run on.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/dtype.h"
#include "kernels/nf4.h"
#include "kernels/parallel.h"

namespace qlora::kernels {
namespace {

// Restores the SIMD level and thread count a test changed.
class FastPathTest : public ::testing::Test {
 protected:
  void TearDown() override {
    set_simd_level(best_simd_level());
    set_kernel_threads(0);
  }
};

// A weight-like tensor with a block of each awkward kind laid over its start.
std::vector<float> awkward_tensor(int64_t n, int64_t blocksize, uint32_t seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> values(static_cast<size_t>(n));
  for (auto& value : values) value = normal(generator);
  const int kinds = 7;
  for (int kind = 0; kind < kinds && (kind + 1) * blocksize <= n; ++kind) {
    for (int64_t i = kind * blocksize; i < (kind + 1) * blocksize; ++i) {
      switch (kind) {
        case 0: values[i] = 0.0f; break;                                            // zeros
        case 1: values[i] = 0.3f; break;                                            // equal values
        case 2: values[i] = normal(generator) * 1e32f; break;                       // huge
        case 3: values[i] = normal(generator) * 1e-38f; break;                      // subnormal-ish
        case 4: values[i] = i % 3 == 0 ? 1.0f : (i % 3 == 1 ? -1.0f : 0.5f); break;  // exact values
        case 5: values[i] = -std::fabs(normal(generator)); break;                   // all negative
        case 6: values[i] = (i % 5 == 0) ? std::numeric_limits<float>::quiet_NaN() : normal(generator); break;
      }
    }
  }
  return values;
}

void expect_quantize_matches(QuantType type, BitsandbytesBackend backend, const std::vector<float>& input,
                             int64_t blocksize) {
  const auto n = static_cast<int64_t>(input.size());
  std::vector<uint8_t> expected_packed(static_cast<size_t>(packed_byte_count(n)));
  std::vector<float> expected_absmax(static_cast<size_t>(quant_block_count(n, blocksize)));
  quantize_4bit_reference(type, input.data(), n, blocksize, expected_packed.data(), expected_absmax.data(), backend);
  std::vector<uint8_t> packed(expected_packed.size(), 0xaa);
  std::vector<float> absmax(expected_absmax.size(), -1.0f);
  quantize_4bit(type, input.data(), n, blocksize, packed.data(), absmax.data(), backend);
  ASSERT_EQ(std::memcmp(packed.data(), expected_packed.data(), packed.size()), 0)
      << "n=" << n << " blocksize=" << blocksize;
  ASSERT_EQ(std::memcmp(absmax.data(), expected_absmax.data(), absmax.size() * 4), 0)
      << "n=" << n << " blocksize=" << blocksize;
}

TEST_F(FastPathTest, QuantizationMatchesReferenceBitForBit) {
  const int64_t blocksizes[] = {2, 6, 32, 48, 64, 128, 256, 1024, 4096};
  const int64_t extra[] = {0, 1, 15, 16, 17, 31};
  for (SimdLevel level : {SimdLevel::scalar, best_simd_level()}) {
    set_simd_level(level);
    for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
      for (auto backend : {BitsandbytesBackend::cuda, BitsandbytesBackend::cpu}) {
        for (int64_t blocksize : blocksizes) {
          for (int64_t tail : extra) {
            const int64_t n = blocksize * 9 + tail;
            SCOPED_TRACE(::testing::Message() << "level " << static_cast<int>(level) << " type "
                                              << static_cast<int>(type) << " backend " << static_cast<int>(backend));
            expect_quantize_matches(type, backend, awkward_tensor(n, blocksize, static_cast<uint32_t>(n)), blocksize);
          }
        }
      }
    }
  }
}

// Every threshold of every rule, and the floats either side of it, through the vector code (blocks
// of 64 led by +-1, so the scaled value is the value itself).
TEST_F(FastPathTest, BoundaryValuesRoundAlikeInVectorAndReferenceCode) {
  std::vector<float> probes;
  for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
    for (float value : {0.0f, -0.0f, 1e-9f, -1e-9f, 0.5f, -0.5f}) probes.push_back(value);
    const float* codes = code_table(type);
    for (int i = 0; i < 16; ++i) probes.push_back(codes[i]);
    for (int i = 0; i < 15; ++i) {
      const float midpoint = (codes[i] + codes[i + 1]) / 2.0f;
      for (float value : {midpoint, std::nextafter(midpoint, 2.0f), std::nextafter(midpoint, -2.0f)}) {
        probes.push_back(value);
        probes.push_back(-value);
      }
    }
  }
  for (float threshold : {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f,
                          -0.8480964004993439f, 0.1202552504837513f, 0.5016634166240692f, 0.8614784181118011f}) {
    for (float value : {threshold, std::nextafter(threshold, 2.0f), std::nextafter(threshold, -2.0f)}) {
      probes.push_back(value);
      probes.push_back(-value);
    }
  }
  std::vector<float> input;
  for (size_t start = 0; start < probes.size(); start += 63) {
    input.push_back(input.size() % 128 == 0 ? 1.0f : -1.0f);
    for (size_t i = start; i < start + 63; ++i) input.push_back(i < probes.size() ? probes[i] : 0.25f);
  }
  for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
    for (auto backend : {BitsandbytesBackend::cuda, BitsandbytesBackend::cpu}) {
      expect_quantize_matches(type, backend, input, 64);
    }
  }
}

TEST_F(FastPathTest, SixteenBitInputsQuantizeAsTheirWidenedValues) {
  std::mt19937 generator(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t n = 64 * 37 + 9;
  for (DType dtype : {DType::bf16, DType::f16}) {
    std::vector<uint16_t> bits(static_cast<size_t>(n));
    for (auto& value : bits) value = dtype == DType::bf16 ? float_to_bf16(normal(generator)) : float_to_fp16(normal(generator));
    bits[3] = dtype == DType::bf16 ? 0x0001 : 0x0001;  // smallest subnormal
    std::vector<float> widened(static_cast<size_t>(n));
    convert_to_float(dtype, bits.data(), n, widened.data());
    for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
      std::vector<uint8_t> expected(static_cast<size_t>(packed_byte_count(n))), packed(expected.size());
      std::vector<float> expected_absmax(static_cast<size_t>(quant_block_count(n, 64))), absmax(expected_absmax.size());
      quantize_4bit_reference(type, widened.data(), n, 64, expected.data(), expected_absmax.data());
      quantize_4bit(type, dtype, bits.data(), n, 64, packed.data(), absmax.data());
      EXPECT_EQ(expected, packed);
      EXPECT_EQ(0, std::memcmp(expected_absmax.data(), absmax.data(), absmax.size() * 4));
    }
  }
}

// Random codes and absmax values spanning subnormal products to fp16 overflow.
struct PackedTensor {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
};

PackedTensor random_packed(int64_t n, int64_t blocksize, uint32_t seed) {
  std::mt19937 generator(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> exponent(-45.0f, 10.0f);
  PackedTensor tensor;
  tensor.packed.resize(static_cast<size_t>(packed_byte_count(n)));
  for (auto& value : tensor.packed) value = static_cast<uint8_t>(byte(generator));
  tensor.absmax.resize(static_cast<size_t>(quant_block_count(n, blocksize)));
  for (auto& value : tensor.absmax) value = std::pow(10.0f, exponent(generator)) * (byte(generator) / 64.0f);
  tensor.absmax[0] = 70000.0f;  // overflows float16
  if (tensor.absmax.size() > 1) tensor.absmax[1] = 0.0f;
  return tensor;
}

void expect_dequantize_matches(QuantType type, const PackedTensor& tensor, int64_t n, int64_t blocksize,
                               int64_t output_offset) {
  SCOPED_TRACE(::testing::Message() << "n=" << n << " blocksize=" << blocksize << " offset=" << output_offset);
  std::vector<float> expected(static_cast<size_t>(n));
  dequantize_4bit_reference(type, tensor.packed.data(), tensor.absmax.data(), n, blocksize, expected.data());
  std::vector<float> output(static_cast<size_t>(n + output_offset), 1.0f);
  dequantize_4bit(type, tensor.packed.data(), tensor.absmax.data(), n, blocksize, output.data() + output_offset);
  ASSERT_EQ(0, std::memcmp(expected.data(), output.data() + output_offset, expected.size() * 4));

  std::vector<uint16_t> expected16(static_cast<size_t>(n));
  std::vector<uint16_t> output16(static_cast<size_t>(n + output_offset), 0x1234);
  dequantize_4bit_bf16_reference(type, tensor.packed.data(), tensor.absmax.data(), n, blocksize, expected16.data());
  dequantize_4bit(type, tensor.packed.data(), tensor.absmax.data(), n, blocksize, DType::bf16,
                  output16.data() + output_offset);
  ASSERT_EQ(0, std::memcmp(expected16.data(), output16.data() + output_offset, expected16.size() * 2)) << "bf16";
  dequantize_4bit_fp16_reference(type, tensor.packed.data(), tensor.absmax.data(), n, blocksize, expected16.data());
  dequantize_4bit(type, tensor.packed.data(), tensor.absmax.data(), n, blocksize, DType::f16,
                  output16.data() + output_offset);
  ASSERT_EQ(0, std::memcmp(expected16.data(), output16.data() + output_offset, expected16.size() * 2)) << "fp16";
}

TEST_F(FastPathTest, DequantizationMatchesReferenceBitForBit) {
  for (SimdLevel level : {SimdLevel::scalar, best_simd_level()}) {
    set_simd_level(level);
    for (QuantType type : {QuantType::nf4, QuantType::fp4}) {
      for (int64_t blocksize : {2, 6, 32, 64, 128, 4096}) {
        for (int64_t n : {int64_t{1}, int64_t{33}, blocksize * 5, blocksize * 5 + 17, blocksize * 11 + 1}) {
          const PackedTensor tensor = random_packed(n, blocksize, static_cast<uint32_t>(n * 31 + blocksize));
          for (int64_t offset : {0, 1, 3}) expect_dequantize_matches(type, tensor, n, blocksize, offset);
        }
      }
    }
  }
}

TEST_F(FastPathTest, AShardOfWholeBlocksDequantizesFromOffsetPointers) {
  const int64_t blocksize = 64;
  const int64_t n = blocksize * 20 + 10;
  const PackedTensor tensor = random_packed(n, blocksize, 99);
  std::vector<float> whole(static_cast<size_t>(n));
  dequantize_4bit_reference(QuantType::nf4, tensor.packed.data(), tensor.absmax.data(), n, blocksize, whole.data());
  const int64_t first_block = 7;
  const int64_t shard = n - first_block * blocksize;
  std::vector<float> part(static_cast<size_t>(shard));
  dequantize_4bit(QuantType::nf4, tensor.packed.data() + first_block * blocksize / 2, tensor.absmax.data() + first_block,
                  shard, blocksize, part.data());
  EXPECT_EQ(0, std::memcmp(part.data(), whole.data() + first_block * blocksize, part.size() * 4));
}

// Large enough for several threads and for the streaming-store path (outputs of 16 MiB and more).
TEST_F(FastPathTest, LargeTensorsMatchReferenceOnEveryThreadCount) {
  const int64_t blocksize = 64;
  const int64_t n = (int64_t{9} << 20) + 34;  // 36 MiB of fp32, 18 MiB of bf16 output
  std::mt19937 generator(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> input(static_cast<size_t>(n));
  for (auto& value : input) value = normal(generator);
  std::vector<uint8_t> expected_packed(static_cast<size_t>(packed_byte_count(n)));
  std::vector<float> expected_absmax(static_cast<size_t>(quant_block_count(n, blocksize)));
  quantize_4bit_reference(QuantType::nf4, input.data(), n, blocksize, expected_packed.data(), expected_absmax.data());
  std::vector<float> expected(static_cast<size_t>(n));
  dequantize_4bit_reference(QuantType::nf4, expected_packed.data(), expected_absmax.data(), n, blocksize, expected.data());
  std::vector<uint16_t> expected_bf16(static_cast<size_t>(n));
  dequantize_4bit_bf16_reference(QuantType::nf4, expected_packed.data(), expected_absmax.data(), n, blocksize,
                                 expected_bf16.data());
  for (int threads : {1, 2, 3}) {
    set_kernel_threads(threads);
    std::vector<uint8_t> packed(expected_packed.size());
    std::vector<float> absmax(expected_absmax.size());
    quantize_4bit(QuantType::nf4, input.data(), n, blocksize, packed.data(), absmax.data());
    EXPECT_EQ(0, std::memcmp(packed.data(), expected_packed.data(), packed.size())) << threads;
    std::vector<float> output(static_cast<size_t>(n));
    dequantize_4bit(QuantType::nf4, expected_packed.data(), expected_absmax.data(), n, blocksize, output.data());
    EXPECT_EQ(0, std::memcmp(output.data(), expected.data(), output.size() * 4)) << threads;
    std::vector<uint16_t> output_bf16(static_cast<size_t>(n));
    dequantize_4bit_bf16(QuantType::nf4, expected_packed.data(), expected_absmax.data(), n, blocksize,
                         output_bf16.data());
    EXPECT_EQ(0, std::memcmp(output_bf16.data(), expected_bf16.data(), output_bf16.size() * 2)) << threads;
  }
}

TEST_F(FastPathTest, SimdLevelCanBeForcedDownButNotUp) {
  set_simd_level(SimdLevel::scalar);
  EXPECT_EQ(simd_level(), SimdLevel::scalar);
  set_simd_level(SimdLevel::avx2);
  EXPECT_EQ(simd_level(), best_simd_level());
}

TEST(KernelThreads, ParallelForCoversEveryIndexOnce) {
  set_kernel_threads(3);
  for (int64_t count : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{123457}}) {
    for (int64_t min_chunk : {int64_t{1}, int64_t{10}, int64_t{5000}}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(count));
      parallel_for(count, min_chunk, [&](int64_t begin, int64_t end) {
        ASSERT_LT(begin, end);
        for (int64_t i = begin; i < end; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
      });
      for (int64_t i = 0; i < count; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << count << " " << i;
    }
  }
  set_kernel_threads(0);
}

TEST(KernelThreads, NestedParallelForRunsInline) {
  set_kernel_threads(2);
  std::atomic<int64_t> total{0};
  parallel_for(8, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      parallel_for(100, 1, [&](int64_t inner_begin, int64_t inner_end) { total += inner_end - inner_begin; });
    }
  });
  EXPECT_EQ(total.load(), 800);
  set_kernel_threads(0);
}

}  // namespace
}  // namespace qlora::kernels
