// Sample images during LoRA training (see sample_images.h).
#include "train/sample_images.h"

#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "io/image.h"
#include "pipeline/generate.h"

namespace diffuse::train {

namespace fs = std::filesystem;

void check_sample_settings(const SampleSettings& s) {
  if (s.prompts.empty()) return;
  DF_CHECK(s.every >= 0, "--sample-every ", s.every, ": must be 0 (at the end only) or a number of steps");
  DF_CHECK(s.steps >= 1 && s.steps <= 1000, "--sample-steps ", s.steps, ": must be in [1, 1000]");
  DF_CHECK(std::isfinite(s.cfg) && s.cfg >= 0, "--sample-cfg ", s.cfg, ": must be a finite number >= 0");
  for (const std::string& p : s.prompts) DF_CHECK(!p.empty(), "--sample-prompt: an empty prompt");
  try {
    make_scheduler(s.sampler, "default", s.prediction);
  } catch (const Error& e) {
    fail("--sample-sampler ", s.sampler, ": ", e.what());
  }
}

bool sample_due(const SampleSettings& s, int step, int total) {
  return !s.prompts.empty() && (step == total || (s.every > 0 && step % s.every == 0));
}

std::string sample_path(const std::string& output, int step, size_t index) {
  const fs::path p(output);
  return (p.parent_path() / (p.stem().string() + "-sample" + std::to_string(step) + "-" + std::to_string(index) + ".png"))
      .string();
}

namespace {

// The target component of a kohya key, and the module path after its prefix.
void split_kohya_key(const std::string& key, LoraEntry& e) {
  static const std::pair<const char*, LoraTarget> kPrefixes[] = {{"lora_unet_", LoraTarget::UNet},
                                                                  {"lora_te1_", LoraTarget::TextEncoder},
                                                                  {"lora_te2_", LoraTarget::TextEncoder2},
                                                                  {"lora_te_", LoraTarget::TextEncoder}};
  for (const auto& [prefix, target] : kPrefixes) {
    const std::string pre = prefix;
    if (key.compare(0, pre.size(), pre) == 0) {
      e.target = target;
      e.module = key.substr(pre.size());
      e.underscored = true;
      return;
    }
  }
  fail("sample images: LoRA module ", key, " has no kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)");
}

// Each prompt generated and written; returns the paths.
std::vector<std::string> generate_prompts(const SDModel& model, Backend& be, const SampleSettings& s, int step,
                                          const std::string& output,
                                          const std::function<void(const std::string&)>& log) {
  std::vector<std::string> written;
  for (size_t i = 0; i < s.prompts.size(); ++i) {
    GenerateParams p;
    p.prompt = s.prompts[i];
    p.width = s.width, p.height = s.height;
    p.steps = s.steps, p.cfg = s.cfg, p.seed = s.seed, p.sampler = s.sampler, p.prediction = s.prediction;
    p.zero_terminal_snr = s.zero_terminal_snr;
    p.on_warning = log;
    const std::vector<Result> r = generate(model, be, p);
    DF_ASSERT(r.size() == 1);
    const std::string path = sample_path(output, step, i);
    write_png(path, r[0].image);
    log("sample: wrote " + path + " (step " + std::to_string(step) + ", \"" + s.prompts[i] + "\")");
    written.push_back(path);
  }
  return written;
}

}  // namespace

LoraFile lora_file_of(LoraNetwork& net, const std::string& name) {
  LoraFile f;
  f.path = f.name = name;
  for (const LoraModule& m : net.modules()) {
    LoraEntry e;
    e.key = m.key;
    split_kohya_key(m.key, e);
    e.down = m.down.value;
    e.up = m.up.value;
    e.has_alpha = true;
    e.alpha = m.alpha;
    f.entries.push_back(std::move(e));
  }
  return f;
}

std::vector<std::string> write_samples(SDModel& model, Backend& be, LoraNetwork& net, const SampleSettings& s,
                                       int step, const std::string& output,
                                       const std::function<void(const std::string&)>& log) {
  const LoraFile lora = lora_file_of(net, fs::path(output).stem().string() + " (training)");
  const LoraApplyReport rep = apply_loras(model, be, {{&lora, 1.0f}});
  std::vector<std::string> written;
  try {
    DF_CHECK(rep.unmatched.empty(), "sample images: the LoRA in training does not merge into ", model.path, ": ",
             rep.summary());
    written = generate_prompts(model, be, s, step, output, log);
  } catch (...) {
    try {
      apply_loras(model, be, {});
    } catch (const Error&) {  // the first failure is the one to report
    }
    throw;
  }
  apply_loras(model, be, {});  // the base weights again, for training
  return written;
}

}  // namespace diffuse::train
