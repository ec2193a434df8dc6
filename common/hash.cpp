// Four-lane FNV-1a: the checksum of sources, token caches and adapter replicas.
#include "common/hash.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace qlora {

namespace {
constexpr uint64_t kFnvPrime = 1099511628211ull;
}  // namespace

void Fnv1a64::absorb_group(const uint8_t* group) {
  for (int lane = 0; lane < 4; ++lane) {
    uint64_t word;
    std::memcpy(&word, group + 8 * lane, sizeof word);  // little-endian hosts only (x86-64, aarch64)
    lanes_[lane] = (lanes_[lane] ^ word) * kFnvPrime;
  }
}

void Fnv1a64::update(const void* data, size_t bytes) {
  const auto* cursor = static_cast<const uint8_t*>(data);
  if (pending_bytes_ > 0) {
    const size_t take = std::min(bytes, sizeof pending_ - pending_bytes_);
    std::memcpy(pending_ + pending_bytes_, cursor, take);
    pending_bytes_ += take;
    cursor += take;
    bytes -= take;
    if (pending_bytes_ < sizeof pending_) return;
    absorb_group(pending_);
    pending_bytes_ = 0;
  }
  for (; bytes >= 32; cursor += 32, bytes -= 32) absorb_group(cursor);
  std::memcpy(pending_, cursor, bytes);
  pending_bytes_ = bytes;
}

std::string Fnv1a64::hex() const {
  uint64_t lanes[4] = {lanes_[0], lanes_[1], lanes_[2], lanes_[3]};
  for (size_t i = 0; i < pending_bytes_; ++i) lanes[0] = (lanes[0] ^ pending_[i]) * kFnvPrime;
  uint64_t state = 14695981039346656037ull;
  for (const uint64_t lane : lanes)
    for (int byte = 0; byte < 8; ++byte) state = (state ^ ((lane >> (8 * byte)) & 0xff)) * kFnvPrime;
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(state));
  return text;
}

}  // namespace qlora
