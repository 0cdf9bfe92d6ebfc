#include "api/infotext.h"

#include <cstdio>

#include "models/lora.h"

#ifndef DIFFUSE_VERSION
#define DIFFUSE_VERSION "0.1.0"
#endif

namespace diffuse::api {

namespace {

std::string num(double v) {  // 7 -> "7", 7.5 -> "7.5"
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string schedule_display(const std::string& s) {
  if (s == "karras") return "Karras";
  if (s == "trailing") return "SGM Uniform";
  return "";
}

}  // namespace

std::string infotext(const GenerateParams& p, const InfotextInputs& in, uint64_t seed, int pos) {
  std::string s = in.prompt;
  if (!p.negative.empty()) s += "\nNegative prompt: " + p.negative;
  s += "\nSteps: " + std::to_string(p.steps) + ", Sampler: " + sampler_display_name(p.sampler);
  std::string st = schedule_display(p.schedule);
  if (!st.empty()) s += ", Schedule type: " + st;
  s += ", CFG scale: " + num(p.cfg) + ", Seed: " + std::to_string(seed);
  s += ", Size: " + std::to_string(p.width) + "x" + std::to_string(p.height);
  if (!in.model_hash.empty()) s += ", Model hash: " + in.model_hash;
  s += ", Model: " + in.model_name;
  if (!in.vae_hash.empty()) s += ", VAE hash: " + in.vae_hash;
  if (!in.vae_name.empty()) s += ", VAE: " + in.vae_name;
  if (p.subseed_strength > 0)  // image pos uses subseed + pos - 1, as A1111's all_subseeds
    s += ", Variation seed: " + std::to_string(p.subseed + uint64_t(pos - 1)) +
         ", Variation seed strength: " + num(p.subseed_strength);
  if (p.init) s += ", Denoising strength: " + num(p.strength);
  if (in.hires_denoise >= 0) s += ", Denoising strength: " + num(in.hires_denoise);
  if (p.clip_skip > 1) s += ", Clip skip: " + std::to_string(p.clip_skip);
  s += in.inpaint;  // A1111's extra_generation_params come after the fixed entries
  if (!in.hires.empty()) s += ", " + in.hires;
  if (!in.refiner.empty()) s += ", " + in.refiner;
  if (p.rng == RngKind::Cpu) s += ", RNG: CPU";
  if (p.batch > 1) s += ", Batch size: " + std::to_string(p.batch) + ", Batch pos: " + std::to_string(pos);
  if (!in.lora_hashes.empty()) s += ", Lora hashes: " + format_lora_hashes(in.lora_hashes);
  if (!in.ti_hashes.empty()) s += ", TI hashes: " + format_lora_hashes(in.ti_hashes);  // A1111's same "name: hash12" list
  for (size_t i = 0; i < in.controls.size(); ++i)
    s += ", ControlNet " + std::to_string(i) + ": \"" + in.controls[i] + "\"";
  s += ", Version: diffuse " DIFFUSE_VERSION;
  return s;
}

}  // namespace diffuse::api

namespace diffuse::api {

namespace {

// One "Key: value" list (A1111's last infotext line): keys start with a word character and run
// to ": "; a value is a JSON-style quoted string or everything up to the next comma.
std::vector<std::pair<std::string, std::string>> parse_params_line(const std::string& s) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && (s[i] == ' ' || s[i] == ',')) ++i;
    const size_t colon = s.find(':', i);
    if (colon == std::string::npos) break;
    std::string key = s.substr(i, colon - i);
    i = colon + 1;
    while (i < s.size() && s[i] == ' ') ++i;
    std::string value;
    if (i < s.size() && s[i] == '"') {
      for (++i; i < s.size() && s[i] != '"'; ++i) {
        if (s[i] == '\\' && i + 1 < s.size()) {
          ++i;
          value += s[i] == 'n' ? '\n' : s[i];
        } else {
          value += s[i];
        }
      }
      ++i;  // the closing quote
      const size_t comma = s.find(',', i);
      i = comma == std::string::npos ? s.size() : comma + 1;
    } else {
      const size_t comma = s.find(',', i);
      value = s.substr(i, (comma == std::string::npos ? s.size() : comma) - i);
      i = comma == std::string::npos ? s.size() : comma + 1;
    }
    while (!value.empty() && value.back() == ' ') value.pop_back();
    out.emplace_back(std::move(key), std::move(value));
  }
  return out;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> parse_infotext(const std::string& text) {
  std::vector<std::string> lines;
  for (size_t b = 0;;) {
    const size_t e = text.find('\n', b);
    lines.push_back(text.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) break;
    b = e + 1;
  }
  std::vector<std::pair<std::string, std::string>> params;
  if (lines.size() > 1 && lines.back().rfind("Steps: ", 0) == 0) {
    params = parse_params_line(lines.back());
    lines.pop_back();
  }
  std::string prompt, negative;
  bool in_negative = false;
  for (size_t k = 0; k < lines.size(); ++k) {
    const std::string& l = lines[k];
    if (!in_negative && l.rfind("Negative prompt: ", 0) == 0) {
      in_negative = true;
      negative = l.substr(17);
    } else if (in_negative) {
      negative += "\n" + l;
    } else {
      prompt += (k ? "\n" : "") + l;
    }
  }
  std::vector<std::pair<std::string, std::string>> out;
  out.emplace_back("Prompt", prompt);
  if (in_negative) out.emplace_back("Negative prompt", negative);
  out.insert(out.end(), params.begin(), params.end());
  return out;
}

}  // namespace diffuse::api
