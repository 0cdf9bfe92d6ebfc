// The flags every `diffuse train` run over a dataset takes (train lora, train full), with kohya's
// names as aliases, and their checks once parsed. Templates over the trainer's options struct
// (train::RunOptions or one with the same fields).
#pragma once
#include <CLI/CLI.hpp>
#include <cmath>
#include <filesystem>
#include <string>

#include "core/error.h"
#include "io/output_file.h"

namespace diffuse::tools {

// What the flags hold before they go into the options.
struct RunFlags {
  std::string output_dir, output_name;
  double unet_lr = 0, text_encoder_lr = -1;
  int resolution = 0;
  std::string precision = "fp32";
  bool v_parameterization = false;
};

template <class Opts>
void add_run_flags(CLI::App* c, Opts& o, RunFlags& f, const std::string& output_what) {
  c->add_option("-m,--model,--pretrained_model_name_or_path", o.model, "Base model (file or diffusers folder)")->required();
  c->add_option("--data,--train_data_dir", o.data, "Images with same-name .txt/.caption captions; <repeats>_<name> subfolders")
      ->required();
  c->add_option("-o,--output", o.output, "Output " + output_what + " (.safetensors)");
  c->add_option("--output_dir", f.output_dir, "kohya: output folder (with --output_name)");
  c->add_option("--output_name", f.output_name, "kohya: output file name without extension");
  c->add_option("--steps,--max_train_steps", o.steps, "Training steps");
  c->add_option("--epochs,--max_train_epochs", o.epochs, "Epochs (when --steps is not given)");
  c->add_option("--lr,--learning_rate", o.lr, "Learning rate (AdamW)")->capture_default_str();
  c->add_option("--unet_lr", f.unet_lr, "kohya: the UNet's learning rate (overrides --lr)");
  c->add_option("--text-encoder-lr,--text_encoder_lr", f.text_encoder_lr, "Text encoder learning rate (default: --lr)");
  c->add_option("--batch,--train_batch_size", o.batch, "Batch size")->capture_default_str();
  c->add_option("--seed", o.seed, "Seed (initialisation, data order, noise, timesteps)")->capture_default_str();
  c->add_option("--resolution", f.resolution, "Training resolution (default: the checkpoint's modelspec.resolution when square, else the family's native size)");
  c->add_flag("--buckets,--enable_bucket", o.data_opts.buckets, "Aspect-ratio buckets (64-px steps, area <= resolution²)");
  c->add_flag("--shuffle-captions,--shuffle_caption", o.data_opts.shuffle_captions, "Shuffle comma-separated tags");
  c->add_option("--keep-tokens,--keep_tokens", o.data_opts.keep_tokens, "Tags kept in place when shuffling");
  c->add_option("--lr-scheduler,--lr_scheduler", o.lr_schedule, "constant, constant_with_warmup, linear, cosine")
      ->capture_default_str();
  c->add_option("--lr-warmup-steps,--lr_warmup_steps", o.warmup_steps, "Warmup steps")->capture_default_str();
  c->add_option("--max-grad-norm,--max_grad_norm", o.max_grad_norm, "Gradient clipping (0: off)")->capture_default_str();
  c->add_option("--min-snr-gamma,--min_snr_gamma", o.min_snr_gamma, "Min-SNR-γ weighting (0: off)");
  c->add_option("--noise-offset,--noise_offset", o.noise_offset, "Noise offset");
  c->add_option("--min-timestep,--min_timestep", o.min_timestep, "Smallest training timestep (0-999)")->capture_default_str();
  c->add_option("--max-timestep,--max_timestep", o.max_timestep, "Training timesteps below this (1-1000)")->capture_default_str();
  c->add_option("--prediction", o.prediction,
                "Trained objective: eps or v (default: what the model declares, else v for SD 2.x, eps otherwise)");
  c->add_flag("--v-parameterization,--v_parameterization", f.v_parameterization, "kohya: --prediction v");
  c->add_flag("--zero-terminal-snr,--zero_terminal_snr", o.zero_terminal_snr,
              "Rescale the noise schedule to zero SNR at the last timestep (with --prediction v); the checkpoint declares it");
  c->add_option("--multires-noise-iterations,--multires_noise_iterations", o.multires_noise_iterations,
                "Multi-resolution (pyramid) noise levels (0: off; kohya suggests 6-10)")
      ->check(CLI::Range(0, 32));
  c->add_option("--multires-noise-discount,--multires_noise_discount", o.multires_noise_discount,
                "Weight ratio between pyramid noise levels")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  c->add_option("--caption-dropout,--caption_dropout_rate", o.caption_dropout, "Caption dropout rate");
  c->add_option("--save-precision,--save_precision", o.save_precision, "fp16, bf16 or float")->capture_default_str();
  c->add_option("--validate-every", o.validate_every, "Validation loss every N steps (always at start and end)");
  c->add_flag("--strict", o.data_opts.strict, "An unreadable image is an error (default: skipped with a warning)");
  c->add_option("--precision,--mixed_precision", f.precision, "fp32 (kohya: no) or bf16 compute")->capture_default_str();
  c->add_option("--reg-data,--reg_data_dir", o.reg_data, "Regularisation images (kohya's folder convention)");
  c->add_option("--prior-loss-weight,--prior_loss_weight", o.prior_loss_weight, "Loss weight of regularisation images")
      ->capture_default_str();
}

// The checks before a run (paths, --resolution, --precision, --lr) and the flags into `o`.
template <class Opts>
void finish_run_flags(Opts& o, const RunFlags& f) {
  if (o.output.empty() && !f.output_name.empty())
    o.output = (std::filesystem::path(f.output_dir.empty() ? "." : f.output_dir) / (f.output_name + ".safetensors")).string();
  DF_CHECK(!o.output.empty(), "-o/--output (or --output_dir/--output_name) is required");
  if (!o.resume.empty()) check_input_file(o.resume, "--resume");
  check_input_file(o.model, "-m/--model", /*folder_ok=*/true);
  DF_CHECK(std::filesystem::is_directory(o.data), "--data ", o.data, ": not a folder");
  check_output_writable(o.output, "-o/--output");
  DF_CHECK(f.resolution == 0 || (f.resolution >= 64 && f.resolution <= 4096 && f.resolution % 8 == 0), "--resolution ",
           f.resolution, ": must be a multiple of 8 in [64, 4096]");
  o.data_opts.resolution = f.resolution;
  DF_CHECK(f.precision == "fp32" || f.precision == "no" || f.precision == "bf16", "--precision ", f.precision,
           ": expected fp32 (no) or bf16", f.precision == "fp16" ? " (fp16 training is not supported on CPUs)" : "");
  o.precision = f.precision == "bf16" ? "bf16" : "fp32";
  DF_CHECK(!f.v_parameterization || o.prediction.empty() || o.prediction == "v",
           "--v-parameterization and --prediction ", o.prediction, " disagree");
  if (f.v_parameterization) o.prediction = "v";
  if (f.unet_lr > 0) o.lr = f.unet_lr;
  if (f.text_encoder_lr > 0) o.text_encoder_lr = f.text_encoder_lr;
  DF_CHECK(o.steps >= 0 && o.epochs >= 0, "--steps/--epochs must not be negative");
  DF_CHECK(std::isfinite(o.lr) && o.lr > 0 && o.lr < 1, "--lr ", o.lr, ": must be in (0, 1)");
}

}  // namespace diffuse::tools
