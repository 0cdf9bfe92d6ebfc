// Live previews: a cheap latent → RGB approximation (a per-family linear map of the 4 latent
// channels, the factors A1111's "Approx cheap" and ComfyUI's latent2rgb use), one image of the
// batch at the latent's own size (1/8 of the output). The server's progress `current_image` and
// `generate --preview-every` use this one implementation.
#pragma once
#include "core/tensor.h"
#include "io/image.h"
#include "models/family.h"

namespace diffuse {

// latent: f32 [B, h, w, 4] NHWC in the model's latent space (what the sampler holds, before
// dividing by the VAE scaling factor); index < B. Returns 8-bit RGB h × w.
Image latent_preview(const Tensor& latent, int index, Family family);

}  // namespace diffuse
