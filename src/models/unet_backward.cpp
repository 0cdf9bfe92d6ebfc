// The UNet's backward pass (training), hand-written per block (src/models/unet_blocks.h) with
// recomputation at block boundaries: UNet::forward_train keeps only each block's input; backward
// walks the blocks in reverse, re-runs one block's forward with its Saved intermediates into a
// scratch arena, runs that block's backward and frees the scratch. Peak memory is so the block
// inputs plus one block's intermediates (gradient checkpointing per block), never the whole graph.
#include <cstring>

#include "core/error.h"
#include "models/unet.h"
#include "models/unet_blocks.h"
#include "models/unet_impl.h"

namespace diffuse {
namespace unet_blocks {

namespace {
Tensor zeros_like(Ctx& c, const Tensor& t) {
  Tensor z = c.alloc(t.shape(), DType::F32);
  std::memset(z.data(), 0, z.bytes());
  return z;
}
void add_into(Ctx& c, Tensor& acc, const Tensor& g) { c.be.binary(Binary::Add, acc, g, acc); }
}  // namespace

Tensor Resnet::backward(Ctx& c, const Saved& s, const Tensor& semb, const Tensor& dy, Tensor& dsemb) const {
  // out = conv2(a2) + (shortcut(x) or x); a2 = silu(norm2(h1)); h1 = conv1(a1) + temb(semb); a1 = silu(norm1(x))
  Tensor da2 = conv2.backward(c, s.a2, dy);
  Tensor dh1 = norm2.backward(c, s.h1, da2, true);
  const int64_t B = dh1.dim(0);
  Tensor dt = c.alloc({B, 1, 1, out}, DType::F32);
  c.be.sum_to(dh1, dt);
  temb.backward(c, semb, dt.reshape({B, out}), &dsemb, /*accumulate=*/true);
  Tensor da1 = conv1.backward(c, s.a1, dh1);
  Tensor dx = norm1.backward(c, s.x, da1, true);
  if (has_shortcut) add_into(c, dx, shortcut.backward(c, s.x, dy));
  else add_into(c, dx, dy);
  return dx;
}

Tensor Attention::backward(Ctx& c, const Saved& s, const Tensor& dy, bool self, Tensor* dctx) const {
  Tensor da = o.backward(c, s.a, dy);
  Tensor dq = c.alloc(s.q.shape(), DType::F32), dk = c.alloc(s.k.shape(), DType::F32),
         dv = c.alloc(s.v.shape(), DType::F32);
  c.be.attention_backward(s.q, s.k, s.v, s.a, da, heads, scale, dq, dk, dv);
  Tensor dx = q.backward(c, s.x, dq);
  Tensor* kv_dx = self ? &dx : dctx;
  k.backward(c, s.ctx, dk, kv_dx, true);
  v.backward(c, s.ctx, dv, kv_dx, true);
  return dx;
}

Tensor TransformerBlock::backward(Ctx& c, const Saved& s, const Tensor& dh, Tensor* dctx) const {
  // h3 = h2 + ff_out(geglu(ff_in(norm3(h2))))
  Tensor dg = ff_out.backward(c, s.g, dh);
  Tensor dproj = c.alloc(s.proj.shape(), DType::F32);
  c.be.geglu_backward(s.proj, dg, dproj);
  Tensor dh2 = norm3.backward(c, s.h2, ff_in.backward(c, s.n3, dproj));
  add_into(c, dh2, dh);
  // h2 = h1 + attn2(norm2(h1), ctx)
  Tensor dh1 = norm2.backward(c, s.h1, attn2.backward(c, s.a2, dh2, false, dctx));
  add_into(c, dh1, dh2);
  // h1 = h0 + attn1(n1, n1), n1 = norm1(h0)
  Tensor dh0 = norm1.backward(c, s.h0, attn1.backward(c, s.a1, dh1, true, nullptr));
  add_into(c, dh0, dh1);
  return dh0;
}

Tensor Transformer::backward(Ctx& c, const Saved& s, const Tensor& dy, Tensor* dctx) const {
  const int64_t B = s.x.dim(0), H = s.x.dim(1), W = s.x.dim(2), C = s.x.dim(3);
  Tensor dh = proj_out.backward(c, s.hf, dy.reshape({B, H * W, C}));
  for (size_t i = blocks.size(); i-- > 0;) dh = blocks[i].backward(c, s.blocks[i], dh, dctx);
  Tensor dn = proj_in.backward(c, s.n, dh);
  Tensor dx = norm.backward(c, s.x, dn.reshape({B, H, W, C}));
  add_into(c, dx, dy);
  return dx;
}

void TimeEmbedding::backward(Ctx& c, const Saved& s, const Tensor& demb, Tensor* dtext_embeds) const {
  auto mlp = [&](const Linear& l1, const Linear& l2, const Tensor& in, const Tensor& h, const Tensor& a, Tensor* din) {
    Tensor da = l2.backward(c, a, demb);
    c.be.unary_backward(Unary::SiLU, h, da, da);
    l1.backward(c, in, da, din);
  };
  mlp(time1, time2, s.tproj, s.h, s.a, nullptr);
  if (!text_time) {
    DF_CHECK(!dtext_embeds, "UNet: dtext_embeds asked of a model without the SDXL added embedding");
    return;
  }
  if (!dtext_embeds) {
    mlp(add1, add2, s.cat_in, s.add_h, s.add_a, nullptr);
    return;
  }
  // add_embedding's input is concat(text_embeds, sinusoids of the time ids): the text part's gradient.
  const int64_t B = s.cat_in.dim(0), pooled = add_in - num_time_ids * add_dim;
  const Shape want{B, pooled};
  DF_CHECK(dtext_embeds->dtype() == DType::F32 && dtext_embeds->shape() == want, "UNet: dtext_embeds ",
           dtext_embeds->str(), " should be f32[", B, ", ", pooled, "]");
  Tensor dcat = c.alloc(s.cat_in.shape(), DType::F32), dids = c.alloc({B, num_time_ids * add_dim}, DType::F32);
  mlp(add1, add2, s.cat_in, s.add_h, s.add_a, &dcat);
  c.be.split_last(dcat, *dtext_embeds, dids);
}

}  // namespace unet_blocks

using namespace unet_blocks;

void UNet::backward(Ctx& c, const UNetTrace& tr, const Tensor& dy, Tensor* dx, Tensor* dcontext,
                    Tensor* dtext_embeds) const {
  DF_CHECK(impl_ != nullptr, "UNet: backward before load");
  DF_CHECK(c.grads, "UNet: backward needs a training context (Ctx::grads)");
  DF_CHECK(tr.x.defined() && !tr.inputs.empty(), "UNet: backward without a forward_train trace");
  const UNetConfig& cfg = config();
  const int64_t B = tr.x.dim(0);
  const Shape out_shape{B, tr.x.dim(1), tr.x.dim(2), int64_t(cfg.out_channels)};
  DF_CHECK(dy.dtype() == DType::F32 && dy.shape() == out_shape, "UNet: backward dy ", dy.str(), " should be f32",
           out_shape.str());
  if (dcontext) {
    DF_CHECK(dcontext->dtype() == DType::F32 && dcontext->shape() == tr.context.shape(), "UNet: dcontext ",
             dcontext->str(), " should be f32", tr.context.shape().str());
    std::memset(dcontext->data(), 0, dcontext->bytes());
  }
  const Impl& m = *impl_;
  // Recomputation scratch: one block's intermediates and its backward's temporaries, freed after
  // the block. Gradients that outlive a block (the running gradient, skip gradients, dsemb) live
  // in the caller's arena.
  Arena local;  // the workspace's block-temporaries arena when there is one: it keeps its size
  Arena& scratch = c.ws ? c.ws->scratch(Workspace::kUNet).arenas[0] : local;
  scratch.reset();
  Ctx tc{c.be, scratch, DType::F32, c.ws, c.grads};
  size_t next = tr.inputs.size();
  auto input = [&]() -> const Tensor& {
    DF_ASSERT(next > 0);
    return tr.inputs[--next];
  };
  // Copies a block's gradient out of the scratch before it is reset.
  auto keep = [&](const Tensor& g) {
    Tensor k = c.alloc(g.shape(), DType::F32);
    std::memcpy(k.data(), g.data(), g.bytes());
    scratch.reset();
    return k;
  };
  Tensor dsemb = zeros_like(c, tr.semb);
  const int L = cfg.levels(), S = num_skips();
  std::vector<Tensor> dskip(static_cast<size_t>(S));  // gradients of the skip connections from the up path
  // A block's intermediates: kept by the forward (no checkpointing), else recomputed from its
  // input (`next` is the input's index once input() has returned it).
  auto resnet_bwd = [&](const Resnet& r, const Tensor& in, const Tensor& g) {
    if (const Resnet::Saved* k = tr.saved ? UNetSavedBlocks::at(tr.saved->res, next) : nullptr)
      return r.backward(tc, *k, tr.semb, g, dsemb);
    Resnet::Saved s;
    r(tc, in, tr.semb, &s);
    return r.backward(tc, s, tr.semb, g, dsemb);
  };
  auto attn_bwd = [&](const Transformer& t, const Tensor& in, const Tensor& g) {
    if (const Transformer::Saved* k = tr.saved ? UNetSavedBlocks::at(tr.saved->attn, next) : nullptr)
      return t.backward(tc, *k, g, dcontext);
    Transformer::Saved s;
    t(tc, in, tr.context, nullptr, &s);
    return t.backward(tc, s, g, dcontext);
  };

  // conv_out(silu(norm_out(h)))
  Tensor g;
  {
    const Tensor& h = input();
    Tensor a = m.norm_out(tc, h, true);
    g = keep(m.norm_out.backward(tc, h, m.conv_out.backward(tc, a, dy), true));
  }
  // Up path, reversed. Up level i's resnet j consumed skip S-1-(i·n + j); its upsampler resized to
  // the size of skip S-1-(i+1)·n.
  const int n = cfg.layers_per_block + 1;
  for (int i = L - 1; i >= 0; --i) {
    const Level& lv = m.up[size_t(i)];
    if (lv.resample) {
      const Tensor& h = input();
      const Tensor& target = tr.skips[size_t(S - 1 - (i + 1) * n)];
      Tensor u = tc.alloc({B, target.dim(1), target.dim(2), h.dim(3)}, DType::F32);
      c.be.upsample_nearest(h, u);
      Tensor du = lv.resampler.backward(tc, u, g);
      Tensor dh = tc.alloc(h.shape(), DType::F32);
      c.be.upsample_nearest_backward(du, dh);
      g = keep(dh);
    }
    for (int j = n - 1; j >= 0; --j) {
      if (!lv.attentions.empty()) g = keep(attn_bwd(lv.attentions[size_t(j)], input(), g));
      const Tensor& h = input();
      const int si = S - 1 - (i * n + j);
      const Tensor& skip = tr.skips[size_t(si)];
      Tensor hc = tc.alloc({B, h.dim(1), h.dim(2), h.dim(3) + skip.dim(3)}, DType::F32);
      c.be.concat_last(h, skip, hc);
      Tensor dhc = resnet_bwd(lv.resnets[size_t(j)], hc, g);
      Tensor dh = c.alloc(h.shape(), DType::F32), ds = c.alloc(skip.shape(), DType::F32);
      c.be.split_last(dhc, dh, ds);
      dskip[size_t(si)] = ds;
      g = dh;
      scratch.reset();
    }
  }
  // Mid block, reversed.
  g = keep(resnet_bwd(m.mid_res1, input(), g));
  g = keep(attn_bwd(m.mid_attn, input(), g));
  g = keep(resnet_bwd(m.mid_res0, input(), g));
  // Down path, reversed: a block's output gradient is the running gradient plus its skip's.
  int si = S - 1;
  auto with_skip = [&](int idx) {
    if (dskip[size_t(idx)].defined()) add_into(c, g, dskip[size_t(idx)]);
  };
  for (int l = L - 1; l >= 0; --l) {
    const Level& lv = m.down[size_t(l)];
    if (lv.resample) {
      with_skip(si--);
      g = keep(lv.resampler.backward(tc, input(), g));
    }
    for (int j = cfg.layers_per_block - 1; j >= 0; --j) {
      with_skip(si--);
      if (!lv.attentions.empty()) g = keep(attn_bwd(lv.attentions[size_t(j)], input(), g));
      g = keep(resnet_bwd(lv.resnets[size_t(j)], input(), g));
    }
  }
  DF_ASSERT(si == 0 && next == 0);
  with_skip(0);
  Tensor dxin = m.conv_in.backward(tc, tr.x, g, dx != nullptr);
  if (dx) {
    DF_CHECK(dx->dtype() == DType::F32 && dx->shape() == tr.x.shape(), "UNet: dx ", dx->str(), " should be f32",
             tr.x.shape().str());
    std::memcpy(dx->data(), dxin.data(), dx->bytes());
  }
  scratch.reset();
  // Time embedding: every resnet read semb = silu(emb).
  Tensor demb = zeros_like(tc, tr.emb);
  c.be.unary_backward(Unary::SiLU, tr.emb, dsemb, demb);
  TimeEmbedding::Saved ts;
  m.temb(tc, "UNet", cfg.block_out_channels[0], tr.t, tr.text_embeds, tr.time_ids, &ts);
  m.temb.backward(tc, ts, demb, dtext_embeds);
}

}  // namespace diffuse
