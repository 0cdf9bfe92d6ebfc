#include "pipeline/schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace diffuse {

NoiseSchedule NoiseSchedule::scaled_linear(int num_train, double beta_start, double beta_end) {
  NoiseSchedule s;
  s.num_train_timesteps = num_train;
  s.beta_start = beta_start;
  s.beta_end = beta_end;
  // torch.linspace(sqrt(b0), sqrt(b1), T, dtype=float32) ** 2, then torch.cumprod(1 - betas): a
  // float32 tensor, but torch's CPU cumprod accumulates in double (acc_type) and rounds each
  // partial product to float32 (float accumulation drifts: sigma(999) 14.614653 vs 14.614647).
  const float a = float(std::sqrt(beta_start)), b = float(std::sqrt(beta_end));
  const float step = (b - a) / float(num_train - 1);
  double cum = 1.0;
  for (int i = 0; i < num_train; ++i) {
    // torch fills the first half from the start and the second half back from the end.
    float v = i < num_train / 2 ? a + step * float(i) : b - step * float(num_train - 1 - i);
    float beta = v * v;
    cum *= double(1.0f - beta);
    s.betas.push_back(beta);
    s.alphas_cumprod.push_back(double(float(cum)));
  }
  return s;
}

void NoiseSchedule::rescale_zero_terminal_snr() {
  DF_CHECK(alphas_cumprod.size() >= 2, "zero terminal SNR: the schedule has ", alphas_cumprod.size(), " timesteps");
  const double s0 = std::sqrt(alphas_cumprod.front()), sT = std::sqrt(alphas_cumprod.back());
  const double scale = s0 / (s0 - sT);
  double prev = 1.0;
  for (size_t i = 0; i < alphas_cumprod.size(); ++i) {
    const double s = (std::sqrt(alphas_cumprod[i]) - sT) * scale;
    const double a = i + 1 == alphas_cumprod.size() ? 0.0 : double(float(s * s));
    betas[i] = 1.0 - (i == 0 ? a : a / prev);
    alphas_cumprod[i] = a;
    prev = a;
  }
  zero_terminal_snr = true;
}

std::vector<float> NoiseSchedule::alphas_cumprod_f32() const {
  return {alphas_cumprod.begin(), alphas_cumprod.end()};
}

std::vector<double> spaced_timesteps(const std::string& spacing, int steps, int num_train, int steps_offset) {
  DF_CHECK(steps >= 1 && steps <= num_train, "steps must be between 1 and ", num_train, ", got ", steps);
  std::vector<double> t;
  if (spacing == "leading") {
    int ratio = num_train / steps;
    for (int i = steps - 1; i >= 0; --i) t.push_back(double(i * ratio + steps_offset));
  } else if (spacing == "linspace") {
    // numpy.linspace: i * step, the last value exactly the end point.
    const double step = steps == 1 ? 0.0 : double(num_train - 1) / double(steps - 1);
    for (int i = steps - 1; i >= 0; --i) t.push_back(i == steps - 1 && steps > 1 ? double(num_train - 1) : double(i) * step);
  } else if (spacing == "trailing") {
    // numpy.round rounds halves to even (nearbyint in the default rounding mode), not away from 0.
    double ratio = double(num_train) / double(steps);
    for (int i = 0; i < steps; ++i) t.push_back(std::nearbyint(double(num_train) - double(i) * ratio) - 1.0);
  } else {
    fail("unknown timestep spacing '", spacing, "' (leading, linspace or trailing)");
  }
  return t;
}

std::vector<double> train_sigmas(const NoiseSchedule& s) {
  std::vector<double> out;
  for (float a : s.alphas_cumprod_f32()) out.push_back(double(std::sqrt((1.0f - a) / a)));
  return out;
}

std::vector<double> interp_sigmas(const std::vector<double>& timesteps, const std::vector<double>& sigmas) {
  std::vector<double> out;
  const int n = int(sigmas.size());
  for (double t : timesteps) {
    if (t <= 0) {
      out.push_back(sigmas.front());
    } else if (t >= n - 1) {
      out.push_back(sigmas.back());
    } else {
      int i = int(std::floor(t));
      double f = t - i;
      out.push_back(sigmas[i] + (sigmas[i + 1] - sigmas[i]) * f);
    }
  }
  return out;
}

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int n, double rho) {
  std::vector<double> out;
  const double lo = std::pow(sigma_min, 1.0 / rho), hi = std::pow(sigma_max, 1.0 / rho);
  for (int i = 0; i < n; ++i) {
    double r = n == 1 ? 0.0 : double(i) / double(n - 1);
    out.push_back(std::pow(hi + r * (lo - hi), rho));
  }
  return out;
}

std::vector<double> sigmas_to_timesteps(const std::vector<double>& sigmas, const std::vector<double>& train) {
  std::vector<double> log_sigmas;
  // np.log of the float32 sigma array: float32 logs.
  for (double s : train) log_sigmas.push_back(double(std::log(float(s))));
  std::vector<double> out;
  const int n = int(log_sigmas.size());
  for (double sigma : sigmas) {
    double ls = std::log(std::max(sigma, 1e-10));
    // The last index whose log-sigma is <= ls (log_sigmas ascend with t), clamped to [0, n-2].
    int low = 0;
    for (int i = 0; i < n; ++i)
      if (ls - log_sigmas[i] >= 0) low = i;
    low = std::min(low, n - 2);
    int high = low + 1;
    double w = (log_sigmas[low] - ls) / (log_sigmas[low] - log_sigmas[high]);
    w = std::clamp(w, 0.0, 1.0);
    out.push_back((1.0 - w) * low + w * high);
  }
  return out;
}

}  // namespace diffuse
