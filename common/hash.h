// Checksums every layer computes: model sources, token-cache keys, the adapter replica check.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace qlora {

// FNV-1a 64-bit in four lanes over 8-byte words, incremental: the stream is cut into 32-byte groups,
// word k (little-endian) of each group goes into lane k (xor, then multiply by the FNV prime); the
// final partial group goes bytewise into lane 0; hex() is FNV-1a 64 over the four lanes' 32 bytes.
// Byte-serial FNV-1a ran at 0.7 GB/s and was a quarter of conversion time; the lanes run at memory speed.
// Used for source checksums, token-cache keys and the adapter drift check.
class Fnv1a64 {
 public:
  void update(const void* data, size_t bytes);
  std::string hex() const;

 private:
  void absorb_group(const uint8_t* group);
  uint64_t lanes_[4] = {14695981039346656037ull, 14695981039346656037ull, 14695981039346656037ull,
                        14695981039346656037ull};
  uint8_t pending_[32] = {};
  size_t pending_bytes_ = 0;
};

}  // namespace qlora
