// `diffuse bench`: load a full-size checkpoint (a synthetic random-weight one from the layout
// manifests unless a path is given), run txt2img with guidance and time each stage. Only JSON goes
// to stdout; progress and a summary go to stderr.
#include "tools/bench_pipeline.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "api/engine.h"
#include "backend/profiling.h"
#include "core/error.h"
#include "core/memory_stats.h"
#include "core/threads.h"
#include "models/sd_model.h"
#include "models/synthetic.h"
#include "pipeline/generate.h"
#include "tools/commands.h"

namespace diffuse::tools {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double secs_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
double gb(size_t bytes) { return std::round(double(bytes) / 1e9 * 1000) / 1000; }
double r3(double v) { return std::round(v * 1000) / 1000; }

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string cache_dir(const PipelineBenchOptions& o) {
  if (!o.cache_dir.empty()) return o.cache_dir;
  if (const char* e = std::getenv("DIFFUSE_BENCH_DIR")) return e;
  if (const char* e = std::getenv("XDG_CACHE_HOME")) return std::string(e) + "/diffuse";
  if (const char* e = std::getenv("HOME")) return std::string(e) + "/.cache/diffuse";
  return "/tmp/diffuse-cache";
}

// The checkpoint to run: a path as given, or the synthetic one for "sd15"/"sd21"/"sdxl", written
// (f16, ldm single file, seed 0) on first use.
}  // namespace

std::string resolve_model(const PipelineBenchOptions& o, bool& synthetic) {
  synthetic = o.model == "sd15" || o.model == "sd21" || o.model == "sdxl";
  if (!synthetic) {
    std::error_code ec;
    DF_CHECK(fs::exists(o.model, ec), "--model ", o.model, ": no such file or folder (or give sd15, sd21, sdxl)");
    return o.model;
  }
  const std::string dir = cache_dir(o);
  const std::string path = dir + "/synthetic-" + o.model + "-f16.safetensors";
  std::error_code ec;
  if (fs::exists(path, ec)) return path;
  fs::create_directories(dir, ec);
  DF_CHECK(!ec, "bench: cannot create the cache folder ", dir, ": ", ec.message(), " (set --cache-dir)");
  const std::string tsv = find_manifest(o.model, manifest_dirs());
  std::fprintf(stderr, "bench: writing the random-weight %s checkpoint %s (once)\n", o.model.c_str(), path.c_str());
  write_synthetic_checkpoint(read_manifest(tsv), "ldm", path, DType::F16, 0, manifest_config_path(tsv), true);
  return path;
}

namespace {

}  // namespace

api::EngineOptions bench_engine_options(const PipelineBenchOptions& o, int threads, const std::string& precision) {
  api::EngineOptions eo;
  eo.threads = threads;
  eo.precision = precision == "both" ? "auto" : precision;
  eo.weights = o.weights;
  return eo;
}

namespace {

VAETiling vae_tiling(const PipelineBenchOptions& o) {
  VAETiling tiling;
  tiling.mode = o.vae_tiling == "on" ? VAETiling::Mode::On : o.vae_tiling == "off" ? VAETiling::Mode::Off : VAETiling::Mode::Auto;
  return tiling;
}

// The benchmark's generation: txt2img with guidance, a fixed prompt and seed, diffusers' CPU noise.
GenerateParams bench_params(const PipelineBenchOptions& o, const SDModel& model, int size) {
  GenerateParams p;
  p.prompt = "a photograph of an astronaut riding a horse";
  p.width = p.height = size;
  p.steps = o.steps;
  p.cfg = o.cfg;
  p.sampler = o.sampler;
  p.seed = 0;
  p.rng = RngKind::Cpu;
  p.prediction = model.family == Family::SD2 ? Prediction::VPrediction : Prediction::Epsilon;
  return p;
}

struct RunTimes {
  double load_s = 0, text_encode_s = 0, vae_decode_s = 0, generate_s = 0;
  size_t rss_loaded = 0;          // RSS when the text encoding starts (the model loaded)
  size_t peak_before_decode = 0;  // VmHWM when the VAE decode starts
  std::vector<double> steps;
  int size = 0;
  OpProfile profile;              // --profile: the op calls of steps 2..N (all steps when there is one)
  OpProfile first_step;           // --profile: step 1's
  int profiled_steps = 0;
};

// The request `diffuse generate` would make for the benchmark: txt2img with guidance, a fixed
// prompt and seed, diffusers' CPU noise; size 0: the model's native size.
api::Request bench_request(const PipelineBenchOptions& o, const std::string& path) {
  api::Request r;
  r.model = path;
  r.prompt = "a photograph of an astronaut riding a horse";
  r.width = r.height = o.size;
  r.steps = o.steps;
  r.cfg = o.cfg;
  r.sampler = o.sampler;
  r.seed = 0;
  r.rng = "cpu";
  r.vae_tiling = vae_tiling(o);
  return r;
}

// One generation through the engine (the library call `diffuse generate` makes), with stage
// timestamps taken from the progress callback.
RunTimes run_once(api::Engine& engine, const api::Request& req, api::RunState* state, ProfilingBackend* const* prof) {
  RunTimes r;
  Clock::time_point stage_start = Clock::now(), last = stage_start;
  api::Callbacks cb;
  cb.progress = [&](Stage s, int done, int total) {
    const Clock::time_point now = Clock::now();
    const double dt = std::chrono::duration<double>(now - last).count();
    if (s == Stage::Encode && done == 0) {
      stage_start = now;
      r.rss_loaded = rss_bytes();
    }
    if (s == Stage::Encode && done == 1) r.text_encode_s = std::chrono::duration<double>(now - stage_start).count();
    if (s == Stage::Denoise) {
      r.steps.push_back(dt);
      std::fprintf(stderr, "\r  step %d/%d  %.2f s  ", done, total, dt);
      if (done == total) std::fprintf(stderr, "\n");
      if (prof && *prof && done == 1 && total > 1) {  // step 1 (primitive creation) on its own
        r.first_step = (*prof)->profile();
        (*prof)->reset();
      }
      if (prof && *prof && done == total) {
        r.profile = (*prof)->profile();
        r.profiled_steps = total > 1 ? total - 1 : 1;
      }
    }
    if (s == Stage::Decode && done == 0) {
      stage_start = now;
      r.peak_before_decode = peak_rss_bytes();
    }
    if (s == Stage::Decode && done == total) r.vae_decode_s = std::chrono::duration<double>(now - stage_start).count();
    last = now;
    return true;
  };
  cb.log = [](const std::string& line, bool warning) {
    if (warning) std::fprintf(stderr, "  %s\n", line.c_str());
  };
  if (prof && *prof) (*prof)->reset();
  const api::RunResult res = engine.generate(req, cb, state);
  r.load_s = res.load_s;
  r.generate_s = res.generate_s;
  r.size = res.images.empty() ? 0 : res.images[0].image.width;
  return r;
}

}  // namespace

void add_pipeline_bench_options(CLI::App* cmd, PipelineBenchOptions& o) {
  cmd->add_option("--model", o.model, "sd15, sd21, sdxl (random weights, written on first use) or a checkpoint path");
  cmd->add_option("--size", o.size, "image size in pixels, square (default: the model's native size)")
      ->check(CLI::Range(64, 4096));
  cmd->add_option("--steps", o.steps, "sampling steps (default 20)")->check(CLI::Range(1, 1000));
  cmd->add_option("--cfg-scale", o.cfg, "guidance scale (default 7: a guided step is two UNet passes)");
  cmd->add_option("--sampler", o.sampler, "sampler (default euler)");
  cmd->add_option("--runs", o.runs, "separate processes (cold starts) to run; medians are reported (default 1)")
      ->check(CLI::Range(1, 100));
  cmd->add_option("--cache-dir", o.cache_dir,
                  "where synthetic checkpoints are written (default $DIFFUSE_BENCH_DIR or ~/.cache/diffuse)");
  cmd->add_option("--weights", o.weights, "native (the checkpoint's 16-bit weights, computed in --precision) or int8")
      ->check(CLI::IsMember({"native", "int8"}));
  cmd->add_option("--vae-tiling", o.vae_tiling, "auto (default), on or off")->check(CLI::IsMember({"auto", "on", "off"}));
  cmd->add_flag("--decode-only", o.decode_only, "time only the VAE decode of a random latent of --size");
  cmd->add_flag("--contention", o.contention,
                "run one process alone, then two at once, and report how much slower a step gets (2x is a fair share)");
  cmd->add_flag("--profile", o.profile,
                "add per-step time by op class (profile), and each convolution/matmul shape of the step timed alone "
                "(profile_shapes); keeps the model loaded, so RSS is not a user's");
}

namespace {

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

// This binary's `bench --runs 1` command line with o's settings (for child processes).
std::string child_command(const PipelineBenchOptions& o, int threads, const std::string& precision) {
  std::string cmd = shell_quote("/proc/self/exe");
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) cmd = shell_quote(std::string(self, size_t(n)));
  cmd += " bench --runs 1 --model " + shell_quote(o.model) + " --size " + std::to_string(o.size) + " --steps " +
         std::to_string(o.steps) + " --cfg-scale " + std::to_string(o.cfg) + " --sampler " + shell_quote(o.sampler) +
         " --precision " + shell_quote(precision) + " --threads " + std::to_string(threads) + " --weights " +
         shell_quote(o.weights) + " --vae-tiling " + shell_quote(o.vae_tiling);
  if (!o.cache_dir.empty()) cmd += " --cache-dir " + shell_quote(o.cache_dir);
  if (o.decode_only) cmd += " --decode-only";
  if (o.profile) cmd += " --profile";
  return cmd;
}

// Runs `count` copies of cmd at the same time; their JSON outputs.
std::vector<nlohmann::json> run_at_once(const std::string& cmd, int count) {
  std::vector<std::FILE*> pipes;
  for (int i = 0; i < count; ++i) {
    std::FILE* f = popen(cmd.c_str(), "r");
    DF_CHECK(f, "bench: cannot run ", cmd);
    pipes.push_back(f);
  }
  std::vector<nlohmann::json> out;
  std::vector<std::string> texts(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) {
    char buf[4096];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, pipes[size_t(i)])) > 0) texts[size_t(i)].append(buf, got);
  }
  for (int i = 0; i < count; ++i) {
    const int status = pclose(pipes[size_t(i)]);
    DF_CHECK(status == 0, "bench: process ", i + 1, " failed (exit status ", status, "): ", cmd);
    out.push_back(nlohmann::json::parse(texts[size_t(i)]));
  }
  return out;
}

// --contention: one process alone, then two at once (as `ctest -j2` or a busy server runs them);
// how much slower a step gets when two runs share the cores (2x is a fair share).
int run_contention(const PipelineBenchOptions& o, int threads, const std::string& precision) {
  const std::string cmd = child_command(o, threads, precision);
  std::fprintf(stderr, "diffuse bench --contention: one process alone\n");
  const nlohmann::json solo = run_at_once(cmd, 1)[0];
  std::fprintf(stderr, "diffuse bench --contention: two processes at once\n");
  const std::vector<nlohmann::json> pair = run_at_once(cmd, 2);
  const double s1 = solo.at("step_s_median").get<double>();
  std::vector<double> s2;
  for (const nlohmann::json& j : pair) s2.push_back(j.at("step_s_median").get<double>());
  nlohmann::json out = {{"model", o.model}, {"size", solo.at("size")}, {"steps", o.steps}, {"threads", solo.at("threads")},
                        {"omp_wait", solo.at("omp_wait")}, {"cpu", solo.at("cpu")}, {"solo_step_s", s1},
                        {"together_step_s", s2},
                        {"slowdown", r3(*std::max_element(s2.begin(), s2.end()) / s1)},
                        {"solo", solo}, {"together", pair}};
  std::fprintf(stderr, "  step %.2f s alone, %.2f / %.2f s two at once: %.2fx\n", s1, s2[0], s2[1],
               out["slowdown"].get<double>());
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

// --runs N > 1: N separate processes (this binary with --runs 1), each a cold start as a user
// sees it (load, encode, steps, decode, its own peak RSS); the medians of their figures.
int run_processes(const PipelineBenchOptions& o, int threads, const std::string& precision) {
  const std::string cmd = child_command(o, threads, precision);
  std::vector<nlohmann::json> runs;
  for (int r = 0; r < o.runs; ++r) {
    std::fprintf(stderr, "diffuse bench: process %d/%d\n", r + 1, o.runs);
    runs.push_back(run_at_once(cmd, 1)[0]);
  }
  nlohmann::json out = runs[0];
  for (const char* key : {"load_s", "rss_after_load_gb", "text_encode_s", "step_s_median", "first_step_over_median",
                          "vae_decode_s", "generate_s", "total_s", "peak_rss_gb"}) {
    if (!out.contains(key)) continue;
    std::vector<double> v;
    for (const nlohmann::json& j : runs) v.push_back(j.at(key).get<double>());
    out[key] = r3(median(v));
  }
  out.erase("runs");
  out.erase("vae_decode_runs_s");
  out["processes"] = runs;
  out["aggregate"] = "median over processes";
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace

int run_quality_bench(const PipelineBenchOptions& o, int threads) {
  set_num_threads(threads);
  bool synthetic = false;
  const std::string path = resolve_model(o, synthetic);
  struct Mode {
    const char* name;
    Precision prec;
    WeightFormat wf;
  };
  std::vector<Mode> modes = {{"fp32", Precision::F32, WeightFormat::Native}};
  if (cpu_features().bf16_fast()) {
    modes.push_back({"bf16", Precision::BF16, WeightFormat::Native});
    modes.push_back({"int8 (bf16 compute)", Precision::BF16, WeightFormat::Int8});
  } else {
    modes.push_back({"int8 (fp32 compute)", Precision::F32, WeightFormat::Int8});
  }
  Tensor ref;
  nlohmann::json results = nlohmann::json::array();
  int size = o.size;
  for (const Mode& m : modes) {
    auto be = make_cpu_backend(m.prec, m.wf);
    SDLoadOptions lo;
    lo.vae_encoder = false;
    auto model = SDModel::load(path, *be, lo);
    if (size == 0) size = model->family == Family::SDXL ? 1024 : model->family == Family::SD2 ? 768 : 512;
    GenerateParams p = bench_params(o, *model, size);
    std::fprintf(stderr, "diffuse bench quality: %s, %dx%d, %d steps %s\n", m.name, size, size, o.steps,
                 o.sampler.c_str());
    const Clock::time_point t0 = Clock::now();
    std::vector<Result> r = generate(*model, *be, p, [](Stage s, int done, int total) {
      if (s == Stage::Denoise) std::fprintf(stderr, "\r  step %d/%d ", done, total);
      if (s == Stage::Denoise && done == total) std::fprintf(stderr, "\n");
    });
    const double secs = secs_since(t0);
    const Tensor& lat = r[0].latent;
    nlohmann::json j = {{"mode", m.name}, {"generate_s", r3(secs)}};
    if (!ref.defined()) {
      ref = lat.clone();
    } else {
      double dot = 0, na = 0, nb = 0, maxd = 0, maxref = 0;
      for (int64_t i = 0; i < lat.numel(); ++i) {
        const double a = ref.f32()[i], b = lat.f32()[i];
        dot += a * b;
        na += a * a;
        nb += b * b;
        maxd = std::max(maxd, std::fabs(a - b));
        maxref = std::max(maxref, std::fabs(a));
      }
      j["latent_cosine_vs_fp32"] = std::round(dot / std::sqrt(na * nb) * 1e6) / 1e6;
      j["latent_max_abs_diff_vs_fp32"] = r3(maxd);
      j["fp32_latent_max_abs"] = r3(maxref);
      std::fprintf(stderr, "  %s vs fp32: latent cosine %.6f, max |d| %.4f (max |fp32| %.3f)\n", m.name,
                   dot / std::sqrt(na * nb), maxd, maxref);
    }
    results.push_back(j);
  }
  nlohmann::json out = {{"model", o.model}, {"checkpoint", path}, {"size", size},     {"steps", o.steps},
                        {"sampler", o.sampler}, {"cfg", o.cfg},     {"modes", results}};
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

namespace {

void add_profile(nlohmann::json& out, const OpProfile& profile, const char* unit, int units, double unit_s,
                 Backend& be);

// --decode-only: the VAE decode of a random latent, loaded and run without the engine.
int run_decode_bench(const PipelineBenchOptions& o, int threads, const std::string& precision) {
  Precision prec = Precision::F32;
  if (precision == "bf16" || ((precision == "auto" || precision == "both") && cpu_features().bf16_fast()))
    prec = Precision::BF16;
  bool synthetic = false;
  const std::string path = resolve_model(o, synthetic);
  auto be = make_cpu_backend(prec, o.weights == "int8" ? WeightFormat::Int8 : WeightFormat::Native);
  Clock::time_point t0 = Clock::now();
  SDLoadOptions lo;
  lo.vae_encoder = false;
  lo.text_encoders = lo.unet = false;
  auto model = SDModel::load(path, *be, lo);
  const double load_s = secs_since(t0);
  const int size = o.size > 0 ? o.size : model->family == Family::SDXL ? 1024 : model->family == Family::SD2 ? 768 : 512;
  const VAETiling tiling = vae_tiling(o);
  nlohmann::json out = {{"model", o.model}, {"checkpoint", path}, {"synthetic", synthetic}, {"size", size},
                        {"precision", precision_name(be->effective_precision())}, {"weights", o.weights},
                        {"threads", num_threads()}, {"omp_wait", omp_wait_setting()}, {"cpu", cpu_features().str()},
                        {"load_s", r3(load_s)}, {"rss_after_load_gb", gb(rss_bytes())},
                        {"vae_tiled", tiling.active(size, size)}};
  const int64_t h = size / 8;
  Tensor z = Tensor::empty({1, h, h, model->vae_cfg.latent_channels});
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t i = 0; i < z.numel(); ++i) z.f32()[i] = nd(rng);
  // --profile: the decodes after the first (primitive creation) go through a ProfilingBackend.
  ProfilingBackend* prof = nullptr;
  std::unique_ptr<Backend> run_be = std::move(be);
  std::vector<double> times;
  const int decodes = o.profile ? std::max(2, o.runs) : o.runs;
  for (int r = 0; r < decodes; ++r) {
    if (o.profile && r == 1) {
      auto p = std::make_unique<ProfilingBackend>(std::move(run_be));
      prof = p.get();
      run_be = std::move(p);
    }
    Arena arena;
    Ctx ctx{*run_be, arena};
    Clock::time_point td = Clock::now();
    Tensor img = model->vae.decode(ctx, z, tiling);
    times.push_back(secs_since(td));
    std::fprintf(stderr, "  VAE decode %dx%d: %.2f s\n", size, size, times.back());
  }
  out["vae_decode_s"] = r3(median(times));
  out["vae_decode_runs_s"] = times;
  if (prof) {
    double later = 0;
    for (size_t i = 1; i < times.size(); ++i) later += times[i];
    add_profile(out, prof->profile(), "VAE decode", decodes - 1, later / (decodes - 1), prof->inner());
  }
  out["peak_rss_gb"] = gb(peak_rss_bytes());
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

// --profile: time per unit (a denoising step, or a VAE decode) by op class over `units` of them
// taking `unit_s` each on average, the share of the unit they cover, and each conv/matmul shape
// timed alone on `be` (the backend that ran them, its weights still loaded).
// Sets out's "profile" (the classes' seconds per unit), "profile_summary" and "profile_shapes".
void add_profile(nlohmann::json& out, const OpProfile& profile, const char* unit, int units, double unit_s,
                 Backend& be) {
  const double n = std::max(1, units), step = unit_s;
  nlohmann::json cls = nlohmann::json::object(), calls = nlohmann::json::object();
  for (int c = 0; c < kOpClasses; ++c) {
    cls[op_class_name(OpClass(c))] = r3(profile.secs[size_t(c)] / n);
    calls[op_class_name(OpClass(c))] = std::llround(double(profile.calls[size_t(c)]) / n);
  }
  auto per_step = [&](OpClass c) { return profile.secs[size_t(c)] / n; };
  const double measured = profile.total() / n;
  const double compute = per_step(OpClass::Conv) + per_step(OpClass::Matmul) + per_step(OpClass::Attention);
  const double small = per_step(OpClass::Norm) + per_step(OpClass::Elementwise) + per_step(OpClass::Layout);

  const DType act = be.effective_precision() == Precision::BF16 ? DType::BF16 : DType::F32;
  std::vector<const OpShape*> order;
  for (const auto& [key, sh] : profile.shapes) order.push_back(&sh);
  std::sort(order.begin(), order.end(), [](const OpShape* a, const OpShape* b) { return a->secs > b->secs; });
  double isolated = 0;
  nlohmann::json shapes = nlohmann::json::array();
  std::fprintf(stderr, "  timing %zu conv/matmul shapes alone\n", order.size());
  for (const OpShape* sh : order) {
    const double alone = time_shape_alone(be, *sh, act, 3);
    const double calls_per_unit = double(sh->calls) / n, pipeline = sh->secs / n;
    isolated += alone * calls_per_unit;
    shapes.push_back({{"op", sh->op}, {"shape", sh->shape}, {"calls_per_unit", r3(calls_per_unit)},
                      {"pipeline_s", r3(pipeline)}, {"alone_s", r3(alone * calls_per_unit)},
                      {"pipeline_gflops", std::round(sh->flop * double(sh->calls) / sh->secs / 1e8) / 10},
                      {"alone_gflops", std::round(sh->flop / alone / 1e8) / 10}});
  }
  out["profile"] = cls;
  out["profile_shapes"] = shapes;
  out["profile_summary"] = {{"unit", unit},
          {"unit_s", r3(step)},
          {"profiled_units", units},
          {"calls_per_unit", calls},
          {"measured_s", r3(measured)},
          {"measured_share", r3(measured / step)},
          {"conv_matmul_attention_share", r3(compute / step)},
          {"norm_elementwise_layout_share", r3(small / step)},
          {"conv_matmul_alone_s", r3(isolated)},
          {"unit_over_alone_plus_attention_norm",
           r3(step / (isolated + per_step(OpClass::Attention) + per_step(OpClass::Norm)))}};
  std::fprintf(stderr, "  profile per %s: %s\n  %s\n", unit, out["profile"].dump().c_str(),
               out["profile_summary"].dump().c_str());
}

}  // namespace

int run_pipeline_bench(const PipelineBenchOptions& o, int threads, const std::string& precision) {
  if (o.contention) return run_contention(o, threads, precision);
  if (o.runs > 1) return run_processes(o, threads, precision);
  set_num_threads(threads);
  DF_CHECK(o.size % 8 == 0, "--size ", o.size, ": must be a multiple of 8");
  if (o.decode_only) return run_decode_bench(o, threads, precision);
  bool synthetic = false;
  const std::string path = resolve_model(o, synthetic);

  // The engine `diffuse generate` runs, set as it sets it (one-shot: the text encoders are freed
  // after encoding, the model dropped after the run). --profile keeps the model loaded to time the
  // shapes alone afterwards, so its RSS figures are not a user's.
  api::EngineOptions eo = bench_engine_options(o, threads, precision);
  eo.one_shot = !o.profile;
  ProfilingBackend* prof = nullptr;
  if (o.profile)
    eo.wrap_run_backend = [&prof](std::unique_ptr<Backend> b) -> std::unique_ptr<Backend> {
      auto p = std::make_unique<ProfilingBackend>(std::move(b));
      prof = p.get();
      return p;
    };
  api::Engine engine(eo);
  api::Request req = bench_request(o, path);
  std::fprintf(stderr, "diffuse bench: %s, %d threads, cpu: %s; txt2img %d steps, %s, cfg %g\n", path.c_str(),
               num_threads(), cpu_features().str().c_str(), o.steps, o.sampler.c_str(), o.cfg);
  // The run state outlives the run: --profile reads its backend afterwards.
  std::unique_ptr<api::RunState> state = engine.new_state();
  const RunTimes t = run_once(engine, req, state.get(), &prof);
  std::fprintf(stderr, "  load %.2f s, text encode %.2f s, step median %.2f s, VAE decode %.2f s, peak RSS %.2f GB\n",
               t.load_s, t.text_encode_s, median(t.steps), t.vae_decode_s, gb(peak_rss_bytes()));

  std::vector<double> st;
  for (double s : t.steps) st.push_back(r3(s));
  const double step_median = median(t.steps);
  nlohmann::json out = {{"model", o.model},
                        {"checkpoint", path},
                        {"synthetic", synthetic},
                        {"size", t.size},
                        {"precision", eo.precision != "fp32" && cpu_features().bf16_fast() ? "bf16" : "fp32"},
                        {"weights", o.weights},
                        {"threads", num_threads()},
                        {"omp_wait", omp_wait_setting()},
                        {"cpu", cpu_features().str()},
                        {"load_s", r3(t.load_s)},
                        {"rss_after_load_gb", gb(t.rss_loaded)},
                        {"vae_tiled", req.vae_tiling.active(t.size, t.size)},
                        {"steps", o.steps},
                        {"cfg", o.cfg},
                        {"sampler", o.sampler},
                        {"text_encode_s", r3(t.text_encode_s)},
                        {"step_s_median", r3(step_median)},
                        {"first_step_over_median", t.steps.empty() ? 0.0 : r3(t.steps[0] / step_median)},
                        {"vae_decode_s", r3(t.vae_decode_s)},
                        {"generate_s", r3(t.generate_s)},
                        {"total_s", r3(t.load_s + t.generate_s)},  // load + encode + steps + decode
                        {"peak_rss_gb", gb(peak_rss_bytes())}};
  out["runs"] = nlohmann::json::array({{{"text_encode_s", r3(t.text_encode_s)},
                                        {"step_s", st},
                                        {"vae_decode_s", r3(t.vae_decode_s)},
                                        {"generate_s", r3(t.generate_s)},
                                        {"peak_rss_before_decode_gb", gb(t.peak_before_decode)}}});
  if (o.profile && prof) {
    const int n = std::max(1, t.profiled_steps);
    double step = 0;  // the mean of the profiled steps (the last n)
    for (size_t i = t.steps.size() - std::min<size_t>(size_t(n), t.steps.size()); i < t.steps.size(); ++i) step += t.steps[i];
    add_profile(out, t.profile, "denoising step", n, step / n, prof->inner());
    nlohmann::json first = nlohmann::json::object();
    for (int c = 0; c < kOpClasses; ++c) first[op_class_name(OpClass(c))] = r3(t.first_step.secs[size_t(c)]);
    out["profile_first_step"] = first;
  }
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace diffuse::tools
