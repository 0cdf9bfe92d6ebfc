#include "nn/layers.h"

#include <algorithm>

#include "core/error.h"

namespace diffuse {

Tensor to_f32(const Tensor& t) { return t.to(DType::F32); }

size_t ModelScratch::capacity() const {
  size_t n = 0;
  for (const Arena& a : arenas) n += a.capacity();
  return n;
}

size_t ModelScratch::peak() const {
  size_t n = 0;
  for (int i = 0; i < kArenas; ++i) n += std::max(peaks[i], arenas[i].peak());
  return n;
}

void ModelScratch::release() {
  for (Arena& a : arenas) a = Arena();
  for (size_t& p : peaks) p = 0;
}

size_t Workspace::capacity() const {
  size_t n = 0;
  for (const ModelScratch& s : slots_) n += s.capacity();
  return n;
}

void Workspace::release() {
  for (ModelScratch& s : slots_) s.release();
}

void Linear::bind(Backend& be, const Binder& b, int64_t in_, int64_t out_, bool bias) {
  in = in_;
  out = out_;
  Tensor wt = b.take("weight", {out, in});
  Tensor bt = bias ? b.take("bias", {out}) : Tensor();
  w = be.prepare_linear(wt, bt);
  b.store().record_prepared(b.prefix() + "weight", {w, false, {}, {out, in}, {out, in}, bias});
}

Tensor Linear::operator()(Ctx& c, const Tensor& x) const {
  Shape s = x.shape();
  s[s.rank() - 1] = out;
  Tensor y = c.alloc(s);
  c.be.linear(x, *w, y);
  if (c.grads) {
    if (const LoraAdapter* a = c.grads->adapter(w.get())) {
      // y += scale·up·(down·x), in f32 (training runs f32 activations).
      const int64_t R = x.numel() / in, r = a->down.dim(0);
      Tensor h = c.alloc({1, R, r}, DType::F32), d = c.alloc({1, R, out}, DType::F32);
      c.be.matmul(x.reshape({1, R, in}), a->down.reshape({1, r, in}), h, /*trans_b=*/true, 1.0f);
      c.be.matmul(h, a->up.reshape({1, out, r}), d, /*trans_b=*/true, a->scale);
      Tensor yv = y.reshape({1, R, out});
      c.be.binary(Binary::Add, yv, d, yv);
    }
  }
  return y;
}

LayerParams& Grads::layer(const PreparedWeight* w, const char* what) {
  auto it = layers.find(w);
  DF_CHECK(it != layers.end(), what, ": backward through a layer (weight ", w->shape().str(),
           ") the trainer registered no weights for");
  return it->second;
}

void Linear::backward(Ctx& c, const Tensor& x, const Tensor& dy, Tensor* dx, bool accumulate) const {
  DF_CHECK(c.grads, "Linear::backward: the context carries no Grads");
  LayerParams& p = c.grads->layer(w.get(), "linear backward");
  const Tensor wt = p.w.rank() == 4 ? p.w.reshape({out, in}) : p.w;
  if (dx) c.be.linear_backward_data(dy, wt, *dx, accumulate);
  if (p.gw.defined() || p.gb.defined()) {
    Tensor gw = p.gw.defined() ? p.gw.reshape({out, in}) : Tensor();
    c.be.linear_backward_weights(x, dy, gw.defined() ? &gw : nullptr, p.gb.defined() ? &p.gb : nullptr);
  }
  const LoraAdapter* a = c.grads->adapter(w.get());
  if (!a) return;
  // y_lora = scale·up·h, h = down·x: dup += scale·dyᵀ·h; dh = scale·dy·up; ddown += dhᵀ·x; dx += dh·down.
  const int64_t R = x.numel() / in, r = a->down.dim(0);
  const Tensor x2 = x.reshape({R, in}), dy2 = dy.reshape({R, out});
  const Tensor down = a->down.reshape({r, in}), up = a->up.reshape({out, r});
  Tensor h = c.alloc({1, R, r}, DType::F32);
  c.be.matmul(x2.reshape({1, R, in}), down.reshape({1, r, in}), h, true, 1.0f);
  Tensor dh = c.alloc({R, r}, DType::F32);
  c.be.linear_backward_data(dy2, up, dh);
  c.be.scale(dh, a->scale, dh);
  if (a->gup.defined()) {
    Tensor hs = c.alloc({R, r}, DType::F32);
    c.be.scale(h.reshape({R, r}), a->scale, hs);
    Tensor gup = a->gup.reshape({out, r});
    c.be.linear_backward_weights(hs, dy2, &gup, nullptr);
  }
  if (a->gdown.defined()) {
    Tensor gdown = a->gdown.reshape({r, in});
    c.be.linear_backward_weights(x2, dh, &gdown, nullptr);
  }
  if (dx) {
    Tensor dx2 = dx->reshape({R, in});
    c.be.linear_backward_data(dh, down, dx2, /*accumulate=*/true);
  }
}

Tensor Linear::backward(Ctx& c, const Tensor& x, const Tensor& dy) const {
  Tensor dx = c.alloc(x.shape(), DType::F32);
  backward(c, x, dy, &dx, false);
  return dx;
}

void Conv2d::bind(Backend& be, const Binder& b, int64_t in_, int64_t out_, int64_t k_, int stride) {
  bind(be, b, in_, out_, k_, Conv2dParams::same(int(k_), stride));
}

void Conv2d::bind(Backend& be, const Binder& b, int64_t in_, int64_t out_, int64_t k_, const Conv2dParams& p_) {
  in = in_;
  out = out_;
  k = k_;
  p = p_;
  w = be.prepare_conv2d(b.take("weight", {out, in, k, k}), b.take("bias", {out}), p);
  b.store().record_prepared(b.prefix() + "weight", {w, true, p, {out, in, k, k}, {out, in, k, k}, true});
}

Tensor Conv2d::backward(Ctx& c, const Tensor& x, const Tensor& dy, bool want_dx) const {
  DF_CHECK(c.grads, "Conv2d::backward: the context carries no Grads");
  LayerParams& p = c.grads->layer(w.get(), "conv2d backward");
  Tensor dx;
  if (want_dx) {
    dx = c.alloc(x.shape(), DType::F32);
    c.be.conv2d_backward_data(dy, p.w, this->p, dx);
  }
  if (p.gw.defined() || p.gb.defined())
    c.be.conv2d_backward_weights(x, dy, this->p, p.gw.defined() ? &p.gw : nullptr, p.gb.defined() ? &p.gb : nullptr);
  return dx;
}

Tensor Conv2d::operator()(Ctx& c, const Tensor& x) const {
  int64_t h = x.dim(1), wd = x.dim(2);
  int64_t ho = (h + p.pad_top + p.pad_bottom - k) / p.stride + 1;
  int64_t wo = (wd + p.pad_left + p.pad_right - k) / p.stride + 1;
  Tensor y = c.alloc({x.dim(0), ho, wo, out});
  c.be.conv2d(x, *w, y);
  return y;
}

void GroupNorm::bind(const Binder& b, int64_t channels, int groups_, float eps_) {
  gamma = to_f32(b.take("weight", {channels}));
  beta = to_f32(b.take("bias", {channels}));
  groups = groups_;
  eps = eps_;
  b.store().record_norm(b.prefix() + "weight", {gamma, beta});
}

Tensor GroupNorm::operator()(Ctx& c, const Tensor& x, bool silu) const {
  Tensor y = c.alloc(x.shape());
  c.be.group_norm(x, gamma, beta, groups, eps, silu, y);
  return y;
}

// The gradient buffers of a norm, when the Grads trains it.
static void norm_grads(Ctx& c, const Tensor& gamma, Tensor*& dg, Tensor*& db) {
  dg = db = nullptr;
  if (NormParams* n = c.grads ? c.grads->norm(gamma.data()) : nullptr) {
    if (n->ggamma.defined()) dg = &n->ggamma;
    if (n->gbeta.defined()) db = &n->gbeta;
  }
}

Tensor GroupNorm::backward(Ctx& c, const Tensor& x, const Tensor& dy, bool silu) const {
  Tensor dx = c.alloc(x.shape(), DType::F32), *dg, *db;
  norm_grads(c, gamma, dg, db);
  c.be.group_norm_backward(x, gamma, beta, groups, eps, silu, dy, dx, dg, db);
  return dx;
}

void LayerNorm::bind(const Binder& b, int64_t channels, float eps_) {
  gamma = to_f32(b.take("weight", {channels}));
  beta = to_f32(b.take("bias", {channels}));
  eps = eps_;
  b.store().record_norm(b.prefix() + "weight", {gamma, beta});
}

Tensor LayerNorm::operator()(Ctx& c, const Tensor& x) const {
  Tensor y = c.alloc(x.shape());
  c.be.layer_norm(x, gamma, beta, eps, y);
  return y;
}

Tensor LayerNorm::backward(Ctx& c, const Tensor& x, const Tensor& dy) const {
  Tensor dx = c.alloc(x.shape(), DType::F32), *dg, *db;
  norm_grads(c, gamma, dg, db);
  c.be.layer_norm_backward(x, gamma, eps, dy, dx, dg, db);
  return dx;
}

}  // namespace diffuse
