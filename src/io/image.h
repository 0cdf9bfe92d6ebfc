// Images: PNG read/write (with tEXt chunks), JPEG read/write. 8-bit grey, grey+alpha, RGB, RGBA input.
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
// Writes 8-bit PNG (channels 1-4) with the given tEXt chunks, through write_file_safely
// (io/output_file.h: symlinks followed, devices and FIFOs written in place, regular files
// replaced atomically).
void write_png(const std::string& path, const Image& im);
// The PNG file write_png would write, in memory. Errors start with "encode_png: ".
std::vector<uint8_t> encode_png(const Image& im);

// Baseline JPEG, quality 1-100 (4:4:4 chroma at 90 and above, else 4:2:0), Huffman-optimized.
// Grey (1 channel) stays grey, RGB stays RGB; grey+alpha and RGBA lose their alpha.
// Text: only the "parameters" entry is kept, as JPEG COM (comment) markers holding its bytes
// verbatim (split into several markers past 65533 bytes). A1111 itself stores it in the EXIF
// UserComment instead; read_image does not read either back. Errors start with "encode_jpeg: ".
std::vector<uint8_t> encode_jpeg(const Image& im, int quality = 95);
// encode_jpeg, written through write_file_safely; errors start with the path.
void write_jpeg(const std::string& path, const Image& im, int quality = 95);

}  // namespace diffuse
