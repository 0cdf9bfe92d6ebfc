// AutoencoderKL (diffusers vae.py / autoencoder_kl.py semantics), NHWC.
#include "models/vae.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <mutex>
#include <string>

#include "core/error.h"
#include "models/vae_blocks.h"

namespace diffuse {

VAEConfig VAEConfig::sd() {
  VAEConfig c;
  c.block_out_channels = {128, 256, 512, 512};
  c.scaling_factor = 0.18215f;
  return c;
}

VAEConfig VAEConfig::sdxl() {
  VAEConfig c = sd();
  c.scaling_factor = 0.13025f;
  return c;
}

// ---- config detection -------------------------------------------------------------------------
namespace {

// Whether `name` exists with exactly `shape` (without marking it used).
bool shape_is(const WeightStore& w, const std::string& name, const Shape& shape) {
  const Tensor* t = w.find(name);
  return t && t->shape() == shape;
}

// The value v in `candidates` for which `name` has shape make(v), or 0.
int probe_dim(const WeightStore& w, const std::string& name, const std::vector<int>& candidates,
              const std::function<Shape(int64_t)>& make) {
  if (!w.has(name)) return 0;
  for (int v : candidates)
    if (shape_is(w, name, make(v))) return v;
  return 0;
}

std::vector<int> range(int lo, int hi, int step = 1) {
  std::vector<int> v;
  for (int i = lo; i <= hi; i += step) v.push_back(i);
  return v;
}

std::string idx(const char* fmt_a, int i, const char* fmt_b) { return cat(fmt_a, i, fmt_b); }

}  // namespace

VAEConfig VAEConfig::from_weights(const WeightStore& w, float scaling_factor) {
  VAEConfig c;
  c.scaling_factor = scaling_factor;
  const bool enc = w.has("encoder.conv_in.weight"), dec = w.has("decoder.conv_in.weight");
  DF_CHECK(enc || dec, w.origin(), ": ", w.component(),
           ": no VAE encoder or decoder (encoder.conv_in.weight / decoder.conv_in.weight) found");
  const std::vector<int> widths = range(c.norm_groups, c.norm_groups * 256, c.norm_groups);
  auto vec1 = [](int64_t v) { return Shape{v}; };

  int levels = 0;
  if (enc) {
    while (w.has(idx("encoder.down_blocks.", levels, ".resnets.0.conv1.weight"))) ++levels;
    int lpb = 0;
    while (w.has(idx("encoder.down_blocks.0.resnets.", lpb, ".conv1.weight"))) ++lpb;
    c.layers_per_block = lpb;
    for (int i = 0; i < levels; ++i)
      c.block_out_channels.push_back(
          probe_dim(w, idx("encoder.down_blocks.", i, ".resnets.0.norm2.weight"), widths, vec1));
  } else {
    while (w.has(idx("decoder.up_blocks.", levels, ".resnets.0.conv1.weight"))) ++levels;
    int n = 0;
    while (w.has(idx("decoder.up_blocks.0.resnets.", n, ".conv1.weight"))) ++n;
    c.layers_per_block = n - 1;
    for (int i = levels - 1; i >= 0; --i)
      c.block_out_channels.push_back(
          probe_dim(w, idx("decoder.up_blocks.", i, ".resnets.0.norm2.weight"), widths, vec1));
  }
  DF_CHECK(levels > 0 && c.layers_per_block > 0, w.origin(), ": ", w.component(),
           ": cannot find the VAE's resnet blocks (e.g. ", enc ? "encoder.down_blocks.0" : "decoder.up_blocks.0",
           ".resnets.0.conv1.weight)");
  for (size_t i = 0; i < c.block_out_channels.size(); ++i)
    DF_CHECK(c.block_out_channels[i] > 0, w.origin(), ": ", w.component(), ": cannot tell the width of VAE level ",
             i, " from its norm2.weight (not a multiple of ", c.norm_groups, " up to ", widths.back(), ")");
  const int64_t c0 = c.block_out_channels.front(), cl = c.block_out_channels.back();

  const std::vector<int> small = range(1, 64);
  c.use_quant_conv = w.has("quant_conv.weight");
  c.use_post_quant_conv = w.has("post_quant_conv.weight");
  int latent = 0;
  if (dec)
    latent = probe_dim(w, "decoder.conv_in.weight", small, [&](int64_t l) { return Shape{cl, l, 3, 3}; });
  else
    latent = probe_dim(w, "encoder.conv_out.weight", small, [&](int64_t l) { return Shape{2 * l, cl, 3, 3}; });
  DF_CHECK(latent > 0, w.origin(), ": ", w.component(), ": cannot tell the VAE's latent channels from ",
           dec ? "decoder.conv_in.weight" : "encoder.conv_out.weight");
  c.latent_channels = latent;
  if (enc) {
    c.in_channels = probe_dim(w, "encoder.conv_in.weight", small, [&](int64_t i) { return Shape{c0, i, 3, 3}; });
    DF_CHECK(c.in_channels > 0, w.origin(), ": ", w.component(), ": encoder.conv_in.weight is not [", c0,
             ", C, 3, 3]");
  }
  if (dec) {
    c.out_channels = probe_dim(w, "decoder.conv_out.weight", small, [&](int64_t o) { return Shape{o, c0, 3, 3}; });
    DF_CHECK(c.out_channels > 0, w.origin(), ": ", w.component(), ": decoder.conv_out.weight is not [C, ", c0,
             ", 3, 3]");
  }
  c.mid_attention = w.has(enc ? "encoder.mid_block.attentions.0.to_q.weight" : "decoder.mid_block.attentions.0.to_q.weight");
  return c;
}

using namespace vae_blocks;

VAE::VAE() = default;
VAE::~VAE() = default;
VAE::VAE(VAE&&) noexcept = default;
VAE& VAE::operator=(VAE&&) noexcept = default;

bool VAE::has_encoder() const { return impl_ && impl_->has_enc; }
bool VAE::has_decoder() const { return impl_ && impl_->has_dec; }

void VAE::load(Backend& be, WeightStore& w, const VAEConfig& cfg, bool encoder, bool decoder, bool training) {
  const int n = int(cfg.block_out_channels.size());
  DF_CHECK(n > 0 && cfg.layers_per_block > 0 && cfg.latent_channels > 0, w.origin(),
           ": VAE config has no levels, resnets or latent channels");
  DF_CHECK(encoder || decoder, w.origin(), ": VAE::load asked to load neither encoder nor decoder");
  auto m = std::make_unique<Impl>();
  const Binder root(w);
  const int64_t L = cfg.latent_channels;
  const auto& ch = cfg.block_out_channels;

  if (encoder) {
    const Binder e = root.sub("encoder");
    m->has_enc = true;
    m->enc_in.bind(be, e.sub("conv_in"), cfg.in_channels, ch[0], 3);
    int64_t prev = ch[0];
    for (int i = 0; i < n; ++i) {
      const Binder b = e.sub("down_blocks").sub(i);
      Level lv;
      lv.resnets.resize(cfg.layers_per_block);
      for (int j = 0; j < cfg.layers_per_block; ++j)
        lv.resnets[j].bind(be, b.sub("resnets").sub(j), j == 0 ? prev : ch[i], ch[i], cfg);
      lv.resample = i < n - 1;
      // Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)) then a 3×3 stride-2 conv.
      if (lv.resample) lv.conv.bind(be, b.sub("downsamplers").sub(0).sub("conv"), ch[i], ch[i], 3, Conv2dParams{2, 0, 0, 1, 1});
      prev = ch[i];
      m->down.push_back(std::move(lv));
    }
    m->enc_mid.bind(be, e.sub("mid_block"), ch[n - 1], cfg);
    m->enc_norm_out.bind(e.sub("conv_norm_out"), ch[n - 1], cfg.norm_groups, cfg.norm_eps);
    auto split = [&](const Binder& b, int64_t in, int64_t k) {
      Tensor wt = b.take("weight", {2 * L, in, k, k}), bt = b.take("bias", {2 * L});
      Conv2dParams p = Conv2dParams::same(int(k));
      m->head_mean = make_conv(be, wt.slice0(0, L), bt.slice0(0, L), k, p);
      m->head_logvar = make_conv(be, wt.slice0(L, 2 * L), bt.slice0(L, 2 * L), k, p);
    };
    if (cfg.use_quant_conv) {
      m->enc_out.bind(be, e.sub("conv_out"), ch[n - 1], 2 * L, 3);
      split(root.sub("quant_conv"), 2 * L, 1);
      if (training) m->quant.bind(be, root.sub("quant_conv"), 2 * L, 2 * L, 1);
    } else {
      split(e.sub("conv_out"), ch[n - 1], 3);
    }
  }

  if (decoder) {
    const Binder d = root.sub("decoder");
    m->has_dec = true;
    if (cfg.use_post_quant_conv) m->post_quant.bind(be, root.sub("post_quant_conv"), L, L, 1);
    m->dec_in.bind(be, d.sub("conv_in"), L, ch[n - 1], 3);
    m->dec_mid.bind(be, d.sub("mid_block"), ch[n - 1], cfg);
    int64_t prev = ch[n - 1];
    for (int i = 0; i < n; ++i) {
      const int64_t c = ch[n - 1 - i];
      const Binder b = d.sub("up_blocks").sub(i);
      Level lv;
      lv.resnets.resize(cfg.layers_per_block + 1);
      for (int j = 0; j <= cfg.layers_per_block; ++j)
        lv.resnets[j].bind(be, b.sub("resnets").sub(j), j == 0 ? prev : c, c, cfg);
      lv.resample = i < n - 1;
      if (lv.resample) lv.conv.bind(be, b.sub("upsamplers").sub(0).sub("conv"), c, c, 3);
      prev = c;
      m->up.push_back(std::move(lv));
    }
    m->dec_norm_out.bind(d.sub("conv_norm_out"), ch[0], cfg.norm_groups, cfg.norm_eps);
    m->dec_out.bind(be, d.sub("conv_out"), ch[0], cfg.out_channels, 3);
  }

  // The part not loaded may stay unused; anything else left over is an error.
  w.finish([&](const std::string& name) {
    auto starts = [&](const char* p) { return name.rfind(p, 0) == 0; };
    if (!encoder && (starts("encoder.") || starts("quant_conv."))) return true;
    if (!decoder && (starts("decoder.") || starts("post_quant_conv."))) return true;
    return false;
  });
  DF_CHECK(!training || (encoder && decoder && cfg.use_quant_conv && cfg.use_post_quant_conv), w.origin(),
           ": training a VAE needs its encoder, decoder, quant_conv and post_quant_conv");
  m->training = training;
  m->prepared = w.take_prepared();
  m->norms = w.take_norms();
  cfg_ = cfg;
  m->cfg = cfg;
  impl_ = std::move(m);
}

Tensor VAE::Impl::dec_trunk(Stages& s, Tensor x, size_t split) const {
  if (cfg.use_post_quant_conv) x = s.run([&](Ctx&, Ctx& o) { return post_quant(o, x); });
  x = s.run([&](Ctx&, Ctx& o) { return dec_in(o, x); });
  x = dec_mid(s, x);
  for (size_t i = 0; i <= split && i < up.size(); ++i) {
    for (const ResBlock& r : up[i].resnets) x = s.run([&](Ctx& t, Ctx& o) { return r(t, o, x); });
    if (i < split) x = upsample(s, up[i], x);
  }
  return x;
}

Tensor VAE::Impl::upsample(Stages& s, const Level& lv, Tensor x) const {
  if (!lv.resample) return x;
  return s.run([&](Ctx& t, Ctx& o) {  // Upsample2D: nearest 2× then a 3×3 conv
    Tensor u = t.alloc({x.dim(0), 2 * x.dim(1), 2 * x.dim(2), x.dim(3)});
    t.be.upsample_nearest(x, u);
    return lv.conv(o, u);
  });
}

Tensor VAE::Impl::dec_tail(Stages& s, Tensor x, NormStats* ns, bool final, size_t split) const {
  for (size_t i = split; i < up.size(); ++i) {
    const Level& lv = up[i];
    if (i > split)
      for (const ResBlock& r : lv.resnets) x = s.run([&](Ctx& t, Ctx& o) { return r(t, o, x, ns); });
    x = upsample(s, lv, x);
  }
  return s.run([&](Ctx& t, Ctx& o) { return dec_out(o, norm(t, dec_norm_out, x, true, ns)); }, final);
}

Tensor VAE::decode(Ctx& c, const Tensor& z) const {
  DF_CHECK(has_decoder(), "VAE::decode: the VAE decoder is not loaded");
  DF_CHECK(z.rank() == 4 && z.dim(3) == cfg_.latent_channels && z.dtype() == DType::F32 && z.dim(1) > 0 &&
               z.dim(2) > 0,
           "VAE::decode: latent ", z.str(), " should be f32 [B, h, w, ", cfg_.latent_channels, "] (NHWC)");
  const Impl& m = *impl_;
  ScratchLease sl(c, Workspace::kVAE, m.own, m.mu);
  // With bf16 compute the activations are stored in bf16 too: half the memory and bandwidth
  // (a 512² decode holds ~1.2 GB of f32 activations at its peak).
  Ctx cc{c.be, c.arena, c.be.effective_precision() == Precision::BF16 ? DType::BF16 : c.act, c.ws};
  Stages s(cc, sl->arenas, sl->peaks);
  return m.dec_tail(s, m.dec_trunk(s, z, 0), nullptr, true, 0);
}

Tensor VAE::Impl::enc_head(Stages& s, Tensor x, NormStats* ns) const {
  x = s.run([&](Ctx&, Ctx& o) { return enc_in(o, x); });
  size_t last = 0;  // levels [0, last) end in a downsampler
  for (size_t i = 0; i < down.size(); ++i)
    if (down[i].resample) last = i + 1;
  for (size_t i = 0; i < last; ++i) {
    const Level& lv = down[i];
    for (const ResBlock& r : lv.resnets) x = s.run([&](Ctx& t, Ctx& o) { return r(t, o, x, ns); });
    if (lv.resample) x = s.run([&](Ctx&, Ctx& o) { return lv.conv(o, x); });
  }
  return x;
}

VAE::Posterior VAE::Impl::enc_rest(Stages& s, Tensor x) const {
  size_t last = 0;
  for (size_t i = 0; i < down.size(); ++i)
    if (down[i].resample) last = i + 1;
  for (size_t i = last; i < down.size(); ++i)
    for (const ResBlock& r : down[i].resnets) x = s.run([&](Ctx& t, Ctx& o) { return r(t, o, x); });
  x = enc_mid(s, x);
  x = s.run([&](Ctx& t, Ctx& o) {
    Tensor h = enc_norm_out(cfg.use_quant_conv ? t : o, x, true);
    return cfg.use_quant_conv ? enc_out(o, h) : h;
  });
  // The moments' halves: mean into the caller's arena, logvar into scratch, then std.
  Ctx& c = s.caller();
  Posterior p;
  p.mean = head_mean(c, x);
  Ctx t = s.temp();
  Tensor logvar = head_logvar(t, x);
  p.std = c.alloc(logvar.shape());
  const float* lv = logvar.f32();
  float* sd = p.std.f32();
  for (int64_t i = 0, n = logvar.numel(); i < n; ++i)
    sd[i] = std::exp(0.5f * std::clamp(lv[i], -30.0f, 20.0f));
  return p;
}

VAE::Posterior VAE::encode(Ctx& c, const Tensor& image) const {
  DF_CHECK(has_encoder(), "VAE::encode: the VAE encoder is not loaded");
  const int64_t f = cfg_.downscale();
  DF_CHECK(image.rank() == 4 && image.dim(3) == cfg_.in_channels && image.dtype() == DType::F32,
           "VAE::encode: image ", image.str(), " should be f32 [B, H, W, ", cfg_.in_channels, "] (NHWC)");
  DF_CHECK(image.dim(1) > 0 && image.dim(2) > 0 && image.dim(1) % f == 0 && image.dim(2) % f == 0,
           "VAE::encode: image ", image.str(), " must have a height and width that are positive multiples of ", f);
  const Impl& m = *impl_;
  ScratchLease sl(c, Workspace::kVAE, m.own, m.mu);
  Stages s(c, sl->arenas, sl->peaks);
  return m.enc_rest(s, m.enc_head(s, image, nullptr));
}

size_t VAE::scratch_capacity() const {
  if (!impl_) return 0;
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->own.capacity();
}

size_t VAE::scratch_peak() const {
  if (!impl_) return 0;
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->own.peak();
}

void VAE::release_scratch() {
  if (!impl_) return;
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->own.release();
}

}  // namespace diffuse
