// The noise-prediction objective as diffusers' and kohya's training scripts compute it.
//
// DDPM forward process (scaled_linear betas 0.00085 -> 0.012, 1000 steps; ᾱ as a torch.float32
// tensor): z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε, computed in f32 as diffusers' DDPMScheduler.add_noise.
// Target ε (epsilon models) or v = √ᾱ_t·ε − √(1−ᾱ_t)·z_0 (v-prediction). Loss: mean squared error
// over every element, or with min-SNR-γ weighting (Hang et al. 2023; diffusers'
// train_text_to_image.py): per sample w_b = min(SNR_b, γ)/SNR_b (ε) or min(SNR_b, γ)/(SNR_b + 1)
// (v), loss = mean_b(w_b · mean_chw((pred − target)²)). SNR = (√ᾱ/√(1−ᾱ))² in f32 (compute_snr).
// Options: noise offset (ε += o·N(0,1) per (sample, channel)), caption dropout.
#pragma once
#include <functional>
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "pipeline/rng.h"
#include "pipeline/schedule.h"

namespace diffuse::train {

enum class Objective { Eps, V };
Objective parse_objective(const std::string& s);  // "eps"/"epsilon" | "v"/"v_prediction"; throws
const char* objective_name(Objective o);          // "eps", "v"

// The DDPM schedule as training reads it (f32 like diffusers' tensors).
struct DdpmSchedule {
  std::vector<float> alphas_cumprod;  // [1000]
  // scaled_linear 0.00085 -> 0.012, 1000 steps; rescaled to zero terminal SNR (ᾱ_999 = 0) when asked.
  static DdpmSchedule sd(bool zero_terminal_snr = false);
  int num_timesteps() const { return int(alphas_cumprod.size()); }
  float sqrt_alpha(int t) const;            // √ᾱ_t (f32 sqrt of the f32 ᾱ)
  float sqrt_one_minus_alpha(int t) const;  // √(1 − ᾱ_t)
  float snr(int t) const;                   // (√ᾱ / √(1−ᾱ))²
};

// One batch of the objective's inputs. Latents are [B, H, W, C] (NHWC, as the UNet reads them).
struct NoisedBatch {
  Tensor x0, noise, noisy, target;  // f32 [B, H, W, C]
  std::vector<int> timesteps;
};

// z_t and the target for x0, noise (f32 [B, H, W, C]) at `timesteps` (each in [0, 1000)).
NoisedBatch make_noised_batch(const DdpmSchedule& s, const Tensor& x0, const Tensor& noise,
                              const std::vector<int>& timesteps, Objective obj);

// Per-sample loss weights: all 1, or min-SNR-γ (γ > 0) in the objective's form.
std::vector<float> loss_weights(const DdpmSchedule& s, const std::vector<int>& timesteps, Objective obj,
                                float min_snr_gamma);

struct LossResult {
  double loss = 0;         // the weighted mean (what is trained)
  double unweighted = 0;   // mean (pred − target)² over every element
  Tensor dpred;            // dL/dpred, f32 shaped like pred (times `grad_scale`)
};
// Mean squared error of pred against target (same shape, [B, ...]) with per-sample weights
// (empty: all 1). grad_scale multiplies dpred (1/accumulation steps).
LossResult mse_loss(const Tensor& pred, const Tensor& target, const std::vector<float>& weights,
                    float grad_scale = 1.0f);

// Noise offset (kohya's --noise_offset): ε[b, :, :, c] += offset · n_bc, n ~ N(0, 1) from `rng`
// (one value per sample and channel, drawn in [B, C] order). noise: [B, H, W, C].
void apply_noise_offset(Tensor& noise, float offset, Rng& rng);

// Multi-resolution ("pyramid") noise (kohya's --multires_noise_iterations/--multires_noise_discount):
// for i = 0 .. iterations-1, with r = 2 + 2·u (u uniform [0, 1) from `uniform`), a draw z ~ N(0, 1)
// of [B, max(1, H/r^i), max(1, W/r^i), C] (from `rng`) is upsampled bilinearly (half-pixel centres,
// as torch's Upsample(mode="bilinear")) to H×W and added with weight discount^i, stopping after the
// first 1-pixel level; then the whole tensor is divided by its standard deviation. Low-frequency
// noise hides an image's layout from x_t at high timesteps (where SD's schedule still leaks 6.8% of
// x0), so the model learns the layout from the prompt. noise: [B, H, W, C] f32.
void apply_multires_noise(Tensor& noise, int iterations, float discount, Rng& rng,
                          const std::function<double()>& uniform);

// Caption dropout: true with probability `rate` (the caption is replaced by the empty prompt).
// `u` is a uniform [0, 1) draw.
inline bool drop_caption(double u, double rate) { return rate > 0 && u < rate; }

// Timesteps uniform in [min, max) (kohya's --min_timestep/--max_timestep; default [0, 1000)),
// from a uniform [0, 1) source.
int sample_timestep(double u, int min_t = 0, int max_t = 1000);

// NCHW <-> NHWC for [B, C, H, W] / [B, H, W, C] f32 tensors (PyTorch references, .safetensors I/O).
Tensor nchw_to_nhwc(const Tensor& x);
Tensor nhwc_to_nchw(const Tensor& x);

}  // namespace diffuse::train
