// A1111's "hires fix": txt2img at the base size, an upscale, then img2img at the larger size.
//
//   pass 1   txt2img at width × height (everything GenerateParams says)
//   upscale  latent upscalers: the latent interpolated to the target size / 8 as A1111's "Latent"
//            modes do (torch.nn.functional.interpolate: bilinear, bicubic, nearest, nearest-exact;
//            align_corners off); image upscalers: the decoded image resized (Lanczos, nearest) or
//            run through an ESRGAN model (models/rrdbnet.h) to the target size, encoded again
//            by the VAE in pass 2
//   pass 2   img2img of each image at the target size with the same prompt, guidance and seed
//            (the image's own seed: seed + i for the CUDA generator), A1111's step rule for this
//            pass: a schedule of int(hires_steps / min(denoise, 0.999)) steps of which the last
//            hires_steps run (hires_steps 0: the first pass's steps)
// The target is the base size × scale, or an explicit size (one side given: the other keeps the
// aspect ratio, as A1111), floored to a multiple of 8.
// Progress (Stage::Denoise) counts both passes' model evaluations as one run; previews and
// on_result see pass 2's images (index = position in the batch).
#pragma once
#include <string>

#include "pipeline/generate.h"

namespace diffuse {

class RRDBNet;

enum class LatentResize { Bilinear, Bicubic, Nearest, NearestExact };

struct HiresParams {
  double scale = 2.0;            // target = base size × scale (unless width/height are given)
  int width = 0, height = 0;     // explicit target ("Hires resize"); 0: from scale
  int steps = 0;                 // pass-2 steps; 0: the first pass's
  double denoise = 0.7;          // pass-2 denoising strength, (0, 1]
  // "latent", "latent-antialiased", "latent-bicubic", "latent-bicubic-antialiased", "latent-nearest",
  // "latent-nearest-exact", "lanczos", "nearest", or "esrgan" (with `esrgan` set).
  std::string upscaler = "latent";
  RRDBNet* esrgan = nullptr;  // its scratch is released after each upscale (before the second pass)
};

// A1111's name of an upscaler ("Latent", "Latent (nearest-exact)", "Lanczos"); an ESRGAN model is
// named by `esrgan_name` (its file stem).
std::string hires_upscaler_display(const std::string& upscaler, const std::string& esrgan_name);
// Throws diffuse::Error naming --hires-upscaler for a name not listed above.
void check_hires_upscaler(const std::string& upscaler);
// The pass-2 size for a base size (multiples of 8).
void hires_target(const HiresParams& h, int base_w, int base_h, int* w, int* h_out);

// x: f32 [B, h, w, C] NHWC -> [B, oh, ow, C], torch.nn.functional.interpolate semantics
// (align_corners=False; bicubic with A = -0.75 and clamped borders).
Tensor resize_latent(const Tensor& x, int oh, int ow, LatentResize mode);

// Runs both passes. p must be txt2img (no init, mask). Throws as generate() does, and
// diffuse::Error naming the --hires-* flag for bad settings.
std::vector<Result> generate_hires(const SDModel& model, Backend& be, const GenerateParams& p, const HiresParams& h,
                                   const ProgressFn& progress = {}, Workspace* ws = nullptr);

}  // namespace diffuse
