// Random-weight checkpoints with the real tensor layouts of SD 1.5, SD 2.1 and SDXL, written from
// the layout manifests (tests/data/manifests/*.tsv, copies of shared/manifests/): for benchmarks
// and for checking that every real tensor binds, on machines that cannot download real weights.
//
// A manifest is a TSV file with the header `layout component name shape` and one row per tensor of
// the real model, in both layouts: "ldm" (the original single file) and "diffusers" (one folder per
// component). Shapes are written "320x4x3x3"; an empty shape is a scalar. Beside NAME.tsv,
// NAME.config.json holds the diffusers configs of the components ({"unet": {...}, "vae": ...}).
//
// Values are deterministic in (seed, tensor name, element index) and sane for inference, so that
// activations neither explode nor vanish through the real depth:
//   rank >= 2 weights       N(0, 1/fan_in), fan_in = product of all dims but the first
//   token/position embeddings N(0, 0.02^2)
//   rank-1 "...bias"        N(0, 0.01^2)
//   other rank-1 tensors    1 (every 1-D weight of these models is a norm scale: "norm1.weight",
//                           "ln_final.weight", and ldm's unnamed GroupNorms "in_layers.0.weight")
//   scalars                 1
// Normals are approximated by the sum of four uniforms (Irwin-Hall, bounded at 3.46 sigma) drawn
// from a counter-based splitmix64 stream, so any chunk of a tensor can be generated on its own and
// writing streams tensor by tensor through a small reused buffer (peak memory a few MB even for
// SDXL's 3.5 B parameters).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace diffuse {

struct ManifestRow {
  std::string layout;     // "diffusers" or "ldm"
  std::string component;  // "unet", "vae", "text_encoder", "text_encoder_2"
  std::string name;       // tensor name in that layout (diffusers: without the "<component>/" prefix)
  Shape shape;
  bool zero_init = false;  // all zeros instead of the table below (a module trained from zero)
};

// Parses a manifest; throws diffuse::Error naming the file and line of the first problem (bad
// header, field count, layout, shape, duplicate name).
std::vector<ManifestRow> read_manifest(const std::string& path);

// The manifest a name means: "sd15", "sd21", "sdxl" are looked up as NAME.tsv in `dirs` (first hit
// wins); anything ending in ".tsv" or containing '/' is a path. Throws naming what was searched.
std::string find_manifest(const std::string& name_or_path, const std::vector<std::string>& dirs);
// NAME.config.json beside NAME.tsv, or "" if there is none.
std::string manifest_config_path(const std::string& tsv_path);

// Which distribution a tensor's values come from (see the table above).
struct SyntheticInit {
  enum Kind { Ones, Bias, Embedding, FanIn } kind;
  float std;  // 0 for Ones
};
SyntheticInit synthetic_init(const std::string& name, const Shape& shape);

// Elements [begin, begin + count) of the tensor `name` (shape `shape`) for `seed`, as f32.
// Independent of how a tensor is split into chunks.
void synthetic_fill(const std::string& name, const Shape& shape, uint64_t seed, int64_t begin, int64_t count,
                    float* out);

struct SynthStats {
  int64_t tensors = 0;
  int64_t parameters = 0;
  uint64_t bytes = 0;  // tensor data written (headers and JSON files not counted)
};

// Writes the rows of `layout` as a checkpoint at out_path:
//   "ldm"       one .safetensors file with the ldm names (metadata notes it is synthetic, plus
//               extra_metadata);
//   "diffusers" a folder: model_index.json (StableDiffusionPipeline, or StableDiffusionXLPipeline
//               when a text_encoder_2 is present), per component a config.json (from the
//               component's entry in the JSON file at config_path where given, plus the class
//               fields diffusers/transformers expect) and diffusion_pytorch_model.safetensors
//               (unet, vae) or model.safetensors (text encoders), tokenizer(_2)/ (the built-in
//               CLIP vocabulary as vocab.json + merges.txt, with the family's pad token) and
//               scheduler/scheduler_config.json (PNDM for SD 1.x, DDIM v-prediction for SD 2.x
//               768-v, Euler for SDXL).
// Files are written atomically (".tmp" then rename). `progress` prints to stderr.
SynthStats write_synthetic_checkpoint(const std::vector<ManifestRow>& rows, const std::string& layout,
                                      const std::string& out_path, DType dtype = DType::F16, uint64_t seed = 0,
                                      const std::string& config_path = "", bool progress = false,
                                      const std::map<std::string, std::string>& extra_metadata = {});

}  // namespace diffuse
