// `diffuse generate`: txt2img, img2img (-i) and inpainting (-i --mask) to PNG files with A1111's
// `parameters` text chunk, optionally the final latents as safetensors.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/threads.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "models/canny.h"
#include "models/controlnet.h"
#include "models/lora.h"
#include "pipeline/generate.h"
#include "tools/commands.h"
#include "tools/sha256.h"

#ifndef DIFFUSE_VERSION
#define DIFFUSE_VERSION "0.1.0"
#endif

namespace diffuse::tools {
namespace {

namespace fs = std::filesystem;

struct GenOptions {
  std::string model, prompt, negative;
  int width = 0, height = 0, steps = 20;
  double cfg = 7.0;
  int64_t seed = -1;
  std::string sampler = "euler_a", schedule = "default";
  int batch = 1, clip_skip = 0, threads = 0;
  std::string rng = "cuda", precision = "auto", prediction;
  std::string weights = "native";  // --weights native|int8
  std::string init, mask;
  double strength = -1.0;  // < 0: not given
  std::string out = "out.png", save_latent;
  bool quiet = false;
  bool width_given = false, height_given = false;
  std::vector<std::string> loras;  // --lora PATH[:MULT], repeatable
  std::string lora_dir;            // --lora-model-dir: where <lora:NAME:MULT> prompt tags are looked up
  std::string control_net, control_image;
  double control_strength = 1.0;
  bool canny = false;
  bool vae_tiling = false, no_vae_tiling = false;  // neither: automatic (above 1024² pixels)
  int vae_tile_size = 0;                             // 0: VAETiling's default
  int canny_low = 100, canny_high = 200;
};

// "path/to/file.safetensors:0.8" -> (path, 0.8); "file.safetensors" -> (file, 1). Only a suffix
// that parses as a number is a multiplier, so paths containing ':' still work.
std::pair<std::string, float> split_lora_flag(const std::string& v) {
  size_t colon = v.rfind(':');
  if (colon != std::string::npos && colon + 1 < v.size()) {
    char* end = nullptr;
    std::string tail = v.substr(colon + 1);
    float m = std::strtof(tail.c_str(), &end);
    if (end && *end == '\0' && std::isfinite(m)) return {v.substr(0, colon), m};
  }
  return {v, 1.0f};
}

struct AppliedLora {
  std::string name, path, hash;
  float mult;
};

// Loads the --lora files and the prompt's <lora:NAME:MULT> tags, merges them into the model, and
// returns what was applied (for the PNG parameters). `prompt` loses its tags.
std::vector<AppliedLora> apply_cli_loras(const GenOptions& o, std::string& prompt, SDModel& model, Backend& be) {
  std::vector<AppliedLora> applied;
  for (const std::string& v : o.loras) {
    auto [path, mult] = split_lora_flag(v);
    std::error_code ec;
    DF_CHECK(fs::is_regular_file(path, ec), "--lora ", path, ": no such file");
    applied.push_back({fs::path(path).stem().string(), path, "", mult});
  }
  std::vector<std::pair<std::string, float>> tags;
  prompt = extract_lora_tags(prompt, &tags);
  for (const auto& [name, mult] : tags) {
    DF_CHECK(!o.lora_dir.empty(), "prompt tag <lora:", name, ">: give --lora-model-dir DIR to say where LoRA files are");
    applied.push_back({name, resolve_lora_path(name, o.lora_dir), "", mult});
  }
  if (applied.empty()) return applied;
  std::vector<LoraFile> files;
  files.reserve(applied.size());
  std::vector<std::pair<const LoraFile*, float>> set;
  for (AppliedLora& a : applied) {
    files.push_back(load_lora(a.path));
    set.emplace_back(&files.back(), a.mult);
    a.hash = lora_hash(a.path);
  }
  LoraApplyReport rep = apply_loras(model, be, set);
  if (!o.quiet || !rep.unmatched.empty()) std::fprintf(stderr, "%s\n", rep.summary().c_str());
  return applied;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string num(double v) {  // 7 -> "7", 7.5 -> "7.5"
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// out.png, out_1.png, out_2.png, ...
std::string batch_path(const std::string& out, int i) {
  if (i == 0) return out;
  fs::path p(out);
  fs::path name = p.stem().string() + "_" + std::to_string(i) + p.extension().string();
  return (p.parent_path() / name).string();
}

// Prediction type: --prediction, else a diffusers scheduler config's prediction_type, else the
// family default (SD 2.x: v, with a note on stderr).
Prediction decide_prediction(const GenOptions& o, Family family, bool quiet) {
  if (o.prediction == "eps" || o.prediction == "epsilon") return Prediction::Epsilon;
  if (o.prediction == "v" || o.prediction == "v_prediction") return Prediction::VPrediction;
  DF_CHECK(o.prediction.empty(), "--prediction ", o.prediction, ": unknown; allowed: eps, v");
  std::string cfg_text;
  std::error_code ec;
  if (fs::is_directory(o.model, ec)) {
    std::ifstream f(fs::path(o.model) / "scheduler" / "scheduler_config.json");
    if (f) cfg_text.assign(std::istreambuf_iterator<char>(f), {});
  } else if (fs::path(o.model).extension() == ".safetensors") {
    TensorFile tf = load_safetensors(o.model);
    auto it = tf.metadata.find("scheduler/scheduler_config.json");
    if (it != tf.metadata.end()) cfg_text = it->second;
  }
  if (!cfg_text.empty()) {
    nlohmann::json j = nlohmann::json::parse(cfg_text, nullptr, false);
    if (j.is_object() && j.contains("prediction_type") && j["prediction_type"].is_string()) {
      std::string t = j["prediction_type"];
      if (t == "v_prediction") return Prediction::VPrediction;
      if (t == "epsilon") return Prediction::Epsilon;
    }
  }
  if (family == Family::SD2) {
    if (!quiet)
      std::fprintf(stderr, "diffuse: SD 2.x checkpoint without a scheduler config: assuming v-prediction "
                           "(768 models); --prediction eps overrides\n");
    return Prediction::VPrediction;
  }
  return Prediction::Epsilon;
}

std::string schedule_display(const std::string& s) {
  if (s == "karras") return "Karras";
  if (s == "trailing") return "SGM Uniform";
  return "";
}

// A1111's `parameters` text.
std::string infotext(const GenerateParams& p, const std::string& prompt_text, const Result& r, int pos,
                     const std::string& hash, const std::string& model_name, const std::vector<AppliedLora>& loras,
                     const std::string& control_text) {
  std::string s = prompt_text;
  if (!p.negative.empty()) s += "\nNegative prompt: " + p.negative;
  s += "\nSteps: " + std::to_string(p.steps) + ", Sampler: " + sampler_display_name(p.sampler);
  std::string st = schedule_display(p.schedule);
  if (!st.empty()) s += ", Schedule type: " + st;
  s += ", CFG scale: " + num(p.cfg) + ", Seed: " + std::to_string(r.seed);
  s += ", Size: " + std::to_string(p.width) + "x" + std::to_string(p.height);
  if (!hash.empty()) s += ", Model hash: " + hash;
  s += ", Model: " + model_name;
  if (p.init) s += ", Denoising strength: " + num(p.strength);
  if (p.clip_skip > 1) s += ", Clip skip: " + std::to_string(p.clip_skip);
  if (p.rng == RngKind::Cpu) s += ", RNG: CPU";
  if (p.batch > 1) s += ", Batch size: " + std::to_string(p.batch) + ", Batch pos: " + std::to_string(pos);
  if (!loras.empty()) {
    std::vector<std::pair<std::string, std::string>> nh;
    for (const AppliedLora& l : loras) nh.emplace_back(l.name, l.hash);
    s += ", Lora hashes: " + format_lora_hashes(nh);
  }
  if (!control_text.empty()) s += ", ControlNet 0: \"" + control_text + "\"";
  s += ", Version: diffuse " DIFFUSE_VERSION;
  return s;
}

// Progress on stderr: a \r-updated line on a terminal, plain lines otherwise.
class Progress {
 public:
  Progress(bool quiet) : quiet_(quiet), tty_(isatty(2) == 1) {}
  void operator()(Stage s, int done, int total) {
    if (quiet_) return;
    auto now = std::chrono::steady_clock::now();
    if (s == Stage::Encode) {
      if (done == 0) std::fprintf(stderr, "encoding the prompt\n");
      start_ = now;  // the denoising loop starts when encoding ends
      return;
    }
    if (s == Stage::Decode) {
      if (done < total) std::fprintf(stderr, "VAE decode %d/%d\n", done + 1, total);
      return;
    }
    if (done == 1) first_ = now;  // the first step includes one-time set-up; rates count from its end
    double el = std::chrono::duration<double>(now - first_).count();
    double tot = std::chrono::duration<double>(now - start_).count();
    char rate[48] = "";
    double per = done > 1 ? el / (done - 1) : tot;  // seconds per step
    if (per > 0) {
      if (per < 1.0) std::snprintf(rate, sizeof rate, "%.2f it/s", 1.0 / per);
      else std::snprintf(rate, sizeof rate, "%.2f s/it", per);
    }
    int eta = int(std::lround(per * (total - done)));
    char line[160];
    std::snprintf(line, sizeof line, "step %d/%d  %s  ETA %d:%02d", done, total, rate, eta / 60, eta % 60);
    if (tty_) {
      const int width = 30;
      int fill = total > 0 ? done * width / total : width;
      std::string bar = "[" + std::string(size_t(fill), '#') + std::string(size_t(width - fill), ' ') + "] ";
      std::fprintf(stderr, "\r%s%s\033[K%s", bar.c_str(), line, done == total ? "\n" : "");
    } else {
      std::fprintf(stderr, "%s\n", line);
    }
    std::fflush(stderr);
  }

 private:
  bool quiet_, tty_;
  std::chrono::steady_clock::time_point start_{}, first_{};
};

int run_generate(GenOptions o) {
  // Validate everything cheap before loading the model.
  std::error_code ec;
  DF_CHECK(!o.model.empty(), "-m/--model: a model file or diffusers folder is required");
  DF_CHECK(fs::exists(o.model, ec), "-m/--model ", o.model, ": no such file or folder");
  DF_CHECK(o.rng == "cpu" || o.rng == "cuda", "--rng ", o.rng, ": unknown; allowed: cpu, cuda");
  DF_CHECK(o.precision == "fp32" || o.precision == "bf16" || o.precision == "auto", "--precision ", o.precision,
           ": unknown; allowed: fp32, bf16, auto");
  DF_CHECK(o.weights == "native" || o.weights == "int8", "--weights ", o.weights, ": unknown; allowed: native, int8");
  DF_CHECK(o.schedule == "default" || o.schedule == "karras" || o.schedule == "trailing", "--scheduler ", o.schedule,
           ": unknown; allowed: default, karras, trailing");
  DF_CHECK(o.prediction.empty() || o.prediction == "eps" || o.prediction == "v" || o.prediction == "epsilon" ||
               o.prediction == "v_prediction",
           "--prediction ", o.prediction, ": unknown; allowed: eps, v");
  try {
    make_scheduler(o.sampler, o.schedule, Prediction::Epsilon);
  } catch (const Error& e) {
    const auto& names = sampler_names();
    if (std::find(names.begin(), names.end(), o.sampler) == names.end())
      fail("--sampler ", o.sampler, ": unknown; allowed: ", join(names));
    fail("--sampler ", o.sampler, " --scheduler ", o.schedule, ": ", e.what());
  }
  DF_CHECK(o.steps >= 1 && o.steps <= 10000, "--steps ", o.steps, ": must be in [1, 10000]");
  DF_CHECK(o.batch >= 1 && o.batch <= 64, "-b/--batch ", o.batch, ": must be in [1, 64]");
  DF_CHECK(o.clip_skip >= 0 && o.clip_skip <= 12, "--clip-skip ", o.clip_skip, ": must be in [0, 12]");
  DF_CHECK(o.threads >= 0, "-t/--threads ", o.threads, ": must be >= 0 (0: all physical cores)");
  DF_CHECK(std::isfinite(o.cfg) && o.cfg >= 0, "--cfg-scale ", o.cfg, ": must be a number >= 0");
  DF_CHECK(o.strength < 0 || o.strength <= 1.0, "--strength ", o.strength, ": must be in [0, 1]");
  DF_CHECK(o.mask.empty() || !o.init.empty(), "--mask needs an init image: give -i/--init too");
  DF_CHECK(o.strength < 0 || !o.init.empty(), "--strength applies to img2img/inpainting: give -i/--init too");
  if (o.width_given) DF_CHECK(o.width > 0 && o.width % 8 == 0, "-W/--width ", o.width, ": must be a positive multiple of 8");
  if (o.height_given)
    DF_CHECK(o.height > 0 && o.height % 8 == 0, "-H/--height ", o.height, ": must be a positive multiple of 8");
  DF_CHECK(!o.out.empty(), "-o/--output: empty path");
  DF_CHECK(!(o.vae_tiling && o.no_vae_tiling), "--vae-tiling and --no-vae-tiling contradict each other: give one");
  DF_CHECK(o.vae_tile_size == 0 || (o.vae_tile_size >= 2 * VAETiling{}.overlap_px && o.vae_tile_size % 8 == 0),
           "--vae-tile-size ", o.vae_tile_size, ": must be a multiple of 8 and at least ", 2 * VAETiling{}.overlap_px);
  DF_CHECK(o.control_net.empty() == o.control_image.empty(),
           o.control_net.empty() ? "--control-image needs --control-net PATH" : "--control-net needs --control-image IMG");
  DF_CHECK(!o.canny || !o.control_image.empty(), "--canny needs --control-net and --control-image");
  DF_CHECK(std::isfinite(o.control_strength) && o.control_strength >= 0 && o.control_strength <= 10,
           "--control-strength ", o.control_strength, ": must be in [0, 10]");
  DF_CHECK(o.canny_low >= 0 && o.canny_low <= o.canny_high && o.canny_high <= 1020, "--canny-low ", o.canny_low,
           " / --canny-high ", o.canny_high, ": need 0 <= low <= high <= 1020");
  // Fail before a long run rather than after it.
  for (auto [flag, path] : {std::pair<const char*, std::string>{"-o/--output", o.out}, {"--save-latent", o.save_latent}}) {
    fs::path dir = fs::path(path).parent_path();
    DF_CHECK(path.empty() || dir.empty() || fs::is_directory(dir, ec), flag, " ", path, ": folder ", dir.string(),
             " does not exist");
  }

  Image init, mask;
  if (!o.init.empty()) {
    init = to_rgb(read_image(o.init));
    if (!o.width_given) o.width = init.width;
    if (!o.height_given) o.height = init.height;
    DF_CHECK(init.width == o.width && init.height == o.height, "-i/--init ", o.init, " is ", init.width, "x",
             init.height, " but the output size is ", o.width, "x", o.height,
             ": images are not resized; give an image of the output size (or leave -W/-H out)");
    DF_CHECK(init.width % 8 == 0 && init.height % 8 == 0, "-i/--init ", o.init, " is ", init.width, "x", init.height,
             ": width and height must be multiples of 8");
  }
  if (!o.mask.empty()) {
    mask = read_image(o.mask);
    DF_CHECK(mask.width == init.width && mask.height == init.height, "--mask ", o.mask, " is ", mask.width, "x",
             mask.height, " but the init image is ", init.width, "x", init.height, ": they must be the same size");
  }

  Image control_image;
  if (!o.control_image.empty()) control_image = to_rgb(read_image(o.control_image));

  set_num_threads(o.threads);
  Precision prec = Precision::F32;
  if (o.precision == "bf16" || (o.precision == "auto" && cpu_features().bf16_fast())) prec = Precision::BF16;
  auto be = make_cpu_backend(prec, o.weights == "int8" ? WeightFormat::Int8 : WeightFormat::Native);

  uint64_t seed;
  if (o.seed >= 0) {
    seed = uint64_t(o.seed);
  } else {
    std::random_device rd;
    seed = rd() % 4294967294u;
  }

  // The model hash runs alongside loading and generation.
  const bool is_dir = fs::is_directory(o.model, ec);
  auto cancel = std::make_shared<std::atomic<bool>>(false);
  std::future<std::string> hash;
  if (!is_dir)
    hash = std::async(std::launch::async, [path = o.model, cancel] { return sha256_file(path, cancel.get()).substr(0, 10); });
  struct CancelOnExit {  // an error below stops the hash rather than waiting for it
    std::shared_ptr<std::atomic<bool>> c;
    ~CancelOnExit() { c->store(true); }
  } cancel_on_exit{cancel};
  fs::path mp = fs::path(o.model).lexically_normal();
  if (!mp.has_filename()) mp = mp.parent_path();
  const std::string model_name = is_dir ? mp.filename().string() : mp.stem().string();

  auto t0 = std::chrono::steady_clock::now();
  SDLoadOptions lo;
  lo.vae_encoder = !o.init.empty();
  auto model = SDModel::load(o.model, *be, lo);
  const bool inpaint9 = model->unet_cfg.in_channels == 9;
  DF_CHECK(!inpaint9 || !o.mask.empty(), "-m/--model ", o.model,
           " is an inpainting model (9-channel UNet): give -i/--init and --mask");
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::string prompt = o.prompt;
  std::vector<AppliedLora> loras = apply_cli_loras(o, prompt, *model, *be);

  GenerateParams p;
  p.prediction = decide_prediction(o, model->family, o.quiet);
  if (o.init.empty()) {
    int native = model->family == Family::SDXL ? 1024
                 : (model->family == Family::SD2 && p.prediction == Prediction::VPrediction) ? 768
                                                                                               : 512;
    if (!o.width_given) o.width = native;
    if (!o.height_given) o.height = native;
  }
  p.prompt = prompt;
  p.negative = o.negative;
  p.width = o.width;
  p.height = o.height;
  p.steps = o.steps;
  p.cfg = o.cfg;
  p.seed = seed;
  p.sampler = o.sampler;
  p.schedule = o.schedule;
  p.batch = o.batch;
  p.clip_skip = o.clip_skip;
  p.rng = parse_rng_kind(o.rng);
  p.strength = o.strength >= 0 ? o.strength : (inpaint9 ? 1.0 : 0.75);
  p.init = o.init.empty() ? nullptr : &init;
  p.mask = o.mask.empty() ? nullptr : &mask;
  p.vae_tiling.mode = o.vae_tiling ? VAETiling::Mode::On : o.no_vae_tiling ? VAETiling::Mode::Off : VAETiling::Mode::Auto;
  if (o.vae_tile_size) p.vae_tiling.tile_px = o.vae_tile_size;

  ControlNet control;
  std::string control_text;
  if (!o.control_net.empty()) {
    control = ControlNet::load_file(o.control_net, *be);
    control.check_compatible(model->unet_cfg);
    if (o.canny) {
      // As the ControlNet canny annotator: resize to the output size first, then detect edges.
      CannyOptions co;
      co.low = float(o.canny_low);
      co.high = float(o.canny_high);
      control_image = canny(resize_lanczos(control_image, p.width, p.height), co);
    }
    p.control = &control;
    p.control_image = &control_image;
    p.control_strength = float(o.control_strength);
    fs::path cp = fs::path(o.control_net).lexically_normal();
    if (!cp.has_filename()) cp = cp.parent_path();
    control_text = "Module: " + std::string(o.canny ? "canny" : "none") + ", Model: " +
                   (fs::is_directory(o.control_net, ec) ? cp.filename().string() : cp.stem().string()) +
                   ", Weight: " + num(o.control_strength);
  }

  if (!o.quiet) {
    std::fprintf(stderr, "model %s: %s, UNet %d channels, %s prediction, loaded in %.1f s; %s%s on %s, %d threads\n",
                 o.model.c_str(), family_name(model->family), model->unet_cfg.in_channels,
                 p.prediction == Prediction::VPrediction ? "v" : "epsilon", load_s,
                 precision_name(be->effective_precision()),
                 be->weight_format() == WeightFormat::Int8 ? " (int8 weights)" : "", be->name().c_str(), num_threads());
    std::fprintf(stderr, "%s %dx%d, %d steps, %s%s, cfg %s, seed %llu (%s rng)%s\n",
                 p.mask ? "inpaint" : p.init ? "img2img" : "txt2img", p.width, p.height, p.steps, p.sampler.c_str(),
                 p.schedule == "default" ? "" : (" " + p.schedule).c_str(), num(p.cfg).c_str(),
                 static_cast<unsigned long long>(seed), o.rng.c_str(),
                 p.init ? (", strength " + num(p.strength)).c_str() : "");
  }
  if (!o.quiet && p.vae_tiling.active(p.height, p.width)) {
    const int64_t f = model->vae_cfg.downscale();
    VAETileAxis ty = vae_tile_axis(p.vae_tiling, p.height, f), tx = vae_tile_axis(p.vae_tiling, p.width, f);
    std::fprintf(stderr, "VAE tiling: %zux%zu tiles of %lldx%lld px, overlap >= %d px\n", ty.starts.size(),
                 tx.starts.size(), (long long)ty.size, (long long)tx.size, p.vae_tiling.overlap_px);
  }
  Progress progress(o.quiet);
  auto tg = std::chrono::steady_clock::now();
  p.on_conditioned = [&] { model->release_text_encoders(); };  // one-shot run: free them for the steps
  std::vector<Result> results = generate(*model, *be, p, std::ref(progress));
  double gen_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - tg).count();

  std::string h = hash.valid() ? hash.get() : std::string();
  for (size_t i = 0; i < results.size(); ++i) {
    Image im = results[i].image;
    // Line 1 keeps the prompt as the user wrote it (with any <lora:…> tags), as A1111 does.
    im.text.emplace_back("parameters", infotext(p, o.prompt, results[i], int(i) + 1, h, model_name, loras, control_text));
    std::string path = batch_path(o.out, int(i));
    write_png(path, im);
    std::printf("wrote %s (seed %llu)\n", path.c_str(), static_cast<unsigned long long>(results[i].seed));
  }
  if (!o.save_latent.empty()) {
    const Tensor& l0 = results[0].latent;
    Tensor all = Tensor::empty({int64_t(results.size()), l0.dim(1), l0.dim(2), l0.dim(3)});
    for (size_t i = 0; i < results.size(); ++i)
      std::memcpy(all.f32() + int64_t(i) * l0.numel(), results[i].latent.f32(), l0.bytes());
    save_safetensors(o.save_latent, {{"latent", all}});
    std::printf("wrote %s (latent f32 %s, NCHW, before dividing by the VAE scaling factor)\n", o.save_latent.c_str(),
                all.shape().str().c_str());
  }
  if (!o.quiet) std::fprintf(stderr, "done in %.1f s (seed %llu)\n", gen_s, static_cast<unsigned long long>(seed));
  return 0;
}

}  // namespace

Run add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Generate images: txt2img, img2img (-i), inpainting (-i --mask)");
  cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  cmd->add_option("-m,--model", o->model, "model: .safetensors, .ckpt or a diffusers folder");
  cmd->add_option("-p,--prompt", o->prompt, "prompt (A1111 weighting: (word:1.3), [word], BREAK)");
  cmd->add_option("-n,--negative", o->negative, "negative prompt");
  auto* wopt = cmd->add_option("-W,--width", o->width, "width in pixels, a multiple of 8 (default: the model's native size)");
  auto* hopt = cmd->add_option("-H,--height", o->height, "height in pixels, a multiple of 8");
  cmd->add_option("--steps", o->steps, "sampling steps (default 20)");
  cmd->add_option("--cfg-scale", o->cfg, "classifier-free guidance scale (default 7; 1: no guidance)");
  cmd->add_option("-s,--seed", o->seed, "seed (default: random, printed)");
  cmd->add_option("--sampler", o->sampler, "sampler (default euler_a): " + join(sampler_names()));
  cmd->add_option("--scheduler", o->schedule, "schedule: default, karras, trailing");
  cmd->add_option("-b,--batch", o->batch, "images per run (default 1)");
  cmd->add_option("--clip-skip", o->clip_skip, "A1111 clip skip (2: penultimate text encoder layer)");
  cmd->add_option("--rng", o->rng, "cpu (diffusers' torch CPU generator) or cuda (A1111's default, seed + i per image)");
  cmd->add_option("--precision", o->precision, "fp32, bf16 or auto (bf16 where the CPU has fast bf16)");
  cmd->add_option("--weights", o->weights, "native (the compute type) or int8 (per-channel, dequantised per layer)");
  cmd->add_option("-t,--threads", o->threads, "threads (default: physical cores)");
  cmd->add_option("-i,--init", o->init, "init image for img2img/inpainting (PNG/JPEG, the output size)");
  cmd->add_option("--strength", o->strength, "img2img strength in [0, 1] (default 0.75; 1 for inpainting models)");
  cmd->add_option("--mask", o->mask, "inpainting mask, white = repaint (the init image's size)");
  cmd->add_option("--prediction", o->prediction, "eps or v (default: from the model)");
  cmd->add_option("-o,--output", o->out, "output PNG (batches: out.png, out_1.png, ...)");
  cmd->add_option("--save-latent", o->save_latent, "also save the final latents (safetensors, 'latent' [B,4,h,w])");
  cmd->add_option("--lora", o->loras, "LoRA file[:multiplier], repeatable (kohya/A1111 or diffusers/PEFT)")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--lora-model-dir", o->lora_dir, "folder where prompt tags <lora:NAME:MULT> find NAME.safetensors");
  cmd->add_option("--control-net", o->control_net, "ControlNet: diffusers folder or single .safetensors/.pth file");
  cmd->add_option("--control-image", o->control_image, "ControlNet hint image (resized to the output size)");
  cmd->add_option("--control-strength", o->control_strength, "ControlNet conditioning scale (default 1)");
  cmd->add_flag("--canny", o->canny, "turn the control image into a Canny edge map first");
  cmd->add_option("--canny-low", o->canny_low, "Canny low threshold (default 100, OpenCV scale)");
  cmd->add_option("--canny-high", o->canny_high, "Canny high threshold (default 200)");
  cmd->add_flag("--vae-tiling", o->vae_tiling, "decode/encode the VAE in overlapping tiles (default: above 1024x1024 pixels)");
  cmd->add_flag("--no-vae-tiling", o->no_vae_tiling, "never tile the VAE");
  cmd->add_option("--vae-tile-size", o->vae_tile_size, "largest VAE tile side in pixels (default 640, multiple of 8, >= 256)");
  cmd->add_flag("-q,--quiet", o->quiet, "no progress output");
  return [o, wopt, hopt] {
    o->width_given = wopt->count() > 0;
    o->height_given = hopt->count() > 0;
    return run_generate(*o);
  };
}

}  // namespace diffuse::tools
