// libFuzzer target for the GGUF reader: parses the input as a GGUF image in memory, then walks
// everything a caller can reach from a successfully parsed file (typed metadata getters, tensor
// data, dequantization, the Llama config) so the sanitizers see every pointer the reader hands out.
// Build and run: see bench/fuzz/README.md or scripts/fuzz.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "shard/gguf.h"
#include "shard/safetensors.h"

using qlora::FormatError;
using namespace qlora::shard;
using qlora::FormatError;

namespace {

// Exercises one metadata entry through the getter its type calls for; type errors are FormatErrors.
void touch_metadata(const GgufFile& file, const GgufMetadata& entry) {
  try {
    switch (entry.type) {
      case GgufType::string: (void)file.get_string(entry.key); break;
      case GgufType::float32: case GgufType::float64: (void)file.get_float(entry.key); break;
      case GgufType::boolean: (void)file.get_bool(entry.key); break;
      case GgufType::array:
        (void)file.get_array_length(entry.key);
        if (entry.element_type == GgufType::string) (void)file.get_string_array(entry.key);
        else if (entry.element_type == GgufType::float32 || entry.element_type == GgufType::float64)
          (void)file.get_float_array(entry.key);
        else if (entry.element_type != GgufType::array && entry.element_type != GgufType::boolean)
          (void)file.get_int_array(entry.key);
        break;
      default: (void)file.get_int(entry.key); break;
    }
  } catch (const FormatError&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<GgufFile> file;
  try {
    file = GgufFile::parse(data, size, "<fuzz>");
  } catch (const FormatError&) {
    return 0;
  }
  for (const GgufMetadata& entry : file->metadata()) touch_metadata(*file, entry);
  std::vector<float> values;
  for (const GgufTensor& tensor : file->tensors()) {
    const uint8_t* bytes = file->data(tensor);
    if (tensor.bytes > 0) {
      volatile uint8_t first = bytes[0], last = bytes[tensor.bytes - 1];   // ASan checks both ends
      (void)first, (void)last;
    }
    // Bounded: a tensor of a million elements already covers every code path of the decoders.
    if (qlora::kernels::ggml_type_dequantizable(tensor.type) && tensor.numel() <= (1 << 20)) {
      values.resize(static_cast<size_t>(tensor.numel()));
      file->dequantize(tensor, values.data());
    }
  }
  try {
    (void)llama_config_from_gguf(*file);
  } catch (const FormatError&) {
  }
  return 0;
}
