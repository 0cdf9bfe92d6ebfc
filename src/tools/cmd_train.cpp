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
#include "tools/train_flags.h"
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
  RunFlags run;
};

int run_lora(LoraFlags& f) {
  train::LoraTrainOptions& o = f.o;
  if (!o.network_weights.empty()) check_input_file(o.network_weights, "--network-weights");
  finish_run_flags(o, f.run);
  train::train_lora(o, [](const std::string& line, bool progress) { std::fprintf(stderr, "%s\n", line.c_str()); });
  return 0;
}

void add_lora_command(CLI::App* train, std::shared_ptr<LoraFlags> f) {
  CLI::App* c = train->add_subcommand("lora", "Train a LoRA on a folder of captioned images (kohya's layout and file format)");
  train::LoraTrainOptions& o = f->o;
  add_run_flags(c, o, f->run, "LoRA");
  c->add_flag("--train-text-encoder,--train_text_encoder", o.train_text_encoder,
              "Also train a LoRA on the text encoder (SDXL: both encoders)");
  c->add_option("--rank,--network_dim", o.rank, "LoRA rank")->capture_default_str();
  c->add_option("--alpha,--network_alpha", o.alpha, "LoRA alpha (scale alpha/rank)")->capture_default_str();
  c->add_option("--save-every,--save_every_n_steps", o.save_every, "Write an intermediate LoRA every N steps");
  c->add_option("--network-weights,--network_weights", o.network_weights,
                "Start from an existing LoRA (kohya .safetensors): its modules, rank and alpha");
  c->add_option("--conv-rank,--conv_dim", o.conv_rank,
                "LoCon: also LoRA on the UNet's ResNet blocks and resamplers, this rank on their 3×3 convolutions "
                "(their 1×1 shortcuts and time projections get --rank, as kohya's); 0: off");
  c->add_option("--conv-alpha,--conv_alpha", o.conv_alpha, "LoCon alpha")->capture_default_str();
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
  CLI::App* train = app.add_subcommand("train", "Train models: a LoRA, a full fine-tune or a VAE on (captioned) images; checks against PyTorch references");
  train->require_subcommand(1);
  auto lf = std::make_shared<LoraFlags>();
  add_lora_command(train, lf);
  const auto full = add_train_full_command(train);
  const auto vae = add_train_vae_command(train);
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
  return [f, check, lf, lora, full, vae]() -> int {
    if (full.first->parsed()) return full.second();
    if (vae.first->parsed()) return vae.second();
    if (check->parsed()) return run_check(*f);
    if (lora->parsed()) return run_lora(*lf);
    return 1;
  };
}

}  // namespace diffuse::tools
