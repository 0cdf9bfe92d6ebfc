// diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and HeunDiscreteScheduler
// (k-diffusion's sample_euler / sample_euler_ancestral / sample_heun on the discrete schedule),
// with s_churn = 0 (no churn noise), as the Stable Diffusion pipelines call them.
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse {

namespace {

class EulerDiscrete final : public SigmaSchedulerBase {
 public:
  EulerDiscrete(bool ancestral, SamplerOptions o) : SigmaSchedulerBase(std::move(o)), ancestral_(ancestral) {}

  void set_timesteps(int steps) override {
    reset_indices();
    SigmaSchedule s = k_sigma_schedule(o_, steps);
    timesteps_ = std::move(s.timesteps);
    sigmas_ = std::move(s.sigmas);
  }

  void step(const Tensor& out, double t, Tensor& x, const NoiseFn& draw_noise) override {
    DF_CHECK(!sigmas_.empty(), o_.name, ": set_timesteps was not called");
    check_latent(out, x, "model output");
    const int i = init_step_index(t);
    DF_CHECK(i + 1 < int(sigmas_.size()), o_.name, ": step past the end of the schedule");
    const double sigma = sigmas_[size_t(i)], sigma_next = sigmas_[size_t(i) + 1];
    // x0 from the model output; derivative d = (x − x0) / σ.
    Tensor x0 = ve_x0(out, x, sigma, o_.prediction);
    if (!ancestral_) {
      // gamma = 0 (s_churn 0): sigma_hat = sigma; x ← x + d · (σ_next − σ).
      const double dt = sigma_next - sigma;
      lincomb_into(x, {{1.0 + dt / sigma, x}, {-dt / sigma, x0}});
    } else {
      const double sf2 = sigma * sigma, st2 = sigma_next * sigma_next;
      const double sigma_up = std::sqrt(st2 * (sf2 - st2) / sf2);
      const double sigma_down = std::sqrt(st2 - sigma_up * sigma_up);
      const double dt = sigma_down - sigma;
      lincomb_into(x, {{1.0 + dt / sigma, x}, {-dt / sigma, x0}});
      // diffusers draws the noise on every step (also the last, where sigma_up is 0).
      DF_CHECK(draw_noise, o_.name, ": needs a noise source");
      Tensor noise = draw_noise();
      check_latent(noise, x, "noise");
      lincomb_into(x, {{1.0, x}, {sigma_up, noise}});
    }
    ++step_index_;
  }

 private:
  bool ancestral_;
};

// Heun's method: every step but the first evaluates the model twice; the timesteps list each
// second evaluation's timestep again ([t0, t1, t1, t2, t2, ...]) and the sigmas likewise.
class HeunDiscrete final : public SigmaSchedulerBase {
 public:
  explicit HeunDiscrete(SamplerOptions o) : SigmaSchedulerBase(std::move(o)) {}

  int order() const override { return 2; }

  void set_timesteps(int steps) override {
    reset_indices();
    SigmaSchedule s = k_sigma_schedule(o_, steps);
    timesteps_.clear();
    sigmas_.clear();
    for (size_t i = 0; i < s.timesteps.size(); ++i) {
      timesteps_.push_back(s.timesteps[i]);
      if (i > 0) timesteps_.push_back(s.timesteps[i]);
    }
    for (size_t i = 0; i < s.sigmas.size(); ++i) {
      sigmas_.push_back(s.sigmas[i]);
      if (i > 0 && i + 1 < s.sigmas.size()) sigmas_.push_back(s.sigmas[i]);
    }
    first_order_ = true;
    prev_derivative_ = Tensor();
    prev_sample_ = Tensor();
  }

  void step(const Tensor& out, double t, Tensor& x, const NoiseFn&) override {
    DF_CHECK(!sigmas_.empty(), o_.name, ": set_timesteps was not called");
    check_latent(out, x, "model output");
    const int i = init_step_index(t);
    DF_CHECK(i + 1 < int(sigmas_.size()), o_.name, ": step past the end of the schedule");
    if (first_order_) {
      const double sigma = sigmas_[size_t(i)], sigma_next = sigmas_[size_t(i) + 1];
      Tensor x0 = ve_x0(out, x, sigma, o_.prediction);
      if (o_.clip_sample) clamp_inplace(x0, o_.clip_sample_range);
      // d = (x − x0) / σ; remembered with dt and x for the correction.
      Tensor d = lincomb({{1.0 / sigma, x}, {-1.0 / sigma, x0}});
      dt_ = sigma_next - sigma;
      prev_sample_ = x.clone();
      lincomb_into(x, {{1.0, x}, {dt_, d}});
      prev_derivative_ = std::move(d);
      first_order_ = false;
    } else {
      DF_ASSERT(i >= 1);
      const double sigma_next = sigmas_[size_t(i)];
      // The second evaluation is at σ_next: x0 and d from it, averaged with the first d.
      Tensor x0 = ve_x0(out, x, sigma_next, o_.prediction);
      if (o_.clip_sample) clamp_inplace(x0, o_.clip_sample_range);
      Tensor d2 = lincomb({{1.0 / sigma_next, x}, {-1.0 / sigma_next, x0}});
      lincomb_into(x, {{1.0, prev_sample_}, {0.5 * dt_, prev_derivative_}, {0.5 * dt_, d2}});
      prev_derivative_ = Tensor();
      prev_sample_ = Tensor();
      first_order_ = true;
    }
    ++step_index_;
  }

 private:
  bool first_order_ = true;
  double dt_ = 0.0;
  Tensor prev_derivative_, prev_sample_;
};

}  // namespace

std::unique_ptr<Scheduler> make_euler(bool ancestral, const SamplerOptions& o) {
  return std::make_unique<EulerDiscrete>(ancestral, o);
}

std::unique_ptr<Scheduler> make_heun(const SamplerOptions& o) { return std::make_unique<HeunDiscrete>(o); }

}  // namespace diffuse
