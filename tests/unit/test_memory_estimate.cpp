// The activation-memory estimates (models/memory_estimate.h) against real passes: the peak use
// of the UNet's and the VAE decoder's scratch arenas plus what the pass leaves in the caller's
// arena. The estimate must not be below the measurement (a run it admits must
// fit) and not far above it (≤ 1.5×: it must not refuse runs that fit), at odd sizes, both
// activation dtypes, on every tiny family available.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <random>

#include "models/memory_estimate.h"
#include "models/sd_model.h"

using namespace diffuse;

namespace {

std::vector<std::string> models() {
  std::vector<std::string> out;
  for (const std::string& p :
       {std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors",
        std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd2/model/tiny-sd2.safetensors",
        std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sdxl/model/tiny-sdxl.safetensors"})
    if (std::filesystem::exists(p)) out.push_back(p);
  return out;
}

Tensor randn(const Shape& s, std::mt19937& g) {
  std::normal_distribution<float> n;
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
  return t;
}

void expect_bounds(const std::string& what, size_t est, size_t measured) {
  std::printf("%-60s measured %9zu  estimate %9zu  ratio %.3f\n", what.c_str(), measured, est,
              double(est) / double(measured));
  EXPECT_GE(est, measured) << what;
  EXPECT_LE(double(est), 1.5 * double(measured)) << what;
}

}  // namespace

TEST(MemoryEstimate, UNetPassBoundsItsArenas) {
  const auto paths = models();
  if (paths.empty()) GTEST_SKIP() << "no tiny model found";
  auto be = make_cpu_backend(Precision::F32);
  std::mt19937 rng(1);
  for (const std::string& path : paths) {
    SDLoadOptions o;
    o.text_encoders = o.vae_encoder = o.vae_decoder = false;
    auto m = SDModel::load(path, *be, o);
    const UNetConfig& u = m->unet.config();
    const int64_t sizes[][3] = {{2, 8, 8}, {2, 13, 9}, {4, 24, 40}};
    for (const auto& s : sizes)
      for (DType act : {DType::F32, DType::BF16}) {
        const int64_t B = s[0], h = s[1], w = s[2];
        Workspace ws;
        Arena arena;
        Ctx c{*be, arena, act, &ws};
        const Tensor x = randn({B, h, w, int64_t(u.in_channels)}, rng), ctx = randn({B, 77, int64_t(u.context_dim)}, rng);
        Tensor te, ti;
        if (u.text_time) {
          te = randn({B, int64_t(u.projection_class_embeddings_input_dim - u.num_time_ids * u.addition_time_embed_dim)}, rng);
          ti = Tensor::full({B, int64_t(u.num_time_ids)}, 64.0f);
        }
        m->unet.forward(c, x, std::vector<float>(size_t(B), 500.0f), ctx, te.defined() ? &te : nullptr,
                        ti.defined() ? &ti : nullptr);
        const size_t measured = ws.scratch(Workspace::kUNet).peak() + arena.peak();
        const size_t est = unet_pass_bytes(u, B, h, w, dtype_size(act));
        expect_bounds(std::filesystem::path(path).filename().string() + " unet " + dtype_name(act) + " [" +
                          std::to_string(B) + ", " + std::to_string(h) + ", " + std::to_string(w) + "]",
                      est, measured);
      }
  }
}

TEST(MemoryEstimate, VaeDecodeBoundsItsArenas) {
  const auto paths = models();
  if (paths.empty()) GTEST_SKIP() << "no tiny model found";
  std::mt19937 rng(2);
  for (const std::string& path : paths)
    for (Precision prec : {Precision::F32, Precision::BF16}) {
      auto be = make_cpu_backend(prec);
      if (be->effective_precision() != prec) continue;  // bf16 activations come with bf16 compute
      SDLoadOptions o;
      o.text_encoders = o.unet = o.vae_encoder = false;
      auto m = SDModel::load(path, *be, o);
      const int64_t sizes[][2] = {{8, 8}, {13, 9}, {40, 24}};
      for (const auto& s : sizes) {
        Workspace ws;
        Arena arena;
        Ctx c{*be, arena, DType::F32, &ws};
        const Tensor z = randn({1, s[0], s[1], int64_t(m->vae_cfg.latent_channels)}, rng);
        Tensor img = m->vae.decode(c, z).to(DType::F32);
        const size_t measured = ws.scratch(Workspace::kVAE).peak() + arena.peak() + img.bytes();
        const int64_t f = m->vae_cfg.downscale();
        const size_t act = prec == Precision::BF16 ? 2 : 4;
        const size_t est = vae_decode_bytes(m->vae_cfg, s[0] * f, s[1] * f, act);
        expect_bounds(std::filesystem::path(path).filename().string() + " vae decode " + precision_name(prec) +
                          " latent " + std::to_string(s[0]) + "x" + std::to_string(s[1]),
                      est, measured);
      }
    }
}
