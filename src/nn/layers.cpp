#include "nn/layers.h"

#include <algorithm>
#include <cstring>

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

// ---- LoRA adapters (nn/grad.h), in f32 (training runs f32 activations) ----

// x: [..., in] -> h [1, R, r] = x·downᵀ (R = rows of x).
static Tensor lora_down_linear(Ctx& c, const LoraAdapter& a, const Tensor& x, int64_t in) {
  const int64_t R = x.numel() / in, r = a.down.dim(0);
  Tensor h = c.alloc({1, R, r}, DType::F32);
  c.be.matmul(x.reshape({1, R, in}), a.down.reshape({1, r, in}), h, /*trans_b=*/true, 1.0f);
  return h;
}

// h: [..., r] (the adapter's down output) -> y [..., out] += scale·h·upᵀ.
static void lora_up_add(Ctx& c, const LoraAdapter& a, const Tensor& h, Tensor& y) {
  const int64_t r = a.down.dim(0), out = y.dim(-1), R = h.numel() / r;
  Tensor d = c.alloc({1, R, out}, DType::F32);
  c.be.matmul(h.reshape({1, R, r}), a.up.reshape({1, out, r}), d, /*trans_b=*/true, a.scale);
  Tensor yv = y.reshape({1, R, out});
  c.be.binary(Binary::Add, yv, d, yv);
}

// The up half of an adapter's backward. dy2: [R, out]; h: [..., r] with R rows, the down output
// of the forward (read only when up is trained) -> gup += scale·dy2ᵀ·h; returns dh [R, r] =
// scale·dy2·up.
static Tensor lora_up_backward(Ctx& c, const LoraAdapter& a, const Tensor& h, const Tensor& dy2) {
  const int64_t R = dy2.dim(0), out = dy2.dim(1), r = a.down.dim(0);
  Tensor dh = c.alloc({R, r}, DType::F32);
  c.be.linear_backward_data(dy2, a.up.reshape({out, r}), dh);
  c.be.scale(dh, a.scale, dh);
  if (a.gup.defined()) {
    Tensor hs = c.alloc({R, r}, DType::F32);
    c.be.scale(h.reshape({R, r}), a.scale, hs);
    Tensor gup = a.gup.reshape({out, r});
    c.be.linear_backward_weights(hs, dy2, &gup, nullptr);
  }
  return dh;
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
    if (const LoraAdapter* a = c.grads->adapter(w.get())) lora_up_add(c, *a, lora_down_linear(c, *a, x, in), y);
  }
  return y;
}

LayerParams& Grads::layer(const PreparedWeight* w, const char* what) {
  auto it = layers.find(w);
  DF_CHECK(it != layers.end(), what, ": backward through a layer (weight ", w->shape().str(),
           ") the trainer registered no weights for");
  return it->second;
}

// A frozen layer's weights for a backward pass in f32: as they are, or (bf16 training, which
// keeps frozen weights in bf16) converted into the step's arena.
static Tensor f32_weights(Ctx& c, const Tensor& w) {
  if (w.dtype() == DType::F32) return w;
  Tensor f = c.alloc(w.shape(), DType::F32);
  f.copy_from(w);
  return f;
}

void Linear::backward(Ctx& c, const Tensor& x, const Tensor& dy, Tensor* dx, bool accumulate) const {
  DF_CHECK(c.grads, "Linear::backward: the context carries no Grads");
  LayerParams& p = c.grads->layer(w.get(), "linear backward");
  const Tensor wf = f32_weights(c, p.w);
  const Tensor wt = wf.rank() == 4 ? wf.reshape({out, in}) : wf;
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
  const Tensor down = a->down.reshape({r, in});
  const Tensor dh = lora_up_backward(c, *a, a->gup.defined() ? lora_down_linear(c, *a, x, in) : Tensor(), dy2);
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

// x: [N, H, W, ·] -> the layer's output shape [N, Ho, Wo, channels].
static Shape conv_out_shape(const Conv2d& l, const Tensor& x, int64_t channels) {
  const int64_t ho = (x.dim(1) + l.p.pad_top + l.p.pad_bottom - l.k) / l.p.stride + 1;
  const int64_t wo = (x.dim(2) + l.p.pad_left + l.p.pad_right - l.k) / l.p.stride + 1;
  return {x.dim(0), ho, wo, channels};
}

// A convolution's adapter must be down [r, in, k, k] (or [r, in] for k = 1) and up [out, r, ...].
static void check_conv_adapter(const Conv2d& l, const LoraAdapter& a) {
  const int64_t r = a.down.dim(0);
  const bool down_ok = a.down.dim(1) == l.in && a.down.numel() == r * l.in * l.k * l.k &&
                       (a.down.rank() == 4 || l.k == 1);
  const bool up_ok = a.up.dim(0) == l.out && a.up.numel() == l.out * r;
  DF_CHECK(down_ok && up_ok, "LoRA ", a.key, ": down ", a.down.shape().str(), " and up ", a.up.shape().str(),
           " do not fit the convolution [", l.out, ", ", l.in, ", ", l.k, ", ", l.k, "]");
}

// The adapter's down weight as the backend runs it (a convolution with the layer's parameters),
// prepared again, in the layouts the previous one holds, when down's values have changed.
static const PreparedWeight& lora_down_prepared(Backend& be, const Conv2d& l, const LoraAdapter& a) {
  const Tensor down = a.down.reshape({a.down.dim(0), l.in, l.k, l.k});
  const Tensor& from = a.down_prepared_from;
  if (a.down_prepared && from.shape() == down.shape() && std::memcmp(from.data(), down.data(), down.bytes()) == 0)
    return *a.down_prepared;
  if (a.down_prepared && from.shape() == down.shape())
    a.down_prepared->swap_contents(*be.prepare_like(*a.down_prepared, down, Tensor(), true, l.p));
  else
    a.down_prepared = be.prepare_conv2d(down, Tensor(), l.p);
  a.down_prepared_from = down.clone();
  return *a.down_prepared;
}

// x: [N, H, W, in] -> h [N, Ho, Wo, r] = conv(x, down), with the layer's stride and padding.
static Tensor lora_down_conv(Ctx& c, const Conv2d& l, const LoraAdapter& a, const Tensor& x) {
  Tensor h = c.alloc(conv_out_shape(l, x, a.down.dim(0)), DType::F32);
  c.be.conv2d(x, lora_down_prepared(c.be, l, a), h);
  return h;
}

// The adapter's part of a convolution's backward. x: [N, H, W, in] (the forward's input), dy:
// [N, Ho, Wo, out] -> gup, gdown += (those trained), *dx += dL/dx (when dx is given).
// y_lora = scale·up·h, h = conv(x, down): dh = scale·dy·up; gdown += conv weight gradient of (x, dh);
// dx += conv data gradient of (dh, down).
static void lora_conv_backward(Ctx& c, const Conv2d& l, const LoraAdapter& a, const Tensor& x, const Tensor& dy,
                               Tensor* dx) {
  const int64_t r = a.down.dim(0);
  const Tensor h = a.gup.defined() ? lora_down_conv(c, l, a, x) : Tensor();
  const Tensor dh = lora_up_backward(c, a, h, dy.reshape({dy.numel() / l.out, l.out}))
                        .reshape({dy.dim(0), dy.dim(1), dy.dim(2), r});
  const Tensor down = a.down.reshape({r, l.in, l.k, l.k});
  if (a.gdown.defined()) {
    Tensor gdown = a.gdown.reshape(down.shape());
    c.be.conv2d_backward_weights(x, dh, l.p, &gdown, nullptr);
  }
  if (dx) {
    Tensor t = c.alloc(x.shape(), DType::F32);
    c.be.conv2d_backward_data(dh, down, l.p, t);
    c.be.binary(Binary::Add, *dx, t, *dx);
  }
}

Tensor Conv2d::backward(Ctx& c, const Tensor& x, const Tensor& dy, bool want_dx) const {
  DF_CHECK(c.grads, "Conv2d::backward: the context carries no Grads");
  LayerParams& p = c.grads->layer(w.get(), "conv2d backward");
  Tensor dx;
  if (want_dx) {
    dx = c.alloc(x.shape(), DType::F32);
    c.be.conv2d_backward_data(dy, f32_weights(c, p.w), this->p, dx);
  }
  if (p.gw.defined() || p.gb.defined())
    c.be.conv2d_backward_weights(x, dy, this->p, p.gw.defined() ? &p.gw : nullptr, p.gb.defined() ? &p.gb : nullptr);
  if (const LoraAdapter* a = c.grads->adapter(w.get()))
    lora_conv_backward(c, *this, *a, x, dy, want_dx ? &dx : nullptr);
  return dx;
}

Tensor Conv2d::operator()(Ctx& c, const Tensor& x) const {
  Tensor y = c.alloc(conv_out_shape(*this, x, out));
  c.be.conv2d(x, *w, y);
  if (c.grads) {
    if (const LoraAdapter* a = c.grads->adapter(w.get())) {
      check_conv_adapter(*this, *a);
      lora_up_add(c, *a, lora_down_conv(c, *this, *a, x), y);
    }
  }
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
