// A1111's `parameters` text for a generated image (what A1111, ComfyUI and civitai read back).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "pipeline/generate.h"

namespace diffuse::api {

struct InfotextInputs {
  std::string prompt;      // line 1, as the user wrote it (with any <lora:…> tags)
  std::string model_hash;  // short hash ("" for folders: left out)
  std::string model_name;
  std::vector<std::pair<std::string, std::string>> lora_hashes;  // (name, hash)
  std::vector<std::pair<std::string, std::string>> ti_hashes;    // textual inversions used: (name, sha256)
  std::vector<std::string> controls;  // per ControlNet unit: "Module: …, Model: …, Weight: …"
  double hires_denoise = -1;  // the hires pass's denoising strength (< 0: no hires fix)
  std::string hires;          // "Hires upscale: …, Hires steps: …, Hires upscaler: …" ("" none)
  std::string inpaint;         // ", Mask blur: …, Inpaint area: …" (api/inpaint_request.h; "" none)
  std::string vae_name, vae_hash;  // a standalone VAE's file stem and short hash ("" the checkpoint's own)
  std::string refiner;             // "Refiner: NAME [hash], Refiner switch at: S" ("" none)
};

// The text for image `pos` (1-based) of a run with settings `p`; `seed` is the image's.
std::string infotext(const GenerateParams& p, const InfotextInputs& in, uint64_t seed, int pos);

// The other way (A1111's png-info): "Prompt", "Negative prompt" (when present), then each
// "Key: value" of the last line in order ("Steps", "Sampler", "Seed", "Size", ...); quoted values
// are unquoted. Text without a "Steps: " line is all prompt.
std::vector<std::pair<std::string, std::string>> parse_infotext(const std::string& text);

}  // namespace diffuse::api
