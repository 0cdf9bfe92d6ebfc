// An SDXL ControlNet on the tiny SDXL base (../shared/fixtures/sdxl; the fixtures hold no SDXL
// ControlNet, so this test writes one in diffusers' ControlNetModel layout): the trunk is the
// base UNet's own conv_in, time and add (text_time) embedding, down blocks and mid block, copied
// by name as diffusers' ControlNetModel.from_unet does; the conditioning embedding and the zero
// convs are written by the test. With identity zero convs and a conditioning embedding whose last
// conv is zero, the residuals are the UNet's skip connections and mid-block output (read from a
// UNet::forward_train trace); with a live embedding the first residual adds embed_hint(hint).
// The file binds strictly (a missing add_embedding tensor names the file and the tensor) and
// does not fit an SD 1.x UNet.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "backend/backend.h"
#include "core/arena.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/controlnet.h"
#include "models/sd_model.h"
#include "nn/layers.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

const fs::path kSdxl = fs::path(DIFFUSE_SHARED_DIR) / "fixtures" / "sdxl" / "model";

Tensor randn(const Shape& s, std::mt19937& g, float sd) {
  Tensor t = Tensor::empty(s);
  std::normal_distribution<float> n(0.0f, sd);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
  return t;
}

// [C, C, 1, 1] identity.
Tensor identity_conv(int64_t c) {
  Tensor t = Tensor::zeros({c, c, 1, 1});
  for (int64_t i = 0; i < c; ++i) t.f32()[i * c + i] = 1.0f;
  return t;
}

double rel_diff(const Tensor& a, const Tensor& b) {
  const Tensor fa = a.to(DType::F32), fb = b.to(DType::F32);
  EXPECT_EQ(fa.shape(), fb.shape());
  double d = 0, m = 1;
  for (int64_t i = 0; i < std::min(fa.numel(), fb.numel()); ++i) {
    d = std::max(d, std::fabs(double(fa.f32()[i]) - double(fb.f32()[i])));
    m = std::max(m, std::fabs(double(fb.f32()[i])));
  }
  return d / m;
}

class SdxlControlNetTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const fs::path unet_file = kSdxl / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors";
    if (!fs::exists(unet_file) || !fs::exists(kSdxl / "diffusers" / "model_index.json")) return;
    be_ = make_cpu_backend(Precision::F32);
    SDLoadOptions lo;
    lo.text_encoders = lo.vae_encoder = lo.vae_decoder = false;
    model_ = SDModel::load((kSdxl / "diffusers").string(), *be_, lo);
    tmp_ = fs::temp_directory_path() / ("diffuse_test_controlnet_sdxl_" + std::to_string(::getpid()));
    fs::create_directories(tmp_);
    // The trunk by name from the UNet (diffusers' from_unet), the rest written here.
    const TensorFile unet = load_safetensors(unet_file.string());
    for (const TensorEntry& e : unet.tensors) {
      const std::string& n = e.name;
      for (const char* p : {"conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block."})
        if (n.rfind(p, 0) == 0) trunk_.emplace_back(n, e.tensor.to(DType::F32));
    }
  }
  static void TearDownTestSuite() {
    model_.reset();
    be_.reset();
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  void SetUp() override {
    if (!model_) GTEST_SKIP() << "the tiny SDXL fixture (../shared/fixtures/sdxl/model/diffusers) is not here";
  }

  // A ControlNet file: the trunk, a conditioning embedding (8, 8, 16, 16: a hint 8× the latent)
  // whose conv_out is zero unless live_embedding, identity zero convs. Returns its path.
  static std::string write_controlnet(const std::string& name, bool live_embedding,
                                      const std::string& drop = "") {
    const UNetConfig& u = model_->unet_cfg;
    std::mt19937 g(1234);
    std::vector<std::pair<std::string, Tensor>> t;
    for (const auto& [n, v] : trunk_)
      if (n != drop) t.emplace_back(n, v);
    const std::vector<int64_t> ec = {8, 8, 16, 16};
    const std::string e = "controlnet_cond_embedding.";
    t.emplace_back(e + "conv_in.weight", randn({ec[0], 3, 3, 3}, g, 0.3f));
    t.emplace_back(e + "conv_in.bias", randn({ec[0]}, g, 0.1f));
    for (size_t i = 0; i + 1 < ec.size(); ++i) {
      t.emplace_back(e + "blocks." + std::to_string(2 * i) + ".weight", randn({ec[i], ec[i], 3, 3}, g, 0.2f));
      t.emplace_back(e + "blocks." + std::to_string(2 * i) + ".bias", randn({ec[i]}, g, 0.1f));
      t.emplace_back(e + "blocks." + std::to_string(2 * i + 1) + ".weight", randn({ec[i + 1], ec[i], 3, 3}, g, 0.2f));
      t.emplace_back(e + "blocks." + std::to_string(2 * i + 1) + ".bias", randn({ec[i + 1]}, g, 0.1f));
    }
    const int64_t C0 = u.block_out_channels[0];
    t.emplace_back(e + "conv_out.weight",
                   live_embedding ? randn({C0, ec.back(), 3, 3}, g, 0.2f) : Tensor::zeros({C0, ec.back(), 3, 3}));
    t.emplace_back(e + "conv_out.bias", live_embedding ? randn({C0}, g, 0.1f) : Tensor::zeros({C0}));
    // One zero conv per skip connection: conv_in, each down resnet, each downsampler.
    std::vector<int64_t> skip = {C0};
    for (int l = 0; l < u.levels(); ++l) {
      for (int j = 0; j < u.layers_per_block; ++j) skip.push_back(u.block_out_channels[size_t(l)]);
      if (l + 1 < u.levels()) skip.push_back(u.block_out_channels[size_t(l)]);
    }
    for (size_t i = 0; i < skip.size(); ++i) {
      t.emplace_back("controlnet_down_blocks." + std::to_string(i) + ".weight", identity_conv(skip[i]));
      t.emplace_back("controlnet_down_blocks." + std::to_string(i) + ".bias", Tensor::zeros({skip[i]}));
    }
    const int64_t cm = u.block_out_channels.back();
    t.emplace_back("controlnet_mid_block.weight", identity_conv(cm));
    t.emplace_back("controlnet_mid_block.bias", Tensor::zeros({cm}));
    const std::string path = (tmp_ / name).string();
    save_safetensors(path, t);
    return path;
  }

  // Inputs for a batch of 2 at a 8×8 latent (64×64 pixels).
  struct Inputs {
    Tensor x, context, text_embeds, time_ids, hint;
    std::vector<float> t = {321.0f, 321.0f};
  };
  static Inputs inputs() {
    const UNetConfig& u = model_->unet_cfg;
    std::mt19937 g(99);
    Inputs in;
    in.x = randn({2, 8, 8, u.in_channels}, g, 1.0f);
    in.context = randn({2, 77, u.context_dim}, g, 1.0f);
    const int64_t pooled = u.projection_class_embeddings_input_dim - u.num_time_ids * u.addition_time_embed_dim;
    in.text_embeds = randn({2, pooled}, g, 1.0f);
    in.time_ids = Tensor::empty({2, u.num_time_ids});
    const float ids[] = {64, 64, 0, 0, 64, 64};
    for (int r = 0; r < 2; ++r)
      for (int k = 0; k < u.num_time_ids; ++k) in.time_ids.f32()[r * u.num_time_ids + k] = ids[k % 6];
    in.hint = Tensor::empty({1, 64, 64, 3});
    for (int64_t i = 0; i < in.hint.numel(); ++i) in.hint.f32()[i] = float((i * 37) % 255) / 255.0f;
    return in;
  }

  // The ControlNet's residuals at scale 1 and the UNet's own pass (every skip and block input
  // kept) on the same inputs.
  struct Run {
    Arena arena;
    Ctx c{*be_, arena};
    Inputs in = inputs();
    Tensor emb;
    ControlResiduals r;
    UNetTrace trace;
    explicit Run(const ControlNet& cn) {
      emb = cn.embed_hint(c, in.hint);
      r = cn.forward(c, in.x, in.t, in.context, emb, 1.0f, &in.text_embeds, &in.time_ids);
      model_->unet.forward_train(c, in.x, in.t, in.context, &in.text_embeds, &in.time_ids, trace);
    }
  };

  static inline std::unique_ptr<Backend> be_;
  static inline std::unique_ptr<SDModel> model_;
  static inline std::vector<std::pair<std::string, Tensor>> trunk_;
  static inline fs::path tmp_;
};

TEST_F(SdxlControlNetTest, TrunkResidualsAreTheUNetsSkipsAndMidOutput) {
  const UNetConfig& u = model_->unet_cfg;
  ASSERT_TRUE(u.text_time) << "the tiny SDXL UNet has no add_embedding";
  ControlNet cn = ControlNet::load_file(write_controlnet("sdxl_cn.safetensors", false), *be_);
  EXPECT_TRUE(cn.config().unet.text_time);
  EXPECT_EQ(cn.config().hint_downscale(), 8);
  EXPECT_NO_THROW(cn.check_compatible(u));
  ASSERT_EQ(cn.num_skips(), model_->unet.num_skips());

  Run run(cn);
  Ctx& c = run.c;
  const Inputs& in = run.in;
  const Tensor& emb = run.emb;
  const ControlResiduals& r = run.r;
  const UNetTrace& trace = run.trace;
  ASSERT_EQ(r.down.size(), trace.skips.size());
  double worst = 0;
  for (size_t i = 0; i < r.down.size(); ++i) worst = std::max(worst, rel_diff(r.down[i], trace.skips[i]));
  // Block inputs in order: the down path's resnets, attentions and downsamplers, then mid_res0,
  // mid_attn, mid_res1; the next input (the first up resnet's) is the mid block's output.
  size_t blocks = 0;
  for (int l = 0; l < u.levels(); ++l)
    blocks += size_t(u.layers_per_block) * (u.cross_attn[size_t(l)] ? 2 : 1) + (l + 1 < u.levels() ? 1 : 0);
  ASSERT_GT(trace.inputs.size(), blocks + 3);
  const double mid = rel_diff(r.mid, trace.inputs[blocks + 3]);
  std::printf("  SDXL ControlNet trunk vs UNet: %zu skips max relative |Δ| %.3g, mid %.3g\n", r.down.size(), worst, mid);
  EXPECT_LE(worst, 1e-5);
  EXPECT_LE(mid, 1e-5);
  // The residuals feed the SDXL UNet; scale 0.5 halves every one.
  EXPECT_NO_THROW(model_->unet.forward(c, in.x, in.t, in.context, &in.text_embeds, &in.time_ids, &r.down, &r.mid));
  const ControlResiduals h = cn.forward(c, in.x, in.t, in.context, emb, 0.5f, &in.text_embeds, &in.time_ids);
  Tensor half = r.mid.to(DType::F32);
  for (int64_t i = 0; i < half.numel(); ++i) half.f32()[i] *= 0.5f;
  EXPECT_LE(rel_diff(h.mid, half), 1e-6);
  // Without the added conditioning an SDXL ControlNet refuses to run.
  EXPECT_THROW(cn.forward(c, in.x, in.t, in.context, emb, 1.0f), Error);
}

TEST_F(SdxlControlNetTest, TheHintEmbeddingAddsToTheFirstSkip) {
  ControlNet cn = ControlNet::load_file(write_controlnet("sdxl_cn_live.safetensors", true), *be_);
  const Run run(cn);
  const Tensor& emb = run.emb;
  const ControlResiduals& r = run.r;
  const UNetTrace& trace = run.trace;
  // residual 0 = conv_in(x) + embedding (identity zero conv), the embedding shared by both rows.
  Tensor want = trace.skips[0].to(DType::F32).clone();
  const Tensor e = emb.to(DType::F32);
  const int64_t per = e.numel();
  ASSERT_EQ(want.numel(), 2 * per);
  double emax = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    want.f32()[i] += e.f32()[i % per];
    emax = std::max(emax, double(std::fabs(e.f32()[i % per])));
  }
  const double d = rel_diff(r.down[0], want);
  std::printf("  first residual vs conv_in(x) + embed_hint(hint): max relative |Δ| %.3g (max|embedding| %.3g)\n", d,
              emax);
  EXPECT_GT(emax, 1e-2) << "the embedding is zero: the check would test nothing";
  EXPECT_LE(d, 1e-5);
  // The later residuals see the hint too: they differ from the UNet's skips.
  EXPECT_GT(rel_diff(r.down.back(), trace.skips.back()), 1e-4);
}

TEST_F(SdxlControlNetTest, StrictBindingAndWrongArchitectureNameTheFile) {
  const std::string dropped = "add_embedding.linear_2.weight";
  const std::string path = write_controlnet("sdxl_cn_missing.safetensors", false, dropped);
  try {
    ControlNet::load_file(path, *be_);
    ADD_FAILURE() << "a ControlNet without " << dropped << " was accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find(path), std::string::npos) << m;
    EXPECT_NE(m.find("add_embedding.linear_2"), std::string::npos) << m;
  }
  ControlNet cn = ControlNet::load_file(write_controlnet("sdxl_cn_ok.safetensors", false), *be_);
  try {
    cn.check_compatible(UNetConfig::sd15());
    ADD_FAILURE() << "an SDXL ControlNet was accepted for an SD 1.5 UNet";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("does not fit"), std::string::npos) << m;
    EXPECT_NE(m.find("text_time"), std::string::npos) << m;
  }
}

}  // namespace
}  // namespace diffuse
