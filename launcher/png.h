// A self-contained PNG writer for `qlora report`: the project's fixed dependencies hold no image or
// zlib library, so this file carries its own CRC-32, Adler-32 and deflate (stored blocks, or one
// fixed-Huffman block fed by a greedy LZ77 matcher, which suits flat-coloured plots well).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qlora::launcher::png {

// CRC-32 as PNG and zlib define it (reflected polynomial 0xEDB88320); pass the previous result to
// continue a running checksum.
uint32_t crc32(const uint8_t* data, size_t size, uint32_t previous = 0);
// Adler-32 as zlib defines it (modulus 65521, starting value 1).
uint32_t adler32(const uint8_t* data, size_t size, uint32_t previous = 1);

enum class Deflate {
  stored,         // uncompressed blocks of at most 65535 bytes
  fixed_huffman,  // one block with the fixed code of RFC 1951 section 3.2.6 and LZ77 matches
};

// A complete zlib stream (RFC 1950 header, deflate data, Adler-32 of `data`).
std::vector<uint8_t> zlib_compress(const uint8_t* data, size_t size, Deflate mode);

// An 8-bit RGB image, rows top to bottom, 3 bytes per pixel, no padding.
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;  // width * height * 3
};

// The PNG file's bytes. With Deflate::stored every row uses filter 0 (None), so the image data
// are readable as is; otherwise each row takes the filter (None, Sub, Up, Average, Paeth) whose
// output has the smallest sum of absolute values, the usual heuristic.
std::vector<uint8_t> encode(const RgbImage& image, Deflate mode = Deflate::fixed_huffman);

// encode() written atomically to `path` (temporary file, then rename).
void write_file(const std::string& path, const RgbImage& image, Deflate mode = Deflate::fixed_huffman);

}  // namespace qlora::launcher::png
