// The guided denoising loop shared by txt2img, img2img and inpainting.
#pragma once
#include <functional>

#include "models/controlnet.h"
#include "models/unet.h"
#include "nn/layers.h"
#include "pipeline/scheduler.h"

namespace diffuse {

struct Guidance {
  Tensor cond, uncond;                          // [B, T, C]; uncond undefined: no guidance pass (cfg 1)
  Tensor cond_pooled, uncond_pooled, time_ids;  // SDXL added conditioning ([B, 1280], [B, 6])
  Tensor uncond_time_ids;                       // the unconditional half's when they differ (refiner: [B, 5],
                                                // the negative aesthetic score); undefined: time_ids
  float cfg = 7.0f;
};

// What the UNet is about to see at one model evaluation (for a ControlNet run on the same inputs).
struct ControlInputs {
  const Tensor& x;                  // scheduler-scaled latent batch ([uncond; cond] when guided), before
                                    // model_input (a ControlNet sees the plain 4-channel latent)
  const std::vector<float>& t;      // one timestep per row
  const Tensor& context;            // [rows, S, C]
  const Tensor* text_embeds;        // SDXL added conditioning per row, else null
  const Tensor* time_ids;
  int step, steps;                  // evaluation index (0-based) and count
  bool guided = false;              // rows are [uncond; cond] halves (classifier-free guidance)
};

struct DenoiseHooks {
  // The UNet input from the scheduler-scaled latent (9-channel inpainting concatenates the mask
  // and the masked-image latent here); default: the scaled latent itself.
  std::function<Tensor(Ctx&, const Tensor& scaled)> model_input;
  // Called after each scheduler step with the step index i (0-based, counted from `first`; masked
  // img2img re-noises the kept area).
  std::function<void(Tensor& x, int i)> after_step;
  // Progress: (done, total) model evaluations.
  std::function<void(int, int)> progress;
  // ControlNet: residuals for the UNet batch (down: one per skip connection, mid), passed to
  // UNet::forward; return an empty ControlResiduals to add none at this step.
  std::function<ControlResiduals(Ctx&, const ControlInputs&)> control;
  // The guidance for model evaluation i (0-based, counted from `first`) instead of `g` (A1111's
  // prompt editing and alternation); each must guide (or not) as `g` does. The reference must stay
  // valid for the step.
  std::function<const Guidance&(int i)> guidance;
  // Polled after each step (after progress): true ends the loop there and returns the latent as
  // it is (an interrupt that still wants an image).
  std::function<bool()> stop;
};

// x: [B, h, w, 4] NHWC latent, already scaled by init_noise_sigma (txt2img) or noised (img2img).
// Conditional and unconditional halves run as one UNet batch; out = u + cfg · (c − u). A control
// hook runs on that same batch (so a ControlNet conditions both halves, as diffusers does).
// cond/uncond (and the pooled outputs, time ids) may have 1 row (repeated for the batch) or B.
// Runs timesteps()[first..]; `first` > 0 is for schedulers whose timesteps() still lists the
// entries before their begin index. Per-step activations live in a private arena reset every
// step; ctx.arena is not used. Returns the final latent (an owned f32 tensor, before dividing by
// the VAE scaling factor); the caller's x is not modified.
Tensor denoise(Ctx& ctx, const UNet& unet, Scheduler& sched, Tensor x, const Guidance& g, const NoiseFn& draw_noise,
               const DenoiseHooks& hooks = {}, int first = 0);

// A control hook running `net` with a hint [1 or B, H, W, 3] in [0, 1] (prepare_hint) at `scale`
// (guess_mode: ControlNet::forward's guess-mode scales; several units: pipeline/control.h).
// The hint's conditioning embedding is computed on the first call and reused (it does not depend on
// the step); a hint with one row serves every batch row and both guidance halves. The hook keeps
// a reference to `net` (it must outlive the hook) and its own copy of `hint`.
std::function<ControlResiduals(Ctx&, const ControlInputs&)> control_hook(const ControlNet& net, Tensor hint,
                                                                         float scale, bool guess_mode = false);

}  // namespace diffuse
