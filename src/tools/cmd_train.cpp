// `diffuse train …`: training commands. `train check` runs the training code (objective,
// backward, AdamW) on a reference's inputs and writes the results under the reference's names
// (src/train/check.h).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "core/error.h"
#include "io/output_file.h"
#include "tools/commands.h"
#include "train/check.h"
#include "train/lora_trainer.h"

namespace diffuse::tools {

namespace {

struct CheckFlags {
  train::CheckOptions opt;
  std::string objective = "eps";
  std::string full_grads;
};

std::vector<std::string> split_names(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t comma = s.find(',', start);
    const std::string part = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    DF_CHECK(!part.empty(), "--full-grads: empty parameter name in '", s, "'");
    out.push_back(part);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

int run_check(CheckFlags& f) {
  train::CheckOptions& o = f.opt;
  check_input_file(o.model, "--model", /*folder_ok=*/true);
  check_input_file(o.inputs, "--inputs");
  if (!o.lora.empty()) check_input_file(o.lora, "--lora");
  check_output_writable(o.output, "-o/--output");
  DF_CHECK(f.objective == "eps" || f.objective == "v", "--objective ", f.objective, ": expected eps or v");
  o.objective = train::parse_objective(f.objective);
  DF_CHECK(o.min_snr_gamma >= 0 && std::isfinite(o.min_snr_gamma), "--min-snr-gamma ", o.min_snr_gamma,
           " must be a finite number >= 0");
  DF_CHECK(o.lr >= 0 && std::isfinite(o.lr), "--lr ", o.lr, " must be a finite number >= 0");
  DF_CHECK(o.weight_decay >= 0 && std::isfinite(o.weight_decay), "--weight-decay ", o.weight_decay,
           " must be a finite number >= 0");
  if (!f.full_grads.empty()) o.full_grads = split_names(f.full_grads);
  train::run_check(o, [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); });
  return 0;
}

struct LoraFlags {
  train::LoraTrainOptions o;
  std::string output_dir, output_name;
  double unet_lr = 0, text_encoder_lr = -1;
  int resolution = 0;
  std::string precision = "fp32";
};

int run_lora(LoraFlags& f) {
  train::LoraTrainOptions& o = f.o;
  if (o.output.empty() && !f.output_name.empty())
    o.output = (std::filesystem::path(f.output_dir.empty() ? "." : f.output_dir) / (f.output_name + ".safetensors")).string();
  DF_CHECK(!o.output.empty(), "-o/--output (or --output_dir/--output_name) is required");
  if (!o.resume.empty()) check_input_file(o.resume, "--resume");
  if (!o.network_weights.empty()) check_input_file(o.network_weights, "--network-weights");
  check_input_file(o.model, "-m/--model", /*folder_ok=*/true);
  DF_CHECK(std::filesystem::is_directory(o.data), "--data ", o.data, ": not a folder");
  check_output_writable(o.output, "-o/--output");
  DF_CHECK(f.resolution == 0 || (f.resolution >= 64 && f.resolution <= 4096 && f.resolution % 8 == 0), "--resolution ",
           f.resolution, ": must be a multiple of 8 in [64, 4096]");
  o.data_opts.resolution = f.resolution;
  DF_CHECK(f.precision == "fp32" || f.precision == "no" || f.precision == "bf16", "--precision ", f.precision,
           ": expected fp32 (no) or bf16", f.precision == "fp16" ? " (fp16 training is not supported on CPUs)" : "");
  o.precision = f.precision == "bf16" ? "bf16" : "fp32";
  if (f.unet_lr > 0) o.lr = f.unet_lr;
  if (f.text_encoder_lr > 0) o.text_encoder_lr = f.text_encoder_lr;
  DF_CHECK(o.steps >= 0 && o.epochs >= 0, "--steps/--epochs must not be negative");
  DF_CHECK(std::isfinite(o.lr) && o.lr > 0 && o.lr < 1, "--lr ", o.lr, ": must be in (0, 1)");
  train::train_lora(o, [](const std::string& line, bool progress) { std::fprintf(stderr, "%s\n", line.c_str()); });
  return 0;
}

void add_lora_command(CLI::App* train, std::shared_ptr<LoraFlags> f) {
  CLI::App* c = train->add_subcommand("lora", "Train a LoRA on a folder of captioned images (kohya's layout and file format)");
  train::LoraTrainOptions& o = f->o;
  c->add_option("-m,--model,--pretrained_model_name_or_path", o.model, "Base model (file or diffusers folder)")->required();
  c->add_option("--data,--train_data_dir", o.data, "Images with same-name .txt/.caption captions; <repeats>_<name> subfolders")
      ->required();
  c->add_option("-o,--output", o.output, "Output LoRA (.safetensors)");
  c->add_option("--output_dir", f->output_dir, "kohya: output folder (with --output_name)");
  c->add_option("--output_name", f->output_name, "kohya: output file name without extension");
  c->add_option("--steps,--max_train_steps", o.steps, "Training steps");
  c->add_option("--epochs,--max_train_epochs", o.epochs, "Epochs (when --steps is not given)");
  c->add_option("--lr,--learning_rate", o.lr, "Learning rate (AdamW)")->capture_default_str();
  c->add_option("--unet_lr", f->unet_lr, "kohya: the UNet's learning rate (overrides --lr)");
  c->add_option("--text-encoder-lr,--text_encoder_lr", f->text_encoder_lr, "Text encoder learning rate (default: --lr)");
  c->add_flag("--train-text-encoder,--train_text_encoder", o.train_text_encoder,
              "Also train a LoRA on the text encoder (SD 1.x/2.x)");
  c->add_option("--batch,--train_batch_size", o.batch, "Batch size")->capture_default_str();
  c->add_option("--seed", o.seed, "Seed (LoRA init, data order, noise, timesteps)")->capture_default_str();
  c->add_option("--resolution", f->resolution, "Training resolution (default: the family's native size)");
  c->add_flag("--buckets,--enable_bucket", o.data_opts.buckets, "Aspect-ratio buckets (64-px steps, area <= resolution²)");
  c->add_option("--rank,--network_dim", o.rank, "LoRA rank")->capture_default_str();
  c->add_option("--alpha,--network_alpha", o.alpha, "LoRA alpha (scale alpha/rank)")->capture_default_str();
  c->add_flag("--shuffle-captions,--shuffle_caption", o.data_opts.shuffle_captions, "Shuffle comma-separated tags");
  c->add_option("--keep-tokens,--keep_tokens", o.data_opts.keep_tokens, "Tags kept in place when shuffling");
  c->add_option("--lr-scheduler,--lr_scheduler", o.lr_schedule, "constant, constant_with_warmup, linear, cosine")
      ->capture_default_str();
  c->add_option("--lr-warmup-steps,--lr_warmup_steps", o.warmup_steps, "Warmup steps")->capture_default_str();
  c->add_option("--max-grad-norm,--max_grad_norm", o.max_grad_norm, "Gradient clipping (0: off)")->capture_default_str();
  c->add_option("--min-snr-gamma,--min_snr_gamma", o.min_snr_gamma, "Min-SNR-γ weighting (0: off)");
  c->add_option("--noise-offset,--noise_offset", o.noise_offset, "Noise offset");
  c->add_option("--caption-dropout,--caption_dropout_rate", o.caption_dropout, "Caption dropout rate");
  c->add_option("--save-precision,--save_precision", o.save_precision, "fp16, bf16 or float")->capture_default_str();
  c->add_option("--save-every,--save_every_n_steps", o.save_every, "Write an intermediate LoRA every N steps");
  c->add_option("--validate-every", o.validate_every, "Validation loss every N steps (always at start and end)");
  c->add_flag("--strict", o.data_opts.strict, "An unreadable image is an error (default: skipped with a warning)");
  c->add_option("--precision,--mixed_precision", f->precision, "fp32 (kohya: no) or bf16 compute")->capture_default_str();
  c->add_option("--network-weights,--network_weights", o.network_weights,
                "Start from an existing LoRA (kohya .safetensors): its modules, rank and alpha");
  c->add_option("--conv-rank,--conv_dim", o.conv_rank,
                "LoCon: also LoRA on the UNet's ResNet blocks and resamplers, this rank on their 3×3 convolutions "
                "(their 1×1 shortcuts and time projections get --rank, as kohya's); 0: off");
  c->add_option("--conv-alpha,--conv_alpha", o.conv_alpha, "LoCon alpha")->capture_default_str();
  c->add_option("--reg-data,--reg_data_dir", o.reg_data, "Regularisation images (kohya's folder convention)");
  c->add_option("--prior-loss-weight,--prior_loss_weight", o.prior_loss_weight, "Loss weight of regularisation images")
      ->capture_default_str();
  c->add_option("--sample-prompt,--sample_prompt", o.sample_prompts, "Prompt for sample images (repeatable)");
  c->add_option("--sample-every,--sample_every_n_steps", o.sample_every, "Sample images every N steps (and at the end)");
  c->add_option("--sample-steps", o.sample_steps, "Sampling steps of sample images")->capture_default_str();
  c->add_option("--sample-cfg", o.sample_cfg, "Guidance scale of sample images")->capture_default_str();
  c->add_option("--sample-sampler", o.sample_sampler, "Sampler of sample images")->capture_default_str();
  c->add_option("--resume", o.resume, "Continue from a state file (OUT.state.safetensors, written with every saved LoRA)");
  c->callback([f] {});
}

}  // namespace

Run add_train_command(CLI::App& app) {
  CLI::App* train = app.add_subcommand("train", "Train models: a LoRA on captioned images; checks against PyTorch references");
  train->require_subcommand(1);
  auto lf = std::make_shared<LoraFlags>();
  add_lora_command(train, lf);
  auto f = std::make_shared<CheckFlags>();
  CLI::App* check = train->add_subcommand(
      "check", "Run the training code on a reference's inputs (fp32) and write losses, gradients and AdamW steps "
               "under the reference's key names");
  check->add_option("-m,--model", f->opt.model, "Model file or diffusers folder")->required();
  check->add_option("--inputs", f->opt.inputs, "Reference inputs (.safetensors: input.x0, input.noise, "
                                               "input.timesteps, input.encoder_hidden_states)")->required();
  check->add_option("--lora", f->opt.lora, "Initial LoRA (kohya .safetensors): its gradients and AdamW steps");
  check->add_option("--objective", f->objective, "Trained objective: eps or v")->capture_default_str();
  check->add_option("--min-snr-gamma", f->opt.min_snr_gamma, "Min-SNR-γ loss weighting (0: off)")->capture_default_str();
  check->add_option("--adamw-steps", f->opt.adamw_steps, "AdamW steps on the batch (needs --lora)")->capture_default_str();
  check->add_option("--lr", f->opt.lr, "AdamW learning rate")->capture_default_str();
  check->add_option("--weight-decay", f->opt.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  check->add_option("--full-grads", f->full_grads, "Comma-separated UNet parameters (diffusers names) whose "
                                                   "full fine-tuning gradients to write");
  check->add_option("-o,--output", f->opt.output, "Output .safetensors")->required();
  CLI::App* lora = train->get_subcommand("lora");
  return [f, check, lf, lora]() -> int {
    if (check->parsed()) return run_check(*f);
    if (lora->parsed()) return run_lora(*lf);
    return 1;
  };
}

}  // namespace diffuse::tools
