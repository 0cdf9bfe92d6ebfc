// `diffuse train check`: runs the training code on a reference's inputs and writes what it
// computed under the reference's key names, so any PyTorch reference of this layout (other
// families, objectives, ranks, seeds) can be compared against diffuse.
//
// Inputs (a safetensors file): input.x0, input.noise [B, 4, H, W] (NCHW, as PyTorch holds them),
// input.timesteps [B] (integers), input.encoder_hidden_states [B, S, ctx]; SDXL also
// input.text_embeds [B, pooled] and input.time_ids [B, 6].
// Outputs (f32; NCHW where the reference is):
//   ref.<lora|base>.pred, .loss_eps, .loss_v (unweighted means);
//   with a min-SNR γ also .snr, .minsnr<γ>_weight_<eps|v>, .loss_minsnr<γ>_<eps|v>;
//   with a LoRA: grad.<LoRA tensor key> (gradients of the trained loss at the initial LoRA);
//   with AdamW steps N: train.loss.0 … train.loss.N (the trained loss before and after each step),
//     train.step<k>.<LoRA tensor key>, train.step1.adam.exp_avg.<key>, train.step1.adam.exp_avg_sq.<key>;
//   with full-grads names: fullft.grad.<name> (gradients of the trained loss with respect to those
//     UNet parameters, without the LoRA).
// The trained loss is the objective's (ε or v target) MSE, min-SNR-weighted when γ is given.
// Everything runs in fp32 through train::UNetTrainer and train::AdamW, the code training runs.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "train/objective.h"

namespace diffuse::train {

struct CheckOptions {
  std::string model, inputs, lora, output;
  Objective objective = Objective::Eps;
  float min_snr_gamma = 0;  // 0: unweighted
  int adamw_steps = 0;
  double lr = 1e-3, weight_decay = 1e-2;
  std::vector<std::string> full_grads;
};

// Runs the check and writes opt.output; `log` gets progress lines. Throws diffuse::Error naming
// the file/tensor on bad input.
void run_check(const CheckOptions& opt, const std::function<void(const std::string&)>& log);

}  // namespace diffuse::train
