// `diffuse train vae`: trains a checkpoint's VAE as an autoencoder on a folder of images
// (src/train/vae_trainer.h); writes the checkpoint with the trained VAE.
#include <cstdio>
#include <memory>

#include "tools/commands.h"
#include "train/vae_trainer.h"

namespace diffuse::tools {

std::pair<CLI::App*, Run> add_train_vae_command(CLI::App* train) {
  CLI::App* c = train->add_subcommand(
      "vae", "Train a checkpoint's VAE (encoder and decoder) on images: L1 reconstruction + a small KL term; writes "
             "the checkpoint with the trained VAE, latents rescaled to the family's scaling factor");
  auto o = std::make_shared<train::VaeTrainOptions>();
  c->add_option("-m,--model", o->model, "Checkpoint whose VAE to train (single file, original layout)")->required();
  c->add_option("--data,--train_data_dir", o->data, "Folder of images (kohya's layout; captions are not used)")
      ->required();
  c->add_option("-o,--output", o->output, "Output checkpoint (.safetensors)")->required();
  c->add_option("--steps,--max_train_steps", o->steps, "Optimiser steps")->capture_default_str();
  c->add_option("--batch,--train_batch_size", o->batch, "Images per step")->capture_default_str();
  c->add_option("--lr,--learning_rate", o->lr, "AdamW learning rate")->capture_default_str();
  c->add_option("--warmup-steps,--lr_warmup_steps", o->warmup_steps, "Linear warmup steps")->capture_default_str();
  c->add_option("--lr-scheduler,--lr_scheduler", o->lr_scheduler,
                "After the warmup: constant, or linear / cosine decay to 0 at the last step (constant_with_warmup: constant)")->capture_default_str();
  c->add_option("--kl-weight", o->kl_weight, "Weight of the KL term (ldm's kl_weight)")->capture_default_str();
  c->add_option("--edge-weight", o->edge_weight,
                "Weight of an edge term: mean |Δ output − Δ image| over neighbouring pixels (sharper outlines)")
      ->capture_default_str();
  c->add_flag("--decoder-only", o->decoder_only,
              "Train only the decoder (and post_quant_conv): the encoder, and so the latents a UNet learned, stay");
  c->add_option("--weight-decay", o->weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  c->add_option("--seed", o->seed, "Seed of the batches and the posterior samples")->capture_default_str();
  c->add_option("--resolution", o->resolution,
                "Square training size (0: the checkpoint's modelspec.resolution, else 512)")->capture_default_str();
  c->add_option("--save-precision,--save_precision", o->save_precision, "fp16, bf16 or float")->capture_default_str();
  c->add_option("--save-every,--save_every_n_steps", o->save_every,
                "Write an intermediate checkpoint and the training state every N steps");
  c->add_option("--resume", o->resume, "Continue from a state file (OUT.state.safetensors)");
  return {c, [o] {
            train::train_vae(*o, [](const std::string& line, bool) { std::fprintf(stderr, "%s\n", line.c_str()); });
            return 0;
          }};
}

}  // namespace diffuse::tools
