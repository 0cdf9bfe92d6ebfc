// The CLIP text encoder's backward pass (training): per layer, with recomputation (the forward
// keeps each layer's input; backward re-runs one layer with its intermediates, then runs that
// layer's backward). The causal attention's backward goes through matmul_backward and
// softmax_backward (masked entries have probability 0, so they get gradient 0).
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "models/clip_text.h"

namespace diffuse {

Tensor ClipTextModel::layer_backward(Ctx& sc, const Layer& l, const LayerSaved& s, const Tensor& dy) const {
  Backend& be = sc.be;
  const int64_t B = s.x.dim(0), D = cfg_.width / cfg_.heads;
  // y = h + fc2(act(fc1(ln2(h))))
  Tensor dg = l.fc2.backward(sc, s.g, dy);
  be.unary_backward(cfg_.act == ClipTextConfig::QuickGelu ? Unary::QuickGelu : Unary::GeluErf, s.f, dg, dg);
  Tensor dh = l.ln2.backward(sc, s.h, l.fc1.backward(sc, s.n2, dg));
  be.binary(Binary::Add, dh, dy, dh);
  // h = x + out(attention(q(n1), k(n1), v(n1))), n1 = ln1(x)
  Tensor dah = split_heads(sc, l.out.backward(sc, s.a, dh));
  Tensor dp = sc.alloc(s.p.shape(), DType::F32), dvh = sc.alloc(s.vh.shape(), DType::F32);
  be.matmul_backward(s.p, s.vh, dah, false, 1.0f, &dp, &dvh);
  Tensor ds = sc.alloc(s.p.shape(), DType::F32);
  be.softmax_backward(s.p, dp, ds);
  Tensor dqh = sc.alloc(s.qh.shape(), DType::F32), dkh = sc.alloc(s.kh.shape(), DType::F32);
  be.matmul_backward(s.qh, s.kh, ds, true, 1.0f / std::sqrt(float(D)), &dqh, &dkh);
  Tensor dn1 = l.q.backward(sc, s.n1, merge_heads(sc, dqh, B));
  l.k.backward(sc, s.n1, merge_heads(sc, dkh, B), &dn1, true);
  l.v.backward(sc, s.n1, merge_heads(sc, dvh, B), &dn1, true);
  Tensor dx = l.ln1.backward(sc, s.x, dn1);
  be.binary(Binary::Add, dx, dh, dx);
  return dx;
}

void ClipTextModel::backward(Ctx& ctx, const Trace& tr, const Tensor& d_last, const Tensor& d_penultimate,
                             const Tensor& d_text_embeds) const {
  DF_CHECK(ctx.grads, "clip text encoder: backward needs a training context (Ctx::grads)");
  DF_CHECK(!tr.inputs.empty() && tr.last.defined(), "clip text encoder: backward without a forward_train trace");
  const Tensor& last = tr.out.last_hidden;
  auto check = [&](const Tensor& g, const Shape& want, const char* what) {
    DF_CHECK(!g.defined() || (g.dtype() == DType::F32 && g.shape() == want), "clip text encoder: ", what, " ",
             g.str(), " should be f32", want.str());
  };
  check(d_last, last.shape(), "d_last");
  check(d_penultimate, last.shape(), "d_penultimate");
  const int64_t B = last.dim(0), T = last.dim(1), W = last.dim(2);
  Arena arena, scratch;
  Ctx c{ctx.be, arena, DType::F32, ctx.ws, ctx.grads};
  Ctx sc{ctx.be, scratch, DType::F32, ctx.ws, ctx.grads};
  // Gradient of the final norm's output: d_last plus the pooled rows' share of d_text_embeds.
  Tensor dl = c.alloc(last.shape(), DType::F32);
  std::memset(dl.data(), 0, dl.bytes());
  bool any = false;
  if (d_last.defined()) dl.copy_from(d_last), any = true;
  if (d_text_embeds.defined()) {
    DF_CHECK(has_proj_, "clip text encoder: d_text_embeds given, but the model has no text projection");
    check(d_text_embeds, Shape{B, int64_t(cfg_.projection_dim)}, "d_text_embeds");
    Tensor dpool = proj_.backward(sc, tr.out.pooled, d_text_embeds);
    for (int64_t b = 0; b < B; ++b) {
      float* row = dl.f32() + (b * T + tr.pooled_at[size_t(b)]) * W;
      for (int64_t i = 0; i < W; ++i) row[i] += dpool.f32()[b * W + i];
    }
    any = true;
    scratch.reset();
  }
  Tensor dh = c.alloc(last.shape(), DType::F32);
  if (any) {
    dh.copy_from(final_ln_.backward(sc, tr.last, dl));
    scratch.reset();
  } else {
    std::memset(dh.data(), 0, dh.bytes());
  }
  const size_t n = tr.inputs.size();
  for (size_t i = n; i-- > 0;) {
    // The penultimate state is layer n-2's output (layer n-1's input).
    if (i + 2 == n && d_penultimate.defined()) ctx.be.binary(Binary::Add, dh, d_penultimate, dh);
    LayerSaved s;
    run_layer(sc, layers_[i], tr.inputs[i], &s);
    dh.copy_from(layer_backward(sc, layers_[i], s, dh));
    scratch.reset();
  }
  // h0[b, t] = token_embedding[ids[b][t]] + position_embedding[t]: scatter-add the rows.
  Tensor* gtok = ctx.grads->table(tok_emb_.data());
  Tensor* gpos = ctx.grads->table(pos_emb_.data());
  const float* d = dh.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* src = d + (b * T + t) * W;
      if (gtok) {
        float* row = gtok->f32() + int64_t(tr.ids[size_t(b)][size_t(t)]) * W;
        for (int64_t c = 0; c < W; ++c) row[c] += src[c];
      }
      if (gpos) {
        float* row = gpos->f32() + t * W;
        for (int64_t c = 0; c < W; ++c) row[c] += src[c];
      }
    }
}

std::pair<Tensor, Tensor> ClipTextModel::trainable_embeddings() {
  DF_CHECK(loaded(), "clip text encoder: trainable_embeddings before load");
  if (!emb_trained_) {  // owned copies: the loaded tables may be read-only views of the file
    tok_emb_ = tok_emb_.to(DType::F32);
    pos_emb_ = pos_emb_.clone();
    emb_trained_ = true;
  }
  return {tok_emb_, pos_emb_};
}

}  // namespace diffuse
