// The sampler interface: one diffusers scheduler class with one fixed config per sampler name
// (the configs in ../shared/fixtures/schedules.json are what the names mean). The denoising loop
// (denoise.h) is the same for all:
//   sched.set_timesteps(steps);
//   for t in sched.timesteps():  x_in = sched.scale_model_input(x, t); out = unet(x_in, t);
//                                sched.step(out, t, x, draw_noise);
// Two-evaluation samplers (heun, dpm2) list each timestep they evaluate, as diffusers does.
// Tensors are latents in any layout (the math is elementwise; noise comes from `draw_noise`,
// which returns a tensor shaped and laid out like x).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace diffuse {

enum class Prediction { Epsilon, VPrediction };

using NoiseFn = std::function<Tensor()>;

class Scheduler {
 public:
  virtual ~Scheduler() = default;
  virtual void set_timesteps(int num_inference_steps) = 0;
  // The model evaluation timesteps, in order (after set_timesteps / set_begin_index).
  virtual const std::vector<double>& timesteps() const = 0;
  // Sigmas where the scheduler has them (k-diffusion family), else empty.
  virtual const std::vector<double>& sigmas() const { static const std::vector<double> none; return none; }
  virtual double init_noise_sigma() const { return 1.0; }
  // Timestep entries per inference step (2 for heun/dpm2 after the first): img2img starts at
  // begin = t_start * order().
  virtual int order() const { return 1; }
  // Start at entry `index` of timesteps() (img2img/inpaint strength < 1).
  virtual void set_begin_index(int index) = 0;
  // A new tensor: x scaled for the model at timestep t.
  virtual Tensor scale_model_input(const Tensor& x, double t) = 0;
  // One step: x (in place) from the model output at timestep t. Samplers that add noise call
  // draw_noise at exactly the point diffusers draws it.
  virtual void step(const Tensor& model_output, double t, Tensor& x, const NoiseFn& draw_noise) = 0;
  // x0 noised to timestep t (img2img start, masked inpainting): a new tensor.
  virtual Tensor add_noise(const Tensor& x0, const Tensor& noise, double t) const = 0;
};

// sampler: ddim, pndm, euler, euler_a, heun, lms, dpm2, dpm2_a, dpm++2m, dpm++2m_sde, dpm++2s,
// unipc, deis, lcm, ddpm. schedule: "default", "karras" (Karras sigmas) or "trailing" (trailing
// timestep spacing). Throws diffuse::Error listing the allowed values for anything else.
// zero_terminal_snr: the noise schedule rescaled to zero terminal SNR (NoiseSchedule::
// rescale_zero_terminal_snr; for models trained so, with v-prediction).
std::unique_ptr<Scheduler> make_scheduler(const std::string& sampler, const std::string& schedule, Prediction p,
                                          bool zero_terminal_snr = false);
const std::vector<std::string>& sampler_names();
// A1111's display name ("Euler a", "DPM++ 2M", ...) for the PNG parameters.
std::string sampler_display_name(const std::string& sampler);

}  // namespace diffuse
