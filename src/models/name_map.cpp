// Checkpoint layouts -> diffusers names. The ldm ("original") single-file layout is converted
// component by component, by rules written from the structure of both layouts (the same rules
// diffusers' single-file loader applies): a renaming per tensor, plus three value-level changes, all
// views except one: OpenCLIP's fused in_proj split into q/k/v row thirds (views), the VAE mid-block
// attention's 1x1-conv weights [C, C, 1, 1] reshaped to linear [C, C] (views), and SDXL's second
// text encoder projection [W, P] transposed to a linear weight [P, W] (a copy).
#include "models/name_map.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>
#include <vector>

#include "core/error.h"

namespace diffuse {

namespace {

using Parts = std::vector<std::string>;

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

Parts split(const std::string& s) {
  Parts out;
  size_t b = 0;
  for (;;) {
    size_t e = s.find('.', b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) return out;
    b = e + 1;
  }
}

// parts[from..] joined with '.'; empty if from >= size.
std::string join(const Parts& p, size_t from) {
  std::string out;
  for (size_t i = from; i < p.size(); ++i) {
    if (!out.empty()) out += '.';
    out += p[i];
  }
  return out;
}

// A decimal index without sign or leading zeros; -1 if `s` is not one.
int64_t index_of(const std::string& s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return -1;
  int64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v;
}

bool one_of(const std::string& s, std::initializer_list<const char*> set) {
  for (const char* x : set)
    if (s == x) return true;
  return false;
}

// What the mapping of one ldm tensor decided.
struct Mapped {
  enum Kind { Unknown, Ignore, Add } kind = Unknown;
  std::vector<std::pair<std::string, Tensor>> out;  // Add: one or more diffusers tensors (row blocks)
  bool transposed = false;                          // out[0] is the 2-D tensor transposed
};
Mapped unknown() { return {}; }
Mapped ignore() { return {Mapped::Ignore, {}}; }
Mapped add(std::string name, Tensor t) {
  Mapped m{Mapped::Add, {}};
  m.out.emplace_back(std::move(name), std::move(t));
  return m;
}
// A renamed tensor, or Unknown if the rule produced no name.
Mapped rename(const std::optional<std::string>& name, const Tensor& t) { return name ? add(*name, t) : unknown(); }

// Maps "<rest of name>" (after the component prefix) of one tensor.
using Rule = std::function<Mapped(const std::string& rest, const Tensor& t)>;

// ---------------------------------------------------------------------------------------------
// UNet (model.diffusion_model.)

// ldm ResBlock inner names -> diffusers ResnetBlock2D; `tail` must be weight/bias-like (non-empty).
std::optional<std::string> unet_resnet(const Parts& p, size_t at) {
  if (p.size() <= at) return std::nullopt;
  const std::string& a = p[at];
  std::string b = p.size() > at + 1 ? p[at + 1] : "";
  std::string tail2 = join(p, at + 2), tail1 = join(p, at + 1);
  if (a == "in_layers" && b == "0" && !tail2.empty()) return "norm1." + tail2;
  if (a == "in_layers" && b == "2" && !tail2.empty()) return "conv1." + tail2;
  if (a == "emb_layers" && b == "1" && !tail2.empty()) return "time_emb_proj." + tail2;
  if (a == "out_layers" && b == "0" && !tail2.empty()) return "norm2." + tail2;
  if (a == "out_layers" && b == "3" && !tail2.empty()) return "conv2." + tail2;
  if (a == "skip_connection" && !tail1.empty()) return "conv_shortcut." + tail1;
  return std::nullopt;
}

// Transformer2DModel names are the same in both layouts.
std::optional<std::string> unet_transformer(const Parts& p, size_t at) {
  if (p.size() <= at + 1 || !one_of(p[at], {"norm", "proj_in", "proj_out", "transformer_blocks"}))
    return std::nullopt;
  return join(p, at);
}

std::optional<std::string> prefixed(const std::string& pre, const std::optional<std::string>& s) {
  if (!s) return std::nullopt;
  return pre + *s;
}

// diffusers ResnetBlock2D inner names -> ldm ResBlock (unet_resnet's inverse).
std::optional<std::string> ldm_resnet(const Parts& p, size_t at) {
  if (p.size() <= at + 1) return std::nullopt;
  const std::string& a = p[at];
  const std::string tail = join(p, at + 1);
  if (a == "norm1") return "in_layers.0." + tail;
  if (a == "conv1") return "in_layers.2." + tail;
  if (a == "time_emb_proj") return "emb_layers.1." + tail;
  if (a == "norm2") return "out_layers.0." + tail;
  if (a == "conv2") return "out_layers.3." + tail;
  if (a == "conv_shortcut") return "skip_connection." + tail;
  return std::nullopt;
}

// Levels and resnets per level from the input blocks: block 0 is conv_in, then per level `lpb`
// resnet(+attention) blocks and, on every level but the last, one downsampler block (".0.op").
struct UNetLayout {
  int64_t lpb = 0;
};

UNetLayout unet_layout(const TensorFile& f, const std::string& prefix) {
  int64_t in_blocks = 0, out_blocks = 0;
  std::vector<int64_t> down;
  for (const TensorEntry& e : f.tensors) {
    if (!starts_with(e.name, prefix)) continue;
    Parts p = split(e.name.substr(prefix.size()));
    if (p.size() < 3) continue;
    int64_t n = index_of(p[1]);
    if (n < 0) continue;
    if (p[0] == "input_blocks") {
      in_blocks = std::max(in_blocks, n + 1);
      if (p[2] == "0" && p.size() > 3 && p[3] == "op" &&
          std::find(down.begin(), down.end(), n) == down.end())
        down.push_back(n);
    } else if (p[0] == "output_blocks") {
      out_blocks = std::max(out_blocks, n + 1);
    }
  }
  if (in_blocks == 0) return {};
  int64_t levels = int64_t(down.size()) + 1;
  int64_t lpb = (in_blocks - 1 - int64_t(down.size())) / levels;
  bool ok = lpb >= 1 && 1 + levels * lpb + int64_t(down.size()) == in_blocks &&
            (out_blocks == 0 || out_blocks == levels * (lpb + 1));
  for (int64_t d : down) ok = ok && (d - 1) % (lpb + 1) == lpb;  // where a downsampler must be
  DF_CHECK(ok, f.path, ": UNet block layout not understood: ", in_blocks, " input blocks with ", down.size(),
           " downsamplers and ", out_blocks, " output blocks do not form levels of equal depth");
  return {lpb};
}

Rule unet_rule(const UNetLayout& L) {
  return [L](const std::string& rest, const Tensor& t) -> Mapped {
    Parts p = split(rest);
    if (p.size() < 3) return unknown();
    const std::string& a = p[0];
    std::string tail2 = join(p, 2);
    if (a == "time_embed" && (p[1] == "0" || p[1] == "2"))
      return add(std::string("time_embedding.linear_") + (p[1] == "0" ? "1." : "2.") + tail2, t);
    if (a == "out" && (p[1] == "0" || p[1] == "2")) return add((p[1] == "0" ? "conv_norm_out." : "conv_out.") + tail2, t);
    if (a == "label_emb" && p[1] == "0" && p.size() > 3 && (p[2] == "0" || p[2] == "2"))
      return add(std::string("add_embedding.linear_") + (p[2] == "0" ? "1." : "2.") + join(p, 3), t);
    if (a == "middle_block") {
      if (p[1] == "0") return rename(prefixed("mid_block.resnets.0.", unet_resnet(p, 2)), t);
      if (p[1] == "1") return rename(prefixed("mid_block.attentions.0.", unet_transformer(p, 2)), t);
      if (p[1] == "2") return rename(prefixed("mid_block.resnets.1.", unet_resnet(p, 2)), t);
      return unknown();
    }
    if (p.size() < 4 || L.lpb == 0) return unknown();
    int64_t n = index_of(p[1]);
    if (n < 0) return unknown();
    const std::string& k = p[2];
    if (a == "input_blocks") {
      if (n == 0) return k == "0" ? add("conv_in." + join(p, 3), t) : unknown();
      int64_t level = (n - 1) / (L.lpb + 1), j = (n - 1) % (L.lpb + 1);
      std::string blk = cat("down_blocks.", level, ".");
      if (j == L.lpb)
        return k == "0" && p[3] == "op" && p.size() > 4 ? add(blk + "downsamplers.0.conv." + join(p, 4), t)
                                                         : unknown();
      if (k == "0") return rename(prefixed(cat(blk, "resnets.", j, "."), unet_resnet(p, 3)), t);
      if (k == "1") return rename(prefixed(cat(blk, "attentions.", j, "."), unet_transformer(p, 3)), t);
      return unknown();
    }
    if (a == "output_blocks") {
      int64_t level = n / (L.lpb + 1), j = n % (L.lpb + 1);
      std::string blk = cat("up_blocks.", level, ".");
      if (k == "0") return rename(prefixed(cat(blk, "resnets.", j, "."), unet_resnet(p, 3)), t);
      // The upsampler follows the resnet (index 1) or the attention (index 2).
      if ((k == "1" || k == "2") && p[3] == "conv" && p.size() > 4)
        return add(blk + "upsamplers.0.conv." + join(p, 4), t);
      if (k == "1") return rename(prefixed(cat(blk, "attentions.", j, "."), unet_transformer(p, 3)), t);
      return unknown();
    }
    return unknown();
  };
}

// ---------------------------------------------------------------------------------------------
// VAE (first_stage_model.)

std::optional<std::string> vae_resnet(const Parts& p, size_t at) {
  if (p.size() <= at + 1) return std::nullopt;
  if (one_of(p[at], {"norm1", "conv1", "norm2", "conv2"})) return join(p, at);
  if (p[at] == "nin_shortcut") return "conv_shortcut." + join(p, at + 1);
  return std::nullopt;
}

int64_t vae_up_levels(const TensorFile& f, const std::string& prefix) {
  int64_t n = 0;
  const std::string up = prefix + "decoder.up.";
  for (const TensorEntry& e : f.tensors)
    if (starts_with(e.name, up)) n = std::max(n, index_of(split(e.name.substr(up.size()))[0]) + 1);
  return n;
}

Rule vae_rule(int64_t up_levels) {
  return [up_levels](const std::string& rest, const Tensor& t) -> Mapped {
    Parts p = split(rest);
    if (p.size() < 2) return unknown();
    if (p[0] == "quant_conv" || p[0] == "post_quant_conv") return add(rest, t);
    if (p[0] == "loss") return ignore();  // training-time discriminator / perceptual loss
    if (p[0] != "encoder" && p[0] != "decoder") return unknown();
    bool enc = p[0] == "encoder";
    std::string side = p[0] + ".";
    if (p.size() < 3) return unknown();
    if (p[1] == "conv_in" || p[1] == "conv_out") return add(rest, t);
    if (p[1] == "norm_out") return add(side + "conv_norm_out." + join(p, 2), t);
    if (p[1] == "mid") {
      if (p[2] == "block_1") return rename(prefixed(side + "mid_block.resnets.0.", vae_resnet(p, 3)), t);
      if (p[2] == "block_2") return rename(prefixed(side + "mid_block.resnets.1.", vae_resnet(p, 3)), t);
      if (p[2] != "attn_1" || p.size() < 5) return unknown();
      std::string pre = side + "mid_block.attentions.0.", tail = join(p, 4);
      if (p[3] == "norm") return add(pre + "group_norm." + tail, t);
      const char* to = p[3] == "q" ? "to_q." : p[3] == "k" ? "to_k." : p[3] == "v" ? "to_v."
                     : p[3] == "proj_out" ? "to_out.0." : nullptr;
      if (!to) return unknown();
      // 1x1 conv weight [C, C, 1, 1] -> linear [C, C] (a view).
      if (t.rank() == 4 && t.dim(2) == 1 && t.dim(3) == 1) return add(pre + to + tail, t.reshape({t.dim(0), t.dim(1)}));
      return add(pre + to + tail, t);
    }
    if ((enc && p[1] != "down") || (!enc && p[1] != "up") || p.size() < 5) return unknown();
    int64_t k = index_of(p[2]);
    if (k < 0) return unknown();
    if (!enc) k = up_levels - 1 - k;  // ldm counts decoder levels from the bottom
    std::string blk = cat(side, enc ? "down_blocks." : "up_blocks.", k, ".");
    if (p[3] == "block") {
      int64_t j = index_of(p[4]);
      if (j < 0) return unknown();
      return rename(prefixed(cat(blk, "resnets.", j, "."), vae_resnet(p, 5)), t);
    }
    if (p[3] == (enc ? "downsample" : "upsample") && p[4] == "conv" && p.size() > 5)
      return add(blk + (enc ? "downsamplers.0.conv." : "upsamplers.0.conv.") + join(p, 5), t);
    return unknown();
  };
}

// ---------------------------------------------------------------------------------------------
// Text encoders

// Hugging Face CLIPTextModel names kept by the ldm file (SD 1.x, SDXL encoder 1).
Rule clip_rule() {
  return [](const std::string& rest, const Tensor& t) -> Mapped {
    std::string name = rest;
    // Checkpoints saved with old transformers lack the "text_model." level.
    if (!starts_with(name, "text_model.")) name = "text_model." + name;
    Parts p = split(name);
    if (p.size() < 3 || !one_of(p[1], {"embeddings", "encoder", "final_layer_norm"})) return unknown();
    if (p[1] == "embeddings" && p[2] == "position_ids") return ignore();  // a buffer, not a weight
    return add(name, t);
  };
}

// rows x cols -> cols x rows, any element type (a copy).
Tensor transpose2d(const Tensor& t) {
  int64_t r = t.dim(0), c = t.dim(1);
  size_t es = dtype_size(t.dtype());
  Tensor out = Tensor::empty({c, r}, t.dtype());
  const uint8_t* src = static_cast<const uint8_t*>(t.data());
  uint8_t* dst = static_cast<uint8_t*>(out.data());
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) std::memcpy(dst + size_t(j * r + i) * es, src + size_t(i * c + j) * es, es);
  return out;
}

int64_t openclip_blocks(const TensorFile& f, const std::string& prefix) {
  int64_t n = 0;
  const std::string rb = prefix + "transformer.resblocks.";
  for (const TensorEntry& e : f.tensors)
    if (starts_with(e.name, rb)) n = std::max(n, index_of(split(e.name.substr(rb.size()))[0]) + 1);
  return n;
}

// OpenCLIP text tower (SD 2.x: `sd2` = true, SDXL encoder 2: false) -> CLIPTextModel(WithProjection).
Rule openclip_rule(const std::string& path, int64_t blocks, bool sd2) {
  return [path, blocks, sd2](const std::string& rest, const Tensor& t) -> Mapped {
    if (rest == "token_embedding.weight") return add("text_model.embeddings.token_embedding.weight", t);
    if (rest == "positional_embedding") return add("text_model.embeddings.position_embedding.weight", t);
    if (rest == "logit_scale" || rest == "attn_mask") return ignore();
    if (rest == "text_projection") {
      if (sd2) return ignore();  // SD 2.x conditions on hidden states; the projection is unused
      DF_CHECK(t.rank() == 2, path, ": text_projection has shape ", t.shape().str(), ", expected [width, proj]");
      Mapped m = add("text_projection.weight", transpose2d(t));
      m.transposed = true;
      return m;
    }
    Parts p = split(rest);
    if (p[0] == "ln_final" && p.size() == 2) return add("text_model.final_layer_norm." + p[1], t);
    if (p.size() < 5 || p[0] != "transformer" || p[1] != "resblocks") return unknown();
    int64_t n = index_of(p[2]);
    if (n < 0) return unknown();
    // SD 2.x runs the penultimate block's output through ln_final: the last block is unused, and
    // diffusers' text encoder leaves it out.
    if (sd2 && n == blocks - 1) return ignore();
    std::string pre = cat("text_model.encoder.layers.", n, "."), tail = join(p, 4);
    if (p[3] == "ln_1") return add(pre + "layer_norm1." + tail, t);
    if (p[3] == "ln_2") return add(pre + "layer_norm2." + tail, t);
    if (p[3] == "mlp" && p.size() == 6 && (p[4] == "c_fc" || p[4] == "c_proj"))
      return add(pre + (p[4] == "c_fc" ? "mlp.fc1." : "mlp.fc2.") + p[5], t);
    if (p[3] != "attn") return unknown();
    if (p.size() == 6 && p[4] == "out_proj") return add(pre + "self_attn.out_proj." + p[5], t);
    if (p.size() == 5 && (p[4] == "in_proj_weight" || p[4] == "in_proj_bias")) {
      // Fused [3W, ...] -> q, k, v row thirds (views).
      DF_CHECK(t.rank() >= 1 && t.dim(0) % 3 == 0, path, ": ", rest, " has shape ", t.shape().str(),
               ", expected a first dimension of 3 x width");
      int64_t w = t.dim(0) / 3;
      std::string kind = p[4] == "in_proj_weight" ? "weight" : "bias";
      Mapped m{Mapped::Add, {}};
      m.out.emplace_back(pre + "self_attn.q_proj." + kind, t.slice0(0, w));
      m.out.emplace_back(pre + "self_attn.k_proj." + kind, t.slice0(w, 2 * w));
      m.out.emplace_back(pre + "self_attn.v_proj." + kind, t.slice0(2 * w, 3 * w));
      return m;
    }
    return unknown();
  };
}

// ---------------------------------------------------------------------------------------------

struct Source {
  std::string prefix;
  enum Kind { UNet, VAE, CLIP, OpenCLIP_SD2, OpenCLIP_XL } kind;
};

std::vector<Source> ldm_sources(Component c, Family family) {
  const Source clip_sd{"cond_stage_model.transformer.", Source::CLIP};
  const Source openclip_sd{"cond_stage_model.model.", Source::OpenCLIP_SD2};
  const Source clip_xl{"conditioner.embedders.0.transformer.", Source::CLIP};
  switch (c) {
    case Component::UNet: return {{"model.diffusion_model.", Source::UNet}};
    case Component::VAE: return {{"first_stage_model.", Source::VAE}};
    case Component::TextEncoder:
      switch (family) {
        case Family::SD1: return {clip_sd, openclip_sd};
        case Family::SD2: return {openclip_sd, clip_sd};
        case Family::SDXL: return {clip_xl};
        case Family::Unknown: return {clip_sd, openclip_sd, clip_xl};
      }
      break;
    // SDXL base: embedders.1; the refiner's only encoder: embedders.0.
    case Component::TextEncoder2:
      return {{"conditioner.embedders.1.model.", Source::OpenCLIP_XL}, {"conditioner.embedders.0.model.", Source::OpenCLIP_XL}};
    default: break;
  }
  return {};
}

bool has_prefix(const TensorFile& f, const std::string& prefix) {
  for (const TensorEntry& e : f.tensors)
    if (starts_with(e.name, prefix)) return true;
  return false;
}

std::string no_component(const TensorFile& f, Component c, const std::string& expected) {
  return cat(f.path, ": no ", component_name(c), " tensors found (expected names starting with ", expected, ")");
}

// A diffusers folder holding a single component: bare names, the class in config.json.
bool bare_folder_is(const TensorFile& f, Component c) {
  if (f.metadata.count("model_index.json")) return false;
  auto it = f.metadata.find("config.json");
  if (it == f.metadata.end()) return false;
  auto says = [&](const char* cls) { return it->second.find(cat("\"", cls)) != std::string::npos; };
  switch (c) {
    case Component::UNet: return says("UNet2DConditionModel\"");
    case Component::VAE: return says("AutoencoderKL\"");
    case Component::TextEncoder:
    case Component::TextEncoder2: return says("CLIPTextModel");
    default: return false;
  }
}

WeightStore from_diffusers(const TensorFile& f, Component c) {
  WeightStore out(f.path, component_name(c));
  const std::string prefix = std::string(component_name(c)) + "/";
  for (const TensorEntry& e : f.tensors)
    if (starts_with(e.name, prefix)) out.add(e.name.substr(prefix.size()), e.tensor);
  if (out.size() == 0 && bare_folder_is(f, c))
    for (const TensorEntry& e : f.tensors) out.add(e.name, e.tensor);
  DF_CHECK(out.size() > 0, no_component(f, c, prefix));
  return out;
}

}  // namespace

namespace {

// The ldm rule of component `c` and the prefix it reads; throws naming the file when the file
// has none of the component's prefixes.
Rule ldm_rule(const TensorFile& f, Component c, Family family, std::string& prefix) {
  std::vector<Source> sources = ldm_sources(c, family);
  const Source* src = nullptr;
  for (const Source& s : sources)
    if (has_prefix(f, s.prefix)) {
      src = &s;
      break;
    }
  if (!src) {
    std::string expected;
    for (const Source& s : sources) expected += (expected.empty() ? "" : " or ") + s.prefix;
    fail(no_component(f, c, expected));
  }
  prefix = src->prefix;
  switch (src->kind) {
    case Source::UNet: return unet_rule(unet_layout(f, src->prefix));
    case Source::VAE: return vae_rule(vae_up_levels(f, src->prefix));
    case Source::CLIP: return clip_rule();
    case Source::OpenCLIP_SD2: return openclip_rule(f.path, openclip_blocks(f, src->prefix), true);
    case Source::OpenCLIP_XL: return openclip_rule(f.path, openclip_blocks(f, src->prefix), false);
  }
  fail(f.path, ": no ldm mapping for ", component_name(c));
}

// Runs `rule` on every tensor under `prefix`; `each(entry, mapped)` sees the tensors it adds.
// Throws naming the file and up to five tensors the rule does not understand.
void map_ldm(const TensorFile& f, const std::string& prefix, const Rule& rule, const std::string& what,
             const std::function<void(const TensorEntry&, Mapped&)>& each) {
  std::vector<std::string> not_understood;
  for (const TensorEntry& e : f.tensors) {
    if (!starts_with(e.name, prefix)) continue;
    Mapped m = rule(e.name.substr(prefix.size()), e.tensor);
    if (m.kind == Mapped::Unknown) not_understood.push_back(e.name);
    else if (m.kind == Mapped::Add) each(e, m);
  }
  if (!not_understood.empty()) {
    std::string list;
    for (size_t i = 0; i < not_understood.size() && i < 5; ++i) list += (i ? ", " : "") + not_understood[i];
    if (not_understood.size() > 5) list += ", ...";
    fail(f.path, ": ", not_understood.size(), " ", what, " tensor(s) not understood (no diffusers name ",
         "known for them): ", list);
  }
}

}  // namespace

WeightStore component_weights(const TensorFile& f, Component c, Family family) {
  DF_CHECK(c == Component::UNet || c == Component::VAE || c == Component::TextEncoder ||
               c == Component::TextEncoder2,
           f.path, ": component ", component_name(c), " has no diffusers model to load");
  if (f.format == "diffusers") return from_diffusers(f, c);

  std::string prefix;
  const Rule rule = ldm_rule(f, c, family, prefix);
  WeightStore out(f.path, component_name(c));
  map_ldm(f, prefix, rule, component_name(c), [&](const TensorEntry&, Mapped& m) {
    for (auto& [name, t] : m.out) out.add(name, std::move(t));
  });
  DF_CHECK(out.size() > 0, no_component(f, c, prefix));
  return out;
}

WeightStore unet_file_weights(const TensorFile& f) {
  if (f.format == "diffusers") return from_diffusers(f, Component::UNet);
  if (has_prefix(f, "model.diffusion_model.")) return component_weights(f, Component::UNet, Family::Unknown);
  WeightStore out(f.path, component_name(Component::UNet));
  const bool ldm = has_prefix(f, "input_blocks.") && has_prefix(f, "time_embed.");
  const bool diffusers = has_prefix(f, "down_blocks.") && has_prefix(f, "conv_in.");
  DF_CHECK(ldm != diffusers, f.path, ": ",
           ldm ? "mixes ldm (input_blocks.*) and diffusers (down_blocks.*) UNet names"
               : "no UNet tensors found (expected ldm names input_blocks.*/time_embed.* as ComfyUI's unet files have, "
                 "model.diffusion_model.*, or diffusers UNet2DConditionModel names conv_in.*/down_blocks.*)");
  if (diffusers) {
    for (const TensorEntry& e : f.tensors) out.add(e.name, e.tensor);
    return out;
  }
  // Bare ldm names: the checkpoint's rule without its prefix.
  map_ldm(f, "", unet_rule(unet_layout(f, "")), component_name(Component::UNet), [&](const TensorEntry&, Mapped& m) {
    for (auto& [name, t] : m.out) out.add(name, std::move(t));
  });
  return out;
}

WeightStore vae_file_weights(const TensorFile& f) {
  if (f.format == "diffusers") return from_diffusers(f, Component::VAE);
  WeightStore out(f.path, component_name(Component::VAE));
  auto is_ema_or_loss = [](const std::string& n) { return starts_with(n, "model_ema.") || starts_with(n, "loss."); };
  // A whole checkpoint, or a VAE saved from one: the ldm names under their component prefix.
  if (has_prefix(f, "first_stage_model.")) return component_weights(f, Component::VAE, Family::Unknown);
  bool ldm = false, diffusers = false;
  for (const TensorEntry& e : f.tensors) {
    ldm = ldm || starts_with(e.name, "encoder.down.") || starts_with(e.name, "decoder.up.") ||
          starts_with(e.name, "encoder.mid.") || starts_with(e.name, "decoder.mid.");
    diffusers = diffusers || starts_with(e.name, "encoder.down_blocks.") || starts_with(e.name, "decoder.up_blocks.") ||
                starts_with(e.name, "encoder.mid_block.") || starts_with(e.name, "decoder.mid_block.");
  }
  DF_CHECK(ldm != diffusers, f.path, ": ",
           ldm ? "mixes ldm (encoder.down.*) and diffusers (encoder.down_blocks.*) VAE names"
               : "no VAE tensors found (expected ldm names encoder.*/decoder.* as in vae-ft-mse-840000, "
                 "first_stage_model.*, or diffusers AutoencoderKL names encoder.down_blocks.*)");
  if (ldm) {
    // Bare ldm names (vae-ft-mse-840000-ema-pruned): the checkpoint's rule without its prefix; the
    // EMA copy some of these files keep is not what they are used for.
    const Rule rule = vae_rule(vae_up_levels(f, ""));
    std::vector<std::string> not_understood;
    for (const TensorEntry& e : f.tensors) {
      if (starts_with(e.name, "model_ema.")) continue;
      Mapped m = rule(e.name, e.tensor);
      if (m.kind == Mapped::Unknown) not_understood.push_back(e.name);
      else if (m.kind == Mapped::Add)
        for (auto& [name, t] : m.out) out.add(name, std::move(t));
    }
    DF_CHECK(not_understood.empty(), f.path, ": ", not_understood.size(), " VAE tensor(s) not understood, e.g. ",
             not_understood.empty() ? "" : not_understood[0]);
    return out;
  }
  // diffusers AutoencoderKL in one file. Older diffusers saved the mid-block attention as
  // query/key/value/proj_attn (some as 1x1 convs); the model binds the current to_q/.../to_out.0.
  for (const TensorEntry& e : f.tensors) {
    if (is_ema_or_loss(e.name)) continue;
    std::string n = e.name;
    const std::string attn = ".mid_block.attentions.0.";
    size_t at = n.find(attn);
    if (at != std::string::npos) {
      const std::string head = n.substr(0, at + attn.size()), rest = n.substr(at + attn.size());
      Parts p = split(rest);
      const char* to = p[0] == "query" ? "to_q" : p[0] == "key" ? "to_k" : p[0] == "value" ? "to_v"
                     : p[0] == "proj_attn" ? "to_out.0" : nullptr;
      if (to) n = head + to + "." + join(p, 1);
      const bool linear = n.find(".to_") != std::string::npos;
      const Tensor& t = e.tensor;
      if (linear && t.rank() == 4 && t.dim(2) == 1 && t.dim(3) == 1) {
        out.add(n, t.reshape({t.dim(0), t.dim(1)}));
        continue;
      }
    }
    out.add(n, e.tensor);
  }
  return out;
}

std::vector<LdmSource> ldm_tensor_sources(const TensorFile& f, Component c, Family family) {
  DF_CHECK(f.format != "diffusers", f.path, ": a diffusers folder has no ldm names (the mapping goes from the ldm ",
           "layout to diffusers names only)");
  DF_CHECK(c == Component::UNet || c == Component::VAE || c == Component::TextEncoder ||
               c == Component::TextEncoder2,
           f.path, ": component ", component_name(c), " has no diffusers model");
  std::string prefix;
  const Rule rule = ldm_rule(f, c, family, prefix);
  std::vector<LdmSource> out;
  map_ldm(f, prefix, rule, component_name(c), [&](const TensorEntry& e, Mapped& m) {
    LdmSource s{e.name, {}, m.transposed};
    for (const auto& kv : m.out) s.diffusers.push_back(kv.first);
    out.push_back(std::move(s));
  });
  return out;
}

Tensor ldm_tensor_from(const LdmSource& s, const Shape& ldm_shape, const std::vector<Tensor>& parts) {
  DF_CHECK(parts.size() == s.diffusers.size() && !parts.empty(), s.ldm_name, ": ", s.diffusers.size(),
           " diffusers tensor(s) expected, ", parts.size(), " given");
  if (s.transposed) {
    DF_CHECK(parts[0].rank() == 2 && ldm_shape.rank() == 2 && parts[0].dim(0) == ldm_shape[1] &&
                 parts[0].dim(1) == ldm_shape[0],
             s.ldm_name, ": ", s.diffusers[0], " has shape ", parts[0].shape().str(), ", expected the transpose of ",
             ldm_shape.str());
    return transpose2d(parts[0]);
  }
  int64_t rows = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    DF_CHECK(parts[i].dtype() == parts[0].dtype() && parts[i].rank() >= 1, s.ldm_name, ": ", s.diffusers[i],
             " has shape ", parts[i].shape().str(), " ", dtype_name(parts[i].dtype()), ", unlike its other parts");
    rows += parts[i].dim(0);
  }
  Tensor out = Tensor::empty(ldm_shape, parts[0].dtype());
  int64_t numel = 0;
  for (const Tensor& p : parts) numel += p.numel();
  DF_CHECK(numel == out.numel() && (parts.size() == 1 || rows == ldm_shape[0]), s.ldm_name, ": its diffusers ",
           "tensor(s) hold ", numel, " values in ", rows, " rows, the ldm shape is ", ldm_shape.str());
  size_t off = 0;
  for (const Tensor& p : parts) {  // row blocks in order (views or owned, contiguous)
    std::memcpy(static_cast<uint8_t*>(out.data()) + off, p.data(), p.bytes());
    off += p.bytes();
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// ControlNet

namespace {

// The original (cldm) ControlNet layout -> ControlNetModel names; everything else is the UNet rule.
Rule controlnet_rule(const UNetLayout& L, int64_t last_hint) {
  Rule unet = unet_rule(L);
  return [unet, last_hint](const std::string& rest, const Tensor& t) -> Mapped {
    Parts p = split(rest);
    if (p.size() >= 3 && p[0] == "input_hint_block") {
      // Convolutions at even indices (SiLUs between them): conv_in, blocks.0.., conv_out.
      const int64_t n = index_of(p[1]);
      if (n < 0 || n % 2 != 0) return unknown();
      const std::string pre = "controlnet_cond_embedding.", tail = join(p, 2);
      if (n == 0) return add(pre + "conv_in." + tail, t);
      if (n == last_hint) return add(pre + "conv_out." + tail, t);
      return add(cat(pre, "blocks.", n / 2 - 1, ".", tail), t);
    }
    if (p.size() >= 4 && p[0] == "zero_convs" && index_of(p[1]) >= 0 && p[2] == "0")
      return add(cat("controlnet_down_blocks.", p[1], ".", join(p, 3)), t);
    if (p.size() >= 3 && p[0] == "middle_block_out" && p[1] == "0") return add("controlnet_mid_block." + join(p, 2), t);
    if (one_of(p[0], {"time_embed", "input_blocks", "middle_block", "label_emb"})) return unet(rest, t);
    return unknown();
  };
}

}  // namespace

WeightStore controlnet_weights(const TensorFile& f) {
  WeightStore out(f.path, "controlnet");
  auto take_all = [&](const std::string& prefix) {
    for (const TensorEntry& e : f.tensors)
      if (starts_with(e.name, prefix)) out.add(e.name.substr(prefix.size()), e.tensor);
  };
  if (f.format == "diffusers") {
    if (has_prefix(f, "controlnet/")) {
      take_all("controlnet/");
    } else {
      auto it = f.metadata.find("config.json");
      DF_CHECK(!f.metadata.count("model_index.json") && it != f.metadata.end() &&
                   it->second.find("\"ControlNetModel\"") != std::string::npos,
               f.path, ": not a ControlNet folder (expected config.json with _class_name ControlNetModel, or a ",
               "pipeline folder with a controlnet/ component)");
      take_all("");
    }
    DF_CHECK(out.size() > 0, f.path, ": no ControlNet tensors found");
    return out;
  }
  // Single files: diffusers names as they are.
  if (has_prefix(f, "controlnet_cond_embedding.")) {
    take_all("");
    return out;
  }
  std::string prefix;
  if (has_prefix(f, "control_model.input_hint_block.")) prefix = "control_model.";
  else if (!has_prefix(f, "input_hint_block.")) {
    fail(f.path, ": no ControlNet tensors found (expected names starting with control_model.input_hint_block., ",
         "input_hint_block. or controlnet_cond_embedding.)");
  }
  int64_t last_hint = -1;
  const std::string hint = prefix + "input_hint_block.";
  for (const TensorEntry& e : f.tensors)
    if (starts_with(e.name, hint)) last_hint = std::max(last_hint, index_of(split(e.name.substr(hint.size()))[0]));
  DF_CHECK(last_hint >= 2, f.path, ": ", hint, "* has no conv_out (largest index ", last_hint, ")");
  map_ldm(f, prefix, controlnet_rule(unet_layout(f, prefix), last_hint), "ControlNet", [&](const TensorEntry&, Mapped& m) {
    for (auto& [name, t] : m.out) out.add(name, std::move(t));
  });
  return out;
}

std::string ldm_unet_name_to_diffusers(const std::string& ldm_name, int layers_per_block) {
  if (layers_per_block < 1) return {};
  Mapped m = unet_rule(UNetLayout{layers_per_block})(ldm_name, Tensor());
  return m.kind == Mapped::Add && m.out.size() == 1 ? m.out[0].first : std::string();
}

std::string diffusers_unet_name_to_ldm(const std::string& name, int layers_per_block,
                                       const std::vector<bool>& cross_attn) {
  const int64_t lpb = layers_per_block, levels = int64_t(cross_attn.size());
  const Parts p = split(name);
  if (lpb < 1 || p.size() < 2) return {};
  const std::string& a = p[0];
  const std::string tail1 = join(p, 1), tail2 = join(p, 2);
  if (a == "conv_in") return "input_blocks.0.0." + tail1;
  if (a == "conv_norm_out") return "out.0." + tail1;
  if (a == "conv_out") return "out.2." + tail1;
  const bool linear_12 = p.size() > 2 && (p[1] == "linear_1" || p[1] == "linear_2");
  if (a == "time_embedding" && linear_12) return std::string("time_embed.") + (p[1] == "linear_1" ? "0." : "2.") + tail2;
  if (a == "add_embedding" && linear_12) return std::string("label_emb.0.") + (p[1] == "linear_1" ? "0." : "2.") + tail2;
  if (p.size() < 4) return {};
  const int64_t j = index_of(p[2]);
  if (a == "mid_block") {
    if (p[1] == "resnets" && (j == 0 || j == 1))
      return prefixed(cat("middle_block.", 2 * j, "."), ldm_resnet(p, 3)).value_or("");
    if (p[1] == "attentions" && j == 0) return prefixed("middle_block.1.", unet_transformer(p, 3)).value_or("");
    return {};
  }
  const bool down = a == "down_blocks";
  if ((!down && a != "up_blocks") || p.size() < 5) return {};
  const int64_t level = index_of(p[1]), k = index_of(p[3]);
  if (level < 0 || level >= levels || k < 0) return {};
  const std::string& kind = p[2];
  // Down level l's blocks are input blocks 1 + l·(lpb + 1) + k (the downsampler: k = lpb); up
  // level l's are output blocks l·(lpb + 1) + k, its upsampler in the last one after the resnet
  // (index 1) or, on a level with attention, after the attention (index 2).
  const int64_t first = down ? 1 + level * (lpb + 1) : level * (lpb + 1);
  const std::string blocks = down ? "input_blocks." : "output_blocks.";
  const int64_t resnets = down ? lpb : lpb + 1;
  if (kind == "resnets" && k < resnets) return prefixed(cat(blocks, first + k, ".0."), ldm_resnet(p, 4)).value_or("");
  if (kind == "attentions" && k < resnets)
    return prefixed(cat(blocks, first + k, ".1."), unet_transformer(p, 4)).value_or("");
  if (k != 0 || p[4] != "conv" || p.size() < 6) return {};
  if (kind == "downsamplers" && down) return cat(blocks, first + lpb, ".0.op.", join(p, 5));
  const bool attention = cross_attn[size_t(levels - 1 - level)];  // up level l is down level L-1-l
  if (kind == "upsamplers" && !down) return cat(blocks, first + lpb, attention ? ".2.conv." : ".1.conv.", join(p, 5));
  return {};
}

}  // namespace diffuse
