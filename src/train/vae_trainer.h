// `diffuse train vae`: trains a model's VAE (encoder and decoder, every tensor) as an autoencoder
// on a folder of images: the reconstruction loss plus a small KL term (ldm's AutoencoderKL
// objective without the perceptual and adversarial parts):
//   L = mean |x − D(z)| + kl_weight · Σ KL(q(z|x) ‖ N(0, 1)) / (B·H·W·3)
//       [+ edge_weight · mean |Δ D(z) − Δx| over neighbouring pixels],  z = mean + std·ε
// (the KL sum over the latent per image, as ldm's kl_weight means it, over the pixel values the
// L1 mean runs over). AdamW with f32 master weights, a constant rate after a linear warmup,
// gradient clipping at 1.
//
// Meant for small VAEs trained from scratch (the demo model): every activation of a batch stays
// in memory for the backward (models/vae_backward.cpp).
//
// At the end the latent space is reparametrised per channel, z' = k·(z − mean), so that the posterior
// means of the training images have mean 0 and the standard deviation 1/scaling_factor the family's
// pipelines assume (SD 1.x: 1/0.18215): quant_conv and post_quant_conv absorb it exactly (same
// decoder outputs for the same images), and the diffusion model sees latents at unit scale.
//
// Output: the input checkpoint with the VAE's tensors replaced (original ldm layout), beside it
// OUT.csv / OUT.loss.png (the loss log and chart) and OUT.recon.png (validation images above their
// reconstructions). Intermediate saves (--save-every) write OUT-step<N>.safetensors and
// OUT.state.safetensors; --resume continues from the state.
#pragma once
#include <string>
#include <vector>

#include "train/train_run.h"

namespace diffuse::train {

struct VaeTrainOptions {
  std::string model, data, output;
  int steps = 2000;
  int batch = 8;
  double lr = 2e-4;
  int warmup_steps = 100;
  // After the warmup: "constant" (or "constant_with_warmup", the same here: every schedule warms
  // up), or "linear" / "cosine" decay to 0 at the last step (diffusers' get_scheduler; kohya's
  // --lr_scheduler). A constant rate leaves the loss where its noise is.
  std::string lr_scheduler = "constant";
  double kl_weight = 1e-6;
  // Edges: + edge_weight · mean |Δ(decoder output) − Δx| over horizontally and vertically
  // neighbouring pixels (sharper outlines of small shapes than the L1 term alone gives).
  double edge_weight = 0;
  // Only the decoder and post_quant_conv train (the encoder, and so the latent space a UNet was
  // trained on, stays as it is; no reparametrisation at the end).
  bool decoder_only = false;
  double weight_decay = 0;
  double max_grad_norm = 1.0;
  uint64_t seed = 42;
  int resolution = 0;  // 0: the model file's modelspec.resolution, else 512
  std::string save_precision = "fp16";
  int save_every = 0;
  std::string resume;
};

struct VaeTrainResult {
  double val_start = 0, val_end = 0;  // mean |x − D(mean)| on the validation images
  // Per latent channel, of the posterior means before the reparametrisation, and its factor k.
  std::vector<double> latent_mean, latent_std, latent_scale;
  int steps = 0;
};

VaeTrainResult train_vae(const VaeTrainOptions& o, const LogFn& log);

}  // namespace diffuse::train
