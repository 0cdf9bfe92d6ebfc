// `diffuse train full`: full fine-tuning of the UNet (and optionally the text encoder) into a
// single-file checkpoint in the original layout (src/train/full_trainer.h).
#include <cmath>
#include <cstdio>
#include <memory>

#include "tools/commands.h"
#include "tools/train_flags.h"
#include "train/full_trainer.h"

namespace diffuse::tools {

namespace {

struct FullFlags {
  train::FullTrainOptions o;
  RunFlags run;
  double ema = std::nan("");  // not given
  bool use_ema = false, no_ema_warmup = false;
};

int run_full(FullFlags& f) {
  train::FullTrainOptions& o = f.o;
  finish_run_flags(o, f.run);
  const bool given = !std::isnan(f.ema);
  DF_CHECK(!given || (f.ema >= 0 && f.ema < 1), "--ema ", f.ema, ": the EMA decay must be in [0, 1)");
  o.ema = given ? f.ema : f.use_ema ? 0.9999 : -1;  // --use_ema: diffusers' EMAModel default decay
  DF_CHECK(!f.no_ema_warmup || o.ema >= 0, "--no-ema-warmup: only with --ema DECAY (or --use_ema)");
  o.ema_warmup = !f.no_ema_warmup;
  train::train_full(o, [](const std::string& line, bool) { std::fprintf(stderr, "%s\n", line.c_str()); });
  return 0;
}

}  // namespace

std::pair<CLI::App*, Run> add_train_full_command(CLI::App* train) {
  CLI::App* c = train->add_subcommand(
      "full", "Fine-tune every UNet weight (and optionally the text encoder) on captioned images; writes a single-file "
              "checkpoint in the original layout");
  auto f = std::make_shared<FullFlags>();
  add_run_flags(c, f->o, f->run, "checkpoint");
  c->get_option("--model")->description("Base model: a single-file checkpoint (.safetensors or .ckpt, original layout)");
  c->add_flag("--train-text-encoder,--train_text_encoder", f->o.train_text_encoder,
              "Also train the text encoder's layers (SD 1.x/2.x; its embeddings stay frozen)");
  c->add_flag("--train-embeddings,--train_embeddings", f->o.train_embeddings,
              "With --train-text-encoder: train its token and position embeddings too (a model trained from scratch)");
  c->add_option("--ema", f->ema,
                "Keep an EMA of the weights with this decay in [0, 1) (after each step: ema = d*ema + (1-d)*w); the "
                "checkpoint holds the EMA weights");
  c->add_flag("--use_ema", f->use_ema, "diffusers: --ema 0.9999");
  c->add_flag("--no-ema-warmup", f->no_ema_warmup,
              "Constant EMA decay from the first step (default: diffusers' warmup, decay min(d, k/(9+k)) at step k > 1, "
              "0 at step 1)");
  c->add_option("--save-every,--save_every_n_steps", f->o.save_every,
                "Write an intermediate checkpoint and the training state every N steps");
  c->add_option("--resume", f->o.resume, "Continue from a state file (OUT.state.safetensors, written with every "
                                         "intermediate checkpoint)");
  return {c, [f] { return run_full(*f); }};
}

}  // namespace diffuse::tools
