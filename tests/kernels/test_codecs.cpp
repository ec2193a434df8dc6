// Exactness of the kernels/ codecs: bytewise against the golden fixtures bitsandbytes wrote
// (tests/fixtures/kernels, see scripts/make_kernel_fixtures.py), and against hand-derived values for
// the cuda backend's rounding, which the CPU-made fixtures cannot show.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fixture_reader.h"
#include "kernels/double_quant.h"
#include "kernels/dtype.h"
#include "kernels/finite.h"
#include "kernels/int8.h"
#include "kernels/nf4.h"

namespace qlora::kernels {
namespace {

using testing::Fixture;
using testing::load_fixtures;

uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

QuantType quant_type_of(const Fixture& fixture) {
  return fixture.meta("quant_type") == "fp4" ? QuantType::fp4 : QuantType::nf4;
}

DType dtype_of(const std::string& name) {
  if (name == "f16") return DType::f16;
  if (name == "bf16") return DType::bf16;
  return DType::f32;
}

// The fixture's input as raw bytes of its dtype and widened to fp32.
struct Input {
  DType dtype;
  std::vector<uint8_t> raw;
  std::vector<float> widened;
};

Input input_of(const Fixture& fixture) {
  Input input;
  input.dtype = dtype_of(fixture.meta("input_dtype"));
  const auto& entry = fixture.entry("input");
  input.raw = entry.bytes;
  input.widened.resize(entry.count);
  convert_to_float(input.dtype, input.raw.data(), static_cast<int64_t>(entry.count), input.widened.data());
  return input;
}

// Index of the first differing element, or -1.
template <typename T>
int64_t first_difference(const std::vector<T>& expected, const std::vector<T>& actual) {
  if (expected.size() != actual.size()) return 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (std::memcmp(&expected[i], &actual[i], sizeof(T)) != 0) return static_cast<int64_t>(i);
  }
  return -1;
}

// bitsandbytes decodes FP4 nibble 8 as -0.0 in its kernels but as +0.0 in its pure-torch path, which
// it takes for tensors whose last dimension is odd; that sign of zero is the only tolerated difference.
template <typename Bits>
bool torch_path_zero_sign(const Fixture& fixture, const std::vector<uint8_t>& packed, int64_t index, Bits expected,
                          Bits actual) {
  if (quant_type_of(fixture) != QuantType::fp4 || fixture.meta_int("cols") % 2 == 0) return false;
  const uint8_t byte = packed[static_cast<size_t>(index / 2)];
  const uint8_t nibble = index % 2 == 0 ? byte >> 4 : byte & 0x0f;
  const Bits magnitude_bits = static_cast<Bits>(~(Bits{1} << (sizeof(Bits) * 8 - 1)));
  return nibble == 8 && ((expected | actual) & magnitude_bits) == 0;
}

template <typename Bits>
void expect_same_output(const Fixture& fixture, const std::vector<uint8_t>& packed, const std::vector<Bits>& expected,
                        const std::vector<Bits>& actual, const std::string& what) {
  ASSERT_EQ(expected.size(), actual.size()) << fixture.name() << " " << what;
  int64_t mismatches = 0;
  int64_t first = -1;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] == actual[i]) continue;
    if (torch_path_zero_sign(fixture, packed, static_cast<int64_t>(i), expected[i], actual[i])) continue;
    if (first < 0) first = static_cast<int64_t>(i);
    ++mismatches;
  }
  EXPECT_EQ(mismatches, 0) << fixture.name() << " " << what << ": first difference at element " << first
                           << " (expected bits " << std::hex << (first >= 0 ? expected[first] : 0) << ", got "
                           << (first >= 0 ? actual[first] : 0) << std::dec << ")";
}

TEST(CodecFixtures, AreAllPresent) {
  EXPECT_EQ(load_fixtures("4bit").size(), 36u);
  EXPECT_EQ(load_fixtures("double_quant").size(), 3u);
  EXPECT_EQ(load_fixtures("int8").size(), 3u);
  EXPECT_EQ(load_fixtures("tables").size(), 1u);
}

TEST(CodecFixtures, CodeTablesAreBitsandbytesOwn) {
  const auto tables = load_fixtures("tables");
  ASSERT_EQ(tables.size(), 1u);
  const auto nf4 = tables[0].entry("nf4").as<float>();
  const auto fp4 = tables[0].entry("fp4").as<float>();
  const auto dynamic = tables[0].entry("dynamic").as<float>();
  ASSERT_EQ(nf4.size(), 16u);
  ASSERT_EQ(fp4.size(), 16u);
  ASSERT_EQ(dynamic.size(), 256u);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(bits_of(code_table(QuantType::nf4)[i]), bits_of(nf4[i])) << "nf4 " << i;
  for (int i = 0; i < 16; ++i) {
    if (i == 8) continue;
    EXPECT_EQ(bits_of(code_table(QuantType::fp4)[i]), bits_of(fp4[i])) << "fp4 " << i;
  }
  // The stored quant_map holds +0 for nibble 8; the kernels decode it with the sign bit set.
  EXPECT_EQ(bits_of(fp4[8]), 0u);
  EXPECT_EQ(bits_of(code_table(QuantType::fp4)[8]), 0x80000000u);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(bits_of(dynamic_map()[i]), bits_of(dynamic[i])) << "dynamic " << i;
  EXPECT_EQ(dynamic_map()[127], 0.0f);
  EXPECT_EQ(dynamic_map()[255], 1.0f);
}

TEST(CodecFixtures, FourBitQuantizationMatchesBitsandbytesCpuBytewise) {
  for (const Fixture& fixture : load_fixtures("4bit")) {
    SCOPED_TRACE(fixture.name());
    const Input input = input_of(fixture);
    const int64_t n = fixture.meta_int("n");
    const int64_t blocksize = fixture.meta_int("blocksize");
    const QuantType type = quant_type_of(fixture);
    const auto expected_packed = fixture.entry("packed").as<uint8_t>();
    const auto expected_absmax = fixture.entry("absmax").as<float>();
    ASSERT_EQ(static_cast<int64_t>(expected_packed.size()), packed_byte_count(n));
    ASSERT_EQ(static_cast<int64_t>(expected_absmax.size()), quant_block_count(n, blocksize));

    std::vector<uint8_t> packed(expected_packed.size());
    std::vector<float> absmax(expected_absmax.size());
    quantize_4bit_reference(type, input.widened.data(), n, blocksize, packed.data(), absmax.data(),
                            BitsandbytesBackend::cpu);
    EXPECT_EQ(first_difference(expected_packed, packed), -1) << "reference codes";
    EXPECT_EQ(first_difference(expected_absmax, absmax), -1) << "reference absmax";

    std::vector<uint8_t> fast_packed(expected_packed.size());
    std::vector<float> fast_absmax(expected_absmax.size());
    quantize_4bit(type, input.dtype, input.raw.data(), n, blocksize, fast_packed.data(), fast_absmax.data(),
                  BitsandbytesBackend::cpu);
    EXPECT_EQ(first_difference(expected_packed, fast_packed), -1) << "fast codes";
    EXPECT_EQ(first_difference(expected_absmax, fast_absmax), -1) << "fast absmax";
  }
}

// The per-block absmax a fixture's dequantization used: stored, or rebuilt from the nested codes.
std::vector<float> absmax_for_decoding(const Fixture& fixture) {
  if (fixture.meta("nested") != "1") return fixture.entry("absmax").as<float>();
  const auto codes = fixture.entry("absmax_codes").as<uint8_t>();
  const auto nested = fixture.entry("nested_absmax").as<float>();
  const float offset = fixture.entry("offset").as<float>()[0];
  std::vector<float> absmax(codes.size());
  dequantize_absmax(codes.data(), nested.data(), offset, static_cast<int64_t>(codes.size()), absmax.data());
  return absmax;
}

TEST(CodecFixtures, FourBitDequantizationMatchesBitsandbytesBitwise) {
  for (const Fixture& fixture : load_fixtures("4bit")) {
    SCOPED_TRACE(fixture.name());
    const int64_t n = fixture.meta_int("n");
    const int64_t blocksize = fixture.meta_int("blocksize");
    const QuantType type = quant_type_of(fixture);
    const DType input_dtype = dtype_of(fixture.meta("input_dtype"));
    const auto packed = fixture.entry("packed").as<uint8_t>();
    const auto absmax = absmax_for_decoding(fixture);

    std::vector<float> as_f32(static_cast<size_t>(n));
    const std::string f32_entry = input_dtype == DType::f32 ? "dequantized" : "dequantized_f32";
    dequantize_4bit_reference(type, packed.data(), absmax.data(), n, blocksize, as_f32.data());
    std::vector<uint32_t> actual32(static_cast<size_t>(n));
    std::memcpy(actual32.data(), as_f32.data(), actual32.size() * 4);
    expect_same_output(fixture, packed, fixture.entry(f32_entry).as<uint32_t>(), actual32, "fp32 reference");
    dequantize_4bit(type, packed.data(), absmax.data(), n, blocksize, as_f32.data());
    std::memcpy(actual32.data(), as_f32.data(), actual32.size() * 4);
    expect_same_output(fixture, packed, fixture.entry(f32_entry).as<uint32_t>(), actual32, "fp32 fast");

    struct Output16 {
      DType dtype;
      std::string entry;
    };
    std::vector<Output16> outputs;
    if (input_dtype != DType::f32) outputs.push_back({input_dtype, "dequantized"});
    if (fixture.has("dequantized_bf16")) outputs.push_back({DType::bf16, "dequantized_bf16"});
    if (fixture.has("dequantized_f16")) outputs.push_back({DType::f16, "dequantized_f16"});
    for (const auto& output : outputs) {
      std::vector<uint16_t> reference(static_cast<size_t>(n));
      std::vector<uint16_t> fast(static_cast<size_t>(n));
      if (output.dtype == DType::bf16) {
        dequantize_4bit_bf16_reference(type, packed.data(), absmax.data(), n, blocksize, reference.data());
        dequantize_4bit_bf16(type, packed.data(), absmax.data(), n, blocksize, fast.data());
      } else {
        dequantize_4bit_fp16_reference(type, packed.data(), absmax.data(), n, blocksize, reference.data());
        dequantize_4bit_fp16(type, packed.data(), absmax.data(), n, blocksize, fast.data());
      }
      const auto expected = fixture.entry(output.entry).as<uint16_t>();
      expect_same_output(fixture, packed, expected, reference, output.entry + " reference");
      expect_same_output(fixture, packed, expected, fast, output.entry + " fast");
    }
  }
}

TEST(CodecFixtures, NestedAbsmaxMatchesBitsandbytesCpuBytewise) {
  int nested_cases = 0;
  for (const Fixture& fixture : load_fixtures("4bit")) {
    if (fixture.meta("nested") != "1") continue;
    ++nested_cases;
    SCOPED_TRACE(fixture.name());
    const auto plain = fixture.entry("absmax").as<float>();
    const float offset = fixture.entry("offset").as<float>()[0];
    const auto count = static_cast<int64_t>(plain.size());
    EXPECT_EQ(fixture.entry("nested_blocksize").text(), "256");
    EXPECT_EQ(bits_of(absmax_offset(plain.data(), count)), bits_of(offset));
    std::vector<uint8_t> codes(plain.size());
    std::vector<float> nested(static_cast<size_t>(nested_block_count(count)));
    quantize_absmax(plain.data(), count, offset, codes.data(), nested.data(), BitsandbytesBackend::cpu);
    EXPECT_EQ(first_difference(fixture.entry("absmax_codes").as<uint8_t>(), codes), -1);
    EXPECT_EQ(first_difference(fixture.entry("nested_absmax").as<float>(), nested), -1);
  }
  EXPECT_EQ(nested_cases, 4);
}

TEST(CodecFixtures, DoubleQuantizationMatchesBitsandbytesCpuBytewise) {
  for (const Fixture& fixture : load_fixtures("double_quant")) {
    SCOPED_TRACE(fixture.name());
    const auto absmax = fixture.entry("absmax").as<float>();
    const auto count = static_cast<int64_t>(absmax.size());
    const float offset = fixture.entry("offset").as<float>()[0];
    EXPECT_EQ(bits_of(absmax_offset(absmax.data(), count)), bits_of(offset));
    std::vector<uint8_t> codes(absmax.size());
    std::vector<float> nested(static_cast<size_t>(nested_block_count(count)));
    quantize_absmax(absmax.data(), count, offset, codes.data(), nested.data(), BitsandbytesBackend::cpu);
    EXPECT_EQ(first_difference(fixture.entry("absmax_codes").as<uint8_t>(), codes), -1);
    EXPECT_EQ(first_difference(fixture.entry("nested_absmax").as<float>(), nested), -1);
    std::vector<float> restored(absmax.size());
    dequantize_absmax(fixture.entry("absmax_codes").as<uint8_t>().data(),
                      fixture.entry("nested_absmax").as<float>().data(), offset, count, restored.data());
    EXPECT_EQ(first_difference(fixture.entry("restored_absmax").as<float>(), restored), -1);
  }
}

TEST(CodecFixtures, Int8MatchesBitsandbytesBytewise) {
  for (const Fixture& fixture : load_fixtures("int8")) {
    SCOPED_TRACE(fixture.name());
    const int64_t rows = fixture.meta_int("rows");
    const int64_t cols = fixture.meta_int("cols");
    const DType dtype = dtype_of(fixture.meta("input_dtype"));
    const auto input = fixture.entry("input").bytes;
    std::vector<int8_t> codes(static_cast<size_t>(rows * cols));
    std::vector<float> row_absmax(static_cast<size_t>(rows));
    quantize_int8_rows(dtype, input.data(), rows, cols, codes.data(), row_absmax.data());
    EXPECT_EQ(first_difference(fixture.entry("codes").as<int8_t>(), codes), -1);
    EXPECT_EQ(first_difference(fixture.entry("row_absmax").as<float>(), row_absmax), -1);
    std::vector<float> dequantized(codes.size());
    dequantize_int8_rows(fixture.entry("codes").as<int8_t>().data(), fixture.entry("row_absmax").as<float>().data(),
                         rows, cols, dequantized.data());
    EXPECT_EQ(first_difference(fixture.entry("dequantized").as<float>(), dequantized), -1);
  }
}

// The cuda backend scales full blocks as the cpu one does and rounds NF4 at the same midpoints but
// four, so on the same input it must give bitsandbytes' CPU bytes everywhere except the documented
// corners: blocks whose reciprocal overflows (all zeros, subnormals), the last partial block, and
// values lying between the two backends' thresholds of boundaries 0, 8, 12 and 14.
TEST(CodecFixtures, CudaBackendAgreesWithCpuOutsideDocumentedCorners) {
  const float* codes = code_table(QuantType::nf4);
  const float cuda_thresholds[4] = {-0.8480964004993439f, 0.1202552504837513f, 0.5016634166240692f,
                                    0.8614784181118011f};
  const int boundaries[4] = {0, 8, 12, 14};
  for (const Fixture& fixture : load_fixtures("4bit")) {
    if (quant_type_of(fixture) != QuantType::nf4) continue;
    SCOPED_TRACE(fixture.name());
    const Input input = input_of(fixture);
    const int64_t n = fixture.meta_int("n");
    const int64_t blocksize = fixture.meta_int("blocksize");
    const auto expected_packed = fixture.entry("packed").as<uint8_t>();
    const auto expected_absmax = fixture.entry("absmax").as<float>();
    std::vector<uint8_t> packed(expected_packed.size());
    std::vector<float> absmax(expected_absmax.size());
    quantize_4bit(QuantType::nf4, input.widened.data(), n, blocksize, packed.data(), absmax.data());
    int corner_blocks = 0;
    int compared = 0;
    for (int64_t block = 0; block < quant_block_count(n, blocksize); ++block) {
      const float inverse = 1.0f / absmax[block];
      if (!std::isfinite(inverse)) {
        ++corner_blocks;
        // 0 * inf = NaN -> nibble 0 for zeros; the rest saturate to the extreme codes.
        for (int64_t i = block * blocksize; i < std::min(n, (block + 1) * blocksize); ++i) {
          const uint8_t nibble = i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 0x0f;
          const float x = input.widened[i];
          EXPECT_EQ(nibble, x > 0 ? 15 : 0) << "element " << i;
        }
        continue;
      }
      if ((block + 1) * blocksize > n) continue;
      EXPECT_EQ(bits_of(absmax[block]), bits_of(expected_absmax[block])) << "block " << block;
      for (int64_t i = block * blocksize; i < (block + 1) * blocksize; ++i) {
        const float scaled = input.widened[i] * inverse;
        bool between = false;
        for (int k = 0; k < 4; ++k) {
          const float cpu_threshold = (codes[boundaries[k]] + codes[boundaries[k] + 1]) / 2.0f;
          between |= scaled >= std::min(cpu_threshold, cuda_thresholds[k]) &&
                     scaled <= std::max(cpu_threshold, cuda_thresholds[k]);
        }
        if (between) continue;
        ++compared;
        const uint8_t nibble = i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 0x0f;
        const uint8_t expected = i % 2 == 0 ? expected_packed[i / 2] >> 4 : expected_packed[i / 2] & 0x0f;
        EXPECT_EQ(nibble, expected) << "element " << i;
      }
    }
    EXPECT_GE(corner_blocks, 1);
    EXPECT_GE(compared, blocksize / 2);
  }
}

// Fixtures made on a GPU (`make_kernel_fixtures.py --device cuda` into cuda/) pin the cuda backend
// bytewise. bitsandbytes' GPU build uses an approximate reciprocal, so a value within an ulp of a
// boundary may legitimately differ: at most one element in 10,000 is tolerated, none in the absmax.
TEST(CodecFixtures, CudaBackendMatchesBitsandbytesGpuFixturesWhenPresent) {
  const auto fixtures = load_fixtures("4bit", "cuda");
  if (fixtures.empty()) GTEST_SKIP() << "no fixtures from bitsandbytes' CUDA kernels in tests/fixtures/kernels/cuda";
  for (const Fixture& fixture : fixtures) {
    SCOPED_TRACE(fixture.name());
    const Input input = input_of(fixture);
    const int64_t n = fixture.meta_int("n");
    const int64_t blocksize = fixture.meta_int("blocksize");
    const auto expected_packed = fixture.entry("packed").as<uint8_t>();
    const auto expected_absmax = fixture.entry("absmax").as<float>();
    std::vector<uint8_t> packed(expected_packed.size());
    std::vector<float> absmax(expected_absmax.size());
    quantize_4bit(quant_type_of(fixture), input.dtype, input.raw.data(), n, blocksize, packed.data(), absmax.data());
    EXPECT_EQ(first_difference(expected_absmax, absmax), -1);
    int64_t differing = 0;
    for (size_t i = 0; i < packed.size(); ++i) differing += packed[i] != expected_packed[i] ? 1 : 0;
    EXPECT_LE(differing, n / 10000) << "bytes differing";
  }
}

// ---- hand-derived values ---------------------------------------------------------------------------

// Quantizes {leader, value} in one block of 2 (absmax = |leader| = 1, so the scaled value is exact)
// and returns value's nibble.
uint8_t nibble_of(QuantType type, float value, BitsandbytesBackend backend, float leader = 1.0f) {
  const float input[2] = {leader, value};
  uint8_t packed = 0;
  float absmax = 0.0f;
  quantize_4bit_reference(type, input, 2, 2, &packed, &absmax, backend);
  uint8_t fast_packed = 0;
  float fast_absmax = 0.0f;
  quantize_4bit(type, input, 2, 2, &fast_packed, &fast_absmax, backend);
  EXPECT_EQ(packed, fast_packed) << value;
  return packed & 0x0f;
}

TEST(CodecRounding, Nf4CpuTiesAtFp32MidpointsGoToTheLowerCode) {
  const float* codes = code_table(QuantType::nf4);
  for (int i = 0; i < 15; ++i) {
    const float midpoint = (codes[i] + codes[i + 1]) / 2.0f;
    EXPECT_EQ(nibble_of(QuantType::nf4, midpoint, BitsandbytesBackend::cpu), i) << "midpoint " << i;
    EXPECT_EQ(nibble_of(QuantType::nf4, std::nextafter(midpoint, 2.0f), BitsandbytesBackend::cpu), i + 1) << i;
    EXPECT_EQ(nibble_of(QuantType::nf4, codes[i], BitsandbytesBackend::cpu), i) << "code " << i;
    EXPECT_EQ(nibble_of(QuantType::nf4, codes[i], BitsandbytesBackend::cuda), i) << "code " << i;
  }
}

TEST(CodecRounding, Nf4CudaComparesWithItsDecimalThresholds) {
  // dQuantizeNF4's literals, parsed to float as nvcc does; a value equal to one stays below it.
  const float thresholds[15] = {
      -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
      -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
      0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
      0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
  const float* codes = code_table(QuantType::nf4);
  int off_by_one_ulp = 0;
  for (int i = 0; i < 15; ++i) {
    EXPECT_EQ(nibble_of(QuantType::nf4, thresholds[i], BitsandbytesBackend::cuda), i) << i;
    EXPECT_EQ(nibble_of(QuantType::nf4, std::nextafter(thresholds[i], 2.0f), BitsandbytesBackend::cuda), i + 1) << i;
    const float fp32_midpoint = (codes[i] + codes[i + 1]) / 2.0f;
    if (fp32_midpoint != thresholds[i]) {
      ++off_by_one_ulp;
      EXPECT_EQ(std::fabs(fp32_midpoint - thresholds[i]), std::fabs(std::nextafter(fp32_midpoint, 2.0f) - fp32_midpoint));
    }
  }
  // Boundaries 0, 8, 12 and 14: between the two thresholds the backends pick neighbouring codes.
  EXPECT_EQ(off_by_one_ulp, 4);
  const float fp32_midpoint0 = (codes[0] + codes[1]) / 2.0f;  // -0x1.b239bp-1, above the cuda threshold
  EXPECT_EQ(nibble_of(QuantType::nf4, fp32_midpoint0, BitsandbytesBackend::cpu), 0);
  EXPECT_EQ(nibble_of(QuantType::nf4, fp32_midpoint0, BitsandbytesBackend::cuda), 1);
}

TEST(CodecRounding, Fp4CudaUsesItsTruncatedThresholdsAndSignBit) {
  const auto cuda = BitsandbytesBackend::cuda;
  // 0.583333f lies below 7/12; equal goes down to 0.5 (0b101), the next float up to 2/3 (0b010).
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.583333f, cuda), 0b0101);
  EXPECT_EQ(nibble_of(QuantType::fp4, std::nextafter(0.583333f, 1.0f), cuda), 0b0010);
  EXPECT_EQ(nibble_of(QuantType::fp4, -0.583333f, cuda), 0b1101);
  EXPECT_EQ(nibble_of(QuantType::fp4, -std::nextafter(0.583333f, 1.0f), cuda), 0b1010);
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.8333333f, cuda), 0b0010);
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.9f, cuda), 0b0011);
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.0859375f, cuda), 0b0001);
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.2f, cuda), 0b0110);
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.22f, cuda), 0b0111);
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.35f, cuda), 0b0100);
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.0f, cuda), 0b0000);
  EXPECT_EQ(nibble_of(QuantType::fp4, -0.0f, cuda), 0b0000);
  EXPECT_EQ(nibble_of(QuantType::fp4, 1e-9f, cuda), 0b0000);
  EXPECT_EQ(nibble_of(QuantType::fp4, -1e-9f, cuda), 0b1000);
  EXPECT_EQ(nibble_of(QuantType::fp4, -0.00260417f, cuda), 0b1000);
  EXPECT_EQ(nibble_of(QuantType::fp4, -std::nextafter(0.00260417f, 1.0f), cuda), 0b1001);
}

TEST(CodecRounding, Fp4CpuUsesExactMidpointsAndItsZeroOrder) {
  const auto cpu = BitsandbytesBackend::cpu;
  // 7/12 in fp32 is above 0.583333f: between them the backends disagree.
  const float seven_twelfths = (0.5f + 0.6666666865348816f) / 2.0f;
  const float between = std::nextafter(0.583333f, 1.0f);
  ASSERT_LT(between, seven_twelfths);
  EXPECT_EQ(nibble_of(QuantType::fp4, between, cpu), 0b0101);
  EXPECT_EQ(nibble_of(QuantType::fp4, seven_twelfths, cpu), 0b0101);
  EXPECT_EQ(nibble_of(QuantType::fp4, std::nextafter(seven_twelfths, 1.0f), cpu), 0b0010);
  // bucketize puts 0 and tiny negatives on nibble 0, tiny positives on nibble 8.
  EXPECT_EQ(nibble_of(QuantType::fp4, 0.0f, cpu), 0b0000);
  EXPECT_EQ(nibble_of(QuantType::fp4, -1e-9f, cpu), 0b0000);
  EXPECT_EQ(nibble_of(QuantType::fp4, 1e-9f, cpu), 0b1000);
}

TEST(CodecRounding, AllZeroBlockFollowsEachBackend) {
  const std::vector<float> zeros(64, 0.0f);
  std::vector<uint8_t> packed(32);
  float absmax = -1.0f;
  quantize_4bit_reference(QuantType::nf4, zeros.data(), 64, 64, packed.data(), &absmax);
  EXPECT_EQ(absmax, 0.0f);
  for (uint8_t byte : packed) EXPECT_EQ(byte, 0x00);  // 0 * inf = NaN fails every comparison
  std::vector<float> decoded(64);
  dequantize_4bit(QuantType::nf4, packed.data(), &absmax, 64, 64, decoded.data());
  for (float value : decoded) EXPECT_EQ(bits_of(value), 0x80000000u);  // -1.0 * 0 = -0.0

  quantize_4bit_reference(QuantType::nf4, zeros.data(), 64, 64, packed.data(), &absmax, BitsandbytesBackend::cpu);
  EXPECT_EQ(absmax, 0.0f);
  for (uint8_t byte : packed) EXPECT_EQ(byte, 0x77);
  // A partial last block of zeros stores the clamped divisor on the cpu backend.
  quantize_4bit_reference(QuantType::nf4, zeros.data(), 60, 64, packed.data(), &absmax, BitsandbytesBackend::cpu);
  EXPECT_EQ(absmax, 1e-38f);
}

TEST(CodecRounding, OddLengthPadsTheLastByteWithTheCodeOfZero) {
  const float input[3] = {1.0f, -1.0f, 0.5f};
  uint8_t packed[2] = {0xff, 0xff};
  float absmax = 0.0f;
  quantize_4bit(QuantType::nf4, input, 3, 64, packed, &absmax);
  EXPECT_EQ(packed[0], 0xf0);
  EXPECT_EQ(packed[1], (12 << 4) | 7);  // 0.5 -> 0.4407 (12, below 0.5017), padding 0 -> nibble 7
  EXPECT_EQ(absmax, 1.0f);
}

TEST(CodecRounding, DoubleQuantCudaMapsEveryCodeToItselfAndRoundsToANearestCode) {
  // One block of 256 whose absmax is 1: the scaled values are the inputs themselves.
  std::vector<float> values(dynamic_map(), dynamic_map() + 256);
  std::vector<uint8_t> codes(256);
  float block_absmax = 0.0f;
  quantize_8bit_blockwise(dynamic_map(), values.data(), 256, 256, codes.data(), &block_absmax);
  EXPECT_EQ(block_absmax, 1.0f);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(codes[i], i) << "code " << i;

  std::mt19937 generator(7);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (auto& value : values) value = uniform(generator) * std::abs(uniform(generator));
  values[0] = 1.0f;
  quantize_8bit_blockwise(dynamic_map(), values.data(), 256, 256, codes.data(), &block_absmax);
  for (int i = 0; i < 256; ++i) {
    const float chosen = std::fabs(values[i] - dynamic_map()[codes[i]]);
    for (int other = 0; other < 256; ++other) {
      ASSERT_LE(chosen, std::fabs(values[i] - dynamic_map()[other])) << "value " << values[i];
    }
  }
}

TEST(CodecRounding, DoubleQuantRoundTripIsWithinHalfACodeStep) {
  std::mt19937 generator(11);
  std::lognormal_distribution<float> lognormal(-3.0f, 0.5f);
  std::vector<float> absmax(1000);
  for (auto& value : absmax) value = lognormal(generator);
  const float offset = absmax_offset(absmax.data(), 1000);
  for (auto backend : {BitsandbytesBackend::cuda, BitsandbytesBackend::cpu}) {
    std::vector<uint8_t> codes(1000);
    std::vector<float> nested(static_cast<size_t>(nested_block_count(1000)));
    ASSERT_EQ(nested.size(), 4u);
    quantize_absmax(absmax.data(), 1000, offset, codes.data(), nested.data(), backend);
    std::vector<float> restored(1000);
    dequantize_absmax(codes.data(), nested.data(), offset, 1000, restored.data());
    for (int i = 0; i < 1000; ++i) {
      // The widest step of the dynamic map is 0.0141 (near +-1); half of it, scaled, plus the
      // lookup table's grid (1.5e-5) bounds the error.
      EXPECT_LE(std::fabs(restored[i] - absmax[i]), (0.00704f + 1.6e-5f) * nested[i / 256] + 1e-7f) << i;
    }
  }
}

TEST(CodecRounding, Int8ScalesByAReciprocalTimes127) {
  // SCB = 0x1.274p-4 and w = SCB / 2: w * 127 / SCB is exactly 63.5, which a division would round to
  // 64; torch's reciprocal(SCB) * 127 is a hair low, so bitsandbytes stores 63 (seen in its fixture).
  const float scb = 0x1.274p-4f;
  const float row[4] = {scb, scb / 2, -scb / 2, 0.0f};
  int8_t codes[4];
  float absmax = 0.0f;
  quantize_int8_rows(DType::f32, row, 1, 4, codes, &absmax);
  EXPECT_EQ(absmax, scb);
  EXPECT_EQ(codes[0], 127);
  EXPECT_EQ(codes[1], 63);
  EXPECT_EQ(codes[2], -63);
  EXPECT_EQ(codes[3], 0);
  float decoded[4];
  dequantize_int8_rows(codes, &absmax, 1, 4, decoded);
  EXPECT_NEAR(decoded[0], scb, 1e-7f);
  EXPECT_NEAR(decoded[1], scb * 63 / 127, 1e-7f);
  EXPECT_EQ(decoded[3], 0.0f);
  // The float16 cast comes first: 70000 overflows to infinity, so such a row must be refused before.
  EXPECT_EQ(float_to_fp16(70000.0f), 0x7c00);
  // An all-zero row stores SCB 0 and codes 0.
  const float zeros[3] = {0.0f, 0.0f, 0.0f};
  quantize_int8_rows(DType::f32, zeros, 1, 3, codes, &absmax);
  EXPECT_EQ(absmax, 0.0f);
  EXPECT_EQ(codes[0] | codes[1] | codes[2], 0);
}

TEST(CodecFinite, FindsTheFirstNonFiniteValueInEveryFloatFormat) {
  std::vector<float> values(5000, 0.25f);
  EXPECT_TRUE(all_finite(values.data(), 5000));
  EXPECT_EQ(first_non_finite(values.data(), 5000), -1);
  values[3001] = std::numeric_limits<float>::infinity();
  values[4000] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(first_non_finite(values.data(), 5000), 3001);
  EXPECT_FALSE(all_finite(DType::f32, values.data(), 5000));
  values[3001] = std::numeric_limits<float>::max();  // large but finite
  EXPECT_EQ(first_non_finite(values.data(), 5000), 4000);

  std::vector<uint16_t> bf16(2000, float_to_bf16(1.5f));
  EXPECT_TRUE(all_finite(DType::bf16, bf16.data(), 2000));
  bf16[1500] = 0xff80;  // -inf
  EXPECT_EQ(first_non_finite(DType::bf16, bf16.data(), 2000), 1500);

  std::vector<uint16_t> fp16(2000, float_to_fp16(1.5f));
  fp16[10] = 0x7bff;  // 65504, the largest finite half
  EXPECT_TRUE(all_finite(DType::f16, fp16.data(), 2000));
  fp16[1999] = 0x7e00;  // NaN
  EXPECT_EQ(first_non_finite(DType::f16, fp16.data(), 2000), 1999);
}

TEST(CodecFinite, RefusesANonFiniteTensorByName) {
  std::vector<float> values(100, 1.0f);
  EXPECT_NO_THROW(require_finite("model.layers.0.mlp.up_proj.weight", DType::f32, values.data(), 100));
  values[42] = -std::numeric_limits<float>::infinity();
  try {
    require_finite("model.layers.0.mlp.up_proj.weight", DType::f32, values.data(), 100);
    FAIL() << "no exception";
  } catch (const NonFiniteWeight& error) {
    EXPECT_EQ(std::string(error.what()),
              "tensor 'model.layers.0.mlp.up_proj.weight' holds -inf at element 42; refusing to quantize it");
  }
  std::vector<uint16_t> bf16(10, 0);
  bf16[3] = 0x7fc0;
  EXPECT_THROW(require_finite("lm_head.weight", DType::bf16, bf16.data(), 10), NonFiniteWeight);
}

// The round trip stays within half the widest gap between adjacent NF4 codes (0.1609 of absmax,
// between -1 and -0.696), for blocksizes that do and do not divide the tensor; element 2i sits in
// the high nibble; and every block's absmax is its largest magnitude.
TEST(CodecRoundTrip, Nf4ErrorIsWithinHalfTheWidestCodeGapWithTailsAndPacking) {
  std::mt19937 generator(21);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  const float* codes = code_table(QuantType::nf4);
  float widest_gap = 0;
  for (int i = 0; i < 15; ++i) widest_gap = std::max(widest_gap, codes[i + 1] - codes[i]);
  for (int64_t blocksize : {32, 64, 128, 4096}) {
    for (int64_t n : {int64_t{1}, int64_t{63}, blocksize, blocksize * 3 + 17, int64_t{10001}}) {
      std::vector<float> values(n);
      for (auto& value : values) value = normal(generator);
      std::vector<uint8_t> packed(packed_byte_count(n));
      std::vector<float> absmax(quant_block_count(n, blocksize));
      quantize_4bit(QuantType::nf4, values.data(), n, blocksize, packed.data(), absmax.data());
      std::vector<float> decoded(n);
      dequantize_4bit(QuantType::nf4, packed.data(), absmax.data(), n, blocksize, decoded.data());
      for (int64_t block = 0; block < static_cast<int64_t>(absmax.size()); ++block) {
        float largest = 0;
        for (int64_t i = block * blocksize; i < std::min(n, (block + 1) * blocksize); ++i)
          largest = std::max(largest, std::fabs(values[i]));
        ASSERT_EQ(absmax[block], largest) << "blocksize " << blocksize << " n " << n << " block " << block;
      }
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_LE(std::fabs(decoded[i] - values[i]), 0.5f * widest_gap * absmax[i / blocksize] * (1 + 1e-6f))
            << "blocksize " << blocksize << " n " << n << " element " << i;
        const uint8_t nibble = i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 0x0f;
        ASSERT_EQ(decoded[i], codes[nibble] * absmax[i / blocksize]) << "element " << i << " is not where packing says";
      }
    }
  }
  EXPECT_NEAR(widest_gap, 0.3038, 1e-4);
}

}  // namespace
}  // namespace qlora::kernels
