// Hires fix: the latent resize against torch.nn.functional.interpolate's formulas (computed here in
// double, plus values torch prints), and both passes against the pipeline calls they stand for:
// txt2img at the base size, the upscale (latent, Lanczos, an ESRGAN model written here in
// Real-ESRGAN's key layout), then img2img of A1111's step rule (a schedule of steps / denoise of
// which `steps` run) — counted through the progress events — and the engine's PNG parameters.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "../common/expect_error.h"
#include "api/engine.h"
#include "api/infotext.h"
#include "core/layout.h"
#include "io/tensor_file.h"
#include "models/controlnet.h"
#include "models/rrdbnet.h"
#include "pipeline/hires.h"
#include "pipeline/upscale.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

std::string data(const std::string& rel) {
  for (const std::string& base : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/", std::string(DIFFUSE_TEST_DATA) + "/"})
    if (fs::exists(base + rel)) return base + rel;
  return "";
}

Tensor random_nhwc(int64_t b, int64_t h, int64_t w, int64_t c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  Tensor t = Tensor::empty({b, h, w, c});
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = u(rng);
  return t;
}

// torch's 1-D source positions and weights, written from its documented formulas (double).
struct Tap {
  int i;
  double w;
};
std::vector<Tap> ref_taps(int o, int in, int out, LatentResize mode) {
  const double scale = double(in) / double(out);
  auto clampi = [&](int i) { return std::min(std::max(i, 0), in - 1); };
  switch (mode) {
    case LatentResize::Nearest: return {{clampi(int(std::floor(o * scale))), 1.0}};
    case LatentResize::NearestExact: return {{clampi(int(std::floor((o + 0.5) * scale))), 1.0}};
    case LatentResize::Bilinear: {
      double src = std::max((o + 0.5) * scale - 0.5, 0.0);
      int i0 = int(std::floor(src));
      double l = src - i0;
      return {{clampi(i0), 1 - l}, {clampi(i0 + 1), l}};
    }
    case LatentResize::Bicubic: {
      const double A = -0.75, src = (o + 0.5) * scale - 0.5;
      const int i = int(std::floor(src));
      auto k = [&](double x) {
        x = std::fabs(x);
        if (x <= 1) return (A + 2) * x * x * x - (A + 3) * x * x + 1;
        if (x < 2) return A * x * x * x - 5 * A * x * x + 8 * A * x - 4 * A;
        return 0.0;
      };
      std::vector<Tap> t;
      for (int j = i - 1; j <= i + 2; ++j) t.push_back({clampi(j), k(src - j)});
      return t;
    }
  }
  return {};
}

Tensor ref_resize(const Tensor& x, int oh, int ow, LatentResize mode) {
  const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  Tensor y = Tensor::empty({B, oh, ow, C});
  for (int64_t b = 0; b < B; ++b)
    for (int oy = 0; oy < oh; ++oy)
      for (int ox = 0; ox < ow; ++ox)
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (const Tap& ty : ref_taps(oy, int(H), oh, mode))
            for (const Tap& tx : ref_taps(ox, int(W), ow, mode))
              acc += ty.w * tx.w * x.f32()[((b * H + ty.i) * W + tx.i) * C + c];
          y.f32()[((b * oh + oy) * ow + ox) * C + c] = float(acc);
        }
  return y;
}

double max_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double m = 0;
  for (int64_t i = 0; i < std::min(a.numel(), b.numel()); ++i) m = std::max(m, double(std::fabs(a.f32()[i] - b.f32()[i])));
  return m;
}

// A tiny Real-ESRGAN x4 RRDBNet (1 block, 4 features, growth 2) with random weights, in its
// published key names.
void write_tiny_esrgan(const std::string& path) {
  const int nf = 4, gc = 2;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 0.1f);
  std::vector<std::pair<std::string, Tensor>> ts;
  auto conv = [&](const std::string& name, int out, int in) {
    Tensor w = Tensor::empty({out, in, 3, 3}), b = Tensor::empty({out});
    for (int64_t i = 0; i < w.numel(); ++i) w.f32()[i] = nd(rng);
    for (int64_t i = 0; i < b.numel(); ++i) b.f32()[i] = nd(rng);
    ts.emplace_back(name + ".weight", w);
    ts.emplace_back(name + ".bias", b);
  };
  conv("conv_first", nf, 3);
  for (int r = 1; r <= 3; ++r)
    for (int k = 1; k <= 5; ++k)
      conv("body.0.rdb" + std::to_string(r) + ".conv" + std::to_string(k), k == 5 ? nf : gc, nf + (k - 1) * gc);
  conv("conv_body", nf, nf);
  conv("conv_up1", nf, nf);
  conv("conv_up2", nf, nf);
  conv("conv_hr", nf, nf);
  conv("conv_last", 3, nf);
  save_safetensors(path, ts);
}

class HiresTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = data("sd1/model/tiny-sd1.safetensors");
    if (path.empty()) GTEST_SKIP() << "needs sd1/model/tiny-sd1.safetensors (tests/data or ../shared/fixtures)";
    model_path_ = path;
    dir_ = fs::temp_directory_path() / ("diffuse_test_hires_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    be_ = make_cpu_backend(Precision::F32);
    model_ = SDModel::load(path, *be_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  GenerateParams base() const {
    GenerateParams p;
    p.prompt = "a red house";
    p.negative = "blurry";
    p.width = 64;
    p.height = 48;
    p.steps = 4;
    p.seed = 21;
    p.sampler = "euler_a";
    p.batch = 2;
    return p;
  }
  // The hires result by hand: pass 1, `upscale` of each result, img2img of A1111's step rule.
  std::vector<Result> by_hand(const GenerateParams& p, const HiresParams& h,
                              const std::function<void(const Result&, GenerateParams&, Tensor&, Image&)>& upscale) {
    GenerateParams p1 = p;
    p1.decode = h.upscaler.rfind("latent", 0) != 0;
    std::vector<Result> first = generate(*model_, *be_, p1);
    std::vector<Result> out;
    for (const Result& r : first) {
      GenerateParams p2 = p;
      p2.batch = 1;
      p2.seed = r.seed;
      hires_target(h, p.width, p.height, &p2.width, &p2.height);
      p2.steps = int(h.steps / std::min(h.denoise, 0.999));
      p2.img2img_steps = h.steps;
      Tensor lat;
      Image im;
      upscale(r, p2, lat, im);
      out.push_back(generate(*model_, *be_, p2)[0]);
    }
    return out;
  }

  std::string model_path_;
  fs::path dir_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<SDModel> model_;
};

}  // namespace

TEST(LatentResize, MatchesTorchInterpolate) {
  // Values torch.nn.functional.interpolate gives for [0, 1] -> 4 (and -> 3) samples.
  Tensor x = Tensor::empty({1, 1, 2, 1});
  x.f32()[0] = 0;
  x.f32()[1] = 1;
  auto row = [&](LatentResize m, int n) {
    Tensor y = resize_latent(x, 1, n, m);
    return std::vector<float>(y.f32(), y.f32() + n);
  };
  EXPECT_EQ(row(LatentResize::Bilinear, 4), (std::vector<float>{0, 0.25f, 0.75f, 1}));
  EXPECT_EQ(row(LatentResize::Nearest, 4), (std::vector<float>{0, 0, 1, 1}));
  EXPECT_EQ(row(LatentResize::Nearest, 3), (std::vector<float>{0, 0, 1}));
  EXPECT_EQ(row(LatentResize::NearestExact, 3), (std::vector<float>{0, 1, 1}));
  std::vector<float> cubic = row(LatentResize::Bicubic, 4), want = {-0.10546875f, 0.2265625f, 0.7734375f, 1.10546875f};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(cubic[size_t(i)], want[size_t(i)], 1e-6) << i;

  // Odd sizes, every mode, against the formulas in double.
  Tensor lat = random_nhwc(2, 5, 7, 4, 3);
  for (LatentResize m : {LatentResize::Bilinear, LatentResize::Bicubic, LatentResize::Nearest, LatentResize::NearestExact})
    for (auto [oh, ow] : {std::pair{13, 11}, std::pair{10, 14}, std::pair{5, 7}, std::pair{7, 16}})
      // f32 weights and sums of up to 16 taps over values of magnitude <= 2 (torch computes in f32 too)
      EXPECT_LT(max_diff(resize_latent(lat, oh, ow, m), ref_resize(lat, oh, ow, m)), 1e-5)
          << "mode " << int(m) << " " << oh << "x" << ow;
}

TEST(HiresSettings, TargetsNamesAndErrors) {
  HiresParams h;
  int w = 0, hh = 0;
  h.scale = 1.5;
  hires_target(h, 512, 344, &w, &hh);
  EXPECT_EQ(w, 768);
  EXPECT_EQ(hh, 512);  // 516 floored to a multiple of 8
  h.width = 1000;      // one side: the other keeps the ratio (A1111's resize-to)
  hires_target(h, 512, 256, &w, &hh);
  EXPECT_EQ(w, 1000);
  EXPECT_EQ(hh, 496);
  EXPECT_EQ(hires_upscaler_display("latent-nearest-exact", ""), "Latent (nearest-exact)");
  EXPECT_EQ(hires_upscaler_display("esrgan", "RealESRGAN_x4plus"), "RealESRGAN_x4plus");
  expect_error([] { check_hires_upscaler("bicubic-ish"); }, "--hires-upscaler bicubic-ish", "latent-nearest");
}

TEST_F(HiresTest, LatentUpscaleIsPassOneResizedThenA1111Img2img) {
  GenerateParams p = base();
  HiresParams h;
  h.scale = 2;
  h.steps = 3;
  h.denoise = 0.55;
  h.upscaler = "latent-bicubic";
  int last_done = 0, last_total = 0, denoise_events = 0;
  std::vector<int> decoded;
  p.on_result = [&](const Result&, int i) { decoded.push_back(i); };
  std::vector<Result> got = generate_hires(*model_, *be_, p, h, [&](Stage s, int done, int total) {
    if (s != Stage::Denoise) return;
    ++denoise_events;
    EXPECT_GE(done, last_done);
    last_done = done;
    last_total = total;
  });
  // Euler a: 4 first-pass evaluations, then per image 3 of a 5-step schedule (int(3 / 0.55)).
  EXPECT_EQ(last_total, 4 + 2 * 3);
  EXPECT_EQ(last_done, last_total);
  EXPECT_EQ(denoise_events, 10);
  EXPECT_EQ(decoded, (std::vector<int>{0, 1}));

  p.on_result = nullptr;
  std::vector<Result> want = by_hand(p, h, [&](const Result& r, GenerateParams& p2, Tensor& lat, Image&) {
    lat = ref_resize(nchw_to_nhwc(r.latent), p2.height / 8, p2.width / 8, LatentResize::Bicubic);
    p2.init_latent = &lat;
  });
  ASSERT_EQ(got.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(got[i].image.width, 128);
    EXPECT_EQ(got[i].image.height, 96);
    EXPECT_EQ(got[i].seed, 21 + i);
    EXPECT_LT(max_diff(got[i].latent, want[i].latent), 1e-4) << i;
  }
  EXPECT_NE(got[0].image.pixels, got[1].image.pixels);
}

TEST_F(HiresTest, ImageUpscalersLanczosAndEsrgan) {
  GenerateParams p = base();
  p.batch = 1;
  HiresParams h;
  h.scale = 1.5;
  h.steps = 2;
  h.denoise = 0.5;
  h.upscaler = "lanczos";
  std::vector<Result> got = generate_hires(*model_, *be_, p, h);
  std::vector<Result> want = by_hand(p, h, [&](const Result& r, GenerateParams& p2, Tensor&, Image& im) {
    im = resize_lanczos(r.image, p2.width, p2.height);
    p2.init = &im;
  });
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].image.width, 96);
  EXPECT_EQ(got[0].image.height, 72);
  EXPECT_EQ(got[0].image.pixels, want[0].image.pixels);

  const std::string esr = (dir_ / "tiny_x4.safetensors").string();
  write_tiny_esrgan(esr);
  RRDBNet net = load_rrdbnet(esr, *be_);
  h.upscaler = "esrgan";
  h.esrgan = &net;
  got = generate_hires(*model_, *be_, p, h);
  want = by_hand(p, h, [&](const Result& r, GenerateParams& p2, Tensor&, Image& im) {
    im = upscale_image_to(net, *be_, r.image, p2.width, p2.height);
    p2.init = &im;
  });
  EXPECT_EQ(got[0].image.pixels, want[0].image.pixels);
  h.esrgan = nullptr;
  expect_error([&] { generate_hires(*model_, *be_, p, h); }, "--hires-upscaler esrgan", "--hires-upscaler-model");
}

TEST_F(HiresTest, EngineWritesA1111ParametersAndChecksSettings) {
  api::EngineOptions eo;
  eo.precision = "fp32";
  eo.hash_cache_dir = (dir_ / "cache").string();
  api::Engine engine(eo);
  api::Request r;
  r.model = model_path_;
  r.prompt = "a red house";
  r.width = 64;
  r.height = 64;
  r.steps = 3;
  r.seed = 4;
  r.hires_scale = 2;
  r.hires_steps = 2;
  r.hires_denoise = 0.5;
  api::RunResult res = engine.generate(r);
  ASSERT_EQ(res.images.size(), 1u);
  EXPECT_EQ(res.images[0].image.width, 128);
  const std::string& t = res.images[0].parameters;
  EXPECT_NE(t.find("Size: 64x64, "), std::string::npos) << t;
  EXPECT_NE(t.find("Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent"), std::string::npos)
      << t;
  auto back = api::parse_infotext(t);
  bool found = false;
  for (const auto& [k, v] : back) found = found || (k == "Hires upscaler" && v == "Latent");
  EXPECT_TRUE(found);

  api::Request bad = r;
  bad.hires_upscaler = "esrgan";
  expect_error([&] { api::Engine::validate(bad); }, "--hires-upscaler esrgan", "--hires-upscaler-model");
  bad.hires_upscaler_model = (dir_ / "not-an-upscaler.safetensors").string();
  save_safetensors(bad.hires_upscaler_model, {{"emb_params", Tensor::zeros({1, 8})}});
  expect_error([&] { engine.generate(bad); }, bad.hires_upscaler_model, "RRDBNet");
  bad = r;
  bad.hires_denoise = 0;
  expect_error([&] { api::Engine::validate(bad); }, "--hires-denoise 0", "(0, 1]");
  bad = r;
  bad.init = res.images[0].image;
  expect_error([&] { api::Engine::validate(bad); }, "--hires-scale", "txt2img");
}
