// Several ControlNet units (pipeline/control.h) on the tiny sd1 ControlNet fixture
// (sd1-controlnet/model/diffusers-controlnet) and a second ControlNet written by this test (the
// fixture's weights scaled per tensor, so its residuals differ): the hook's residuals are the sum
// of each unit's ControlNet run alone; guidance start/end (sd-webui-controlnet: active while
// start <= step/steps <= end) by the steps of a real denoising loop that got control; guess mode
// (diffusers: the conditional half only, residual i scaled by logspace(-1, 0, n + 1)[i]).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "backend/backend.h"
#include "core/arena.h"
#include "core/error.h"
#include "core/layout.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "models/controlnet.h"
#include "models/sd_model.h"
#include "nn/layers.h"
#include "pipeline/control.h"
#include "pipeline/denoise.h"
#include "pipeline/rng.h"
#include "pipeline/scheduler.h"
#include "models/t2i_adapter.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

// The fixture `rel` in ../shared/fixtures, else in tests/data; "" when neither has it.
std::string data_path(const std::string& rel) {
  const fs::path shared = fs::path(DIFFUSE_SHARED_DIR) / "fixtures" / rel, bundled = fs::path(DIFFUSE_TEST_DATA) / rel;
  return fs::exists(shared) ? shared.string() : fs::exists(bundled) ? bundled.string() : std::string();
}

double max_abs(const Tensor& t) {
  const Tensor f = t.to(DType::F32);
  const float* p = f.f32();
  return std::accumulate(p, p + f.numel(), 0.0, [](double m, float v) { return std::max(m, std::fabs(double(v))); });
}

// max |a - (wa·ra + wb·rb)| / max(1, max|expected|), element by element in double.
double rel_diff(const Tensor& got, const std::vector<std::pair<double, Tensor>>& terms) {
  Tensor g = got.to(DType::F32);
  std::vector<double> want(size_t(g.numel()), 0.0);
  for (const auto& [w, t] : terms) {
    Tensor f = t.to(DType::F32);
    EXPECT_EQ(f.numel(), g.numel());
    for (int64_t i = 0; i < std::min(f.numel(), g.numel()); ++i) want[size_t(i)] += w * f.f32()[i];
  }
  double d = 0, m = 1;
  for (int64_t i = 0; i < g.numel(); ++i) {
    d = std::max(d, std::fabs(double(g.f32()[i]) - want[size_t(i)]));
    m = std::max(m, std::fabs(want[size_t(i)]));
  }
  return d / m;
}

// Rows [from, from + n) of an f32 tensor, owned.
Tensor rows(const Tensor& t, int64_t from, int64_t n) {
  Tensor f = t.to(DType::F32);
  Shape s = f.shape();
  const int64_t row = f.numel() / s[0];
  s[0] = n;
  Tensor out = Tensor::empty(s);
  std::copy(f.f32() + from * row, f.f32() + (from + n) * row, out.f32());
  return out;
}

class ControlUnitsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string cn_dir = data_path("sd1-controlnet/model/diffusers-controlnet");
    const std::string hint = data_path("sd1-controlnet/control.png");
    const std::string model = data_path("sd1/model/tiny-sd1.safetensors");
    if (cn_dir.empty() || hint.empty() || model.empty()) return;
    be_ = make_cpu_backend(Precision::F32);
    SDLoadOptions lo;
    lo.vae_encoder = lo.vae_decoder = false;
    model_ = SDModel::load(model, *be_, lo);
    a_ = std::make_unique<ControlNet>(ControlNet::load_file(cn_dir, *be_));
    // A second ControlNet: every tensor of the fixture times (0.8 + 0.05·(its index mod 7)).
    tmp_ = fs::temp_directory_path() / ("diffuse_test_controlnet_units_" + std::to_string(::getpid()));
    fs::create_directories(tmp_);
    TensorFile f = open_model_file(cn_dir);
    std::vector<std::pair<std::string, Tensor>> out;
    for (size_t k = 0; k < f.tensors.size(); ++k) {
      Tensor t = f.tensors[k].tensor.to(DType::F32);
      const float s = 0.8f + 0.05f * float(k % 7);
      for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] *= s;
      out.emplace_back(f.tensors[k].name, t);
    }
    const std::string b_path = (tmp_ / "second.safetensors").string();
    save_safetensors(b_path, out);
    b_ = std::make_unique<ControlNet>(ControlNet::load_file(b_path, *be_));
    hint1_ = prepare_hint(read_image(hint), 64, 64);
    hint2_ = hint1_.clone();  // the inverted hint
    for (int64_t i = 0; i < hint2_.numel(); ++i) hint2_.f32()[i] = 1.0f - hint2_.f32()[i];
  }
  static void TearDownTestSuite() {
    a_.reset();
    b_.reset();
    model_.reset();
    be_.reset();
    std::error_code ec;
    if (!tmp_.empty()) fs::remove_all(tmp_, ec);
  }
  void SetUp() override {
    if (!model_) GTEST_SKIP() << "sd1-controlnet fixtures or the sd1 model not found in ../shared/fixtures or tests/data";
  }

  // A batch of 2 rows: latent [2, 8, 8, 4], context [2, 77, 64] (rows differ), t = 500.
  struct Inputs {
    Tensor x, context;
    std::vector<float> t = {500.0f, 500.0f};
  };
  static Inputs inputs() {
    Inputs in;
    in.x = Tensor::empty({2, 8, 8, 4});
    for (int64_t i = 0; i < in.x.numel(); ++i) in.x.f32()[i] = std::sin(0.37f * float(i));
    in.context = Tensor::empty({2, 77, 64});
    for (int64_t i = 0; i < in.context.numel(); ++i) in.context.f32()[i] = std::cos(0.11f * float(i));
    return in;
  }
  // One ControlNet alone at scale 1 (the reference the units are checked against).
  static ControlResiduals alone(Ctx& c, const ControlNet& net, const Tensor& hint, const Tensor& x,
                                const std::vector<float>& t, const Tensor& context) {
    Tensor e = net.embed_hint(c, hint);
    return net.forward(c, x, t, context, e, 1.0f);
  }

  static inline std::unique_ptr<Backend> be_;
  static inline std::unique_ptr<SDModel> model_;
  static inline std::unique_ptr<ControlNet> a_, b_;
  static inline Tensor hint1_, hint2_;
  static inline fs::path tmp_;
};

TEST_F(ControlUnitsTest, TwoUnitsAddTheirResiduals) {
  Arena arena;
  Ctx c{*be_, arena};
  const Inputs in = inputs();
  auto hook = control_hook({{a_.get(), hint1_, 0.7f}, {b_.get(), hint2_, 0.4f}});
  const ControlResiduals got = hook(c, ControlInputs{in.x, in.t, in.context, nullptr, nullptr, 0, 10, false});
  const ControlResiduals ra = alone(c, *a_, hint1_, in.x, in.t, in.context);
  const ControlResiduals rb = alone(c, *b_, hint2_, in.x, in.t, in.context);
  const ControlResiduals ra2 = alone(c, *a_, hint2_, in.x, in.t, in.context);  // A on B's hint
  ASSERT_EQ(got.down.size(), ra.down.size());
  ASSERT_EQ(int(got.down.size()), model_->unet.num_skips());
  double worst = 0, differ = 0;
  for (size_t i = 0; i <= got.down.size(); ++i) {
    const bool mid = i == got.down.size();
    const Tensor& g = mid ? got.mid : got.down[i];
    const Tensor& a = mid ? ra.mid : ra.down[i];
    const Tensor& b = mid ? rb.mid : rb.down[i];
    EXPECT_GT(max_abs(a), 1e-3) << "residual " << i;
    worst = std::max(worst, rel_diff(g, {{0.7, a}, {0.4, b}}));
    // The second ControlNet really differs from the first (else the sum would test nothing new).
    differ = std::max(differ, rel_diff(b, {{1.0, mid ? ra2.mid : ra2.down[i]}}));
  }
  std::printf("  units 0.7·A(hint) + 0.4·B(inverted hint): max relative |Δ| %.3g over %zu residuals; B vs A %.3g\n",
              worst, got.down.size() + 1, differ);
  EXPECT_LE(worst, 1e-5);
  EXPECT_GT(differ, 1e-3);
  // Units of ControlNets that do not fit together and bad start/end are refused.
  EXPECT_THROW(control_hook(std::vector<ControlUnit>{}), Error);
  EXPECT_THROW(control_hook({{a_.get(), hint1_, 1.0f, 0.7f, 0.3f}}), Error);
  EXPECT_THROW(control_hook({{a_.get(), hint1_, 1.0f, 0.0f, 1.5f}}), Error);
}

TEST_F(ControlUnitsTest, StartEndChooseTheStepsThatGetControl) {
  // A real denoising loop (Euler, 10 steps, guidance 7): which evaluations got residuals.
  Arena arena;
  Ctx c{*be_, arena};
  const int steps = 10;
  struct Case {
    double start, end;
    std::vector<int> want;  // sd-webui-controlnet: step/steps in [start, end]
  };
  const std::vector<Case> cases = {
      {0.0, 1.0, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}},
      {0.2, 0.6, {2, 3, 4, 5, 6}},
      {0.0, 0.35, {0, 1, 2, 3}},
      {0.55, 1.0, {6, 7, 8, 9}},
  };
  const Inputs in = inputs();
  for (const Case& k : cases) {
    auto inner = control_hook({{a_.get(), hint1_, 1.0f, k.start, k.end}});
    std::vector<int> got;
    DenoiseHooks hooks;
    hooks.control = [&](Ctx& sc, const ControlInputs& ci) {
      ControlResiduals r = inner(sc, ci);
      if (!r.empty()) got.push_back(ci.step);
      EXPECT_EQ(ci.steps, steps);
      EXPECT_TRUE(ci.guided);
      return r;
    };
    Guidance g;
    g.cond = rows(in.context, 1, 1);
    g.uncond = rows(in.context, 0, 1);
    g.cfg = 7.0f;
    auto s = make_scheduler("euler", "default", Prediction::Epsilon);
    s->set_timesteps(steps);
    std::shared_ptr<Rng> rng = make_cpu_rng(7);
    const Shape nchw{1, 4, 8, 8};
    Tensor x = nchw_to_nhwc(rng->randn(nchw));
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] *= float(s->init_noise_sigma());
    NoiseFn draw = [rng, nchw] { return nchw_to_nhwc(rng->randn(nchw)); };
    denoise(c, model_->unet, *s, x, g, draw, hooks);
    std::string list;
    for (int i : got) list += std::to_string(i) + " ";
    std::printf("  start %.2f end %.2f: control at steps %s\n", k.start, k.end, list.c_str());
    EXPECT_EQ(got, k.want) << "start " << k.start << " end " << k.end;
    for (int i = 0; i < steps; ++i)
      EXPECT_EQ(control_active(k.start, k.end, i, steps),
                std::find(k.want.begin(), k.want.end(), i) != k.want.end());
  }
  // Two units, one active early and one late: at each step the sum holds only the active ones.
  auto two = control_hook({{a_.get(), hint1_, 1.0f, 0.0f, 0.3f}, {b_.get(), hint2_, 1.0f, 0.5f, 1.0f}});
  const ControlResiduals ra = alone(c, *a_, hint1_, in.x, in.t, in.context);
  const ControlResiduals rb = alone(c, *b_, hint2_, in.x, in.t, in.context);
  const ControlResiduals early = two(c, ControlInputs{in.x, in.t, in.context, nullptr, nullptr, 2, 10, false});
  const ControlResiduals middle = two(c, ControlInputs{in.x, in.t, in.context, nullptr, nullptr, 4, 10, false});
  const ControlResiduals late = two(c, ControlInputs{in.x, in.t, in.context, nullptr, nullptr, 5, 10, false});
  EXPECT_TRUE(middle.empty()) << "step 4 of 10 lies outside both [0, 0.3] and [0.5, 1]";
  ASSERT_FALSE(early.empty());
  ASSERT_FALSE(late.empty());
  EXPECT_LE(rel_diff(early.mid, {{1.0, ra.mid}}), 1e-6);
  EXPECT_LE(rel_diff(late.mid, {{1.0, rb.mid}}), 1e-6);
}

TEST_F(ControlUnitsTest, GuessModeControlsTheConditionalHalfWithLogspaceScales) {
  Arena arena;
  Ctx c{*be_, arena};
  const Inputs in = inputs();  // row 0: unconditional, row 1: conditional
  const float strength = 0.8f;
  auto hook = control_hook({{a_.get(), hint1_, strength, 0.0f, 1.0f, true}});
  const ControlResiduals got = hook(c, ControlInputs{in.x, in.t, in.context, nullptr, nullptr, 0, 10, true});
  // The ControlNet alone on the conditional row, scale 1.
  const std::vector<float> t1 = {in.t[1]};
  const ControlResiduals ref = alone(c, *a_, hint1_, rows(in.x, 1, 1), t1, rows(in.context, 1, 1));
  const size_t n = ref.down.size();
  ASSERT_EQ(got.down.size(), n);
  double worst = 0, uncond = 0;
  for (size_t i = 0; i <= n; ++i) {
    const bool mid = i == n;
    const Tensor g = mid ? got.mid : got.down[i];
    ASSERT_EQ(g.dim(0), 2);
    // diffusers: scales = logspace(-1, 0, n + 1) · conditioning_scale; mid takes the last.
    const double scale = strength * std::pow(10.0, -1.0 + double(i) / double(n));
    worst = std::max(worst, rel_diff(rows(g, 1, 1), {{scale, mid ? ref.mid : ref.down[i]}}));
    uncond = std::max(uncond, max_abs(rows(g, 0, 1)));
  }
  std::printf("  guess mode: conditional half vs logspace(-1, 0, %zu)·0.8·alone: max relative |Δ| %.3g; "
              "unconditional half max|r| %.3g\n", n + 1, worst, uncond);
  EXPECT_LE(worst, 1e-5);
  EXPECT_EQ(uncond, 0.0);
  EXPECT_NEAR(ControlNet::guess_mode_scale(0, 12), 0.1, 1e-7);
  EXPECT_NEAR(ControlNet::guess_mode_scale(12, 12), 1.0, 1e-7);
  // Without guidance (one pass) every row gets the guess-mode scales.
  const ControlResiduals single = hook(c, ControlInputs{rows(in.x, 1, 1), t1, rows(in.context, 1, 1), nullptr,
                                                        nullptr, 0, 10, false});
  EXPECT_LE(rel_diff(single.down[0], {{strength * 0.1, ref.down[0]}}), 1e-5);
}

TEST_F(ControlUnitsTest, ForwardKeepsOnlySkipsAndResidualsInTheCallersArena) {
  // The ControlNet runs on the UNet's trunk code: block temporaries live in scratch, so the
  // caller's arena holds the time embedding, the kept skips and the residuals, nothing else.
  Arena hint_arena, arena;
  Ctx hc{*be_, hint_arena}, c{*be_, arena};
  const Inputs in = inputs();
  const Tensor emb = a_->embed_hint(hc, hint1_);
  const ControlResiduals r = a_->forward(c, in.x, in.t, in.context, emb, 1.0f);
  size_t skips = 0;
  for (const Tensor& d : r.down) skips += size_t(d.numel()) * sizeof(float);
  const size_t mid = size_t(r.mid.numel()) * sizeof(float);
  const size_t temb = 2 * size_t(in.x.dim(0)) * size_t(a_->config().unet.time_embed_dim()) * sizeof(float);
  // skips (kept) + their residuals + the mid residual + emb and SiLU(emb), 4 KiB of slack a tensor.
  const size_t bound = 2 * skips + mid + temb + 4096 * (2 * r.down.size() + 4);
  std::printf("  ControlNet forward: caller's arena peak %zu bytes, skips + residuals bound %zu\n", arena.peak(),
              bound);
  EXPECT_LE(arena.peak(), bound);
}

TEST_F(ControlUnitsTest, T2IAdapterUnitsAddStrengthTimesTheirFeaturesInsideTheDownPath) {
  // A T2I-Adapter for the tiny UNet, written here in TencentARC's layout (conv_in, body.K.block1 3×3,
  // block2 1×1, in_conv 1×1 where the width changes), 2 blocks a level.
  const UNetConfig& u = model_->unet_cfg;
  std::mt19937 g(5);
  std::vector<std::pair<std::string, Tensor>> t;
  auto conv = [&](const std::string& name, int64_t o, int64_t i, int64_t k) {
    Tensor w = Tensor::empty({o, i, k, k}), b = Tensor::empty({o});
    std::normal_distribution<float> n(0.0f, 1.0f / std::sqrt(float(i * k * k)));
    for (int64_t q = 0; q < w.numel(); ++q) w.f32()[q] = n(g);
    for (int64_t q = 0; q < o; ++q) b.f32()[q] = 0.1f * n(g);
    t.emplace_back(name + ".weight", w);
    t.emplace_back(name + ".bias", b);
  };
  conv("conv_in", u.block_out_channels[0], 192, 3);
  for (int l = 0; l < u.levels(); ++l) {
    const int ch = u.block_out_channels[size_t(l)], prev = l ? u.block_out_channels[size_t(l - 1)] : ch;
    if (prev != ch) conv("body." + std::to_string(2 * l) + ".in_conv", ch, prev, 1);
    for (int j = 0; j < 2; ++j) {
      conv("body." + std::to_string(2 * l + j) + ".block1", ch, ch, 3);
      conv("body." + std::to_string(2 * l + j) + ".block2", ch, ch, 1);
    }
  }
  const std::string path = (tmp_ / "adapter.safetensors").string();
  save_safetensors(path, t);
  ASSERT_TRUE(T2IAdapter::is_adapter_file(path));
  EXPECT_FALSE(T2IAdapter::is_adapter_file((tmp_ / "second.safetensors").string()));  // a ControlNet
  const T2IAdapter adapter = T2IAdapter::load_file(path, *be_);
  EXPECT_NO_THROW(adapter.check_compatible(u));

  Arena arena;
  Ctx c{*be_, arena};
  const Inputs in = inputs();
  const std::vector<Tensor> feats = adapter.forward(c, hint1_);
  ASSERT_EQ(int(feats.size()), u.levels());
  ControlUnit unit;
  unit.adapter = &adapter;
  unit.hint = hint1_;
  unit.strength = 0.6f;
  unit.end = 0.5;
  auto hook = control_hook({unit, {a_.get(), hint2_, 0.4f}});  // with a ControlNet unit beside it
  const ControlResiduals r = hook(c, ControlInputs{in.x, in.t, in.context, nullptr, nullptr, 0, 10, false});
  const ControlResiduals rb = alone(c, *a_, hint2_, in.x, in.t, in.context);
  ASSERT_EQ(r.intrablock.size(), feats.size());
  double worst = 0;
  for (size_t l = 0; l < feats.size(); ++l) {
    ASSERT_EQ(r.intrablock[l].dim(0), 2);
    for (int64_t row = 0; row < 2; ++row) worst = std::max(worst, rel_diff(rows(r.intrablock[l], row, 1), {{0.6, feats[l]}}));
  }
  EXPECT_LE(worst, 1e-6);
  EXPECT_LE(rel_diff(r.mid, {{0.4, rb.mid}}), 1e-5);  // the ControlNet unit's residuals are there too
  // Past its guidance end only the ControlNet unit is active.
  const ControlResiduals late = hook(c, ControlInputs{in.x, in.t, in.context, nullptr, nullptr, 6, 10, false});
  EXPECT_TRUE(late.intrablock.empty());
  EXPECT_FALSE(late.down.empty());
  // In the UNet: zero features change nothing (bitwise); the features change the prediction.
  const Tensor plain = model_->unet.forward(c, in.x, in.t, in.context).to(DType::F32);
  std::vector<Tensor> zero;
  for (const Tensor& f : r.intrablock) zero.push_back(Tensor::zeros(f.shape()));
  const Tensor with_zero = model_->unet.forward(c, in.x, in.t, in.context, nullptr, nullptr, nullptr, nullptr, &zero);
  const Tensor with = model_->unet.forward(c, in.x, in.t, in.context, nullptr, nullptr, nullptr, nullptr, &r.intrablock);
  const double d0 = rel_diff(with_zero, {{1.0, plain}}), d1 = rel_diff(with, {{1.0, plain}});
  std::printf("  T2I-Adapter unit: intrablock vs 0.6·features max relative |Δ| %.3g; UNet with zero features %.3g, "
              "with the features %.3g from the plain prediction\n", worst, d0, d1);
  EXPECT_EQ(d0, 0.0);
  EXPECT_GT(d1, 1e-3);
  // A feature of the wrong size is refused with the expected size.
  std::vector<Tensor> bad = r.intrablock;
  bad[1] = Tensor::zeros({2, 3, 3, bad[1].dim(3)});
  EXPECT_THROW(model_->unet.forward(c, in.x, in.t, in.context, nullptr, nullptr, nullptr, nullptr, &bad), Error);
  // Guess mode is for ControlNets.
  unit.guess_mode = true;
  EXPECT_THROW(control_hook({unit}), Error);
}

}  // namespace
}  // namespace diffuse
