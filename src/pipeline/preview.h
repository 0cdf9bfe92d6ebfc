// Live previews: a cheap latent → RGB approximation (a per-family linear map of the 4 latent
// channels, the factors A1111's "Approx cheap" and ComfyUI's latent2rgb use), one image of the
// batch at the latent's own size (1/8 of the output). The server's progress `current_image` and
// `generate --preview-every` use this one implementation. With a TAESD (models/taesd.h), a
// full-size preview from the tiny autoencoder's decoder instead (A1111's and ComfyUI's "TAESD").
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"
#include "core/tensor.h"
#include "io/image.h"
#include "models/family.h"
#include "models/taesd.h"

namespace diffuse {

// latent: f32 [B, h, w, 4] NHWC in the model's latent space (what the sampler holds, before
// dividing by the VAE scaling factor); index < B. Returns 8-bit RGB h × w.
Image latent_preview(const Tensor& latent, int index, Family family);

// The same latent decoded by a TAESD decoder (loaded for the model's family): 8-bit RGB
// 8h × 8w, the decoder's [0, 1] output clamped and rounded. Runs on `be` (f32 activations, or
// bf16 where be computes in bf16); the TAESD decodes one preview at a time.
Image taesd_preview(const TAESD& taesd, Backend& be, const Tensor& latent, int index);

// A TAESD decoder with a backend of its own, for a run's or a server's previews (one at a time).
struct TaesdPreviewer {
  std::unique_ptr<Backend> be;
  TAESD taesd;
  Image operator()(const Tensor& latent, int index) const { return taesd_preview(taesd, *be, latent, index); }
};
// Loads the decoder `path` (--taesd DIR|FILE, models/taesd.h resolve_taesd_path) for `family` on a
// CPU backend computing as `precision` says ("fp32", "bf16", or "auto": bf16 where the CPU has fast
// bf16, as the engine decides). Throws diffuse::Error naming the file.
std::shared_ptr<TaesdPreviewer> make_taesd_previewer(const std::string& path, Family family,
                                                     const std::string& precision);

}  // namespace diffuse
