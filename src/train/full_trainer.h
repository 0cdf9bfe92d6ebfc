// `diffuse train full`: full fine-tuning. Every UNet weight (every convolution, linear layer and
// norm: all of the UNet's tensors) trains, optionally the text encoder's layers too (SD 1.x/2.x;
// its token and position embeddings stay frozen), on a folder of captioned images (kohya's layout,
// train/dataset.h) with the objective, AdamW and schedules `train lora` uses (train/train_run.h).
// Master weights, gradients and AdamW moments are f32 whatever the compute precision.
//
// The output is one file in the original (ldm) layout (train/checkpoint_writer.h): the input
// checkpoint's tensors with the trained ones replaced under their own names, in --save-precision;
// everything else as stored. `ema` ≥ 0 keeps an exponential moving average of the trained
// weights (train/ema.h: diffusers' EMAModel, with its warmup by default) and the file holds the EMA
// weights (an "ema-only" checkpoint). Intermediate checkpoints (--save-every) come with
// OUT.state.safetensors (weights, AdamW moments, EMA, step, loss log) to continue with --resume;
// the state holds three or four f32 copies of the trained weights (~10-14 GB for SD 1.5), so it is
// written at intermediate saves only, not at the end.
#pragma once
#include <string>

#include "train/train_run.h"

namespace diffuse::train {

struct FullTrainOptions : RunOptions {
  FullTrainOptions() { lr = 1e-5; }  // diffusers' full fine-tuning README (kohya's fine_tune: 2e-6)
  double ema = -1;          // EMA decay in [0, 1); < 0: no EMA
  bool ema_warmup = true;   // diffusers' default decay warmup (train/ema.h); false: constant decay
  // With train_text_encoder: its token and position embeddings train too (a model trained from
  // scratch; fine-tuning keeps them frozen, as diffusers and kohya do).
  bool train_embeddings = false;
};

struct FullTrainResult {
  double val_loss_start = 0, val_loss_end = 0;  // validation loss of the trained weights
  double val_loss_ema = -1;                     // of the EMA weights (with ema), else -1
  int steps = 0;
  int64_t parameters = 0;  // trained values
  std::string output;
};

FullTrainResult train_full(const FullTrainOptions& o, const LogFn& log);

}  // namespace diffuse::train
