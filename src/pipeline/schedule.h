// Noise-schedule arithmetic shared by every sampler (diffusers' conventions): betas, cumulative
// alphas, timestep spacing, sigmas and their Karras variant.
#pragma once
#include <string>
#include <vector>

namespace diffuse {

struct NoiseSchedule {
  int num_train_timesteps = 1000;
  double beta_start = 0.00085, beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";  // or "linear"
  std::vector<double> betas, alphas_cumprod;     // [num_train_timesteps], float64 like numpy
  // Computes betas/alphas_cumprod the way diffusers does (torch float32 math, then used as f32 or
  // f64 as each scheduler does: see alphas_cumprod_f32()).
  static NoiseSchedule scaled_linear(int num_train = 1000, double beta_start = 0.00085, double beta_end = 0.012);
  // alphas_cumprod as diffusers holds it (a torch.float32 tensor).
  std::vector<float> alphas_cumprod_f32() const;
  // Zero terminal SNR (Lin et al. 2023, arXiv 2305.08891; diffusers' rescale_betas_zero_snr, kohya's
  // --zero_terminal_snr): √ᾱ shifted so that its last value is 0 and scaled so that its first is
  // unchanged; betas follow. x_T is then pure noise, as sampling starts (needs v-prediction).
  void rescale_zero_terminal_snr();
  bool zero_terminal_snr = false;
};

// Timesteps for `steps` inference steps, as diffusers' timestep_spacing does:
//   "leading":  (arange(0, steps) * (T // steps)).round()[::-1] + steps_offset
//   "linspace": linspace(0, T - 1, steps)[::-1]  (float)
//   "trailing": round(arange(T, 0, -T / steps)) - 1
std::vector<double> spaced_timesteps(const std::string& spacing, int steps, int num_train, int steps_offset);

// sigma(t) = sqrt((1 - ᾱ_t) / ᾱ_t) for every train timestep (float64 from the f32 ᾱ, as numpy does).
std::vector<double> train_sigmas(const NoiseSchedule& s);
// np.interp(timesteps, arange(T), sigmas): sigma at fractional timesteps.
std::vector<double> interp_sigmas(const std::vector<double>& timesteps, const std::vector<double>& sigmas);
// Karras et al. (2022) sigmas between sigma_max and sigma_min, rho 7, `n` values, descending.
std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int n, double rho = 7.0);
// The (fractional) timestep of each sigma, by log-sigma interpolation (diffusers' _sigma_to_t).
std::vector<double> sigmas_to_timesteps(const std::vector<double>& sigmas, const std::vector<double>& train_sigmas);

}  // namespace diffuse
