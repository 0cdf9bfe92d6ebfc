// Shared by the `diffuse train lora` end-to-end tests: fixture paths, pattern datasets, the
// trainer's printed figures and safetensors headers.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <regex>
#include <string>

#include <nlohmann/json.hpp>

#include "cli_util.h"
#include "io/image.h"

namespace clitest {

using nlohmann::json;
namespace fs = std::filesystem;

inline std::string data(const std::string& rel) {
  return first_existing({std::string(DIFFUSE_SHARED_DIR) + "/fixtures/" + rel, std::string(DIFFUSE_TEST_DATA) + "/" + rel});
}
inline std::string sd1_model() { return data("sd1/model/tiny-sd1.safetensors"); }

constexpr int kSide = 64;
constexpr int kImages = 8;
constexpr int kSteps = 300;
constexpr int kRank = 8;
const char* const kCaption = "sks pattern";

// One training image with small deterministic noise (±6 per channel, from an LCG seeded by the
// image index): pattern 0 an 8-px checkerboard, orange on teal; pattern 1 8-px horizontal
// stripes, purple on yellow.
inline diffuse::Image pattern_image(int index, int pattern = 0) {
  diffuse::Image im;
  im.width = im.height = kSide;
  im.channels = 3;
  im.pixels.resize(size_t(kSide) * kSide * 3);
  const uint8_t orange[3] = {255, 140, 0}, teal[3] = {0, 128, 128}, purple[3] = {128, 0, 160}, yellow[3] = {240, 220, 0};
  uint64_t s = 0x9e3779b97f4a7c15ull * uint64_t(index + 1);
  for (int y = 0; y < kSide; ++y)
    for (int x = 0; x < kSide; ++x) {
      const bool on = pattern == 0 ? ((x / 8) + (y / 8)) % 2 == 0 : (y / 8) % 2 == 0;
      const uint8_t* c = pattern == 0 ? (on ? orange : teal) : (on ? purple : yellow);
      for (int k = 0; k < 3; ++k) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        const int noise = int((s >> 33) % 13) - 6;
        im.pixels[(size_t(y) * kSide + x) * 3 + k] = uint8_t(std::clamp(int(c[k]) + noise, 0, 255));
      }
    }
  return im;
}

// Writes the dataset: DIR/10_sks/img_N.png + img_N.txt ("sks pattern"), and returns DIR.
inline std::string write_dataset(const std::string& dir, int pattern = 0) {
  fs::create_directories(dir + "/10_sks");
  for (int i = 0; i < kImages; ++i) {
    const std::string base = dir + "/10_sks/img_" + std::to_string(i);
    diffuse::write_png(base + ".png", pattern_image(i, pattern));
    write_file(base + ".txt", std::string(kCaption) + "\n");
  }
  return dir;
}

// ss_tag_frequency as kohya computes it, from the caption files on disk: folder -> tag -> count.
inline json tag_frequency_of(const std::string& dir) {
  json tf = json::object();
  for (const auto& sub : fs::directory_iterator(dir)) {
    if (!sub.is_directory()) continue;
    const std::string folder = sub.path().filename().string();
    for (const auto& f : fs::directory_iterator(sub.path())) {
      if (f.path().extension() != ".txt") continue;
      std::string cap = slurp(f.path().string());
      cap = cap.substr(0, cap.find('\n'));
      size_t start = 0;
      while (start <= cap.size()) {
        size_t comma = cap.find(',', start);
        if (comma == std::string::npos) comma = cap.size();
        std::string tag = cap.substr(start, comma - start);
        tag.erase(0, tag.find_first_not_of(" \t\r"));
        tag.erase(tag.find_last_not_of(" \t\r") + 1);
        if (!tag.empty()) tf[folder][tag] = tf[folder].contains(tag) ? tf[folder][tag].get<int>() + 1 : 1;
        start = comma + 1;
      }
    }
  }
  return tf;
}

struct Header {
  uint64_t size = 0;
  json j;
};
inline Header read_header(const std::string& bytes) {
  Header h;
  if (bytes.size() < 8) return h;
  std::memcpy(&h.size, bytes.data(), 8);
  if (8 + h.size > bytes.size()) return h;
  h.j = json::parse(bytes.substr(8, size_t(h.size)));
  return h;
}

// "validation loss at the start: X" / "at the end: Y" from the trainer's stderr (NaN if absent).
inline double parse_loss(const std::string& err, const std::string& which) {
  std::smatch m;
  if (std::regex_search(err, m, std::regex("validation loss at the " + which + ": ([0-9.eE+-]+|nan|inf)")))
    return std::strtod(m[1].str().c_str(), nullptr);
  return std::nan("");
}

inline int count_lines_with(const std::string& text, const std::string& needle) {
  int n = 0;
  size_t p = 0;
  while ((p = text.find(needle, p)) != std::string::npos) ++n, p += needle.size();
  return n;
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}


}  // namespace clitest
