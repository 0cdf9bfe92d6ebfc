#include "models/unet.h"

#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "models/unet_blocks.h"
#include "models/unet_impl.h"

namespace diffuse {

// ---------------------------------------------------------------------------------------------
// Config

int UNetConfig::heads_at(int level) const {
  DF_ASSERT(level >= 0 && level < levels());
  if (!heads_per_level.empty()) return heads_per_level[level];
  if (heads_fixed > 0) return heads_fixed;
  return head_dim > 0 ? block_out_channels[level] / head_dim : 0;
}

static std::string join(const std::vector<int>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  s += ']';
  return s;
}

std::string UNetConfig::str() const {
  std::vector<int> attn(cross_attn.begin(), cross_attn.end()), heads;
  for (int l = 0; l < levels(); ++l) heads.push_back(heads_at(l));
  std::string s = cat("UNet in ", in_channels, " out ", out_channels, " channels ", join(block_out_channels),
                      " layers ", layers_per_block, " attention ", join(attn), " depth ",
                      join(transformer_depth), " mid depth ", transformer_depth.empty() ? 0 : mid_transformer_depth(),
                      " heads ", join(heads), " proj ", linear_proj ? "linear" : "conv", " context ", context_dim);
  if (text_time)
    s += cat(" text_time (", num_time_ids, " ids × ", addition_time_embed_dim, ", add_embedding in ",
             projection_class_embeddings_input_dim, ")");
  return s;
}

void UNetConfig::validate() const {
  const std::string what = "UNet config (" + str() + ")";
  DF_CHECK(levels() >= 1, what, ": no levels");
  DF_CHECK(int(cross_attn.size()) == levels() && int(transformer_depth.size()) == levels(), what,
           ": cross_attn and transformer_depth need one entry per level");
  DF_CHECK(heads_per_level.empty() || int(heads_per_level.size()) == levels(), what,
           ": heads_per_level needs one entry per level");
  DF_CHECK(in_channels >= 1 && out_channels >= 1 && layers_per_block >= 1 && context_dim >= 1, what,
           ": channels, layers and context width must be positive");
  DF_CHECK(norm_groups >= 1, what, ": norm_groups must be positive");
  for (int l = 0; l < levels(); ++l) {
    const int ch = block_out_channels[l];
    DF_CHECK(ch >= 1 && ch % norm_groups == 0, what, ": level ", l, " width ", ch,
             " is not a multiple of ", norm_groups, " norm groups");
    const bool needs_heads = cross_attn[l] || l == levels() - 1;  // the mid block always attends
    if (!needs_heads) continue;
    const int h = heads_at(l);
    DF_CHECK(h >= 1 && ch % h == 0, what, ": level ", l, " width ", ch, " does not split into ", h,
             " attention heads");
    DF_CHECK(!cross_attn[l] || transformer_depth[l] >= 1, what, ": level ", l, " transformer depth must be >= 1");
  }
  DF_CHECK(mid_transformer_depth() >= 1, what, ": mid-block transformer depth must be >= 1");
  if (text_time) {
    DF_CHECK(addition_time_embed_dim >= 1 && num_time_ids >= 1, what, ": bad added time embedding");
    DF_CHECK(projection_class_embeddings_input_dim > num_time_ids * addition_time_embed_dim, what,
             ": add_embedding input ", projection_class_embeddings_input_dim, " leaves no room for the pooled text embedding");
  }
}

UNetConfig UNetConfig::sd15() {
  UNetConfig c;
  c.block_out_channels = {320, 640, 1280, 1280};
  c.cross_attn = {true, true, true, false};
  c.transformer_depth = {1, 1, 1, 1};
  c.heads_fixed = 8;
  c.context_dim = 768;
  return c;
}

UNetConfig UNetConfig::sd21() {
  UNetConfig c = sd15();
  c.heads_fixed = 0;
  c.head_dim = 64;
  c.linear_proj = true;
  c.context_dim = 1024;
  return c;
}

UNetConfig UNetConfig::sdxl() {
  UNetConfig c;
  c.block_out_channels = {320, 640, 1280};
  c.cross_attn = {false, true, true};
  c.transformer_depth = {1, 2, 10};
  c.head_dim = 64;
  c.linear_proj = true;
  c.context_dim = 2048;
  c.text_time = true;
  c.addition_time_embed_dim = 256;
  c.projection_class_embeddings_input_dim = 2816;  // 1280 pooled + 6 · 256
  return c;
}

// The shape of `name` without marking it used (config detection); nullopt if absent.
static std::optional<Shape> probe_shape(const WeightStore& w, const std::string& name) {
  const Tensor* t = w.find(name);
  if (!t) return std::nullopt;
  return t->shape();
}

UNetConfig UNetConfig::from_weights(const WeightStore& w) {
  const std::string where = cat(w.origin(), ": ", w.component());
  auto shape = [&](const std::string& name, int rank) -> Shape {
    std::optional<Shape> s = probe_shape(w, name);
    DF_CHECK(s.has_value(), where, ": no tensor ", name, " (not a diffusers-named UNet?)");
    DF_CHECK(s->rank() == rank, where, ": ", name, " is ", s->str(), ", expected rank ", rank);
    return *s;
  };
  auto count = [&](const std::string& prefix, const std::string& suffix) {
    int n = 0;
    while (w.has(cat(prefix, n, suffix))) ++n;
    return n;
  };
  UNetConfig c;
  c.block_out_channels.clear();
  c.cross_attn.clear();
  c.transformer_depth.clear();
  const Shape conv_in = shape("conv_in.weight", 4);
  c.in_channels = int(conv_in[1]);
  c.out_channels = int(shape("conv_out.weight", 4)[0]);
  for (int l = 0; w.has(cat("down_blocks.", l, ".resnets.0.conv1.weight")); ++l) {
    c.block_out_channels.push_back(int(shape(cat("down_blocks.", l, ".resnets.0.conv1.weight"), 4)[0]));
    const std::string attn = cat("down_blocks.", l, ".attentions.0.");
    const bool has_attn = w.has(attn + "proj_in.weight");
    c.cross_attn.push_back(has_attn);
    c.transformer_depth.push_back(has_attn ? count(attn + "transformer_blocks.", ".norm1.weight") : 1);
  }
  DF_CHECK(c.levels() >= 1, where, ": no down_blocks.0.resnets.0.conv1.weight (not a diffusers-named UNet?)");
  c.layers_per_block = count("down_blocks.0.resnets.", ".conv1.weight");
  c.mid_depth = count("mid_block.attentions.0.transformer_blocks.", ".norm1.weight");
  DF_CHECK(c.mid_depth >= 1, where, ": no mid_block.attentions.0 transformer blocks");
  // proj_in kind and the context width from the mid block (every SD UNet attends there).
  c.linear_proj = probe_shape(w, "mid_block.attentions.0.proj_in.weight").value_or(Shape{}).rank() == 2;
  c.context_dim = int(shape("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", 2)[1]);
  if (c.linear_proj) c.head_dim = 64;
  else c.heads_fixed = 8;
  // Real SD 2.x/XL widths are multiples of 64; a width that is not gets one head rather than a
  // fractional count (diffusers' configs do the same for the tiny models).
  if (c.head_dim > 0) {
    bool all = true;
    for (int ch : c.block_out_channels) all &= ch % 64 == 0;
    if (!all) {
      c.head_dim = 0;
      c.heads_fixed = 1;
    }
  }
  c.text_time = w.has("add_embedding.linear_1.weight");
  if (c.text_time) {
    const int in = int(shape("add_embedding.linear_1.weight", 2)[1]);
    c.projection_class_embeddings_input_dim = in;
    int d = 256;
    while (d > 1 && in - c.num_time_ids * d <= 0) d /= 2;
    c.addition_time_embed_dim = d;
  }
  c.validate();
  return c;
}

// ---- diffusers config.json ----

UNetConfig UNetConfig::from_diffusers_config(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail("unet/config.json: not valid JSON: ", e.what());
  }
  DF_CHECK(j.is_object(), "unet/config.json: not a JSON object");
  const std::string w = "unet/config.json";
  auto get = [&](const char* key) -> const nlohmann::json* {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  auto get_int = [&](const char* key, int def) {
    const nlohmann::json* v = get(key);
    if (!v) return def;
    DF_CHECK(v->is_number_integer(), w, ": ", key, " should be an integer");
    return v->get<int>();
  };
  auto get_float = [&](const char* key, float def) {
    const nlohmann::json* v = get(key);
    if (!v) return def;
    DF_CHECK(v->is_number(), w, ": ", key, " should be a number");
    return v->get<float>();
  };
  auto get_str = [&](const char* key, const char* def) -> std::string {
    const nlohmann::json* v = get(key);
    if (!v) return def;
    DF_CHECK(v->is_string(), w, ": ", key, " should be a string");
    return v->get<std::string>();
  };
  auto unsupported = [&](const char* key, const std::string& value) {
    fail(w, ": ", key, " = ", value, " is not supported by this UNet");
  };
  // An int or a per-level list of ints.
  auto per_level = [&](const char* key, int levels, int def) -> std::vector<int> {
    const nlohmann::json* v = get(key);
    if (!v) return std::vector<int>(size_t(levels), def);
    if (v->is_number_integer()) return std::vector<int>(size_t(levels), v->get<int>());
    DF_CHECK(v->is_array() && int(v->size()) == levels, w, ": ", key, " should be an integer or a list of ",
             levels);
    std::vector<int> out;
    for (const auto& e : *v) {
      DF_CHECK(e.is_number_integer(), w, ": ", key, " has a non-integer entry ", e.dump());
      out.push_back(e.get<int>());
    }
    return out;
  };

  UNetConfig c;
  DF_CHECK(get_str("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel", w,
           ": _class_name is ", get_str("_class_name", ""), ", expected UNet2DConditionModel");
  const nlohmann::json* boc = get("block_out_channels");
  DF_CHECK(boc && boc->is_array() && !boc->empty(), w, ": block_out_channels missing");
  c.block_out_channels.clear();
  for (const auto& e : *boc) {
    DF_CHECK(e.is_number_integer(), w, ": block_out_channels has a non-integer entry");
    c.block_out_channels.push_back(e.get<int>());
  }
  const int L = c.levels();
  c.in_channels = get_int("in_channels", 4);
  c.out_channels = get_int("out_channels", 4);
  c.layers_per_block = get_int("layers_per_block", 2);
  c.norm_groups = get_int("norm_num_groups", 32);
  c.norm_eps = get_float("norm_eps", 1e-5f);
  const nlohmann::json* down = get("down_block_types");
  DF_CHECK(down && down->is_array() && int(down->size()) == L, w, ": down_block_types needs ", L, " entries");
  c.cross_attn.clear();
  for (const auto& e : *down) {
    const std::string t = e.is_string() ? e.get<std::string>() : e.dump();
    if (t == "CrossAttnDownBlock2D") c.cross_attn.push_back(true);
    else if (t == "DownBlock2D") c.cross_attn.push_back(false);
    else unsupported("down_block_types entry", t);
  }
  if (const nlohmann::json* up = get("up_block_types")) {
    DF_CHECK(up->is_array() && int(up->size()) == L, w, ": up_block_types needs ", L, " entries");
    for (int i = 0; i < L; ++i) {
      const std::string want = c.cross_attn[L - 1 - i] ? "CrossAttnUpBlock2D" : "UpBlock2D";
      const std::string t = (*up)[i].is_string() ? (*up)[i].get<std::string>() : (*up)[i].dump();
      if (t != want) unsupported("up_block_types entry", t + " (expected " + want + ", mirroring the down blocks)");
    }
  }
  c.transformer_depth = per_level("transformer_layers_per_block", L, 1);
  if (const nlohmann::json* r = get("reverse_transformer_layers_per_block")) unsupported("reverse_transformer_layers_per_block", r->dump());
  c.mid_depth = c.transformer_depth.back();
  // diffusers' naming quirk: attention_head_dim means the number of heads unless num_attention_heads is set.
  c.heads_per_level = per_level(get("num_attention_heads") ? "num_attention_heads" : "attention_head_dim", L, 8);
  c.linear_proj = get("use_linear_projection") && get("use_linear_projection")->get<bool>();
  const nlohmann::json* cad = get("cross_attention_dim");
  DF_CHECK(cad && cad->is_number_integer(), w, ": cross_attention_dim should be one integer");
  c.context_dim = cad->get<int>();
  const std::string add = get_str("addition_embed_type", "");
  if (add == "text_time") {
    c.text_time = true;
    c.addition_time_embed_dim = get_int("addition_time_embed_dim", 256);
    c.projection_class_embeddings_input_dim = get_int("projection_class_embeddings_input_dim", 0);
  } else if (!add.empty()) {
    unsupported("addition_embed_type", add);
  }
  // Settings with only one supported value.
  if (get_str("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn")
    unsupported("mid_block_type", get_str("mid_block_type", ""));
  if (get_str("act_fn", "silu") != "silu") unsupported("act_fn", get_str("act_fn", ""));
  if (get_str("time_embedding_type", "positional") != "positional")
    unsupported("time_embedding_type", get_str("time_embedding_type", ""));
  if (get_str("resnet_time_scale_shift", "default") != "default")
    unsupported("resnet_time_scale_shift", get_str("resnet_time_scale_shift", ""));
  if (get_str("attention_type", "default") != "default") unsupported("attention_type", get_str("attention_type", ""));
  for (const char* key : {"class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
                          "time_cond_proj_dim", "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act",
                          "cross_attention_norm"})
    if (const nlohmann::json* v = get(key)) unsupported(key, v->dump());
  for (const char* key : {"only_cross_attention", "dual_cross_attention", "center_input_sample",
                          "resnet_skip_time_act", "class_embeddings_concat"}) {
    const nlohmann::json* v = get(key);
    if (v && v->dump().find("true") != std::string::npos) unsupported(key, v->dump());
  }
  if (const nlohmann::json* v = get("flip_sin_to_cos"); v && !v->get<bool>()) unsupported("flip_sin_to_cos", "false");
  if (get_float("freq_shift", 0) != 0) unsupported("freq_shift", std::to_string(get_float("freq_shift", 0)));
  if (get_int("conv_in_kernel", 3) != 3) unsupported("conv_in_kernel", std::to_string(get_int("conv_in_kernel", 3)));
  if (get_int("conv_out_kernel", 3) != 3) unsupported("conv_out_kernel", std::to_string(get_int("conv_out_kernel", 3)));
  if (get_int("downsample_padding", 1) != 1) unsupported("downsample_padding", std::to_string(get_int("downsample_padding", 1)));
  if (get_float("mid_block_scale_factor", 1) != 1) unsupported("mid_block_scale_factor", "≠ 1");
  if (get_float("resnet_out_scale_factor", 1) != 1) unsupported("resnet_out_scale_factor", "≠ 1");
  c.validate();
  return c;
}

// ---------------------------------------------------------------------------------------------
// Blocks: src/models/unet_blocks.h (shared with the ControlNet).

using namespace unet_blocks;

// ---------------------------------------------------------------------------------------------
// UNet


UNet::UNet() = default;
UNet::~UNet() = default;
UNet::UNet(UNet&&) noexcept = default;
UNet& UNet::operator=(UNet&&) noexcept = default;

const UNetConfig& UNet::config() const {
  DF_CHECK(impl_ != nullptr, "UNet: not loaded");
  return impl_->cfg;
}

void UNet::release_scratch() const {
  if (!impl_) return;
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->own.release();
}

size_t UNet::scratch_capacity() const {
  if (!impl_) return 0;
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->own.capacity();
}

PreparedIndex& UNet::prepared() {
  DF_CHECK(impl_ != nullptr, "UNet: not loaded");
  return impl_->prepared;
}

const NormIndex& UNet::norms() const {
  DF_CHECK(impl_ != nullptr, "UNet: not loaded");
  return impl_->norms;
}

int UNet::num_skips() const {
  const UNetConfig& c = config();
  return 1 + c.levels() * c.layers_per_block + c.levels() - 1;
}

void UNet::load(Backend& be, WeightStore& w, const UNetConfig& cfg) {
  cfg.validate();
  auto m = std::make_unique<Impl>();
  const Binder root(w);
  const int L = cfg.levels(), T = cfg.time_embed_dim();
  // Down path and mid block; skip_ch: the channels of every skip connection the up path consumes.
  std::vector<int> skip_ch = m->bind_trunk(be, root, cfg);
  int ch = cfg.block_out_channels.back();

  m->up.resize(size_t(L));
  for (int i = 0; i < L; ++i) {
    const int l = L - 1 - i;
    const Binder b = root.sub("up_blocks").sub(i);
    const int out = cfg.block_out_channels[l];
    const int n = cfg.layers_per_block + 1;
    Level& lv = m->up[size_t(i)];
    lv.resnets.resize(size_t(n));
    if (cfg.cross_attn[l]) lv.attentions.resize(size_t(n));
    for (int j = 0; j < n; ++j) {
      const int skip = skip_ch.back();
      skip_ch.pop_back();
      lv.resnets[size_t(j)].bind(be, b.sub("resnets").sub(j), ch + skip, out, T, cfg);
      ch = out;
      if (cfg.cross_attn[l])
        lv.attentions[size_t(j)].bind(be, b.sub("attentions").sub(j), out, cfg.transformer_depth[l], cfg.heads_at(l), cfg);
    }
    lv.resample = l > 0;
    if (lv.resample) lv.resampler.bind(be, b.sub("upsamplers").sub(0).sub("conv"), out, out, 3);
  }
  DF_ASSERT(skip_ch.empty());

  m->norm_out.bind(root.sub("conv_norm_out"), ch, cfg.norm_groups, cfg.norm_eps);
  m->conv_out.bind(be, root.sub("conv_out"), ch, cfg.out_channels, 3);
  try {
    w.finish();
  } catch (const Error& e) {
    fail(e.what(), " (", cfg.str(), ")");
  }
  m->prepared = w.take_prepared();
  m->norms = w.take_norms();
  impl_ = std::move(m);
}

static Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

Tensor UNet::forward(Ctx& c, const Tensor& x, const std::vector<float>& t, const Tensor& context,
                     const Tensor* text_embeds, const Tensor* time_ids,
                     const std::vector<Tensor>* down_residuals, const Tensor* mid_residual,
                     const std::vector<Tensor>* intrablock) const {
  // With bf16 compute the activations are stored in bf16 too (as the VAE's): every conv, linear
  // and attention writes bf16 and the norms and elementwise ops read it, half the bytes moved.
  Ctx cc{c.be, c.arena, c.be.effective_precision() == Precision::BF16 ? DType::BF16 : c.act, c.ws, c.grads};
  return run(cc, x, t, context, text_embeds, time_ids, down_residuals, mid_residual, nullptr, intrablock);
}

Tensor UNet::forward_train(Ctx& c, const Tensor& x, const std::vector<float>& t, const Tensor& context,
                           const Tensor* text_embeds, const Tensor* time_ids, UNetTrace& trace,
                           bool checkpointing) const {
  DF_CHECK(c.act == DType::F32, "UNet: training runs f32 activations");
  trace = UNetTrace{};
  if (!checkpointing) trace.saved = std::make_shared<UNetSavedBlocks>();
  return run(c, x, t, context, text_embeds, time_ids, nullptr, nullptr, &trace);
}

Tensor UNet::run(Ctx& c, const Tensor& x_in, const std::vector<float>& t, const Tensor& context_in,
                 const Tensor* text_embeds, const Tensor* time_ids, const std::vector<Tensor>* down_residuals,
                 const Tensor* mid_residual, UNetTrace* trace, const std::vector<Tensor>* intrablock) const {
  DF_CHECK(impl_ != nullptr, "UNet: forward before load");
  const Impl& m = *impl_;
  const UNetConfig& cfg = m.cfg;
  m.check_inputs("UNet", x_in, t, context_in);
  const int64_t B = x_in.dim(0);
  const Tensor x = as_f32(x_in), context = as_f32(context_in);
  // Every block runs with its temporaries in scratch (models/unet_impl.h: BlockRunner).
  BlockRunner block(c, m, trace);

  // Time embedding: sinusoidal (flip_sin_to_cos, shift 0) -> linear, SiLU, linear.
  const int C0 = cfg.block_out_channels[0];
  Tensor emb = m.temb(c, "UNet", C0, t, text_embeds, time_ids);
  Tensor semb = c.alloc(emb.shape());  // every resnet's time_emb_proj reads SiLU(emb)
  c.be.unary(Unary::SiLU, emb, semb);
  if (trace) {
    DF_CHECK(!down_residuals && !mid_residual, "UNet: training with ControlNet residuals is not supported");
    trace->x = x, trace->context = context, trace->emb = emb, trace->semb = semb, trace->t = t;
    trace->text_embeds = text_embeds, trace->time_ids = time_ids;
  }

  // Down path.
  std::vector<Tensor> skips;
  Tensor h = m.conv_in(c, x);
  skips.push_back(h);
  h = block.down(m, h, semb, context, skips, intrablock);
  if (trace) trace->skips = skips;
  // ControlNet residuals: new tensors (the last skip is also the mid block's input, unchanged).
  if (down_residuals) {
    DF_CHECK(down_residuals->size() == skips.size(), "UNet: ", down_residuals->size(),
             " down residuals for ", skips.size(), " skip connections");
    for (size_t i = 0; i < skips.size(); ++i) {
      const Tensor& r = (*down_residuals)[i];
      DF_CHECK(r.shape() == skips[i].shape(), "UNet: down residual ", i, " is ", r.str(), ", expected ",
               skips[i].shape().str());
      Tensor s = c.alloc(skips[i].shape());
      c.be.binary(Binary::Add, skips[i], as_f32(r), s);
      skips[i] = s;
    }
  }

  // Mid block.
  h = block.mid(m, h, semb, context);
  if (mid_residual) {
    DF_CHECK(mid_residual->shape() == h.shape(), "UNet: mid residual ", mid_residual->str(), ", expected ",
             h.shape().str());
    add_(c, h, as_f32(*mid_residual));
  }

  // Up path: each resnet takes concat(h, skip) on channels; upsamplers resize to the next skip.
  for (const Level& lv : m.up) {
    for (size_t j = 0; j < lv.resnets.size(); ++j) {
      const Tensor skip = skips.back();
      skips.pop_back();
      h = block(h, false, [&](Ctx& tc) {
        Tensor hc = tc.alloc({B, h.dim(1), h.dim(2), h.dim(3) + skip.dim(3)});
        tc.be.concat_last(h, skip, hc);
        return lv.resnets[j](tc, hc, semb, block.res_saved());
      });
      if (!lv.attentions.empty())
        h = block(h, false, [&](Ctx& tc) {
          return lv.attentions[j](tc, h, context, block.tf_scratch(), block.attn_saved());
        });
    }
    if (lv.resample) {
      DF_ASSERT(!skips.empty());
      const Tensor& next = skips.back();
      h = block(h, false, [&](Ctx& tc) {
        Tensor u = tc.alloc({B, next.dim(1), next.dim(2), h.dim(3)});
        tc.be.upsample_nearest(h, u);
        return lv.resampler(tc, u);
      });
    }
  }
  DF_ASSERT(skips.empty());
  return block(h, true, [&](Ctx& tc) { return m.conv_out(tc, m.norm_out(tc, h, true)); });
}

}  // namespace diffuse
