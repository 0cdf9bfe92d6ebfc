// `diffuse bench lora`: what a LoRA switch costs in a loaded model, against loading the model.
// Two synthetic LoRAs (kohya's default target set: every linear / 1×1 conv inside the UNet's
// transformer blocks and the text encoders' attention and MLP layers; random f16 matrices of
// --lora-rank) are written next to the checkpoint's cache; the engine loads the model (median of 3
// loads, each into a fresh engine) and switches A -> none -> B -> A ... in one loaded model.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "api/engine.h"
#include "core/error.h"
#include "core/memory_stats.h"
#include "core/threads.h"
#include "io/tensor_file.h"
#include "models/name_map.h"
#include "tools/bench_pipeline.h"

namespace diffuse::tools {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double secs_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
double r3(double v) { return std::round(v * 1000) / 1000; }
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

bool kohya_target(const std::string& name, bool unet) {
  auto ends = [&](const char* x) {
    const std::string s = x;
    return name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  if (unet) return name.find("attentions.") != std::string::npos && name.find("norm") == std::string::npos;
  return ends("_proj.weight") || ends("fc1.weight") || ends("fc2.weight");
}

Tensor random_f16(const Shape& s, std::mt19937& rng, float scale) {
  std::normal_distribution<float> nd(0.0f, scale);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = nd(rng);
  return t.to(DType::F16);
}

// A PEFT-style LoRA on the model file's modules; returns the number of modules.
int write_synthetic_lora(const std::string& model_path, Family family, const std::string& out, int rank, uint32_t seed) {
  TensorFile f = open_model_file(model_path);
  std::mt19937 rng(seed);
  std::vector<std::pair<std::string, Tensor>> tensors;
  int modules = 0;
  const std::pair<Component, const char*> comps[] = {
      {Component::UNet, "unet"}, {Component::TextEncoder, "text_encoder"}, {Component::TextEncoder2, "text_encoder_2"}};
  for (const auto& [c, prefix] : comps) {
    if (c == Component::TextEncoder2 && family != Family::SDXL) continue;
    WeightStore w = component_weights(f, c, family);
    for (const std::string& n : w.names()) {
      const Tensor* t = w.find(n);
      const bool linear = t->rank() == 2 || (t->rank() == 4 && t->dim(2) == 1 && t->dim(3) == 1);
      if (!linear || !kohya_target(n, c == Component::UNet) || n.find("embeddings") != std::string::npos) continue;
      const std::string mod = n.substr(0, n.size() - std::string(".weight").size());
      const int64_t O = t->dim(0), I = t->dim(1);
      tensors.emplace_back(std::string(prefix) + "." + mod + ".lora_A.weight", random_f16({rank, I}, rng, 0.02f));
      tensors.emplace_back(std::string(prefix) + "." + mod + ".lora_B.weight", random_f16({O, rank}, rng, 0.02f));
      ++modules;
    }
  }
  save_safetensors(out, tensors);
  return modules;
}

}  // namespace

int run_lora_bench(const PipelineBenchOptions& o, int threads, const std::string& precision, int rank, int repeats) {
  bool synthetic = false;
  const std::string path = resolve_model(o, synthetic);
  api::EngineOptions eo = bench_engine_options(o, threads, precision);

  // The LoRA files, beside the synthetic checkpoints (or in the temp folder for a real one).
  Family family;
  {
    TensorFile f = open_model_file(path);
    family = summarize_model(f).family;
  }
  DF_CHECK(family != Family::Unknown, path, ": not a Stable Diffusion checkpoint");
  const fs::path dir = synthetic ? fs::path(path).parent_path() : fs::temp_directory_path();
  const std::string stem = fs::path(path).stem().string() + "-r" + std::to_string(rank);
  const std::string la = (dir / (stem + "-lora-a.safetensors")).string(), lb = (dir / (stem + "-lora-b.safetensors")).string();
  int modules = 0;
  for (const auto& [file, seed] : {std::pair{la, 1u}, std::pair{lb, 2u}}) {
    std::fprintf(stderr, "bench lora: writing %s\n", file.c_str());
    modules = write_synthetic_lora(path, family, file, rank, seed);
  }

  // Model loads, each into a fresh engine (the file's pages are cached after the first).
  std::vector<double> loads;
  std::unique_ptr<api::Engine> engine;
  for (int i = 0; i < 3; ++i) {
    engine.reset();
    return_free_memory();
    engine = std::make_unique<api::Engine>(eo);
    const Clock::time_point t0 = Clock::now();
    engine->load(path);
    loads.push_back(secs_since(t0));
    std::fprintf(stderr, "  load %d: %.2f s\n", i + 1, loads.back());
  }

  // Switches in the last engine's model: A, none, B, A, none, B, ...
  const std::vector<std::vector<api::LoraSpec>> sets = {{{la, 1.0f}}, {}, {{lb, 0.7f}}};
  std::vector<double> switches;
  nlohmann::json each = nlohmann::json::array();
  const int n = std::max(repeats, 3);
  int matched = 0;
  for (int i = 0; i < n; ++i) {
    const auto& set = sets[size_t(i) % sets.size()];
    const Clock::time_point t0 = Clock::now();
    LoraApplyReport rep = engine->set_loras(path, set);
    const double s = secs_since(t0);
    if (!set.empty()) matched = rep.matched;
    switches.push_back(s);
    each.push_back({{"to", set.empty() ? "none" : fs::path(set[0].path).filename().string()}, {"s", r3(s)}});
    std::fprintf(stderr, "  switch to %s: %.3f s (%d modules)\n", set.empty() ? "none" : set[0].path.c_str(), s,
                 rep.matched);
  }
  const double load_med = median(loads), switch_med = median(switches);
  nlohmann::json out = {{"model", o.model},
                        {"checkpoint", path},
                        {"family", family_name(family)},
                        {"precision", eo.precision},
                        {"weights", eo.weights},
                        {"threads", num_threads()},
                        {"cpu", cpu_features().str()},
                        {"lora_rank", rank},
                        {"lora_modules", modules},
                        {"lora_modules_matched", matched},
                        {"load_s", nlohmann::json::array()},
                        {"load_s_median", r3(load_med)},
                        {"switch_s_median", r3(switch_med)},
                        {"switch_s_max", r3(*std::max_element(switches.begin(), switches.end()))},
                        {"switches", each},
                        {"switch_over_load", std::round(switch_med / load_med * 1000) / 1000}};
  for (double l : loads) out["load_s"].push_back(r3(l));
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace diffuse::tools
