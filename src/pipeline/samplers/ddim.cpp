// diffusers' DDIMScheduler (eta as the pipeline passes it, 0 by default) and DDPMScheduler.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse {

namespace {

class DDIM final : public AlphaSchedulerBase {
 public:
  explicit DDIM(SamplerOptions o) : AlphaSchedulerBase(std::move(o)) {}

  void set_timesteps(int steps) override {
    reset_indices();
    timesteps_ = integer_timesteps(steps);
    num_inference_steps_ = steps;
  }

  void step(const Tensor& out, double t, Tensor& x, const NoiseFn& draw_noise) override {
    DF_CHECK(num_inference_steps_ > 0, o_.name, ": set_timesteps was not called");
    check_latent(out, x, "model output");
    const double prev_t = t - double(o_.noise.num_train_timesteps / num_inference_steps_);
    const double a_t = alpha_cumprod(t), a_prev = alpha_cumprod(prev_t);
    const double sa = std::sqrt(a_t), sb = std::sqrt(1.0 - a_t);
    Tensor x0 = vp_x0(out, x, sa, sb, o_.prediction);
    Tensor eps = vp_eps(out, x, sa, sb, o_.prediction);
    if (o_.clip_sample) clamp_inplace(x0, o_.clip_sample_range);
    // σ_t = eta · sqrt(variance); variance = (1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev).
    const double variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
    const double std_dev = o_.eta * std::sqrt(variance);
    // x_prev = sqrt(ᾱ_prev) · x0 + sqrt(1 − ᾱ_prev − σ_t²) · eps (+ σ_t · noise).
    lincomb_into(x, {{std::sqrt(a_prev), x0}, {std::sqrt(1.0 - a_prev - std_dev * std_dev), eps}});
    if (o_.eta > 0) {
      DF_CHECK(draw_noise, o_.name, ": eta > 0 needs a noise source");
      Tensor noise = draw_noise();
      check_latent(noise, x, "noise");
      lincomb_into(x, {{1.0, x}, {std_dev, noise}});
    }
  }
};

class DDPM final : public AlphaSchedulerBase {
 public:
  explicit DDPM(SamplerOptions o) : AlphaSchedulerBase(std::move(o)) {
    const std::string& v = o_.variance_type;
    DF_CHECK(v == "fixed_small" || v == "fixed_small_log" || v == "fixed_large", o_.name, ": variance_type '", v,
             "' is not supported (fixed_small, fixed_small_log, fixed_large)");
  }

  void set_timesteps(int steps) override {
    reset_indices();
    timesteps_ = integer_timesteps(steps);
    num_inference_steps_ = steps;
  }

  void step(const Tensor& out, double t, Tensor& x, const NoiseFn& draw_noise) override {
    DF_CHECK(num_inference_steps_ > 0, o_.name, ": set_timesteps was not called");
    check_latent(out, x, "model output");
    const double prev_t = previous_timestep(t);
    const double a_t = alpha_cumprod(t);
    const double a_prev = prev_t >= 0 ? alpha_cumprod(prev_t) : 1.0;  // DDPM's `one`
    const double b_t = 1.0 - a_t, b_prev = 1.0 - a_prev;
    const double cur_alpha = a_t / a_prev, cur_beta = 1.0 - cur_alpha;
    Tensor x0 = vp_x0(out, x, std::sqrt(a_t), std::sqrt(b_t), o_.prediction);
    if (o_.clip_sample) clamp_inplace(x0, o_.clip_sample_range);
    // Posterior mean μ = sqrt(ᾱ_prev)·β_t/(1−ᾱ_t) · x0 + sqrt(α_t)·(1−ᾱ_prev)/(1−ᾱ_t) · x_t.
    lincomb_into(x, {{std::sqrt(a_prev) * cur_beta / b_t, x0}, {std::sqrt(cur_alpha) * b_prev / b_t, x}});
    if (t > 0) {
      DF_CHECK(draw_noise, o_.name, ": needs a noise source");
      Tensor noise = draw_noise();
      check_latent(noise, x, "noise");
      double var = std::max(b_prev / b_t * cur_beta, 1e-20);
      double scale;
      const std::string& v = o_.variance_type;
      if (v == "fixed_small") scale = std::sqrt(var);
      else if (v == "fixed_small_log") scale = std::exp(0.5 * std::log(var));  // the std itself, not its sqrt
      else scale = std::sqrt(cur_beta);  // fixed_large
      lincomb_into(x, {{1.0, x}, {scale, noise}});
    }
  }

 private:
  // The next entry of the schedule after t, or −1 after the last.
  double previous_timestep(double t) const {
    for (size_t i = 0; i < timesteps_.size(); ++i)
      if (timesteps_[i] == t) return i + 1 < timesteps_.size() ? timesteps_[i + 1] : -1.0;
    fail(o_.name, ": timestep ", t, " is not in the schedule");
  }
};

}  // namespace

std::unique_ptr<Scheduler> make_ddim(const SamplerOptions& o) { return std::make_unique<DDIM>(o); }
std::unique_ptr<Scheduler> make_ddpm(const SamplerOptions& o) { return std::make_unique<DDPM>(o); }

}  // namespace diffuse
