// Live previews (pipeline/preview.h): the per-family latent → RGB factors on a hand-made latent
// give the pixels worked out here by hand, and the on_latent hook (GenerateParams, and the
// engine's Callbacks) sees every scheduler step, its last latent being the result's.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "api/engine.h"
#include "core/error.h"
#include "models/sd_model.h"
#include "pipeline/generate.h"
#include "pipeline/preview.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

const std::string kModel = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";

// 0..255 from a value in [-1, 1], as the VAE output is mapped.
int to_byte(double v) { return int(std::lround(std::clamp((v + 1.0) / 2.0, 0.0, 1.0) * 255.0)); }

// Element (c, y, x) of an NCHW [1, 4, h, w] tensor.
float nchw_at(const Tensor& t, int64_t c, int64_t y, int64_t x) {
  return t.f32()[(c * t.dim(2) + y) * t.dim(3) + x];
}

}  // namespace

// Two pixels of a 2-image batch, worked out from the published rows (ComfyUI latent_formats.py).
TEST(LatentPreview, FactorsGiveTheExpectedPixels) {
  Tensor lat = Tensor::zeros({2, 1, 2, 4});
  // Image 1: pixel (0, 0) = (1, 0, 0, 0) picks row 0; pixel (0, 1) = (0.5, -1, 2, 0.25).
  const float px0[4] = {1, 0, 0, 0}, px1[4] = {0.5f, -1, 2, 0.25f};
  std::copy(px0, px0 + 4, lat.f32() + 8);
  std::copy(px1, px1 + 4, lat.f32() + 12);

  Image sd = latent_preview(lat, 1, Family::SD1);
  ASSERT_EQ(sd.width, 2);
  ASSERT_EQ(sd.height, 1);
  ASSERT_EQ(sd.channels, 3);
  ASSERT_EQ(sd.pixels.size(), 6u);
  // Row 0 of the SD factors: 0.3512 0.2297 0.3227.
  EXPECT_EQ(sd.pixels[0], to_byte(0.3512));
  EXPECT_EQ(sd.pixels[1], to_byte(0.2297));
  EXPECT_EQ(sd.pixels[2], to_byte(0.3227));
  // 0.5·row0 − row1 + 2·row2 + 0.25·row3.
  EXPECT_EQ(sd.pixels[3], to_byte(0.5 * 0.3512 - 0.3250 + 2 * -0.2829 + 0.25 * -0.2120));
  EXPECT_EQ(sd.pixels[4], to_byte(0.5 * 0.2297 - 0.4974 + 2 * 0.1762 + 0.25 * -0.2616));
  EXPECT_EQ(sd.pixels[5], to_byte(0.5 * 0.3227 - 0.2350 + 2 * 0.2721 + 0.25 * -0.7177));
  // SD 2.x has the same VAE; an unknown family falls back to it.
  EXPECT_EQ(latent_preview(lat, 1, Family::SD2).pixels, sd.pixels);
  EXPECT_EQ(latent_preview(lat, 1, Family::Unknown).pixels, sd.pixels);

  // SDXL: other factors plus a bias (0.1084, -0.0175, -0.0011).
  Image xl = latent_preview(lat, 1, Family::SDXL);
  EXPECT_EQ(xl.pixels[0], to_byte(0.3651 + 0.1084));
  EXPECT_EQ(xl.pixels[1], to_byte(0.4232 - 0.0175));
  EXPECT_EQ(xl.pixels[2], to_byte(0.4341 - 0.0011));
  EXPECT_EQ(xl.pixels[3], to_byte(0.5 * 0.3651 + 0.2533 + 2 * 0.1076 + 0.25 * -0.3165 + 0.1084));
  EXPECT_EQ(xl.pixels[4], to_byte(0.5 * 0.4232 + 0.0042 + 2 * 0.1111 + 0.25 * -0.2492 - 0.0175));
  EXPECT_EQ(xl.pixels[5], to_byte(0.5 * 0.4341 - 0.1068 + 2 * -0.0362 + 0.25 * -0.2188 - 0.0011));
  EXPECT_NE(xl.pixels, sd.pixels);

  // A zero latent is mid grey (SD) and image 0 is read, not image 1.
  Image grey = latent_preview(lat, 0, Family::SD1);
  for (uint8_t v : grey.pixels) EXPECT_EQ(v, 128);  // 0.5 × 255 = 127.5, rounded to 128
}

TEST(LatentPreview, ClampsAndRefusesBadInput) {
  Tensor lat = Tensor::full({1, 1, 2, 4}, 100.0f);
  lat.f32()[4] = lat.f32()[5] = lat.f32()[6] = lat.f32()[7] = NAN;
  Image im = latent_preview(lat, 0, Family::SD1);
  // Row sums: R 0.1813, G 0.6417, B 0.1121 (all positive): 100 × that clamps to white.
  EXPECT_EQ(im.pixels[0], 255);
  EXPECT_EQ(im.pixels[1], 255);
  EXPECT_EQ(im.pixels[2], 255);
  EXPECT_EQ(im.pixels[3], 0);  // NaN: black, not undefined behaviour
  EXPECT_THROW(latent_preview(lat, 1, Family::SD1), Error);
  EXPECT_THROW(latent_preview(Tensor::zeros({1, 4, 2, 2}), 0, Family::SD1), Error);
  EXPECT_THROW(latent_preview(Tensor(), 0, Family::SD1), Error);
}

// The pipeline's hook: once per scheduler step, 1-based, the whole batch NHWC; the last one is
// the final latent (Result::latent, NCHW per image).
TEST(LatentPreview, GenerateCallsOnLatentEveryStep) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  auto be = make_cpu_backend(Precision::F32);
  auto model = SDModel::load(kModel, *be);
  GenerateParams p;
  p.prompt = "a cat";
  p.width = 64;
  p.height = 48;
  p.steps = 3;
  p.seed = 7;
  p.sampler = "euler";
  p.batch = 2;
  std::vector<int> steps_seen;
  Tensor last;
  p.on_latent = [&](const Tensor& lat, int step, int steps) {
    EXPECT_EQ(lat.shape().str(), "[2, 6, 8, 4]");
    EXPECT_EQ(lat.dtype(), DType::F32);
    EXPECT_EQ(steps, 3);
    steps_seen.push_back(step);
    last = lat.clone();
    Image im = latent_preview(lat, 1, model->family);  // what the server does with it
    EXPECT_EQ(im.width, 8);
    EXPECT_EQ(im.height, 6);
  };
  std::vector<Result> out = generate(*model, *be, p);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(steps_seen, (std::vector<int>{1, 2, 3}));
  ASSERT_TRUE(last.defined());
  for (int64_t b = 0; b < 2; ++b) {
    const Tensor& r = out[size_t(b)].latent;
    ASSERT_EQ(r.shape().str(), "[1, 4, 6, 8]");
    for (int64_t y = 0; y < 6; ++y)
      for (int64_t x = 0; x < 8; ++x)
        for (int64_t c = 0; c < 4; ++c)
          ASSERT_EQ(last.f32()[((b * 6 + y) * 8 + x) * 4 + c], nchw_at(r, c, y, x)) << b << " " << y << " " << x;
  }
}

// The engine passes Callbacks::on_latent through.
TEST(LatentPreview, EngineCallbackSeesEveryStep) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  const fs::path cache = fs::temp_directory_path() / ("diffuse_test_preview_" + std::to_string(::getpid()));
  api::EngineOptions o;
  o.precision = "fp32";
  o.hash_cache_dir = cache.string();
  api::Engine engine(o);
  api::Request r;
  r.model = kModel;
  r.prompt = "a cat";
  r.width = r.height = 64;
  r.steps = 2;
  r.seed = 3;
  r.sampler = "euler";
  api::Callbacks cb;
  std::vector<int> steps_seen;
  Tensor last;
  cb.on_latent = [&](const Tensor& lat, int step, int steps) {
    EXPECT_EQ(lat.shape().str(), "[1, 8, 8, 4]");
    EXPECT_EQ(steps, 2);
    steps_seen.push_back(step);
    last = lat.clone();
  };
  api::RunResult res = engine.generate(r, cb);
  std::error_code ec;
  fs::remove_all(cache, ec);
  ASSERT_EQ(res.images.size(), 1u);
  EXPECT_EQ(steps_seen, (std::vector<int>{1, 2}));
  const Tensor& lat = res.images[0].latent;
  for (int64_t y = 0; y < 8; ++y)
    for (int64_t x = 0; x < 8; ++x)
      for (int64_t c = 0; c < 4; ++c) ASSERT_EQ(last.f32()[(y * 8 + x) * 4 + c], nchw_at(lat, c, y, x));
}
