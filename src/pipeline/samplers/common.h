// Shared by every sampler implementation: the configuration a sampler name stands for (the
// diffusers scheduler config in ../shared/fixtures/schedules.json), elementwise latent arithmetic,
// model-output conversion (epsilon / v-prediction -> x0 / eps), the step-index bookkeeping that
// diffusers' schedulers share, the k-diffusion sigma schedule, and the factory of each class.
#pragma once
#include <cmath>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "pipeline/schedule.h"
#include "pipeline/scheduler.h"

namespace diffuse {

// One diffusers scheduler config. Field names follow diffusers' config keys; defaults are the
// diffusers class defaults that schedules.json lists for SD (scaled_linear 0.00085..0.012, 1000).
struct SamplerOptions {
  std::string name;                       // the sampler name ("euler", "dpm++2m", ...) for messages
  NoiseSchedule noise = NoiseSchedule::scaled_linear();
  Prediction prediction = Prediction::Epsilon;
  std::string timestep_spacing = "linspace";  // "leading" | "linspace" | "trailing"
  int steps_offset = 0;
  bool use_karras_sigmas = false;
  std::string final_sigmas_type = "zero";     // "zero" | "sigma_min"
  std::string interpolation_type = "linear";  // Euler: "linear" ("log_linear" unsupported)

  // Multistep / singlestep solvers (DPM-Solver, UniPC, DEIS).
  int solver_order = 2;
  std::string algorithm_type;  // "dpmsolver++", "sde-dpmsolver++", "dpmsolver", "deis"
  std::string solver_type;     // "midpoint" | "heun" | "bh1" | "bh2" | "logrho"
  bool lower_order_final = true;
  bool euler_at_final = false;
  bool use_lu_lambdas = false;
  double lambda_min_clipped = -std::numeric_limits<double>::infinity();  // null in the json
  std::string variance_type;      // DPM: "" (null) | "learned_range"; DDPM: "fixed_small" ...
  bool predict_x0 = true;         // UniPC
  std::vector<int> disable_corrector;  // UniPC

  // DDIM / PNDM / DDPM / LCM.
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool set_alpha_to_one = false;
  bool skip_prk_steps = true;       // PNDM
  int original_inference_steps = 50;  // LCM
  double timestep_scaling = 10.0;     // LCM
  double eta = 0.0;                   // DDIM (a pipeline argument in diffusers; 0 there)
};

// ---- Elementwise arithmetic on f32 latents (any layout; all operands the same numel) ----------

struct Term {
  double c;
  const Tensor& x;
};
// sum_i c_i · x_i as a new tensor shaped like the first operand (accumulated in double).
Tensor lincomb(std::initializer_list<Term> terms);
// out = sum_i c_i · x_i; `out` may be one of the operands (elementwise, no aliasing hazard).
void lincomb_into(Tensor& out, std::initializer_list<Term> terms);
// x · c as a new tensor.
Tensor scaled(const Tensor& x, double c);
// Clamps every element of x to [-r, r] in place.
void clamp_inplace(Tensor& x, double r);
// Checks x is a defined f32 tensor with the numel of `like` (throws naming `what`).
void check_latent(const Tensor& x, const Tensor& like, const char* what);

// ---- Model output conversion --------------------------------------------------------------

// Variance-preserving parameterisation x_t = alpha_t · x0 + sigma_t · eps (alpha_t = sqrt(ᾱ_t),
// sigma_t = sqrt(1 - ᾱ_t)): x0 and eps from the model output (diffusers' DDIM/DPM formulas).
Tensor vp_x0(const Tensor& model_output, const Tensor& sample, double alpha_t, double sigma_t, Prediction p);
Tensor vp_eps(const Tensor& model_output, const Tensor& sample, double alpha_t, double sigma_t, Prediction p);
// Variance-exploding (k-diffusion) parameterisation x = x0 + sigma · eps, model input scaled by
// 1/sqrt(sigma² + 1): x0 ("pred_original_sample") from the model output, as Euler/Heun/LMS do.
Tensor ve_x0(const Tensor& model_output, const Tensor& sample, double sigma, Prediction p);

// ---- Schedules ------------------------------------------------------------------------------

// Rounds to float32 and back (torch/numpy float32 tensors hold these values).
inline double f32r(double v) { return double(float(v)); }

// The k-diffusion schedule of EulerDiscrete / Heun / LMS / KDPM2: timesteps by spacing, sigmas
// interpolated at them (or Karras sigmas and their fractional timesteps), then the final sigma
// (0 or sigma_min) appended. Values are float32-rounded as diffusers stores them.
struct SigmaSchedule {
  std::vector<double> timesteps;  // n values
  std::vector<double> sigmas;     // n + 1 values
};
SigmaSchedule k_sigma_schedule(const SamplerOptions& o, int steps);
// init_noise_sigma of the k-diffusion schedulers: max sigma for linspace/trailing spacing, else
// sqrt(max² + 1).
double k_init_noise_sigma(const SamplerOptions& o, const std::vector<double>& sigmas);

// ---- Step-index bookkeeping -------------------------------------------------------------------

// diffusers' _step_index / _begin_index: the step index is set on the first step() from
// begin_index (img2img) or by looking the timestep up (the second match if it appears twice), and
// advanced by one after each step.
class SchedulerBase : public Scheduler {
 public:
  const std::vector<double>& timesteps() const override { return timesteps_; }
  void set_begin_index(int index) override;

 protected:
  // Call at the start of set_timesteps: clears the step and begin indices.
  void reset_indices() { step_index_ = -1; begin_index_ = -1; }
  // diffusers' index_for_timestep over `schedule` (default: timesteps_).
  int index_for_timestep(double t, const std::vector<double>* schedule = nullptr) const;
  // diffusers' _init_step_index: sets step_index_ if it is not set yet; returns it.
  int init_step_index(double t);
  // The indices add_noise uses (begin index, current step, or timestep lookup).
  int add_noise_index(double t) const;

  std::vector<double> timesteps_;
  int step_index_ = -1;
  int begin_index_ = -1;
};

// The k-diffusion family's common parts (Euler, Euler a, Heun, LMS): sigmas, init_noise_sigma,
// input scaling x / sqrt(σ² + 1) at the current step, and add_noise x0 + σ · noise.
class SigmaSchedulerBase : public SchedulerBase {
 public:
  explicit SigmaSchedulerBase(SamplerOptions o) : o_(std::move(o)) {}
  const std::vector<double>& sigmas() const override { return sigmas_; }
  double init_noise_sigma() const override { return k_init_noise_sigma(o_, sigmas_); }
  Tensor scale_model_input(const Tensor& x, double t) override;
  Tensor add_noise(const Tensor& x0, const Tensor& noise, double t) const override;

 protected:
  SamplerOptions o_;
  std::vector<double> sigmas_;
};

// The variance-preserving family's common parts (DDIM, DDPM, PNDM, LCM): integer timesteps,
// ᾱ lookups, unscaled model input and add_noise sqrt(ᾱ_t) · x0 + sqrt(1 − ᾱ_t) · noise.
class AlphaSchedulerBase : public SchedulerBase {
 public:
  explicit AlphaSchedulerBase(SamplerOptions o) : o_(std::move(o)) {}
  Tensor scale_model_input(const Tensor& x, double t) override { return x.clone(); }
  Tensor add_noise(const Tensor& x0, const Tensor& noise, double t) const override;

 protected:
  // ᾱ at integer timestep t (checked); t < 0 gives final_alpha_cumprod (1 or ᾱ_0 per
  // set_alpha_to_one).
  double alpha_cumprod(double t) const;
  // The integer timesteps of a spacing (linspace values rounded half to even, like numpy).
  std::vector<double> integer_timesteps(int steps) const;
  SamplerOptions o_;
  int num_inference_steps_ = 0;
};

// LMS coefficient: ∫ over [σ_i, σ_{i+1}] of the Lagrange basis polynomial j through
// σ_i, σ_{i−1}, …, σ_{i−order+1} (lms.cpp).
double lms_coefficient(const std::vector<double>& sigmas, int order, int i, int j);

// ---- Factories (one per diffusers class; registry.cpp maps names to them) ------------------------

std::unique_ptr<Scheduler> make_ddim(const SamplerOptions& o);            // ddim.cpp
std::unique_ptr<Scheduler> make_ddpm(const SamplerOptions& o);            // ddim.cpp
std::unique_ptr<Scheduler> make_pndm(const SamplerOptions& o);            // pndm.cpp
std::unique_ptr<Scheduler> make_euler(bool ancestral, const SamplerOptions& o);  // euler.cpp
std::unique_ptr<Scheduler> make_heun(const SamplerOptions& o);            // euler.cpp
std::unique_ptr<Scheduler> make_lms(const SamplerOptions& o);             // lms.cpp
std::unique_ptr<Scheduler> make_lcm(const SamplerOptions& o);             // lcm.cpp
std::unique_ptr<Scheduler> make_kdpm2(bool ancestral, const SamplerOptions& o);       // kdpm2.cpp
std::unique_ptr<Scheduler> make_dpm_multistep(bool sde, const SamplerOptions& o);     // dpm_multistep.cpp
std::unique_ptr<Scheduler> make_dpm_singlestep(const SamplerOptions& o);              // dpm_singlestep.cpp
std::unique_ptr<Scheduler> make_unipc(const SamplerOptions& o);                       // unipc.cpp
std::unique_ptr<Scheduler> make_deis(const SamplerOptions& o);                        // deis.cpp

// The SamplerOptions a sampler name and schedule ("default" | "karras" | "trailing") stand for
// (registry.cpp). Throws diffuse::Error for an unknown name/schedule, or "karras" on a sampler
// without sigmas.
SamplerOptions sampler_options(const std::string& sampler, const std::string& schedule, Prediction p,
                               bool zero_terminal_snr = false);

}  // namespace diffuse
