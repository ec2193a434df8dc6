// libFuzzer target for the safetensors reader: parses the input as a safetensors image in memory and
// touches the first and last byte of every tensor the reader accepts, so the sanitizers check the
// pointers it hands out. Build and run: see bench/fuzz/README.md or scripts/fuzz.
#include <cstddef>
#include <cstdint>

#include "shard/safetensors.h"

using qlora::FormatError;
using namespace qlora::shard;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<SafetensorsFile> file;
  try {
    file = SafetensorsFile::parse(data, size, "<fuzz>");
  } catch (const FormatError&) {
    return 0;
  }
  for (const SafetensorsEntry& entry : file->entries()) {
    const uint8_t* bytes = file->data(entry);
    if (entry.end > entry.begin) {
      volatile uint8_t first = bytes[0], last = bytes[entry.end - entry.begin - 1];
      (void)first, (void)last;
    }
    (void)file->find(entry.name);
  }
  for (const auto& [key, value] : file->metadata()) (void)key.size(), (void)value.size();
  return 0;
}
