// `diffuse train lora`: a LoRA trained on a folder of captioned images (kohya's dataset layout),
// written as a kohya file that diffuse, A1111, ComfyUI and diffusers load.
//
// The run (train/train_run.h, shared with `train full`): scan the data; encode every image once
// with the frozen VAE (posterior mean × scaling factor, cached) and every distinct caption once
// with the frozen text encoder(s) (per step when captions are shuffled); then steps of: a batch in
// epoch order (repeats, shuffled per epoch from the seed), noise and timesteps from the seed, the
// objective's loss, backward into the LoRA (train::UNetTrainer::run, the code `train check`
// checks), gradient clipping, AdamW with the learning-rate schedule. Every step draws from
// generators seeded by (seed, step), so a run's numbers do not depend on how it was split into
// sessions (--resume).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "train/train_run.h"

namespace diffuse::train {

// The run's options (train/train_run.h: data, steps, learning rate, schedule, precision, resume,
// regularisation images, text encoder) and the LoRA's.
//  - resume: a state file (written beside the output as OUT.state.safetensors with every saved
//    LoRA) continues a run: LoRA weights, AdamW moments, the step; the data order, noise and
//    timesteps of every step come from (seed, step), so the result is bit-identical to a run that
//    was never interrupted. The state must come from the same model, data and settings.
//  - train_text_encoder: also a LoRA on the text encoder(s) (kohya's --train_text_encoder targets:
//    attention and MLP linears, "lora_te_…"; SDXL both encoders, "lora_te1_…" and "lora_te2_…"),
//    at text_encoder_lr (≤ 0: lr).
struct LoraTrainOptions : RunOptions {
  int rank = 4;
  float alpha = 1.0f;  // kohya's --network_alpha default (scale alpha/rank)
  // Start from an existing kohya LoRA (--network_weights): its modules, rank and alpha.
  std::string network_weights;
  // LoCon (kohya's conv_dim/conv_alpha): LoRA also on the UNet's 3×3 convolutions of ResNet
  // blocks and down/upsamplers; 0 = off.
  int conv_rank = 0;
  float conv_alpha = 1.0f;
  // Sample images during training (train/sample_images.h): each prompt every sample_every steps
  // and at the end, written beside the output as NAME-sample<STEP>-<i>.png.
  std::vector<std::string> sample_prompts;
  int sample_every = 0;  // steps; 0 with prompts: at the end only
  int sample_steps = 20;
  double sample_cfg = 7.0;
  std::string sample_sampler = "euler_a";
};

struct LoraTrainResult {
  double val_loss_start = 0, val_loss_end = 0;  // validation loss (fixed noise and timesteps)
  int steps = 0;
  std::string output;
};

// `log(line, progress)`: progress lines (step N/M …) and other lines, for stderr.
LoraTrainResult train_lora(const LoraTrainOptions& o, const LogFn& log);

}  // namespace diffuse::train
