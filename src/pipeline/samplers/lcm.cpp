// diffusers' LCMScheduler (latent consistency models): timesteps picked from the distillation
// schedule of `original_inference_steps`, each step maps to the consistency function's x0
// estimate and re-noises it to the next timestep (noise drawn on every step but the last).
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse {

namespace {

class LCM final : public AlphaSchedulerBase {
 public:
  explicit LCM(SamplerOptions o) : AlphaSchedulerBase(std::move(o)) {}

  void set_timesteps(int steps) override {
    reset_indices();
    const int T = o_.noise.num_train_timesteps, orig = o_.original_inference_steps;
    DF_CHECK(orig >= 1 && orig <= T, o_.name, ": original_inference_steps ", orig, " must be between 1 and ", T);
    DF_CHECK(steps >= 1 && steps <= orig, o_.name, ": steps must be between 1 and original_inference_steps (", orig,
             "), got ", steps);
    // The distillation timesteps k·i − 1 (i = 1..orig, k = T // orig), descending, then `steps` of
    // them at floor(linspace(0, orig, steps, endpoint=False)).
    const int k = T / orig;
    std::vector<double> origin;
    for (int i = orig; i >= 1; --i) origin.push_back(double(i * k - 1));
    timesteps_.clear();
    const double step = double(orig) / double(steps);
    for (int i = 0; i < steps; ++i) timesteps_.push_back(origin[size_t(std::floor(double(i) * step))]);
    num_inference_steps_ = steps;
  }

  void step(const Tensor& out, double t, Tensor& x, const NoiseFn& draw_noise) override {
    DF_CHECK(num_inference_steps_ > 0, o_.name, ": set_timesteps was not called");
    check_latent(out, x, "model output");
    const int i = init_step_index(t);
    const double prev_t = i + 1 < int(timesteps_.size()) ? timesteps_[size_t(i) + 1] : t;
    const double a_t = alpha_cumprod(t), a_prev = alpha_cumprod(prev_t);
    // Boundary-condition scalings with sigma_data 0.5 at the scaled timestep.
    const double sd2 = 0.25, st = t * o_.timestep_scaling;
    const double c_skip = sd2 / (st * st + sd2), c_out = st / std::sqrt(st * st + sd2);
    Tensor x0 = vp_x0(out, x, std::sqrt(a_t), std::sqrt(1.0 - a_t), o_.prediction);
    if (o_.clip_sample) clamp_inplace(x0, o_.clip_sample_range);
    // denoised = c_out · x0 + c_skip · x
    lincomb_into(x, {{c_out, x0}, {c_skip, x}});
    if (i != num_inference_steps_ - 1) {
      DF_CHECK(draw_noise, o_.name, ": needs a noise source");
      Tensor noise = draw_noise();
      check_latent(noise, x, "noise");
      lincomb_into(x, {{std::sqrt(a_prev), x}, {std::sqrt(1.0 - a_prev), noise}});
    }
    ++step_index_;
  }
};

}  // namespace

std::unique_ptr<Scheduler> make_lcm(const SamplerOptions& o) { return std::make_unique<LCM>(o); }

}  // namespace diffuse
