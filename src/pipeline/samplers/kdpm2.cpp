// KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler (diffusers; k-diffusion's
// sample_dpm_2 / sample_dpm_2_ancestral). Two model evaluations per step: at sigma_i, then at the
// geometric midpoint sigma_mid between sigma_i and the step's target, so timesteps() lists
//   dpm2:   t_0, (t(mid_1), t_1), (t(mid_2), t_2), ...   mid_k = sqrt(sigma_k · sigma_{k-1})
//   dpm2_a: t_0, (t(mid_0), t_1), (t(mid_1), t_2), ...   mid_k = sqrt(sigma_k · sigma_down_k)
// The ancestral variant steps to sigma_down and adds sigma_up · noise, one noise tensor per step,
// drawn in the second sub-step. sigmas() lists the interleaved sigma of every entry (+ the final 0s).
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse {
namespace {

// exp(lerp(log a, log b, 0.5)) as torch computes it in float32 (weight 0.5 takes lerp's
// end − (end − start)·(1 − w) branch); 0 where either is 0.
double log_midpoint(double a, double b) {
  if (a <= 0.0 || b <= 0.0) return 0.0;
  const float ls = std::log(float(a)), le = std::log(float(b));
  return double(std::exp(le - (le - ls) * 0.5f));
}

// [x0, x1, x1, x2, x2, ..., xn, xn, xn]: diffusers' cat([x[:1], x[1:].repeat_interleave(2), x[-1:]]).
std::vector<double> interleave(const std::vector<double>& v) {
  std::vector<double> out{v.front()};
  for (size_t i = 1; i < v.size(); ++i) {
    out.push_back(v[i]);
    out.push_back(v[i]);
  }
  out.push_back(v.back());
  return out;
}

class KDPM2 final : public SchedulerBase {
 public:
  KDPM2(bool ancestral, const SamplerOptions& o) : o_(o), ancestral_(ancestral) {
    o_.final_sigmas_type = "zero";  // KDPM2 always ends at sigma 0
    DF_CHECK(o.prediction == Prediction::Epsilon || o.prediction == Prediction::VPrediction, o.name,
             ": unsupported prediction type");
  }

  int order() const override { return 2; }
  const std::vector<double>& sigmas() const override { return sig_; }
  double init_noise_sigma() const override { return init_sigma_; }

  void set_timesteps(int steps) override {
    reset_indices();
    SigmaSchedule ks = k_sigma_schedule(o_, steps);  // f32 timesteps, n + 1 f32 sigmas (last 0)
    // KDPM2 rounds the timesteps of Karras sigmas (np.round: half to even); not the midpoints'.
    if (o_.use_karras_sigmas)
      for (double& t : ks.timesteps) t = std::nearbyint(t);
    const std::vector<double>& s = ks.sigmas;
    const size_t n1 = s.size();
    const std::vector<double> train = train_sigmas(o_.noise);
    std::vector<double> mid(n1, 0.0), up(n1, 0.0), down(n1, 0.0);
    if (!ancestral_) {
      // sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp(): mid[k] between sigma_k and sigma_{k-1}.
      for (size_t k = 1; k < n1; ++k) mid[k] = log_midpoint(s[k], s[k - 1]);
      mid[0] = log_midpoint(s[0], s[n1 - 1]);  // NaN in torch (rolled-in 0); never used
    } else {
      for (size_t k = 0; k < n1; ++k) {
        const float sf = float(s[k]), nf = k + 1 < n1 ? float(s[k + 1]) : 0.0f;
        // sigma_up = sqrt(next² (sigma² − next²) / sigma²), sigma_down = sqrt(next² − up²) (f32)
        const float u = sf > 0 ? std::sqrt(nf * nf * (sf * sf - nf * nf) / (sf * sf)) : 0.0f;
        up[k] = u;
        down[k] = k + 1 < n1 ? double(std::sqrt(nf * nf - u * u)) : 0.0;
      }
      for (size_t k = 0; k < n1; ++k) mid[k] = log_midpoint(s[k], down[k]);
      mid[n1 - 1] = 0.0;  // sigmas_interpol[-2:] = 0
      if (n1 >= 2) mid[n1 - 2] = 0.0;
    }
    // Timesteps of the midpoints (float32, as the timesteps tensor).
    std::vector<double> tmid = sigmas_to_timesteps(mid, train);
    for (size_t k = 0; k < n1; ++k)
      if (mid[k] <= 0.0) tmid[k] = 0.0;  // log(0) = -inf: _sigma_to_t gives timestep 0
    timesteps_.assign(1, ks.timesteps.front());
    const size_t n = ks.timesteps.size();
    for (size_t k = 1; k < n; ++k) {
      timesteps_.push_back(f32r(ancestral_ ? tmid[k - 1] : tmid[k]));
      timesteps_.push_back(ks.timesteps[k]);
    }
    sig_ = interleave(s);
    mid_ = interleave(mid);
    up_ = interleave(up);
    down_ = interleave(down);
    init_sigma_ = k_init_noise_sigma(o_, sig_);
    sample_ = Tensor();
  }

  Tensor scale_model_input(const Tensor& x, double t) override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": scale_model_input() before set_timesteps()");
    const int si = init_step_index(t);
    double sigma;
    if (first_order()) sigma = sig_[size_t(si)];
    else sigma = ancestral_ ? mid_[size_t(si - 1)] : mid_[size_t(si)];
    return scaled(x, 1.0 / double(std::sqrt(float(sigma) * float(sigma) + 1.0f)));
  }

  void step(const Tensor& model_output, double t, Tensor& x, const NoiseFn& draw_noise) override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": step() before set_timesteps()");
    check_latent(model_output, x, "model output");
    const int si = init_step_index(t);
    DF_CHECK(si >= 0 && size_t(si) + 1 < sig_.size(), o_.name, ": step ", si, " is past the schedule");
    double sigma, sigma_mid, sigma_next = 0, sigma_up = 0, sigma_down = 0;
    if (first_order()) {
      sigma = sig_[size_t(si)];
      if (ancestral_) {
        sigma_mid = mid_[size_t(si)];
      } else {
        sigma_mid = mid_[size_t(si + 1)];
        sigma_next = sig_[size_t(si + 1)];
      }
    } else {
      sigma = sig_[size_t(si - 1)];
      if (ancestral_) {
        sigma_mid = mid_[size_t(si - 1)];
        sigma_up = up_[size_t(si - 1)];
        sigma_down = down_[size_t(si - 1)];
      } else {
        sigma_mid = mid_[size_t(si)];
        sigma_next = sig_[size_t(si)];
      }
    }
    const double sigma_in = first_order() ? sigma : sigma_mid;
    const Tensor x0 = ve_x0(model_output, x, sigma_in, o_.prediction);
    // derivative = (x − x0) / sigma_in
    const Tensor d = lincomb({{1.0 / sigma_in, x}, {-1.0 / sigma_in, x0}});
    if (first_order()) {
      const double dt = f32r(sigma_mid - sigma);
      sample_ = x.clone();
      lincomb_into(x, {{1.0, x}, {dt, d}});
    } else {
      const double dt = ancestral_ ? f32r(sigma_down - sigma) : f32r(sigma_next - sigma);
      Tensor prev = lincomb({{1.0, sample_}, {dt, d}});
      if (ancestral_) {
        DF_CHECK(draw_noise, o_.name, ": needs a noise source");
        const Tensor noise = draw_noise();
        check_latent(noise, x, "noise");
        lincomb_into(prev, {{1.0, prev}, {sigma_up, noise}});
      }
      sample_ = Tensor();
      x.copy_from(prev);
    }
    ++step_index_;
  }

  Tensor add_noise(const Tensor& x0, const Tensor& noise, double t) const override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": add_noise() before set_timesteps()");
    return lincomb({{1.0, x0}, {sig_[size_t(add_noise_index(t))], noise}});
  }

 private:
  bool first_order() const { return !sample_.defined(); }

  SamplerOptions o_;
  bool ancestral_;
  std::vector<double> sig_, mid_, up_, down_;
  double init_sigma_ = 1.0;
  Tensor sample_;
};

}  // namespace

std::unique_ptr<Scheduler> make_kdpm2(bool ancestral, const SamplerOptions& o) {
  return std::make_unique<KDPM2>(ancestral, o);
}

}  // namespace diffuse
