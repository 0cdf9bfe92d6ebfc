// DEISMultistepScheduler (diffusers): log-rho DEIS of order 1-3 on the noise prediction (the model
// output converted to x0 and back to epsilon, as diffusers does), lower-order warm-up and, below
// 15 steps, lower-order final steps. Its schedule ends at sigma_min (the sigma of train timestep
// 0), not 0: DEIS has no final_sigmas_type.
//   deis   order 2, logrho, lower_order_final
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"
#include "pipeline/samplers/solver_common.h"

namespace diffuse {
namespace {

using solver::VP;
using solver::vp_of;

class Deis final : public SchedulerBase {
 public:
  explicit Deis(const SamplerOptions& o) : o_(o) {
    const std::string alg = o.algorithm_type.empty() ? std::string("deis") : o.algorithm_type;
    DF_CHECK(alg == "deis" || alg == "dpmsolver" || alg == "dpmsolver++", o.name, ": DEIS algorithm_type '", alg,
             "' is not supported (deis)");
    const std::string st = o.solver_type.empty() ? std::string("logrho") : o.solver_type;
    DF_CHECK(st == "logrho" || st == "midpoint" || st == "heun" || st == "bh1" || st == "bh2", o.name,
             ": DEIS solver_type '", st, "' is not supported (logrho)");
    DF_CHECK(o.solver_order >= 1 && o.solver_order <= 3, o.name, ": solver_order ", o.solver_order,
             " is not 1, 2 or 3");
    DF_CHECK(!o.use_lu_lambdas, o.name, ": DEIS has no use_lu_lambdas");
  }

  void set_timesteps(int steps) override {
    reset_indices();
    // Interpolated sigmas end with sigma_min; Karras sigmas repeat their last value.
    solver::SolverSchedule s = solver::solver_schedule(o_, steps, 0, solver::sigma_min_of(o_), -1.0);
    timesteps_ = std::move(s.timesteps);
    sigmas_ = std::move(s.sigmas);
    outs_.assign(size_t(o_.solver_order), Tensor());
    lower_order_nums_ = 0;
  }
  const std::vector<double>& sigmas() const override { return sigmas_; }
  Tensor scale_model_input(const Tensor& x, double) override { return x.clone(); }

  void step(const Tensor& model_output, double t, Tensor& x, const NoiseFn&) override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": step() before set_timesteps()");
    check_latent(model_output, x, "model output");
    const int si = init_step_index(t);
    const int n = int(timesteps_.size());
    DF_CHECK(si >= 0 && si < n, o_.name, ": step ", si, " is past the last of ", n, " steps");
    const bool lower_final = si == n - 1 && o_.lower_order_final && n < 15;
    const bool lower_second = si == n - 2 && o_.lower_order_final && n < 15;

    // x0 from the model output, then epsilon = (x - alpha·x0) / sigma.
    const VP cur = vp_of(sigmas_[size_t(si)]);
    const Tensor x0 = vp_x0(model_output, x, cur.alpha, cur.sigma, o_.prediction);
    Tensor m = lincomb({{1.0f / cur.sigma, x}, {-(cur.alpha / cur.sigma), x0}});
    for (size_t i = 0; i + 1 < outs_.size(); ++i) outs_[i] = outs_[i + 1];
    outs_.back() = m;

    Tensor prev;
    const int order = o_.solver_order;
    if (order == 1 || lower_order_nums_ < 1 || lower_final)
      prev = first_order(m, x, si);
    else if (order == 2 || lower_order_nums_ < 2 || lower_second)
      prev = second_order(x, si);
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
  Tensor first_order(const Tensor& m, const Tensor& x, int si) const {
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s = vp_of(sigmas_[size_t(si)]);
    const float h = t.lambda - s.lambda;
    return lincomb({{t.alpha / s.alpha, x}, {-(t.sigma * (std::exp(h) - 1.0f)), m}});
  }

  Tensor second_order(const Tensor& x, int si) const {
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s0 = vp_of(sigmas_[size_t(si)]), s1 = vp_of(sigmas_[size_t(si - 1)]);
    const Tensor& m0 = outs_[outs_.size() - 1];
    const Tensor& m1 = outs_[outs_.size() - 2];
    const double rt = t.sigma / t.alpha, r0 = s0.sigma / s0.alpha, r1 = s1.sigma / s1.alpha;
    // Integral of the Lagrange basis in log rho: ∫ (log t − log c) / (log b − log c) dt.
    auto ind = [](double t_, double b, double c) {
      return t_ * (-std::log(c) + std::log(t_) - 1.0) / (std::log(b) - std::log(c));
    };
    const double coef1 = ind(rt, r0, r1) - ind(r0, r0, r1);
    const double coef2 = ind(rt, r1, r0) - ind(r0, r1, r0);
    const double a = t.alpha;
    return lincomb({{a / s0.alpha, x}, {a * coef1, m0}, {a * coef2, m1}});
  }

  Tensor third_order(const Tensor& x, int si) const {
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s0 = vp_of(sigmas_[size_t(si)]), s1 = vp_of(sigmas_[size_t(si - 1)]),
             s2 = vp_of(sigmas_[size_t(si - 2)]);
    const Tensor& m0 = outs_[outs_.size() - 1];
    const Tensor& m1 = outs_[outs_.size() - 2];
    const Tensor& m2 = outs_[outs_.size() - 3];
    const double rt = t.sigma / t.alpha, r0 = s0.sigma / s0.alpha, r1 = s1.sigma / s1.alpha,
                 r2 = s2.sigma / s2.alpha;
    auto ind = [](double t_, double b, double c, double d) {
      const double lt = std::log(t_), lb = std::log(b), lc = std::log(c), ld = std::log(d);
      const double num = t_ * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
      return num / ((lb - lc) * (lb - ld));
    };
    const double coef1 = ind(rt, r0, r1, r2) - ind(r0, r0, r1, r2);
    const double coef2 = ind(rt, r1, r2, r0) - ind(r0, r1, r2, r0);
    const double coef3 = ind(rt, r2, r0, r1) - ind(r0, r2, r0, r1);
    const double a = t.alpha;
    return lincomb({{a / s0.alpha, x}, {a * coef1, m0}, {a * coef2, m1}, {a * coef3, m2}});
  }

  SamplerOptions o_;
  std::vector<double> sigmas_;
  std::vector<Tensor> outs_;
  int lower_order_nums_ = 0;
};

}  // namespace

std::unique_ptr<Scheduler> make_deis(const SamplerOptions& o) { return std::make_unique<Deis>(o); }

}  // namespace diffuse
