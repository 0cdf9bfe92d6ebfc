// UniPCMultistepScheduler (diffusers): the UniP predictor and the UniC corrector with the B(h)
// variants bh1 (B(h) = h) and bh2 (B(h) = e^h − 1), data prediction (predict_x0) or noise
// prediction, order up to 3 with lower-order warm-up and (lower_order_final) final steps. Every
// step but the first first corrects the incoming sample with the new model output (unless that
// step is listed in disable_corrector), then predicts the next one.
//   unipc   order 2, bh2, predict_x0, lower_order_final, final sigma 0
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "pipeline/samplers/common.h"
#include "pipeline/samplers/solver_common.h"

namespace diffuse {
namespace {

using solver::VP;
using solver::vp_of;

// Solves A·x = b (n ≤ 3) by Gaussian elimination with partial pivoting.
std::vector<double> solve(std::vector<std::vector<double>> A, std::vector<double> b) {
  const size_t n = b.size();
  for (size_t c = 0; c < n; ++c) {
    size_t p = c;
    for (size_t r = c + 1; r < n; ++r)
      if (std::fabs(A[r][c]) > std::fabs(A[p][c])) p = r;
    std::swap(A[c], A[p]);
    std::swap(b[c], b[p]);
    DF_CHECK(A[c][c] != 0.0, "UniPC: singular coefficient matrix");
    for (size_t r = c + 1; r < n; ++r) {
      const double f = A[r][c] / A[c][c];
      for (size_t k = c; k < n; ++k) A[r][k] -= f * A[c][k];
      b[r] -= f * b[c];
    }
  }
  std::vector<double> x(n);
  for (size_t i = n; i-- > 0;) {
    double s = b[i];
    for (size_t k = i + 1; k < n; ++k) s -= A[i][k] * x[k];
    x[i] = s / A[i][i];
  }
  return x;
}

class UniPC final : public SchedulerBase {
 public:
  explicit UniPC(const SamplerOptions& o) : o_(o) {
    std::string st = o.solver_type.empty() ? std::string("bh2") : o.solver_type;
    if (st == "midpoint" || st == "heun" || st == "logrho") st = "bh2";  // diffusers maps these
    DF_CHECK(st == "bh1" || st == "bh2", o.name, ": UniPC solver_type '", st, "' is not one of bh1, bh2");
    bh1_ = st == "bh1";
    DF_CHECK(o.solver_order >= 1 && o.solver_order <= 3, o.name, ": solver_order ", o.solver_order,
             " is not 1, 2 or 3");
    DF_CHECK(!o.use_lu_lambdas, o.name, ": UniPC has no use_lu_lambdas");
    (void)solver::final_sigma_of(o_);
  }

  void set_timesteps(int steps) override {
    reset_indices();
    const double fin = solver::final_sigma_of(o_);
    // Karras with final_sigmas_type sigma_min appends the last Karras sigma.
    const double fin_karras = o_.final_sigmas_type == "zero" ? 0.0 : -1.0;
    solver::SolverSchedule s = solver::solver_schedule(o_, steps, 0, fin, fin_karras);
    timesteps_ = std::move(s.timesteps);
    sigmas_ = std::move(s.sigmas);
    outs_.assign(size_t(o_.solver_order), Tensor());
    lower_order_nums_ = 0;
    this_order_ = 0;
    last_sample_ = Tensor();
  }
  const std::vector<double>& sigmas() const override { return sigmas_; }
  Tensor scale_model_input(const Tensor& x, double) override { return x.clone(); }

  void step(const Tensor& model_output, double t, Tensor& x, const NoiseFn&) override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": step() before set_timesteps()");
    check_latent(model_output, x, "model output");
    const int si = init_step_index(t);
    const int n = int(timesteps_.size());
    DF_CHECK(si >= 0 && si < n, o_.name, ": step ", si, " is past the last of ", n, " steps");
    const bool corrector = si > 0 && last_sample_.defined() &&
                           std::find(o_.disable_corrector.begin(), o_.disable_corrector.end(), si - 1) ==
                               o_.disable_corrector.end();
    const Tensor m = convert(model_output, x, si);
    Tensor sample = corrector ? correct(m, last_sample_, x, this_order_, si) : x.clone();

    for (size_t i = 0; i + 1 < outs_.size(); ++i) outs_[i] = outs_[i + 1];
    outs_.back() = m;

    int order = o_.lower_order_final ? std::min(o_.solver_order, n - si) : o_.solver_order;
    this_order_ = std::min(order, lower_order_nums_ + 1);
    DF_ASSERT(this_order_ > 0);
    last_sample_ = sample;
    Tensor prev = predict(sample, this_order_, si);
    if (lower_order_nums_ < o_.solver_order) ++lower_order_nums_;
    ++step_index_;
    x.copy_from(prev);
  }

  Tensor add_noise(const Tensor& x0, const Tensor& noise, double t) const override {
    DF_CHECK(!timesteps_.empty(), o_.name, ": add_noise() before set_timesteps()");
    return solver::vp_add_noise(x0, noise, sigmas_[size_t(add_noise_index(t))]);
  }

 private:
  Tensor convert(const Tensor& mo, const Tensor& x, int si) const {
    const VP v = vp_of(sigmas_[size_t(si)]);
    if (o_.predict_x0) return vp_x0(mo, x, v.alpha, v.sigma, o_.prediction);
    return vp_eps(mo, x, v.alpha, v.sigma, o_.prediction);
  }

  // The B(h) coefficients shared by predictor and corrector: R (order × order, rows rks^(i-1)) and
  // b, plus h·phi_1(h) and B(h).
  struct Coeffs {
    std::vector<std::vector<double>> R;
    std::vector<double> b;
    float h_phi_1 = 0, B_h = 0;
  };
  Coeffs coeffs(float h, const std::vector<float>& rks_in, int order) const {
    Coeffs c;
    const float hh = o_.predict_x0 ? -h : h;
    c.h_phi_1 = std::expm1(hh);
    float h_phi_k = c.h_phi_1 / hh - 1.0f;
    c.B_h = bh1_ ? hh : std::expm1(hh);
    std::vector<float> rks = rks_in;
    rks.push_back(1.0f);
    float factorial = 1.0f;
    for (int i = 1; i <= order; ++i) {
      std::vector<double> row;
      for (float r : rks) row.push_back(double(std::pow(r, float(i - 1))));
      c.R.push_back(row);
      c.b.push_back(double(h_phi_k * factorial / c.B_h));
      factorial *= float(i + 1);
      h_phi_k = h_phi_k / hh - 1.0f / factorial;
    }
    return c;
  }

  // UniP: from `x` at sigmas[si] to sigmas[si + 1].
  Tensor predict(const Tensor& x, int order, int si) const {
    const VP t = vp_of(sigmas_[size_t(si + 1)]), s0 = vp_of(sigmas_[size_t(si)]);
    const Tensor& m0 = outs_.back();
    const float h = t.lambda - s0.lambda;
    std::vector<float> rks;
    std::vector<Tensor> d1s;
    for (int i = 1; i < order; ++i) {
      const VP vi = vp_of(sigmas_[size_t(si - i)]);
      const float rk = (vi.lambda - s0.lambda) / h;
      rks.push_back(rk);
      const Tensor& mi = outs_[outs_.size() - 1 - size_t(i)];
      d1s.push_back(lincomb({{1.0f / rk, mi}, {-(1.0f / rk), m0}}));
    }
    const Coeffs c = coeffs(h, rks, order);
    std::vector<double> rhos;
    if (!d1s.empty()) {
      if (order == 2) {
        rhos = {0.5};
      } else {
        std::vector<std::vector<double>> A(size_t(order - 1));
        for (int r = 0; r < order - 1; ++r) A[size_t(r)].assign(c.R[size_t(r)].begin(), c.R[size_t(r)].end() - 1);
        rhos = solve(A, std::vector<double>(c.b.begin(), c.b.end() - 1));
      }
    }
    const float cx = o_.predict_x0 ? t.sigma / s0.sigma : t.alpha / s0.alpha;
    const float scale = o_.predict_x0 ? t.alpha : t.sigma;
    Tensor out = lincomb({{cx, x}, {-(scale * c.h_phi_1), m0}});
    const double cr = -double(scale * c.B_h);
    for (size_t k = 0; k < d1s.size(); ++k) lincomb_into(out, {{1.0, out}, {cr * float(rhos[k]), d1s[k]}});
    return out;
  }

  // UniC: corrects `this_sample` (at sigmas[si]) predicted from `last` (at sigmas[si - 1]) with the
  // model output `m_t` at si; the stored outputs are still those up to si - 1.
  Tensor correct(const Tensor& m_t, const Tensor& last, const Tensor& this_sample, int order, int si) const {
    (void)this_sample;
    const VP t = vp_of(sigmas_[size_t(si)]), s0 = vp_of(sigmas_[size_t(si - 1)]);
    const Tensor& m0 = outs_.back();
    const float h = t.lambda - s0.lambda;
    std::vector<float> rks;
    std::vector<Tensor> d1s;
    for (int i = 1; i < order; ++i) {
      const VP vi = vp_of(sigmas_[size_t(si - (i + 1))]);
      const float rk = (vi.lambda - s0.lambda) / h;
      rks.push_back(rk);
      const Tensor& mi = outs_[outs_.size() - 1 - size_t(i)];
      d1s.push_back(lincomb({{1.0f / rk, mi}, {-(1.0f / rk), m0}}));
    }
    const Coeffs c = coeffs(h, rks, order);
    const std::vector<double> rhos = order == 1 ? std::vector<double>{0.5} : solve(c.R, c.b);
    const float cx = o_.predict_x0 ? t.sigma / s0.sigma : t.alpha / s0.alpha;
    const float scale = o_.predict_x0 ? t.alpha : t.sigma;
    const double cr = -double(scale * c.B_h);
    Tensor out = lincomb({{cx, last}, {-(scale * c.h_phi_1), m0}});
    for (size_t k = 0; k < d1s.size(); ++k) lincomb_into(out, {{1.0, out}, {cr * float(rhos[k]), d1s[k]}});
    // + rhos_c[-1] · (m_t − m0)
    const double rl = cr * float(rhos.back());
    lincomb_into(out, {{1.0, out}, {rl, m_t}, {-rl, m0}});
    return out;
  }

  SamplerOptions o_;
  bool bh1_ = false;
  std::vector<double> sigmas_;
  std::vector<Tensor> outs_;
  int lower_order_nums_ = 0, this_order_ = 0;
  Tensor last_sample_;
};

}  // namespace

std::unique_ptr<Scheduler> make_unipc(const SamplerOptions& o) { return std::make_unique<UniPC>(o); }

}  // namespace diffuse
