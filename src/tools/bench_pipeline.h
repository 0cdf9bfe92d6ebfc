// `diffuse bench` (the default, "pipeline"): a full-size txt2img run timed stage by stage, JSON on
// stdout. Registered by cmd_bench.cpp beside `diffuse bench ops`.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "api/engine.h"

namespace diffuse::tools {

struct PipelineBenchOptions {
  std::string model = "sd15";  // sd15 | sd21 | sdxl (synthetic, written on first use) or a checkpoint path
  int size = 0;                // pixels (square); 0: the model's native size
  int steps = 20;
  double cfg = 7.0;
  std::string sampler = "euler";
  int runs = 1;               // processes (each a cold start); the JSON holds the medians
  std::string weights = "native";
  std::string vae_tiling = "auto";
  bool decode_only = false;   // time only the VAE decode of a random latent
  bool quality = false;       // compare final latents of fp32, bf16 and int8 runs (same seed)
  std::string cache_dir;      // where synthetic checkpoints are kept
  bool profile = false;       // time every op call by class, and each conv/matmul shape alone
  bool contention = false;    // one process alone, then two at once: the step's slowdown
};

// The checkpoint `o.model` names: a path as it is, or sd15/sd21/sdxl's synthetic checkpoint (written
// into the cache folder on first use; `synthetic` says so).
std::string resolve_model(const PipelineBenchOptions& o, bool& synthetic);
// The engine settings `bench` and `bench lora` run with (threads, precision, weight format).
api::EngineOptions bench_engine_options(const PipelineBenchOptions& o, int threads, const std::string& precision);
// `diffuse bench lora`: model load vs LoRA switches in the loaded model (engine), as JSON.
int run_lora_bench(const PipelineBenchOptions& o, int threads, const std::string& precision, int rank, int repeats);

// `diffuse bench train`: the LoRA training step (rank `rank`, batch 1, fp32) on o.model at o.size,
// o.steps timed steps, as JSON (bench_train.cpp).
int run_train_bench(const PipelineBenchOptions& o, int threads, int rank, const std::string& precision,
                    const std::string& checkpointing);

void add_pipeline_bench_options(CLI::App* cmd, PipelineBenchOptions& o);
int run_pipeline_bench(const PipelineBenchOptions& o, int threads, const std::string& precision);
// `diffuse bench quality`: the same txt2img run in fp32, bf16 and int8 weights; cosine similarity
// and max |Δ| of the final latents against fp32, as JSON.
int run_quality_bench(const PipelineBenchOptions& o, int threads);

}  // namespace diffuse::tools
