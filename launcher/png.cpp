// PNG encoding for the report's plots: chunk framing with CRC-32, a zlib stream with Adler-32, and
// a deflate encoder limited to stored and fixed-Huffman blocks (RFC 1950, 1951, PNG spec 2nd ed.).
#include "launcher/png.h"

#include <algorithm>
#include <array>
#include <cassert>
#include <cstdlib>

#include "common/atomic_file.h"
#include "launcher/adapter_io.h"

namespace qlora::launcher::png {
namespace {

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t byte = 0; byte < 256; ++byte) {
    uint32_t value = byte;
    for (int bit = 0; bit < 8; ++bit) value = (value & 1) ? 0xEDB88320u ^ (value >> 1) : value >> 1;
    table[byte] = value;
  }
  return table;
}

// Deflate writes bits least significant first; Huffman codes go most significant bit first, so
// they are reversed before being handed to put().
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}

  void put(uint32_t bits, int count) {
    assert(count >= 0 && count <= 24);
    buffer_ |= static_cast<uint64_t>(bits) << filled_;
    filled_ += count;
    while (filled_ >= 8) {
      out_.push_back(static_cast<uint8_t>(buffer_));
      buffer_ >>= 8;
      filled_ -= 8;
    }
  }
  void put_huffman(uint32_t code, int length) {
    uint32_t reversed = 0;
    for (int i = 0; i < length; ++i) reversed |= ((code >> i) & 1u) << (length - 1 - i);
    put(reversed, length);
  }
  void align_to_byte() {
    if (filled_ > 0) put(0, 8 - filled_);
  }

 private:
  std::vector<uint8_t>& out_;
  uint64_t buffer_ = 0;
  int filled_ = 0;
};

// RFC 1951 3.2.5: match lengths 3..258 map to symbols 257..285, distances 1..32768 to codes 0..29.
constexpr std::array<int, 29> kLengthBase = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                             31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
constexpr std::array<int, 29> kLengthExtra = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                              2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
constexpr std::array<int, 30> kDistanceBase = {1,    2,    3,    4,    5,    7,     9,     13,    17,  25,
                                               33,   49,   65,   97,   129,  193,   257,   385,   513, 769,
                                               1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
constexpr std::array<int, 30> kDistanceExtra = {0, 0, 0, 0, 1, 1, 2, 2,  3,  3,  4,  4,  5,  5,  6,
                                                6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

void put_fixed_symbol(BitWriter& bits, int symbol) {
  // The fixed literal/length code (RFC 1951 3.2.6).
  if (symbol < 144) bits.put_huffman(0x30 + symbol, 8);
  else if (symbol < 256) bits.put_huffman(0x190 + (symbol - 144), 9);
  else if (symbol < 280) bits.put_huffman(symbol - 256, 7);
  else bits.put_huffman(0xC0 + (symbol - 280), 8);
}

void put_match(BitWriter& bits, int length, int distance) {
  int length_code = 28;
  while (kLengthBase[length_code] > length) --length_code;
  put_fixed_symbol(bits, 257 + length_code);
  bits.put(static_cast<uint32_t>(length - kLengthBase[length_code]), kLengthExtra[length_code]);
  int distance_code = 29;
  while (kDistanceBase[distance_code] > distance) --distance_code;
  bits.put_huffman(static_cast<uint32_t>(distance_code), 5);
  bits.put(static_cast<uint32_t>(distance - kDistanceBase[distance_code]), kDistanceExtra[distance_code]);
}

void deflate_stored(const uint8_t* data, size_t size, std::vector<uint8_t>& out) {
  BitWriter bits(out);
  size_t offset = 0;
  do {
    const size_t length = std::min<size_t>(size - offset, 65535);
    const bool last = offset + length == size;
    bits.put(last ? 1 : 0, 1);
    bits.put(0, 2);  // BTYPE 00: stored
    bits.align_to_byte();
    out.push_back(static_cast<uint8_t>(length));
    out.push_back(static_cast<uint8_t>(length >> 8));
    out.push_back(static_cast<uint8_t>(~length));
    out.push_back(static_cast<uint8_t>(~length >> 8));
    out.insert(out.end(), data + offset, data + offset + length);
    offset += length;
  } while (offset < size);
}

// Greedy LZ77 over a 32 KiB window with hash chains of 3-byte prefixes; chains are searched to a
// bounded depth, which keeps the encoder linear and is plenty for images of flat colours.
void deflate_fixed(const uint8_t* data, size_t size, std::vector<uint8_t>& out) {
  constexpr int kWindow = 32768;
  constexpr int kMinMatch = 3;
  constexpr int kMaxMatch = 258;
  constexpr int kHashBits = 15;
  constexpr int kMaxChain = 32;
  std::vector<int64_t> head(size_t{1} << kHashBits, -1);
  std::vector<int64_t> previous(kWindow, -1);
  auto hash_at = [&](size_t position) {
    const uint32_t key = (uint32_t{data[position]} << 16) | (uint32_t{data[position + 1]} << 8) | data[position + 2];
    return (key * 2654435761u) >> (32 - kHashBits);
  };
  auto insert = [&](size_t position) {
    if (position + kMinMatch > size) return;
    const uint32_t hash = hash_at(position);
    previous[position % kWindow] = head[hash];
    head[hash] = static_cast<int64_t>(position);
  };

  BitWriter bits(out);
  bits.put(1, 1);  // BFINAL: the only block
  bits.put(1, 2);  // BTYPE 01: fixed Huffman
  size_t position = 0;
  while (position < size) {
    int best_length = 0;
    size_t best_distance = 0;
    if (position + kMinMatch <= size) {
      const size_t limit = std::min<size_t>(kMaxMatch, size - position);
      int64_t candidate = head[hash_at(position)];
      for (int chain = 0; candidate >= 0 && chain < kMaxChain; ++chain) {
        const size_t distance = position - static_cast<size_t>(candidate);
        if (distance > kWindow) break;
        size_t length = 0;
        while (length < limit && data[candidate + length] == data[position + length]) ++length;
        if (static_cast<int>(length) > best_length) {
          best_length = static_cast<int>(length);
          best_distance = distance;
          if (length == limit) break;
        }
        const int64_t next = previous[static_cast<size_t>(candidate) % kWindow];
        if (next >= candidate) break;  // the slot was reused by a newer position: the chain ended
        candidate = next;
      }
    }
    if (best_length >= kMinMatch) {
      put_match(bits, best_length, static_cast<int>(best_distance));
      for (int i = 0; i < best_length; ++i) insert(position + i);
      position += best_length;
    } else {
      put_fixed_symbol(bits, data[position]);
      insert(position);
      ++position;
    }
  }
  put_fixed_symbol(bits, 256);  // end of block
  bits.align_to_byte();
}

void append_be32(std::vector<uint8_t>& out, uint32_t value) {
  out.push_back(static_cast<uint8_t>(value >> 24));
  out.push_back(static_cast<uint8_t>(value >> 16));
  out.push_back(static_cast<uint8_t>(value >> 8));
  out.push_back(static_cast<uint8_t>(value));
}

void append_chunk(std::vector<uint8_t>& out, const char type[4], const std::vector<uint8_t>& data) {
  append_be32(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  append_be32(out, crc32(out.data() + type_at, 4 + data.size()));
}

int paeth_predictor(int left, int up, int upper_left) {
  const int estimate = left + up - upper_left;
  const int to_left = std::abs(estimate - left);
  const int to_up = std::abs(estimate - up);
  const int to_upper_left = std::abs(estimate - upper_left);
  if (to_left <= to_up && to_left <= to_upper_left) return left;
  if (to_up <= to_upper_left) return up;
  return upper_left;
}

// The filtered scanlines: a filter-type byte, then the row's bytes minus their prediction.
std::vector<uint8_t> filter_rows(const RgbImage& image, bool adaptive) {
  const size_t stride = static_cast<size_t>(image.width) * 3;
  std::vector<uint8_t> out;
  out.reserve((stride + 1) * static_cast<size_t>(image.height));
  const std::vector<uint8_t> zero_row(stride, 0);
  std::vector<uint8_t> candidate(stride);
  std::vector<uint8_t> best(stride);
  for (int y = 0; y < image.height; ++y) {
    const uint8_t* row = image.pixels.data() + static_cast<size_t>(y) * stride;
    const uint8_t* above = y > 0 ? row - stride : zero_row.data();
    if (!adaptive) {
      out.push_back(0);
      out.insert(out.end(), row, row + stride);
      continue;
    }
    int best_filter = -1;
    uint64_t best_cost = 0;
    for (int filter = 0; filter <= 4; ++filter) {
      uint64_t cost = 0;
      for (size_t i = 0; i < stride; ++i) {
        const int left = i >= 3 ? row[i - 3] : 0;
        const int upper_left = i >= 3 ? above[i - 3] : 0;
        int prediction = 0;
        switch (filter) {
          case 1: prediction = left; break;
          case 2: prediction = above[i]; break;
          case 3: prediction = (left + above[i]) / 2; break;
          case 4: prediction = paeth_predictor(left, above[i], upper_left); break;
          default: break;
        }
        candidate[i] = static_cast<uint8_t>(row[i] - prediction);
        cost += static_cast<uint64_t>(std::abs(static_cast<int8_t>(candidate[i])));
      }
      if (best_filter < 0 || cost < best_cost) {
        best_filter = filter;
        best_cost = cost;
        best.swap(candidate);
      }
    }
    out.push_back(static_cast<uint8_t>(best_filter));
    out.insert(out.end(), best.begin(), best.end());
  }
  return out;
}

}  // namespace

uint32_t crc32(const uint8_t* data, size_t size, uint32_t previous) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  uint32_t crc = ~previous;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t adler32(const uint8_t* data, size_t size, uint32_t previous) {
  constexpr uint32_t kModulus = 65521;
  // 5552 is the most bytes whose sums cannot overflow 32 bits before the next reduction.
  constexpr size_t kRun = 5552;
  uint32_t low = previous & 0xFFFF;
  uint32_t high = previous >> 16;
  while (size > 0) {
    const size_t run = std::min(size, kRun);
    for (size_t i = 0; i < run; ++i) {
      low += data[i];
      high += low;
    }
    low %= kModulus;
    high %= kModulus;
    data += run;
    size -= run;
  }
  return (high << 16) | low;
}

std::vector<uint8_t> zlib_compress(const uint8_t* data, size_t size, Deflate mode) {
  std::vector<uint8_t> out;
  // CMF 0x78: deflate with a 32 KiB window; FLG makes (CMF * 256 + FLG) a multiple of 31 and
  // records the compression level only as a hint (fastest for stored, default otherwise).
  out.push_back(0x78);
  out.push_back(mode == Deflate::stored ? 0x01 : 0x9C);
  if (mode == Deflate::stored) deflate_stored(data, size, out);
  else deflate_fixed(data, size, out);
  append_be32(out, adler32(data, size));
  return out;
}

std::vector<uint8_t> encode(const RgbImage& image, Deflate mode) {
  assert(image.width > 0 && image.height > 0);
  assert(image.pixels.size() == static_cast<size_t>(image.width) * static_cast<size_t>(image.height) * 3);
  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> header;
  append_be32(header, static_cast<uint32_t>(image.width));
  append_be32(header, static_cast<uint32_t>(image.height));
  header.push_back(8);  // bit depth
  header.push_back(2);  // colour type: truecolour (RGB)
  header.push_back(0);  // compression: deflate
  header.push_back(0);  // filter method: adaptive, five types
  header.push_back(0);  // no interlace
  append_chunk(out, "IHDR", header);
  const std::string software = "Software";
  std::vector<uint8_t> text(software.begin(), software.end());
  text.push_back(0);
  const std::string producer = "qlora report";
  text.insert(text.end(), producer.begin(), producer.end());
  append_chunk(out, "tEXt", text);
  const std::vector<uint8_t> scanlines = filter_rows(image, mode != Deflate::stored);
  append_chunk(out, "IDAT", zlib_compress(scanlines.data(), scanlines.size(), mode));
  append_chunk(out, "IEND", {});
  return out;
}

void write_file(const std::string& path, const RgbImage& image, Deflate mode) {
  const auto bytes = encode(image, mode);
  write_file_atomically(path, std::string(bytes.begin(), bytes.end()));
}

}  // namespace qlora::launcher::png
