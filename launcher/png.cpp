// PNG encoding for the report's plots (PNG spec 2nd ed.): row filtering and chunk framing are
// written here; zlib supplies the deflate stream and the chunks' CRC-32.
#include "launcher/png.h"

#include <zlib.h>

#include <cassert>
#include <cstdlib>
#include <new>

#include "common/atomic_file.h"

namespace qlora::launcher::png {
namespace {

void append_be32(std::vector<uint8_t>& out, uint32_t value) {
  out.push_back(static_cast<uint8_t>(value >> 24));
  out.push_back(static_cast<uint8_t>(value >> 16));
  out.push_back(static_cast<uint8_t>(value >> 8));
  out.push_back(static_cast<uint8_t>(value));
}

// Length, type, data, then the CRC-32 of type and data.
void append_chunk(std::vector<uint8_t>& out, const char type[4], const std::vector<uint8_t>& data) {
  append_be32(out, static_cast<uint32_t>(data.size()));
  const size_t type_at = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  const uLong crc = crc32(0L, out.data() + type_at, static_cast<uInt>(4 + data.size()));
  append_be32(out, static_cast<uint32_t>(crc));
}

// A zlib stream (RFC 1950) of `data` at zlib's default level: on the report's plots level 9 saves
// under a tenth of the bytes for three times the time.
std::vector<uint8_t> zlib_compress(const std::vector<uint8_t>& data) {
  uLongf size = compressBound(data.size());
  std::vector<uint8_t> out(size);
  const int status = compress2(out.data(), &size, data.data(), data.size(), Z_DEFAULT_COMPRESSION);
  if (status == Z_MEM_ERROR) throw std::bad_alloc();
  assert(status == Z_OK);  // compressBound() leaves room for any input
  out.resize(size);
  return out;
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
std::vector<uint8_t> filter_rows(const RgbImage& image) {
  const size_t stride = static_cast<size_t>(image.width) * 3;
  std::vector<uint8_t> out;
  out.reserve((stride + 1) * static_cast<size_t>(image.height));
  const std::vector<uint8_t> zero_row(stride, 0);
  std::vector<uint8_t> candidate(stride);
  std::vector<uint8_t> best(stride);
  for (int y = 0; y < image.height; ++y) {
    const uint8_t* row = image.pixels.data() + static_cast<size_t>(y) * stride;
    const uint8_t* above = y > 0 ? row - stride : zero_row.data();
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

std::vector<uint8_t> encode(const RgbImage& image) {
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
  append_chunk(out, "IDAT", zlib_compress(filter_rows(image)));
  append_chunk(out, "IEND", {});
  return out;
}

void write_file(const std::string& path, const RgbImage& image) {
  const auto bytes = encode(image);
  write_file_atomically(path, std::string(bytes.begin(), bytes.end()));
}

}  // namespace qlora::launcher::png
