#include "models/controlnet.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/tensor_file.h"
#include "models/name_map.h"
#include "models/unet_blocks.h"
#include "models/unet_impl.h"

namespace diffuse {

using namespace unet_blocks;

// ---------------------------------------------------------------------------------------------
// Config

void ControlNetConfig::validate() const {
  unet.validate();
  const std::string what = "ControlNet config (" + str() + ")";
  DF_CHECK(embedding_channels.size() >= 1 && embedding_channels.size() <= 8, what,
           ": the conditioning embedding needs 1 to 8 levels");
  for (int ch : embedding_channels) DF_CHECK(ch >= 1, what, ": conditioning embedding widths must be positive");
  DF_CHECK(conditioning_channels >= 1, what, ": conditioning_channels must be positive");
}

std::string ControlNetConfig::str() const {
  std::string e;
  for (size_t i = 0; i < embedding_channels.size(); ++i) e += cat(i ? "," : "", embedding_channels[i]);
  return cat(unet.str(), "; hint ", conditioning_channels, " channels", bgr ? " (bgr)" : "", " embedding [", e, "]");
}

ControlNetConfig ControlNetConfig::from_weights(const WeightStore& w) {
  const std::string where = cat(w.origin(), ": ", w.component());
  const Tensor* conv_in = w.find("conv_in.weight");
  DF_CHECK(conv_in && conv_in->rank() == 4, where, ": no conv_in.weight [C, in, 3, 3] (not a ControlNet?)");
  // The trunk is detected as a UNet; a ControlNet has no conv_out of its own, so a stand-in with
  // the latent's channel count is shown to the UNet detection (nothing reads its values).
  WeightStore probe = w;
  if (!probe.has("conv_out.weight"))
    probe.add("conv_out.weight", Tensor::zeros({conv_in->dim(1), conv_in->dim(0), 1, 1}));
  ControlNetConfig c;
  c.unet = UNetConfig::from_weights(probe);
  auto shape = [&](const std::string& name) -> Shape {
    const Tensor* t = w.find(name);
    DF_CHECK(t && t->rank() == 4, where, ": no 4-d tensor ", name, " (not a ControlNet?)");
    return t->shape();
  };
  const std::string pre = "controlnet_cond_embedding.";
  const Shape in = shape(pre + "conv_in.weight");
  c.conditioning_channels = int(in[1]);
  c.embedding_channels = {int(in[0])};
  int blocks = 0;
  while (w.has(cat(pre, "blocks.", blocks, ".weight"))) ++blocks;
  DF_CHECK(blocks % 2 == 0, where, ": ", pre, "blocks has ", blocks, " convolutions, expected pairs");
  for (int i = 1; i < blocks; i += 2) c.embedding_channels.push_back(int(shape(cat(pre, "blocks.", i, ".weight"))[0]));
  c.validate();
  return c;
}

ControlNetConfig ControlNetConfig::from_diffusers_config(const std::string& text) {
  const std::string where = "controlnet config.json";
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail(where, ": not valid JSON: ", e.what());
  }
  DF_CHECK(j.is_object(), where, ": not a JSON object");
  const std::string cls = j.value("_class_name", std::string("ControlNetModel"));
  DF_CHECK(cls == "ControlNetModel", where, ": _class_name is ", cls, ", expected ControlNetModel");
  ControlNetConfig c;
  auto take = [&](const char* key) -> nlohmann::json {
    auto it = j.find(key);
    if (it == j.end()) return nullptr;
    nlohmann::json v = *it;
    j.erase(it);
    return v;
  };
  const nlohmann::json emb = take("conditioning_embedding_out_channels");
  if (emb.is_null()) {
    c.embedding_channels = {16, 32, 96, 256};  // diffusers' default
  } else {
    DF_CHECK(emb.is_array() && !emb.empty(), where, ": conditioning_embedding_out_channels should be a list");
    c.embedding_channels.clear();
    for (const auto& e : emb) {
      DF_CHECK(e.is_number_integer(), where, ": conditioning_embedding_out_channels has a non-integer entry");
      c.embedding_channels.push_back(e.get<int>());
    }
  }
  const nlohmann::json cc = take("conditioning_channels");
  if (!cc.is_null()) {
    DF_CHECK(cc.is_number_integer(), where, ": conditioning_channels should be an integer");
    c.conditioning_channels = cc.get<int>();
  }
  const nlohmann::json order = take("controlnet_conditioning_channel_order");
  if (!order.is_null()) {
    const std::string o = order.is_string() ? order.get<std::string>() : order.dump();
    DF_CHECK(o == "rgb" || o == "bgr", where, ": controlnet_conditioning_channel_order is ", o,
             ", expected rgb or bgr");
    c.bgr = o == "bgr";
  }
  const nlohmann::json pool = take("global_pool_conditions");
  DF_CHECK(pool.is_null() || (pool.is_boolean() && !pool.get<bool>()), where,
           ": global_pool_conditions = true (shuffle-style ControlNets) is not supported");
  take("addition_embed_type_num_heads");  // only used by addition_embed_type "text"
  take("_use_default_values");
  // What remains is a UNet2DConditionModel config (without the up path).
  j["_class_name"] = "UNet2DConditionModel";
  try {
    c.unet = UNetConfig::from_diffusers_config(j.dump());
  } catch (const Error& e) {
    std::string msg = e.what();
    const std::string u = "unet/config.json";
    if (msg.compare(0, u.size(), u) == 0) msg = where + msg.substr(u.size());
    throw Error(msg);
  }
  c.validate();
  return c;
}

// ---------------------------------------------------------------------------------------------
// Model

// The UNet's trunk (models/unet_impl.h) with the hint embedding and the zero convs.
struct ControlNet::Impl : UNetTrunk {
  ControlNetConfig ccfg;
  Conv2d emb_in, emb_out;
  std::vector<Conv2d> emb_blocks;
  std::vector<Conv2d> zero_down;  // controlnet_down_blocks.N, one per skip
  Conv2d zero_mid;                // controlnet_mid_block
};

ControlNet::ControlNet() = default;
ControlNet::~ControlNet() = default;
ControlNet::ControlNet(ControlNet&&) noexcept = default;
ControlNet& ControlNet::operator=(ControlNet&&) noexcept = default;

const ControlNetConfig& ControlNet::config() const {
  DF_CHECK(impl_ != nullptr, "ControlNet: not loaded");
  return impl_->ccfg;
}

int ControlNet::num_skips() const { return int(config().unet.levels() * (config().unet.layers_per_block + 1)); }

void ControlNet::check_compatible(const UNetConfig& u) const {
  const UNetConfig& c = config().unet;
  DF_CHECK(c.block_out_channels == u.block_out_channels && c.layers_per_block == u.layers_per_block &&
               c.context_dim == u.context_dim && c.text_time == u.text_time,
           "ControlNet (", c.str(), ") does not fit the model's UNet (", u.str(),
           "): widths, layers per level, context width and added embedding must match");
}

void ControlNet::load(Backend& be, WeightStore& w, const ControlNetConfig& cfg) {
  cfg.validate();
  auto m = std::make_unique<Impl>();
  m->ccfg = cfg;
  const UNetConfig& u = cfg.unet;
  const Binder root(w);
  const int C0 = u.block_out_channels[0];
  // The trunk as in the UNet, with a zero conv per skip connection and one after the mid block.
  const std::vector<int> skip_ch = m->bind_trunk(be, root, u);
  for (size_t i = 0; i < skip_ch.size(); ++i) {
    m->zero_down.emplace_back();
    m->zero_down.back().bind(be, root.sub("controlnet_down_blocks").sub(int(i)), skip_ch[i], skip_ch[i], 1);
  }
  const int ch = u.block_out_channels.back();
  m->zero_mid.bind(be, root.sub("controlnet_mid_block"), ch, ch, 1);

  // Conditioning embedding: conv_in, then per level step a 3×3 conv and a stride-2 3×3 conv.
  const Binder e = root.sub("controlnet_cond_embedding");
  const std::vector<int>& ec = cfg.embedding_channels;
  m->emb_in.bind(be, e.sub("conv_in"), cfg.conditioning_channels, ec[0], 3);
  for (size_t i = 0; i + 1 < ec.size(); ++i) {
    m->emb_blocks.emplace_back();
    m->emb_blocks.back().bind(be, e.sub("blocks").sub(int(2 * i)), ec[i], ec[i], 3);
    m->emb_blocks.emplace_back();
    m->emb_blocks.back().bind(be, e.sub("blocks").sub(int(2 * i + 1)), ec[i], ec[i + 1], 3, 2);
  }
  m->emb_out.bind(be, e.sub("conv_out"), ec.back(), C0, 3);
  try {
    w.finish();
  } catch (const Error& err) {
    fail(err.what(), " (", cfg.str(), ")");
  }
  impl_ = std::move(m);
}

ControlNet ControlNet::load_file(const std::string& path, Backend& be) {
  TensorFile f = open_model_file(path);
  WeightStore w = controlnet_weights(f);
  ControlNetConfig cfg;
  auto it = f.metadata.find("config.json");
  if (it == f.metadata.end() || f.metadata.count("model_index.json")) it = f.metadata.find("controlnet/config.json");
  if (f.format == "diffusers" && it != f.metadata.end()) {
    cfg = ControlNetConfig::from_diffusers_config(it->second);
  } else {
    cfg = ControlNetConfig::from_weights(w);
  }
  ControlNet cn;
  try {
    cn.load(be, w, cfg);
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.compare(0, path.size(), path) == 0) throw;
    fail(path, ": ", msg);
  }
  return cn;
}

static Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

static Tensor silu(Ctx& c, const Tensor& x) {
  Tensor y = c.alloc(x.shape());
  c.be.unary(Unary::SiLU, x, y);
  return y;
}

Tensor ControlNet::embed_hint(Ctx& c, const Tensor& hint_in) const {
  DF_CHECK(impl_ != nullptr, "ControlNet: embed_hint before load");
  const Impl& m = *impl_;
  const int cc = m.ccfg.conditioning_channels;
  DF_CHECK(hint_in.rank() == 4 && hint_in.dim(3) == cc && hint_in.dim(0) >= 1 && hint_in.dim(1) >= 1 &&
               hint_in.dim(2) >= 1,
           "ControlNet: hint ", hint_in.str(), " should be [N, H, W, ", cc, "] (NHWC)");
  Tensor hint = as_f32(hint_in);
  if (m.ccfg.bgr) {  // the model was trained on BGR: flip the channel order
    Tensor f = c.alloc(hint.shape());
    const int64_t px = hint.numel() / cc;
    for (int64_t i = 0; i < px; ++i)
      for (int k = 0; k < cc; ++k) f.f32()[i * cc + k] = hint.f32()[i * cc + (cc - 1 - k)];
    hint = f;
  }
  Tensor h = silu(c, m.emb_in(c, hint));
  for (const Conv2d& conv : m.emb_blocks) h = silu(c, conv(c, h));
  return m.emb_out(c, h);
}

ControlResiduals ControlNet::forward(Ctx& c, const Tensor& x_in, const std::vector<float>& t,
                                     const Tensor& context_in, const Tensor& hint_embedding, float scale,
                                     const Tensor* text_embeds, const Tensor* time_ids, bool guess_mode) const {
  DF_CHECK(impl_ != nullptr, "ControlNet: forward before load");
  const Impl& m = *impl_;
  const UNetConfig& cfg = m.cfg;
  m.check_inputs("ControlNet", x_in, t, context_in);
  const int64_t B = x_in.dim(0);
  const Tensor x = as_f32(x_in), context = as_f32(context_in);
  BlockRunner block(c, m, nullptr);  // block temporaries in scratch, as in the UNet

  // Time embedding (and SDXL's added embedding), as in the UNet.
  const int C0 = cfg.block_out_channels[0];
  Tensor emb = m.temb(c, "ControlNet", C0, t, text_embeds, time_ids);
  Tensor semb = silu(c, emb);

  // conv_in + hint embedding, then the UNet's down path collecting every skip.
  Tensor h = m.conv_in(c, x);
  const Tensor he = as_f32(hint_embedding);
  DF_CHECK(he.rank() == 4 && (he.dim(0) == 1 || he.dim(0) == B) && he.dim(1) == h.dim(1) && he.dim(2) == h.dim(2) &&
               he.dim(3) == h.dim(3),
           "ControlNet: hint embedding ", he.str(), " does not fit the latent ", x.str(), " (expected [1 or ", B,
           ", ", h.dim(1), ", ", h.dim(2), ", ", h.dim(3), "]: the hint image must be ", m.ccfg.hint_downscale(),
           "× the latent size, i.e. the output image size)");
  add_(c, h, he);
  std::vector<Tensor> skips = {h};
  h = block.down(m, h, semb, context, skips);
  h = block.mid(m, h, semb, context);

  DF_ASSERT(skips.size() == m.zero_down.size());
  ControlResiduals r;
  const int n = int(skips.size());
  for (int i = 0; i < n; ++i) {
    Tensor z = m.zero_down[size_t(i)](c, skips[size_t(i)]);
    const float s = guess_mode ? scale * guess_mode_scale(i, n) : scale;
    if (s != 1.0f) c.be.scale(z, s, z);
    r.down.push_back(z);
  }
  r.mid = m.zero_mid(c, h);
  if (scale != 1.0f) c.be.scale(r.mid, scale, r.mid);
  return r;
}

float ControlNet::guess_mode_scale(int i, int n) {
  DF_CHECK(n >= 1 && i >= 0 && i <= n, "guess_mode_scale: entry ", i, " of ", n + 1);
  return float(std::pow(10.0, -1.0 + double(i) / double(n)));
}

// ---------------------------------------------------------------------------------------------
// Hint images

namespace {

// PIL's Lanczos filter (support 3) and its 8-bit fixed-point resampling (Resample.c).
constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr double kLanczosSupport = 3.0;

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= M_PI;
  return std::sin(x) / x;
}
double lanczos(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3.0) : 0.0; }

struct Coeffs {
  std::vector<int> start, count;
  std::vector<std::vector<int32_t>> k;  // fixed point
};

Coeffs coeffs(int in_size, int out_size) {
  const double scale = double(in_size) / out_size;
  const double fscale = std::max(scale, 1.0);
  const double support = kLanczosSupport * fscale;
  Coeffs c;
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    std::vector<double> w(size_t(std::max(xmax, 0)));
    double ww = 0;
    for (int x = 0; x < xmax; ++x) {
      w[size_t(x)] = lanczos((x + xmin - center + 0.5) / fscale);
      ww += w[size_t(x)];
    }
    std::vector<int32_t> k(w.size());
    for (size_t x = 0; x < w.size(); ++x) {
      const double v = ww != 0.0 ? w[x] / ww : w[x];
      k[x] = int32_t(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    c.start.push_back(xmin);
    c.count.push_back(xmax);
    c.k.push_back(std::move(k));
  }
  return c;
}

uint8_t clip8(int64_t v) {
  if (v >= (int64_t(1) << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> kPrecisionBits);
}

// One separable pass along x (horizontal) or y.
Image resample_pass(const Image& in, int out_w, int out_h, bool horizontal) {
  Image out;
  out.width = out_w;
  out.height = out_h;
  out.channels = in.channels;
  out.format = in.format;
  out.pixels.assign(size_t(out_w) * out_h * in.channels, 0);
  const int C = in.channels;
  const Coeffs cf = horizontal ? coeffs(in.width, out_w) : coeffs(in.height, out_h);
  for (int y = 0; y < out_h; ++y)
    for (int x = 0; x < out_w; ++x) {
      const int o = horizontal ? x : y;
      const std::vector<int32_t>& k = cf.k[size_t(o)];
      for (int ch = 0; ch < C; ++ch) {
        int64_t ss = int64_t(1) << (kPrecisionBits - 1);
        for (int i = 0; i < cf.count[size_t(o)]; ++i) {
          const int sx = horizontal ? cf.start[size_t(o)] + i : x, sy = horizontal ? y : cf.start[size_t(o)] + i;
          ss += int64_t(in.pixels[(size_t(sy) * in.width + sx) * C + ch]) * k[size_t(i)];
        }
        out.pixels[(size_t(y) * out_w + x) * C + ch] = clip8(ss);
      }
    }
  return out;
}

}  // namespace

Image resize_lanczos(const Image& im, int width, int height) {
  DF_CHECK(width >= 1 && height >= 1 && width <= kMaxImageSide && height <= kMaxImageSide, "resize: target size ",
           width, "x", height, " is out of range (1 to ", kMaxImageSide, ")");
  DF_CHECK(im.width >= 1 && im.height >= 1 && im.channels >= 1 &&
               im.pixels.size() == size_t(im.width) * im.height * im.channels,
           "resize: image ", im.width, "x", im.height, "x", im.channels, " has inconsistent pixel data");
  Image out = im;
  if (out.width != width) out = resample_pass(out, width, out.height, true);
  if (out.height != height) out = resample_pass(out, out.width, height, false);
  return out;
}

Tensor prepare_hint(const Image& im_in, int width, int height) {
  Image im = to_rgb(im_in);
  if (im.width != width || im.height != height) im = resize_lanczos(im, width, height);
  Tensor t = Tensor::empty({1, height, width, 3});
  float* p = t.f32();
  for (size_t i = 0; i < im.pixels.size(); ++i) p[i] = float(im.pixels[i]) / 255.0f;
  return t;
}

}  // namespace diffuse
