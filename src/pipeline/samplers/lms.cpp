// diffusers' LMSDiscreteScheduler: linear multistep on the k-diffusion sigmas, order up to 4 (the
// pipelines call step() with its default order 4). Each coefficient is the integral over
// [σ_i, σ_{i+1}] of a Lagrange basis polynomial through the last `order` sigmas; diffusers
// integrates it with scipy.integrate.quad, here Gauss–Legendre with enough nodes to be exact for
// the polynomial (degree ≤ 3), i.e. the integral to rounding.
#include <algorithm>
#include <cmath>
#include <deque>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse {

// ∫_a^b Π_{k≠j, k<order} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k}) dτ  (exported for the unit test).
double lms_coefficient(const std::vector<double>& sigmas, int order, int i, int j) {
  DF_ASSERT(order >= 1 && i - (order - 1) >= 0 && i + 1 < int(sigmas.size()) && j >= 0 && j < order);
  auto basis = [&](double tau) {
    double prod = 1.0;
    for (int k = 0; k < order; ++k) {
      if (k == j) continue;
      prod *= (tau - sigmas[size_t(i - k)]) / (sigmas[size_t(i - j)] - sigmas[size_t(i - k)]);
    }
    return prod;
  };
  // 5-point Gauss–Legendre: exact for polynomials up to degree 9.
  static const double x[5] = {0.0, 0.5384693101056830910363144, -0.5384693101056830910363144,
                              0.9061798459386639927976269, -0.9061798459386639927976269};
  static const double w[5] = {0.5688888888888888888888889, 0.4786286704993664680412915, 0.4786286704993664680412915,
                              0.2369268850561890875142640, 0.2369268850561890875142640};
  const double a = sigmas[size_t(i)], b = sigmas[size_t(i) + 1];
  const double half = 0.5 * (b - a), mid = 0.5 * (a + b);
  double sum = 0.0;
  for (int q = 0; q < 5; ++q) sum += w[q] * basis(mid + half * x[q]);
  return sum * half;
}

namespace {

class LMSDiscrete final : public SigmaSchedulerBase {
 public:
  static constexpr int kOrder = 4;
  explicit LMSDiscrete(SamplerOptions o) : SigmaSchedulerBase(std::move(o)) {}

  void set_timesteps(int steps) override {
    reset_indices();
    SigmaSchedule s = k_sigma_schedule(o_, steps);
    timesteps_ = std::move(s.timesteps);
    sigmas_ = std::move(s.sigmas);
    derivatives_.clear();
  }

  void step(const Tensor& out, double t, Tensor& x, const NoiseFn&) override {
    DF_CHECK(!sigmas_.empty(), o_.name, ": set_timesteps was not called");
    check_latent(out, x, "model output");
    const int i = init_step_index(t);
    DF_CHECK(i + 1 < int(sigmas_.size()), o_.name, ": step past the end of the schedule");
    const double sigma = sigmas_[size_t(i)];
    Tensor x0 = ve_x0(out, x, sigma, o_.prediction);
    derivatives_.push_back(lincomb({{1.0 / sigma, x}, {-1.0 / sigma, x0}}));
    if (int(derivatives_.size()) > kOrder) derivatives_.pop_front();
    // The order grows with the step index (counted from the begin index's position, as diffusers
    // does); like diffusers' zip(), only as many terms as there are derivatives are summed.
    const int order = std::min(i + 1, kOrder);
    const int terms = std::min(order, int(derivatives_.size()));
    // x ← x + Σ_j c_j · d_{i−j} (d_{i−j}: the j-th most recent derivative).
    for (int j = 0; j < terms; ++j) {
      const double c = lms_coefficient(sigmas_, order, i, j);
      const Tensor& d = derivatives_[derivatives_.size() - 1 - size_t(j)];
      lincomb_into(x, {{1.0, x}, {c, d}});
    }
    ++step_index_;
  }

 private:
  std::deque<Tensor> derivatives_;
};

}  // namespace

std::unique_ptr<Scheduler> make_lms(const SamplerOptions& o) { return std::make_unique<LMSDiscrete>(o); }

}  // namespace diffuse
