// Samplers, second half: KDPM2 (dpm2, dpm2_a), DPMSolverMultistep (dpm++2m, dpm++2m_sde, Karras),
// DPMSolverSinglestep (dpm++2s), UniPC and DEIS against diffusers:
//  - timesteps, sigmas and init_noise_sigma equal schedules.json at 5 and 20 steps;
//  - end-to-end txt2img with the tiny sd1 model equals sd1/pipelines.safetensors
//    (txt2img.{kdpm2, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde_karras, dpmpp_2s, unipc}.latent);
//  - v-prediction gives the same trajectory as the equivalent epsilon model;
//  - noise is drawn exactly where diffusers draws it; img2img begin index; bad configs throw.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/layout.h"
#include "backend/backend.h"
#include "core/arena.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "models/tokenizer.h"
#include "pipeline/denoise.h"
#include "pipeline/rng.h"
#include "pipeline/samplers/common.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// The bundled copy first (DIFFUSE_TEST_DATA), else the shared fixture.
std::string data_path(const std::string& rel) {
  for (const std::string& base :
       {std::string(DIFFUSE_TEST_DATA), std::string(DIFFUSE_SHARED_DIR) + "/fixtures"}) {
    const std::string p = base + "/" + rel;
    if (fs::exists(p)) return p;
  }
  return {};
}

const json* schedules() {
  static json j;
  static bool loaded = false;
  if (!loaded) {
    loaded = true;
    const std::string p = data_path("schedules.json");
    if (!p.empty()) j = json::parse(std::ifstream(p));
  }
  return j.is_null() ? nullptr : &j;
}

// The SamplerOptions a diffusers config (schedules.json "config") stands for.
SamplerOptions options_from_config(const std::string& name, const json& c) {
  SamplerOptions o;
  o.name = name;
  DF_CHECK(c.value("beta_schedule", "scaled_linear") == "scaled_linear", name, ": beta_schedule");
  o.noise = NoiseSchedule::scaled_linear(c.value("num_train_timesteps", 1000), c.value("beta_start", 0.00085),
                                         c.value("beta_end", 0.012));
  o.prediction = c.value("prediction_type", "epsilon") == "v_prediction" ? Prediction::VPrediction : Prediction::Epsilon;
  o.timestep_spacing = c.value("timestep_spacing", "linspace");
  o.steps_offset = c.value("steps_offset", 0);
  o.use_karras_sigmas = c.value("use_karras_sigmas", false);
  o.final_sigmas_type = c.value("final_sigmas_type", "zero");
  o.solver_order = c.value("solver_order", 2);
  o.algorithm_type = c.value("algorithm_type", "");
  o.solver_type = c.value("solver_type", "");
  o.lower_order_final = c.value("lower_order_final", true);
  o.euler_at_final = c.value("euler_at_final", false);
  o.use_lu_lambdas = c.value("use_lu_lambdas", false);
  if (c.contains("lambda_min_clipped") && !c["lambda_min_clipped"].is_null())
    o.lambda_min_clipped = c["lambda_min_clipped"].get<double>();
  o.predict_x0 = c.value("predict_x0", true);
  if (c.contains("disable_corrector")) o.disable_corrector = c["disable_corrector"].get<std::vector<int>>();
  return o;
}

// Fixture key -> the factory of its diffusers class.
std::unique_ptr<Scheduler> make_for(const std::string& key, const SamplerOptions& o) {
  if (key == "kdpm2") return make_kdpm2(false, o);
  if (key == "kdpm2_a") return make_kdpm2(true, o);
  if (key == "dpmpp_2m" || key == "dpmpp_2m_karras") return make_dpm_multistep(false, o);
  if (key == "dpmpp_2m_sde_karras") return make_dpm_multistep(true, o);
  if (key == "dpmpp_2s") return make_dpm_singlestep(o);
  if (key == "unipc") return make_unipc(o);
  if (key == "deis") return make_deis(o);
  fail("no factory for ", key);
}

std::unique_ptr<Scheduler> make_from_fixture(const std::string& key, Prediction p = Prediction::Epsilon) {
  const json* s = schedules();
  SamplerOptions o = options_from_config(key, (*s)[key + "@5"]["config"]);
  o.prediction = p;
  return make_for(key, o);
}

const char* kKeys[] = {"kdpm2", "kdpm2_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras",
                       "dpmpp_2s", "unipc", "deis"};

// ---- (1) schedules -------------------------------------------------------------------------

TEST(SamplersB, SchedulesMatchDiffusers) {
  const json* s = schedules();
  if (!s) GTEST_SKIP() << "schedules.json not found (bundled or shared fixtures)";
  for (const char* key : kKeys) {
    for (int steps : {5, 20}) {
      const std::string k = std::string(key) + "@" + std::to_string(steps);
      SCOPED_TRACE(k);
      ASSERT_TRUE(s->contains(k));
      const json& want = (*s)[k];
      auto sched = make_for(key, options_from_config(key, want["config"]));
      sched->set_timesteps(steps);
      const auto wt = want["timesteps"].get<std::vector<double>>();
      const auto& gt = sched->timesteps();
      ASSERT_EQ(gt.size(), wt.size());
      double max_t = 0;
      for (size_t i = 0; i < wt.size(); ++i) {
        // Integer timesteps exactly; KDPM2's interpolated ones to float32 precision of the
        // log-sigma interpolation (diffusers mixes float32 and float64 there).
        const double tol = wt[i] == std::floor(wt[i]) && gt[i] == std::floor(gt[i]) ? 0.0 : 2e-3;
        EXPECT_NEAR(gt[i], wt[i], tol) << "timestep " << i;
        max_t = std::max(max_t, std::fabs(gt[i] - wt[i]));
      }
      const auto ws = want["sigmas"].get<std::vector<double>>();
      const auto& gs = sched->sigmas();
      ASSERT_EQ(gs.size(), ws.size());
      double max_s = 0;
      for (size_t i = 0; i < ws.size(); ++i) {
        EXPECT_NEAR(gs[i], ws[i], 2e-6 * std::max(1.0, std::fabs(ws[i]))) << "sigma " << i;
        max_s = std::max(max_s, std::fabs(gs[i] - ws[i]));
      }
      const double wi = want["init_noise_sigma"].get<double>();
      EXPECT_NEAR(sched->init_noise_sigma(), wi, 2e-6 * std::max(1.0, wi));
      std::printf("[%s] %zu timesteps (max|dt| %.3g), %zu sigmas (max|ds| %.3g), init_noise_sigma %.7g\n",
                  k.c_str(), gt.size(), max_t, gs.size(), max_s, sched->init_noise_sigma());
    }
  }
}

// ---- synthetic model: exact eps <-> v equivalence, noise draws, begin index ----------------------

// A deterministic stand-in for the UNet: eps = 0.3·x_in + 0.1·sin(k + t/100).
Tensor fake_eps(const Tensor& x_in, double t) {
  Tensor e = Tensor::empty(x_in.shape());
  for (int64_t k = 0; k < x_in.numel(); ++k)
    e.f32()[k] = float(0.3 * x_in.f32()[k] + 0.1 * std::sin(double(k) + t / 100.0));
  return e;
}

Tensor start_latent(int64_t n = 64) {
  Tensor x = Tensor::empty({1, 4, 4, n / 16});
  for (int64_t k = 0; k < x.numel(); ++k) x.f32()[k] = float(std::cos(0.7 * double(k)) * 1.3);
  return x;
}

NoiseFn counting_noise(int& calls, const Tensor& like) {
  return [&calls, like]() {
    ++calls;
    Tensor n = Tensor::empty(like.shape());
    for (int64_t k = 0; k < n.numel(); ++k) n.f32()[k] = float(std::sin(1.3 * double(k) + 0.37 * calls));
    return n;
  };
}

// Runs the sampler over its whole schedule with the fake model; v-prediction converts the same
// eps to v with the (alpha, sigma) of the evaluation (recovered from the input scaling for the
// k-diffusion samplers, from sigmas() for the others).
Tensor run_fake(const std::string& key, Prediction p, int steps, int& noise_calls) {
  auto sched = make_from_fixture(key, p);
  sched->set_timesteps(steps);
  const bool ve = key == "kdpm2" || key == "kdpm2_a";
  Tensor x = start_latent();
  x = scaled(x, sched->init_noise_sigma());
  const Tensor like = x;
  NoiseFn noise = counting_noise(noise_calls, like);
  const std::vector<double> ts = sched->timesteps();
  for (size_t i = 0; i < ts.size(); ++i) {
    const Tensor x_in = sched->scale_model_input(x, ts[i]);
    Tensor out = fake_eps(x_in, ts[i]);
    if (p == Prediction::VPrediction) {
      double s;
      if (ve) {
        const double ratio = double(x_in.f32()[0]) / double(x.f32()[0]);
        s = std::sqrt(std::max(0.0, 1.0 / (ratio * ratio) - 1.0));
      } else {
        s = sched->sigmas()[i];
      }
      const double alpha = 1.0 / std::sqrt(s * s + 1.0), sig = s * alpha;
      // v = (eps − sigma_vp · x_in) / alpha
      out = lincomb({{1.0 / alpha, out}, {-sig / alpha, x_in}});
    }
    sched->step(out, ts[i], x, noise);
  }
  return x;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  double m = 0;
  for (int64_t k = 0; k < a.numel(); ++k) m = std::max(m, std::fabs(double(a.f32()[k]) - double(b.f32()[k])));
  return m;
}
double max_abs(const Tensor& a) {
  double m = 0;
  for (int64_t k = 0; k < a.numel(); ++k) m = std::max(m, std::fabs(double(a.f32()[k])));
  return m;
}

TEST(SamplersB, VPredictionMatchesEquivalentEpsilonModel) {
  if (!schedules()) GTEST_SKIP() << "schedules.json not found";
  for (const char* key : kKeys) {
    for (int steps : {5, 20}) {
      int c1 = 0, c2 = 0;
      const Tensor a = run_fake(key, Prediction::Epsilon, steps, c1);
      const Tensor b = run_fake(key, Prediction::VPrediction, steps, c2);
      const double d = max_abs_diff(a, b), bound = 2e-4 * std::max(1.0, max_abs(a));
      std::printf("[%s@%d] v-prediction vs epsilon: max|diff| %.3g (max|x| %.3g)\n", key, steps, d, max_abs(a));
      EXPECT_LE(d, bound) << key << "@" << steps;
      EXPECT_EQ(c1, c2);
      bool finite = true;
      for (int64_t k = 0; k < a.numel(); ++k) finite &= std::isfinite(a.f32()[k]);
      EXPECT_TRUE(finite) << key;
    }
  }
}

TEST(SamplersB, NoiseIsDrawnWhereDiffusersDrawsIt) {
  if (!schedules()) GTEST_SKIP() << "schedules.json not found";
  // dpm++2m_sde: once per step (the last included); dpm2_a: once per step, in its second
  // sub-step (steps − 1 of them); the ODE solvers never.
  const struct {
    const char* key;
    int per5, per20;
  } cases[] = {{"dpmpp_2m_sde_karras", 5, 20}, {"kdpm2_a", 4, 19}, {"kdpm2", 0, 0}, {"dpmpp_2m", 0, 0},
               {"dpmpp_2m_karras", 0, 0}, {"dpmpp_2s", 0, 0}, {"unipc", 0, 0}, {"deis", 0, 0}};
  for (const auto& c : cases) {
    int n5 = 0, n20 = 0;
    run_fake(c.key, Prediction::Epsilon, 5, n5);
    run_fake(c.key, Prediction::Epsilon, 20, n20);
    EXPECT_EQ(n5, c.per5) << c.key;
    EXPECT_EQ(n20, c.per20) << c.key;
  }
  // Different noise changes an SDE / ancestral result and nothing else.
  for (const char* key : {"dpmpp_2m_sde_karras", "kdpm2_a"}) {
    auto s1 = make_from_fixture(key), s2 = make_from_fixture(key);
    s1->set_timesteps(5);
    s2->set_timesteps(5);
    Tensor x1 = start_latent(), x2 = start_latent();
    int a = 0, b = 100;
    NoiseFn n1 = counting_noise(a, x1), n2 = counting_noise(b, x2);
    for (double t : std::vector<double>(s1->timesteps())) {
      s1->step(fake_eps(s1->scale_model_input(x1, t), t), t, x1, n1);
      s2->step(fake_eps(s2->scale_model_input(x2, t), t), t, x2, n2);
    }
    EXPECT_GT(max_abs_diff(x1, x2), 1e-3) << key;
  }
}

// dpm2_a has no pipeline reference: check it against an independent double-precision
// transcription of k-diffusion's sample_dpm_2_ancestral (eta 1) over the fixture's sigmas and
// timesteps, with the fake model and the same noise sequence.
TEST(SamplersB, KDPM2AncestralMatchesKDiffusionAlgorithm) {
  const json* s = schedules();
  if (!s) GTEST_SKIP() << "schedules.json not found";
  for (int steps : {5, 20}) {
    const json& fx = (*s)["kdpm2_a@" + std::to_string(steps)];
    const auto fs_ = fx["sigmas"].get<std::vector<double>>();
    const auto ft = fx["timesteps"].get<std::vector<double>>();
    std::vector<double> sig{fs_[0]};  // de-interleave: s_0, s_1, ..., s_n
    for (size_t i = 1; i + 1 < fs_.size(); i += 2) sig.push_back(fs_[i]);
    ASSERT_EQ(int(sig.size()), steps + 1);

    int calls_ref = 0;
    Tensor x = scaled(start_latent(), fx["init_noise_sigma"].get<double>());
    NoiseFn noise_ref = counting_noise(calls_ref, x);
    auto denoised = [](const Tensor& xx, double sigma, double t) {
      const Tensor x_in = scaled(xx, 1.0 / std::sqrt(sigma * sigma + 1.0));
      return lincomb({{1.0, xx}, {-sigma, fake_eps(x_in, t)}});  // x0 = x − σ·eps
    };
    size_t ti = 0;
    for (int i = 0; i < steps; ++i) {
      const double s0 = sig[size_t(i)], s1 = sig[size_t(i) + 1];
      const double up = std::min(s1, std::sqrt(s1 * s1 * (s0 * s0 - s1 * s1) / (s0 * s0)));
      const double down = std::sqrt(s1 * s1 - up * up);
      const Tensor den = denoised(x, s0, ft[ti++]);
      const Tensor d = lincomb({{1.0 / s0, x}, {-1.0 / s0, den}});
      if (down == 0.0 || i == steps - 1) {  // diffusers zeroes the last midpoints: plain Euler to 0
        x = lincomb({{1.0, x}, {-s0, d}});
        continue;
      }
      const double mid = std::exp(0.5 * (std::log(s0) + std::log(down)));
      const Tensor x2 = lincomb({{1.0, x}, {mid - s0, d}});
      const Tensor den2 = denoised(x2, mid, ft[ti++]);
      const Tensor d2 = lincomb({{1.0 / mid, x2}, {-1.0 / mid, den2}});
      x = lincomb({{1.0, x}, {down - s0, d2}, {up, noise_ref()}});
    }
    EXPECT_EQ(ti, ft.size());

    int calls = 0;
    const Tensor got = run_fake("kdpm2_a", Prediction::Epsilon, steps, calls);
    const double diff = max_abs_diff(got, x);
    std::printf("[kdpm2_a@%d] vs k-diffusion transcription: max|diff| %.3g (max|x| %.3g)\n", steps, diff, max_abs(x));
    EXPECT_LE(diff, 1e-4 * std::max(1.0, max_abs(x)));
    EXPECT_EQ(calls, calls_ref);
  }
}

TEST(SamplersB, BeginIndexAndAddNoise) {
  if (!schedules()) GTEST_SKIP() << "schedules.json not found";
  for (const char* key : kKeys) {
    SCOPED_TRACE(key);
    auto s = make_from_fixture(key);
    s->set_timesteps(10);
    const int begin = 4 * s->order();
    s->set_begin_index(begin);
    const double t0 = s->timesteps()[size_t(begin)];
    const Tensor x0 = start_latent(), noise = scaled(start_latent(), -0.5);
    Tensor x = s->add_noise(x0, noise, t0);
    // add_noise at the begin index: x0 + sigma·noise (k-diffusion) or alpha·x0 + sigma_t·noise.
    const double sig = s->sigmas()[size_t(begin)];
    const bool ve = std::string(key) == "kdpm2" || std::string(key) == "kdpm2_a";
    const double a = ve ? 1.0 : 1.0 / std::sqrt(sig * sig + 1.0), b = ve ? sig : sig * a;
    EXPECT_NEAR(x.f32()[3], a * x0.f32()[3] + b * noise.f32()[3], 1e-5 * std::max(1.0, double(std::fabs(x.f32()[3]))));
    int calls = 0;
    NoiseFn n = counting_noise(calls, x);
    const std::vector<double> ts = s->timesteps();
    for (size_t i = size_t(begin); i < ts.size(); ++i) s->step(fake_eps(s->scale_model_input(x, ts[i]), ts[i]), ts[i], x, n);
    bool finite = true;
    for (int64_t k = 0; k < x.numel(); ++k) finite &= std::isfinite(x.f32()[k]);
    EXPECT_TRUE(finite);
    EXPECT_GT(max_abs(x), 0.0);
  }
}

// The registry's names mean the fixture configs; the other schedule variants build sane schedules.
TEST(SamplersB, RegistryNamesMatchFixtures) {
  const json* s = schedules();
  if (!s) GTEST_SKIP() << "schedules.json not found";
  const struct {
    const char *name, *schedule, *key;
  } cases[] = {{"dpm2", "default", "kdpm2"},          {"dpm2_a", "default", "kdpm2_a"},
               {"dpm++2m", "default", "dpmpp_2m"},    {"dpm++2m", "karras", "dpmpp_2m_karras"},
               {"dpm++2m_sde", "karras", "dpmpp_2m_sde_karras"}, {"dpm++2s", "default", "dpmpp_2s"},
               {"unipc", "default", "unipc"},         {"deis", "default", "deis"}};
  for (const auto& c : cases) {
    for (int steps : {5, 20}) {
      SCOPED_TRACE(std::string(c.name) + "/" + c.schedule + "@" + std::to_string(steps));
      const json& want = (*s)[std::string(c.key) + "@" + std::to_string(steps)];
      auto sched = make_scheduler(c.name, c.schedule, Prediction::Epsilon);
      sched->set_timesteps(steps);
      const auto wt = want["timesteps"].get<std::vector<double>>();
      const auto ws = want["sigmas"].get<std::vector<double>>();
      ASSERT_EQ(sched->timesteps().size(), wt.size());
      ASSERT_EQ(sched->sigmas().size(), ws.size());
      for (size_t i = 0; i < wt.size(); ++i) EXPECT_NEAR(sched->timesteps()[i], wt[i], 2e-3);
      for (size_t i = 0; i < ws.size(); ++i) EXPECT_NEAR(sched->sigmas()[i], ws[i], 2e-6 * std::max(1.0, ws[i]));
      EXPECT_NEAR(sched->init_noise_sigma(), want["init_noise_sigma"].get<double>(), 1e-5);
    }
  }
  for (const char* name : {"dpm2", "dpm2_a", "dpm++2m", "dpm++2m_sde", "dpm++2s", "unipc", "deis"}) {
    for (const char* schedule : {"default", "karras", "trailing"}) {
      if (std::string(name) == "dpm++2s" && std::string(schedule) == "trailing") {
        EXPECT_THROW(make_scheduler(name, schedule, Prediction::Epsilon), Error);
        continue;
      }
      SCOPED_TRACE(std::string(name) + "/" + schedule);
      auto sched = make_scheduler(name, schedule, Prediction::VPrediction);
      sched->set_timesteps(12);
      const auto& ts = sched->timesteps();
      const auto& sg = sched->sigmas();
      ASSERT_FALSE(ts.empty());
      // dpm2_a with Karras sigmas: the midpoint's fractional timestep can sit up to 0.5 below the
      // next rounded one (diffusers rounds only the main timesteps).
      const double slack = std::string(name).rfind("dpm2", 0) == 0 ? 0.5 : 0.0;
      for (size_t i = 1; i < ts.size(); ++i)
        EXPECT_LE(ts[i], ts[i - 1] + slack) << "timesteps not descending at " << i;
      for (size_t i = 1; i < sg.size(); ++i) EXPECT_LE(sg[i], sg[i - 1]) << "sigmas not descending at " << i;
      for (double v : sg) EXPECT_TRUE(std::isfinite(v));
      Tensor x = scaled(start_latent(), sched->init_noise_sigma());
      int calls = 0;
      NoiseFn noise = counting_noise(calls, x);
      for (double t : std::vector<double>(ts)) sched->step(fake_eps(sched->scale_model_input(x, t), t), t, x, noise);
      bool finite = true;
      for (int64_t k = 0; k < x.numel(); ++k) finite &= std::isfinite(x.f32()[k]);
      EXPECT_TRUE(finite);
    }
  }
}

TEST(SamplersB, BadConfigsThrow) {
  SamplerOptions o;
  o.name = "dpm++2m";
  o.algorithm_type = "dpmsolver";
  EXPECT_THROW(make_dpm_multistep(false, o), Error);
  o.algorithm_type = "dpmsolver++";
  o.solver_type = "rk4";
  EXPECT_THROW(make_dpm_multistep(false, o), Error);
  o.solver_type = "midpoint";
  o.solver_order = 4;
  EXPECT_THROW(make_dpm_singlestep(o), Error);
  o.solver_order = 2;
  o.final_sigmas_type = "half";
  EXPECT_THROW(make_dpm_multistep(false, o), Error);
  SamplerOptions u;
  u.name = "unipc";
  u.solver_type = "bh3";
  EXPECT_THROW(make_unipc(u), Error);
  SamplerOptions d;
  d.name = "deis";
  d.timestep_spacing = "cosine";
  auto deis = make_deis(d);
  try {
    deis->set_timesteps(5);
    ADD_FAILURE() << "no error for timestep_spacing cosine";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cosine"), std::string::npos) << e.what();
  }
  SamplerOptions k;
  k.name = "dpm2";
  auto kd = make_kdpm2(false, k);
  EXPECT_THROW(kd->set_timesteps(0), Error);
  kd->set_timesteps(5);
  Tensor x = start_latent(), wrong = Tensor::zeros({1, 2, 2, 2});
  EXPECT_THROW(kd->step(wrong, kd->timesteps()[0], x, nullptr), Error);
}

// ---- (2) end-to-end txt2img against diffusers ----------------------------------------------

struct Pipeline {
  std::unique_ptr<Backend> be;
  std::unique_ptr<SDModel> model;
  TensorFile refs;
  Guidance g;
};

Pipeline* pipeline() {
  static std::unique_ptr<Pipeline> p;
  static bool tried = false;
  if (tried) return p.get();
  tried = true;
  const std::string model_path = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";
  const std::string refs_path = data_path("sd1/pipelines.safetensors");
  if (!fs::exists(model_path) || refs_path.empty()) return nullptr;
  auto q = std::make_unique<Pipeline>();
  q->be = make_cpu_backend(Precision::F32);
  SDLoadOptions lo;
  lo.vae_encoder = false;
  lo.vae_decoder = false;
  q->model = SDModel::load(model_path, *q->be, lo);
  q->refs = load_safetensors(refs_path);
  const ClipTokenizer& tok = ClipTokenizer::builtin();
  const std::vector<std::vector<int>> ids = {tok.encode_padded("a photograph of an astronaut riding a horse", 49407),
                                             tok.encode_padded("blurry, low quality", 49407)};
  Arena arena;
  Ctx ctx{*q->be, arena};
  const Tensor h = q->model->te.forward(ctx, ids).last_hidden;  // [2, 77, W]
  q->g.cond = h.slice0(0, 1).clone();
  q->g.uncond = h.slice0(1, 2).clone();
  q->g.cfg = 7.5f;
  p = std::move(q);
  return p.get();
}

const Tensor* ref(const TensorFile& f, const std::string& name) { return f.find(name); }

// Runs txt2img for fixture key `key` (5 steps) and compares the final latent.
void txt2img_parity(const std::string& key, bool sde) {
  if (!schedules()) GTEST_SKIP() << "schedules.json not found";
  Pipeline* p = pipeline();
  if (!p) GTEST_SKIP() << "tiny sd1 model or sd1/pipelines.safetensors not found";
  const Tensor* want = ref(p->refs, "txt2img." + key + ".latent");
  const Tensor* init = ref(p->refs, "txt2img." + key + ".init_noise");
  ASSERT_TRUE(want && init) << key;

  auto sched = make_from_fixture(key);
  sched->set_timesteps(5);
  NoiseFn noise;
  std::unique_ptr<Rng> rng;
  if (sde) {
    // The per-step noise continues the generator that drew the initial noise.
    try {
      rng = make_cpu_rng(42);
    } catch (const std::exception& e) {
      GTEST_SKIP() << "torch CPU generator (make_cpu_rng) not available yet: " << e.what();
    }
    const Tensor first = rng->randn(Shape{1, 4, 8, 8});
    const double d = max_abs_diff(first, init->to(DType::F32));
    if (d > 1e-6) GTEST_SKIP() << "make_cpu_rng(42) does not reproduce init_noise yet (max|diff| " << d << ")";
    Rng* r = rng.get();
    noise = [r]() { return nchw_to_nhwc(r->randn(Shape{1, 4, 8, 8})); };
  } else {
    noise = []() -> Tensor { fail("this sampler should not draw noise"); };
  }
  const Tensor x = scaled(nchw_to_nhwc(*init), sched->init_noise_sigma());
  Arena arena;
  Ctx ctx{*p->be, arena};
  const Tensor got = denoise(ctx, p->model->unet, *sched, x, p->g, noise);
  const Tensor w = nchw_to_nhwc(*want);
  const double d = max_abs_diff(got, w), mref = max_abs(w), bound = 1e-3 * std::max(1.0, mref);
  std::printf("[txt2img.%s] max|diff| %.3g (bound %.3g, max|ref| %.3g)\n", key.c_str(), d, bound, mref);
  EXPECT_LE(d, bound) << key;
}

TEST(SamplersBTxt2Img, KDPM2) { txt2img_parity("kdpm2", false); }
TEST(SamplersBTxt2Img, DPMpp2M) { txt2img_parity("dpmpp_2m", false); }
TEST(SamplersBTxt2Img, DPMpp2MKarras) { txt2img_parity("dpmpp_2m_karras", false); }
TEST(SamplersBTxt2Img, DPMpp2MSDEKarras) { txt2img_parity("dpmpp_2m_sde_karras", true); }
TEST(SamplersBTxt2Img, DPMpp2S) { txt2img_parity("dpmpp_2s", false); }
TEST(SamplersBTxt2Img, UniPC) { txt2img_parity("unipc", false); }

TEST(SamplersBTxt2Img, CpuRngReproducesInitNoise) {
  Pipeline* p = pipeline();
  if (!p) GTEST_SKIP() << "tiny sd1 model or sd1/pipelines.safetensors not found";
  std::unique_ptr<Rng> rng;
  try {
    rng = make_cpu_rng(42);
  } catch (const std::exception& e) {
    GTEST_SKIP() << "torch CPU generator (make_cpu_rng) not available yet: " << e.what();
  }
  const Tensor* init = ref(p->refs, "txt2img.dpmpp_2m_sde_karras.init_noise");
  ASSERT_TRUE(init);
  const Tensor first = rng->randn(Shape{1, 4, 8, 8});
  const double d = max_abs_diff(first, init->to(DType::F32));
  std::printf("[rng] make_cpu_rng(42) vs txt2img init_noise: max|diff| %.3g\n", d);
  EXPECT_LE(d, 1e-6);
}

}  // namespace
}  // namespace diffuse
