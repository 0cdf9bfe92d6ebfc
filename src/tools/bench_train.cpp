// `diffuse bench train`: the LoRA training step on a full-size checkpoint (UNet forward, backward
// with or without per-block recomputation, AdamW), timed per step, bf16 (default) or fp32
// compute; JSON on stdout. Random latents and text
// context stand in for the cached VAE latents and caption encodings (what a step computes does
// not depend on their values), so only the UNet is loaded.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "core/memory_stats.h"
#include "core/threads.h"
#include "models/sd_model.h"
#include "train/lora_network.h"
#include "train/objective.h"
#include "train/optim.h"
#include "train/unet_trainer.h"
#include "tools/bench_pipeline.h"

namespace diffuse::tools {

int run_train_bench(const PipelineBenchOptions& o, int threads, int rank, const std::string& precision,
                    const std::string& checkpointing) {
  using Clock = std::chrono::steady_clock;
  auto secs = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  if (threads > 0) set_num_threads(threads);
  bool synthetic = false;
  DF_CHECK(checkpointing == "on" || checkpointing == "off" || checkpointing == "both", "--checkpointing ",
           checkpointing, ": expected on, off or both");
  const std::string path = resolve_model(o, synthetic);
  auto be = make_cpu_backend(precision == "bf16" ? Precision::BF16 : Precision::F32);
  SDLoadOptions lo;
  lo.text_encoders = lo.vae_encoder = lo.vae_decoder = false;
  const auto t0 = Clock::now();
  std::unique_ptr<SDModel> model = SDModel::load(path, *be, lo);
  train::UNetTrainer trainer(*model, *be);
  const double load_s = secs(t0);
  auto net = train::LoraNetwork::create_unet(model->unet, rank, float(rank), 1);
  net->attach(trainer.grads());
  std::vector<train::Param*> params = net->params();
  train::AdamW adam(params, train::AdamWOptions{1e-4, 0.9, 0.999, 1e-8, 1e-2});
  const UNetConfig& u = model->unet_cfg;
  const int size = o.size > 0 ? o.size : u.text_time ? 1024 : model->family == Family::SD2 ? 768 : 512;
  const int64_t h = size / 8;
  std::mt19937 g(1);
  std::normal_distribution<float> n;
  auto randn = [&](const Shape& s) {
    Tensor t = Tensor::empty(s);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
    return t;
  };
  const Tensor x0 = randn({1, h, h, 4}), noise = randn({1, h, h, 4}), ctx = randn({1, 77, int64_t(u.context_dim)});
  Tensor te, ti;
  if (u.text_time) {
    te = randn({1, int64_t(u.projection_class_embeddings_input_dim - u.num_time_ids * u.addition_time_embed_dim)});
    ti = Tensor::full({1, int64_t(u.num_time_ids)}, float(size));
  }
  const train::DdpmSchedule sched = train::DdpmSchedule::sd();
  const std::string prec = precision_name(be->effective_precision());
  std::fprintf(stderr, "train bench: %s, %dx%d, LoRA rank %d (%zu modules), batch 1, %s, %d threads\n", o.model.c_str(),
               size, size, rank, net->modules().size(), prec.c_str(), num_threads());
  // One mode's steps: their times and the process's peak RSS after them (with checkpointing first,
  // the lighter mode, so that each mode's peak is its own).
  auto run_mode = [&](bool checkpointing) {
    trainer.set_checkpointing(checkpointing);
    std::vector<double> steps;
    for (int s = 0; s < o.steps; ++s) {
      const auto ts = Clock::now();
      const train::NoisedBatch nb =
          train::make_noised_batch(sched, x0, noise, {100 + (97 * s) % 900}, train::Objective::Eps);
      adam.zero_grad();
      trainer.run(nb, ctx, {}, true, 1.0f, te.defined() ? &te : nullptr, ti.defined() ? &ti : nullptr);
      train::clip_grad_norm(params, 1.0);
      adam.step();
      steps.push_back(secs(ts));
      std::fprintf(stderr, "  %s checkpointing: step %d/%d  %.2f s\n", checkpointing ? "with" : "without", s + 1,
                   o.steps, steps.back());
    }
    std::vector<double> sorted = steps;
    std::sort(sorted.begin(), sorted.end());
    const double med = sorted.empty() ? 0
                       : sorted.size() % 2 ? sorted[sorted.size() / 2]
                                           : 0.5 * (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]);
    nlohmann::json m;
    m["gradient_checkpointing"] = checkpointing;
    m["step_s"] = steps;
    m["step_s_median"] = std::round(med * 1000) / 1000;
    m["images_per_s"] = med > 0 ? std::round(1000.0 / med) / 1000 : 0;
    m["peak_rss_gb"] = std::round(double(peak_rss_bytes()) / 1e6) / 1000;
    return m;
  };
  nlohmann::json j;
  j["what"] = "train";
  j["model"] = o.model;
  j["checkpoint"] = path;
  j["synthetic"] = synthetic;
  j["size"] = size;
  j["steps"] = o.steps;
  j["batch"] = 1;
  j["lora_rank"] = rank;
  j["lora_modules"] = net->modules().size();
  j["precision"] = prec;
  j["threads"] = num_threads();
  j["load_s"] = std::round(load_s * 1000) / 1000;
  // The headline figures are with gradient checkpointing (per block); "modes" has both.
  nlohmann::json modes = nlohmann::json::array();
  if (checkpointing != "off") modes.push_back(run_mode(true));
  if (checkpointing != "on") modes.push_back(run_mode(false));
  for (const char* k : {"gradient_checkpointing", "step_s", "step_s_median", "images_per_s", "peak_rss_gb"})
    j[k] = modes[0][k];
  j["modes"] = modes;
  std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

}  // namespace diffuse::tools
