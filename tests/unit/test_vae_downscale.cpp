// A VAE with fewer levels than SD's four shrinks the image fewer times (models/vae.h downscale():
// 2^(levels-1)), and generate() sizes its latents by that factor, not by SD's fixed 8: an SD 1.x
// model whose VAE has three levels (factor 4) draws a W×H image from [H/4, W/4] latents, txt2img
// and img2img alike; the usual four-level VAE keeps [H/8, W/8].
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "backend/backend.h"
#include "models/sd_arch.h"
#include "models/sd_model.h"
#include "pipeline/generate.h"

namespace diffuse {
namespace {

std::string write_model(const std::vector<int>& vae_channels, const std::string& name) {
  SdArch a;
  a.unet_channels = {32, 64};
  a.unet_attention = {true, false};
  a.vae_channels = vae_channels;
  a.text_layers = 1;
  a.text_intermediate = 64;
  a.resolution = 32;
  const std::string path = ::testing::TempDir() + name;
  write_synthetic_checkpoint(sd1_ldm_rows(a), "ldm", path, DType::F32, 3, "", false, {});
  return path;
}

// One image of p's size (40×24) from [24/factor, 40/factor] latents.
Result generate_one(const SDModel& m, Backend& be, const GenerateParams& p, int64_t factor) {
  std::vector<Result> r = generate(m, be, p);
  EXPECT_EQ(r.size(), 1u);
  if (r.empty()) return {};
  EXPECT_EQ(r[0].image.width, 40);
  EXPECT_EQ(r[0].image.height, 24);
  EXPECT_EQ(r[0].latent.dim(2), 24 / factor) << r[0].latent.str();
  EXPECT_EQ(r[0].latent.dim(3), 40 / factor) << r[0].latent.str();
  return r[0];
}

// Generates 40×24 (not square, so that height and width cannot be confused) and checks the image's
// and the latent's sizes.
void expect_sizes(const std::vector<int>& vae_channels, int64_t factor) {
  const std::string path = write_model(vae_channels, "vae_downscale_" + std::to_string(factor) + ".safetensors");
  auto be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> m = SDModel::load(path, *be);
  ASSERT_EQ(m->vae_cfg.downscale(), factor);
  GenerateParams p;
  p.prompt = "a red circle";
  p.width = 40;
  p.height = 24;
  p.steps = 2;
  const Result r = generate_one(*m, *be, p, factor);

  // img2img: the init image is encoded to the same latent size.
  GenerateParams q = p;
  q.init = &r.image;
  q.strength = 0.5;
  generate_one(*m, *be, q, factor);
  std::filesystem::remove(path);
}

TEST(VaeDownscale, ThreeLevelVaeDrawsFromQuarterSizeLatents) { expect_sizes({32, 32, 64}, 4); }

TEST(VaeDownscale, FourLevelVaeKeepsEighthSizeLatents) { expect_sizes({32, 32, 64, 64}, 8); }

}  // namespace
}  // namespace diffuse
