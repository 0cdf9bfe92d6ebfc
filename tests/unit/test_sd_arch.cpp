// SD 1.x checkpoints at any widths (models/sd_arch.h): the tensors `diffuse synth --arch` writes
// load strictly as an SD 1.x model whose detected widths, levels and depths are the architecture's,
// for the demo architecture and for others with fewer or more levels; the modules ldm starts from
// zero are zero; bad architecture files are refused naming the field.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <string>

#include "backend/backend.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "models/sd_arch.h"
#include "models/sd_model.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

std::string write_arch(const SdArch& a, const std::string& name) {
  const std::string path = ::testing::TempDir() + name;
  const std::string res = std::to_string(a.resolution);
  write_synthetic_checkpoint(sd1_ldm_rows(a), "ldm", path, DType::F32, 1, "", false,
                             {{"modelspec.resolution", res + "x" + res}});
  return path;
}

void expect_loads_as(const SdArch& a, const std::string& name) {
  const std::string path = write_arch(a, name);
  EXPECT_EQ(summarize_model(open_model_file(path)).family, Family::SD1);
  auto be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> m = SDModel::load(path, *be);  // strict: every tensor bound, none missing
  EXPECT_EQ(m->unet_cfg.block_out_channels, a.unet_channels);
  EXPECT_EQ(m->unet_cfg.cross_attn, a.unet_attention);
  EXPECT_EQ(m->unet_cfg.layers_per_block, a.unet_layers);
  EXPECT_EQ(m->unet_cfg.context_dim, a.text_width);
  EXPECT_EQ(m->vae_cfg.block_out_channels, a.vae_channels);
  EXPECT_EQ(m->vae_cfg.layers_per_block, a.vae_layers);
  EXPECT_EQ(m->vae_cfg.latent_channels, a.latent_channels);
  EXPECT_EQ(m->te_cfg.width, a.text_width);
  EXPECT_EQ(m->te_cfg.layers, a.text_layers);
  EXPECT_EQ(m->te_cfg.intermediate, a.text_intermediate);
  EXPECT_EQ(m->declared.width, a.resolution);
  fs::remove(path);
}

TEST(SdArch, DemoArchitectureLoadsAsSd1WithItsWidths) { expect_loads_as(SdArch{}, "arch_demo.safetensors"); }

TEST(SdArch, OtherLevelCountsAndDepthsLoad) {
  SdArch a;
  a.unet_channels = {32, 64};
  a.unet_attention = {false, true};
  a.unet_layers = 2;
  a.unet_depth = 2;
  a.vae_channels = {32, 64, 96};
  a.vae_layers = 2;
  a.text_width = 128;
  a.text_layers = 2;
  a.text_intermediate = 96;
  a.resolution = 32;
  expect_loads_as(a, "arch_other.safetensors");
}

TEST(SdArch, ZeroInitialisedModulesAreZeroAndOthersAreNot) {
  const std::string path = write_arch(SdArch{}, "arch_zero.safetensors");
  const TensorFile f = open_model_file(path);
  auto maxabs = [&](const std::string& name) {
    const Tensor* t = f.find(name);
    EXPECT_NE(t, nullptr) << name;
    if (!t) return -1.0;
    const Tensor v = t->to(DType::F32);
    double m = 0;
    for (int64_t i = 0; i < v.numel(); ++i) m = std::max(m, double(std::fabs(v.f32()[i])));
    return m;
  };
  EXPECT_EQ(maxabs("model.diffusion_model.out.2.weight"), 0.0);
  EXPECT_EQ(maxabs("model.diffusion_model.input_blocks.1.0.out_layers.3.weight"), 0.0);
  EXPECT_EQ(maxabs("model.diffusion_model.input_blocks.3.1.proj_out.bias"), 0.0);
  EXPECT_GT(maxabs("model.diffusion_model.input_blocks.1.0.in_layers.2.weight"), 0.0);
  EXPECT_GT(maxabs("first_stage_model.decoder.conv_out.weight"), 0.0);
  EXPECT_GT(maxabs("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"), 0.0);
  fs::remove(path);
}

TEST(SdArch, BadArchitecturesAreRefusedNamingTheField) {
  auto why = [](const std::string& json) {
    try {
      SdArch::from_json(json, "a.json");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(why("{\"bogus\": 1}").find("unknown field \"bogus\""), std::string::npos);
  EXPECT_NE(why("{\"unet_channels\": \"x\"}").find("\"unet_channels\" has the wrong type"), std::string::npos);
  EXPECT_NE(why("{\"unet_channels\": [64, 100, 96]}").find("unet_channels width 100"), std::string::npos);
  EXPECT_NE(why("{\"unet_channels\": [64, 96]}").find("unet_attention has 4 entries for 2"), std::string::npos);
  EXPECT_NE(why("{\"text_width\": 96}").find("text_width 96"), std::string::npos);
  EXPECT_NE(why("{\"resolution\": 50}").find("resolution 50"), std::string::npos);
  EXPECT_NE(why("[1]").find("JSON object"), std::string::npos);
  EXPECT_NE(why("{").find("not valid JSON"), std::string::npos);
  EXPECT_EQ(why("{\"unet_layers\": 2}"), "accepted");
}

}  // namespace
}  // namespace diffuse
