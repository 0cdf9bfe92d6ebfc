// TAESD, madebyollin's Tiny AutoEncoder for Stable Diffusion: a ~1.2 M-parameter decoder (and
// encoder) of plain 3×3 convolutions, ReLUs and nearest 2× upsampling that reads and writes the
// same latent space as the SD VAE, for full-size live previews at a fraction of the VAE's cost.
//
// Network (64 channels throughout; Block(x) = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)):
//   decoder: 3·tanh(z/3), conv(4→64), ReLU, 3 × [3 Blocks, upsample 2× nearest, conv (no bias)],
//            Block, conv(64→3) -> about [0, 1] (not clamped here);
//   encoder: conv(3→64), Block, 3 × [conv stride 2 (no bias), 3 Blocks], conv(64→4).
// The latent is the one the UNet works in (what the sampler holds, NOT divided by the VAE's
// scaling factor): TAESD was distilled on scaled latents, and diffusers' AutoencoderTiny says so
// with scaling_factor 1.0. Images are in [0, 1] (diffusers maps them to and from [-1, 1]).
//
// Weight files, bound strictly by their published names and shapes:
//  - madebyollin's originals: taesd_decoder.{pth,safetensors} (SD 1.x/2.x), taesdxl_decoder.*
//    (SDXL) and the *_encoder.* files; an nn.Sequential state dict, so names are layer indices:
//    decoder "1.weight" [64, 4, 3, 3] (index 0 is the tanh clamp), "3.conv.0.weight", "3.conv.2.weight",
//    "3.conv.4.weight", … "7.weight" (upsampling conv, no bias), … "19.weight" [3, 64, 3, 3];
//    encoder "0.weight" [64, 3, 3, 3], "1.conv.0.weight", "2.weight" (stride 2, no bias), … "14.weight".
//  - diffusers AutoencoderTiny (madebyollin/taesd, madebyollin/taesdxl on Hugging Face: a folder
//    with config.json + diffusion_pytorch_model.safetensors, or that file alone): "decoder.layers.N…"
//    (the original decoder index minus one: no clamp module) and "encoder.layers.N…" (same indices).
// SD and SDXL versions have the same architecture and names; only the weights differ, so a file
// cannot say which family it was trained for: only its name (taesd_ vs taesdxl_) tells.
#pragma once
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "io/tensor_file.h"
#include "models/family.h"
#include "nn/layers.h"
#include "nn/weights.h"

namespace diffuse {

class TAESD {
 public:
  TAESD();
  ~TAESD();
  TAESD(TAESD&&) noexcept;
  TAESD& operator=(TAESD&&) noexcept;

  // Binds what `f` holds, strictly (every tensor used, every name and shape as published):
  // an original decoder or encoder file, or a diffusers AutoencoderTiny (folder or file) with a
  // decoder and/or an encoder. A file of another kind (a full VAE, a UNet, a TAESD for another
  // latent space such as SD3's or FLUX's 16 channels) throws diffuse::Error naming the file and
  // what was expected.
  void load(Backend& be, const TensorFile& f);
  bool has_decoder() const;
  bool has_encoder() const;
  const std::string& origin() const { return origin_; }  // the file it was loaded from
  const std::string& layout() const { return layout_; }  // "taesd" or "diffusers AutoencoderTiny"

  // z: [B, h, w, 4] latent in the UNet's space (f32 or bf16) -> [B, 8h, 8w, 3] image, about [0, 1]
  // (unclamped), in c's arena. Activations are bf16 when the backend computes in bf16.
  Tensor decode(Ctx& c, const Tensor& z) const;
  // image: [B, H, W, 3] in [0, 1] (f32 or bf16), H and W multiples of 8 -> [B, H/8, W/8, 4] latent
  // in the UNet's space, in c's arena.
  Tensor encode(Ctx& c, const Tensor& image) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  std::string origin_, layout_;
};

// --taesd DIR|FILE: the file (or diffusers folder) to load for a model of `family`. A FILE is
// itself. A DIR: for SDXL taesdxl_decoder.{safetensors,pth}, otherwise taesd_decoder.*; else the
// DIR itself when it is a diffusers AutoencoderTiny folder (config.json + weights). Throws naming
// the folder and the names it looked for when none is there.
std::string resolve_taesd_path(const std::string& path, Family family);

// A warning (empty if none) when the file's own name says it is for the other family: "taesdxl"
// in the name of a file used with SD 1.x/2.x, or "taesd_"/"taesd." without "xl" with SDXL.
std::string taesd_family_warning(const std::string& path, Family family);

// resolve_taesd_path + open + load; throws unless the result has a decoder.
TAESD load_taesd_decoder(Backend& be, const std::string& path, Family family);

}  // namespace diffuse
