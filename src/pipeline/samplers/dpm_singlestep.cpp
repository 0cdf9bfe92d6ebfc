// DPMSolverSinglestepScheduler (diffusers), DPM-Solver++ (data prediction): each group of `order`
// steps starts from the sample at its first step and reaches the group's end with the model
// outputs taken inside the group. The per-step orders come from get_order_list (order 2 with
// lower_order_final: 1,2,1,2,...,1 for an odd step count, ...,1,1 for an even one).
//   dpm++2s   algorithm dpmsolver++, order 2, midpoint, lower_order_final, final sigma 0
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"
#include "pipeline/samplers/solver_common.h"

namespace diffuse {
namespace {

using solver::VP;
using solver::vp_of;

class DpmSinglestep final : public SchedulerBase {
 public:
  explicit DpmSinglestep(const SamplerOptions& o) : o_(o) {
    std::string alg = o.algorithm_type.empty() ? std::string("dpmsolver++") : o.algorithm_type;
    if (alg == "deis") alg = "dpmsolver++";
    DF_CHECK(alg == "dpmsolver++" || alg == "sde-dpmsolver++", o.name, ": DPM-Solver algorithm_type '", alg,
             "' is not supported (dpmsolver++, sde-dpmsolver++)");
    sde_ = alg == "sde-dpmsolver++";
    std::string st = o.solver_type.empty() ? std::string("midpoint") : o.solver_type;
    if (st == "logrho" || st == "bh1" || st == "bh2") st = "midpoint";
    DF_CHECK(st == "midpoint" || st == "heun", o.name, ": solver_type '", st, "' is not one of midpoint, heun");
    heun_ = st == "heun";
    DF_CHECK(o.solver_order >= 1 && o.solver_order <= 3, o.name, ": solver_order ", o.solver_order,
             " is not 1, 2 or 3");
    (void)solver::final_sigma_of(o_);
  }

  void set_timesteps(int steps) override {
    reset_indices();
    // DPMSolverSinglestep has no timestep_spacing option: always linspace.
    SamplerOptions so = o_;
    so.timestep_spacing = "linspace";
    const int clipped = solver::lambda_clip_index(o_);
    const double fin = solver::final_sigma_of(o_);
    solver::SolverSchedule s = solver::solver_schedule(so, steps, clipped, fin, fin);
    timesteps_ = std::move(s.timesteps);
    sigmas_ = std::move(s.sigmas);
    outs_.assign(size_t(o_.solver_order), Tensor());
    sample_ = Tensor();
    // diffusers forces lower_order_final for an uneven step count or a zero final sigma.
    lower_order_final_ = o_.lower_order_final || steps % o_.solver_order != 0 || o_.final_sigmas_type == "zero";
    order_list_ = order_list(steps);
  }
  const std::vector<double>& sigmas() const override { return sigmas_; }
  Tensor scale_model_input(const Tensor& x, double) override { return x.clone(); }

  void step(const Tensor& model_output, double t, Tensor& x, const NoiseFn& draw_noise) override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": step() before set_timesteps()");
    check_latent(model_output, x, "model output");
    const int si = init_step_index(t);
    DF_CHECK(si >= 0 && si < int(order_list_.size()), o_.name, ": step ", si, " is past the last of ",
             order_list_.size(), " steps");
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
    int order = order_list_[size_t(si)];
    // img2img may start where the list says order > 1: fall back while outputs are missing.
    while (order > 1 && !outs_[outs_.size() - size_t(order)].defined()) --order;
    if (order == 1) sample_ = x.clone();
    Tensor prev;
    if (order == 1)
      prev = first_order(m, sample_, noise, si);
    else if (order == 2)
      prev = second_order(sample_, noise, si);
    else
      prev = third_order(sample_, si);
    ++step_index_;
    x.copy_from(prev);
  }

  Tensor add_noise(const Tensor& x0, const Tensor& noise, double t) const override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": add_noise() before set_timesteps()");
    return solver::vp_add_noise(x0, noise, sigmas_[size_t(add_noise_index(t))]);
  }

 private:
  std::vector<int> order_list(int steps) const {
    const int order = o_.solver_order;
    std::vector<int> out;
    auto rep = [&](std::initializer_list<int> pat, int times) {
      for (int i = 0; i < times; ++i) out.insert(out.end(), pat);
    };
    if (lower_order_final_) {
      if (order == 3) {
        if (steps % 3 == 0) {
          rep({1, 2, 3}, steps / 3 - 1);
          rep({1, 2, 1}, 1);
        } else if (steps % 3 == 1) {
          rep({1, 2, 3}, steps / 3);
          rep({1}, 1);
        } else {
          rep({1, 2, 3}, steps / 3);
          rep({1, 2}, 1);
        }
      } else if (order == 2) {
        if (steps % 2 == 0) {
          rep({1, 2}, steps / 2 - 1);
          rep({1, 1}, 1);
        } else {
          rep({1, 2}, steps / 2);
          rep({1}, 1);
        }
      } else {
        rep({1}, steps);
      }
    } else {
      if (order == 3) rep({1, 2, 3}, steps / 3);
      else if (order == 2) rep({1, 2}, steps / 2);
      else rep({1}, steps);
    }
    return out;
  }

  Tensor first_order(const Tensor& m, const Tensor& x, const Tensor& noise, int si) const {
    return solver::dpmpp_first_order(sigmas_[size_t(si + 1)], sigmas_[size_t(si)], sde_, m, x, noise);
  }

  // From the sample at sigmas[si - 1] to sigmas[si + 1] with the outputs at si - 1 and si.
  Tensor second_order(const Tensor& x, const Tensor& noise, int si) const {
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s0 = vp_of(sigmas_[size_t(si)]), s1 = vp_of(sigmas_[size_t(si - 1)]);
    const Tensor& m0 = outs_[outs_.size() - 1];
    const Tensor& m1 = outs_[outs_.size() - 2];
    const float h = t.lambda - s1.lambda, h0 = s0.lambda - s1.lambda;
    const float r0 = h0 / h;
    // D0 = m1, D1 = (m0 - m1) / r0
    const Tensor d1 = lincomb({{1.0f / r0, m0}, {-(1.0f / r0), m1}});
    if (!sde_) {
      const float cx = t.sigma / s1.sigma, e = std::exp(-h) - 1.0f;
      const float c0 = -(t.alpha * e);
      const float c1 = heun_ ? t.alpha * (e / h + 1.0f) : -(0.5f * (t.alpha * e));
      return lincomb({{cx, x}, {c0, m1}, {c1, d1}});
    }
    const float e2 = 1.0f - std::exp(-2.0f * h);
    const float cx = t.sigma / s1.sigma * std::exp(-h), c0 = t.alpha * e2;
    const float c1 = heun_ ? t.alpha * (e2 / (-2.0f * h) + 1.0f) : 0.5f * (t.alpha * e2);
    const float cn = t.sigma * std::sqrt(e2);
    return lincomb({{cx, x}, {c0, m1}, {c1, d1}, {cn, noise}});
  }

  // From the sample at sigmas[si - 2] to sigmas[si + 1].
  Tensor third_order(const Tensor& x, int si) const {
    DF_CHECK(!sde_, o_.name, ": third-order sde-dpmsolver++ is not supported (diffusers has none)");
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s0 = vp_of(sigmas_[size_t(si)]), s1 = vp_of(sigmas_[size_t(si - 1)]),
             s2 = vp_of(sigmas_[size_t(si - 2)]);
    const Tensor& m0 = outs_[outs_.size() - 1];
    const Tensor& m1 = outs_[outs_.size() - 2];
    const Tensor& m2 = outs_[outs_.size() - 3];
    const float h = t.lambda - s2.lambda, h0 = s0.lambda - s2.lambda, h1 = s1.lambda - s2.lambda;
    const float r0 = h0 / h, r1 = h1 / h;
    const Tensor d1_0 = lincomb({{1.0f / r1, m1}, {-(1.0f / r1), m2}});
    const Tensor d1_1 = lincomb({{1.0f / r0, m0}, {-(1.0f / r0), m2}});
    const float e = std::exp(-h) - 1.0f;
    const float cx = t.sigma / s2.sigma, c0 = -(t.alpha * e), c1 = t.alpha * (e / h + 1.0f);
    if (!heun_) return lincomb({{cx, x}, {c0, m2}, {c1, d1_1}});
    const float dr = r0 - r1;
    const Tensor d1 = lincomb({{r0 / dr, d1_0}, {-(r1 / dr), d1_1}});
    const Tensor d2 = lincomb({{2.0f / dr, d1_1}, {-(2.0f / dr), d1_0}});
    const float c2 = -(t.alpha * ((e + h) / (h * h) - 0.5f));
    return lincomb({{cx, x}, {c0, m2}, {c1, d1}, {c2, d2}});
  }

  SamplerOptions o_;
  bool sde_ = false, heun_ = false, lower_order_final_ = true;
  std::vector<double> sigmas_;
  std::vector<Tensor> outs_;
  std::vector<int> order_list_;
  Tensor sample_;
};

}  // namespace

std::unique_ptr<Scheduler> make_dpm_singlestep(const SamplerOptions& o) { return std::make_unique<DpmSinglestep>(o); }

}  // namespace diffuse
