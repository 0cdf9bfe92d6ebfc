#include "pipeline/samplers/common.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace diffuse {

void check_latent(const Tensor& x, const Tensor& like, const char* what) {
  DF_CHECK(x.defined(), "sampler: ", what, " is undefined");
  DF_CHECK(x.dtype() == DType::F32, "sampler: ", what, " ", x.str(), " must be f32");
  DF_CHECK(x.numel() == like.numel(), "sampler: ", what, " ", x.str(), " does not match the latent ", like.str());
}

void lincomb_into(Tensor& out, std::initializer_list<Term> terms) {
  DF_ASSERT(terms.size() >= 1 && terms.size() <= 8);
  const float* src[8];
  double c[8];
  int n = 0;
  for (const Term& t : terms) {
    check_latent(t.x, out, "operand");
    src[n] = t.x.f32();
    c[n] = t.c;
    ++n;
  }
  float* o = out.f32();
  const int64_t m = out.numel();
  for (int64_t i = 0; i < m; ++i) {
    double acc = 0.0;
    for (int k = 0; k < n; ++k) acc += c[k] * double(src[k][i]);
    o[i] = float(acc);
  }
}

Tensor lincomb(std::initializer_list<Term> terms) {
  DF_ASSERT(terms.size() >= 1);
  const Tensor& first = terms.begin()->x;
  DF_CHECK(first.defined() && first.dtype() == DType::F32, "sampler: latent must be a defined f32 tensor");
  Tensor out = Tensor::empty(first.shape(), DType::F32);
  lincomb_into(out, terms);
  return out;
}

Tensor scaled(const Tensor& x, double c) { return lincomb({{c, x}}); }

void clamp_inplace(Tensor& x, double r) {
  float* p = x.f32();
  const float lo = float(-r), hi = float(r);
  for (int64_t i = 0; i < x.numel(); ++i) p[i] = std::clamp(p[i], lo, hi);
}

Tensor vp_x0(const Tensor& out, const Tensor& sample, double alpha_t, double sigma_t, Prediction p) {
  check_latent(out, sample, "model output");
  if (p == Prediction::Epsilon) return lincomb({{1.0 / alpha_t, sample}, {-sigma_t / alpha_t, out}});
  return lincomb({{alpha_t, sample}, {-sigma_t, out}});
}

Tensor vp_eps(const Tensor& out, const Tensor& sample, double alpha_t, double sigma_t, Prediction p) {
  check_latent(out, sample, "model output");
  if (p == Prediction::Epsilon) return out.clone();
  return lincomb({{alpha_t, out}, {sigma_t, sample}});
}

Tensor ve_x0(const Tensor& out, const Tensor& sample, double sigma, Prediction p) {
  check_latent(out, sample, "model output");
  if (p == Prediction::Epsilon) return lincomb({{1.0, sample}, {-sigma, out}});
  // diffusers: model_output · (−σ / sqrt(σ² + 1)) + sample / (σ² + 1)
  return lincomb({{-sigma / std::sqrt(sigma * sigma + 1.0), out}, {1.0 / (sigma * sigma + 1.0), sample}});
}

SigmaSchedule k_sigma_schedule(const SamplerOptions& o, int steps) {
  const int T = o.noise.num_train_timesteps;
  DF_CHECK(steps >= 1 && steps <= T, o.name, ": steps must be between 1 and ", T, ", got ", steps);
  DF_CHECK(o.interpolation_type == "linear", o.name, ": interpolation_type '", o.interpolation_type,
           "' is not supported (linear)");
  SigmaSchedule s;
  // Timesteps as float32 (np.float32 for linspace; leading/trailing are integers).
  for (double t : spaced_timesteps(o.timestep_spacing, steps, T, o.steps_offset)) s.timesteps.push_back(f32r(t));
  const std::vector<double> train = train_sigmas(o.noise);
  std::vector<double> sig = interp_sigmas(s.timesteps, train);
  if (o.use_karras_sigmas) {
    sig = karras_sigmas(sig.back(), sig.front(), steps);
    s.timesteps.clear();
    for (double t : sigmas_to_timesteps(sig, train)) s.timesteps.push_back(f32r(t));
  }
  double last = 0.0;
  if (o.final_sigmas_type == "sigma_min") {
    last = train.front();
  } else {
    DF_CHECK(o.final_sigmas_type == "zero", o.name, ": final_sigmas_type '", o.final_sigmas_type,
             "' is not supported (zero or sigma_min)");
  }
  sig.push_back(last);
  for (double v : sig) s.sigmas.push_back(f32r(v));
  return s;
}

double k_init_noise_sigma(const SamplerOptions& o, const std::vector<double>& sigmas) {
  double m = 0.0;
  for (double v : sigmas) m = std::max(m, v);
  if (o.timestep_spacing == "linspace" || o.timestep_spacing == "trailing") return m;
  return f32r(std::sqrt(m * m + 1.0));
}

void SchedulerBase::set_begin_index(int index) {
  DF_CHECK(index >= 0 && index <= int(timesteps_.size()), "sampler: begin index ", index, " is outside 0..",
           timesteps_.size());
  begin_index_ = index;
}

int SchedulerBase::index_for_timestep(double t, const std::vector<double>* schedule) const {
  const std::vector<double>& ts = schedule ? *schedule : timesteps_;
  int first = -1, second = -1;
  for (int i = 0; i < int(ts.size()); ++i) {
    if (ts[size_t(i)] == t) {
      if (first < 0) {
        first = i;
      } else {
        second = i;
        break;
      }
    }
  }
  DF_CHECK(first >= 0, "sampler: timestep ", t, " is not in the schedule");
  return second >= 0 ? second : first;
}

int SchedulerBase::init_step_index(double t) {
  if (step_index_ < 0) step_index_ = begin_index_ >= 0 ? begin_index_ : index_for_timestep(t);
  return step_index_;
}

int SchedulerBase::add_noise_index(double t) const {
  if (begin_index_ < 0) return index_for_timestep(t);
  if (step_index_ >= 0) return step_index_;
  return begin_index_;
}

Tensor SigmaSchedulerBase::scale_model_input(const Tensor& x, double t) {
  DF_CHECK(!sigmas_.empty(), o_.name, ": set_timesteps was not called");
  const int i = init_step_index(t);
  // (σ² + 1) ** 0.5 on a float32 σ, in float32.
  const float s = float(sigmas_[size_t(i)]);
  const float d = std::sqrt(s * s + 1.0f);
  Tensor out = Tensor::empty(x.shape(), DType::F32);
  check_latent(x, out, "latent");
  const float* src = x.f32();
  float* o = out.f32();
  for (int64_t k = 0; k < x.numel(); ++k) o[k] = src[k] / d;
  return out;
}

Tensor SigmaSchedulerBase::add_noise(const Tensor& x0, const Tensor& noise, double t) const {
  DF_CHECK(!sigmas_.empty(), o_.name, ": set_timesteps was not called");
  check_latent(noise, x0, "noise");
  const double sigma = sigmas_[size_t(add_noise_index(t))];
  return lincomb({{1.0, x0}, {sigma, noise}});
}

double AlphaSchedulerBase::alpha_cumprod(double t) const {
  if (t < 0) return o_.set_alpha_to_one ? 1.0 : o_.noise.alphas_cumprod.front();
  const long long i = std::llround(t);
  DF_CHECK(double(i) == t && i < (long long)o_.noise.alphas_cumprod.size(), o_.name, ": timestep ", t,
           " is not an integer train timestep below ", o_.noise.alphas_cumprod.size());
  return o_.noise.alphas_cumprod[size_t(i)];
}

std::vector<double> AlphaSchedulerBase::integer_timesteps(int steps) const {
  std::vector<double> ts = spaced_timesteps(o_.timestep_spacing, steps, o_.noise.num_train_timesteps, o_.steps_offset);
  for (double& t : ts) t = std::nearbyint(t);
  return ts;
}

Tensor AlphaSchedulerBase::add_noise(const Tensor& x0, const Tensor& noise, double t) const {
  check_latent(noise, x0, "noise");
  const double a = alpha_cumprod(t);
  // In float32 as torch: ᾱ ** 0.5 and (1 − ᾱ) ** 0.5.
  const float fa = float(a);
  return lincomb({{double(std::sqrt(fa)), x0}, {double(std::sqrt(1.0f - fa)), noise}});
}

}  // namespace diffuse
