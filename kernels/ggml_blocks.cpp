// ggml's type table and the scalar block decoders. These loops are the plain per-element form of
// ggml's dequantize_row_*: there is no faster path to check against them yet.
#include "kernels/ggml_blocks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "kernels/dtype.h"

namespace qlora::kernels {
namespace {

// Every type ggml defines, so that files holding types qlora cannot dequantize still get their
// layout checked. Block sizes from ggml.c's type_traits (Q8_1 is 36 bytes there: two fp16, 32 int8;
// the gguf Python package's table still says 40 from when d and s were fp32).
struct TypeEntry {
  uint32_t id;
  GgmlTypeInfo info;
};
constexpr TypeEntry kGgmlTypes[] = {
    {0, {"F32", 1, 4}},          {1, {"F16", 1, 2}},         {2, {"Q4_0", 32, 18}},      {3, {"Q4_1", 32, 20}},
    {6, {"Q5_0", 32, 22}},       {7, {"Q5_1", 32, 24}},      {8, {"Q8_0", 32, 34}},      {9, {"Q8_1", 32, 36}},
    {10, {"Q2_K", 256, 84}},     {11, {"Q3_K", 256, 110}},   {12, {"Q4_K", 256, 144}},   {13, {"Q5_K", 256, 176}},
    {14, {"Q6_K", 256, 210}},    {15, {"Q8_K", 256, 292}},   {16, {"IQ2_XXS", 256, 66}}, {17, {"IQ2_XS", 256, 74}},
    {18, {"IQ3_XXS", 256, 98}},  {19, {"IQ1_S", 256, 50}},   {20, {"IQ4_NL", 32, 18}},   {21, {"IQ3_S", 256, 110}},
    {22, {"IQ2_S", 256, 82}},    {23, {"IQ4_XS", 256, 136}}, {24, {"I8", 1, 1}},         {25, {"I16", 1, 2}},
    {26, {"I32", 1, 4}},         {27, {"I64", 1, 8}},        {28, {"F64", 1, 8}},        {29, {"IQ1_M", 256, 56}},
    {30, {"BF16", 1, 2}},        {34, {"TQ1_0", 256, 54}},   {35, {"TQ2_0", 256, 66}},   {39, {"MXFP4", 32, 17}},
    {40, {"NVFP4", 64, 36}},     {41, {"Q1_0", 128, 18}},
};

uint16_t load_u16(const uint8_t* at) {
  uint16_t value;
  std::memcpy(&value, at, sizeof value);   // tensors need not be aligned in the file
  return value;
}

// ---- block formats (ggml-common.h / ggml-quants.c) ----------------------------------------------
// Q8_0: fp16 d, int8 q[32];          x = q * d
// Q4_0: fp16 d, uint8 qs[16];        x[j] = (qs[j] & 15) - 8) * d, x[j + 16] = ((qs[j] >> 4) - 8) * d
// Q4_1: fp16 d, fp16 m, uint8 qs[16]; x[j] = (qs[j] & 15) * d + m, x[j + 16] = (qs[j] >> 4) * d + m
// Products and sums are single fp32 operations, as in ggml's C and numpy; Q4_1 must not be fused
// into an FMA or the results stop matching the reference bit for bit.

void dequantize_q8_0(const uint8_t* data, int64_t blocks, float* output) {
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = data + b * 34;
    const float d = fp16_to_float(load_u16(block));
    for (int j = 0; j < 32; ++j) output[b * 32 + j] = static_cast<float>(static_cast<int8_t>(block[2 + j])) * d;
  }
}

void dequantize_q4_0(const uint8_t* data, int64_t blocks, float* output) {
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = data + b * 18;
    const float d = fp16_to_float(load_u16(block));
    for (int j = 0; j < 16; ++j) {
      const uint8_t packed = block[2 + j];
      output[b * 32 + j] = static_cast<float>((packed & 0x0f) - 8) * d;
      output[b * 32 + j + 16] = static_cast<float>((packed >> 4) - 8) * d;
    }
  }
}

#if defined(__clang__)
void dequantize_q4_1(const uint8_t* data, int64_t blocks, float* output) {
#pragma clang fp contract(off)
#elif defined(__GNUC__)
__attribute__((optimize("fp-contract=off"))) void dequantize_q4_1(const uint8_t* data, int64_t blocks,
                                                                   float* output) {
#else
void dequantize_q4_1(const uint8_t* data, int64_t blocks, float* output) {
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = data + b * 20;
    const float d = fp16_to_float(load_u16(block));
    const float m = fp16_to_float(load_u16(block + 2));
    for (int j = 0; j < 16; ++j) {
      const uint8_t packed = block[4 + j];
      output[b * 32 + j] = static_cast<float>(packed & 0x0f) * d + m;
      output[b * 32 + j + 16] = static_cast<float>(packed >> 4) * d + m;
    }
  }
}

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t type) {
  for (const TypeEntry& entry : kGgmlTypes) {
    if (entry.id == type) return &entry.info;
  }
  return nullptr;
}

std::string ggml_type_name(uint32_t type) {
  const GgmlTypeInfo* info = ggml_type_info(type);
  return info != nullptr ? info->name : "type " + std::to_string(type);
}

bool ggml_type_dequantizable(uint32_t type) {
  return type == ggml_type::f32 || type == ggml_type::f16 || type == ggml_type::bf16 || type == ggml_type::q8_0 ||
         type == ggml_type::q4_0 || type == ggml_type::q4_1;
}

void dequantize_ggml(uint32_t type, const uint8_t* data, int64_t n, float* output) {
  const GgmlTypeInfo* info = ggml_type_info(type);
  if (!ggml_type_dequantizable(type) || info == nullptr)
    throw std::invalid_argument("dequantize_ggml: cannot dequantize ggml " + ggml_type_name(type));
  if (n < 0 || n % info->block_elements != 0)
    throw std::invalid_argument("dequantize_ggml: " + std::to_string(n) + " elements is not a whole number of " +
                                info->name + " blocks");
  // An empty tensor's buffers may be null, and memcpy must never see a null pointer (found by fuzzing).
  if (n == 0) return;
  switch (type) {
    case ggml_type::f32: std::memcpy(output, data, static_cast<size_t>(n) * sizeof(float)); return;
    case ggml_type::f16:
      for (int64_t i = 0; i < n; ++i) output[i] = fp16_to_float(load_u16(data + 2 * i));
      return;
    case ggml_type::bf16:
      for (int64_t i = 0; i < n; ++i) output[i] = bf16_to_float(load_u16(data + 2 * i));
      return;
    case ggml_type::q8_0: dequantize_q8_0(data, n / 32, output); return;
    case ggml_type::q4_0: dequantize_q4_0(data, n / 32, output); return;
    case ggml_type::q4_1: dequantize_q4_1(data, n / 32, output); return;
    default: break;
  }
}

void quantize_q8_0(const float* input, int64_t n, uint8_t* output) {
  if (n < 0 || n % 32 != 0)
    throw std::invalid_argument("quantize_q8_0: " + std::to_string(n) + " elements is not a whole number of Q8_0 blocks");
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* values = input + b * 32;
    uint8_t* block = output + b * 34;
    float largest = 0.0f;
    for (int j = 0; j < 32; ++j) largest = std::max(largest, std::fabs(values[j]));
    // ggml scales by the reciprocal of the fp32 d (not of its fp16 rounding), so codes may reach
    // +-127 exactly; roundf rounds halves away from zero like ggml's and numpy's np_roundf.
    const float d = largest / 127.0f;
    const float inverse = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t d_bits = float_to_fp16(d);
    std::memcpy(block, &d_bits, sizeof d_bits);
    for (int j = 0; j < 32; ++j)
      block[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(values[j] * inverse)));
  }
}

}  // namespace qlora::kernels
