// slow: full-size random-weight checkpoints written from the real SD 1.5, 2.1 and XL manifests,
// in both layouts, load with every tensor bound (strict: none missing, none unused), and one UNet
// forward at a 64×64 latent runs. Writes up to ~7 GB per checkpoint under $DIFFUSE_SLOW_DIR
// (default /tmp) and deletes it afterwards. Not part of `make test`: run `make test-slow`.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "models/sd_model.h"
#include "models/synthetic.h"

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

struct Case {
  const char* manifest;
  const char* layout;
};

std::string manifest_path(const std::string& name) {
  return find_manifest(name, {std::string(DIFFUSE_TEST_DATA) + "/manifests", std::string(DIFFUSE_SHARED_DIR) + "/manifests"});
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class FullSize : public ::testing::TestWithParam<Case> {};

}  // namespace

TEST_P(FullSize, WritesLoadsAndRunsUNet) {
  const Case& c = GetParam();
  const char* env = std::getenv("DIFFUSE_SLOW_DIR");
  fs::path dir = fs::path(env ? env : "/tmp") / (std::string("diffuse-full-") + c.manifest + "-" + c.layout);
  fs::remove_all(dir);
  fs::path out = std::string(c.layout) == "ldm" ? fs::path(dir.string() + ".safetensors") : dir;
  std::string tsv = manifest_path(c.manifest);
  ASSERT_FALSE(tsv.empty()) << "manifest " << c.manifest << " not found";

  auto t0 = std::chrono::steady_clock::now();
  SynthStats st = write_synthetic_checkpoint(read_manifest(tsv), c.layout, out.string(), DType::F16, 1,
                                             manifest_config_path(tsv), false);
  std::printf("%s %s: wrote %lld tensors, %.2f GB in %.1f s\n", c.manifest, c.layout,
              static_cast<long long>(st.tensors), double(st.bytes) / 1e9, seconds_since(t0));

  {
    auto be = make_cpu_backend(Precision::BF16);
    t0 = std::chrono::steady_clock::now();
    // Strict loading: any missing, mis-shaped or unused tensor throws here.
    std::unique_ptr<SDModel> m = SDModel::load(out.string(), *be);
    std::printf("  loaded (family %s, UNet %s) in %.1f s\n", family_name(m->family), m->unet_cfg.str().c_str(),
                seconds_since(t0));
    Family want = std::string(c.manifest) == "sd15" ? Family::SD1
                  : std::string(c.manifest) == "sd21" ? Family::SD2 : Family::SDXL;
    EXPECT_EQ(m->family, want);

    Arena arena;
    Ctx ctx{*be, arena};
    Tensor x = Tensor::zeros({1, 64, 64, 4});
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = std::sin(float(i) * 0.01f);
    Tensor context = Tensor::zeros({1, 77, m->unet_cfg.context_dim});
    Tensor text_embeds, time_ids;
    if (m->unet_cfg.text_time) {
      text_embeds = Tensor::zeros({1, m->te2_cfg.projection_dim});
      time_ids = Tensor::full({1, 6}, 512.0f);
    }
    t0 = std::chrono::steady_clock::now();
    Tensor y = m->unet.forward(ctx, x, {500.0f}, context, text_embeds.defined() ? &text_embeds : nullptr,
                               time_ids.defined() ? &time_ids : nullptr);
    std::printf("  UNet forward at 64x64 latent (bf16): %.2f s\n", seconds_since(t0));
    ASSERT_EQ(y.shape(), Shape({1, 64, 64, 4}));
    for (int64_t i = 0; i < y.numel(); ++i) ASSERT_TRUE(std::isfinite(y.f32()[i])) << "non-finite output at " << i;
  }
  fs::remove_all(out);
}

INSTANTIATE_TEST_SUITE_P(Manifests, FullSize,
                         ::testing::Values(Case{"sd15", "ldm"}, Case{"sd15", "diffusers"}, Case{"sd21", "ldm"},
                                           Case{"sd21", "diffusers"}, Case{"sdxl", "ldm"}, Case{"sdxl", "diffusers"}),
                         [](const auto& info) {
                           return std::string(info.param.manifest) + "_" + info.param.layout;
                         });
