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
  if (p.init) s += ", Denoising strength: " + num(p.strength);
  if (p.clip_skip > 1) s += ", Clip skip: " + std::to_string(p.clip_skip);
  if (p.rng == RngKind::Cpu) s += ", RNG: CPU";
  if (p.batch > 1) s += ", Batch size: " + std::to_string(p.batch) + ", Batch pos: " + std::to_string(pos);
  if (!in.lora_hashes.empty()) s += ", Lora hashes: " + format_lora_hashes(in.lora_hashes);
  if (!in.control.empty()) s += ", ControlNet 0: \"" + in.control + "\"";
  s += ", Version: diffuse " DIFFUSE_VERSION;
  return s;
}

}  // namespace diffuse::api
