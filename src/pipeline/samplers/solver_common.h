// Shared by the exponential-integrator solvers (DPMSolverMultistep, DPMSolverSinglestep, UniPC,
// DEIS): their timestep spacing (integer timesteps from linspace(0, T - 1, n + 1) rounded, not
// the k-diffusion float spacing), their sigmas, and the (alpha_t, sigma_t, lambda_t) of a sigma
// computed in float32 as diffusers does on its float32 sigma tensor. Implemented inline: these are
// small and used by four translation units.
#pragma once
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse::solver {

// VP quantities of a k-diffusion sigma: alpha = 1/sqrt(sigma² + 1), sigma_t = sigma · alpha,
// lambda = log(alpha) − log(sigma_t) (+inf at sigma 0). float32 arithmetic, as torch does on the
// 0-d float32 tensors diffusers indexes out of self.sigmas.
struct VP {
  float alpha, sigma, lambda;
};
inline VP vp_of(double sigma_k) {
  const float s = float(sigma_k);
  VP v;
  v.alpha = 1.0f / std::sqrt(s * s + 1.0f);
  v.sigma = s * v.alpha;
  v.lambda = std::log(v.alpha) - std::log(v.sigma);
  return v;
}

// numpy's round (half to even) of a double.
inline double np_round(double v) {
  double r = std::round(v);
  if (std::fabs(v - std::trunc(v)) == 0.5) r = 2.0 * std::round(v / 2.0);
  return r;
}

// np.linspace(start, stop, num): start + i·step, the last value exactly stop.
inline std::vector<double> np_linspace(double start, double stop, int num) {
  std::vector<double> y;
  if (num <= 0) return y;
  const int div = num - 1;
  const double step = div > 0 ? (stop - start) / div : 0.0;
  for (int i = 0; i < num; ++i) y.push_back(div > 0 ? double(i) * step + start : start);
  if (num > 1) y.back() = stop;
  return y;
}

// torch.searchsorted(flip(lambda_t), lambda_min_clipped): how many train timesteps (from the
// noisiest end) have lambda_t below the clip. lambda_t = log(sqrt(ᾱ)) − log(sqrt(1 − ᾱ)) in f32.
inline int lambda_clip_index(const SamplerOptions& o) {
  if (!(o.lambda_min_clipped > -std::numeric_limits<double>::infinity())) return 0;
  int n = 0;
  for (float a : o.noise.alphas_cumprod_f32()) {
    const float lam = std::log(std::sqrt(a)) - std::log(std::sqrt(1.0f - a));
    if (double(lam) < o.lambda_min_clipped) ++n;
  }
  return n;
}

// Integer timesteps of DPMSolverMultistep / UniPC / DEIS / DPMSolverSinglestep:
//   linspace: linspace(0, last - 1, n + 1).round()[::-1][:-1]
//   leading:  (arange(0, n + 1) · (last // (n + 1))).round()[::-1][:-1] + steps_offset
//   trailing: arange(last, 0, −T/n).round() − 1
// with last = T − (lambda clip index).
inline std::vector<double> solver_timesteps(const SamplerOptions& o, int steps, int clipped) {
  const int T = o.noise.num_train_timesteps;
  DF_CHECK(steps >= 1 && steps <= T, o.name, ": steps must be between 1 and ", T, ", got ", steps);
  const int last = T - clipped;
  std::vector<double> t;
  if (o.timestep_spacing == "linspace") {
    std::vector<double> l = np_linspace(0.0, double(last - 1), steps + 1);
    for (int i = steps; i >= 1; --i) t.push_back(np_round(l[size_t(i)]));
  } else if (o.timestep_spacing == "leading") {
    const int ratio = last / (steps + 1);
    for (int i = steps; i >= 1; --i) t.push_back(double(i * ratio + o.steps_offset));
  } else if (o.timestep_spacing == "trailing") {
    const double ratio = double(T) / double(steps);
    const int count = int(std::ceil(double(last) / ratio));  // len(np.arange(last, 0, -ratio))
    for (int i = 0; i < count; ++i) t.push_back(np_round(double(last) - double(i) * ratio) - 1.0);
  } else {
    fail(o.name, ": unknown timestep spacing '", o.timestep_spacing, "' (linspace, leading or trailing)");
  }
  return t;
}

// Timesteps and float32 sigmas (n + 1 values: the sigma of each timestep, then `final_sigma`) as
// set_timesteps builds them: sigmas interpolated at the timesteps, or Karras / Lu (uniform
// log-SNR) sigmas with their rounded timesteps. `final_sigma` < 0 means "the last Karras/Lu sigma"
// (DEIS appends sigmas[-1] there).
struct SolverSchedule {
  std::vector<double> timesteps, sigmas;
};
inline SolverSchedule solver_schedule(const SamplerOptions& o, int steps, int clipped, double final_sigma,
                                      double final_sigma_karras) {
  SolverSchedule s;
  s.timesteps = solver_timesteps(o, steps, clipped);
  const std::vector<double> train = train_sigmas(o.noise);  // f32 values
  std::vector<double> sig;
  double last = final_sigma;
  if (o.use_karras_sigmas || o.use_lu_lambdas) {
    DF_CHECK(!(o.use_karras_sigmas && o.use_lu_lambdas), o.name, ": use_karras_sigmas and use_lu_lambdas are exclusive");
    if (o.use_karras_sigmas) {
      sig = karras_sigmas(train.front(), train.back(), steps);
    } else {
      // lambdas = flip(log(sigmas)); linear from lambda_max (log sigma_max) to lambda_min.
      const double lmax = double(std::log(float(train.back()))), lmin = double(std::log(float(train.front())));
      for (double r : np_linspace(0.0, 1.0, steps)) sig.push_back(std::exp(lmax + r * (lmin - lmax)));
    }
    s.timesteps = sigmas_to_timesteps(sig, train);
    for (double& t : s.timesteps) t = np_round(t);
    if (final_sigma_karras >= 0) last = final_sigma_karras;
    else last = sig.back();
  } else {
    sig = interp_sigmas(s.timesteps, train);
  }
  sig.push_back(last);
  for (double& v : sig) v = f32r(v);
  s.sigmas = std::move(sig);
  return s;
}

// sqrt((1 − ᾱ_0) / ᾱ_0) in float32: the "sigma_min" final sigma.
inline double sigma_min_of(const SamplerOptions& o) {
  const float a = o.noise.alphas_cumprod_f32().front();
  return double(std::sqrt((1.0f - a) / a));
}

// Final sigma for final_sigmas_type "zero" | "sigma_min" (throws naming the value otherwise).
inline double final_sigma_of(const SamplerOptions& o) {
  if (o.final_sigmas_type == "zero") return 0.0;
  if (o.final_sigmas_type == "sigma_min") return sigma_min_of(o);
  fail(o.name, ": final_sigmas_type '", o.final_sigmas_type, "' is not one of zero, sigma_min");
}

// x0 prediction (data prediction) from the model output at k-sigma `sigma_k`.
inline Tensor x0_of(const Tensor& model_output, const Tensor& sample, double sigma_k, Prediction p) {
  const VP v = vp_of(sigma_k);
  return vp_x0(model_output, sample, v.alpha, v.sigma, p);
}

// add_noise of these solvers: alpha_t · x0 + sigma_t · noise at k-sigma `sigma_k`.
inline Tensor vp_add_noise(const Tensor& x0, const Tensor& noise, double sigma_k) {
  const VP v = vp_of(sigma_k);
  return lincomb({{v.alpha, x0}, {v.sigma, noise}});
}

// First-order DPM-Solver++ step (data prediction m) from k-sigma sigma_s to sigma_t; with `sde`,
// the sde-dpmsolver++ form that adds `noise`. Shared by the multistep and singlestep solvers.
inline Tensor dpmpp_first_order(double sigma_t, double sigma_s, bool sde, const Tensor& m, const Tensor& x,
                                const Tensor& noise) {
  const VP t = vp_of(sigma_t), s = vp_of(sigma_s);
  const float h = t.lambda - s.lambda;
  if (!sde) {
    const float cx = t.sigma / s.sigma, cm = -(t.alpha * (std::exp(-h) - 1.0f));
    return lincomb({{cx, x}, {cm, m}});
  }
  const float cx = t.sigma / s.sigma * std::exp(-h), cm = t.alpha * (1.0f - std::exp(-2.0f * h));
  const float cn = t.sigma * std::sqrt(1.0f - std::exp(-2.0f * h));
  return lincomb({{cx, x}, {cm, m}, {cn, noise}});
}

}  // namespace diffuse::solver
