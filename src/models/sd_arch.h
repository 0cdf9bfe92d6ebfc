// The tensors of an SD 1.x-architecture model at any widths, in the original single-file (ldm)
// layout: what `diffuse synth --arch` writes as the starting point of a model trained from
// scratch (the demo model, `make demo-model`). The loader detects such a file as SD 1.x like any
// other (names decide the family; widths, levels and depths come from the shapes).
//
// Fixed by the SD 1.x conventions the loader assumes for a single file: the text encoder is CLIP
// with quick_gelu and head dim 64 (heads = width / 64), the UNet's transformers have 8 heads and
// 1×1-conv proj_in/out, GroupNorms have 32 groups (every width a multiple of 32), the VAE has one
// attention layer in each mid block and 4 latent channels by default.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "models/synthetic.h"

namespace diffuse {

struct SdArch {
  // UNet (UNet2DConditionModel): widths per level, cross-attention per level, resnets per down level
  // (up levels: one more), transformer depth.
  // The demo model's: its latents are 16×16 (a 3-level VAE), so cross-attention runs at 8×8 and 4×4
  // (levels 1 and 2) and in the mid block (2×2); at 16×16 it would cost more than the rest of the
  // UNet together. The fourth level (2×2) gives every latent pixel a view of the whole image, which
  // placing a shape where the prompt says needs (three levels at 64/96/96 left position at chance).
  std::vector<int> unet_channels = {64, 64, 64, 96};
  std::vector<bool> unet_attention = {false, true, true, false};
  int unet_layers = 1;
  int unet_depth = 1;
  // VAE (AutoencoderKL): widths per level (the image shrinks 2^(levels-1) times), resnets per encoder level.
  // The demo model's three levels shrink its 64×64 images 4 times (SD's four levels: 8 times), to 16×16×4
  // latents: small shapes keep their outlines (at ×8 a small shape is two latent pixels wide).
  std::vector<int> vae_channels = {32, 64, 64};
  int vae_layers = 1;
  int latent_channels = 4;
  // Text encoder (CLIPTextModel): width (a multiple of 64), layers, MLP width, vocabulary, positions.
  int text_width = 64;
  int text_layers = 4;
  int text_intermediate = 256;
  int vocab = 49408;
  int positions = 77;
  // Native image size (written as the file's modelspec.resolution).
  int resolution = 64;

  // Throws diffuse::Error naming the first field that is out of range.
  void validate() const;
  // From a JSON object with any of the fields above (names as here); throws naming `origin` and
  // the field. Missing fields keep their defaults.
  static SdArch from_json(const std::string& text, const std::string& origin);
  std::string to_json() const;
};

// The ldm-layout rows (layout "ldm", components "unet", "vae", "text_encoder") of every tensor of
// a model with this architecture. Rows whose module the original code zero-initialises (ldm's
// zero_module: each UNet resnet's last conv, each transformer's proj_out, the UNet's output conv)
// have zero_init set.
std::vector<ManifestRow> sd1_ldm_rows(const SdArch& a);

// Growing a trained model into a larger architecture (`diffuse synth --arch A --from FILE`): writes
// the architecture's single-file checkpoint at out_path (as write_synthetic_checkpoint, dtype, seed,
// metadata) with every tensor that `from` (an ldm-layout file) holds under the same name and shape
// copied from it, converted to dtype; the others are initialised as for training from scratch. With
// ldm's zero-initialised output layers (each transformer's proj_out, each resnet's last conv), a
// module added this way starts as the identity, so the grown model computes what `from` computed
// until training changes it. Throws naming `from` if it shares no tensor with the architecture.
struct GrowStats {
  int64_t copied = 0;       // tensors taken from `from`
  int64_t initialised = 0;  // tensors `from` lacks (new modules)
  std::vector<std::string> reshaped;  // names `from` has with another shape (initialised too)
  int64_t unused = 0;       // tensors of `from` the architecture has no place for
};
GrowStats write_grown_checkpoint(const SdArch& a, const std::string& from, const std::string& out_path, DType dtype,
                                 uint64_t seed, const std::map<std::string, std::string>& metadata);

}  // namespace diffuse
