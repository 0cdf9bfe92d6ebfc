// The UNet's building blocks (diffusers names): ResnetBlock2D, Attention, BasicTransformerBlock,
// Transformer2DModel and a down/up level. Shared by the UNet and the ControlNet, whose trunk is the
// UNet's down path and mid block. Header-only; internal to src/models.
#pragma once
#include <cmath>
#include <vector>

#include "core/error.h"
#include "models/unet.h"
#include "nn/layers.h"

namespace diffuse::unet_blocks {

inline constexpr float kTransformerNormEps = 1e-6f;  // Transformer2DModel's GroupNorm
inline constexpr float kLayerNormEps = 1e-5f;        // BasicTransformerBlock's LayerNorms

// y = a + b in place on a (a must be a fresh activation nobody else reads).
inline void add_(Ctx& c, Tensor& a, const Tensor& b) { c.be.binary(Binary::Add, a, b, a); }

// A residual add h = h + y: in place, or into a new tensor when a training pass keeps the old h
// (`keep`: its backward reads it).
inline void residual_(Ctx& c, Tensor& h, const Tensor& y, bool keep) {
  if (!keep) return add_(c, h, y);
  Tensor n = c.alloc(h.shape());
  c.be.binary(Binary::Add, h, y, n);
  h = n;
}

// Training: each block's forward optionally fills a *Saved struct with the intermediates its
// backward reads (a training pass recomputes one block at a time with it, models/unet_backward.cpp);
// inference passes none and keeps nothing. backward() takes dL/d(output) and returns dL/d(input),
// adding parameter gradients through c.grads (nn/grad.h).

// Linear from a [out, in] weight or a [out, in, 1, 1] 1×1 conv weight (same math on NHWC tokens).
inline void bind_proj(Backend& be, Linear& lin, const Binder& b, int64_t in, int64_t out, bool conv) {
  lin.in = in;
  lin.out = out;
  Tensor wt = conv ? b.take("weight", {out, in, 1, 1}).reshape({out, in}) : b.take("weight", {out, in});
  lin.w = be.prepare_linear(wt, b.take("bias", {out}));
  b.store().record_prepared(b.prefix() + "weight", {lin.w, false, {}, conv ? Shape{out, in, 1, 1} : Shape{out, in},
                                                    {out, in}, true});
}

// ResnetBlock2D (time_embedding_norm "default", output_scale_factor 1).
struct Resnet {
  GroupNorm norm1, norm2;
  Conv2d conv1, conv2, shortcut;
  Linear temb;
  bool has_shortcut = false;
  int64_t out = 0;

  void bind(Backend& be, const Binder& b, int in_ch, int out_ch, int temb_dim, const UNetConfig& cfg) {
    out = out_ch;
    norm1.bind(b.sub("norm1"), in_ch, cfg.norm_groups, cfg.norm_eps);
    conv1.bind(be, b.sub("conv1"), in_ch, out_ch, 3);
    temb.bind(be, b.sub("time_emb_proj"), temb_dim, out_ch);
    norm2.bind(b.sub("norm2"), out_ch, cfg.norm_groups, cfg.norm_eps);
    conv2.bind(be, b.sub("conv2"), out_ch, out_ch, 3);
    has_shortcut = in_ch != out_ch;
    if (has_shortcut) shortcut.bind(be, b.sub("conv_shortcut"), in_ch, out_ch, 1);
  }
  struct Saved {
    Tensor x, a1, h1, a2;  // input, SiLU(norm1(x)), conv1 + temb, SiLU(norm2(h1))
  };
  // x: [B, H, W, in], semb: [B, temb] (SiLU already applied) -> [B, H, W, out]
  Tensor operator()(Ctx& c, const Tensor& x, const Tensor& semb, Saved* s = nullptr) const {
    Tensor a1 = norm1(c, x, true);
    Tensor h = conv1(c, a1);
    Tensor t = temb(c, semb);
    add_(c, h, t.reshape({t.dim(0), 1, 1, out}));
    Tensor a2 = norm2(c, h, true);
    if (s) *s = {x, a1, h, a2};
    h = conv2(c, a2);
    add_(c, h, has_shortcut ? shortcut(c, x) : x);
    return h;
  }
  // dy: [B, H, W, out] -> dx [B, H, W, in]; dsemb [B, temb] += the time embedding's gradient.
  Tensor backward(Ctx& c, const Saved& s, const Tensor& semb, const Tensor& dy, Tensor& dsemb) const;
};

// diffusers Attention (no bias on q/k/v, bias on to_out.0).
struct Attention {
  Linear q, k, v, o;
  int heads = 1;
  float scale = 1;
  void bind(Backend& be, const Binder& b, int64_t ch, int64_t ctx_dim, int heads_) {
    heads = heads_;
    scale = 1.0f / std::sqrt(float(ch / heads));
    q.bind(be, b.sub("to_q"), ch, ch, false);
    k.bind(be, b.sub("to_k"), ctx_dim, ch, false);
    v.bind(be, b.sub("to_v"), ctx_dim, ch, false);
    o.bind(be, b.sub("to_out").sub(0), ch, ch);
  }
  struct Saved {
    Tensor x, ctx, q, k, v, a;  // inputs, projections, attention output (to_out's input)
  };
  // x: [B, N, C], ctx: [B, S, Cctx] -> [B, N, C]
  Tensor operator()(Ctx& c, const Tensor& x, const Tensor& ctx, Saved* s = nullptr) const {
    Tensor qq = q(c, x), kk = k(c, ctx), vv = v(c, ctx);
    Tensor a = c.alloc(qq.shape());
    c.be.attention(qq, kk, vv, heads, scale, a);
    if (s) *s = {x, ctx, qq, kk, vv, a};
    return o(c, a);
  }
  // dy [B, N, C] -> dx [B, N, C]. Self-attention (ctx was x): the k/v paths add to dx. Cross:
  // they add to *dctx when given (else only their parameter gradients are computed).
  Tensor backward(Ctx& c, const Saved& s, const Tensor& dy, bool self, Tensor* dctx) const;
};

// BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward, pre-LayerNorm.
struct TransformerBlock {
  LayerNorm norm1, norm2, norm3;
  Attention attn1, attn2;
  Linear ff_in, ff_out;
  void bind(Backend& be, const Binder& b, int64_t ch, int64_t ctx_dim, int heads) {
    norm1.bind(b.sub("norm1"), ch, kLayerNormEps);
    attn1.bind(be, b.sub("attn1"), ch, ch, heads);
    norm2.bind(b.sub("norm2"), ch, kLayerNormEps);
    attn2.bind(be, b.sub("attn2"), ch, ctx_dim, heads);
    norm3.bind(b.sub("norm3"), ch, kLayerNormEps);
    ff_in.bind(be, b.sub("ff").sub("net").sub(0).sub("proj"), ch, 8 * ch);
    ff_out.bind(be, b.sub("ff").sub("net").sub(2), 4 * ch, ch);
  }
  struct Saved {
    Tensor h0, h1, h2;  // the input and the residual stream after attn1 and attn2
    Attention::Saved a1, a2;
    Tensor n3, proj, g;  // norm3(h2), ff_in output, GEGLU output
  };
  // h: [B, N, C] updated in place (a new tensor when saving); ctx: [B, S, Cctx]
  void operator()(Ctx& c, Tensor& h, const Tensor& ctx, Saved* s = nullptr) const {
    if (s) s->h0 = h;
    Tensor n = norm1(c, h);
    residual_(c, h, attn1(c, n, n, s ? &s->a1 : nullptr), s);
    if (s) s->h1 = h;
    residual_(c, h, attn2(c, norm2(c, h), ctx, s ? &s->a2 : nullptr), s);
    if (s) s->h2 = h;
    Tensor n3 = norm3(c, h);
    Tensor proj = ff_in(c, n3);
    Shape gs = proj.shape();
    gs[gs.rank() - 1] /= 2;
    Tensor g = c.alloc(gs);
    c.be.geglu(proj, g);
    if (s) s->n3 = n3, s->proj = proj, s->g = g;
    residual_(c, h, ff_out(c, g), s);
  }
  // dh: dL/d(output h) [B, N, C] -> dL/d(input h); cross-attention context gradient into *dctx.
  Tensor backward(Ctx& c, const Saved& s, const Tensor& dh, Tensor* dctx) const;
};

// Transformer2DModel (continuous input): GroupNorm, proj_in, blocks, proj_out, + input.
struct Transformer {
  GroupNorm norm;
  Linear proj_in, proj_out;
  std::vector<TransformerBlock> blocks;
  void bind(Backend& be, const Binder& b, int ch, int depth, int heads, const UNetConfig& cfg) {
    norm.bind(b.sub("norm"), ch, cfg.norm_groups, kTransformerNormEps);
    bind_proj(be, proj_in, b.sub("proj_in"), ch, ch, !cfg.linear_proj);
    blocks.resize(size_t(depth));
    for (int i = 0; i < depth; ++i)
      blocks[size_t(i)].bind(be, b.sub("transformer_blocks").sub(i), ch, cfg.context_dim, heads);
    bind_proj(be, proj_out, b.sub("proj_out"), ch, ch, !cfg.linear_proj);
  }
  struct Saved {
    Tensor x, n, hf;  // input, norm(x) as tokens, proj_out's input
    std::vector<TransformerBlock::Saved> blocks;
  };
  // x: [B, H, W, C], ctx: [B, S, Cctx] -> [B, H, W, C]. With `scratch`, each transformer block's
  // temporaries live there and are released after the block (not when saving: all are kept).
  Tensor operator()(Ctx& c, const Tensor& x, const Tensor& ctx, Arena* scratch = nullptr, Saved* s = nullptr) const {
    const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
    Tensor n = norm(c, x).reshape({B, H * W, C});
    Tensor h = proj_in(c, n);
    if (s) *s = {x, n, {}, std::vector<TransformerBlock::Saved>(blocks.size())};
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (!scratch || s) {
        blocks[i](c, h, ctx, s ? &s->blocks[i] : nullptr);
        continue;
      }
      Ctx bc{c.be, *scratch, c.act, c.ws, c.grads};
      blocks[i](bc, h, ctx);
      scratch->reset();
    }
    if (s) s->hf = h;
    Tensor y = proj_out(c, h).reshape({B, H, W, C});
    add_(c, y, x);
    return y;
  }
  // dy [B, H, W, C] -> dx; the context gradient of every block's cross-attention into *dctx.
  Tensor backward(Ctx& c, const Saved& s, const Tensor& dy, Tensor* dctx) const;
};

struct Level {
  std::vector<Resnet> resnets;
  std::vector<Transformer> attentions;  // empty, or one per resnet
  bool resample = false;                // downsampler (down path) / upsampler (up path)
  Conv2d resampler;
};

// The time embedding shared by the UNet and ControlNet: sinusoidal projection of t (flip_sin_to_cos,
// shift 0, width C0) -> linear_1, SiLU, linear_2; with SDXL's text_time conditioning, plus
// add_embedding(concat(text_embeds, sinusoidal(time_ids))). `who` names the model in errors.
// Returns emb [B, 4·C0] (before the SiLU the resnets apply).
struct TimeEmbedding {
  Linear time1, time2;
  Linear add1, add2;  // SDXL only
  bool text_time = false;
  int64_t num_time_ids = 0, add_dim = 0, add_in = 0;

  // Binds time_embedding.linear_{1,2} (and add_embedding.linear_{1,2} for text_time models).
  void bind(Backend& be, const Binder& root, const UNetConfig& u) {
    const int64_t C0 = u.block_out_channels[0], T = u.time_embed_dim();
    time1.bind(be, root.sub("time_embedding").sub("linear_1"), C0, T);
    time2.bind(be, root.sub("time_embedding").sub("linear_2"), T, T);
    text_time = u.text_time;
    if (text_time) {
      num_time_ids = u.num_time_ids;
      add_dim = u.addition_time_embed_dim;
      add_in = u.projection_class_embeddings_input_dim;
      add1.bind(be, root.sub("add_embedding").sub("linear_1"), add_in, T);
      add2.bind(be, root.sub("add_embedding").sub("linear_2"), T, T);
    }
  }

  struct Saved {
    Tensor tproj, h, a;            // sinusoids, linear_1 output, its SiLU
    Tensor cat_in, add_h, add_a;   // the same for add_embedding (SDXL)
  };
  Tensor operator()(Ctx& c, const char* who, int64_t C0, const std::vector<float>& t, const Tensor* text_embeds,
                    const Tensor* time_ids, Saved* s = nullptr) const {
    const int64_t B = int64_t(t.size());
    auto f32 = [](const Tensor& x) { return x.dtype() == DType::F32 ? x : x.to(DType::F32); };
    auto mlp = [&](const Linear& l1, const Linear& l2, const Tensor& in, Tensor* sh, Tensor* sa) {
      Tensor h = l1(c, in);
      Tensor a = c.alloc(h.shape());
      c.be.unary(Unary::SiLU, h, a);
      if (sh) *sh = h, *sa = a;
      return l2(c, a);
    };
    Tensor ts = c.alloc({B}, DType::F32);
    for (int64_t i = 0; i < B; ++i) ts.f32()[i] = t[size_t(i)];
    Tensor tproj = c.alloc({B, C0}, DType::F32);
    c.be.timestep_embedding(ts, int(C0), true, 0.0f, 10000.0f, tproj);
    Tensor emb = mlp(time1, time2, tproj, s ? &s->h : nullptr, s ? &s->a : nullptr);
    if (s) s->tproj = tproj;
    if (text_time) {
      DF_CHECK(text_embeds && time_ids, who, ": this SDXL-style model needs text_embeds and time_ids");
      const int64_t n = num_time_ids, d = add_dim, pooled = add_in - n * d;
      DF_CHECK(text_embeds->rank() == 2 && text_embeds->dim(0) == B && text_embeds->dim(1) == pooled, who,
               ": text_embeds ", text_embeds->str(), " should be [", B, ", ", pooled, "]");
      DF_CHECK(time_ids->rank() == 2 && time_ids->dim(0) == B && time_ids->dim(1) == n, who, ": time_ids ",
               time_ids->str(), " should be [", B, ", ", n, "]");
      Tensor ids = f32(*time_ids).reshape({B * n});
      Tensor tid = c.alloc({B * n, d}, DType::F32);
      c.be.timestep_embedding(ids, int(d), true, 0.0f, 10000.0f, tid);
      Tensor cat_in = c.alloc({B, pooled + n * d}, DType::F32);
      c.be.concat_last(f32(*text_embeds), tid.reshape({B, n * d}), cat_in);
      add_(c, emb, mlp(add1, add2, cat_in, s ? &s->add_h : nullptr, s ? &s->add_a : nullptr));
      if (s) s->cat_in = cat_in;
    }
    return emb;
  }
  // demb: dL/d(emb) [B, T] -> parameter gradients of the MLPs (the timesteps and SDXL's size
  // conditioning are inputs, not trained); SDXL: dL/d(text_embeds) [B, pooled] into
  // *dtext_embeds when given (f32, the pooled columns of add_embedding's input gradient).
  void backward(Ctx& c, const Saved& s, const Tensor& demb, Tensor* dtext_embeds = nullptr) const;
};

}  // namespace diffuse::unet_blocks
