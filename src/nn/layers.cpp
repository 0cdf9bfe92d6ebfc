#include "nn/layers.h"

#include <algorithm>

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
  return y;
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
}

Tensor GroupNorm::operator()(Ctx& c, const Tensor& x, bool silu) const {
  Tensor y = c.alloc(x.shape());
  c.be.group_norm(x, gamma, beta, groups, eps, silu, y);
  return y;
}

void LayerNorm::bind(const Binder& b, int64_t channels, float eps_) {
  gamma = to_f32(b.take("weight", {channels}));
  beta = to_f32(b.take("bias", {channels}));
  eps = eps_;
}

Tensor LayerNorm::operator()(Ctx& c, const Tensor& x) const {
  Tensor y = c.alloc(x.shape());
  c.be.layer_norm(x, gamma, beta, eps, y);
  return y;
}

}  // namespace diffuse
