// A VAE decode that overflows in reduced precision (bf16) is decoded again in fp32, with a
// warning: the image then equals an fp32 decode of the same final latent. The overflow is forced
// with GenerateParams::test_decode_hook (a real bf16 overflow needs activations within 0.4% of
// FLT_MAX, which no fixture reaches).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "models/sd_model.h"
#include "pipeline/generate.h"

using namespace diffuse;

namespace {
const std::string kModel = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";

GenerateParams params() {
  GenerateParams p;
  p.prompt = "a cat";
  p.width = p.height = 64;
  p.steps = 2;
  p.seed = 5;
  p.sampler = "euler";
  p.batch = 2;
  return p;
}
}  // namespace

TEST(DecodeRetry, OverflowingBf16DecodeIsRedoneInFp32WithAWarning) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  auto be = make_cpu_backend(Precision::BF16);
  if (be->effective_precision() != Precision::BF16)
    GTEST_SKIP() << "this CPU has no bf16 compute (no AVX512-BF16/AMX): decodes run in fp32, nothing to retry";
  auto model = SDModel::load(kModel, *be);
  GenerateParams p = params();
  std::vector<std::string> warnings;
  int hooked = 0;
  p.on_warning = [&](const std::string& w) { warnings.push_back(w); };
  p.test_decode_hook = [&](Tensor& d) {  // image 2's bf16 decode "overflows"
    if (hooked++ == 1) d.f32()[7] = std::numeric_limits<float>::infinity();
  };
  std::vector<Result> out = generate(*model, *be, p);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(hooked, 2);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("image 2"), std::string::npos) << warnings[0];
  EXPECT_NE(warnings[0].find("fp32"), std::string::npos) << warnings[0];

  // Reference: the same final latent decoded by an fp32 model.
  auto be32 = make_cpu_backend(Precision::F32);
  SDLoadOptions o;
  o.text_encoders = o.unet = o.vae_encoder = false;
  auto vae32 = SDModel::load(kModel, *be32, o);
  for (int i = 0; i < 2; ++i) {
    const Tensor& lat = out[size_t(i)].latent;  // [1, 4, h, w] NCHW, before dividing by the scaling factor
    const int64_t C = lat.dim(1), H = lat.dim(2), W = lat.dim(3);
    Tensor z = Tensor::empty({1, H, W, C});
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x)
          z.f32()[(y * W + x) * C + c] = lat.f32()[(c * H + y) * W + x] / model->vae_cfg.scaling_factor;
    Arena arena;
    Ctx c{*be32, arena, DType::F32};
    Tensor d = vae32->vae.decode(c, z).to(DType::F32);
    size_t differ = 0;
    for (int64_t k = 0; k < d.numel(); ++k) {
      const float v = std::clamp(d.f32()[k] / 2.0f + 0.5f, 0.0f, 1.0f);
      differ += out[size_t(i)].image.pixels[size_t(k)] != uint8_t(std::nearbyint(v * 255.0f));
    }
    if (i == 1) EXPECT_EQ(differ, 0u) << "image 2 should be the fp32 decode";
    else std::printf("image 1 (bf16 decode) differs from the fp32 decode in %zu of %lld values\n", differ,
                     (long long)d.numel());
  }
}

TEST(DecodeRetry, NoWarningWithoutOverflow) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  auto be = make_cpu_backend(Precision::BF16);
  auto model = SDModel::load(kModel, *be);
  GenerateParams p = params();
  std::vector<std::string> warnings;
  p.on_warning = [&](const std::string& w) { warnings.push_back(w); };
  EXPECT_EQ(generate(*model, *be, p).size(), 2u);
  EXPECT_TRUE(warnings.empty());
}
