// The C API (include/diffuse.h) over the engine (api/engine.h). No exception crosses it: every
// failure becomes a status plus the thread's last-error message.
#include "diffuse.h"

#include <cstring>
#include <map>
#include <new>
#include <string>

#include "api/engine.h"
#include "core/error.h"
#include "io/image.h"

#ifndef DIFFUSE_VERSION
#define DIFFUSE_VERSION "0.1.0"
#endif

using namespace diffuse;

struct diffuse_context {
  std::unique_ptr<api::Engine> engine;
  std::string path;
};

struct diffuse_state {
  diffuse_context* ctx = nullptr;
  std::unique_ptr<api::RunState> run;
};

struct diffuse_result {
  std::vector<api::GeneratedImage> images;
  std::map<int, std::vector<uint8_t>> png;  // encoded on request
};

namespace {

thread_local std::string g_last_error;

diffuse_status set_error(diffuse_status s, const std::string& msg) {
  g_last_error = msg;
  return s;
}

// Runs f, mapping exceptions to statuses.
template <class F>
diffuse_status guarded(F&& f) {
  try {
    g_last_error.clear();
    return f();
  } catch (const Cancelled& e) {
    return set_error(DIFFUSE_ERR_CANCELLED, e.what());
  } catch (const FileError& e) {
    return set_error(DIFFUSE_ERR_FILE, e.what());
  } catch (const Error& e) {
    return set_error(DIFFUSE_ERR_INVALID_ARGUMENT, e.what());
  } catch (const std::bad_alloc&) {
    return set_error(DIFFUSE_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return set_error(DIFFUSE_ERR_INTERNAL, e.what());
  } catch (...) {
    return set_error(DIFFUSE_ERR_INTERNAL, "unknown error");
  }
}

std::string str(const char* s, const char* dflt = "") { return s ? std::string(s) : std::string(dflt); }

Image rgb_image(const unsigned char* px, int w, int h, int channels, const char* field) {
  DF_CHECK(w > 0 && h > 0 && w <= kMaxImageSide && h <= kMaxImageSide, field, ": size ", w, "x", h,
           " must be between 1 and ", kMaxImageSide, " pixels a side");
  Image im;
  im.width = w;
  im.height = h;
  im.channels = channels;
  im.pixels.assign(px, px + size_t(w) * size_t(h) * size_t(channels));
  return im;
}

api::Request to_request(const diffuse_context& ctx, const diffuse_params& p) {
  api::Request r;
  r.model = ctx.path;
  r.prompt = str(p.prompt);
  r.negative = str(p.negative_prompt);
  DF_CHECK(p.width >= 0 && p.height >= 0, "width/height ", p.width, "x", p.height, ": must be >= 0 (0: default)");
  r.width = p.width;
  r.height = p.height;
  r.steps = p.steps;
  r.cfg = p.cfg_scale;
  if (p.seed >= 0) r.seed = uint64_t(p.seed);
  r.sampler = str(p.sampler, "euler_a");
  r.schedule = str(p.scheduler, "default");
  r.batch = p.batch_size;
  r.clip_skip = p.clip_skip;
  r.rng = str(p.rng, "cuda");
  r.prediction = str(p.prediction);
  r.strength = p.strength;
  if (p.init_image) r.init = rgb_image(p.init_image, p.init_width, p.init_height, 3, "init_image");
  if (p.mask_image) {
    DF_CHECK(p.init_image, "mask_image needs init_image");
    r.mask = rgb_image(p.mask_image, p.init_width, p.init_height, 1, "mask_image");
  }
  DF_CHECK(p.n_loras >= 0 && (p.n_loras == 0 || p.loras), "loras: ", p.n_loras, " entries but no array");
  for (int i = 0; i < p.n_loras; ++i) {
    DF_CHECK(p.loras[i].path, "loras[", i, "].path is NULL");
    r.loras.push_back({p.loras[i].path, p.loras[i].multiplier});
  }
  r.control_net = str(p.control_net);
  if (p.control_image) r.control_image = rgb_image(p.control_image, p.control_width, p.control_height, 3, "control_image");
  r.control_strength = p.control_strength;
  r.canny = p.canny != 0;
  DF_CHECK(p.vae_tiling >= -1 && p.vae_tiling <= 1, "vae_tiling ", p.vae_tiling, ": -1 (auto), 0 (off) or 1 (on)");
  r.vae_tiling.mode = p.vae_tiling < 0 ? VAETiling::Mode::Auto : p.vae_tiling ? VAETiling::Mode::On : VAETiling::Mode::Off;
  r.vae = str(p.vae);
  r.embeddings_dir = str(p.embeddings_dir);
  if (p.subseed >= 0) r.subseed = uint64_t(p.subseed);
  r.subseed_strength = p.subseed_strength;
  r.hires_scale = p.hires_scale;
  r.hires_width = p.hires_width;
  r.hires_height = p.hires_height;
  r.hires_steps = p.hires_steps;
  r.hires_denoise = p.hires_denoise;
  r.hires_upscaler = str(p.hires_upscaler, "latent");
  r.hires_upscaler_model = str(p.hires_upscaler_model);
  r.unet = str(p.unet);
  r.mask_blur = p.mask_blur;
  r.invert_mask = p.invert_mask != 0;
  r.masked_content = str(p.masked_content);
  r.only_masked = p.inpaint_only_masked != 0;
  r.only_masked_padding = p.only_masked_padding;
  r.outpaint_left = p.outpaint_left;
  r.outpaint_right = p.outpaint_right;
  r.outpaint_top = p.outpaint_top;
  r.outpaint_bottom = p.outpaint_bottom;
  DF_CHECK(p.n_control_units >= 0 && (p.n_control_units == 0 || p.control_units), "control_units: ",
           p.n_control_units, " entries but no array");
  for (int i = 0; i < p.n_control_units; ++i) {
    const diffuse_control_unit& u = p.control_units[i];
    const std::string what = "control_units[" + std::to_string(i) + "]";
    DF_CHECK(u.control_net, what, ".control_net is NULL");
    DF_CHECK(u.image, what, ".image is NULL");
    api::ControlUnitRequest cu;
    cu.net = u.control_net;
    cu.image = rgb_image(u.image, u.width, u.height, 3, (what + ".image").c_str());
    cu.strength = u.strength;
    cu.start = u.guidance_start;
    cu.end = u.guidance_end;
    cu.guess_mode = u.guess_mode != 0;
    cu.canny = u.canny != 0;
    r.controls.push_back(std::move(cu));
  }
  return r;
}

}  // namespace

extern "C" {

const char* diffuse_version(void) { return DIFFUSE_VERSION; }

const char* diffuse_status_string(diffuse_status s) {
  switch (s) {
    case DIFFUSE_OK: return "ok";
    case DIFFUSE_ERR_INVALID_ARGUMENT: return "invalid argument";
    case DIFFUSE_ERR_FILE: return "file error";
    case DIFFUSE_ERR_CANCELLED: return "cancelled";
    case DIFFUSE_ERR_OUT_OF_MEMORY: return "out of memory";
    case DIFFUSE_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

const char* diffuse_last_error(void) { return g_last_error.c_str(); }

struct diffuse_context_params diffuse_context_default_params(void) {
  diffuse_context_params p;
  std::memset(&p, 0, sizeof p);
  p.n_threads = 0;
  p.precision = "auto";
  p.weights = "native";
  return p;
}

diffuse_status diffuse_init_from_file(const char* path, struct diffuse_context_params params, struct diffuse_context** out) {
  return guarded([&] {
    DF_CHECK(out != nullptr, "diffuse_init_from_file: out is NULL");
    *out = nullptr;
    DF_CHECK(path != nullptr && *path, "diffuse_init_from_file: path is empty");
    api::EngineOptions o;
    o.threads = params.n_threads;
    o.precision = str(params.precision, "auto");
    o.weights = str(params.weights, "native");
    o.lora_dir = str(params.lora_dir);
    o.hash_cache_dir = str(params.cache_dir);
    auto ctx = std::make_unique<diffuse_context>();
    ctx->engine = std::make_unique<api::Engine>(o);
    ctx->path = path;
    ctx->engine->load(path);
    *out = ctx.release();
    return DIFFUSE_OK;
  });
}

void diffuse_free(struct diffuse_context* ctx) { delete ctx; }

diffuse_status diffuse_state_new(struct diffuse_context* ctx, struct diffuse_state** out) {
  return guarded([&] {
    DF_CHECK(ctx != nullptr && out != nullptr, "diffuse_state_new: ctx and out must not be NULL");
    auto s = std::make_unique<diffuse_state>();
    s->ctx = ctx;
    s->run = ctx->engine->new_state();
    *out = s.release();
    return DIFFUSE_OK;
  });
}

void diffuse_state_free(struct diffuse_state* state) { delete state; }

struct diffuse_params diffuse_default_params(void) {
  diffuse_params p;
  std::memset(&p, 0, sizeof p);
  p.steps = 20;
  p.cfg_scale = 7.0f;
  p.seed = -1;
  p.sampler = "euler_a";
  p.scheduler = "default";
  p.batch_size = 1;
  p.rng = "cuda";
  p.strength = -1.0f;
  p.control_strength = 1.0f;
  p.vae_tiling = -1;
  p.subseed = -1;
  p.hires_denoise = 0.7f;
  p.hires_upscaler = "latent";
  p.mask_blur = -1;
  p.only_masked_padding = 32;
  return p;
}

struct diffuse_control_unit diffuse_default_control_unit(void) {
  diffuse_control_unit u;
  std::memset(&u, 0, sizeof u);
  u.strength = 1.0f;
  u.guidance_end = 1.0f;
  return u;
}

diffuse_status diffuse_generate(struct diffuse_context* ctx, struct diffuse_state* state,
                                const struct diffuse_params* params, struct diffuse_result** out) {
  return guarded([&] {
    DF_CHECK(ctx != nullptr && params != nullptr && out != nullptr,
             "diffuse_generate: ctx, params and out must not be NULL");
    *out = nullptr;
    DF_CHECK(state == nullptr || state->ctx == ctx, "diffuse_generate: the state belongs to another context");
    api::Request r = to_request(*ctx, *params);
    api::Callbacks cb;
    if (params->progress_callback) {
      cb.progress = [params](Stage s, int done, int total) {
        const diffuse_stage st = s == Stage::Encode ? DIFFUSE_STAGE_ENCODE
                                 : s == Stage::Denoise ? DIFFUSE_STAGE_DENOISE : DIFFUSE_STAGE_DECODE;
        return params->progress_callback(st, done, total, params->progress_callback_user_data) == 0;
      };
    }
    api::RunResult rr = ctx->engine->generate(r, cb, state ? state->run.get() : nullptr);
    auto res = std::make_unique<diffuse_result>();
    res->images = std::move(rr.images);
    *out = res.release();
    return DIFFUSE_OK;
  });
}

int diffuse_result_count(const struct diffuse_result* res) { return res ? int(res->images.size()) : 0; }

const unsigned char* diffuse_result_image(const struct diffuse_result* res, int i, int* width, int* height) {
  if (!res || i < 0 || i >= int(res->images.size())) return nullptr;
  const Image& im = res->images[size_t(i)].image;
  if (width) *width = im.width;
  if (height) *height = im.height;
  return im.pixels.data();
}

uint64_t diffuse_result_seed(const struct diffuse_result* res, int i) {
  if (!res || i < 0 || i >= int(res->images.size())) return 0;
  return res->images[size_t(i)].seed;
}

const char* diffuse_result_parameters(const struct diffuse_result* res, int i) {
  if (!res || i < 0 || i >= int(res->images.size())) return nullptr;
  return res->images[size_t(i)].parameters.c_str();
}

const unsigned char* diffuse_result_png(struct diffuse_result* res, int i, size_t* size) {
  if (!res || i < 0 || i >= int(res->images.size())) return nullptr;
  g_last_error.clear();
  try {
    auto it = res->png.find(i);
    if (it == res->png.end()) it = res->png.emplace(i, encode_png(res->images[size_t(i)].image)).first;
    if (size) *size = it->second.size();
    return it->second.data();
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return nullptr;
  }
}

void diffuse_result_free(struct diffuse_result* res) { delete res; }

}  // extern "C"
