// Images: PNG read/write (with tEXt chunks), JPEG read. 8-bit grey, grey+alpha, RGB, RGBA input.
// Files declaring more than kMaxImageSide pixels on a side are refused before any allocation.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffuse {

constexpr int kMaxImageSide = 16384;

struct Image {
  int width = 0, height = 0, channels = 0;  // channels: 1, 2, 3 or 4
  std::vector<uint8_t> pixels;              // row-major HWC, 8-bit
  std::vector<std::pair<std::string, std::string>> text;  // PNG tEXt/iTXt/zTXt (key, value)
  std::string format;                                      // "png" or "jpeg"
};

// Decodes fully; detects the format from the magic bytes (not the extension). Throws
// diffuse::Error "<path>: <problem>" for anything it cannot read.
Image read_image(const std::string& path);
Image decode_image(const uint8_t* data, size_t size, const std::string& name);
// Converts to 3-channel RGB (grey replicated, alpha dropped).
Image to_rgb(const Image& im);
// Writes 8-bit PNG (channels 1-4) with the given tEXt chunks.
void write_png(const std::string& path, const Image& im);

}  // namespace diffuse
