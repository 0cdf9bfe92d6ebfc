// Zero terminal SNR (Lin et al. 2023, arXiv 2305.08891; diffusers' rescale_betas_zero_snr, kohya's
// --zero_terminal_snr): the rescaled schedule against a float64 computation written here from the
// paper's algorithm, training's schedule and noised batch at t = T (x_T is the noise, the v target
// is −x0), the samplers' finite σ_max (ᾱ_T = 2^-24 as diffusers' Euler/DPM/UniPC: σ 4096) and the
// first Euler step of a v model, and what a checkpoint declares (ss_zero_terminal_snr / an
// embedded scheduler config).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "pipeline/schedule.h"
#include "pipeline/scheduler.h"
#include "train/objective.h"

using namespace diffuse;

namespace {

// SD's scaled_linear ᾱ in float64, then the paper's Algorithm 1 in float64.
std::vector<double> rescaled_f64() {
  const int T = 1000;
  const double a = std::sqrt(0.00085), b = std::sqrt(0.012);
  std::vector<double> sq;
  double cum = 1.0;
  for (int i = 0; i < T; ++i) {
    const double v = a + (b - a) * i / (T - 1);
    cum *= 1.0 - v * v;
    sq.push_back(std::sqrt(cum));
  }
  const double s0 = sq.front(), sT = sq.back();
  std::vector<double> out;
  for (double s : sq) {
    const double r = (s - sT) * s0 / (s0 - sT);
    out.push_back(r * r);
  }
  return out;
}

}  // namespace

TEST(ZeroTerminalSnr, ScheduleMatchesTheAlgorithmInFloat64) {
  NoiseSchedule s = NoiseSchedule::scaled_linear();
  const double first = s.alphas_cumprod.front(), last_before = s.alphas_cumprod.back();
  s.rescale_zero_terminal_snr();
  EXPECT_TRUE(s.zero_terminal_snr);
  const std::vector<double> ref = rescaled_f64();
  ASSERT_EQ(s.alphas_cumprod.size(), ref.size());
  EXPECT_EQ(s.alphas_cumprod.back(), 0.0);     // SNR 0 at t = T
  EXPECT_NEAR(s.alphas_cumprod.front(), first, 2e-7);  // √ᾱ_0 kept
  double worst = 0;
  for (size_t t = 0; t + 1 < ref.size(); ++t) {
    // The f32 schedule's ᾱ is within (2t+3)u of float64 (test_train_objective: ≤ 1.2e-4); the
    // rescale subtracts √ᾱ_T from √ᾱ_t, which near t = T cancels: relative error up to ~u·√ᾱ_T /
    // (√ᾱ_t − √ᾱ_T) · 2000 — bounded here by 1e-4 (measured 1.1e-5 at worst).
    const double rel = std::abs(s.alphas_cumprod[t] - ref[t]) / ref[t];
    worst = std::max(worst, rel);
    ASSERT_LT(rel, 1e-4) << "t=" << t << " " << s.alphas_cumprod[t] << " vs " << ref[t];
    if (t > 0) {
      ASSERT_LT(s.alphas_cumprod[t], s.alphas_cumprod[t - 1]) << t;
      // Every ᾱ but the first is lower than the original schedule's (more noise), by less at small t.
      ASSERT_LT(s.alphas_cumprod[t], NoiseSchedule::scaled_linear().alphas_cumprod[t]) << t;
    }
  }
  // The betas give back the rescaled ᾱ: cumprod(1 − β) (the last β is 1).
  double cum = 1.0;
  for (size_t t = 0; t < s.betas.size(); ++t) {
    cum *= 1.0 - s.betas[t];
    ASSERT_NEAR(cum, s.alphas_cumprod[t], 1e-9 + 1e-6 * s.alphas_cumprod[t]) << t;
  }
  EXPECT_EQ(s.betas.back(), 1.0);
  std::printf("[ figures  ] zero terminal SNR: ᾱ_999 %.3g -> 0, ᾱ_900 %.4g -> %.4g; worst relative error vs float64 %.2e\n",
              last_before, NoiseSchedule::scaled_linear().alphas_cumprod[900], s.alphas_cumprod[900], worst);
}

TEST(ZeroTerminalSnr, TrainingNoisesToPureNoiseAtTheLastStep) {
  const train::DdpmSchedule z = train::DdpmSchedule::sd(true), plain = train::DdpmSchedule::sd();
  EXPECT_EQ(z.sqrt_alpha(999), 0.0f);
  EXPECT_EQ(z.sqrt_one_minus_alpha(999), 1.0f);
  EXPECT_EQ(z.snr(999), 0.0f);
  EXPECT_GT(plain.snr(999), 0.004f);
  EXPECT_LT(z.snr(500), plain.snr(500));
  Tensor x0 = Tensor::empty({2, 3, 5, 4}, DType::F32), noise = Tensor::empty({2, 3, 5, 4}, DType::F32);
  for (int64_t i = 0; i < x0.numel(); ++i) x0.f32()[i] = std::sin(0.3 * double(i)) + 0.5f, noise.f32()[i] = std::cos(0.7 * double(i));
  const train::NoisedBatch nb = train::make_noised_batch(z, x0, noise, {999, 999}, train::Objective::V);
  for (int64_t i = 0; i < x0.numel(); ++i) {
    ASSERT_EQ(nb.noisy.f32()[i], noise.f32()[i]) << i;      // x_T holds no trace of x0
    ASSERT_EQ(nb.target.f32()[i], -x0.f32()[i]) << i;       // v = √ᾱ ε − √(1−ᾱ) x0 = −x0
  }
  // Min-SNR-γ in v form at t = T: min(0, γ)/(0 + 1) = 0 (as kohya computes it).
  EXPECT_EQ(train::loss_weights(z, {999, 500}, train::Objective::V, 5.0f)[0], 0.0f);
}

TEST(ZeroTerminalSnr, SamplersStartFromAFiniteSigmaAndPredictX0AsMinusV) {
  for (const char* name : {"euler", "euler_a", "dpm++2m", "unipc", "ddim", "heun"}) {
    SCOPED_TRACE(name);
    auto plain = make_scheduler(name, "default", Prediction::VPrediction);
    auto z = make_scheduler(name, "default", Prediction::VPrediction, true);
    plain->set_timesteps(20);
    z->set_timesteps(20);
    ASSERT_EQ(plain->timesteps(), z->timesteps());  // the spacing is the sampler's
    if (!z->sigmas().empty()) {
      // σ at t = 999 from ᾱ = 2^-24: √((1 − 2^-24) / 2^-24) ≈ 4096 (14.6 without the rescale).
      EXPECT_NEAR(z->sigmas().front(), 4096.0, 0.01);
      EXPECT_NEAR(plain->sigmas().front(), 14.6146, 1e-3);
      // Every later σ is larger than the plain schedule's (more noise at each timestep), but at
      // t = 0, where the rescale keeps ᾱ_0 (the σ before the final 0).
      const std::vector<double>& ps = plain->sigmas();
      const double a0 = NoiseSchedule::scaled_linear().alphas_cumprod_f32().front();
      const double at_t0 = std::sqrt((1.0 - a0) / a0);
      for (size_t i = 1; i + 1 < ps.size(); ++i) {
        if (std::abs(ps[i] - at_t0) < 1e-6) EXPECT_NEAR(z->sigmas()[i], at_t0, 1e-6) << i;
        else EXPECT_GT(z->sigmas()[i], ps[i]) << i;
      }
    }
  }
  // Euler, one step from x_T = 4096·n with a model that predicts v = −x0 exactly: x0 = −σ/√(σ²+1)·v
  // + x/(σ²+1), and the step lands on x0 + σ_1·(x − x0)/σ_0.
  auto e = make_scheduler("euler", "default", Prediction::VPrediction, true);
  e->set_timesteps(4);
  const double s0 = e->sigmas()[0], s1 = e->sigmas()[1];
  Tensor x = Tensor::empty({1, 4, 2, 2}, DType::F32), v = Tensor::empty({1, 4, 2, 2}, DType::F32);
  std::vector<double> x0(16), xT(16);
  for (int i = 0; i < 16; ++i) {
    x0[size_t(i)] = 0.1 * i - 0.7;
    xT[size_t(i)] = s0 * std::cos(1.3 * i);
    x.f32()[i] = float(xT[size_t(i)]);
    v.f32()[i] = float(-x0[size_t(i)]);
  }
  e->step(v, e->timesteps()[0], x, nullptr);
  for (int i = 0; i < 16; ++i) {
    const double pred = s0 / std::sqrt(s0 * s0 + 1) * x0[size_t(i)] + xT[size_t(i)] / (s0 * s0 + 1);
    const double want = pred + s1 * (xT[size_t(i)] - pred) / s0;
    EXPECT_NEAR(x.f32()[i], want, 1e-4 * std::max(1.0, std::abs(want))) << i;
  }
}

TEST(ZeroTerminalSnr, DeclaredByKohyasKeyOrASchedulerConfig) {
  TensorFile f;
  EXPECT_FALSE(declared_zero_snr(f));
  f.metadata["scheduler/scheduler_config.json"] = R"({"prediction_type": "v_prediction", "rescale_betas_zero_snr": true})";
  EXPECT_TRUE(declared_zero_snr(f));
  f.metadata["ss_zero_terminal_snr"] = "False";  // kohya's key wins
  EXPECT_FALSE(declared_zero_snr(f));
  f.metadata["ss_zero_terminal_snr"] = "True";
  EXPECT_TRUE(declared_zero_snr(f));
  f.metadata.erase("ss_zero_terminal_snr");
  f.metadata["scheduler/scheduler_config.json"] = R"({"rescale_betas_zero_snr": "yes"})";
  EXPECT_FALSE(declared_zero_snr(f));
}
