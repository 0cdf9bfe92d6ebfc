// A whole Stable Diffusion checkpoint: family detection, the layout's name mapping, configs from
// the tensors (single files carry none), and the text encoder(s), UNet and VAE bound strictly.
#pragma once
#include <map>
#include <memory>
#include <set>
#include <string>

#include "models/clip_text.h"
#include "models/family.h"
#include "models/unet.h"
#include "models/vae.h"

namespace diffuse {

struct SDLoadOptions {
  bool text_encoders = true;
  bool unet = true;
  bool vae_encoder = true;
  bool vae_decoder = true;
  bool vae_training = false;  // the VAE loaded for VAE::forward_train (both parts)
  // A standalone VAE file (models/name_map.h vae_file_weights) bound instead of the checkpoint's
  // ("" = the checkpoint's own).
  std::string vae_path;
  // A UNet-only file (models/name_map.h unet_file_weights) bound instead of the checkpoint's; it
  // must fit the checkpoint's text encoders (context width, SDXL's added embedding).
  std::string unet_path;
};

// The size a checkpoint says it was trained at: single files' `modelspec.resolution` metadata
// ("WIDTHxHEIGHT", e.g. "512x768", as model-spec files and `diffuse train full` write it), each
// side a positive multiple of 8 up to kMaxImageSide. Optional metadata: an invalid value is not an
// error; `problem` says why it was ignored ("<path>: modelspec.resolution \"...\" ...").
struct DeclaredResolution {
  int width = 0, height = 0;  // 0: none (absent or invalid)
  std::string problem;        // "" when absent or valid
};
DeclaredResolution declared_resolution(const TensorFile& f);
// "WIDTHxHEIGHT" (surrounding blanks allowed) -> its two numbers; false when it is not that form or a
// side is not a positive multiple of 8 up to kMaxImageSide.
bool parse_declared_resolution(const std::string& v, int* width, int* height);

// The prediction type a model declares: "v" or "epsilon" from its `modelspec.prediction_type`
// metadata (model-spec files and `diffuse train full` write it; "v_prediction" read as "v") or else
// from its diffusers scheduler config's prediction_type (embedded in a single file, or a folder's
// scheduler/scheduler_config.json, which open_model_file keeps under the same metadata key); ""
// when it declares none (or something else: optional metadata, as the resolution).
std::string declared_prediction(const TensorFile& f);
// Whether a model declares a zero-terminal-SNR schedule: kohya's `ss_zero_terminal_snr` "True"
// (diffuse's trainers write it) or its scheduler config's rescale_betas_zero_snr (as above).
bool declared_zero_snr(const TensorFile& f);

// The base (file) weights of component `c` as the model bound them: the checkpoint's, or for the
// UNet the --unet file's (LoRA merges read them again). `files` keeps the opened files by path.
WeightStore base_component_weights(const struct SDModel& m, Component c, std::map<std::string, TensorFile>& files);

struct SDModel {
  std::string path;
  std::string unet_path;  // the UNet's own file when it came from SDLoadOptions::unet_path ("" = path)
  Family family = Family::Unknown;
  DeclaredResolution declared;  // the file's modelspec.resolution (the engine's default size when valid)
  std::string declared_prediction;  // declared_prediction(file): "v", "epsilon" or ""
  bool declared_zero_snr = false;   // declared_zero_snr(file)
  ModelSummary summary;
  ClipTextConfig te_cfg, te2_cfg;  // te2: SDXL's OpenCLIP bigG encoder (the refiner's only one: te unloaded)
  bool refiner = false;            // an SDXL refiner (summary.refiner): te2 only, 5 time ids
  UNetConfig unet_cfg;
  VAEConfig vae_cfg;
  ClipTextModel te, te2;
  bool has_te2 = false;
  UNet unet;
  VAE vae;
  // Components whose prepared weights currently include merged LoRA deltas (models/lora.h), and
  // which weights ("<module>.weight"), so that apply_loras() can put exactly those back to the
  // base weights.
  struct LoraMerged {
    bool te = false, te2 = false, unet = false;
    std::set<std::string> te_names, te2_names, unet_names;
  } lora_merged;

  // Frees the text encoders' weights once the prompts are encoded (a one-shot run; a server keeps
  // them). Generating again needs a new load (or apply_loras, which rebuilds them).
  void release_text_encoders();

  // Loads `path` (single file or diffusers folder) for backend `be`. Throws diffuse::Error naming
  // the file when the family cannot be detected or any component fails to bind.
  static std::unique_ptr<SDModel> load(const std::string& path, Backend& be, const SDLoadOptions& opts = {});
};

}  // namespace diffuse
