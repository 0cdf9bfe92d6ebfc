// The VAE's training pass: a forward through encoder, posterior sample and decoder that records,
// layer by layer, the step its backward takes (a closure holding the inputs that step reads), then
// the backward running those steps in reverse. Every activation stays in the caller's arena for
// the backward: meant for the small VAEs trained from scratch (the demo model), not for
// fine-tuning SD's 512² VAE, which would need recomputation like the UNet's.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "models/vae.h"
#include "models/vae_blocks.h"

namespace diffuse {

using namespace vae_blocks;

namespace {

using Tape = std::vector<std::function<Tensor(Ctx&, const Tensor&)>>;

void add_into(Ctx& c, Tensor& acc, const Tensor& g) { c.be.binary(Binary::Add, acc, g, acc); }

// x: [N, H, W, in] -> conv(x)
Tensor conv_t(Ctx& c, Tape& tape, const Conv2d& conv, const Tensor& x, bool want_dx = true) {
  tape.push_back([&conv, x, want_dx](Ctx& b, const Tensor& dy) { return conv.backward(b, x, dy, want_dx); });
  return conv(c, x);
}

// x: [N, H, W, in] -> [N, H, W, out]: GN-SiLU-conv, GN-SiLU-conv, + (1×1 conv) skip
Tensor resblock_t(Ctx& c, Tape& tape, const ResBlock& r, const Tensor& x) {
  Tensor a1 = r.norm1(c, x, true);
  Tensor h1 = r.conv1(c, a1);
  Tensor a2 = r.norm2(c, h1, true);
  Tensor y = r.conv2(c, a2);
  add_into(c, y, r.has_shortcut ? r.shortcut(c, x) : x);
  tape.push_back([&r, x, a1, h1, a2](Ctx& b, const Tensor& dy) {
    Tensor dh1 = r.norm2.backward(b, h1, r.conv2.backward(b, a2, dy), true);
    Tensor dx = r.norm1.backward(b, x, r.conv1.backward(b, a1, dh1), true);
    add_into(b, dx, r.has_shortcut ? r.shortcut.backward(b, x, dy) : dy);
    return dx;
  });
  return y;
}

// x: [N, H, W, C] -> same: tokens + out(attention(q, k, v of GroupNorm(tokens))), one head
Tensor attn_t(Ctx& c, Tape& tape, const AttnBlock& a, const Tensor& x) {
  const int64_t n = x.dim(0), hw = x.dim(1) * x.dim(2), C = a.channels;
  const float scale = 1.0f / std::sqrt(float(C));
  Tensor tokens = x.reshape({n, hw, C});
  Tensor h = a.norm(c, tokens);
  Tensor q = a.q(c, h), k = a.k(c, h), v = a.v(c, h);
  Tensor o = c.alloc({n, hw, C});
  c.be.attention(q, k, v, 1, scale, o);
  Tensor y = a.out(c, o);
  add_into(c, y, tokens);
  tape.push_back([&a, tokens, h, q, k, v, o, scale, shape = x.shape()](Ctx& b, const Tensor& dy4) {
    Tensor dy = dy4.reshape(tokens.shape());
    Tensor dout = a.out.backward(b, o, dy);
    Tensor dq = b.alloc(q.shape(), DType::F32), dk = b.alloc(k.shape(), DType::F32), dv = b.alloc(v.shape(), DType::F32);
    b.be.attention_backward(q, k, v, o, dout, 1, scale, dq, dk, dv);
    Tensor dh = a.q.backward(b, h, dq);
    a.k.backward(b, h, dk, &dh, true);
    a.v.backward(b, h, dv, &dh, true);
    Tensor dx = a.norm.backward(b, tokens, dh);
    add_into(b, dx, dy);
    return dx.reshape(shape);
  });
  return y.reshape(x.shape());
}

Tensor mid_t(Ctx& c, Tape& tape, const MidBlock& m, Tensor x) {
  x = resblock_t(c, tape, m.r0, x);
  if (m.has_attn) x = attn_t(c, tape, m.attn, x);
  return resblock_t(c, tape, m.r1, x);
}

// x: [N, H, W, C] -> [N, 2H, 2W, C]: nearest 2× then the level's 3×3 conv
Tensor upsample_t(Ctx& c, Tape& tape, const Level& lv, const Tensor& x) {
  Tensor u = c.alloc({x.dim(0), 2 * x.dim(1), 2 * x.dim(2), x.dim(3)});
  c.be.upsample_nearest(x, u);
  tape.push_back([shape = x.shape()](Ctx& b, const Tensor& du) {
    Tensor dx = b.alloc(shape, DType::F32);
    b.be.upsample_nearest_backward(du, dx);
    return dx;
  });
  return conv_t(c, tape, lv.conv, u);
}

// x -> SiLU(GroupNorm(x))
Tensor norm_silu_t(Ctx& c, Tape& tape, const GroupNorm& gn, const Tensor& x) {
  tape.push_back([&gn, x](Ctx& b, const Tensor& dy) { return gn.backward(b, x, dy, true); });
  return gn(c, x, true);
}

Tensor run_tape(Ctx& c, const Tape& tape, Tensor d) {
  for (size_t i = tape.size(); i-- > 0;) d = tape[i](c, d);
  return d;
}

}  // namespace

PreparedIndex& VAE::prepared() {
  DF_CHECK(impl_, "VAE: not loaded");
  return impl_->prepared;
}

const NormIndex& VAE::norms() const {
  DF_CHECK(impl_, "VAE: not loaded");
  return impl_->norms;
}

Tensor VAE::forward_train(Ctx& c, const Tensor& image, const Tensor& eps, TrainPass& pass) const {
  DF_CHECK(impl_ && impl_->training, "VAE::forward_train: the VAE was not loaded for training");
  DF_CHECK(c.act == DType::F32 && c.grads, "VAE::forward_train: needs an f32 training context (Ctx::grads)");
  const Impl& m = *impl_;
  const int64_t f = cfg_.downscale(), L = cfg_.latent_channels;
  DF_CHECK(image.rank() == 4 && image.dim(3) == cfg_.in_channels && image.dtype() == DType::F32 &&
               image.dim(1) % f == 0 && image.dim(2) % f == 0 && image.dim(1) > 0 && image.dim(2) > 0,
           "VAE::forward_train: image ", image.str(), " should be f32 [B, H, W, ", cfg_.in_channels,
           "] with H, W multiples of ", f);
  const Shape lat{image.dim(0), image.dim(1) / f, image.dim(2) / f, L};
  DF_CHECK(eps.dtype() == DType::F32 && eps.shape() == lat, "VAE::forward_train: eps ", eps.str(), " should be f32",
           lat.str());
  pass = TrainPass{};
  // Encoder: conv_in, levels (resnets, downsampler), mid block, norm_out + SiLU, conv_out, quant_conv.
  Tensor x = conv_t(c, pass.enc, m.enc_in, image, /*want_dx=*/false);
  for (const Level& lv : m.down) {
    for (const ResBlock& r : lv.resnets) x = resblock_t(c, pass.enc, r, x);
    if (lv.resample) x = conv_t(c, pass.enc, lv.conv, x);
  }
  x = mid_t(c, pass.enc, m.enc_mid, x);
  x = norm_silu_t(c, pass.enc, m.enc_norm_out, x);
  x = conv_t(c, pass.enc, m.enc_out, x);
  Tensor moments = conv_t(c, pass.enc, m.quant, x);  // [B, h, w, 2L]: mean, logvar
  // Posterior sample z = mean + std·eps, std = exp(logvar / 2), logvar clamped as in inference.
  pass.mean = c.alloc(lat, DType::F32);
  pass.logvar = c.alloc(lat, DType::F32);
  pass.std = c.alloc(lat, DType::F32);
  pass.z = c.alloc(lat, DType::F32);
  pass.eps = eps;
  const float* mo = moments.f32();
  for (int64_t i = 0, n = lat.numel() / L; i < n; ++i)
    for (int64_t j = 0; j < L; ++j) {
      const int64_t o = i * L + j;
      const float mean = mo[i * 2 * L + j], lv = std::clamp(mo[i * 2 * L + L + j], -30.0f, 20.0f);
      pass.mean.f32()[o] = mean;
      pass.logvar.f32()[o] = lv;
      pass.std.f32()[o] = std::exp(0.5f * lv);
      pass.z.f32()[o] = mean + pass.std.f32()[o] * eps.f32()[o];
    }
  // Decoder: post_quant_conv, conv_in, mid block, levels (resnets, upsampler), norm_out + SiLU, conv_out.
  Tensor y = conv_t(c, pass.dec, m.post_quant, pass.z);
  y = conv_t(c, pass.dec, m.dec_in, y);
  y = mid_t(c, pass.dec, m.dec_mid, y);
  for (const Level& lv : m.up) {
    for (const ResBlock& r : lv.resnets) y = resblock_t(c, pass.dec, r, y);
    if (lv.resample) y = upsample_t(c, pass.dec, lv, y);
  }
  y = norm_silu_t(c, pass.dec, m.dec_norm_out, y);
  return conv_t(c, pass.dec, m.dec_out, y);
}

void VAE::backward(Ctx& c, const TrainPass& pass, const Tensor& d_recon, const Tensor& d_mean,
                   const Tensor& d_logvar, bool encoder) const {
  DF_CHECK(c.grads && !pass.dec.empty(), "VAE::backward: needs a training context and a forward_train pass");
  const int64_t L = cfg_.latent_channels;
  const Shape& lat = pass.z.shape();
  Tensor dz = run_tape(c, pass.dec, d_recon);
  if (!encoder) return;
  // Through the sample and the clamp: d mean = dz (+ the loss's own), d logvar = dz·eps·std/2
  // where the clamp passes logvar through (+ the loss's own); into the moments' halves.
  Tensor dmom = c.alloc({lat[0], lat[1], lat[2], 2 * L}, DType::F32);
  const float* mo_lv = pass.logvar.f32();
  for (int64_t i = 0, n = lat.numel() / L; i < n; ++i)
    for (int64_t j = 0; j < L; ++j) {
      const int64_t o = i * L + j;
      float dm = dz.f32()[o], dl = dz.f32()[o] * pass.eps.f32()[o] * 0.5f * pass.std.f32()[o];
      if (d_mean.defined()) dm += d_mean.f32()[o];
      if (d_logvar.defined()) dl += d_logvar.f32()[o];
      const bool clamped = mo_lv[o] <= -30.0f || mo_lv[o] >= 20.0f;
      dmom.f32()[i * 2 * L + j] = dm;
      dmom.f32()[i * 2 * L + L + j] = clamped ? 0.0f : dl;
    }
  run_tape(c, pass.enc, dmom);
}

}  // namespace diffuse
