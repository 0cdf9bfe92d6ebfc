// Image generation end to end: text-to-image, image-to-image and inpainting, as diffusers'
// StableDiffusion(XL)Pipeline / Img2ImgPipeline / InpaintPipeline compute them (same draws from
// the generator in the same order, same arithmetic), with A1111's per-image seeds for the CUDA
// generator.
//
// Random draws (see ../shared/fixtures/README.md):
//  - RngKind::Cpu: one torch CPU generator seeded `seed` for the whole batch; each draw is one
//    torch.randn of the whole batch (B, 4, h, w) except VAE posterior samples of the (single)
//    init/masked image, drawn once as (1, 4, h, w) and repeated (diffusers).
//  - RngKind::Cuda: image i has its own generator seeded seed + i (A1111); every draw is made per
//    image from its generator.
// Order: txt2img: initial noise, then per-step noise. img2img: init-image posterior sample, the
// noise added at the first timestep, per-step noise. inpaint, 9-channel UNet: init-image posterior
// sample only if strength < 1, noise, masked-image posterior sample, per-step noise. inpaint,
// 4-channel UNet (masked img2img): init-image posterior sample, noise, masked-image posterior sample
// (drawn, unused), per-step noise.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/layout.h"
#include "io/image.h"
#include "models/controlnet.h"
#include "models/t2i_adapter.h"
#include "models/embedding.h"
#include "models/sd_model.h"
#include "pipeline/rng.h"
#include "pipeline/scheduler.h"

namespace diffuse {

struct GenerateParams {
  std::string prompt, negative;
  int width = 512, height = 512;  // pixels, multiples of 8
  int steps = 20;
  double cfg = 7.0;  // guidance; <= 1: no unconditional pass (diffusers)
  uint64_t seed = 0;
  // A1111's variation seed (pipeline/variation.h): image i's first noise is slerped towards the
  // noise of subseed + i by subseed_strength (0: off).
  uint64_t subseed = 0;
  double subseed_strength = 0;
  std::string sampler = "euler_a";
  std::string schedule = "default";  // default | karras | trailing
  int batch = 1;
  int clip_skip = 0;  // A1111 meaning (0/1: the family default, 2: penultimate layer)
  // Textual-inversion embeddings the prompts use by name (models/embedding.h); null: none.
  const EmbeddingSet* embeddings = nullptr;
  RngKind rng = RngKind::Cuda;
  Prediction prediction = Prediction::Epsilon;
  bool zero_terminal_snr = false;  // the model was trained on a zero-terminal-SNR schedule (scheduler.h)
  // img2img / inpaint (init set): share of the schedule that is run, int(steps * strength) steps.
  double strength = 0.75;
  const Image* init = nullptr;  // 8-bit, width × height (converted to RGB)
  const Image* mask = nullptr;  // 8-bit, width × height; white (>= 128 after grey conversion) = repaint
  // Inpainting: what the init latent holds under the mask before sampling: the encoded image
  // (Keep), the run's first noise draw (A1111's masked content "latent noise": A1111 draws it from
  // the image's seed, as the sampling noise) or zeros ("latent nothing").
  enum class LatentFill { Keep, Noise, Zero } latent_fill = LatentFill::Keep;
  // img2img from a latent instead of an image (hires fix's latent upscale): f32 [1 or batch, h, w, 4]
  // NHWC in the model's latent space (as Result::latent, after the VAE scaling factor: not divided
  // by it), h, w = height / f, width / f (f = the VAE's downscale(): 8 for SD). No VAE encode, no
  // posterior draw; no mask.
  const Tensor* init_latent = nullptr;
  // img2img (init or init_latent): > 0 runs exactly the last img2img_steps of the `steps`
  // schedule instead of int(steps * strength) (A1111's hires pass: steps / denoise scheduled,
  // hires-steps run).
  int img2img_steps = 0;
  // ControlNet: its residuals (× control_strength) are added to the UNet's skip connections and
  // mid block on both guidance halves. The hint is RGB in [0, 1], resized to the output size
  // (Lanczos, as diffusers does) when it differs.
  const ControlNet* control = nullptr;
  const Image* control_image = nullptr;
  float control_strength = 1.0f;
  // More ControlNet units (pipeline/control.h), after `control` when that is set; the residuals of
  // the units active at a step are summed. Each has its hint (as control_image), strength, guidance
  // start/end (active while start <= step/steps <= end, sd-webui-controlnet's rule) and guess mode
  // (diffusers': the conditional half only, residuals scaled from 0.1 to 1).
  struct ControlUnitParams {
    const ControlNet* net = nullptr;
    const Image* image = nullptr;
    float strength = 1.0f;
    double start = 0.0, end = 1.0;
    bool guess_mode = false;
    const T2IAdapter* adapter = nullptr;  // a T2I-Adapter unit instead of a ControlNet
  };
  std::vector<ControlUnitParams> controls;
  // SDXL refiner (pipeline/refiner.h): from the evaluation where switch_at of the schedule is done,
  // the refiner (its own prompt encoding, 5 time ids) continues the latent; null: none.
  const SDModel* refiner = nullptr;
  double refiner_switch_at = 0.8;
  // VAE tiling for the decode and the init/masked-image encode (models/vae.h). Auto: tiled above
  // 1024² pixels (the untiled VAE needs ~4 GiB of activations at 1024², and 4× that at 2048²).
  VAETiling vae_tiling;
  // false: no VAE decode; the results carry their latents only (image left empty, on_result not
  // called): hires fix's first pass with a latent upscaler.
  bool decode = true;
  // Called once the prompts are encoded, before denoising (e.g. to free the text encoders).
  std::function<void()> on_conditioned;
  // Polled at every progress point (after encoding, after each model evaluation, per decoded
  // image); returning true stops the run with diffuse::Cancelled.
  std::function<bool()> cancelled;
  // Polled after each sampling step: true ends sampling there and decodes the latent as it is
  // (A1111's interrupt: the caller still gets the partly denoised images).
  std::function<bool()> finish_early;
  // Called with each image as soon as it is decoded (index in the batch), before the next one is
  // decoded: callers save finished work even if a later image fails.
  std::function<void(const struct Result&, int index)> on_result;
  // Live previews: called after each scheduler step (after any masked-inpaint blend) with the
  // current latent, f32 [B, h, w, 4] NHWC before dividing by the VAE scaling factor; step is
  // 1-based, steps the number of scheduler steps that run (model evaluations, as Stage::Denoise).
  std::function<void(const Tensor& latent, int step, int steps)> on_latent;
  // Warnings for the user (one line each), e.g. a VAE decode retried in fp32.
  std::function<void(const std::string&)> on_warning;
  // Tests only: applied to each reduced-precision (bf16) VAE decode's output before it is checked,
  // to force the fp32 retry path (fault injection).
  std::function<void(Tensor&)> test_decode_hook;
};

struct Result {
  Image image;    // 8-bit RGB, width × height
  Tensor latent;  // f32 [1, 4, h, w] NCHW: the final latent before dividing by the VAE scaling factor
  uint64_t seed = 0;  // the seed that reproduces this image (Cuda: seed + i; Cpu: seed, batch position matters)
};

enum class Stage { Encode, Denoise, Decode };
// (stage, done, total): Encode (0,1)->(1,1); Denoise once per model evaluation step; Decode per image.
using ProgressFn = std::function<void(Stage, int, int)>;

// A VAE decode that runs in reduced precision (bf16 compute/activations) and overflows (a
// non-finite pixel) is decoded again in fp32 — the decoder loaded once more from model.path with
// an fp32 backend — with a warning through on_warning; a non-finite fp32 decode is an error.
// Throws diffuse::Error naming the parameter for invalid settings (size, strength, image sizes,
// mask without init, sampler), diffuse::Cancelled when p.cancelled says so.
// `be` runs the ops (one backend object per concurrent run: it keeps conversion buffers) and
// `ws` holds the models' scratch (nn/layers.h); without one, a workspace local to this call is
// used. Runs on one model with separate backends and workspaces may execute side by side.
std::vector<Result> generate(const SDModel& model, Backend& be, const GenerateParams& p, const ProgressFn& progress = {},
                             Workspace* ws = nullptr);


}  // namespace diffuse
