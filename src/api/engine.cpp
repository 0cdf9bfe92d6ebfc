#include "api/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>

#include "api/infotext.h"
#include "api/inpaint_request.h"
#include "api/model_hash.h"
#include "core/error.h"
#include "core/memory_stats.h"
#include "core/text.h"
#include "core/threads.h"
#include "io/output_file.h"
#include "io/tensor_file.h"
#include "models/canny.h"
#include "models/controlnet.h"
#include "models/memory_estimate.h"
#include "models/name_map.h"
#include "pipeline/conditioning.h"
#include "pipeline/hires.h"
#include "pipeline/refiner.h"
#include "pipeline/upscale.h"

namespace diffuse::api {

namespace fs = std::filesystem;

namespace {

// Runs f; a diffuse::Error from reading a file becomes a FileError with the same message.
template <class F>
auto as_file_error(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {
    throw FileError(e.what());
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The name A1111 shows: the file's stem, or the folder's name.
std::string display_name(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::path(path).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  return fs::is_directory(path, ec) ? p.filename().string() : p.stem().string();
}

// Prediction type: the request's, else what the model declares (a single file's
// modelspec.prediction_type or embedded scheduler config, a diffusers folder's
// scheduler/scheduler_config.json: models/sd_model.h), else the family default (SD 2.x: v, with a
// note).
Prediction decide_prediction(const Request& r, const SDModel& model, const Callbacks& cb) {
  if (r.prediction == "eps" || r.prediction == "epsilon") return Prediction::Epsilon;
  if (r.prediction == "v" || r.prediction == "v_prediction") return Prediction::VPrediction;
  if (model.declared_prediction == "v") return Prediction::VPrediction;
  if (model.declared_prediction == "epsilon") return Prediction::Epsilon;
  const Family family = model.family;
  if (family == Family::SD2) {
    if (cb.log)
      cb.log("diffuse: SD 2.x checkpoint without a scheduler config: assuming v-prediction (768 models); "
             "--prediction eps overrides", false);
    return Prediction::VPrediction;
  }
  return Prediction::Epsilon;
}

// A1111's pairing: "MODEL.vae.safetensors" beside a single-file "MODEL.safetensors" (or .ckpt) is
// its VAE; "" when there is none (or the model is a folder).
std::string paired_vae(const std::string& model) {
  std::error_code ec;
  if (!fs::is_regular_file(model, ec)) return "";
  fs::path p = fs::path(model);
  fs::path v = p.parent_path() / (p.stem().string() + ".vae.safetensors");
  return fs::is_regular_file(v, ec) ? v.string() : "";
}

// Where a run's textual inversions are (engine.h, Request::embeddings_dir).
std::string embeddings_dir_for(const Request& r, const EngineOptions& o) {
  if (!r.embeddings_dir.empty()) return r.embeddings_dir;
  if (!o.embeddings_dir.empty()) return o.embeddings_dir;
  std::error_code ec;
  const fs::path base = fs::path(r.model).parent_path();  // the folder holding the file or diffusers folder
  const fs::path sub = (base.empty() ? fs::path(".") : base) / "embeddings";
  if (fs::is_directory(sub, ec)) return sub.string();
  return base.empty() ? "." : base.string();
}

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// A model's configs and parameter count from its tensor shapes, without loading it.
Engine::ModelShapes peek_shapes(const std::string& path) {
  Engine::ModelShapes m;
  try {
    TensorFile f = open_model_file(path);
    const ModelSummary sum = summarize_model(f);
    if (sum.family == Family::Unknown) return m;
    WeightStore u = component_weights(f, Component::UNet, sum.family);
    m.unet = UNetConfig::from_weights(u);
    WeightStore v = component_weights(f, Component::VAE, sum.family);
    m.vae = VAEConfig::from_weights(v, 1.0f);
    for (const ComponentSummary& c : sum.components)
      if (c.component != Component::EMA && c.component != Component::Other) m.params += c.parameters;
    m.known = true;
  } catch (const std::exception&) {
    // The load reports what is wrong with the file.
  }
  return m;
}

// The peak memory of a run at width × height (models/memory_estimate.h): the weights unless they
// are resident already, plus the larger of one guided UNet pass and the VAE decode (one tile's
// working set and the whole image when tiled; the init-image encode of img2img is smaller than
// the decode). Returns 0 when the model's shapes are unknown.
struct Footprint {
  size_t weights = 0, activations = 0;
};
Footprint run_footprint(const Request& r, const Engine::ModelShapes& m, int width, int height, Precision p,
                        WeightFormat wf) {
  Footprint f;
  if (!m.known) return f;
  // bf16 compute: bf16 weights and VAE activations; the UNet keeps f32 activations and converts
  // up to two inputs per op to bf16.
  const bool bf16 = p == Precision::BF16 && cpu_features().bf16_fast();
  const size_t act = bf16 ? 2 : 4;
  if (!m.loaded) f.weights = size_t(double(m.params) * (wf == WeightFormat::Int8 ? 1.0 : double(act)));
  const int64_t rows = int64_t(r.batch) * (r.cfg > 1.0 ? 2 : 1);
  const int ds = m.vae.downscale();  // 8 for SD: the latents' size is the image's / ds
  size_t unet = unet_pass_bytes(m.unet, rows, height / ds, width / ds, 4);
  if (bf16) unet += 2 * 2 * size_t(unet_largest_activation(m.unet, rows, height / ds, width / ds));
  const bool tiled = r.vae_tiling.active(height, width);
  const int64_t tile = r.vae_tiling.tile_px;
  size_t vae = tiled ? vae_decode_bytes(m.vae, std::min<int64_t>(tile, height), std::min<int64_t>(tile, width), act) +
                           size_t(width) * size_t(height) * 3 * 9  // the blended f32 image, its weights, 8-bit pixels
                     : vae_decode_bytes(m.vae, height, width, act);
  f.activations = std::max(unet, vae);
  return f;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Model entries: a loaded model, its LoRA set and the runs using it.

struct Engine::ModelEntry {
  std::string path;
  std::unique_ptr<SDModel> model;
  std::unique_ptr<Backend> be;  // prepares weights (load, LoRA switches); used under `mu` with no run active
  size_t bytes = 0;
  uint64_t last_used = 0;
  std::mutex mu;
  std::condition_variable cv;
  int active = 0;        // runs using the model now
  std::string lora_key;  // the applied set ("" none)
  bool spent = false;    // text encoders freed (one-shot): dropped after its run
};

struct Engine::Impl {
  mutable std::mutex mu;
  std::map<std::string, std::shared_ptr<ModelEntry>> models;
  uint64_t clock = 0;
  // ControlNets by path (the two most recently used stay loaded).
  struct Net {
    std::shared_ptr<ControlNet> net;
    uint64_t last_used = 0;
  };
  std::map<std::string, Net> nets;
  HashCache hashes;
  explicit Impl(const std::string& dir) : hashes(dir) {}
};

RunState::~RunState() = default;
size_t RunState::scratch_bytes() const { return ws.capacity(); }

Engine::Engine(EngineOptions o) : opts_(std::move(o)) {
  DF_CHECK(opts_.precision == "fp32" || opts_.precision == "bf16" || opts_.precision == "auto", "--precision ",
           opts_.precision, ": unknown; allowed: fp32, bf16, auto");
  DF_CHECK(opts_.weights == "native" || opts_.weights == "int8", "--weights ", opts_.weights,
           ": unknown; allowed: native, int8");
  DF_CHECK(opts_.threads >= 0, "-t/--threads ", opts_.threads, ": must be >= 0 (0: all physical cores)");
  set_num_threads(opts_.threads);
  precision_ = opts_.precision == "bf16" || (opts_.precision == "auto" && cpu_features().bf16_fast()) ? Precision::BF16
                                                                                                     : Precision::F32;
  format_ = opts_.weights == "int8" ? WeightFormat::Int8 : WeightFormat::Native;
  impl_ = std::make_unique<Impl>(opts_.hash_cache_dir.empty() ? default_cache_dir() : opts_.hash_cache_dir);
}

Engine::~Engine() = default;

std::unique_ptr<RunState> Engine::new_state() const {
  std::unique_ptr<RunState> s(new RunState());
  s->be = make_cpu_backend(precision_, format_);
  if (opts_.wrap_run_backend) s->be = opts_.wrap_run_backend(std::move(s->be));
  return s;
}

namespace {
HiresParams hires_params(const Request& r) {
  HiresParams h;
  h.scale = r.hires_scale > 0 ? r.hires_scale : 1.0;
  h.width = r.hires_width;
  h.height = r.hires_height;
  h.steps = r.hires_steps;
  h.denoise = r.hires_denoise;
  h.upscaler = r.hires_upscaler;
  return h;
}

// A1111's "Hires …" entries of the infotext.
std::string hires_infotext(const Request& r, const HiresParams& h, int base_w, int base_h) {
  std::string s;
  if (h.width > 0 || h.height > 0) {
    int tw = 0, th = 0;
    hires_target(h, base_w, base_h, &tw, &th);
    s = "Hires resize: " + std::to_string(tw) + "x" + std::to_string(th);
  } else {
    s = "Hires upscale: " + num(h.scale);
  }
  if (h.steps > 0) s += ", Hires steps: " + std::to_string(h.steps);
  s += ", Hires upscaler: " + hires_upscaler_display(h.upscaler, fs::path(r.hires_upscaler_model).stem().string());
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Models

void Engine::evict_locked(const ModelEntry* keep) {
  // Least recently used first, never one in use, until the others fit the budget.
  for (;;) {
    size_t others = 0;
    std::shared_ptr<ModelEntry> victim;
    for (auto& [p, e] : impl_->models) {
      if (e.get() == keep) continue;
      others += e->bytes;
      std::lock_guard<std::mutex> lk(e->mu);
      if (e->active == 0 && (!victim || e->last_used < victim->last_used)) victim = e;
    }
    if (others <= opts_.model_cache_bytes || !victim) break;
    impl_->models.erase(victim->path);
  }
  return_free_memory();
}

std::shared_ptr<Engine::ModelEntry> Engine::acquire_model(const std::string& path, bool vae_encoder,
                                                          const Callbacks& cb, double* load_s, const std::string& vae,
                                                          const std::string& unet) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  *load_s = 0;
  // A model with another VAE or UNet is another entry (the plain model keeps its path as its key).
  const std::string key = path + (vae.empty() ? "" : "|" + vae) + (unet.empty() ? "" : "|unet:" + unet);
  auto it = impl_->models.find(key);
  if (it != impl_->models.end()) {
    std::shared_ptr<ModelEntry> e = it->second;
    bool usable;
    {
      std::lock_guard<std::mutex> el(e->mu);
      usable = !e->spent && (!vae_encoder || e->model->vae.has_encoder());
    }
    if (usable) {
      e->last_used = ++impl_->clock;
      return e;
    }
    impl_->models.erase(it);  // runs still using it keep it alive until they finish
  }
  evict_locked(nullptr);  // make room first: a budget of 0 holds one model, not two during a load
  auto t0 = std::chrono::steady_clock::now();
  auto e = std::make_shared<ModelEntry>();
  e->path = key;
  e->be = make_cpu_backend(precision_, format_);
  SDLoadOptions lo;
  lo.vae_encoder = vae_encoder || !opts_.one_shot;
  lo.vae_path = vae;
  lo.unet_path = unet;
  e->model = as_file_error([&] {
    if (vae.empty() && unet.empty()) return SDModel::load(path, *e->be, lo);
    try {
      return SDModel::load(path, *e->be, lo);
    } catch (const Error& err) {
      // Say which flag gave the file (the message names it and the tensor) when it is at fault.
      const std::string what = err.what();
      if (!vae.empty() && what.find(vae) != std::string::npos) throw FileError(cat("--vae ", what));
      if (!unet.empty() && what.find(unet) != std::string::npos) throw FileError(cat("--unet ", what));
      throw;
    }
  });
  *load_s = seconds_since(t0);
  const double per_param = format_ == WeightFormat::Int8 ? 1.0 : e->be->effective_precision() == Precision::BF16 ? 2.0 : 4.0;
  int64_t params = 0;  // what is bound (EMA copies and other extras are not)
  for (const ComponentSummary& c : e->model->summary.components)
    if (c.component != Component::EMA && c.component != Component::Other) params += c.parameters;
  e->bytes = size_t(double(params) * per_param);
  e->last_used = ++impl_->clock;
  impl_->models[key] = e;
  evict_locked(e.get());
  return e;
}

double Engine::load(const std::string& path, const Callbacks& cb) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw FileError(cat("-m/--model ", path, ": no such file or folder"));
  double s = 0;
  acquire_model(path, false, cb, &s, paired_vae(path));  // the entry a run without --vae uses
  return s;
}

Engine::ModelShapes Engine::shapes_of(const std::string& path) const {
  {  // a loaded model knows its configs; only a model not loaded yet is peeked at
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->models.find(path);
    if (it != impl_->models.end()) {
      ModelShapes m;
      m.known = m.loaded = true;
      m.unet = it->second->model->unet_cfg;
      m.vae = it->second->model->vae_cfg;
      return m;
    }
  }
  return peek_shapes(path);
}

std::string Engine::embeddings_dir(const std::string& model) const {
  Request r;
  r.model = model;
  return embeddings_dir_for(r, opts_);
}

Family Engine::family_of(const std::string& path) const {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->models.find(path);
    if (it != impl_->models.end()) return it->second->model->family;
  }
  const ModelShapes m = peek_shapes(path);
  if (!m.known) return Family::Unknown;
  // The shapes that tell the families apart: SDXL's added (pooled + time ids) embedding, SD 2's
  // OpenCLIP-H context width.
  if (m.unet.projection_class_embeddings_input_dim > 0) return Family::SDXL;
  return m.unet.context_dim == 1024 ? Family::SD2 : Family::SD1;
}

std::string Engine::model_sha256(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return "";
  return impl_->hashes.sha256(path);
}

std::vector<std::string> Engine::loaded_models() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  std::vector<std::string> out;
  for (const auto& [p, e] : impl_->models) out.push_back(e->model->path);  // the key may add "|VAE"
  return out;
}

void Engine::unload_all() {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->models.clear();
  impl_->nets.clear();
  return_free_memory();
}

std::string Engine::model_hash(const std::string& path, const Callbacks& cb) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return "";
  return impl_->hashes.sha256(path, [&] {
           if (cb.log) cb.log("hashing " + path + " for its A1111 model hash (once per file)", false);
         }).substr(0, 10);
}

// ---------------------------------------------------------------------------------------------
// LoRA sets

namespace {

struct ResolvedLora {
  std::string name, path;
  float mult;
};

std::string lora_key(const std::vector<ResolvedLora>& v) {
  std::string k;
  for (const ResolvedLora& l : v) k += fs::absolute(l.path).lexically_normal().string() + "\x1f" + num(l.mult) + "\x1e";
  return k;
}

// Reads the files and applies them as the model's set (transactional: models/lora.h).
LoraApplyReport apply_set(SDModel& m, Backend& be, const std::vector<ResolvedLora>& loras) {
  std::vector<LoraFile> files;
  files.reserve(loras.size());
  std::vector<std::pair<const LoraFile*, float>> set;
  for (const ResolvedLora& l : loras) {
    files.push_back(as_file_error([&] { return load_lora(l.path); }));
    set.emplace_back(&files.back(), l.mult);
  }
  return apply_loras(m, be, set);
}

// Waits until `e` can run with LoRA set `key` (no run using another set), switches if needed
// (with `apply`), and counts the caller as a run. Release with release_run().
void begin_run(Engine::ModelEntry& e, const std::string& key, const std::function<void()>& apply);
void release_run(Engine::ModelEntry& e);

}  // namespace

// (Defined here: they need ModelEntry's members.)
namespace {
void begin_run(Engine::ModelEntry& e, const std::string& key, const std::function<void()>& apply) {
  std::unique_lock<std::mutex> lk(e.mu);
  e.cv.wait(lk, [&] { return e.active == 0 || e.lora_key == key; });
  if (e.lora_key != key) {
    apply();  // throws: the model is as it was (apply_loras is transactional)
    e.lora_key = key;
  }
  ++e.active;
}

void release_run(Engine::ModelEntry& e) {
  std::lock_guard<std::mutex> lk(e.mu);
  --e.active;
  e.cv.notify_all();
}

struct RunGuard {
  Engine::ModelEntry* e = nullptr;
  ~RunGuard() {
    if (e) release_run(*e);
  }
};
}  // namespace

LoraApplyReport Engine::set_loras(const std::string& path, const std::vector<LoraSpec>& loras) {
  double load_s = 0;
  std::shared_ptr<ModelEntry> e = acquire_model(path, false, {}, &load_s, paired_vae(path));
  std::vector<ResolvedLora> rl;
  for (const LoraSpec& l : loras) rl.push_back({fs::path(l.path).stem().string(), l.path, l.multiplier});
  LoraApplyReport rep;
  std::string key = lora_key(rl);
  std::unique_lock<std::mutex> lk(e->mu);
  e->cv.wait(lk, [&] { return e->active == 0; });
  rep = apply_set(*e->model, *e->be, rl);
  e->lora_key = key;
  return rep;
}

// ---------------------------------------------------------------------------------------------
// A run

RunResult Engine::generate(const Request& req, const Callbacks& cb, RunState* state) {
  validate(req);
  std::string memory_line;
  {  // sizes whose memory cannot fit are refused with the estimate, before anything loads
    int w = req.width, h = req.height;
    if (!req.init.pixels.empty()) inpaint_output_size(req, &w, &h);
    if (req.hires() && w > 0 && h > 0) hires_target(hires_params(req), w, h, &w, &h);  // the larger pass
    const size_t avail = available_memory_bytes();
    if (w > 0 && h > 0 && avail > 0) {
      const Footprint f = run_footprint(req, shapes_of(req.model), w, h, precision_, format_);
      auto gib = [](size_t b) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.2f", double(b) / double(size_t(1) << 30));
        return std::string(buf);
      };
      DF_CHECK(f.weights + f.activations <= avail, "-W/--width, -H/--height ", w, "x", h, " (batch ", req.batch,
               "): needs about ", gib(f.weights + f.activations), " GiB (activations ", gib(f.activations),
               " GiB", f.weights ? ", weights " + gib(f.weights) + " GiB" : std::string(), "), ", gib(avail),
               " GiB are available; use a smaller size or batch");
      if (f.activations)  // logged with the model line, once everything is checked
        memory_line = "memory: about " + gib(f.weights + f.activations) + " GiB at the peak (activations " +
                      gib(f.activations) + " GiB" + (f.weights ? ", weights " + gib(f.weights) + " GiB" : std::string()) +
                      "), " + gib(avail) + " GiB available";
    }
  }
  auto log = [&](const std::string& s, bool warn = false) {
    if (cb.log) cb.log(s, warn);
  };

  // The LoRA set: --lora files, then the prompt's tags.
  std::vector<ResolvedLora> loras;
  for (const LoraSpec& l : req.loras) loras.push_back({fs::path(l.path).stem().string(), l.path, l.multiplier});
  std::vector<std::pair<std::string, float>> tags;
  const std::string prompt = extract_lora_tags(req.prompt, &tags);
  for (const auto& [name, mult] : tags) {
    DF_CHECK(!opts_.lora_dir.empty(), "prompt tag <lora:", name, ">: give --lora-model-dir DIR to say where LoRA files are");
    loras.push_back({name, as_file_error([&] { return resolve_lora_path(name, opts_.lora_dir); }), mult});
  }
  std::vector<std::pair<std::string, std::string>> lora_hashes;
  for (const ResolvedLora& l : loras)
    lora_hashes.emplace_back(l.name, as_file_error([&] { return impl_->hashes.lora_hash(l.path); }));

  // Textual inversions: names in either prompt (ComfyUI's "embedding:NAME" too), hashed for the infotext.
  const std::string emb_dir = embeddings_dir_for(req, opts_);
  if (!req.embeddings_dir.empty()) {
    std::error_code ec;
    DF_CHECK(fs::is_directory(req.embeddings_dir, ec), "--embeddings-dir ", req.embeddings_dir, ": no such folder");
  }
  std::shared_ptr<EmbeddingSet> embeddings = EmbeddingSet::from_dir(emb_dir);
  std::vector<std::string> unknown_embeddings;
  const std::string prompt_text = embeddings->rewrite_prefixed(prompt, &unknown_embeddings);
  const std::string negative_text = embeddings->rewrite_prefixed(req.negative, &unknown_embeddings);
  for (const std::string& n : unknown_embeddings)
    log("diffuse: warning: embedding:" + n + ": no such embedding in " + emb_dir + " (left as text)", true);
  std::vector<std::pair<std::string, std::string>> ti_hashes;
  for (const std::string* text : {&prompt_text, &negative_text})
    for (const Embedding* e : embeddings->used_in(*text))
      if (std::none_of(ti_hashes.begin(), ti_hashes.end(), [&](const auto& h) { return h.first == e->name; }))
        ti_hashes.emplace_back(e->name, as_file_error([&] { return impl_->hashes.sha256(e->path); }));
  for (const std::string& w : embeddings->take_warnings()) log("diffuse: warning: " + w, true);
  if (!ti_hashes.empty()) {
    std::string names;
    for (const auto& h : ti_hashes) names += (names.empty() ? "" : ", ") + h.first;
    log("textual inversion: " + names + " (from " + emb_dir + ")");
  }

  std::unique_ptr<RunState> own_state;
  if (!state) {
    own_state = new_state();
    state = own_state.get();
  }
  const uint64_t seed = req.seed ? *req.seed : random_seed();

  // A1111's inpainting controls and outpainting: the images the pipeline gets.
  const bool planned = uses_inpaint_plan(req);
  InpaintPlan plan;
  if (planned) {
    int ow = 0, oh = 0;
    inpaint_output_size(req, &ow, &oh);
    plan = prepare_inpaint(req.init, req.outpaint() ? nullptr : &req.mask, ow, oh, inpaint_settings(req));
  }
  const bool has_init = !req.init.pixels.empty(), has_mask = !req.mask.pixels.empty() || planned;
  RunResult out;
  out.seed = seed;
  const std::string vae = req.vae.empty() ? paired_vae(req.model) : req.vae;
  if (req.vae.empty() && !vae.empty())
    log("using the VAE " + vae + " beside the model (as A1111 pairs MODEL.vae.safetensors)");
  // The VAE encoder: img2img / inpainting, and a hires fix whose upscale works on images.
  const bool encodes = has_init || (req.hires() && req.hires_upscaler.rfind("latent", 0) != 0);
  std::shared_ptr<ModelEntry> entry = acquire_model(req.model, encodes, cb, &out.load_s, vae, req.unet);
  SDModel& model = *entry->model;
  const bool inpaint9 = model.unet_cfg.in_channels == 9;
  DF_CHECK(!inpaint9 || has_mask, "-m/--model ", req.model,
           " is an inpainting model (9-channel UNet): give -i/--init and --mask");
  const std::string hash = model_hash(req.model, cb);

  RunGuard guard;
  begin_run(*entry, lora_key(loras), [&] {
    LoraApplyReport rep = apply_set(model, *entry->be, loras);
    if (!loras.empty()) log(rep.summary(), !rep.unmatched.empty());
  });
  guard.e = entry.get();

  GenerateParams p;
  p.prediction = decide_prediction(req, model, cb);
  p.zero_terminal_snr = model.declared_zero_snr;
  // The default size: the file's modelspec.resolution when it declares a valid one, else the family's.
  const int family_size = model.family == Family::SDXL ? 1024
                          : (model.family == Family::SD2 && p.prediction == Prediction::VPrediction) ? 768
                                                                                                    : 512;
  const bool declared = model.declared.width > 0;
  const int native_w = declared ? model.declared.width : family_size;
  const int native_h = declared ? model.declared.height : family_size;
  if (!planned && !has_init && (!req.width || !req.height)) {
    const std::string family_wh = std::to_string(family_size) + "x" + std::to_string(family_size);
    if (!model.declared.problem.empty())
      log("diffuse: warning: " + model.declared.problem + "; ignored, using the family's " + family_wh, true);
    else if (declared)
      log("default size " + std::to_string(native_w) + "x" + std::to_string(native_h) +
          " from the model's modelspec.resolution");
  }
  p.prompt = prompt_text;
  p.negative = negative_text;
  p.embeddings = embeddings.get();
  p.width = planned ? plan.width : req.width ? req.width : has_init ? req.init.width : native_w;
  p.height = planned ? plan.height : req.height ? req.height : has_init ? req.init.height : native_h;
  p.steps = req.steps;
  p.cfg = req.cfg;
  p.seed = seed;
  p.subseed_strength = req.subseed_strength;
  if (req.subseed_strength > 0) p.subseed = req.subseed ? *req.subseed : random_seed();
  p.sampler = req.sampler;
  p.schedule = req.schedule;
  p.batch = req.batch;
  p.clip_skip = req.clip_skip;
  p.rng = parse_rng_kind(req.rng);
  p.strength = req.strength >= 0 ? req.strength : (inpaint9 ? 1.0 : 0.75);
  p.init = has_init ? &req.init : nullptr;
  Image init_rgb;
  if (has_init && req.init.channels != 3) {
    init_rgb = to_rgb(req.init);
    p.init = &init_rgb;
  }
  p.mask = has_mask ? &req.mask : nullptr;
  if (planned) {
    p.init = &plan.init;
    p.mask = &plan.mask;
    const MaskedContent mc = masked_content(req);
    p.latent_fill = mc == MaskedContent::LatentNoise     ? GenerateParams::LatentFill::Noise
                    : mc == MaskedContent::LatentNothing ? GenerateParams::LatentFill::Zero
                                                         : GenerateParams::LatentFill::Keep;
  }
  p.vae_tiling = req.vae_tiling;
  p.on_latent = cb.on_latent;
  std::shared_ptr<ModelEntry> refiner;  // the refiner runs without LoRAs
  RunGuard refiner_guard;
  if (!req.refiner.empty()) {
    double rs = 0;
    refiner = acquire_model(req.refiner, false, cb, &rs, "");
    begin_run(*refiner, lora_key({}), [&] { apply_set(*refiner->model, *refiner->be, {}); });
    refiner_guard.e = refiner.get();
    out.load_s += rs;
    p.refiner = refiner->model.get();
    p.refiner_switch_at = req.refiner_switch;
    check_refiner(model, *p.refiner, p);
    log("refiner " + req.refiner + ": from " + num(req.refiner_switch) + " of the schedule");
  }

  // ControlNet units (api/control_units.h): the single-unit fields first, then req.controls.
  std::vector<ControlUnitRequest> units;
  if (!req.control_net.empty())
    units.push_back({req.control_net, req.control_image, req.control_strength, 0.0, 1.0, false, req.canny,
                     req.canny_low, req.canny_high});
  units.insert(units.end(), req.controls.begin(), req.controls.end());
  const ControlSetup controls = prepare_controls(units, p.width, p.height, model.unet_cfg, [&](const std::string& path) {
    std::lock_guard<std::mutex> lk(impl_->mu);  // the cache keeps the most recently used (two, or one per unit)
    auto& slot = impl_->nets[path];
    if (!slot.net) slot.net = as_file_error([&] { return std::make_shared<ControlNet>(ControlNet::load_file(path, *entry->be)); });
    slot.last_used = ++impl_->clock;
    std::shared_ptr<ControlNet> net = slot.net;
    while (impl_->nets.size() > std::max<size_t>(2, units.size())) {
      auto victim = std::min_element(impl_->nets.begin(), impl_->nets.end(),
                                     [](const auto& a, const auto& b) { return a.second.last_used < b.second.last_used; });
      impl_->nets.erase(victim);
    }
    return net;
  }, [&](const std::string& path) {
    return as_file_error([&] { return std::make_shared<T2IAdapter>(T2IAdapter::load_file(path, *entry->be)); });
  }, display_name);
  p.controls = controls.params;

  Backend& be = *state->be;
  char line[512];
  std::snprintf(line, sizeof line, "model %s: %s, UNet %d channels, %s prediction%s, loaded in %.1f s; %s%s on %s, %d threads",
                req.model.c_str(), family_name(model.family), model.unet_cfg.in_channels,
                p.prediction == Prediction::VPrediction ? "v" : "epsilon",
                p.zero_terminal_snr ? " (zero terminal SNR)" : "", out.load_s,
                precision_name(be.effective_precision()), be.weight_format() == WeightFormat::Int8 ? " (int8 weights)" : "",
                be.name().c_str(), num_threads());
  log(line);
  if (!memory_line.empty()) log(memory_line);
  if (p.subseed_strength > 0) log("variation seed " + std::to_string(p.subseed) + " at strength " + num(p.subseed_strength));
  std::snprintf(line, sizeof line, "%s %dx%d, %d steps, %s%s, cfg %s, seed %llu (%s rng)%s",
                p.mask ? "inpaint" : p.init ? "img2img" : "txt2img", p.width, p.height, p.steps, p.sampler.c_str(),
                p.schedule == "default" ? "" : (" " + p.schedule).c_str(), num(p.cfg).c_str(),
                static_cast<unsigned long long>(seed), req.rng.c_str(),
                p.init ? (", strength " + num(p.strength)).c_str() : "");
  log(line);
  if (p.vae_tiling.active(p.height, p.width)) {
    const int64_t f = model.vae_cfg.downscale();
    VAETileAxis ty = vae_tile_axis(p.vae_tiling, p.height, f), tx = vae_tile_axis(p.vae_tiling, p.width, f);
    std::snprintf(line, sizeof line, "VAE tiling: %zux%zu tiles of %lldx%lld px, overlap >= %d px", ty.starts.size(),
                  tx.starts.size(), (long long)ty.size, (long long)tx.size, p.vae_tiling.overlap_px);
    log(line);
  }

  if (opts_.one_shot) {
    p.on_conditioned = [&] {
      std::lock_guard<std::mutex> lk(entry->mu);
      if (entry->active == 1) {  // nobody else encodes with them: free them for the steps
        model.release_text_encoders();
        entry->spent = true;
      }
    };
  }
  p.on_warning = [&](const std::string& w) { log("diffuse: warning: " + w, true); };
  bool cancelled = false;
  p.cancelled = [&] { return cancelled; };
  p.finish_early = cb.finish_early;
  ProgressFn progress = [&](Stage s, int done, int total) {
    if (cb.progress && !cb.progress(s, done, total)) cancelled = true;
  };

  InfotextInputs ii;
  ii.prompt = req.prompt;  // line 1 keeps the prompt as written (with its <lora:…> tags), as A1111 does
  ii.model_hash = hash;
  ii.model_name = display_name(req.model);
  ii.lora_hashes = lora_hashes;
  ii.ti_hashes = ti_hashes;
  ii.controls = controls.infotext;
  if (planned) ii.inpaint = inpaint_infotext(req, plan);
  if (refiner) {  // A1111's short_title: "NAME [hash10]"
    const std::string rh = model_hash(req.refiner, cb);
    ii.refiner = "Refiner: " + display_name(req.refiner) + (rh.empty() ? "" : " [" + rh + "]") +
                 ", Refiner switch at: " + num(req.refiner_switch);
  }
  if (!vae.empty()) {
    ii.vae_name = fs::path(vae).stem().string();
    ii.vae_hash = impl_->hashes.sha256(vae).substr(0, 10);
  }
  p.on_result = [&](const Result& r, int i) {
    GeneratedImage g;
    g.image = r.image;
    if (planned) plan.finish(g.image);  // paste back / composite over the init image
    g.seed = r.seed;
    g.latent = r.latent;
    g.parameters = infotext(p, ii, g.seed, i + 1);
    g.image.text.emplace_back("parameters", g.parameters);
    if (cb.on_image) cb.on_image(g, i);
    out.images.push_back(std::move(g));
  };

  std::unique_ptr<RRDBNet> esrgan;
  HiresParams hp = hires_params(req);
  if (req.hires()) {
    if (!req.hires_upscaler_model.empty())
      esrgan = std::make_unique<RRDBNet>(as_file_error([&] { return load_rrdbnet(req.hires_upscaler_model, be); }));
    hp.esrgan = esrgan.get();
    int tw = 0, th = 0;
    hires_target(hp, p.width, p.height, &tw, &th);
    log("hires fix: " + std::to_string(p.width) + "x" + std::to_string(p.height) + " -> " + std::to_string(tw) + "x" +
        std::to_string(th) + " (" + hires_upscaler_display(hp.upscaler, fs::path(req.hires_upscaler_model).stem().string()) +
        "), " + std::to_string(hp.steps > 0 ? hp.steps : p.steps) + " steps at denoising strength " + num(hp.denoise));
    ii.hires = hires_infotext(req, hp, p.width, p.height);
    ii.hires_denoise = hp.denoise;
  }

  auto tg = std::chrono::steady_clock::now();
  if (req.hires())
    generate_hires(model, be, p, hp, progress, &state->ws);
  else
    diffuse::generate(model, be, p, progress, &state->ws);
  out.generate_s = seconds_since(tg);
  state->ws.release();
  if (entry->spent) {
    std::lock_guard<std::mutex> lk(impl_->mu);
    auto it = impl_->models.find(entry->path);
    if (it != impl_->models.end() && it->second == entry) impl_->models.erase(it);
  }
  return out;
}

std::string default_cache_dir() {
  if (const char* d = std::getenv("DIFFUSE_CACHE_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/diffuse";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/diffuse";
  return "";
}

}  // namespace diffuse::api
