// A1111's prompt extras in the pipeline: variation seeds (the slerp against A1111's formula written
// here in double, strength 1 = the subseed's own image, the noise composed by hand through the
// denoising loop) and prompt editing (the loop run by hand with the two prompts' guidance switched
// at A1111's step).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>

#include "core/layout.h"
#include "pipeline/conditioning.h"
#include "pipeline/denoise.h"
#include "pipeline/generate.h"
#include "pipeline/scheduler.h"
#include "pipeline/variation.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

std::string model_path() {
  for (const std::string& base : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/", std::string(DIFFUSE_TEST_DATA) + "/"})
    if (fs::exists(base + "sd1/model/tiny-sd1.safetensors")) return base + "sd1/model/tiny-sd1.safetensors";
  return "";
}

double max_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double m = 0;
  for (int64_t i = 0; i < std::min(a.numel(), b.numel()); ++i) m = std::max(m, double(std::fabs(a.f32()[i] - b.f32()[i])));
  return m;
}

// A1111's slerp (modules/rng.py) in double: norms over dim 1 of [C, H, W].
Tensor ref_slerp(double val, const Tensor& low, const Tensor& high) {
  const int64_t C = low.dim(0), H = low.dim(1), W = low.dim(2);
  Tensor out = Tensor::empty(low.shape());
  auto at = [&](const Tensor& t, int64_t c, int64_t h, int64_t w) { return double(t.f32()[(c * H + h) * W + w]); };
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) {
      double nl = 0, nh = 0;
      for (int64_t h = 0; h < H; ++h) {
        nl += at(low, c, h, w) * at(low, c, h, w);
        nh += at(high, c, h, w) * at(high, c, h, w);
      }
      nl = std::sqrt(nl);
      nh = std::sqrt(nh);
      double dot = 0;
      for (int64_t h = 0; h < H; ++h) dot += at(low, c, h, w) / nl * at(high, c, h, w) / nh;
      const double om = std::acos(dot), so = std::sin(om);
      for (int64_t h = 0; h < H; ++h)
        out.f32()[(c * H + h) * W + w] =
            float(std::sin((1 - val) * om) / so * at(low, c, h, w) + std::sin(val * om) / so * at(high, c, h, w));
    }
  return out;
}

struct Tiny {
  std::unique_ptr<Backend> be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> model;
};

Tiny* tiny() {
  static Tiny* t = [] {
    const std::string p = model_path();
    if (p.empty()) return static_cast<Tiny*>(nullptr);
    auto* x = new Tiny;
    x->model = SDModel::load(p, *x->be);
    return x;
  }();
  return t;
}

GenerateParams params() {
  GenerateParams p;
  p.prompt = "a red cube on a table";
  p.negative = "blurry";
  p.width = p.height = 64;
  p.steps = 4;
  p.seed = 17;
  p.sampler = "euler";  // no per-step noise: the first noise decides the image
  return p;
}

// The denoising loop run by hand for `p` from the initial noise `noise` ([1, h, w, 4] NHWC),
// with guidance `at(i)` at evaluation i.
Tensor run_by_hand(const GenerateParams& p, Tensor noise, const std::function<const Guidance&(int)>& at) {
  Tiny& t = *tiny();
  Arena arena;
  Ctx ctx{*t.be, arena};
  auto sched = make_scheduler(p.sampler, p.schedule, p.prediction);
  sched->set_timesteps(p.steps);
  float* d = noise.f32();
  for (int64_t i = 0; i < noise.numel(); ++i) d[i] *= float(sched->init_noise_sigma());
  DenoiseHooks hooks;
  hooks.guidance = at;
  NoiseFn none = []() -> Tensor { ADD_FAILURE() << "euler drew noise"; return Tensor(); };
  return denoise(ctx, t.model->unet, *sched, noise, at(0), none, hooks);
}

Guidance guidance(const std::string& prompt, const std::string& negative, double cfg) {
  Tiny& t = *tiny();
  Arena arena;
  Ctx ctx{*t.be, arena};
  PromptPair pp = encode_prompts(ctx, *t.model, prompt, negative, {});
  Guidance g;
  g.cfg = float(cfg);
  g.cond = pp.cond.context;
  g.uncond = pp.uncond.context;
  return g;
}

Tensor draw(uint64_t seed, int64_t h, int64_t w) { return make_rng(RngKind::Cuda, seed)->randn({4, h, w}); }

}  // namespace

TEST(Variation, SlerpIsA1111sFormula) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  Tensor a = Tensor::empty({4, 5, 7}), b = Tensor::empty({4, 5, 7});
  for (int64_t i = 0; i < a.numel(); ++i) {
    a.f32()[i] = nd(rng);
    b.f32()[i] = nd(rng);
  }
  for (double v : {0.0, 0.1, 0.5, 0.93, 1.0}) EXPECT_LT(max_diff(slerp_a1111(v, a, b), ref_slerp(v, a, b)), 2e-6) << v;
  EXPECT_LT(max_diff(slerp_a1111(0, a, b), a), 1e-6);
  EXPECT_LT(max_diff(slerp_a1111(1, a, b), b), 1e-5);
  // Nearly equal noises: A1111's linear fallback, low·val + high·(1 − val).
  Tensor c = a.clone();
  c.f32()[0] += 1e-4f;
  Tensor lin = slerp_a1111(0.3, a, c);
  EXPECT_NEAR(lin.f32()[0], a.f32()[0] * 0.3f + c.f32()[0] * 0.7f, 1e-6);
}

TEST(Variation, GenerateBlendsTheFirstNoise) {
  if (!tiny()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  Tiny& t = *tiny();
  GenerateParams p = params();
  p.subseed = 99;
  p.subseed_strength = 0.35;
  std::vector<Result> got = generate(*t.model, *t.be, p);
  const Guidance g = guidance(p.prompt, p.negative, p.cfg);
  Tensor mixed = ref_slerp(0.35, draw(17, 8, 8), draw(99, 8, 8));
  Tensor want = run_by_hand(p, nchw_to_nhwc(mixed.reshape({1, 4, 8, 8})), [&](int) -> const Guidance& { return g; });
  EXPECT_LT(max_diff(nchw_to_nhwc(got[0].latent), want), 1e-4);

  // Strength 0: the plain image; strength 1: the subseed's own image (no per-step noise with euler).
  GenerateParams plain = params();
  GenerateParams zero = p;
  zero.subseed_strength = 0;
  EXPECT_EQ(generate(*t.model, *t.be, zero)[0].image.pixels, generate(*t.model, *t.be, plain)[0].image.pixels);
  GenerateParams one = p;
  one.subseed_strength = 1;
  GenerateParams as_seed = params();
  as_seed.seed = 99;
  EXPECT_LT(max_diff(generate(*t.model, *t.be, one)[0].latent, generate(*t.model, *t.be, as_seed)[0].latent), 1e-3);

  // A batch: image i uses seed + i and subseed + i.
  GenerateParams batch = p;
  batch.batch = 2;
  GenerateParams second = p;
  second.seed = 18;
  second.subseed = 100;
  EXPECT_LT(max_diff(generate(*t.model, *t.be, batch)[1].latent, generate(*t.model, *t.be, second)[0].latent), 1e-4);
}

TEST(PromptEditing, GenerateSwitchesTheGuidanceAtA1111sStep) {
  if (!tiny()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors";
  Tiny& t = *tiny();
  GenerateParams p = params();
  p.prompt = "[a red cube:a blue ball:2] on a table";
  p.negative = "[blurry|dark]";
  std::vector<Result> got = generate(*t.model, *t.be, p);
  // Evaluation i uses the entries whose end step >= i: "a red cube" for i <= 2, then "a blue ball".
  const Guidance g[4] = {guidance("a red cube on a table", "blurry", p.cfg), guidance("a red cube on a table", "dark", p.cfg),
                         guidance("a blue ball on a table", "blurry", p.cfg), guidance("a blue ball on a table", "dark", p.cfg)};
  // The negative [blurry|dark] over 4 steps is (1 blurry) (2 dark) (3 blurry) (4 dark): evaluation
  // i takes the first entry whose end >= i: i = 0, 1 blurry, 2 dark, 3 blurry.
  auto at = [&](int i) -> const Guidance& {
    const bool cube = i <= 2, neg_blurry = i <= 1 || i == 3;
    return g[(cube ? 0 : 2) + (neg_blurry ? 0 : 1)];
  };
  Tensor want = run_by_hand(p, nchw_to_nhwc(draw(17, 8, 8).reshape({1, 4, 8, 8})), at);
  EXPECT_LT(max_diff(nchw_to_nhwc(got[0].latent), want), 1e-4);
  // Not the same as either prompt alone.
  GenerateParams cube = params();
  cube.prompt = "a red cube on a table";
  EXPECT_GT(max_diff(generate(*t.model, *t.be, cube)[0].latent, got[0].latent), 1e-3);
}
