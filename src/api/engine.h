// The engine the CLI, the server and the C API share: it owns loaded models (kept across runs, a
// model cache with a memory budget), applies each request's LoRAs to the model it runs on
// (switching sets without reloading the base: only the affected prepared weights are replaced),
// caches ControlNets, and runs one request — txt2img, img2img or inpainting with every option
// `diffuse generate` has — returning images with their A1111 `parameters` text and seeds.
//
// Concurrency: an Engine may be called from several threads at once. Each run needs its own
// RunState (a backend object for the ops' conversion buffers and a Workspace for the models'
// scratch; generate() makes a temporary one when given none). Runs on the same model with the
// same LoRA set execute side by side; a run that needs another LoRA set on that model waits until
// the runs using the current set have finished, then switches. Loading a model holds the engine's
// lock (other loads and cache lookups wait).
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "api/control_units.h"
#include "io/image.h"
#include "models/lora.h"
#include "models/vae.h"
#include "pipeline/generate.h"

namespace diffuse::api {

struct EngineOptions {
  int threads = 0;                  // 0: all physical cores
  std::string precision = "auto";   // auto (bf16 where the CPU has fast bf16) | fp32 | bf16
  std::string weights = "native";   // native | int8
  // Bytes of models kept loaded besides the one a run uses (least recently used go first). 0:
  // only the most recently used model stays loaded (A1111's default of one checkpoint).
  size_t model_cache_bytes = 0;
  std::string lora_dir;             // where <lora:NAME:W> prompt tags find NAME.safetensors
  std::string embeddings_dir;       // textual inversions for every run ("" = Request::embeddings_dir's default)
  std::string hash_cache_dir;       // A1111 model hashes; empty: default_cache_dir()
  // One-shot runs (the CLI): free the text encoders once the prompts are encoded, and drop the
  // model after the run (a later run loads it again).
  bool one_shot = false;
  // For profilers (`diffuse bench --profile`): wraps the backend of every run state new_state()
  // makes, e.g. in a ProfilingBackend (backend/profiling.h). Empty: the plain backend.
  std::function<std::unique_ptr<Backend>(std::unique_ptr<Backend>)> wrap_run_backend;
};

struct LoraSpec {
  std::string path;
  float multiplier = 1.0f;
};

// One generation. Field names in error messages are the CLI's flags (the C API and the server
// document the mapping).
struct Request {
  std::string model;                // single file or diffusers folder
  std::string prompt, negative;     // A1111 weighting; <lora:NAME:W> tags (resolved in EngineOptions::lora_dir)
  int width = 0, height = 0;        // 0: the init image's size, else the model's native size (the file's
                                    // modelspec.resolution when valid, else the family's: 512, 768 v, 1024 XL)
  int steps = 20;
  double cfg = 7.0;
  std::optional<uint64_t> seed;     // the whole uint64 range (torch's); none: random (the result says which)
  // A1111's variation seed: image i's noise slerped towards subseed + i's by subseed_strength
  // (0: off; no subseed: random).
  std::optional<uint64_t> subseed;
  double subseed_strength = 0;
  std::string sampler = "euler_a";
  std::string schedule = "default"; // default | karras | trailing
  int batch = 1;
  int clip_skip = 0;
  std::string rng = "cuda";         // cuda (A1111) | cpu (diffusers' CPU generator)
  std::string prediction;           // "" (from the model) | eps | v
  double strength = -1.0;           // img2img/inpaint; < 0: 0.75 (1 for 9-channel inpainting models)
  Image init, mask;                 // empty pixels: none
  // A1111's inpainting controls and outpainting (pipeline/inpaint_prep.h, api/inpaint_request.h).
  // With any of them but a masked content of "original", the result is composited over the init
  // image through the (blurred) mask, as A1111 does; only masked pastes the crop back.
  int mask_blur = -1;               // Gaussian sigma, pixels; -1: 0, or 4 with outpainting (A1111's)
  int mask_blur_y = -1;             // the vertical sigma if it differs (A1111's mask_blur_y); -1: mask_blur
  bool invert_mask = false;         // repaint what the mask leaves black
  std::string masked_content;       // fill | original | latent noise | latent nothing ("": original; fill outpainting)
  bool only_masked = false;         // inpaint the mask's box (grown by the padding) at the output size, pasted back
  int only_masked_padding = 32;
  int outpaint_left = 0, outpaint_right = 0, outpaint_top = 0, outpaint_bottom = 0;  // pixels added to -i
  bool outpaint() const { return outpaint_left > 0 || outpaint_right > 0 || outpaint_top > 0 || outpaint_bottom > 0; }
  std::vector<LoraSpec> loras;      // besides the prompt's tags
  // Textual-inversion embeddings used by name in the prompts (models/embedding.h): this folder,
  // else EngineOptions::embeddings_dir, else "embeddings" beside a single-file model if there is
  // one, else the model's own folder.
  std::string embeddings_dir;
  // SDXL refiner (pipeline/refiner.h): continues the latent once refiner_switch of the schedule is
  // done (A1111's "Refiner" / "Switch at"); "" none.
  std::string refiner;
  double refiner_switch = 0.8;
  std::string unet;                 // a UNet-only file (ComfyUI's unet files) instead of the checkpoint's ("" none)
  std::string vae;                  // a standalone VAE file instead of the checkpoint's ("" = MODEL.vae.safetensors
                                    // beside a single-file model if there is one, else the checkpoint's own)
  // Hires fix (pipeline/hires.h, txt2img only): on when hires_scale > 0 or a hires size is given.
  double hires_scale = 0;           // pass-2 size = base size × scale
  int hires_width = 0, hires_height = 0;  // or an explicit pass-2 size (A1111's "resize to")
  int hires_steps = 0;              // 0: the first pass's steps
  double hires_denoise = 0.7;
  std::string hires_upscaler = "latent";  // pipeline/hires.h names, or "esrgan" with hires_upscaler_model
  std::string hires_upscaler_model;       // an ESRGAN / Real-ESRGAN file (models/rrdbnet.h)
  bool hires() const { return hires_scale > 0 || hires_width > 0 || hires_height > 0; }
  std::string control_net;          // ControlNet file or folder ("" none)
  Image control_image;
  double control_strength = 1.0;
  bool canny = false;
  int canny_low = 100, canny_high = 200;
  // ControlNet units (api/control_units.h), after the unit above when control_net is set: each
  // with its hint, strength, guidance start/end and guess mode; their residuals are summed.
  std::vector<ControlUnitRequest> controls;
  VAETiling vae_tiling;
};

struct GeneratedImage {
  Image image;             // 8-bit RGB; image.text holds ("parameters", A1111 text)
  std::string parameters;  // the same text
  uint64_t seed = 0;
  Tensor latent;           // f32 [1, 4, h, w] NCHW, before dividing by the VAE scaling factor
};

struct RunResult {
  std::vector<GeneratedImage> images;
  double load_s = 0, generate_s = 0;  // model load (0 when cached), sampling + decoding
  uint64_t seed = 0;                  // the run's seed
};

struct Callbacks {
  // (stage, done, total) as pipeline/generate.h reports it; return false to cancel the run
  // (generate() then throws diffuse::Cancelled).
  std::function<bool(Stage, int, int)> progress;
  // Polled after each sampling step: true ends sampling there and decodes what the latent is
  // then (the images come back as usual; A1111's interrupt).
  std::function<bool()> finish_early;
  // Informational lines (model loaded, LoRA summary, settings); warnings say warning = true.
  std::function<void(const std::string& line, bool warning)> log;
  // Each image as soon as it is decoded (with its parameters text), before the next one: a caller
  // that saves it here keeps finished work when a later image of the batch fails.
  std::function<void(const GeneratedImage& image, int index)> on_image;
  // After each scheduler step: the batch's latent, f32 [B, h, w, 4] NHWC before dividing by the
  // VAE scaling factor (pipeline/preview.h turns it into a preview), step 1-based of steps.
  std::function<void(const Tensor& latent, int step, int steps)> on_latent;
};

// A run's own memory: the backend object that executes its ops (with its conversion buffers) and
// the models' scratch (released at the end of each run, so an idle state holds little). Reuse one
// for consecutive runs of one caller; never share one between runs at the same time.
class RunState {
 public:
  ~RunState();
  size_t scratch_bytes() const;

 private:
  friend class Engine;
  RunState() = default;
  std::unique_ptr<Backend> be;
  Workspace ws;
};

class Engine {
 public:
  explicit Engine(EngineOptions o = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  const EngineOptions& options() const { return opts_; }

  // Everything that can be checked without loading anything; throws diffuse::Error naming the
  // field. generate() calls it first. validate_settings() checks all but the images' contents,
  // given which images there are (for callers that read them later).
  static void validate(const Request& r);
  struct ImagesGiven {
    bool init = false, mask = false, control_image = false;
  };
  static void validate_settings(const Request& r, ImagesGiven given);

  std::unique_ptr<RunState> new_state() const;

  // Runs one request. Throws diffuse::Error (bad request, unreadable files), diffuse::Cancelled.
  RunResult generate(const Request& r, const Callbacks& cb = {}, RunState* state = nullptr);

  // Loads `path` into the cache (if not there) and keeps it; the load time in seconds (0 if cached).
  double load(const std::string& path, const Callbacks& cb = {});
  // Sets the LoRA set of loaded model `path` (loading it first if needed) as a run would; for
  // benchmarks, tests and servers that switch ahead of a run. Waits for runs on the model.
  LoraApplyReport set_loras(const std::string& path, const std::vector<LoraSpec>& loras);
  std::vector<std::string> loaded_models() const;
  // The folder a run of `model` takes textual inversions from when its request names none
  // (Request::embeddings_dir).
  std::string embeddings_dir(const std::string& model) const;
  // The model's family (from the loaded model, else from the file's tensor shapes); Unknown when
  // the file cannot be read.
  Family family_of(const std::string& path) const;
  void unload_all();

  // A1111's short model hash (first 10 hex digits of the file's sha256; "" for folders), from the
  // hash cache when the file's path, size and modification time match, else computed now (once)
  // and stored.
  std::string model_hash(const std::string& path, const Callbacks& cb = {});
  // The file's full sha256 (the same cache); "" for folders.
  std::string model_sha256(const std::string& path);

  struct ModelEntry;
  // What the memory check knows of a model before running it: its UNet and VAE configs and
  // parameter count (from the loaded model, else from the file's tensor shapes), and whether its
  // weights are already resident.
  struct ModelShapes {
    bool known = false, loaded = false;
    UNetConfig unet;
    VAEConfig vae;
    int64_t params = 0;
  };

 private:
  ModelShapes shapes_of(const std::string& path) const;
  // `vae`: a standalone VAE file bound instead of the model's ("" none); the cache keeps a model with
  // another VAE as a separate entry.
  std::shared_ptr<ModelEntry> acquire_model(const std::string& path, bool vae_encoder, const Callbacks& cb,
                                            double* load_s, const std::string& vae = "", const std::string& unet = "");
  void evict_locked(const ModelEntry* keep);

  EngineOptions opts_;
  Precision precision_;
  WeightFormat format_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A random seed as A1111 draws one for -1 (below 2^32 - 2, so it fits every client's integers);
// the one place the engine, the server and the CLI get random seeds and subseeds from.
inline uint64_t random_seed() {
  std::random_device rd;
  return rd() % 4294967294u;
}

// $DIFFUSE_CACHE_DIR, else $XDG_CACHE_HOME/diffuse, else ~/.cache/diffuse.
std::string default_cache_dir();

}  // namespace diffuse::api
