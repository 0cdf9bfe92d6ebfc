// A1111's sampler and scheduler names → diffuse's samplers and schedules, and the lists
// /sdapi/v1/samplers and /sdapi/v1/schedulers answer. One table each; the parse target links
// only core + io, so the facts this needs from pipeline/samplers/registry.cpp (which names exist,
// which take karras / trailing) are restated here, and the engine checks them again at run time.
#include <string_view>

#include "server/request.h"

namespace diffuse::server {

namespace {

using json = nlohmann::json;

struct SamplerEntry {
  const char* name;        // diffuse's sampler
  const char* a1111;       // A1111's display name
  const char* aliases[3];  // A1111's aliases (k-diffusion names), then other names clients send
  // The schedule A1111 1.9+ gives the sampler under its default "Automatic" scheduler: its
  // modules/sd_samplers_kdiffusion.py sets options {'scheduler': 'karras'} on DPM++ 2M, DPM++ SDE,
  // DPM++ 2S a, DPM2, DPM2 a and Restart, and 'exponential' on DPM++ 2M SDE (diffuse has no
  // exponential schedule: default); the others use the model's own (uniform) sigmas.
  const char* automatic;
  bool karras, trailing;  // registry.cpp's has_sigmas / has_spacing
};

// A1111's order: /sdapi/v1/samplers lists its default (DPM++ 2M, since 1.9) first.
const SamplerEntry kSamplers[] = {
    {"dpm++2m", "DPM++ 2M", {"k_dpmpp_2m"}, "karras", true, true},
    {"dpm++2m_sde", "DPM++ 2M SDE", {"k_dpmpp_2m_sde"}, "default", true, true},
    // A1111's DPM++ 2S a is ancestral (k-diffusion's sample_dpmpp_2s_ancestral); diffuse's closest
    // is dpm++2s, diffusers' DPMSolverSinglestepScheduler (not ancestral), which writes "DPM++ 2S"
    // into the PNG parameters.
    {"dpm++2s", "DPM++ 2S a", {"k_dpmpp_2s_a", "DPM++ 2S"}, "karras", true, false},
    {"euler_a", "Euler a", {"k_euler_a", "k_euler_ancestral"}, "default", false, true},
    {"euler", "Euler", {"k_euler"}, "default", true, true},
    {"lms", "LMS", {"k_lms"}, "default", true, true},
    {"heun", "Heun", {"k_heun"}, "default", true, true},
    {"dpm2", "DPM2", {"k_dpm_2"}, "karras", true, true},
    {"dpm2_a", "DPM2 a", {"k_dpm_2_a"}, "karras", true, true},
    {"deis", "DEIS", {"deis"}, "default", true, true},
    {"ddim", "DDIM", {"ddim"}, "default", false, true},
    {"pndm", "PLMS", {"plms"}, "default", false, true},
    {"unipc", "UniPC", {"unipc"}, "default", true, true},
    {"lcm", "LCM", {"k_lcm"}, "default", false, false},
    {"ddpm", "DDPM", {"ddpm"}, "default", false, true},
};

struct SchedulerEntry {
  const char* name;     // A1111's name
  const char* label;    // A1111's label
  const char* alias;    // A1111's alias (nullptr none)
  const char* diffuse;  // "" none (automatic: the sampler's own; else diffuse has no equivalent)
  double default_rho;
  bool need_inner_model;
};

// A1111's modules/sd_schedulers.py. Only those with a diffuse equivalent (and automatic) are listed
// by /sdapi/v1/schedulers; the rest are known so that legacy names ("DPM++ 2M SDE Exponential")
// split and so that asking for them falls back with a warning.
const SchedulerEntry kSchedulers[] = {
    {"automatic", "Automatic", nullptr, "", -1, false},
    {"uniform", "Uniform", nullptr, "default", -1, true},
    {"karras", "Karras", nullptr, "karras", 7.0, false},
    {"exponential", "Exponential", nullptr, "", -1, false},
    {"polyexponential", "Polyexponential", nullptr, "", 1.0, false},
    {"sgm_uniform", "SGM Uniform", "SGMUniform", "trailing", -1, true},
    {"kl_optimal", "KL Optimal", nullptr, "", -1, false},
    {"align_your_steps", "Align Your Steps", nullptr, "", -1, false},
    {"simple", "Simple", nullptr, "", -1, true},
    {"normal", "Normal", nullptr, "", -1, true},
    {"ddim", "DDIM", nullptr, "", -1, true},
    {"beta", "Beta", nullptr, "", -1, true},
};

bool listed(const SchedulerEntry& e) { return *e.diffuse || std::string_view(e.name) == "automatic"; }

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() > suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Exact match of a name_key on diffuse's name, A1111's display name or an alias.
const SamplerEntry* find_sampler(const std::string& key) {
  for (const SamplerEntry& e : kSamplers) {
    if (key == e.name || key == name_key(e.a1111)) return &e;
    for (const char* a : e.aliases)
      if (a && key == name_key(a)) return &e;
  }
  return nullptr;
}

const SchedulerEntry* find_scheduler(const std::string& key) {
  for (const SchedulerEntry& e : kSchedulers)
    if (key == e.name || key == name_key(e.label) || (e.alias && key == name_key(e.alias))) return &e;
  return nullptr;
}

SamplerChoice choice(const SamplerEntry& e, std::string schedule) {
  return {e.name, std::move(schedule), e.automatic, e.karras, e.trailing};
}

}  // namespace

SamplerChoice map_a1111_sampler(const std::string& name) {
  const std::string n = name_key(name);
  if (const SamplerEntry* e = find_sampler(n)) return choice(*e, "");
  // Legacy combined names: "DPM++ 2M Karras" (any scheduler label as a suffix, as A1111 1.9+
  // splits them) and k-diffusion's "k_dpmpp_2m_ka".
  for (const SchedulerEntry& s : kSchedulers) {
    for (const char* label : {s.label, s.alias}) {
      if (!label) continue;
      std::string suffix(1, ' ');
      suffix += name_key(label);
      if (!ends_with(n, suffix)) continue;
      if (const SamplerEntry* e = find_sampler(name_key(n.substr(0, n.size() - suffix.size()))))
        return choice(*e, s.diffuse);
    }
  }
  if (ends_with(n, "_ka"))
    if (const SamplerEntry* e = find_sampler(n.substr(0, n.size() - 3))) return choice(*e, "karras");
  return {};
}

std::string map_a1111_scheduler(const std::string& name) {
  const std::string n = name_key(name);
  if (n == "default" || n == "trailing") return n;  // diffuse's own names
  const SchedulerEntry* e = find_scheduler(n);
  return e ? e->diffuse : "";
}

bool is_a1111_automatic(const std::string& scheduler) {
  const std::string n = name_key(scheduler);
  return n.empty() || n == "automatic";
}

json a1111_sampler_list() {
  json list = json::array();
  for (const SamplerEntry& e : kSamplers) {
    // A1111's aliases, then diffuse's name (which a client may send as well) unless one of them.
    json aliases = json::array();
    bool has_own = false;
    for (const char* a : e.aliases) {
      if (!a) continue;
      aliases.push_back(a);
      has_own = has_own || name_key(a) == e.name;
    }
    if (!has_own) aliases.push_back(e.name);
    list.push_back({{"name", e.a1111}, {"aliases", aliases}, {"options", json::object()}});
  }
  return list;
}

json a1111_scheduler_list() {
  json list = json::array();
  for (const SchedulerEntry& e : kSchedulers) {
    if (!listed(e)) continue;
    list.push_back({{"name", e.name},
                    {"label", e.label},
                    {"aliases", e.alias ? json::array({e.alias}) : json(nullptr)},
                    {"default_rho", e.default_rho},
                    {"need_inner_model", e.need_inner_model}});
  }
  return list;
}

}  // namespace diffuse::server
