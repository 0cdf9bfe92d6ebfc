// The SDXL refiner: detection of its single-file layout, strict binding (5 time ids, its encoder's
// context width), the refiner's conditioning and time ids, the hand-over point (A1111's
// sigma rule = diffusers' denoising_end cutoff) and the hand-over itself, checked against a
// sampling loop written here that swaps the models at that step.
//
// The tiny refiner is written by the test in the published ldm layout of sd_xl_refiner_1.0
// (tests/common/refiner_files.h), from the tiny SDXL fixture: its encoder is the base's encoder 2,
// so the refiner's text conditioning must equal the base's encoder-2 half.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "../common/refiner_files.h"
#include "core/error.h"
#include "core/layout.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "models/name_map.h"
#include "models/sd_model.h"
#include "pipeline/conditioning.h"
#include "pipeline/generate.h"
#include "pipeline/hires.h"
#include "pipeline/prompt_schedule.h"
#include "pipeline/refiner.h"
#include "pipeline/rng.h"
#include "pipeline/scheduler.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

const std::string kFix = DIFFUSE_SHARED_DIR "/fixtures";
const std::string kBase = kFix + "/sdxl/model/tiny-sdxl.safetensors";
const std::string kSD1 = kFix + "/sd1/model/tiny-sd1.safetensors";

#define SKIP_UNLESS(path) \
  if (!fs::exists(path)) GTEST_SKIP() << "fixture " << (path) << " not found"

using refiner_files::RefinerShape;

// Writes a tiny refiner (tests/common/refiner_files.h) into the test's temporary folder.
std::string write_refiner(const std::string& name, const RefinerShape& rs = {}) {
  const std::string out = ::testing::TempDir() + name;
  refiner_files::write_refiner(kBase, out, rs);
  return out;
}

std::string refiner_path() {
  static std::string p = write_refiner("tiny-refiner.safetensors");
  return p;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The 1000 training sigmas of SD/SDXL, computed here: betas = linspace(√0.00085, √0.012)², ᾱ the
// cumulative product of 1 − β, σ = √((1 − ᾱ)/ᾱ).
std::vector<double> sigmas_here() {
  std::vector<double> s(1000);
  double acp = 1;
  for (int i = 0; i < 1000; ++i) {
    const double b = std::sqrt(0.00085) + (std::sqrt(0.012) - std::sqrt(0.00085)) * i / 999.0;
    acp *= 1 - b * b;
    s[size_t(i)] = std::sqrt((1 - acp) / acp);
  }
  return s;
}

// A1111's rule written out: the nearest training timestep by |σ_j − σ(t)| over all j (σ(t) log-
// interpolated), completed = (999 − j)/1000; the first evaluation with completed >= switch_at.
int a1111_switch(const std::vector<double>& ts, double switch_at) {
  const std::vector<double> s = sigmas_here();
  for (size_t i = 0; i < ts.size(); ++i) {
    const double t = ts[i];
    const int lo = std::min(int(std::floor(t)), 998);
    const double st = std::exp(std::log(s[size_t(lo)]) + (t - lo) * (std::log(s[size_t(lo) + 1]) - std::log(s[size_t(lo)])));
    int best = 0;
    for (int j = 1; j < 1000; ++j)
      if (std::abs(s[size_t(j)] - st) < std::abs(s[size_t(best)] - st)) best = j;
    if (float(999 - best) / 1000.0f >= float(switch_at)) return int(i);
  }
  return int(ts.size());
}

}  // namespace

TEST(Refiner, DetectedFromItsLayout) {
  SKIP_UNLESS(kBase);
  ModelSummary r = summarize_model(open_model_file(refiner_path()));
  EXPECT_EQ(r.family, Family::SDXL);
  EXPECT_TRUE(r.refiner);
  EXPECT_EQ(model_kind_name(r), "sdxl-refiner");
  bool te1 = false, te2 = false;
  for (const ComponentSummary& c : r.components) {
    te1 |= c.component == Component::TextEncoder;
    te2 |= c.component == Component::TextEncoder2;
  }
  EXPECT_FALSE(te1);
  EXPECT_TRUE(te2);
  ModelSummary b = summarize_model(open_model_file(kBase));
  EXPECT_FALSE(b.refiner);
  EXPECT_EQ(model_kind_name(b), "sdxl");
}

TEST(Refiner, BindsWithFiveTimeIdsAndItsEncodersWidth) {
  SKIP_UNLESS(kBase);
  auto be = make_cpu_backend(Precision::F32);
  auto m = SDModel::load(refiner_path(), *be);
  EXPECT_TRUE(m->refiner);
  EXPECT_FALSE(m->te.loaded());
  EXPECT_TRUE(m->te2.loaded());
  EXPECT_EQ(m->unet_cfg.num_time_ids, 5);
  EXPECT_EQ(m->unet_cfg.addition_time_embed_dim, 256);
  EXPECT_EQ(m->unet_cfg.context_dim, m->te2_cfg.width);
  EXPECT_EQ(m->unet_cfg.projection_class_embeddings_input_dim, m->te2_cfg.projection_dim + 5 * 256);
}

TEST(Refiner, WrongShapesAreErrorsNamingTheFile) {
  SKIP_UNLESS(kBase);
  auto be = make_cpu_backend(Precision::F32);
  RefinerShape six;
  six.time_ids = 6;  // pooled + 6 x 256: not pooled + 5 ids of any width
  const std::string p6 = write_refiner("refiner-6ids.safetensors", six);
  std::string err = error_of([&] { SDModel::load(p6, *be); });
  EXPECT_NE(err.find(p6), std::string::npos) << err;
  EXPECT_NE(err.find("5 time ids"), std::string::npos) << err;
  RefinerShape ctx;
  ctx.context_from_encoder = false;  // cross-attention to 128 wide, the encoder is 64
  const std::string pc = write_refiner("refiner-ctx.safetensors", ctx);
  err = error_of([&] { SDModel::load(pc, *be); });
  EXPECT_NE(err.find(pc), std::string::npos) << err;
  EXPECT_NE(err.find("context of width 128"), std::string::npos) << err;
}

TEST(Refiner, OtherModelsAsRefinerAreErrorsNamingTheFile) {
  SKIP_UNLESS(kBase);
  SKIP_UNLESS(kSD1);
  auto be = make_cpu_backend(Precision::F32);
  auto base = SDModel::load(kBase, *be);
  auto sd1 = SDModel::load(kSD1, *be);
  GenerateParams p;
  std::string err = error_of([&] { check_refiner(*base, *sd1, p); });
  EXPECT_NE(err.find(kSD1), std::string::npos) << err;
  EXPECT_NE(err.find("expects an SDXL refiner"), std::string::npos) << err;
  EXPECT_NE(err.find("sd1"), std::string::npos) << err;
  err = error_of([&] { check_refiner(*base, *base, p); });
  EXPECT_NE(err.find("an sdxl model"), std::string::npos) << err;
  // And a refiner after an SD 1.x model: its latents are not SDXL's.
  auto ref = SDModel::load(refiner_path(), *be);
  err = error_of([&] { check_refiner(*sd1, *ref, p); });
  EXPECT_NE(err.find(kSD1), std::string::npos) << err;
  EXPECT_NE(err.find("SDXL latents"), std::string::npos) << err;
}

TEST(Refiner, TimeIdsAndConditioning) {
  SKIP_UNLESS(kBase);
  // diffusers _get_add_time_ids(requires_aesthetics_score): original_size + crops + (score,)
  Tensor ids = refiner_time_ids(832, 1216, 6.0);
  ASSERT_EQ(ids.shape(), Shape({1, 5}));
  const float want[5] = {1216, 832, 0, 0, 6.0f};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(ids.f32()[i], want[i]) << i;
  EXPECT_EQ(kRefinerAestheticScore, 6.0);
  EXPECT_EQ(kRefinerNegativeAestheticScore, 2.5);

  auto be = make_cpu_backend(Precision::F32);
  auto base = SDModel::load(kBase, *be);
  auto ref = SDModel::load(refiner_path(), *be);
  Arena arena;
  Ctx ctx{*be, arena, DType::F32, nullptr};
  GenerateParams p;
  p.prompt = "a (red:1.2) fox in the snow";
  p.negative = "blurry";
  p.width = 96;
  p.height = 64;
  p.cfg = 5;
  Guidance g = refiner_guidance(ctx, *ref, p);
  const float c6[5] = {64, 96, 0, 0, 6.0f}, u25[5] = {64, 96, 0, 0, 2.5f};
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(g.time_ids.f32()[i], c6[i]);
    EXPECT_EQ(g.uncond_time_ids.f32()[i], u25[i]);
  }
  // The refiner's encoder is the base's encoder 2: its context is the base's last W channels.
  PromptPair bp = encode_prompts(ctx, *base, p.prompt, p.negative, {});
  const int64_t W = ref->te2_cfg.width, Cb = bp.cond.context.dim(2);
  ASSERT_EQ(g.cond.dim(2), W);
  ASSERT_EQ(g.cond.dim(1), bp.cond.context.dim(1));
  for (const auto& [mine, theirs] : {std::pair{g.cond, bp.cond.context}, std::pair{g.uncond, bp.uncond.context}})
    for (int64_t t = 0; t < mine.dim(1); ++t)
      for (int64_t c = 0; c < W; ++c)
        ASSERT_EQ(mine.f32()[t * W + c], theirs.f32()[t * Cb + (Cb - W) + c]) << t << "," << c;
  for (int64_t i = 0; i < g.cond_pooled.numel(); ++i) {
    EXPECT_EQ(g.cond_pooled.f32()[i], bp.cond.pooled.f32()[i]);
    EXPECT_EQ(g.uncond_pooled.f32()[i], bp.uncond.pooled.f32()[i]);
  }
}

TEST(Refiner, SwitchPointIsTheTimestepCutoff) {
  const std::vector<double> sig = sigmas_here();
  for (const char* sampler : {"ddim", "euler", "dpm++2m", "heun"})
    for (const char* schedule : {"default", "karras"})
      for (int steps : {7, 20, 30})
        for (double s : {0.0, 0.2, 0.5, 0.8, 0.95, 1.0}) {
          if (std::string(sampler) == "ddim" && std::string(schedule) == "karras") continue;  // no sigmas
          auto sched = make_scheduler(sampler, schedule, Prediction::Epsilon);
          sched->set_timesteps(steps);
          const std::vector<double> ts = sched->timesteps();
          const int k = refiner_switch_index(ts, s, sig);
          EXPECT_EQ(k, a1111_switch(ts, s)) << sampler << " " << schedule << " " << steps << " " << s;
          // Integer timesteps: the same cut as diffusers' denoising_end (base runs t >= cutoff).
          if (std::all_of(ts.begin(), ts.end(), [](double t) { return t == std::floor(t); })) {
            const double cutoff = std::round(1000 - s * 1000);
            EXPECT_EQ(k, int(std::count_if(ts.begin(), ts.end(), [&](double t) { return t >= cutoff; })))
                << sampler << " " << steps << " " << s;
          }
        }
  EXPECT_NE(error_of([&] { refiner_switch_index({999, 500}, 1.5, sig); }).find("[0, 1]"), std::string::npos);
}

namespace {

// [n, ...] rows a then b.
Tensor cat0(const Tensor& a, const Tensor& b) {
  Shape s = a.shape();
  s[0] = a.dim(0) + b.dim(0);
  Tensor o = Tensor::empty(s);
  std::memcpy(o.f32(), a.f32(), a.bytes());
  std::memcpy(o.f32() + a.numel(), b.f32(), b.bytes());
  return o;
}

Tensor ids_of(std::vector<float> v) {
  Tensor t = Tensor::empty({1, int64_t(v.size())});
  std::copy(v.begin(), v.end(), t.f32());
  return t;
}

// Euler from the CPU generator's noise, guided, model `base` before evaluation k and `ref` from
// there, each with its own prompt encoding and time ids: the loop written out. The texts of
// evaluation i come from A1111's prompt editing (prompt_schedule), encoded at every evaluation.
Tensor swapped_loop(const SDModel& base, const SDModel& ref, const GenerateParams& p, int k) {
  auto be = make_cpu_backend(Precision::F32);
  Arena arena;
  Ctx ctx{*be, arena, DType::F32, nullptr};
  const int64_t h = p.height / 8, w = p.width / 8;
  struct Side {
    Tensor ctx, pooled, ids;
  };
  const std::vector<PromptStep> sc = prompt_schedule(p.prompt, p.steps), su = prompt_schedule(p.negative, p.steps);
  int at = 0;  // the evaluation being encoded for
  auto sides = [&](const SDModel& m, const Tensor& cids, const Tensor& uids) {
    PromptPair pp = encode_prompts(ctx, m, sc[schedule_index(sc, at)].text, su[schedule_index(su, at)].text, {});
    return Side{cat0(pp.uncond.context, pp.cond.context), cat0(pp.uncond.pooled, pp.cond.pooled), cat0(uids, cids)};
  };
  const float H = float(p.height), W = float(p.width);
  const Tensor bid = ids_of({H, W, 0, 0, H, W});
  auto sched = make_scheduler(p.sampler, p.schedule, Prediction::Epsilon);
  sched->set_timesteps(p.steps);
  Tensor noise = Tensor::empty({1, 4, h, w});
  make_rng(RngKind::Cpu, p.seed)->randn(noise.f32(), noise.numel());
  Tensor x = nchw_to_nhwc(noise);
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] *= float(sched->init_noise_sigma());
  const std::vector<double> ts = sched->timesteps();
  for (size_t i = 0; i < ts.size(); ++i) {
    const bool refined = int(i) >= k;
    const SDModel& m = refined ? ref : base;
    at = int(i);
    const Side s = refined ? sides(ref, ids_of({H, W, 0, 0, 6.0f}), ids_of({H, W, 0, 0, 2.5f})) : sides(base, bid, bid);
    arena.reset();
    Tensor in = sched->scale_model_input(x, ts[i]);
    Tensor out = m.unet.forward(ctx, cat0(in, in), {float(ts[i]), float(ts[i])}, s.ctx, &s.pooled, &s.ids).to(DType::F32);
    Tensor eps = Tensor::empty(x.shape());
    const int64_t n = x.numel();
    for (int64_t j = 0; j < n; ++j) eps.f32()[j] = out.f32()[j] + float(p.cfg) * (out.f32()[n + j] - out.f32()[j]);
    sched->step(eps, ts[i], x, [&] { return Tensor::zeros(x.shape()); });
  }
  return nhwc_to_nchw(x);
}

// Euler, 8 steps at 64², cfg 5, the CPU generator, latents only, handing over to `ref` at 0.5.
GenerateParams handover_params(const SDModel& ref, const std::string& prompt, const std::string& negative,
                               uint64_t seed) {
  GenerateParams p;
  p.prompt = prompt;
  p.negative = negative;
  p.width = p.height = 64;
  p.steps = 8;
  p.cfg = 5;
  p.seed = seed;
  p.rng = RngKind::Cpu;
  p.sampler = "euler";
  p.decode = false;
  p.refiner = &ref;
  p.refiner_switch_at = 0.5;
  return p;
}

// The hand-over evaluation of p's schedule by A1111's rule as written here.
int handover_index(const GenerateParams& p) {
  auto sched = make_scheduler(p.sampler, p.schedule, Prediction::Epsilon);
  sched->set_timesteps(p.steps);
  return a1111_switch(sched->timesteps(), p.refiner_switch_at);
}

float max_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  float d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a.f32()[i] - b.f32()[i]));
  return d;
}

}  // namespace

TEST(Refiner, HandOverEqualsTheLoopWithTheModelsSwapped) {
  SKIP_UNLESS(kBase);
  auto be = make_cpu_backend(Precision::F32);
  auto base = SDModel::load(kBase, *be);
  auto ref = SDModel::load(refiner_path(), *be);
  GenerateParams p = handover_params(*ref, "a lighthouse at dusk", "fog", 1234);
  const int k = handover_index(p);
  ASSERT_GT(k, 0);
  ASSERT_LT(k, p.steps);  // both models run
  const Tensor got = generate(*base, *be, p)[0].latent;
  const Tensor want = swapped_loop(*base, *ref, p, k);
  EXPECT_LE(max_diff(got, want), 1e-5f);
  // Not what either model gives alone.
  EXPECT_GT(max_diff(got, swapped_loop(*base, *ref, p, p.steps)), 1e-3f);
  EXPECT_GT(max_diff(got, swapped_loop(*base, *ref, p, 0)), 1e-3f);

  // Switch at 0: the refiner throughout, which is the refiner run on its own (-m REFINER);
  // switch at 1: the base alone.
  p.refiner_switch_at = 0;
  const Tensor all_ref = generate(*base, *be, p)[0].latent;
  EXPECT_LE(max_diff(all_ref, swapped_loop(*base, *ref, p, 0)), 1e-5f);
  GenerateParams alone = p;
  alone.refiner = nullptr;
  EXPECT_LE(max_diff(all_ref, generate(*ref, *be, alone)[0].latent), 1e-5f);
  p.refiner_switch_at = 1;
  EXPECT_LE(max_diff(generate(*base, *be, p)[0].latent, generate(*base, *be, alone)[0].latent), 0.0f);
}

namespace {

// The tiny refiner as a diffusers StableDiffusionXLImg2ImgPipeline folder (the layout of
// stabilityai/stable-diffusion-xl-refiner-1.0: text_encoder_2 and tokenizer_2 only, no
// text_encoder), its tensors the ldm file's under diffusers names.
std::string write_diffusers_refiner() {
  const std::string dir = ::testing::TempDir() + "tiny-refiner-diffusers";
  const std::string base = kFix + "/sdxl/model/diffusers";
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const char* c : {"tokenizer_2", "scheduler", "vae"})
    fs::copy(base + "/" + c, dir + "/" + c, fs::copy_options::recursive);
  const TensorFile f = open_model_file(refiner_path());
  auto write = [&](Component c, const std::string& folder, const std::string& file) {
    fs::create_directories(dir + "/" + folder);
    const WeightStore w = component_weights(f, c, Family::SDXL);
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const std::string& n : w.names()) ts.emplace_back(n, w.find(n)->clone());
    save_safetensors(dir + "/" + folder + "/" + file, ts);
  };
  write(Component::UNet, "unet", "diffusion_pytorch_model.safetensors");
  write(Component::TextEncoder2, "text_encoder_2", "model.safetensors");
  fs::copy(base + "/text_encoder_2/config.json", dir + "/text_encoder_2/config.json");
  fs::copy(base + "/unet/config.json", dir + "/unet/config.json");  // not read: shapes configure the UNet
  std::FILE* mi = std::fopen((dir + "/model_index.json").c_str(), "w");
  std::fputs(R"({"_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": false,
  "requires_aesthetics_score": true, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  "text_encoder": [null, null], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": [null, null], "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})",
             mi);
  std::fclose(mi);
  return dir;
}

}  // namespace

TEST(Refiner, DiffusersFolderIsARefinerToo) {
  SKIP_UNLESS(kBase);
  SKIP_UNLESS(kFix + "/sdxl/model/diffusers");
  const std::string dir = write_diffusers_refiner();
  ModelSummary s = summarize_model(open_model_file(dir));
  EXPECT_TRUE(s.refiner);
  EXPECT_EQ(model_kind_name(s), "sdxl-refiner");
  auto be = make_cpu_backend(Precision::F32);
  auto base = SDModel::load(kBase, *be);
  auto ldm = SDModel::load(refiner_path(), *be);
  auto dif = SDModel::load(dir, *be);
  EXPECT_EQ(dif->unet_cfg.num_time_ids, 5);
  GenerateParams p;
  p.prompt = "a lighthouse at dusk";
  p.width = p.height = 64;
  p.steps = 4;
  p.seed = 5;
  p.sampler = "euler";
  p.decode = false;
  p.refiner_switch_at = 0.5;
  p.refiner = ldm.get();
  const Tensor a = generate(*base, *be, p)[0].latent;
  p.refiner = dif.get();
  EXPECT_EQ(max_diff(a, generate(*base, *be, p)[0].latent), 0.0f);
}

TEST(Refiner, PromptEditingReachesTheRefiner) {
  SKIP_UNLESS(kBase);
  auto be = make_cpu_backend(Precision::F32);
  auto base = SDModel::load(kBase, *be);
  auto ref = SDModel::load(refiner_path(), *be);
  // The prompt changes inside the refiner's part; the negative alternates every evaluation.
  GenerateParams p = handover_params(*ref, "a [lighthouse:windmill:0.75] at dusk", "[fog|rain]", 99);
  const int k = handover_index(p);
  const std::vector<PromptStep> sc = prompt_schedule(p.prompt, p.steps);
  ASSERT_EQ(sc.size(), 2u);
  ASSERT_GT(int(sc[0].end_step), k);  // the edit happens while the refiner runs
  const Tensor got = generate(*base, *be, p)[0].latent;
  EXPECT_LE(max_diff(got, swapped_loop(*base, *ref, p, k)), 1e-5f);
  GenerateParams plain = p;
  plain.prompt = "a lighthouse at dusk";
  plain.negative = "fog";
  EXPECT_GT(max_diff(got, generate(*base, *be, plain)[0].latent), 1e-3f);
}

// The hires fix hands over in its second pass only (A1111's hires_fix_refiner_pass default):
// at scale 1 with the Latent upscaler (bilinear at the same size: the latent itself), the fix is
// txt2img without the refiner, then img2img of that latent (A1111's step rule) with it.
TEST(Refiner, HiresFixRefinesTheSecondPass) {
  SKIP_UNLESS(kBase);
  auto be = make_cpu_backend(Precision::F32);
  auto base = SDModel::load(kBase, *be);
  auto ref = SDModel::load(refiner_path(), *be);
  GenerateParams p = handover_params(*ref, "a lighthouse at dusk", "fog", 7);
  p.refiner_switch_at = 0.8;
  HiresParams h;
  h.scale = 1;
  h.steps = 4;
  h.denoise = 0.5;
  const Tensor got = generate_hires(*base, *be, p, h)[0].latent;

  GenerateParams p1 = p;
  p1.refiner = nullptr;
  const Tensor first = nchw_to_nhwc(generate(*base, *be, p1)[0].latent);
  GenerateParams p2 = p;
  p2.init_latent = &first;
  p2.steps = 8;  // int(4 / 0.5)
  p2.img2img_steps = 4;
  p2.strength = 0.5;
  EXPECT_LE(max_diff(got, generate(*base, *be, p2)[0].latent), 1e-5f);
  p2.refiner = nullptr;
  EXPECT_GT(max_diff(got, generate(*base, *be, p2)[0].latent), 1e-3f);  // the refiner ran
}
