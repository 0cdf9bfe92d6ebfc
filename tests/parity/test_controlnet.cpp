// ControlNet: config detection, residual plumbing and scaling, end-to-end parity with diffusers'
// StableDiffusionControlNetPipeline on the tiny sd1 model (sd1-controlnet/controlnet.safetensors:
// controlnet.scale1.0.latent; Euler, 5 steps, guidance 7.5, seed 42 CPU generator, 64×64), the same
// ControlNet rewritten in the original (cldm) layout by this test, hint preparation (x/255, PIL
// Lanczos resize) and the Canny preprocessor on synthetic images.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <regex>
#include <string>
#include <unistd.h>
#include <vector>

#include "core/layout.h"
#include "backend/backend.h"
#include "core/arena.h"
#include "core/error.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "models/canny.h"
#include "models/controlnet.h"
#include "models/name_map.h"
#include "models/sd_model.h"
#include "nn/layers.h"
#include "pipeline/conditioning.h"
#include "pipeline/denoise.h"
#include "pipeline/rng.h"
#include "pipeline/scheduler.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

// The shared fixture if present, else the bundled copy; empty if neither exists.
std::string data_path(const std::string& rel) {
  for (const std::string& base : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/", std::string(DIFFUSE_TEST_DATA) + "/"})
    if (fs::exists(base + rel)) return base + rel;
  return {};
}


double max_abs(const Tensor& t) {
  Tensor f = t.to(DType::F32);
  double m = 0;
  for (int64_t i = 0; i < f.numel(); ++i) m = std::max(m, double(std::fabs(f.f32()[i])));
  return m;
}
double max_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  Tensor fa = a.to(DType::F32), fb = b.to(DType::F32);
  double m = 0;
  for (int64_t i = 0; i < std::min(fa.numel(), fb.numel()); ++i)
    m = std::max(m, double(std::fabs(fa.f32()[i] - fb.f32()[i])));
  return m;
}

// ---- The original (cldm) layout, written independently of name_map.cpp -----------------------

std::string ldm_resnet(const std::string& inner) {
  static const std::pair<const char*, const char*> kMap[] = {
      {"norm1.", "in_layers.0."},  {"conv1.", "in_layers.2."},  {"time_emb_proj.", "emb_layers.1."},
      {"norm2.", "out_layers.0."}, {"conv2.", "out_layers.3."}, {"conv_shortcut.", "skip_connection."}};
  for (const auto& [d, o] : kMap)
    if (inner.rfind(d, 0) == 0) return o + inner.substr(std::strlen(d));
  ADD_FAILURE() << "unexpected resnet tensor " << inner;
  return inner;
}

// diffusers ControlNetModel name -> original name (without prefix); lpb resnets per level,
// `pairs` = number of (conv, stride-2 conv) pairs of the hint embedding.
std::string to_original(const std::string& n, int lpb, int pairs) {
  std::smatch m;
  auto is = [&](const char* re) { return std::regex_match(n, m, std::regex(re)); };
  if (is(R"(time_embedding\.linear_1\.(.*))")) return "time_embed.0." + m[1].str();
  if (is(R"(time_embedding\.linear_2\.(.*))")) return "time_embed.2." + m[1].str();
  if (is(R"(conv_in\.(.*))")) return "input_blocks.0.0." + m[1].str();
  if (is(R"(controlnet_cond_embedding\.conv_in\.(.*))")) return "input_hint_block.0." + m[1].str();
  if (is(R"(controlnet_cond_embedding\.blocks\.(\d+)\.(.*))"))
    return "input_hint_block." + std::to_string(2 * std::stoi(m[1]) + 2) + "." + m[2].str();
  if (is(R"(controlnet_cond_embedding\.conv_out\.(.*))"))
    return "input_hint_block." + std::to_string(4 * pairs + 2) + "." + m[1].str();
  if (is(R"(controlnet_down_blocks\.(\d+)\.(.*))")) return "zero_convs." + m[1].str() + ".0." + m[2].str();
  if (is(R"(controlnet_mid_block\.(.*))")) return "middle_block_out.0." + m[1].str();
  if (is(R"(mid_block\.resnets\.0\.(.*))")) return "middle_block.0." + ldm_resnet(m[1]);
  if (is(R"(mid_block\.attentions\.0\.(.*))")) return "middle_block.1." + m[1].str();
  if (is(R"(mid_block\.resnets\.1\.(.*))")) return "middle_block.2." + ldm_resnet(m[1]);
  if (is(R"(down_blocks\.(\d+)\.resnets\.(\d+)\.(.*))"))
    return "input_blocks." + std::to_string(1 + std::stoi(m[1]) * (lpb + 1) + std::stoi(m[2])) + ".0." +
           ldm_resnet(m[3]);
  if (is(R"(down_blocks\.(\d+)\.attentions\.(\d+)\.(.*))"))
    return "input_blocks." + std::to_string(1 + std::stoi(m[1]) * (lpb + 1) + std::stoi(m[2])) + ".1." + m[3].str();
  if (is(R"(down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*))"))
    return "input_blocks." + std::to_string(1 + std::stoi(m[1]) * (lpb + 1) + lpb) + ".0.op." + m[2].str();
  ADD_FAILURE() << "no original name for " << n;
  return n;
}

// ---- Fixture ------------------------------------------------------------------------------------

const char* kPrompt = "a photograph of an astronaut riding a horse";
const char* kNegative = "blurry, low quality";

class ControlNetTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cn_dir_ = data_path("sd1-controlnet/model/diffusers-controlnet");
    ref_path_ = data_path("sd1-controlnet/controlnet.safetensors");
    hint_path_ = data_path("sd1-controlnet/control.png");
    std::string model = data_path("sd1/model/tiny-sd1.safetensors");
    if (cn_dir_.empty() || ref_path_.empty() || hint_path_.empty() || model.empty()) return;
    be_ = make_cpu_backend(Precision::F32);
    SDLoadOptions lo;
    lo.vae_encoder = lo.vae_decoder = false;
    model_ = SDModel::load(model, *be_, lo);
    cn_ = std::make_unique<ControlNet>(ControlNet::load_file(cn_dir_, *be_));
    ref_ = std::make_unique<TensorFile>(load_safetensors(ref_path_));
    hint_ = prepare_hint(read_image(hint_path_), 64, 64);
    const std::string pipes = data_path("sd1/pipelines.safetensors");
    if (!pipes.empty()) pipelines_ = std::make_unique<TensorFile>(load_safetensors(pipes));
    tmp_ = fs::temp_directory_path() / ("diffuse_test_controlnet_" + std::to_string(::getpid()));
    fs::create_directories(tmp_);
  }
  static void TearDownTestSuite() {
    cn_.reset();
    model_.reset();
    ref_.reset();
    pipelines_.reset();
    be_.reset();
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  void SetUp() override {
    if (!model_) GTEST_SKIP() << "sd1-controlnet fixtures (controlnet folder, control.png, controlnet.safetensors) "
                                 "or the sd1 model not found in ../shared/fixtures or tests/data";
  }

  // StableDiffusionControlNetPipeline: Euler, 5 steps, guidance 7.5, seed 42 (CPU generator).
  // Returns the final latent NCHW.
  static Tensor generate(const ControlNet* cn, const Tensor& hint, float scale) {
    Arena arena;
    Ctx ctx{*be_, arena};
    PromptPair pp = encode_prompts(ctx, *model_, kPrompt, kNegative, {});
    Guidance g;
    g.cond = pp.cond.context;
    g.uncond = pp.uncond.context;
    g.cfg = 7.5f;
    auto s = make_scheduler("euler", "default", Prediction::Epsilon);
    s->set_timesteps(5);
    std::shared_ptr<Rng> rng = make_cpu_rng(42);
    const Shape nchw{1, 4, 8, 8};
    Tensor x = nchw_to_nhwc(rng->randn(nchw));
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] *= float(s->init_noise_sigma());
    NoiseFn draw = [rng, nchw] { return nchw_to_nhwc(rng->randn(nchw)); };
    DenoiseHooks hooks;
    if (cn) hooks.control = control_hook(*cn, hint, scale);
    return nhwc_to_nchw(denoise(ctx, model_->unet, *s, x, g, draw, hooks));
  }

  static void expect_parity(const Tensor& got, const Tensor& want, const char* what) {
    const double d = max_diff(got, want), mr = max_abs(want), bound = 1e-3 * std::max(1.0, mr);
    std::printf("  %-40s max|Δ| %.3g  (max|ref| %.3g, bound %.3g)\n", what, d, mr, bound);
    EXPECT_LE(d, bound) << what;
  }

  // Writes the fixture ControlNet in the original layout (with `prefix`) to a temp safetensors.
  static std::string write_original(const std::string& prefix, const std::string& name) {
    TensorFile f = open_model_file(cn_dir_);
    const ControlNetConfig& c = cn_->config();
    const int pairs = int(c.embedding_channels.size()) - 1;
    std::vector<std::pair<std::string, Tensor>> out;
    for (const TensorEntry& e : f.tensors)
      out.emplace_back(prefix + to_original(e.name, c.unet.layers_per_block, pairs), e.tensor);
    const std::string path = (tmp_ / name).string();
    save_safetensors(path, out);
    return path;
  }

  static inline std::unique_ptr<Backend> be_;
  static inline std::unique_ptr<SDModel> model_;
  static inline std::unique_ptr<ControlNet> cn_;
  static inline std::unique_ptr<TensorFile> ref_, pipelines_;
  static inline Tensor hint_;
  static inline std::string cn_dir_, ref_path_, hint_path_;
  static inline fs::path tmp_;
};

// ---- Config and plumbing -------------------------------------------------------------------------

TEST_F(ControlNetTest, ConfigFromJsonMatchesShapes) {
  const ControlNetConfig& c = cn_->config();
  std::printf("  %s\n", c.str().c_str());
  EXPECT_EQ(c.embedding_channels, (std::vector<int>{16, 16, 32, 32}));
  EXPECT_EQ(c.conditioning_channels, 3);
  EXPECT_FALSE(c.bgr);
  EXPECT_EQ(c.hint_downscale(), 8);
  EXPECT_EQ(c.unet.block_out_channels, model_->unet.config().block_out_channels);
  EXPECT_NO_THROW(cn_->check_compatible(model_->unet.config()));
  TensorFile f = open_model_file(cn_dir_);
  WeightStore w = controlnet_weights(f);
  const ControlNetConfig s = ControlNetConfig::from_weights(w);
  EXPECT_EQ(s.str(), c.str());
  EXPECT_EQ(cn_->num_skips(), model_->unet.num_skips());
}

TEST_F(ControlNetTest, ResidualsMatchSkipsAndScaleMultipliesEveryOne) {
  Arena arena;
  Ctx ctx{*be_, arena};
  const int64_t B = 2;
  Tensor x = Tensor::empty({B, 8, 8, 4});
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = std::sin(0.37f * float(i));
  Tensor context = Tensor::empty({B, 77, 64});
  for (int64_t i = 0; i < context.numel(); ++i) context.f32()[i] = std::cos(0.11f * float(i));
  const std::vector<float> t = {500.0f, 500.0f};
  Tensor emb = cn_->embed_hint(ctx, hint_).to(DType::F32);
  EXPECT_EQ(emb.shape(), (Shape{1, 8, 8, 32}));
  ControlResiduals r1 = cn_->forward(ctx, x, t, context, emb, 1.0f);
  ControlResiduals r5 = cn_->forward(ctx, x, t, context, emb, 0.5f);
  ASSERT_EQ(int(r1.down.size()), model_->unet.num_skips());
  ASSERT_EQ(r5.down.size(), r1.down.size());
  double worst = 0;
  std::vector<Tensor> all1 = r1.down, all5 = r5.down;
  all1.push_back(r1.mid);
  all5.push_back(r5.mid);
  for (size_t i = 0; i < all1.size(); ++i) {
    EXPECT_GT(max_abs(all1[i]), 1e-3) << "residual " << i << " is zero: the branch would not be tested";
    Tensor half = all1[i].to(DType::F32);
    for (int64_t k = 0; k < half.numel(); ++k) half.f32()[k] *= 0.5f;
    worst = std::max(worst, max_diff(all5[i], half) / std::max(1.0, max_abs(half)));
  }
  std::printf("  scale 0.5 vs 0.5 × scale 1: max relative |Δ| %.3g over %zu residuals\n", worst, all1.size());
  EXPECT_LE(worst, 1e-6);
  // A full forward of the UNet accepts them (shapes agree with its skips).
  EXPECT_NO_THROW(model_->unet.forward(ctx, x, t, context, nullptr, nullptr, &r1.down, &r1.mid));
  // A hint embedding of the wrong size is refused with the expected size.
  Tensor small = prepare_hint(read_image(hint_path_), 32, 32);
  Tensor small_emb = cn_->embed_hint(ctx, small);
  try {
    cn_->forward(ctx, x, t, context, small_emb, 1.0f);
    ADD_FAILURE() << "a 32×32 hint for an 8×8 latent was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("8×"), std::string::npos) << e.what();
  }
}

// ---- End to end ------------------------------------------------------------------------------------

TEST_F(ControlNetTest, Scale1MatchesDiffusers) {
  const Tensor* want = ref_->find("controlnet.scale1.0.latent");
  ASSERT_TRUE(want);
  expect_parity(generate(cn_.get(), hint_, 1.0f), *want, "controlnet.scale1.0 (diffusers folder)");
}

TEST_F(ControlNetTest, OtherScalesFromReferences) {
  // Any further controlnet.scale<S>.latent the reference file holds.
  int n = 0;
  for (const TensorEntry& e : ref_->tensors) {
    std::smatch m;
    if (!std::regex_match(e.name, m, std::regex(R"(controlnet\.scale([0-9.]+)\.latent)")) || m[1] == "1.0") continue;
    ++n;
    expect_parity(generate(cn_.get(), hint_, std::stof(m[1])), e.tensor, e.name.c_str());
  }
  // Scale 0 adds zero residuals: exactly plain txt2img (txt2img.euler).
  const Tensor* plain = pipelines_ ? pipelines_->find("txt2img.euler.latent") : nullptr;
  if (!plain) GTEST_SKIP() << "sd1/pipelines.safetensors (txt2img.euler.latent) not found; " << n
                           << " other scale(s) checked";
  expect_parity(generate(cn_.get(), hint_, 0.0f), *plain, "controlnet scale 0 vs txt2img.euler");
  // And the ControlNet changes the result measurably at scale 1.
  const Tensor* want = ref_->find("controlnet.scale1.0.latent");
  ASSERT_TRUE(want);
  EXPECT_GT(max_diff(*want, *plain), 1e-2 * std::max(1.0, max_abs(*plain)));
}

TEST_F(ControlNetTest, OriginalLayoutLoadsAndMatches) {
  const Tensor* want = ref_->find("controlnet.scale1.0.latent");
  ASSERT_TRUE(want);
  const Tensor ours = generate(cn_.get(), hint_, 1.0f);
  for (const std::string& prefix : {std::string("control_model."), std::string()}) {
    SCOPED_TRACE(prefix.empty() ? "bare" : prefix);
    const std::string path = write_original(prefix, prefix.empty() ? "bare.safetensors" : "cldm.safetensors");
    ControlNet cn = ControlNet::load_file(path, *be_);
    EXPECT_EQ(cn.config().str(), cn_->config().str());
    const Tensor got = generate(&cn, hint_, 1.0f);
    const double d = max_diff(got, ours);
    std::printf("  original layout %-14s vs diffusers folder: max|Δ| %.3g\n", prefix.empty() ? "(bare)" : prefix.c_str(), d);
    EXPECT_LE(d, 1e-6);
    expect_parity(got, *want, "controlnet.scale1.0 (original layout)");
  }
}

TEST_F(ControlNetTest, LoadErrorsNameTheFile) {
  // A file with no ControlNet tensors.
  const std::string sd = data_path("sd1/model/tiny-sd1.safetensors");
  try {
    ControlNet::load_file(sd, *be_);
    ADD_FAILURE() << "an SD checkpoint loaded as a ControlNet";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(sd), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("ControlNet"), std::string::npos) << e.what();
  }
  // A ControlNet missing one zero conv: strict binding names it.
  TensorFile f = open_model_file(cn_dir_);
  std::vector<std::pair<std::string, Tensor>> kept;
  for (const TensorEntry& e : f.tensors)
    if (e.name.rfind("controlnet_down_blocks.3.", 0) != 0) kept.emplace_back(e.name, e.tensor);
  const std::string path = (tmp_ / "missing.safetensors").string();
  save_safetensors(path, kept);
  try {
    ControlNet::load_file(path, *be_);
    ADD_FAILURE() << "a ControlNet without controlnet_down_blocks.3 loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("controlnet_down_blocks.3.weight"), std::string::npos) << e.what();
  }
}

TEST_F(ControlNetTest, HintBatchServesEveryRow) {
  // control_hook with a one-row hint on a guided batch equals the hint repeated per row.
  Arena arena;
  Ctx ctx{*be_, arena};
  Tensor x = Tensor::empty({2, 8, 8, 4});
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = std::sin(0.21f * float(i));
  Tensor context = Tensor::empty({2, 77, 64});
  for (int64_t i = 0; i < context.numel(); ++i) context.f32()[i] = std::cos(0.05f * float(i));
  const std::vector<float> t = {321.0f, 321.0f};
  Tensor two = Tensor::empty({2, 64, 64, 3});
  std::copy(hint_.f32(), hint_.f32() + hint_.numel(), two.f32());
  std::copy(hint_.f32(), hint_.f32() + hint_.numel(), two.f32() + hint_.numel());
  auto h1 = control_hook(*cn_, hint_, 0.8f);
  auto h2 = control_hook(*cn_, two, 0.8f);
  ControlInputs in{x, t, context, nullptr, nullptr, 0, 1};
  ControlResiduals a = h1(ctx, in), b = h2(ctx, in);
  ASSERT_EQ(a.down.size(), b.down.size());
  double d = max_diff(a.mid, b.mid);
  for (size_t i = 0; i < a.down.size(); ++i) d = std::max(d, max_diff(a.down[i], b.down[i]));
  EXPECT_LE(d, 1e-5);
}

// ---- Hint images -------------------------------------------------------------------------------------

Image solid(int w, int h, int channels, uint8_t v) {
  Image im;
  im.width = w;
  im.height = h;
  im.channels = channels;
  im.pixels.assign(size_t(w) * h * channels, v);
  return im;
}

TEST(ControlHint, MapsToUnitRangeAndResizes) {
  Image im = solid(5, 3, 3, 0);
  for (size_t i = 0; i < im.pixels.size(); ++i) im.pixels[i] = uint8_t(i * 17 % 256);
  Tensor t = prepare_hint(im, 5, 3);
  ASSERT_EQ(t.shape(), (Shape{1, 3, 5, 3}));
  for (size_t i = 0; i < im.pixels.size(); ++i) EXPECT_FLOAT_EQ(t.f32()[i], im.pixels[i] / 255.0f);
  // Grey input becomes RGB.
  Tensor g = prepare_hint(solid(4, 4, 1, 51), 4, 4);
  ASSERT_EQ(g.shape(), (Shape{1, 4, 4, 3}));
  EXPECT_FLOAT_EQ(g.f32()[5], 0.2f);
  // Constant images stay constant through Lanczos (weights sum to one), up and down.
  for (auto [w, h] : {std::pair{37, 23}, std::pair{7, 5}, std::pair{64, 16}}) {
    Tensor r = prepare_hint(solid(16, 12, 3, 200), w, h);
    ASSERT_EQ(r.shape(), (Shape{1, h, w, 3}));
    for (int64_t i = 0; i < r.numel(); ++i) ASSERT_FLOAT_EQ(r.f32()[i], 200 / 255.0f) << w << "x" << h;
  }
  // Halving a 1-pixel black/white stripe pattern averages it (antialiased, not sampled).
  Image stripes = solid(32, 4, 1, 0);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 32; x += 2) stripes.pixels[size_t(y) * 32 + x] = 255;
  Image half = resize_lanczos(stripes, 16, 4);
  for (int x = 2; x < 14; ++x) EXPECT_NEAR(half.pixels[size_t(x)], 127.5, 1.0) << "x " << x;
  EXPECT_THROW(resize_lanczos(stripes, 0, 4), Error);
}

// ---- Canny -----------------------------------------------------------------------------------------

Image square(int size, int x0, int x1) {
  Image im = solid(size, size, 3, 0);
  for (int y = x0; y <= x1; ++y)
    for (int x = x0; x <= x1; ++x)
      for (int c = 0; c < 3; ++c) im.pixels[(size_t(y) * size + x) * 3 + c] = 255;
  return im;
}
bool on(const Image& e, int x, int y) { return e.pixels[(size_t(y) * e.width + x) * 3] == 255; }
int count(const Image& e) {
  int n = 0;
  for (int y = 0; y < e.height; ++y)
    for (int x = 0; x < e.width; ++x) n += on(e, x, y);
  return n;
}

TEST(Canny, SquareGivesItsOutline) {
  for (double sigma : {0.0, 1.4}) {
    SCOPED_TRACE(sigma);
    CannyOptions o;
    o.sigma = sigma;
    const Image e = canny(square(64, 22, 41), o);
    ASSERT_EQ(e.channels, 3);
    ASSERT_EQ(e.width, 64);
    int off = 0;
    for (int y = 0; y < 64; ++y)
      for (int x = 0; x < 64; ++x) {
        if (!on(e, x, y)) continue;
        // Within one pixel of the square's boundary (between 21|22 and 41|42).
        const bool near_x = (x >= 20 && x <= 23) || (x >= 40 && x <= 43);
        const bool near_y = (y >= 20 && y <= 23) || (y >= 40 && y <= 43);
        const bool inside_span = x >= 20 && x <= 43 && y >= 20 && y <= 43;
        off += !(inside_span && (near_x || near_y));
        // Channels agree (white on black).
        ASSERT_EQ(e.pixels[(size_t(y) * 64 + x) * 3 + 1], 255);
      }
    EXPECT_EQ(off, 0) << "edge pixels away from the outline";
    // Every side is traced along its length (rows/columns 24..39 away from the corners).
    for (int k = 24; k <= 39; ++k) {
      EXPECT_TRUE(on(e, 21, k) || on(e, 22, k)) << "left side, row " << k;
      EXPECT_TRUE(on(e, 41, k) || on(e, 42, k)) << "right side, row " << k;
      EXPECT_TRUE(on(e, k, 21) || on(e, k, 22)) << "top side, column " << k;
      EXPECT_TRUE(on(e, k, 41) || on(e, k, 42)) << "bottom side, column " << k;
    }
    // Thin: one pixel per row on the left side (non-maximum suppression).
    for (int k = 24; k <= 39; ++k) EXPECT_FALSE(on(e, 21, k) && on(e, 22, k)) << "row " << k;
    std::printf("  square, sigma %.1f: %d edge pixels\n", sigma, count(e));
  }
  // A flat image has no edges.
  EXPECT_EQ(count(canny(solid(16, 16, 3, 90))), 0);
}

TEST(Canny, ThresholdsAreMonotonic) {
  // A deterministic textured image: every threshold pair gives a subset of a lower pair's edges.
  Image im = solid(48, 48, 3, 0);
  uint32_t s = 12345;
  for (size_t i = 0; i < im.pixels.size(); i += 3) {
    s = s * 1664525u + 1013904223u;
    const uint8_t v = uint8_t((s >> 24) & 0xff);
    im.pixels[i] = im.pixels[i + 1] = im.pixels[i + 2] = v;
  }
  Image prev;
  int prev_n = -1;
  for (auto [lo, hi] : {std::pair{50.0, 100.0}, std::pair{100.0, 200.0}, std::pair{150.0, 300.0}, std::pair{300.0, 600.0}}) {
    CannyOptions o;
    o.low = lo;
    o.high = hi;
    const Image e = canny(im, o);
    const int n = count(e);
    std::printf("  thresholds %.0f/%.0f: %d edge pixels\n", lo, hi, n);
    if (prev_n >= 0) {
      EXPECT_LT(n, prev_n);
      for (int y = 0; y < 48; ++y)
        for (int x = 0; x < 48; ++x)
          if (on(e, x, y)) {
            ASSERT_TRUE(on(prev, x, y)) << "edge at " << x << "," << y << " not in the lower thresholds' set";
          }
    }
    prev = e;
    prev_n = n;
  }
  EXPECT_GT(count(canny(im, CannyOptions{50, 100, 1.4, false})), 0);
  // Raising only the high threshold never adds edges either.
  EXPECT_LE(count(canny(im, CannyOptions{100, 400, 1.4, false})), count(canny(im, CannyOptions{100, 200, 1.4, false})));
}

TEST(Canny, BadOptionsThrow) {
  const Image im = solid(8, 8, 3, 0);
  EXPECT_THROW(canny(im, CannyOptions{200, 100, 1.4, false}), Error);
  EXPECT_THROW(canny(im, CannyOptions{-1, 100, 1.4, false}), Error);
  EXPECT_THROW(canny(im, CannyOptions{100, 200, -1, false}), Error);
  try {
    canny(im, CannyOptions{200, 100, 1.4, false});
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("low"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace diffuse
