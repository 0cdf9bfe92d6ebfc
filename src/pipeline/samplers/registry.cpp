// Sampler names -> diffusers scheduler class + config (the configs of
// ../shared/fixtures/schedules.json), schedule variants and A1111 display names.
#include <algorithm>

#include "core/error.h"
#include "pipeline/samplers/common.h"

namespace diffuse {

namespace {

struct Entry {
  const char* name;
  const char* display;  // A1111's name in the PNG parameters
  bool has_sigmas;      // the diffusers class has use_karras_sigmas
  bool has_spacing;     // the diffusers class uses timestep_spacing (LCM lists it but ignores it)
};

const Entry kEntries[] = {
    {"ddim", "DDIM", false, true},          {"pndm", "PLMS", false, true},
    {"euler", "Euler", true, true},         {"euler_a", "Euler a", false, true},
    {"heun", "Heun", true, true},           {"lms", "LMS", true, true},
    {"dpm2", "DPM2", true, true},           {"dpm2_a", "DPM2 a", true, true},
    {"dpm++2m", "DPM++ 2M", true, true},    {"dpm++2m_sde", "DPM++ 2M SDE", true, true},
    {"dpm++2s", "DPM++ 2S", true, false},   {"unipc", "UniPC", true, true},
    {"deis", "DEIS", true, true},           {"lcm", "LCM", false, false},
    {"ddpm", "DDPM", false, true},
};

std::string joined_names() {
  std::string s;
  for (const Entry& e : kEntries) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

const Entry& find_entry(const std::string& sampler) {
  for (const Entry& e : kEntries)
    if (sampler == e.name) return e;
  fail("unknown sampler '", sampler, "' (allowed: ", joined_names(), ")");
}

}  // namespace

const std::vector<std::string>& sampler_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const Entry& e : kEntries) v.push_back(e.name);
    return v;
  }();
  return names;
}

std::string sampler_display_name(const std::string& sampler) { return find_entry(sampler).display; }

SamplerOptions sampler_options(const std::string& sampler, const std::string& schedule, Prediction p,
                               bool zero_terminal_snr) {
  const Entry& e = find_entry(sampler);
  DF_CHECK(schedule == "default" || schedule == "karras" || schedule == "trailing", "unknown schedule '", schedule,
           "' (allowed: default, karras, trailing)");
  DF_CHECK(schedule != "karras" || e.has_sigmas, "schedule 'karras' needs a sampler with sigmas; '", sampler,
           "' has none (karras works with: euler, heun, lms, dpm2, dpm2_a, dpm++2m, dpm++2m_sde, dpm++2s, unipc, deis)");
  DF_CHECK(schedule != "trailing" || e.has_spacing, "schedule 'trailing' is not available for sampler '", sampler,
           "' (its diffusers class does not use timestep_spacing)");
  SamplerOptions o;
  o.name = sampler;
  o.prediction = p;
  o.noise = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012);
  if (zero_terminal_snr) {
    o.noise.rescale_zero_terminal_snr();
    // diffusers' Euler, DPM-Solver and UniPC schedulers: ᾱ_T = 2^-24, close to 0 but not 0, so that
    // σ_max (4096) is finite; every sampler here takes it (the ᾱ-based ones then never divide by 0).
    o.noise.alphas_cumprod.back() = std::ldexp(1.0, -24);
  }
  const std::string s = sampler;
  // Per-class defaults as listed in schedules.json.
  if (s == "ddim" || s == "pndm") {
    o.timestep_spacing = "leading";
    o.steps_offset = 1;
    o.set_alpha_to_one = false;
    o.clip_sample = false;
    o.skip_prk_steps = true;
  } else if (s == "euler" || s == "euler_a") {
    o.timestep_spacing = "linspace";
    o.steps_offset = 1;  // (no effect with linspace spacing)
  } else if (s == "lcm") {
    o.timestep_spacing = "leading";
    o.original_inference_steps = 50;
    o.timestep_scaling = 10.0;
    o.set_alpha_to_one = false;
  } else if (s == "ddpm") {
    o.timestep_spacing = "leading";
    o.variance_type = "fixed_small";
    o.clip_sample = true;
    o.clip_sample_range = 1.0;
  } else if (s == "dpm++2m" || s == "dpm++2m_sde" || s == "dpm++2s") {
    o.solver_order = 2;
    o.algorithm_type = s == "dpm++2m_sde" ? "sde-dpmsolver++" : "dpmsolver++";
    o.solver_type = "midpoint";
    o.lower_order_final = true;
  } else if (s == "unipc") {
    o.solver_order = 2;
    o.solver_type = "bh2";
    o.predict_x0 = true;
  } else if (s == "deis") {
    o.solver_order = 2;
    o.algorithm_type = "deis";
    o.solver_type = "logrho";
  }
  if (schedule == "karras") o.use_karras_sigmas = true;
  if (schedule == "trailing") {
    o.timestep_spacing = "trailing";
    o.steps_offset = 0;
  }
  return o;
}

std::unique_ptr<Scheduler> make_scheduler(const std::string& sampler, const std::string& schedule, Prediction p,
                                          bool zero_terminal_snr) {
  const SamplerOptions o = sampler_options(sampler, schedule, p, zero_terminal_snr);
  const std::string& s = sampler;
  if (s == "ddim") return make_ddim(o);
  if (s == "pndm") return make_pndm(o);
  if (s == "euler") return make_euler(false, o);
  if (s == "euler_a") return make_euler(true, o);
  if (s == "heun") return make_heun(o);
  if (s == "lms") return make_lms(o);
  if (s == "dpm2") return make_kdpm2(false, o);
  if (s == "dpm2_a") return make_kdpm2(true, o);
  if (s == "dpm++2m") return make_dpm_multistep(false, o);
  if (s == "dpm++2m_sde") return make_dpm_multistep(true, o);
  if (s == "dpm++2s") return make_dpm_singlestep(o);
  if (s == "unipc") return make_unipc(o);
  if (s == "deis") return make_deis(o);
  if (s == "lcm") return make_lcm(o);
  if (s == "ddpm") return make_ddpm(o);
  fail("unknown sampler '", sampler, "' (allowed: ", joined_names(), ")");
}

}  // namespace diffuse
