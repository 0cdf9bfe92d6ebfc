// The training objective and optimiser (train/objective.h, train/optim.h) against independent
// computations written here (in double where rounding matters):
//  - the DDPM schedule (ᾱ, SNR) against a float64 scaled_linear schedule and the PyTorch
//    reference values in shared/fixtures/train/README.md (SNR 10.117 / 0.7825 at t = 87 / 391,
//    min-SNR-5 weights [0.4942, 1] (ε) and [0.4498, 0.4390] (v));
//  - z_t and the ε / v targets, min-SNR weights, the MSE loss and its gradient (a float64
//    formula and central finite differences);
//  - AdamW against a float64 re-implementation of torch.optim.AdamW over 5 steps with a changing
//    learning rate, its first-step moments, pure weight decay, per-parameter lr scale, resuming;
//  - learning-rate schedules, gradient clipping, noise offset, timestep sampling, caption dropout,
//    NCHW <-> NHWC.
// Tolerances are derived from float32 rounding: u = 2^-24 (the unit roundoff, half an ulp
// relative) unless a comment says otherwise.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "pipeline/rng.h"
#include "train/objective.h"
#include "train/optim.h"

using namespace diffuse;
using namespace diffuse::train;

namespace {

constexpr double kU = 1.0 / 16777216.0;  // 2^-24: f32 unit roundoff
constexpr double kUd = 1.0 / 9007199254740992.0;  // 2^-53: f64 unit roundoff

// A small deterministic generator (splitmix64), independent of the library and of <random>'s
// implementation-defined distributions.
struct TestRng {
  uint64_t s;
  explicit TestRng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  float sym(double a) { return float((2 * uniform() - 1) * a); }                  // [-a, a)
};

Tensor random_tensor(const Shape& shape, uint64_t seed, double amp = 1.5) {
  Tensor t = Tensor::empty(shape);
  TestRng r(seed);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = r.sym(amp);
  return t;
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// The scaled_linear schedule in float64: betas = linspace(√0.00085, √0.012, 1000)², ᾱ = cumprod(1 − β).
std::vector<double> alphas_cumprod_f64() {
  const double a = std::sqrt(0.00085), b = std::sqrt(0.012);
  std::vector<double> ac(1000);
  double cum = 1;
  for (int i = 0; i < 1000; ++i) {
    const double v = a + (b - a) * double(i) / 999.0;
    cum *= 1.0 - v * v;
    ac[size_t(i)] = cum;
  }
  return ac;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// 1. The DDPM schedule
// ---------------------------------------------------------------------------------------------

TEST(TrainSchedule, AlphasCumprodMatchFloat64Reference) {
  const DdpmSchedule s = DdpmSchedule::sd();
  ASSERT_EQ(s.alphas_cumprod.size(), 1000u);
  ASSERT_EQ(s.num_timesteps(), 1000);
  const std::vector<double> ref = alphas_cumprod_f64();

  // ᾱ_0 = 1 − β_0 = 1 − 0.00085: the f32 value is 1 − 0.00085 rounded (half an ulp, 2^-25 in
  // [0.5, 1)) plus β_0's own f32 error (a few u · 0.00085 ≈ 1e-10): within 2^-24.
  EXPECT_NEAR(s.alphas_cumprod[0], 1.0 - 0.00085, kU);

  // Each of the t+1 factors (1 − β_i) is an f32 value: its rounding (u) plus β_i's error from the
  // f32 linspace and square (≤ ~2e-6 relative of β ≤ 0.012, i.e. < 0.5u of the factor) — at most
  // 2u relative per factor — and the final rounding of ᾱ_t to f32 (u):
  // |ᾱ_t(f32) − ᾱ_t| ≤ (2(t+1) + 1)·u·ᾱ_t.
  double worst = 0;
  for (int t = 0; t < 1000; ++t) {
    const double rel = std::abs(double(s.alphas_cumprod[size_t(t)]) - ref[size_t(t)]) / ref[size_t(t)];
    worst = std::max(worst, rel / ((2.0 * (t + 1) + 1) * kU));
    ASSERT_LE(rel, (2.0 * (t + 1) + 1) * kU) << "t=" << t << " f32 " << s.alphas_cumprod[size_t(t)] << " f64 "
                                              << ref[size_t(t)];
  }
  RecordProperty("worst_fraction_of_bound", std::to_string(worst));
  // Monotonically decreasing, ending near 0.0046 (σ_max = √((1−ᾱ)/ᾱ) ≈ 14.61 of SD's schedules).
  for (int t = 1; t < 1000; ++t) ASSERT_LT(s.alphas_cumprod[size_t(t)], s.alphas_cumprod[size_t(t - 1)]) << t;
  EXPECT_NEAR(s.alphas_cumprod[999], 0.0046, 0.0001);
  EXPECT_NEAR(std::sqrt((1.0 - s.alphas_cumprod[999]) / s.alphas_cumprod[999]), 14.6146, 0.0001);
}

TEST(TrainSchedule, SqrtAlphasAndSnrMatchReference) {
  const DdpmSchedule s = DdpmSchedule::sd();
  // README (PyTorch, diffusers compute_snr): SNR = 10.117 and 0.7825 at t = 87 and 391; the README
  // gives 5 and 4 significant digits, so half a unit in the last digit.
  EXPECT_NEAR(s.snr(87), 10.117, 0.0005);
  EXPECT_NEAR(s.snr(391), 0.7825, 0.00005);
  // √ᾱ, √(1−ᾱ) and SNR against float64 formulas from the f32 ᾱ: √ᾱ is one correctly rounded sqrt
  // (u); √(1−ᾱ) is a rounded subtraction (u) then sqrt (u/2 + u); SNR = (√ᾱ/√(1−ᾱ))² adds the
  // division (u) and square (2·(…) + u): ≤ 2·(1 + 1.5 + 1)u + u = 8u relative.
  for (int t : {0, 1, 87, 391, 500, 998, 999}) {
    const double a = s.alphas_cumprod[size_t(t)];
    EXPECT_NEAR(s.sqrt_alpha(t), std::sqrt(a), std::sqrt(a) * kU) << t;
    EXPECT_NEAR(s.sqrt_one_minus_alpha(t), std::sqrt(1 - a), std::sqrt(1 - a) * 2.5 * kU) << t;
    EXPECT_NEAR(s.snr(t), a / (1 - a), a / (1 - a) * 8 * kU) << t;
  }
  EXPECT_THROW(s.snr(-1), Error);
  EXPECT_THROW(s.snr(1000), Error);
  EXPECT_THROW(s.sqrt_alpha(1000), Error);
  EXPECT_THROW(s.sqrt_one_minus_alpha(-1), Error);
}

// ---------------------------------------------------------------------------------------------
// 2. z_t and the targets
// ---------------------------------------------------------------------------------------------

TEST(TrainObjective, NoisedBatchMatchesIndependentComputation) {
  const DdpmSchedule s = DdpmSchedule::sd();
  const Shape shape{2, 3, 5, 4};  // [B, H, W, C]
  const Tensor x0 = random_tensor(shape, 11), noise = random_tensor(shape, 12, 3.0);
  const std::vector<int> ts{87, 391};
  const int64_t per = shape.numel() / 2;
  for (Objective obj : {Objective::Eps, Objective::V}) {
    SCOPED_TRACE(objective_name(obj));
    const NoisedBatch nb = make_noised_batch(s, x0, noise, ts, obj);
    ASSERT_EQ(nb.noisy.shape(), shape);
    ASSERT_EQ(nb.target.shape(), shape);
    EXPECT_EQ(nb.timesteps, ts);
    EXPECT_TRUE(bit_equal(nb.x0, x0));
    EXPECT_TRUE(bit_equal(nb.noise, noise));
    for (int b = 0; b < 2; ++b) {
      // Independent coefficients in float64 from the f32 ᾱ.
      const double a = s.alphas_cumprod[size_t(ts[size_t(b)])], sa = std::sqrt(a), so = std::sqrt(1 - a);
      for (int64_t i = b * per; i < (b + 1) * per; ++i) {
        const double z = x0.f32()[i], e = noise.f32()[i];
        // f32: √ᾱ (u), √(1−ᾱ) (1.5u), each product (u), the sum/difference (u): ≤ 4u·(|√ᾱ·z| + |√(1−ᾱ)·e|).
        const double tol = 4 * kU * (std::abs(sa * z) + std::abs(so * e));
        EXPECT_NEAR(nb.noisy.f32()[i], sa * z + so * e, tol) << "b=" << b << " i=" << i;
        if (obj == Objective::Eps)
          EXPECT_EQ(nb.target.f32()[i], noise.f32()[i]) << i;  // ε target is the noise, exactly
        else
          EXPECT_NEAR(nb.target.f32()[i], sa * e - so * z, tol) << "b=" << b << " i=" << i;
      }
    }
  }
  // The v target is not the noise: v = √ᾱ·ε − √(1−ᾱ)·x0 differs visibly at t = 391.
  const NoisedBatch v = make_noised_batch(s, x0, noise, ts, Objective::V);
  EXPECT_GT(std::abs(v.target.f32()[per] - noise.f32()[per]), 1e-3);
}

TEST(TrainObjective, NoisedBatchRejectsBadInput) {
  const DdpmSchedule s = DdpmSchedule::sd();
  const Tensor x0 = random_tensor({2, 3, 5, 4}, 1), noise = random_tensor({2, 3, 5, 4}, 2);
  EXPECT_THROW(make_noised_batch(s, x0, noise, {-1, 5}, Objective::Eps), Error);
  EXPECT_THROW(make_noised_batch(s, x0, noise, {5, 1000}, Objective::V), Error);
  EXPECT_NO_THROW(make_noised_batch(s, x0, noise, {0, 999}, Objective::Eps));
  // Mismatched shapes, dtypes and timestep counts.
  EXPECT_THROW(make_noised_batch(s, x0, random_tensor({2, 3, 5, 3}, 3), {1, 2}, Objective::Eps), Error);
  EXPECT_THROW(make_noised_batch(s, x0, random_tensor({1, 3, 5, 4}, 3), {1, 2}, Objective::Eps), Error);
  EXPECT_THROW(make_noised_batch(s, x0, noise.to(DType::F16), {1, 2}, Objective::Eps), Error);
  EXPECT_THROW(make_noised_batch(s, x0, noise, {1}, Objective::Eps), Error);
  EXPECT_THROW(make_noised_batch(s, x0, noise, {1, 2, 3}, Objective::Eps), Error);
}

TEST(TrainObjective, ParseObjective) {
  EXPECT_EQ(parse_objective("eps"), Objective::Eps);
  EXPECT_EQ(parse_objective("epsilon"), Objective::Eps);
  EXPECT_EQ(parse_objective("v"), Objective::V);
  EXPECT_EQ(parse_objective("v_prediction"), Objective::V);
  EXPECT_STREQ(objective_name(Objective::Eps), "eps");
  EXPECT_STREQ(objective_name(Objective::V), "v");
  try {
    parse_objective("sample");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sample"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// 3. min-SNR weights
// ---------------------------------------------------------------------------------------------

TEST(TrainObjective, MinSnrWeights) {
  const DdpmSchedule s = DdpmSchedule::sd();
  const std::vector<int> ts{87, 391, 0, 999, 200};
  const std::vector<float> we = loss_weights(s, ts, Objective::Eps, 5), wv = loss_weights(s, ts, Objective::V, 5);
  ASSERT_EQ(we.size(), ts.size());
  ASSERT_EQ(wv.size(), ts.size());
  for (size_t b = 0; b < ts.size(); ++b) {
    const double snr = s.snr(ts[b]), m = std::min(snr, 5.0);
    // From the f32 SNR: one f32 division (u); v adds the rounding of snr + 1 (u): ≤ 2u relative.
    EXPECT_NEAR(we[b], m / snr, m / snr * 2 * kU) << ts[b];
    EXPECT_NEAR(wv[b], m / (snr + 1), m / (snr + 1) * 2 * kU) << ts[b];
  }
  // README values (4 decimals: ±0.00005). SNR(391) = 0.78 < 5: the ε weight is exactly 1.
  EXPECT_NEAR(we[0], 0.4942, 0.00005);
  EXPECT_EQ(we[1], 1.0f);
  EXPECT_NEAR(wv[0], 0.4498, 0.00005);
  EXPECT_NEAR(wv[1], 0.4390, 0.00005);
  // γ = 0 (or negative): all weights 1.
  for (float g : {0.0f, -1.0f})
    for (Objective o : {Objective::Eps, Objective::V})
      EXPECT_EQ(loss_weights(s, ts, o, g), std::vector<float>(ts.size(), 1.0f));
  EXPECT_THROW(loss_weights(s, {1000}, Objective::Eps, 5), Error);
}

// ---------------------------------------------------------------------------------------------
// 4. MSE loss and its gradient
// ---------------------------------------------------------------------------------------------

TEST(TrainObjective, MseLossMatchesFloat64AndFiniteDifferences) {
  const Shape shape{3, 5, 7};  // B = 3, 35 elements per sample (odd)
  const int64_t B = 3, per = 35, n = B * per;
  // pred on a 2^-12 grid in [-2, 2): pred ± 2^-8 is exactly representable in f32, so the central
  // differences below perturb by exactly ±h.
  Tensor pred = random_tensor(shape, 21, 2.0);
  for (int64_t i = 0; i < n; ++i) pred.f32()[i] = std::round(pred.f32()[i] * 4096.0f) / 4096.0f;
  const Tensor target = random_tensor(shape, 22, 2.0);
  const std::vector<float> w{0.3f, 1.0f, 2.5f};

  // float64 reference: L = mean_b(w_b · mean_i e²), dL/dp = 2·w_b·e/(B·per).
  double ref_loss = 0, ref_plain = 0;
  std::vector<double> ref_d(static_cast<size_t>(n));
  for (int64_t b = 0; b < B; ++b) {
    double sq = 0;
    for (int64_t i = b * per; i < (b + 1) * per; ++i) {
      const double e = double(pred.f32()[i]) - double(target.f32()[i]);
      sq += e * e;
      ref_d[size_t(i)] = 2.0 * w[size_t(b)] * e / double(B * per);
    }
    ref_loss += w[size_t(b)] * sq / double(per) / double(B);
    ref_plain += sq / double(n);
  }
  const LossResult r = mse_loss(pred, target, w);
  // Both sides sum 105 squares in double in different orders: ≤ ~(n + 4)·2^-53 relative; 1e-13 is
  // ~ 9× that.
  EXPECT_NEAR(r.loss, ref_loss, 1e-13 * ref_loss);
  EXPECT_NEAR(r.unweighted, ref_plain, 1e-13 * ref_plain);
  ASSERT_EQ(r.dpred.shape(), shape);
  // dpred is the float64 value rounded to f32 once (u relative; the double error is ~4·2^-53).
  for (int64_t i = 0; i < n; ++i)
    EXPECT_NEAR(r.dpred.f32()[i], ref_d[size_t(i)], std::abs(ref_d[size_t(i)]) * (kU + 8 * kUd)) << i;

  // Central finite differences of mse_loss().loss. L is quadratic in each pred element, so the
  // central difference is exact in exact arithmetic; what remains is the float64 rounding of the two
  // losses (each ≤ (n + 4)·2^-53·L relative), divided by 2h, and the f32 rounding of dpred (u).
  const double h = 1.0 / 256;
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    Tensor pp = pred.clone(), pm = pred.clone();
    pp.f32()[i] = float(double(pred.f32()[i]) + h);
    pm.f32()[i] = float(double(pred.f32()[i]) - h);
    ASSERT_EQ(double(pp.f32()[i]) - double(pm.f32()[i]), 2 * h);  // the perturbation is exact
    const double lp = mse_loss(pp, target, w).loss, lm = mse_loss(pm, target, w).loss;
    const double fd = (lp - lm) / (2 * h);
    const double tol = std::abs(fd) * kU + 2 * double(n + 4) * kUd * std::max(lp, lm) / (2 * h);
    worst = std::max(worst, std::abs(r.dpred.f32()[i] - fd) / tol);
    EXPECT_NEAR(r.dpred.f32()[i], fd, tol) << i;
  }
  RecordProperty("fd_worst_fraction_of_tol", std::to_string(worst));

  // grad_scale scales dpred only: by 1/4 exactly (a power of two), by 1/3 within one more rounding.
  const LossResult q = mse_loss(pred, target, w, 0.25f), t3 = mse_loss(pred, target, w, 1.0f / 3);
  EXPECT_EQ(q.loss, r.loss);
  EXPECT_EQ(q.unweighted, r.unweighted);
  EXPECT_EQ(t3.loss, r.loss);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(q.dpred.f32()[i], 0.25f * r.dpred.f32()[i]) << i;
    // ref_d·(1/3 in f32) rounded once: u (final) + u (1/3 in f32) relative.
    EXPECT_NEAR(t3.dpred.f32()[i], ref_d[size_t(i)] / 3, std::abs(ref_d[size_t(i)] / 3) * (2 * kU + 8 * kUd)) << i;
  }

  // Unweighted (empty weights): the plain mean of every squared error, and dpred = 2e/n.
  const LossResult u = mse_loss(pred, target, {});
  EXPECT_NEAR(u.loss, ref_plain, 1e-13 * ref_plain);
  EXPECT_NEAR(u.unweighted, ref_plain, 1e-13 * ref_plain);
  for (int64_t i = 0; i < n; ++i) {
    const double d = 2.0 * (double(pred.f32()[i]) - double(target.f32()[i])) / double(n);
    EXPECT_NEAR(u.dpred.f32()[i], d, std::abs(d) * (kU + 8 * kUd)) << i;
  }
  // Weights of 1 are the unweighted loss.
  EXPECT_NEAR(mse_loss(pred, target, {1, 1, 1}).loss, ref_plain, 1e-13 * ref_plain);

  // Bad input.
  EXPECT_THROW(mse_loss(pred, target, {1, 2}), Error);
  EXPECT_THROW(mse_loss(pred, random_tensor({3, 5, 6}, 1), {}), Error);
  EXPECT_THROW(mse_loss(pred, target.to(DType::F16), {}), Error);
}

// ---------------------------------------------------------------------------------------------
// 5. AdamW
// ---------------------------------------------------------------------------------------------

namespace {

Param make_param(const std::string& name, const Shape& shape, uint64_t seed, float lr_scale = 1) {
  Param p;
  p.name = name;
  p.value = random_tensor(shape, seed, 1.0);
  p.grad = Tensor::zeros(shape);
  p.lr_scale = lr_scale;
  return p;
}

// A varying gradient sequence, |g| ≥ 0.01 (far from eps = 1e-8, where AdamW's first steps are set
// by rounding).
void set_grad(Param& p, int k, int which) {
  for (int64_t j = 0; j < p.grad.numel(); ++j) {
    const double s = 0.5 * std::sin(1.3 * double(j) + 0.7 * k + 2.1 * which) + 0.2 * (k + 1) * std::cos(0.4 * double(j));
    p.grad.f32()[j] = float(s + (s >= 0 ? 0.01 : -0.01));
  }
}

}  // namespace

TEST(TrainAdamW, MatchesFloat64ReferenceOverFiveSteps) {
  Param p1 = make_param("a", {3, 4}, 31), p2 = make_param("b", {5}, 32, 0.5f);
  AdamWOptions o;
  o.lr = 1e-3, o.beta1 = 0.9, o.beta2 = 0.999, o.eps = 1e-8, o.weight_decay = 1e-2;
  AdamW opt({&p1, &p2}, o);
  const float lrs[5] = {1e-3f, 2e-3f, 5e-4f, 1.5e-3f, 1e-3f};

  // The reference: torch.optim.AdamW's update in float64, with the hyperparameters as given (the
  // f32 option values widened). Alongside, a first-order bound on the f32 implementation's error
  // (per element, accumulated over the steps):
  //  - p·(1 − lr·wd): the f32 factor (≤ u/2 absolute, near 1) and the product (u): 1.5u·|p|;
  //  - p − update: u·|p_new|;                       → 3u·max(|p|, |p_new|) per step with margin;
  //  - m_k: two products and a sum, ≤ 2u·M_k per step with M_k = β1·M_{k−1} + (1−β1)|g| (no
  //    cancellation bound needed), accumulated: ≤ 2k·u·M_k;
  //  - v_k: positive terms, ≤ 3k·u·v_k; √v then ≤ (1.5k + 1)u; ÷√bc2 (f32-rounded, and the
  //    division): +2u; + eps: +u  → denom ≤ (1.5k + 4)u relative;
  //  - m/denom (+u), step size lr/bc1 rounded (+u), product (+u): the update is within
  //    lr/bc1 · (|r|·(1.5k + 7)u + 2k·u·M_k/denom), r = m/denom.
  struct Ref {
    std::vector<double> p, m, v, M, tol;
  };
  auto init = [](const Param& p) {
    Ref r;
    const size_t n = size_t(p.value.numel());
    r.p.resize(n), r.m.assign(n, 0), r.v.assign(n, 0), r.M.assign(n, 0), r.tol.assign(n, 0);
    for (size_t j = 0; j < n; ++j) r.p[j] = p.value.f32()[j];
    return r;
  };
  Ref r1 = init(p1), r2 = init(p2);
  const double b1 = o.beta1, b2 = o.beta2, eps = o.eps, wd = o.weight_decay;
  for (int k = 1; k <= 5; ++k) {
    set_grad(p1, k, 0), set_grad(p2, k, 1);
    const double lr_base = lrs[k - 1];
    opt.step(lrs[k - 1]);
    const double bc1 = 1 - std::pow(b1, k), bc2 = 1 - std::pow(b2, k);
    for (auto [p, r] : {std::pair<Param*, Ref*>{&p1, &r1}, std::pair<Param*, Ref*>{&p2, &r2}}) {
      const double lr = lr_base * double(p->lr_scale);
      for (size_t j = 0; j < r->p.size(); ++j) {
        const double g = p->grad.f32()[j];
        const double p_old = r->p[j];
        r->p[j] *= 1 - lr * wd;
        r->m[j] = b1 * r->m[j] + (1 - b1) * g;
        r->v[j] = b2 * r->v[j] + (1 - b2) * g * g;
        r->M[j] = b1 * r->M[j] + (1 - b1) * std::abs(g);
        const double denom = std::sqrt(r->v[j]) / std::sqrt(bc2) + eps, ratio = r->m[j] / denom;
        r->p[j] -= lr / bc1 * ratio;
        r->tol[j] += 3 * kU * std::max(std::abs(p_old), std::abs(r->p[j])) +
                     lr / bc1 * (std::abs(ratio) * (1.5 * k + 7) * kU + 2 * k * kU * r->M[j] / denom);
      }
    }
    for (auto [p, r] : {std::pair<Param*, Ref*>{&p1, &r1}, std::pair<Param*, Ref*>{&p2, &r2}})
      for (size_t j = 0; j < r->p.size(); ++j)
        ASSERT_NEAR(p->value.f32()[j], r->p[j], r->tol[j]) << p->name << "[" << j << "] after step " << k;
  }
  EXPECT_EQ(opt.steps(), 5);
  // The moments after 5 steps, against the reference (relative bounds as above, 2k·u / 3k·u; m
  // against M, its magnitude bound).
  for (size_t j = 0; j < r1.p.size(); ++j) {
    EXPECT_NEAR(opt.exp_avg(0).f32()[j], r1.m[j], 10 * kU * r1.M[j]) << j;
    EXPECT_NEAR(opt.exp_avg_sq(0).f32()[j], r1.v[j], 15 * kU * r1.v[j]) << j;
  }
  // The test is sensitive: the 5-step change is ~lr-sized, far above the tolerance.
  const Tensor start = make_param("a", {3, 4}, 31).value;
  double moved = 0, tol = 0;
  for (size_t j = 0; j < r1.p.size(); ++j) {
    moved = std::max(moved, std::abs(r1.p[j] - double(start.f32()[j])));
    tol = std::max(tol, r1.tol[j]);
  }
  EXPECT_GT(moved, 100 * tol) << "moved " << moved << " tol " << tol;
}

TEST(TrainAdamW, FirstStepMoments) {
  Param p = make_param("a", {17}, 41);
  for (int64_t j = 0; j < 17; ++j) p.grad.f32()[j] = float(0.37 * std::sin(0.9 * double(j)) + (j % 2 ? 0.05 : -0.05));
  AdamWOptions o;
  o.beta1 = 0.9, o.beta2 = 0.999;  // Python floats, as torch receives them
  AdamW opt({&p}, o);
  opt.step(1e-3f);
  // From zero state: m = (1−β1)·g (lerp from 0), v = (1−β2)·g·g, each an f32 product (0·β is
  // exactly 0), with 1 − β computed in double and rounded to f32 as torch passes a Python scalar
  // (0.1f and 0.001f, not 1 − 0.9f) and torch's addcmul order ((1−β2)·g)·g.
  const float c1 = float(1.0 - 0.9), c2 = float(1.0 - 0.999);
  ASSERT_EQ(c2, 0.001f);
  for (int64_t j = 0; j < 17; ++j) {
    const float g = p.grad.f32()[j];
    EXPECT_EQ(opt.exp_avg(0).f32()[j], g * c1) << j;
    EXPECT_EQ(opt.exp_avg_sq(0).f32()[j], (c2 * g) * g) << j;
  }
}

TEST(TrainAdamW, ZeroGradientAppliesOnlyDecay) {
  Param p = make_param("a", {23}, 51);
  AdamWOptions o;
  o.weight_decay = 1e-2f;
  AdamW opt({&p}, o);
  const float lrs[3] = {1e-3f, 3e-3f, 1e-2f};
  for (int k = 0; k < 3; ++k) {
    const Tensor before = p.value.clone();
    opt.step(lrs[k]);
    // torch: param.mul_(1 − lr·wd) with the factor rounded to f32 once; m = v = 0 gives a zero
    // update, so p_new = f32(p · f32(1 − lr·wd)) exactly.
    const float decay = float(1.0 - double(lrs[k]) * double(o.weight_decay));
    for (int64_t j = 0; j < 23; ++j) ASSERT_EQ(p.value.f32()[j], before.f32()[j] * decay) << "step " << k << " j " << j;
    for (int64_t j = 0; j < 23; ++j) ASSERT_EQ(opt.exp_avg(0).f32()[j], 0.0f);
  }
  // step() without an lr uses the options' lr.
  const Tensor before = p.value.clone();
  opt.step();
  const float decay = float(1.0 - double(o.lr) * double(o.weight_decay));
  for (int64_t j = 0; j < 23; ++j) EXPECT_EQ(p.value.f32()[j], before.f32()[j] * decay) << j;
}

TEST(TrainAdamW, LrScaleScalesTheStep) {
  // A: lr_scale 0.5 at lr 2e-3; B: scale 1 at lr 1e-3 (2e-3f is exactly 2·1e-3f): identical runs,
  // with weight decay.
  {
    Param a = make_param("a", {9}, 61, 0.5f), b = make_param("b", {9}, 61, 1.0f);
    AdamWOptions o;
    o.weight_decay = 1e-2f;
    AdamW oa({&a}, o), ob({&b}, o);
    ASSERT_EQ(2e-3f, 2 * 1e-3f);
    for (int k = 1; k <= 3; ++k) {
      set_grad(a, k, 0), set_grad(b, k, 0);
      oa.step(2e-3f), ob.step(1e-3f);
    }
    EXPECT_TRUE(bit_equal(a.value, b.value));
  }
  // Without weight decay the total change is lr·Σ_k r_k (r_k = m̂/(√v̂ + eps) does not depend on
  // lr), exactly linear in lr: scale 0.5 at 2e-3 (A) moves half as far as scale 1 at 2e-3 (C).
  // (With decay, cross terms lr²·wd·r ≈ 4e-8 make it only first-order linear.) Each final value
  // carries per step ≤ u·|p| (the subtraction) + ~20u·lr·|r| (the update): over 3 steps and for
  // Δ_A − Δ_C/2 (1.5 of them), ≤ 1.5·3·u·(|p0| + 0.01) with |p| ≤ |p0| + 3·lr·|r| ≤ |p0| + 0.01;
  // tolerance 18u·(|p0| + 0.01) (4× margin).
  Param a = make_param("a", {9}, 61, 0.5f), c = make_param("c", {9}, 61, 1.0f);
  AdamWOptions o;
  o.weight_decay = 0;
  AdamW oa({&a}, o), oc({&c}, o);
  const Tensor p0 = a.value.clone();
  for (int k = 1; k <= 3; ++k) {
    set_grad(a, k, 0), set_grad(c, k, 0);
    oa.step(2e-3f), oc.step(2e-3f);
  }
  for (int64_t j = 0; j < 9; ++j) {
    const double da = double(p0.f32()[j]) - a.value.f32()[j], dc = double(p0.f32()[j]) - c.value.f32()[j];
    EXPECT_NEAR(da, 0.5 * dc, 18 * kU * (std::abs(double(p0.f32()[j])) + 0.01)) << j;
    EXPECT_GT(std::abs(dc), 1e-4) << j;  // the step is far above the tolerance (≤ 1.2e-6)
  }
}

TEST(TrainAdamW, ZeroGradAndInvalidOptions) {
  Param p = make_param("a", {4, 3}, 71), q = make_param("b", {2}, 72);
  set_grad(p, 1, 0), set_grad(q, 1, 1);
  AdamW opt({&p, &q}, AdamWOptions{});
  opt.zero_grad();
  for (const Param* x : {&p, &q})
    for (int64_t j = 0; j < x->grad.numel(); ++j) EXPECT_EQ(x->grad.f32()[j], 0.0f) << x->name;
  EXPECT_EQ(p.value.numel(), 12);  // values untouched by zero_grad
  EXPECT_TRUE(bit_equal(p.value, make_param("a", {4, 3}, 71).value));

  auto with = [](auto f) {
    AdamWOptions o;
    f(o);
    return o;
  };
  Param r = make_param("r", {3}, 73);
  EXPECT_THROW(AdamW({&r}, with([](AdamWOptions& o) { o.lr = -1e-3f; })), Error);
  EXPECT_THROW(AdamW({&r}, with([](AdamWOptions& o) { o.beta1 = 1.0f; })), Error);
  EXPECT_THROW(AdamW({&r}, with([](AdamWOptions& o) { o.beta1 = -0.1f; })), Error);
  EXPECT_THROW(AdamW({&r}, with([](AdamWOptions& o) { o.beta2 = 1.0f; })), Error);
  EXPECT_THROW(AdamW({&r}, with([](AdamWOptions& o) { o.eps = 0.0f; })), Error);
  EXPECT_THROW(AdamW({&r}, with([](AdamWOptions& o) { o.weight_decay = -1e-2f; })), Error);
  EXPECT_NO_THROW(AdamW({&r}, with([](AdamWOptions& o) { o.weight_decay = 0; })));
  // Parameters: null, gradient of another shape, non-f32.
  EXPECT_THROW(AdamW({nullptr}, AdamWOptions{}), Error);
  Param bad = make_param("bad", {3}, 74);
  bad.grad = Tensor::zeros({4});
  EXPECT_THROW(AdamW({&bad}, AdamWOptions{}), Error);
  Param half = make_param("half", {3}, 75);
  half.value = half.value.to(DType::F16);
  EXPECT_THROW(AdamW({&half}, AdamWOptions{}), Error);
}

TEST(TrainAdamW, SetStateResumesIdentically) {
  Param a1 = make_param("a", {3, 5}, 81), a2 = make_param("b", {7}, 82, 0.25f);
  AdamWOptions o;
  AdamW A({&a1, &a2}, o);
  for (int k = 1; k <= 3; ++k) {
    set_grad(a1, k, 0), set_grad(a2, k, 1);
    A.step(1e-3f * float(k));
  }
  // A second optimiser on copies of the parameters, resumed from A's state (copies: the state must
  // not share storage with A's).
  Param b1 = a1, b2 = a2;
  b1.value = a1.value.clone(), b1.grad = a1.grad.clone(), b2.value = a2.value.clone(), b2.grad = a2.grad.clone();
  AdamW Bo({&b1, &b2}, o);
  Bo.set_state(A.steps(), {A.exp_avg(0).clone(), A.exp_avg(1).clone()}, {A.exp_avg_sq(0).clone(), A.exp_avg_sq(1).clone()});
  EXPECT_EQ(Bo.steps(), 3);
  for (int k = 4; k <= 6; ++k) {
    set_grad(a1, k, 0), set_grad(a2, k, 1), set_grad(b1, k, 0), set_grad(b2, k, 1);
    A.step(1e-3f * float(k)), Bo.step(1e-3f * float(k));
  }
  EXPECT_EQ(Bo.steps(), 6);
  EXPECT_TRUE(bit_equal(a1.value, b1.value));
  EXPECT_TRUE(bit_equal(a2.value, b2.value));
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(bit_equal(A.exp_avg(i), Bo.exp_avg(i))) << i;
    EXPECT_TRUE(bit_equal(A.exp_avg_sq(i), Bo.exp_avg_sq(i))) << i;
  }
  // Bad state: wrong count, wrong shape, negative steps.
  EXPECT_THROW(Bo.set_state(1, {Tensor::zeros({3, 5})}, {Tensor::zeros({3, 5})}), Error);
  EXPECT_THROW(Bo.set_state(1, {Tensor::zeros({3, 5}), Tensor::zeros({8})}, {Tensor::zeros({3, 5}), Tensor::zeros({7})}),
               Error);
  EXPECT_THROW(Bo.set_state(-1, {Tensor::zeros({3, 5}), Tensor::zeros({7})}, {Tensor::zeros({3, 5}), Tensor::zeros({7})}),
               Error);
}

TEST(TrainAdamW, ResumeWithoutStateDiffers) {
  // Companion of SetStateResumesIdentically: a resumed optimiser that does not restore the step
  // count (bias correction) or the moments lands elsewhere.
  Param a = make_param("a", {6}, 91), b = make_param("a", {6}, 91);
  AdamWOptions o;
  AdamW A({&a}, o);
  for (int k = 1; k <= 3; ++k) set_grad(a, k, 0), A.step(1e-3f);
  b.value = a.value.clone();
  AdamW B({&b}, o);  // fresh state
  set_grad(a, 4, 0), set_grad(b, 4, 0);
  A.step(1e-3f), B.step(1e-3f);
  EXPECT_FALSE(bit_equal(a.value, b.value));
}

// ---------------------------------------------------------------------------------------------
// 6. Learning-rate schedules
// ---------------------------------------------------------------------------------------------

TEST(TrainLrSchedule, Values) {
  const float base = 1e-4f;
  // lr_at returns base·f32(factor): one f32 rounding of the product (u relative) on top of the
  // factor's own (u): tolerance 2u·base.
  const double tol = 2 * kU * base;
  for (int64_t s : {0, 1, 50, 1000, 5000}) EXPECT_EQ(lr_at(LrSchedule::Constant, base, s, 10, 1000), base) << s;

  // constant_with_warmup: linear 0 → base over 10 steps (diffusers: base·step/warmup), then base.
  EXPECT_EQ(lr_at(LrSchedule::ConstantWithWarmup, base, 0, 10, 100), 0.0f);
  for (int64_t s = 0; s < 10; ++s)
    EXPECT_NEAR(lr_at(LrSchedule::ConstantWithWarmup, base, s, 10, 100), double(base) * double(s) / 10, tol) << s;
  for (int64_t s : {10, 11, 99, 100, 500}) EXPECT_EQ(lr_at(LrSchedule::ConstantWithWarmup, base, s, 10, 100), base) << s;
  // No warmup: base from step 0.
  EXPECT_EQ(lr_at(LrSchedule::ConstantWithWarmup, base, 0, 0, 100), base);

  // linear: warmup 10, decay over steps 10..110 to 0 at 110, clamped at 0 after.
  EXPECT_NEAR(lr_at(LrSchedule::Linear, base, 5, 10, 110), base / 2.0, tol);
  EXPECT_NEAR(lr_at(LrSchedule::Linear, base, 10, 10, 110), base, tol);
  EXPECT_NEAR(lr_at(LrSchedule::Linear, base, 60, 10, 110), base / 2.0, tol);
  EXPECT_NEAR(lr_at(LrSchedule::Linear, base, 85, 10, 110), base / 4.0, tol);
  EXPECT_EQ(lr_at(LrSchedule::Linear, base, 110, 10, 110), 0.0f);
  EXPECT_EQ(lr_at(LrSchedule::Linear, base, 150, 10, 110), 0.0f);
  for (int64_t s = 10; s <= 110; ++s)
    EXPECT_NEAR(lr_at(LrSchedule::Linear, base, s, 10, 110), double(base) * double(110 - s) / 100, tol) << s;

  // cosine: warmup 10, half cosine over 10..110: base at 10, base/2 at 60, 0 at 110.
  EXPECT_NEAR(lr_at(LrSchedule::Cosine, base, 5, 10, 110), base / 2.0, tol);
  EXPECT_NEAR(lr_at(LrSchedule::Cosine, base, 10, 10, 110), base, tol);
  EXPECT_NEAR(lr_at(LrSchedule::Cosine, base, 60, 10, 110), base / 2.0, tol);
  EXPECT_NEAR(lr_at(LrSchedule::Cosine, base, 110, 10, 110), 0.0, tol);
  const double pi = std::acos(-1.0);
  for (int64_t s = 10; s <= 110; ++s)
    EXPECT_NEAR(lr_at(LrSchedule::Cosine, base, s, 10, 110),
                double(base) * 0.5 * (1 + std::cos(pi * double(s - 10) / 100)), tol) << s;
  // Without warmup the cosine starts at base at step 0.
  EXPECT_NEAR(lr_at(LrSchedule::Cosine, base, 0, 0, 100), base, tol);
  EXPECT_NEAR(lr_at(LrSchedule::Cosine, base, 50, 0, 100), base / 2.0, tol);
}

TEST(TrainLrSchedule, Parse) {
  for (LrSchedule s : {LrSchedule::Constant, LrSchedule::ConstantWithWarmup, LrSchedule::Linear, LrSchedule::Cosine})
    EXPECT_EQ(parse_lr_schedule(lr_schedule_name(s)), s);
  EXPECT_EQ(parse_lr_schedule("constant_with_warmup"), LrSchedule::ConstantWithWarmup);
  for (const char* bad : {"cosine_with_restarts", "Linear", ""}) {
    try {
      parse_lr_schedule(bad);
      ADD_FAILURE() << "no throw for '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("'") + bad + "'"), std::string::npos) << e.what();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 7. Gradient clipping
// ---------------------------------------------------------------------------------------------

TEST(TrainClip, GradNorm) {
  Param p = make_param("a", {4, 5}, 101), q = make_param("b", {3}, 102);
  p.grad = random_tensor({4, 5}, 103, 2.0), q.grad = random_tensor({3}, 104, 5.0);
  double sq = 0;
  for (const Param* x : {&p, &q})
    for (int64_t j = 0; j < x->grad.numel(); ++j) sq += double(x->grad.f32()[j]) * double(x->grad.f32()[j]);
  const double norm = std::sqrt(sq);
  // Both sum 23 squares in double: ≤ ~25·2^-53 relative.
  const double ntol = 1e-14 * norm;

  // Below the threshold (and at max_norm ≤ 0): the norm is returned, the gradients untouched.
  for (double max_norm : {norm * 2, norm + 1e-3, 0.0, -1.0}) {
    const Tensor gp = p.grad.clone(), gq = q.grad.clone();
    EXPECT_NEAR(clip_grad_norm({&p, &q}, max_norm), norm, ntol) << max_norm;
    EXPECT_TRUE(bit_equal(p.grad, gp)) << max_norm;
    EXPECT_TRUE(bit_equal(q.grad, gq)) << max_norm;
  }

  // Above: every gradient times max_norm/(norm + 1e-6) (torch's clip_grad_norm_); the coefficient
  // rounded to f32 (u) and each product (u): 2u relative per element; the new norm is then
  // max_norm·norm/(norm + 1e-6) within 2u (plus the double sum).
  const double max_norm = norm / 3;
  const Tensor gp = p.grad.clone(), gq = q.grad.clone();
  EXPECT_NEAR(clip_grad_norm({&p, &q}, max_norm), norm, ntol);
  const double coef = max_norm / (norm + 1e-6);
  double sq2 = 0;
  for (auto [x, g0] : {std::pair<Param*, const Tensor*>{&p, &gp}, std::pair<Param*, const Tensor*>{&q, &gq}})
    for (int64_t j = 0; j < x->grad.numel(); ++j) {
      const double want = double(g0->f32()[j]) * coef;
      EXPECT_NEAR(x->grad.f32()[j], want, std::abs(want) * 2 * kU) << x->name << j;
      sq2 += double(x->grad.f32()[j]) * double(x->grad.f32()[j]);
    }
  EXPECT_NEAR(std::sqrt(sq2), max_norm * norm / (norm + 1e-6), max_norm * 2 * kU + 1e-14);
  EXPECT_NEAR(std::sqrt(sq2), max_norm, max_norm * (2 * kU + 1e-6 / norm));
  EXPECT_LT(std::sqrt(sq2), norm / 2);  // clipped for real
}

// ---------------------------------------------------------------------------------------------
// 8. Noise offset
// ---------------------------------------------------------------------------------------------

TEST(TrainObjective, NoiseOffset) {
  const int64_t B = 2, H = 3, W = 5, C = 4;
  const Tensor noise0 = random_tensor({B, H, W, C}, 111, 3.0);
  const uint64_t seed = 4242;
  const float offset = 0.1f;
  // The per-(sample, channel) draws: the first B·C values of a fresh generator, in [B, C] order.
  const Tensor n = make_cpu_rng(seed)->randn(Shape{B, C});

  Tensor noise = noise0.clone();
  auto rng = make_cpu_rng(seed);
  apply_noise_offset(noise, offset, *rng);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const double add = double(offset * n.f32()[b * C + c]);  // offset·n_bc (an f32 product, as in kohya)
      const int64_t first = (b * H * W) * C + c;
      const double d0 = double(noise.f32()[first]) - double(noise0.f32()[first]);
      for (int64_t i = 0; i < H * W; ++i) {
        const int64_t k = (b * H * W + i) * C + c;
        const double was = noise0.f32()[k], now = noise.f32()[k];
        // now = f32(was + f32(offset·n)): ≤ u·|now| from the sum, u·|offset·n| from the product.
        const double tol = kU * (std::abs(now) + std::abs(add));
        EXPECT_NEAR(now, was + add, tol) << "b=" << b << " c=" << c << " i=" << i;
        // The same shift at every pixel of (b, c), up to those roundings.
        EXPECT_NEAR(now - was, d0, 2 * tol + kU * std::abs(noise.f32()[first])) << "b=" << b << " c=" << c << " i=" << i;
      }
    }
  // The shifts differ between (b, c) pairs, so the [B, C] order is checked (not [C, B]).
  EXPECT_NE(n.f32()[1], n.f32()[C]);

  // The generator advanced by exactly B·C draws: its next value is the fresh generator's (B·C)-th.
  float next;
  rng->randn(&next, 1);
  auto fresh = make_cpu_rng(seed);
  std::vector<float> skip(size_t(B * C));
  fresh->randn(skip.data(), B * C);
  float want;
  fresh->randn(&want, 1);
  EXPECT_EQ(next, want);

  // offset 0: untouched, and no draws (kohya applies the offset only when it is set).
  Tensor same = noise0.clone();
  auto r0 = make_cpu_rng(seed);
  apply_noise_offset(same, 0.0f, *r0);
  EXPECT_TRUE(bit_equal(same, noise0));
  float first0;
  r0->randn(&first0, 1);
  float fresh0;
  make_cpu_rng(seed)->randn(&fresh0, 1);
  EXPECT_EQ(first0, fresh0);

  // Not [B, H, W, C]: rejected.
  Tensor flat = random_tensor({2, 60}, 1);
  EXPECT_THROW(apply_noise_offset(flat, offset, *make_cpu_rng(1)), Error);
}

// Pyramid noise against a double-precision reference written here: levels of N(0, 1) draws taken
// from the generator in order, upsampled as torch's bilinear Upsample (half-pixel centres, edge
// clamped), weighted discount^i, stopped after a 1-pixel level, divided by the std (unbiased).
TEST(TrainObjective, MultiresNoise) {
  const int64_t B = 2, H = 16, W = 12, C = 4;
  const Tensor noise0 = random_tensor({B, H, W, C}, 211, 1.0);
  const uint64_t seed = 77;
  const float discount = 0.4f;
  const std::vector<double> us = {0.9, 0.1, 0.5, 0.3, 0.7, 0.2};
  auto run = [&](Tensor& n, int iterations, size_t& used) {
    used = 0;
    auto rng = make_cpu_rng(seed);
    apply_multires_noise(n, iterations, discount, *rng, [&] { return us[used++ % us.size()]; });
  };
  Tensor got = noise0.clone();
  size_t used = 0;
  run(got, 6, used);

  // The reference.
  std::vector<double> ref(noise0.f32(), noise0.f32() + noise0.numel());
  auto rng = make_cpu_rng(seed);
  int levels = 0;
  for (int i = 0; i < 6; ++i, ++levels) {
    const double r = 2.0 + 2.0 * us[size_t(i)], sc = std::pow(r, i);
    const int64_t h = std::max<int64_t>(1, int64_t(H / sc)), w = std::max<int64_t>(1, int64_t(W / sc));
    std::vector<float> z(size_t(B * h * w * C));
    rng->randn(z.data(), int64_t(z.size()));
    auto coord = [](int64_t o, int64_t in, int64_t out, int64_t& a, int64_t& b2, double& f) {
      const double x = std::max(0.0, (o + 0.5) * double(in) / double(out) - 0.5);
      a = std::min<int64_t>(int64_t(std::floor(x)), in - 1);
      b2 = std::min<int64_t>(a + 1, in - 1);
      f = x - double(a);
    };
    for (int64_t b = 0; b < B; ++b)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x)
          for (int64_t c = 0; c < C; ++c) {
            int64_t y0, y1, x0, x1;
            double fy, fx;
            coord(y, h, H, y0, y1, fy);
            coord(x, w, W, x0, x1, fx);
            auto at = [&](int64_t yy, int64_t xx) { return double(z[size_t(((b * h + yy) * w + xx) * C + c)]); };
            const double v = (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1));
            ref[size_t(((b * H + y) * W + x) * C + c)] += std::pow(double(discount), i) * v;
          }
    if (h == 1 || w == 1) {
      ++levels;
      break;
    }
  }
  double sum = 0, sq = 0;
  for (double v : ref) sum += v;
  const double mean = sum / double(ref.size());
  for (double v : ref) sq += (v - mean) * (v - mean);
  const double sd = std::sqrt(sq / double(ref.size() - 1));
  double err = 0;
  for (size_t k = 0; k < ref.size(); ++k) err = std::max(err, std::abs(double(got.f32()[k]) - ref[k] / sd));
  EXPECT_LT(err, 1e-5);
  EXPECT_EQ(used, size_t(levels));  // one scale draw per level, stopping after the 1-pixel level
  EXPECT_LT(levels, 6);             // 16 / 3.8^2 < 2: the third level is 1 pixel high

  // Unit variance; more low-frequency power than the white noise it started from (the variance
  // of 4×4 block means is 1/16 of the pixels' for white noise: 1/48 for the uniform [-1, 1] start).
  auto block_var = [&](const Tensor& t) {
    double s2 = 0;
    int64_t nb = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t by = 0; by + 4 <= H; by += 4)
        for (int64_t bx = 0; bx + 4 <= W; bx += 4)
          for (int64_t c = 0; c < C; ++c) {
            double m = 0;
            for (int64_t y = by; y < by + 4; ++y)
              for (int64_t x = bx; x < bx + 4; ++x) m += t.f32()[((b * H + y) * W + x) * C + c];
            m /= 16;
            s2 += m * m, ++nb;
          }
    return s2 / double(nb);
  };
  double s1 = 0, s2 = 0;
  for (int64_t k = 0; k < got.numel(); ++k) s1 += got.f32()[k], s2 += double(got.f32()[k]) * got.f32()[k];
  const double n = double(got.numel());
  EXPECT_NEAR((s2 - s1 * s1 / n) / (n - 1), 1.0, 1e-4);
  std::printf("4x4 block-mean variance: white %.4f, pyramid %.4f\n", block_var(noise0), block_var(got));
  EXPECT_GT(block_var(got), 2 * block_var(noise0));

  // 0 iterations: untouched, no draws.
  Tensor same = noise0.clone();
  run(same, 0, used);
  EXPECT_TRUE(bit_equal(same, noise0));
  EXPECT_EQ(used, 0u);
  Tensor flat = random_tensor({2, 60}, 1);
  EXPECT_THROW(run(flat, 2, used), Error);
}

// ---------------------------------------------------------------------------------------------
// 9. Timestep sampling, caption dropout
// ---------------------------------------------------------------------------------------------

TEST(TrainObjective, SampleTimestepAndCaptionDropout) {
  EXPECT_EQ(sample_timestep(0.0), 0);
  EXPECT_EQ(sample_timestep(0.9999999), 999);
  EXPECT_EQ(sample_timestep(0.5), 500);
  EXPECT_EQ(sample_timestep(0.0, 100, 200), 100);
  EXPECT_EQ(sample_timestep(0.9999999, 100, 200), 199);
  EXPECT_EQ(sample_timestep(0.5, 100, 200), 150);
  EXPECT_EQ(sample_timestep(0.0, 999, 1000), 999);
  EXPECT_EQ(sample_timestep(0.9999999, 999, 1000), 999);
  // Every value of [min, max) reachable, uniformly: u = (i + 0.5)/n maps to i.
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(sample_timestep((i + 0.5) / 1000), i);
  for (auto [lo, hi] : {std::pair{-1, 1000}, std::pair{0, 1001}, std::pair{500, 500}, std::pair{600, 500}, std::pair{0, 0}})
    EXPECT_THROW(sample_timestep(0.5, lo, hi), Error) << lo << " " << hi;

  EXPECT_FALSE(drop_caption(0.0, 0.0));  // rate 0: never
  EXPECT_FALSE(drop_caption(0.5, 0.0));
  EXPECT_TRUE(drop_caption(0.0, 0.1));
  EXPECT_TRUE(drop_caption(0.0999, 0.1));
  EXPECT_FALSE(drop_caption(0.1, 0.1));  // u < rate
  EXPECT_FALSE(drop_caption(0.7, 0.1));
  EXPECT_TRUE(drop_caption(0.9999999, 1.0));  // rate 1: always
}

// ---------------------------------------------------------------------------------------------
// 10. Layouts
// ---------------------------------------------------------------------------------------------

TEST(TrainObjective, NchwNhwcLayouts) {
  const int64_t B = 2, C = 3, H = 5, W = 7;
  Tensor x = Tensor::empty({B, C, H, W});
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = float(i) + 0.25f;
  const Tensor y = nchw_to_nhwc(x);
  ASSERT_EQ(y.shape(), Shape({B, H, W, C}));
  // x[1, 2, 3, 4] (NCHW offset ((1·3 + 2)·5 + 3)·7 + 4 = 200) sits at y[1, 3, 4, 2] (NHWC offset
  // ((1·5 + 3)·7 + 4)·3 + 2 = 182).
  EXPECT_EQ(y.f32()[182], 200.25f);
  EXPECT_EQ(y.f32()[0], 0.25f);
  EXPECT_EQ(y.f32()[1], float(H * W) + 0.25f);  // y[0, 0, 0, 1] = x[0, 1, 0, 0]
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w)
          ASSERT_EQ(y.f32()[((b * H + h) * W + w) * C + c], x.f32()[((b * C + c) * H + h) * W + w]);
  const Tensor back = nhwc_to_nchw(y);
  EXPECT_TRUE(bit_equal(back, x));
  // The other direction on an NHWC tensor of the odd shape.
  const Tensor z = random_tensor({B, H, W, C}, 121);
  const Tensor zc = nhwc_to_nchw(z);
  ASSERT_EQ(zc.shape(), Shape({B, C, H, W}));
  EXPECT_EQ(zc.f32()[200], z.f32()[182]);
  EXPECT_TRUE(bit_equal(nchw_to_nhwc(zc), z));
  // Non-f32 input is converted.
  const Tensor yh = nchw_to_nhwc(x.to(DType::F16));
  EXPECT_EQ(yh.dtype(), DType::F32);
  EXPECT_EQ(yh.f32()[182], 200.25f);  // exactly representable in f16
  EXPECT_THROW(nchw_to_nhwc(Tensor::zeros({2, 3, 5})), Error);
}
