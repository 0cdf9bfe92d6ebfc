// SD 1.x ldm tensor names and shapes at any widths (see sd_arch.h). The naming follows the
// original code: the UNet's input_blocks/middle_block/output_blocks numbering (a resnet, then a
// SpatialTransformer where a level has attention, a downsampler/upsampler closing a level), the
// VAE's encoder.down.i.block.j / decoder.up.i.block.j, the text encoder under
// cond_stage_model.transformer.text_model.
#include "models/sd_arch.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/tensor_file.h"

namespace diffuse {

namespace {

constexpr int kGroups = 32;

class Rows {
 public:
  Rows(std::vector<ManifestRow>& out, std::string component, std::string prefix)
      : out_(out), component_(std::move(component)), prefix_(std::move(prefix)) {}
  void add(const std::string& name, Shape shape, bool zero = false) {
    ManifestRow r{"ldm", component_, prefix_ + name, std::move(shape)};
    r.zero_init = zero;
    out_.push_back(std::move(r));
  }
  void norm(const std::string& m, int64_t c) {
    add(m + ".weight", {c});
    add(m + ".bias", {c});
  }
  void conv(const std::string& m, int64_t out, int64_t in, int64_t k, bool zero = false) {
    add(m + ".weight", {out, in, k, k}, zero);
    add(m + ".bias", {out}, zero);
  }
  void linear(const std::string& m, int64_t out, int64_t in, bool bias = true) {
    add(m + ".weight", {out, in});
    if (bias) add(m + ".bias", {out});
  }

 private:
  std::vector<ManifestRow>& out_;
  std::string component_, prefix_;
};

// ---- UNet (openaimodel.py names) ----

void unet_resblock(Rows& r, const std::string& m, int64_t in, int64_t out, int64_t temb) {
  r.norm(m + ".in_layers.0", in);
  r.conv(m + ".in_layers.2", out, in, 3);
  r.linear(m + ".emb_layers.1", out, temb);
  r.norm(m + ".out_layers.0", out);
  r.conv(m + ".out_layers.3", out, out, 3, /*zero=*/true);
  if (in != out) r.conv(m + ".skip_connection", out, in, 1);
}

void unet_transformer(Rows& r, const std::string& m, int64_t c, int64_t ctx, int depth) {
  r.norm(m + ".norm", c);
  r.conv(m + ".proj_in", c, c, 1);
  for (int d = 0; d < depth; ++d) {
    const std::string b = m + ".transformer_blocks." + std::to_string(d);
    for (const char* attn : {".attn1", ".attn2"}) {
      const int64_t kv = std::string(attn) == ".attn1" ? c : ctx;
      r.linear(b + attn + ".to_q", c, c, false);
      r.linear(b + attn + ".to_k", c, kv, false);
      r.linear(b + attn + ".to_v", c, kv, false);
      r.linear(b + attn + ".to_out.0", c, c);
    }
    r.linear(b + ".ff.net.0.proj", 8 * c, c);  // GEGLU: value and gate halves
    r.linear(b + ".ff.net.2", c, 4 * c);
    r.norm(b + ".norm1", c);
    r.norm(b + ".norm2", c);
    r.norm(b + ".norm3", c);
  }
  r.conv(m + ".proj_out", c, c, 1, /*zero=*/true);
}

void unet_rows(std::vector<ManifestRow>& out, const SdArch& a) {
  Rows r(out, "unet", "model.diffusion_model.");
  const auto& ch = a.unet_channels;
  const int n = int(ch.size());
  const int64_t c0 = ch[0], temb = 4 * c0, ctx = a.text_width;
  r.linear("time_embed.0", temb, c0);
  r.linear("time_embed.2", temb, temb);
  r.conv("input_blocks.0.0", c0, 4, 3);
  std::vector<int64_t> skips = {c0};
  int k = 1;
  int64_t prev = c0;
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < a.unet_layers; ++j, ++k) {
      const std::string m = "input_blocks." + std::to_string(k);
      unet_resblock(r, m + ".0", prev, ch[i], temb);
      if (a.unet_attention[i]) unet_transformer(r, m + ".1", ch[i], ctx, a.unet_depth);
      prev = ch[i];
      skips.push_back(prev);
    }
    if (i < n - 1) {
      r.conv("input_blocks." + std::to_string(k) + ".0.op", prev, prev, 3);
      skips.push_back(prev);
      ++k;
    }
  }
  unet_resblock(r, "middle_block.0", prev, prev, temb);
  unet_transformer(r, "middle_block.1", prev, ctx, a.unet_depth);
  unet_resblock(r, "middle_block.2", prev, prev, temb);
  k = 0;
  for (int i = n - 1; i >= 0; --i) {
    for (int j = 0; j <= a.unet_layers; ++j, ++k) {
      const std::string m = "output_blocks." + std::to_string(k);
      const int64_t skip = skips.back();
      skips.pop_back();
      unet_resblock(r, m + ".0", prev + skip, ch[i], temb);
      prev = ch[i];
      int sub = 1;
      if (a.unet_attention[i]) unet_transformer(r, m + ".1", ch[i], ctx, a.unet_depth), ++sub;
      if (i > 0 && j == a.unet_layers) r.conv(m + "." + std::to_string(sub) + ".conv", prev, prev, 3);
    }
  }
  r.norm("out.0", c0);
  r.conv("out.2", 4, c0, 3, /*zero=*/true);
}

// ---- VAE (ldm autoencoder names) ----

void vae_resblock(Rows& r, const std::string& m, int64_t in, int64_t out) {
  r.norm(m + ".norm1", in);
  r.conv(m + ".conv1", out, in, 3);
  r.norm(m + ".norm2", out);
  r.conv(m + ".conv2", out, out, 3);
  if (in != out) r.conv(m + ".nin_shortcut", out, in, 1);
}

void vae_mid(Rows& r, const std::string& m, int64_t c) {
  vae_resblock(r, m + ".block_1", c, c);
  r.norm(m + ".attn_1.norm", c);
  for (const char* p : {".attn_1.q", ".attn_1.k", ".attn_1.v", ".attn_1.proj_out"}) r.conv(m + p, c, c, 1);
  vae_resblock(r, m + ".block_2", c, c);
}

void vae_rows(std::vector<ManifestRow>& out, const SdArch& a) {
  Rows r(out, "vae", "first_stage_model.");
  const auto& ch = a.vae_channels;
  const int n = int(ch.size());
  const int64_t L = a.latent_channels, cl = ch[n - 1];
  r.conv("encoder.conv_in", ch[0], 3, 3);
  int64_t prev = ch[0];
  for (int i = 0; i < n; ++i) {
    const std::string lv = "encoder.down." + std::to_string(i);
    for (int j = 0; j < a.vae_layers; ++j) {
      vae_resblock(r, lv + ".block." + std::to_string(j), prev, ch[i]);
      prev = ch[i];
    }
    if (i < n - 1) r.conv(lv + ".downsample.conv", prev, prev, 3);
  }
  vae_mid(r, "encoder.mid", cl);
  r.norm("encoder.norm_out", cl);
  r.conv("encoder.conv_out", 2 * L, cl, 3);
  r.conv("quant_conv", 2 * L, 2 * L, 1);
  r.conv("post_quant_conv", L, L, 1);
  r.conv("decoder.conv_in", cl, L, 3);
  vae_mid(r, "decoder.mid", cl);
  prev = cl;
  for (int i = n - 1; i >= 0; --i) {
    const std::string lv = "decoder.up." + std::to_string(i);
    for (int j = 0; j <= a.vae_layers; ++j) {
      vae_resblock(r, lv + ".block." + std::to_string(j), prev, ch[i]);
      prev = ch[i];
    }
    if (i > 0) r.conv(lv + ".upsample.conv", prev, prev, 3);
  }
  r.norm("decoder.norm_out", ch[0]);
  r.conv("decoder.conv_out", 3, ch[0], 3);
}

// ---- text encoder (transformers CLIPTextModel names) ----

void text_rows(std::vector<ManifestRow>& out, const SdArch& a) {
  Rows r(out, "text_encoder", "cond_stage_model.transformer.text_model.");
  const int64_t w = a.text_width, f = a.text_intermediate;
  r.add("embeddings.token_embedding.weight", {a.vocab, w});
  r.add("embeddings.position_embedding.weight", {a.positions, w});
  for (int l = 0; l < a.text_layers; ++l) {
    const std::string m = "encoder.layers." + std::to_string(l);
    for (const char* p : {".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj"})
      r.linear(m + p, w, w);
    r.norm(m + ".layer_norm1", w);
    r.linear(m + ".mlp.fc1", f, w);
    r.linear(m + ".mlp.fc2", w, f);
    r.norm(m + ".layer_norm2", w);
  }
  r.norm("final_layer_norm", w);
}

void check_widths(const std::vector<int>& v, const char* field, int multiple) {
  DF_CHECK(!v.empty() && v.size() <= 6, "architecture: ", field, " must list 1 to 6 levels");
  for (int c : v)
    DF_CHECK(c > 0 && c <= 4096 && c % multiple == 0, "architecture: ", field, " width ", c,
             " must be a positive multiple of ", multiple, " up to 4096");
}

}  // namespace

void SdArch::validate() const {
  check_widths(unet_channels, "unet_channels", kGroups);
  check_widths(vae_channels, "vae_channels", kGroups);
  DF_CHECK(unet_attention.size() == unet_channels.size(), "architecture: unet_attention has ", unet_attention.size(),
           " entries for ", unet_channels.size(), " UNet levels");
  DF_CHECK(unet_layers >= 1 && unet_layers <= 4, "architecture: unet_layers ", unet_layers, " is not in 1..4");
  DF_CHECK(unet_depth >= 1 && unet_depth <= 4, "architecture: unet_depth ", unet_depth, " is not in 1..4");
  DF_CHECK(vae_layers >= 1 && vae_layers <= 4, "architecture: vae_layers ", vae_layers, " is not in 1..4");
  DF_CHECK(latent_channels >= 1 && latent_channels <= 16, "architecture: latent_channels ", latent_channels,
           " is not in 1..16");
  DF_CHECK(text_width >= 64 && text_width <= 2048 && text_width % 64 == 0, "architecture: text_width ", text_width,
           " must be a multiple of 64 (CLIP's head width) up to 2048");
  DF_CHECK(text_layers >= 1 && text_layers <= 48, "architecture: text_layers ", text_layers, " is not in 1..48");
  DF_CHECK(text_intermediate >= 1 && text_intermediate <= 16384, "architecture: text_intermediate ",
           text_intermediate, " is not in 1..16384");
  DF_CHECK(vocab == 49408, "architecture: vocab ", vocab, ": the CLIP tokenizer's vocabulary has 49408 tokens");
  DF_CHECK(positions >= 77 && positions <= 1024, "architecture: positions ", positions,
           " must be at least 77 (SD's prompt length)");
  // The latent must halve evenly at every UNet level but the last.
  const int f = (1 << (int(vae_channels.size()) - 1)) * (1 << (int(unet_channels.size()) - 1));
  DF_CHECK(resolution >= f && resolution <= 4096 && resolution % f == 0, "architecture: resolution ", resolution,
           " must be a multiple of ", f, " (the VAE's factor times the UNet's) up to 4096");
}

namespace {

// Every field of SdArch with its JSON name: visit(name, field) for each.
template <class A, class F>
void for_each_field(A& a, const F& visit) {
  visit("unet_channels", a.unet_channels);
  visit("unet_attention", a.unet_attention);
  visit("unet_layers", a.unet_layers);
  visit("unet_depth", a.unet_depth);
  visit("vae_channels", a.vae_channels);
  visit("vae_layers", a.vae_layers);
  visit("latent_channels", a.latent_channels);
  visit("text_width", a.text_width);
  visit("text_layers", a.text_layers);
  visit("text_intermediate", a.text_intermediate);
  visit("vocab", a.vocab);
  visit("positions", a.positions);
  visit("resolution", a.resolution);
}

}  // namespace

SdArch SdArch::from_json(const std::string& text, const std::string& origin) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail(origin, ": not valid JSON: ", e.what());
  }
  DF_CHECK(j.is_object(), origin, ": the architecture must be a JSON object");
  SdArch a;
  size_t known = 0;
  for_each_field(a, [&](const char* key, auto& field) {
    if (!j.contains(key)) return;
    ++known;
    try {
      j.at(key).get_to(field);
    } catch (const std::exception&) {
      fail(origin, ": field \"", key, "\" has the wrong type (", j.at(key).dump(), ")");
    }
  });
  if (known != j.size())
    for (auto it = j.begin(); it != j.end(); ++it) {
      bool ok = false;
      for_each_field(a, [&](const char* key, auto&) { ok = ok || it.key() == key; });
      DF_CHECK(ok, origin, ": unknown field \"", it.key(), "\"");
    }
  try {
    a.validate();
  } catch (const Error& e) {
    fail(origin, ": ", e.what());
  }
  return a;
}

std::string SdArch::to_json() const {
  nlohmann::ordered_json j;
  for_each_field(*this, [&](const char* key, const auto& field) { j[key] = field; });
  return j.dump();
}

std::vector<ManifestRow> sd1_ldm_rows(const SdArch& a) {
  a.validate();
  std::vector<ManifestRow> rows;
  unet_rows(rows, a);
  vae_rows(rows, a);
  text_rows(rows, a);
  return rows;
}

GrowStats write_grown_checkpoint(const SdArch& a, const std::string& from, const std::string& out_path, DType dtype,
                                 uint64_t seed, const std::map<std::string, std::string>& metadata) {
  const TensorFile src = open_model_file(from);
  DF_CHECK(src.format != "diffusers", from, ": --from needs a single-file (ldm layout) checkpoint, not a diffusers folder");
  const std::vector<ManifestRow> rows = sd1_ldm_rows(a);
  GrowStats st;
  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(rows.size());
  size_t found = 0;
  for (const ManifestRow& r : rows) {
    const Tensor* t = src.find(r.name);
    found += t != nullptr;
    if (t && t->shape() == r.shape) {
      out.emplace_back(r.name, t->to(dtype));
      ++st.copied;
      continue;
    }
    if (t) st.reshaped.push_back(r.name + " " + t->shape().str() + " -> " + r.shape.str());
    Tensor f = Tensor::empty(r.shape, DType::F32);
    if (r.zero_init) std::fill(f.f32(), f.f32() + f.numel(), 0.0f);
    else synthetic_fill(r.name, r.shape, seed, 0, f.numel(), f.f32());
    out.emplace_back(r.name, dtype == DType::F32 ? f : f.to(dtype));
    ++st.initialised;
  }
  DF_CHECK(st.copied > 0, from, ": shares no tensor (name and shape) with the architecture: not an ldm-layout SD 1.x "
           "checkpoint of related widths");
  st.unused = int64_t(src.size() - found);
  save_safetensors(out_path, out, metadata);
  return st;
}

}  // namespace diffuse
