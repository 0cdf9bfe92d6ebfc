// diffusers' PNDMScheduler with skip_prk_steps (PLMS, the Stable Diffusion 1.x default): a
// linear multistep combination of the model outputs (up to 4) and the PNDM transfer
// x_prev = φ(x_t, eps, t, t_prev). The schedule repeats the second timestep once: the first step
// is an Euler-like step, the second re-evaluates and averages (a Heun-like warm-up).
#include <algorithm>
#include <cmath>
#include <deque>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse {

namespace {

class PNDM final : public AlphaSchedulerBase {
 public:
  explicit PNDM(SamplerOptions o) : AlphaSchedulerBase(std::move(o)) {
    DF_CHECK(o_.skip_prk_steps, o_.name, ": only skip_prk_steps (PLMS) is supported");
  }

  void set_timesteps(int steps) override {
    reset_indices();
    num_inference_steps_ = steps;
    // diffusers: the ascending spaced timesteps, the second-to-last repeated, then reversed.
    std::vector<double> asc = integer_timesteps(steps);
    std::reverse(asc.begin(), asc.end());
    std::vector<double> plms(asc.begin(), asc.end() - 1);
    if (asc.size() >= 2) plms.push_back(asc[asc.size() - 2]);
    plms.push_back(asc.back());
    timesteps_.assign(plms.rbegin(), plms.rend());
    ets_.clear();
    counter_ = 0;
    cur_sample_ = Tensor();
  }

  void step(const Tensor& out, double t, Tensor& x, const NoiseFn&) override {
    DF_CHECK(num_inference_steps_ > 0, o_.name, ": set_timesteps was not called");
    check_latent(out, x, "model output");
    const double ratio = double(o_.noise.num_train_timesteps / num_inference_steps_);
    double timestep = t, prev_t = t - ratio;
    if (counter_ != 1) {
      while (ets_.size() > 3) ets_.pop_front();
      ets_.push_back(out.clone());
    } else {
      prev_t = t;
      timestep = t + ratio;
    }
    Tensor e;
    const Tensor* sample = &x;
    const size_t n = ets_.size();
    if (n == 1 && counter_ == 0) {
      e = out.clone();
      cur_sample_ = x.clone();
    } else if (n == 1 && counter_ == 1) {
      e = lincomb({{0.5, out}, {0.5, ets_.back()}});
      sample = &cur_sample_;
    } else if (n == 2) {
      e = lincomb({{1.5, ets_[n - 1]}, {-0.5, ets_[n - 2]}});
    } else if (n == 3) {
      e = lincomb({{23.0 / 12.0, ets_[n - 1]}, {-16.0 / 12.0, ets_[n - 2]}, {5.0 / 12.0, ets_[n - 3]}});
    } else {
      e = lincomb({{55.0 / 24.0, ets_[n - 1]}, {-59.0 / 24.0, ets_[n - 2]}, {37.0 / 24.0, ets_[n - 3]},
                   {-9.0 / 24.0, ets_[n - 4]}});
    }
    Tensor prev = prev_sample(*sample, timestep, prev_t, e);
    x.copy_from(prev);
    if (counter_ == 1) cur_sample_ = Tensor();
    ++counter_;
  }

 private:
  // PNDM's transfer (formula (9) of the paper) from x_t to x_prev with the combined output `e`
  // (for v-prediction, converted to eps with the sample it is applied to, as diffusers does).
  Tensor prev_sample(const Tensor& sample, double t, double prev_t, const Tensor& e) const {
    const double a_t = alpha_cumprod(t), a_prev = alpha_cumprod(prev_t);
    const double b_t = 1.0 - a_t, b_prev = 1.0 - a_prev;
    Tensor eps = vp_eps(e, sample, std::sqrt(a_t), std::sqrt(b_t), o_.prediction);
    const double sample_coeff = std::sqrt(a_prev / a_t);
    const double denom = a_t * std::sqrt(b_prev) + std::sqrt(a_t * b_t * a_prev);
    return lincomb({{sample_coeff, sample}, {-(a_prev - a_t) / denom, eps}});
  }

  std::deque<Tensor> ets_;
  int counter_ = 0;
  Tensor cur_sample_;
};

}  // namespace

std::unique_ptr<Scheduler> make_pndm(const SamplerOptions& o) { return std::make_unique<PNDM>(o); }

}  // namespace diffuse
