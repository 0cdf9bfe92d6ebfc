// Shared by the `diffuse train lora` end-to-end tests: fixture paths, pattern datasets, the
// trainer's printed figures and safetensors headers.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <regex>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "cli_util.h"
#include "core/arena.h"
#include "io/image.h"
#include "models/sd_model.h"
#include "nn/layers.h"

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


// The training latents of `pattern`: posterior mean × scaling factor of each image (x/127.5 − 1),
// NHWC [1, 8, 8, 4] → NCHW [1, 4, 8, 8], as `--save-latent` writes.
inline std::vector<std::vector<float>> training_latents(const std::string& model_path, int pattern) {
  auto be = diffuse::make_cpu_backend(diffuse::Precision::F32);
  diffuse::SDLoadOptions lo;
  lo.text_encoders = false;
  lo.unet = false;
  lo.vae_decoder = false;
  std::unique_ptr<diffuse::SDModel> model = diffuse::SDModel::load(model_path, *be, lo);
  const float sf = model->vae_cfg.scaling_factor;
  diffuse::Arena arena;
  diffuse::Workspace ws;
  diffuse::Ctx c{*be, arena, diffuse::DType::F32, &ws};
  std::vector<std::vector<float>> out;
  for (int i = 0; i < kImages; ++i) {
    const diffuse::Image im = pattern_image(i, pattern);
    diffuse::Tensor px = diffuse::Tensor::empty({1, kSide, kSide, 3});
    for (size_t k = 0; k < im.pixels.size(); ++k) px.f32()[k] = float(im.pixels[k]) / 127.5f - 1.0f;
    diffuse::Tensor mean = model->vae.encode(c, px).mean.to(diffuse::DType::F32);
    const int64_t h = mean.dim(1), w = mean.dim(2), ch = mean.dim(3);
    std::vector<float> nchw(size_t(mean.numel()));
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        for (int64_t k = 0; k < ch; ++k) nchw[size_t((k * h + y) * w + x)] = mean.f32()[(y * w + x) * ch + k] * sf;
    out.push_back(std::move(nchw));
    arena.reset();
  }
  return out;
}

inline double nearest_msd(const std::vector<float>& g, const std::vector<std::vector<float>>& set) {
  double best = INFINITY;
  for (const auto& t : set) {
    if (t.size() != g.size()) continue;
    double s = 0;
    for (size_t i = 0; i < g.size(); ++i) s += double(g[i] - t[i]) * double(g[i] - t[i]);
    best = std::min(best, s / double(g.size()));
  }
  return best;
}

// The temporary folder (datasets, LoRAs, latents: a few MB) goes at exit unless
// DIFFUSE_KEEP_TEST_FILES is set (each test binary includes this header once).
class RemoveTempDir : public ::testing::Environment {
 public:
  void TearDown() override {
    if (std::getenv("DIFFUSE_KEEP_TEST_FILES")) return;
    std::error_code ec;
    fs::remove_all(temp_dir(), ec);
  }
};
inline const ::testing::Environment* const kRemoveTempDir = ::testing::AddGlobalTestEnvironment(new RemoveTempDir);

}  // namespace clitest
