// The cheap live preview: each latent pixel's 4 channels times a 4×3 matrix (plus a bias for
// SDXL) give RGB in about [-1, 1], mapped to 0..255 as the VAE output is. The factors are linear
// fits from latents to their decoded (downscaled) images, as published by ComfyUI
// (comfy/latent_formats.py: SD15 and SDXL `latent_rgb_factors` / `latent_rgb_factors_bias`, applied
// by latent_preview.py's Latent2RGBPreviewer to the latent the sampler holds, rounded to 8 bits).
// A1111's "Approx cheap" (modules/sd_vae_approx.py, cheap_approximation) uses older fits of the
// same kind, one per family and without a bias (SD: 0.298 0.207 0.208 / 0.187 0.286 0.173 /
// -0.158 0.189 0.264 / -0.184 -0.271 -0.473); ComfyUI's later fits are used here, with the bias
// its SDXL fit adds.
#include "pipeline/preview.h"

#include <algorithm>
#include <cmath>

#include "core/arena.h"
#include "core/error.h"
#include "core/threads.h"
#include "nn/layers.h"

namespace diffuse {

namespace {

struct RgbFactors {
  float m[4][3];  // [latent channel][R, G, B]
  float bias[3];
};

// SD 1.x and 2.x share the SD VAE (kl-f8), so one set serves both (and unknown families).
constexpr RgbFactors kSD = {{{0.3512f, 0.2297f, 0.3227f},
                             {0.3250f, 0.4974f, 0.2350f},
                             {-0.2829f, 0.1762f, 0.2721f},
                             {-0.2120f, -0.2616f, -0.7177f}},
                            {0.0f, 0.0f, 0.0f}};
// SDXL's VAE was retrained: its latent space differs, and its fit has a constant term.
constexpr RgbFactors kSDXL = {{{0.3651f, 0.4232f, 0.4341f},
                               {-0.2533f, -0.0042f, 0.1068f},
                               {0.1076f, 0.1111f, -0.0362f},
                               {-0.3165f, -0.2492f, -0.2188f}},
                              {0.1084f, -0.0175f, -0.0011f}};

}  // namespace

Image latent_preview(const Tensor& latent, int index, Family family) {
  DF_CHECK(latent.defined() && latent.rank() == 4 && latent.dim(3) == 4, "latent_preview: latent ",
           latent.defined() ? latent.str() : std::string("(none)"), " should be [B, h, w, 4] (NHWC)");
  DF_CHECK(index >= 0 && index < latent.dim(0), "latent_preview: image ", index, " of a batch of ", latent.dim(0));
  // A bf16 latent (or any other dtype) is converted; the sampler's own f32 tensor is read in place.
  const Tensor one = latent.slice0(index, index + 1);
  const Tensor f = one.dtype() == DType::F32 ? one : one.to(DType::F32);
  const RgbFactors& k = family == Family::SDXL ? kSDXL : kSD;
  const int64_t h = latent.dim(1), w = latent.dim(2);
  Image im;
  im.width = int(w);
  im.height = int(h);
  im.channels = 3;
  im.format = "png";
  im.pixels.resize(size_t(h * w * 3));
  const float* z = f.f32();
  for (int64_t p = 0; p < h * w; ++p) {
    const float* c = z + p * 4;
    for (int r = 0; r < 3; ++r) {
      float v = k.bias[r];
      for (int ch = 0; ch < 4; ++ch) v += c[ch] * k.m[ch][r];
      // As the VAE output: [-1, 1] → [0, 1] → 0..255, rounded (a NaN shows as black).
      float u = std::isnan(v) ? 0.0f : std::clamp((v + 1.0f) * 0.5f, 0.0f, 1.0f);
      im.pixels[size_t(p * 3 + r)] = uint8_t(std::nearbyint(u * 255.0f));
    }
  }
  return im;
}

Image taesd_preview(const TAESD& taesd, Backend& be, const Tensor& latent, int index) {
  DF_CHECK(latent.defined() && latent.rank() == 4 && latent.dim(3) == 4, "taesd_preview: latent ",
           latent.defined() ? latent.str() : std::string("(none)"), " should be [B, h, w, 4] (NHWC)");
  DF_CHECK(index >= 0 && index < latent.dim(0), "taesd_preview: image ", index, " of a batch of ", latent.dim(0));
  const Tensor one = latent.slice0(index, index + 1);
  Arena arena;
  Ctx c{be, arena};
  const Tensor rgb = taesd.decode(c, one);  // [1, 8h, 8w, 3] f32, about [0, 1]
  Image im;
  im.height = int(rgb.dim(1));
  im.width = int(rgb.dim(2));
  im.channels = 3;
  im.format = "png";
  im.pixels.resize(size_t(rgb.numel()));
  const float* p = rgb.f32();
  for (int64_t i = 0; i < rgb.numel(); ++i) {
    // TAESD's images are [0, 1] (A1111 and diffusers map them to [-1, 1] and back); a NaN is black.
    const float u = std::isnan(p[i]) ? 0.0f : std::clamp(p[i], 0.0f, 1.0f);
    im.pixels[size_t(i)] = uint8_t(std::nearbyint(u * 255.0f));
  }
  return im;
}

std::shared_ptr<TaesdPreviewer> make_taesd_previewer(const std::string& path, Family family,
                                                     const std::string& precision) {
  const bool bf16 = precision == "bf16" || (precision == "auto" && cpu_features().bf16_fast());
  auto t = std::make_shared<TaesdPreviewer>();
  t->be = make_cpu_backend(bf16 ? Precision::BF16 : Precision::F32);
  t->taesd = load_taesd_decoder(*t->be, path, family);
  return t;
}

}  // namespace diffuse
