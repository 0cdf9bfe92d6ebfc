// DPMSolverMultistepScheduler (diffusers): DPM-Solver++ (data prediction) of order 1-3 with the
// midpoint or Heun second-order form, and its SDE variant sde-dpmsolver++, which draws one noise
// tensor every step (before the update, even on the last step where its weight is 0).
//   dpm++2m        algorithm dpmsolver++, order 2, midpoint, lower_order_final, final sigma 0
//   dpm++2m_sde    algorithm sde-dpmsolver++ (same otherwise)
// The scalar coefficients are computed in float32 from the float32 sigmas, as torch does.
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"
#include "pipeline/samplers/solver_common.h"

namespace diffuse {
namespace {

using solver::VP;
using solver::vp_of;

class DpmMultistep final : public SchedulerBase {
 public:
  DpmMultistep(bool sde, const SamplerOptions& o) : o_(o), sde_(sde) {
    std::string alg = o.algorithm_type.empty() ? std::string("dpmsolver++") : o.algorithm_type;
    if (alg == "deis") alg = "dpmsolver++";  // diffusers maps it so
    if (sde) alg = "sde-dpmsolver++";
    DF_CHECK(alg == "dpmsolver++" || alg == "sde-dpmsolver++", o.name, ": DPM-Solver algorithm_type '", alg,
             "' is not supported (dpmsolver++, sde-dpmsolver++)");
    sde_ = alg == "sde-dpmsolver++";
    std::string st = o.solver_type.empty() ? std::string("midpoint") : o.solver_type;
    if (st == "logrho" || st == "bh1" || st == "bh2") st = "midpoint";  // diffusers maps these
    DF_CHECK(st == "midpoint" || st == "heun", o.name, ": solver_type '", st, "' is not one of midpoint, heun");
    heun_ = st == "heun";
    DF_CHECK(o.solver_order >= 1 && o.solver_order <= 3, o.name, ": solver_order ", o.solver_order,
             " is not 1, 2 or 3");
    (void)solver::final_sigma_of(o_);  // validates final_sigmas_type
  }

  void set_timesteps(int steps) override {
    reset_indices();
    const int clipped = solver::lambda_clip_index(o_);
    const double fin = solver::final_sigma_of(o_);
    solver::SolverSchedule s = solver::solver_schedule(o_, steps, clipped, fin, fin);
    timesteps_ = std::move(s.timesteps);
    sigmas_ = std::move(s.sigmas);
    outs_.assign(size_t(o_.solver_order), Tensor());
    lower_order_nums_ = 0;
  }
  const std::vector<double>& sigmas() const override { return sigmas_; }
  Tensor scale_model_input(const Tensor& x, double) override { return x.clone(); }

  void step(const Tensor& model_output, double t, Tensor& x, const NoiseFn& draw_noise) override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": step() before set_timesteps()");
    check_latent(model_output, x, "model output");
    const int si = init_step_index(t);
    const int n = int(timesteps_.size());
    DF_CHECK(si >= 0 && si < n, o_.name, ": step ", si, " is past the last of ", n, " steps");
    const bool lower_final =
        si == n - 1 && (o_.euler_at_final || (o_.lower_order_final && n < 15) || o_.final_sigmas_type == "zero");
    const bool lower_second = si == n - 2 && o_.lower_order_final && n < 15;

    const VP cur = vp_of(sigmas_[size_t(si)]);
    Tensor m = vp_x0(model_output, x, cur.alpha, cur.sigma, o_.prediction);
    for (size_t i = 0; i + 1 < outs_.size(); ++i) outs_[i] = outs_[i + 1];
    outs_.back() = m;

    Tensor noise;
    if (sde_) {
      DF_CHECK(draw_noise, o_.name, ": needs a noise source");
      noise = draw_noise();
      check_latent(noise, x, "noise");
    }
    Tensor prev;
    const int order = o_.solver_order;
    if (order == 1 || lower_order_nums_ < 1 || lower_final)
      prev = first_order(m, x, noise, si);
    else if (order == 2 || lower_order_nums_ < 2 || lower_second)
      prev = second_order(x, noise, si);
    else
      prev = third_order(x, si);
    if (lower_order_nums_ < order) ++lower_order_nums_;
    ++step_index_;
    x.copy_from(prev);
  }

  Tensor add_noise(const Tensor& x0, const Tensor& noise, double t) const override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": add_noise() before set_timesteps()");
    return solver::vp_add_noise(x0, noise, sigmas_[size_t(add_noise_index(t))]);
  }

 private:
  Tensor first_order(const Tensor& m, const Tensor& x, const Tensor& noise, int si) const {
    return solver::dpmpp_first_order(sigmas_[size_t(si + 1)], sigmas_[size_t(si)], sde_, m, x, noise);
  }

  Tensor second_order(const Tensor& x, const Tensor& noise, int si) const {
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s0 = vp_of(sigmas_[size_t(si)]), s1 = vp_of(sigmas_[size_t(si - 1)]);
    const Tensor& m0 = outs_[outs_.size() - 1];
    const Tensor& m1 = outs_[outs_.size() - 2];
    const float h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda;
    const float r0 = h0 / h;
    const Tensor d1 = lincomb({{1.0f / r0, m0}, {-(1.0f / r0), m1}});
    if (!sde_) {
      const float cx = t.sigma / s0.sigma, e = std::exp(-h) - 1.0f;
      const float c0 = -(t.alpha * e);
      const float c1 = heun_ ? t.alpha * (e / h + 1.0f) : -(0.5f * (t.alpha * e));
      return lincomb({{cx, x}, {c0, m0}, {c1, d1}});
    }
    const float e2 = 1.0f - std::exp(-2.0f * h);
    const float cx = t.sigma / s0.sigma * std::exp(-h), c0 = t.alpha * e2;
    const float c1 = heun_ ? t.alpha * (e2 / (-2.0f * h) + 1.0f) : 0.5f * (t.alpha * e2);
    const float cn = t.sigma * std::sqrt(e2);
    return lincomb({{cx, x}, {c0, m0}, {c1, d1}, {cn, noise}});
  }

  Tensor third_order(const Tensor& x, int si) const {
    DF_CHECK(!sde_, o_.name, ": third-order sde-dpmsolver++ is not supported (diffusers has none)");
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s0 = vp_of(sigmas_[size_t(si)]), s1 = vp_of(sigmas_[size_t(si - 1)]),
             s2 = vp_of(sigmas_[size_t(si - 2)]);
    const Tensor& m0 = outs_[outs_.size() - 1];
    const Tensor& m1 = outs_[outs_.size() - 2];
    const Tensor& m2 = outs_[outs_.size() - 3];
    const float h = t.lambda - s0.lambda, h0 = s0.lambda - s1.lambda, h1 = s1.lambda - s2.lambda;
    const float r0 = h0 / h, r1 = h1 / h;
    const Tensor d1_0 = lincomb({{1.0f / r0, m0}, {-(1.0f / r0), m1}});
    const Tensor d1_1 = lincomb({{1.0f / r1, m1}, {-(1.0f / r1), m2}});
    const float w = r0 / (r0 + r1), w2 = 1.0f / (r0 + r1);
    const Tensor d1 = lincomb({{1.0 + w, d1_0}, {-w, d1_1}});
    const Tensor d2 = lincomb({{w2, d1_0}, {-w2, d1_1}});
    const float e = std::exp(-h) - 1.0f;
    const float cx = t.sigma / s0.sigma, c0 = -(t.alpha * e), c1 = t.alpha * (e / h + 1.0f);
    const float c2 = -(t.alpha * ((e + h) / (h * h) - 0.5f));
    return lincomb({{cx, x}, {c0, m0}, {c1, d1}, {c2, d2}});
  }

  SamplerOptions o_;
  bool sde_ = false, heun_ = false;
  std::vector<double> sigmas_;
  std::vector<Tensor> outs_;
  int lower_order_nums_ = 0;
};

}  // namespace

std::unique_ptr<Scheduler> make_dpm_multistep(bool sde, const SamplerOptions& o) {
  return std::make_unique<DpmMultistep>(sde, o);
}

}  // namespace diffuse
