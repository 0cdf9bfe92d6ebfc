#include "models/sd_model.h"

#include <charconv>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/memory_stats.h"
#include "io/image.h"
#include "models/name_map.h"

namespace diffuse {

namespace {

// A diffusers folder's VAE config may state its scaling factor; single files follow the family.
float vae_scaling(const TensorFile& f, Family family) {
  auto it = f.metadata.find("vae/config.json");
  if (it != f.metadata.end()) {
    nlohmann::json j = nlohmann::json::parse(it->second, nullptr, false);
    if (j.is_object() && j.contains("scaling_factor") && j["scaling_factor"].is_number())
      return j["scaling_factor"].get<float>();
  }
  return family == Family::SDXL ? 0.13025f : 0.18215f;
}

// An SDXL refiner's added embedding takes the pooled text (its encoder's projection width P) and 5
// time ids (original size, crop, aesthetic score) of `addition_time_embed_dim` sinusoids each;
// its cross-attention reads that encoder's hidden states (width W). Both are checked here.
void set_refiner_time_ids(const TensorFile& f, UNetConfig& u) {
  const WeightStore te = component_weights(f, Component::TextEncoder2, Family::SDXL);
  const Tensor* proj = te.find("text_projection.weight");
  const Tensor* tok = te.find("text_model.embeddings.token_embedding.weight");
  DF_CHECK(proj && proj->rank() == 2 && tok && tok->rank() == 2, f.path,
           ": an SDXL refiner's text encoder (OpenCLIP ViT-bigG) needs text_projection and token_embedding");
  const int P = int(proj->dim(0)), W = int(tok->dim(1));
  const int in = u.projection_class_embeddings_input_dim, n = 5;
  DF_CHECK(u.text_time && in > P && (in - P) % n == 0, f.path, ": an SDXL refiner's UNet add_embedding takes ",
           "the pooled text (", P, ") + 5 time ids x 256 (2560 in the published refiner), this one takes ", in);
  DF_CHECK(u.context_dim == W, f.path, ": the refiner's UNet attends to a context of width ", u.context_dim,
           ", its text encoder is ", W, " wide (1280 in the published refiner)");
  u.num_time_ids = n;
  u.addition_time_embed_dim = (in - P) / n;
  u.validate();
}

// A --unet file must take the checkpoint's text conditioning: the same context width and, for
// SDXL, the added (pooled + time ids) embedding.
void check_unet_fits(const std::string& unet_path, const UNetConfig& u, const SDModel& m) {
  const int ctx = m.summary.context_dim;
  DF_CHECK(ctx == 0 || u.context_dim == ctx, unet_path, ": a UNet for a text context of width ", u.context_dim,
           ", but ", m.path, " (", family_name(m.family), ") gives ", ctx, " (a UNet for another model family)");
  DF_CHECK((u.projection_class_embeddings_input_dim > 0) == (m.family == Family::SDXL), unet_path,
           u.projection_class_embeddings_input_dim > 0 ? ": an SDXL UNet (added pooled/time-id embedding), but "
                                                       : ": a UNet without SDXL's added embedding, but ",
           m.path, " is ", family_name(m.family));
}

}  // namespace

bool parse_declared_resolution(const std::string& v, int* width, int* height) {
  const size_t b = v.find_first_not_of(" \t"), e = v.find_last_not_of(" \t");
  if (b == std::string::npos) return false;
  const std::string s = v.substr(b, e - b + 1);
  const size_t x = s.find_first_of("xX");
  if (x == std::string::npos) return false;
  auto side = [](const char* first, const char* last, int* out) {
    auto [p, ec] = std::from_chars(first, last, *out);
    return first != last && ec == std::errc() && p == last && *out > 0 && *out % 8 == 0 && *out <= kMaxImageSide;
  };
  int w = 0, h = 0;
  if (!side(s.data(), s.data() + x, &w) || !side(s.data() + x + 1, s.data() + s.size(), &h)) return false;
  *width = w;
  *height = h;
  return true;
}

DeclaredResolution declared_resolution(const TensorFile& f) {
  DeclaredResolution d;
  auto it = f.metadata.find("modelspec.resolution");
  if (it == f.metadata.end()) return d;
  if (!parse_declared_resolution(it->second, &d.width, &d.height)) {
    std::string shown = it->second.substr(0, 64);
    for (char& c : shown)
      if (static_cast<unsigned char>(c) < 0x20) c = '?';  // one line on a terminal
    d.problem = cat(f.path, ": modelspec.resolution \"", shown, it->second.size() > 64 ? "...\"" : "\"",
                    " is not WIDTHxHEIGHT in positive multiples of 8 up to ", kMaxImageSide);
  }
  return d;
}

std::string declared_prediction(const TensorFile& f) {
  auto norm = [](const std::string& v) -> std::string {
    if (v == "v" || v == "v_prediction") return "v";
    if (v == "epsilon" || v == "eps") return "epsilon";
    return "";
  };
  auto it = f.metadata.find("modelspec.prediction_type");
  if (it != f.metadata.end()) return norm(it->second);
  it = f.metadata.find("scheduler/scheduler_config.json");
  if (it == f.metadata.end()) return "";
  nlohmann::json j = nlohmann::json::parse(it->second, nullptr, false);
  if (!j.is_object() || !j.contains("prediction_type") || !j["prediction_type"].is_string()) return "";
  return norm(j["prediction_type"].get<std::string>());
}

bool declared_zero_snr(const TensorFile& f) {
  auto it = f.metadata.find("ss_zero_terminal_snr");
  if (it != f.metadata.end()) return it->second == "True" || it->second == "true";
  it = f.metadata.find("scheduler/scheduler_config.json");
  if (it == f.metadata.end()) return false;
  nlohmann::json j = nlohmann::json::parse(it->second, nullptr, false);
  return j.is_object() && j.contains("rescale_betas_zero_snr") && j["rescale_betas_zero_snr"].is_boolean() &&
         j["rescale_betas_zero_snr"].get<bool>();
}

WeightStore base_component_weights(const SDModel& m, Component c, std::map<std::string, TensorFile>& files) {
  const std::string& path = c == Component::UNet && !m.unet_path.empty() ? m.unet_path : m.path;
  auto it = files.find(path);
  if (it == files.end()) it = files.emplace(path, open_model_file(path)).first;
  if (c == Component::UNet && !m.unet_path.empty()) return unet_file_weights(it->second);
  return component_weights(it->second, c, m.family);
}

void SDModel::release_text_encoders() {
  te.unload();
  te2.unload();
  return_free_memory();
}

std::unique_ptr<SDModel> SDModel::load(const std::string& path, Backend& be, const SDLoadOptions& opts) {
  // The backend's conversion buffers grow to the largest weight while binding: freed when done.
  struct ReleaseScratch {
    Backend& be;
    ~ReleaseScratch() { be.release_scratch(); }
  } release{be};
  auto m = std::make_unique<SDModel>();
  m->path = path;
  TensorFile f = open_model_file(path);
  m->summary = summarize_model(f);
  m->declared = declared_resolution(f);
  m->declared_prediction = diffuse::declared_prediction(f);
  m->declared_zero_snr = diffuse::declared_zero_snr(f);
  m->family = m->summary.family;
  DF_CHECK(m->family != Family::Unknown, path, ": not a Stable Diffusion checkpoint the engine knows (",
           m->summary.problems.empty() ? std::string("family unknown") : m->summary.problems.front(), ")");

  m->refiner = m->summary.refiner;
  if (opts.text_encoders && m->refiner) {
    WeightStore w2 = component_weights(f, Component::TextEncoder2, m->family);
    m->te2_cfg = ClipTextConfig::from_weights(w2, ClipTextConfig::Gelu);
    m->te2.load(be, w2, m->te2_cfg);
    m->has_te2 = true;
  } else if (opts.text_encoders) {
    // SD 1.x and SDXL's first encoder are OpenAI CLIP (quick GELU); SD 2.x's and SDXL's second
    // are OpenCLIP (exact GELU).
    auto act = m->family == Family::SD2 ? ClipTextConfig::Gelu : ClipTextConfig::QuickGelu;
    WeightStore w = component_weights(f, Component::TextEncoder, m->family);
    m->te_cfg = ClipTextConfig::from_weights(w, act);
    m->te.load(be, w, m->te_cfg);
    if (m->family == Family::SDXL) {
      WeightStore w2 = component_weights(f, Component::TextEncoder2, m->family);
      m->te2_cfg = ClipTextConfig::from_weights(w2, ClipTextConfig::Gelu);
      m->te2.load(be, w2, m->te2_cfg);
      m->has_te2 = true;
    }
  }
  if (opts.unet) {
    TensorFile uf = opts.unet_path.empty() ? TensorFile{} : open_model_file(opts.unet_path);
    WeightStore w = opts.unet_path.empty() ? component_weights(f, Component::UNet, m->family) : unet_file_weights(uf);
    m->unet_cfg = UNetConfig::from_weights(w);
    if (!opts.unet_path.empty()) {
      m->unet_path = opts.unet_path;
      check_unet_fits(opts.unet_path, m->unet_cfg, *m);
    }
    if (m->refiner) set_refiner_time_ids(f, m->unet_cfg);
    m->unet.load(be, w, m->unet_cfg);
  }
  if (opts.vae_encoder || opts.vae_decoder) {
    // The scaling factor stays the checkpoint's: the UNet was trained on latents scaled by it.
    TensorFile vf = opts.vae_path.empty() ? TensorFile{} : open_model_file(opts.vae_path);
    WeightStore w = opts.vae_path.empty() ? component_weights(f, Component::VAE, m->family) : vae_file_weights(vf);
    m->vae_cfg = VAEConfig::from_weights(w, vae_scaling(f, m->family));
    if (!opts.vae_path.empty() && opts.unet) {
      const int latent = m->unet_cfg.out_channels;  // 9-channel inpainting UNets still predict 4
      DF_CHECK(m->vae_cfg.latent_channels == latent, opts.vae_path, ": a VAE with ", m->vae_cfg.latent_channels,
               " latent channels, but the model's UNet works on ", latent);
    }
    if (!opts.vae_encoder || !opts.vae_decoder) {
      // Leave the half we do not need out of the strict check.
      std::string skip = opts.vae_encoder ? "decoder." : "encoder.";
      for (const std::string& n : w.names()) {
        if (n.rfind(skip, 0) == 0 || n.rfind(opts.vae_encoder ? "post_quant_conv." : "quant_conv.", 0) == 0)
          w.ignore(n);
      }
    }
    m->vae.load(be, w, m->vae_cfg, opts.vae_encoder, opts.vae_decoder, opts.vae_training);
  }
  return m;
}

}  // namespace diffuse
