// The PNG writer for `qlora report`'s plots: 8-bit RGB images with adaptive row filters, the
// image data deflated by zlib (the same library HDF5 and LibTorch already link).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qlora::launcher::png {

// An 8-bit RGB image, rows top to bottom, 3 bytes per pixel, no padding.
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> pixels;  // width * height * 3
};

// The PNG file's bytes: IHDR, a tEXt naming the producer, one IDAT, IEND. Each row takes the filter
// (None, Sub, Up, Average, Paeth) whose output has the smallest sum of absolute values, the usual
// heuristic, which turns the plots' flat colours into long runs of zeros for deflate.
std::vector<uint8_t> encode(const RgbImage& image);

// encode() written atomically to `path` (temporary file, then rename).
void write_file(const std::string& path, const RgbImage& image);

}  // namespace qlora::launcher::png
