#include "models/clip_text.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <string>

#include "core/error.h"

namespace diffuse {

namespace {

const char* kTokEmb = "text_model.embeddings.token_embedding.weight";
const char* kPosEmb = "text_model.embeddings.position_embedding.weight";
const char* kProj = "text_projection.weight";

std::string layer_name(int i, const char* leaf) {
  return cat("text_model.encoder.layers.", i, ".", leaf);
}

// The shape of tensor `name` in `w`, without marking it used.
std::optional<std::vector<int64_t>> peek_shape(const WeightStore& w, const std::string& name) {
  const Tensor* t = w.find(name);
  if (!t) return std::nullopt;
  return t->shape().vec();
}

std::vector<int64_t> need_shape(const WeightStore& w, const std::string& name, size_t rank) {
  auto s = peek_shape(w, name);
  DF_CHECK(s.has_value(), w.origin(), ": ", w.component(), ": no tensor ", name,
           " (not a CLIP text encoder?)");
  DF_CHECK(s->size() == rank, w.origin(), ": ", w.component(), ": tensor ", name, " has rank ",
           s->size(), ", expected ", rank);
  return *s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Config

ClipTextConfig ClipTextConfig::from_weights(const WeightStore& w, Act act) {
  ClipTextConfig c;
  c.act = act;
  auto tok = need_shape(w, kTokEmb, 2);
  c.vocab = int(tok[0]);
  c.width = int(tok[1]);
  auto pos = need_shape(w, kPosEmb, 2);
  c.max_positions = int(pos[0]);
  c.layers = 0;
  while (w.has(layer_name(c.layers, "layer_norm1.weight"))) ++c.layers;
  DF_CHECK(c.layers > 0, w.origin(), ": ", w.component(), ": no tensor ",
           layer_name(0, "layer_norm1.weight"), " (a CLIP text encoder needs at least one layer)");
  DF_CHECK(c.width % 64 == 0, w.origin(), ": ", w.component(), ": token embedding width ",
           c.width, " is not a multiple of CLIP's head dim 64");
  c.heads = c.width / 64;
  c.intermediate = int(need_shape(w, layer_name(0, "mlp.fc1.weight"), 2)[0]);
  c.projection_dim = 0;
  if (auto p = peek_shape(w, kProj)) {
    DF_CHECK(p->size() == 2, w.origin(), ": ", w.component(), ": tensor ", kProj, " has rank ",
             p->size(), ", expected 2");
    c.projection_dim = int((*p)[0]);
  }
  return c;
}

ClipTextConfig ClipTextConfig::clip_l() {
  ClipTextConfig c;
  c.width = 768;
  c.layers = 12;
  c.heads = 12;
  c.intermediate = 3072;
  c.act = QuickGelu;
  return c;
}

ClipTextConfig ClipTextConfig::openclip_h() {
  ClipTextConfig c;
  c.width = 1024;
  c.layers = 23;  // the checkpoint has 24; SD 2.x uses the penultimate one (diffusers drops the last)
  c.heads = 16;
  c.intermediate = 4096;
  c.act = Gelu;
  return c;
}

ClipTextConfig ClipTextConfig::openclip_bigg() {
  ClipTextConfig c;
  c.width = 1280;
  c.layers = 32;
  c.heads = 20;
  c.intermediate = 5120;
  c.act = Gelu;
  c.projection_dim = 1280;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Loading

void ClipTextModel::load(Backend& be, WeightStore& w, const ClipTextConfig& cfg) {
  DF_CHECK(cfg.width > 0 && cfg.heads > 0 && cfg.width % cfg.heads == 0 && cfg.layers > 0 &&
               cfg.vocab > 0 && cfg.max_positions > 0 && cfg.intermediate > 0 &&
               cfg.projection_dim >= 0,
           w.origin(), ": ", w.component(), ": invalid CLIP text config (width ", cfg.width,
           ", heads ", cfg.heads, ", layers ", cfg.layers, ", vocab ", cfg.vocab, ", positions ",
           cfg.max_positions, ", intermediate ", cfg.intermediate, ", projection ",
           cfg.projection_dim, ")");
  cfg_ = cfg;
  const int64_t W = cfg.width, I = cfg.intermediate;
  Binder tm = Binder(w).sub("text_model");
  Binder emb = tm.sub("embeddings");
  tok_emb_ = emb.sub("token_embedding").take("weight", {cfg.vocab, W});
  pos_emb_ = to_f32(emb.sub("position_embedding").take("weight", {cfg.max_positions, W}));
  w.ignore("text_model.embeddings.position_ids");

  layers_.clear();
  layers_.resize(size_t(cfg.layers));
  Binder enc = tm.sub("encoder").sub("layers");
  for (int i = 0; i < cfg.layers; ++i) {
    Binder b = enc.sub(i);
    Layer& l = layers_[size_t(i)];
    Binder att = b.sub("self_attn");
    l.q.bind(be, att.sub("q_proj"), W, W);
    l.k.bind(be, att.sub("k_proj"), W, W);
    l.v.bind(be, att.sub("v_proj"), W, W);
    l.out.bind(be, att.sub("out_proj"), W, W);
    l.ln1.bind(b.sub("layer_norm1"), W, cfg.eps);
    l.ln2.bind(b.sub("layer_norm2"), W, cfg.eps);
    l.fc1.bind(be, b.sub("mlp").sub("fc1"), W, I);
    l.fc2.bind(be, b.sub("mlp").sub("fc2"), I, W);
  }
  final_ln_.bind(tm.sub("final_layer_norm"), W, cfg.eps);
  has_proj_ = cfg.projection_dim > 0;
  if (has_proj_) proj_.bind(be, Binder(w).sub("text_projection"), W, cfg.projection_dim, false);
  w.finish();
  prepared_ = w.take_prepared();
  norms_ = w.take_norms();
}

// ---------------------------------------------------------------------------------------------
// Forward

// [B, T, H·D] -> [B·H, T, D] (heads as batches; a view when H = 1).
Tensor ClipTextModel::split_heads(Ctx& sc, const Tensor& x) const {
  const int64_t B = x.dim(0), T = x.dim(1), HD = x.dim(2), H = cfg_.heads, D = HD / H;
  if (H == 1) return x.reshape({B, T, D});
  Tensor y = sc.alloc({B * H, T, D}, DType::F32);
  const float* s = x.f32();
  float* d = y.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(d + ((b * H + h) * T + t) * D, s + (b * T + t) * HD + h * D, size_t(D) * 4);
  return y;
}

// [B·H, T, D] -> [B, T, H·D]
Tensor ClipTextModel::merge_heads(Ctx& sc, const Tensor& xh, int64_t B) const {
  const int64_t H = cfg_.heads, T = xh.dim(1), D = xh.dim(2), HD = H * D;
  if (H == 1) return xh.reshape({B, T, HD});
  Tensor o = sc.alloc({B, T, HD}, DType::F32);
  const float* src = xh.f32();
  float* dst = o.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(dst + (b * T + t) * HD + h * D, src + ((b * H + h) * T + t) * D, size_t(D) * 4);
  return o;
}

// q, k, v: [B, T, H*D] -> [B, T, H*D]; softmax(q·kᵀ/√D + causal mask)·v per head.
Tensor ClipTextModel::causal_attention(Ctx& sc, const Tensor& q, const Tensor& k, const Tensor& v,
                                       LayerSaved* saved) const {
  const int64_t B = q.dim(0), T = q.dim(1), HD = q.dim(2), H = cfg_.heads, D = HD / H;
  Tensor qh = split_heads(sc, q), kh = split_heads(sc, k), vh = split_heads(sc, v);
  Tensor s = sc.alloc({B * H, T, T});
  sc.be.matmul(qh, kh, s, /*trans_b=*/true, 1.0f / std::sqrt(float(D)));
  // Causal softmax per row: token i sees tokens 0..i; the rest get exactly 0.
  float* sp = s.f32();
  for (int64_t r = 0; r < B * H * T; ++r) {
    float* row = sp + r * T;
    const int64_t i = r % T;
    float mx = row[0];
    for (int64_t j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
    double sum = 0;
    for (int64_t j = 0; j <= i; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum += row[j];
    }
    const float inv = float(1.0 / sum);
    for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
    for (int64_t j = i + 1; j < T; ++j) row[j] = 0.0f;
  }
  Tensor oh = sc.alloc({B * H, T, D});
  sc.be.matmul(s, vh, oh, /*trans_b=*/false, 1.0f);
  if (saved) saved->qh = qh, saved->kh = kh, saved->vh = vh, saved->p = s;
  return merge_heads(sc, oh, B);
}

// x: [B, T, W] -> [B, T, W] (owned)
Tensor ClipTextModel::run_layer(Ctx& sc, const Layer& l, const Tensor& x, LayerSaved* s) const {
  Backend& be = sc.be;
  Tensor n1 = l.ln1(sc, x);
  Tensor a = causal_attention(sc, l.q(sc, n1), l.k(sc, n1), l.v(sc, n1), s);
  Tensor o = l.out(sc, a);
  Tensor h = sc.alloc(x.shape());
  be.binary(Binary::Add, x, o, h);
  Tensor n2 = l.ln2(sc, h);
  Tensor f = l.fc1(sc, n2);  // [B, T, I]
  Tensor g = sc.alloc(f.shape());
  be.unary(cfg_.act == ClipTextConfig::QuickGelu ? Unary::QuickGelu : Unary::GeluErf, f, g);
  if (s) s->x = x, s->n1 = n1, s->a = a, s->h = h, s->n2 = n2, s->f = f, s->g = g;
  Tensor m = l.fc2(sc, g);
  Tensor y = Tensor::empty(x.shape());
  be.binary(Binary::Add, h, m, y);
  return y;
}

ClipTextModel::Output ClipTextModel::forward(Ctx& ctx, const std::vector<std::vector<int>>& ids,
                                             int stop_at_layer, const std::vector<TokenOverride>& overrides) const {
  return run(ctx, ids, stop_at_layer, nullptr, overrides);
}

ClipTextModel::Output ClipTextModel::forward_train(Ctx& ctx, const std::vector<std::vector<int>>& ids,
                                                   int stop_at_layer, Trace& tr) const {
  tr = Trace{};
  tr.out = run(ctx, ids, stop_at_layer, &tr);
  return tr.out;
}

ClipTextModel::Output ClipTextModel::run(Ctx& ctx, const std::vector<std::vector<int>>& ids, int stop_at_layer,
                                         Trace* tr, const std::vector<TokenOverride>& overrides) const {
  DF_CHECK(!layers_.empty(), "clip text encoder: forward before load");
  const int64_t B = int64_t(ids.size()), W = cfg_.width;
  DF_CHECK(B > 0, "clip text encoder: no token rows");
  const int64_t T = int64_t(ids[0].size());
  DF_CHECK(T > 0 && T <= cfg_.max_positions, "clip text encoder: ", T,
           " tokens per row, expected 1 to ", cfg_.max_positions);
  for (int64_t b = 0; b < B; ++b) {
    DF_CHECK(int64_t(ids[size_t(b)].size()) == T, "clip text encoder: row ", b, " has ",
             ids[size_t(b)].size(), " tokens, row 0 has ", T);
    for (int64_t t = 0; t < T; ++t) {
      const int id = ids[size_t(b)][size_t(t)];
      DF_CHECK(id >= 0 && id < cfg_.vocab, "clip text encoder: token id ", id, " (row ", b,
               ", position ", t, ") is outside the vocabulary [0, ", cfg_.vocab, ")");
    }
  }
  const int n = stop_at_layer == 0 ? cfg_.layers : stop_at_layer;
  DF_CHECK(n >= 1 && n <= cfg_.layers, "clip text encoder: stop_at_layer ", stop_at_layer,
           " is outside 1..", cfg_.layers);

  // Embeddings: token row (converted from its stored dtype) + position row.
  Tensor h = Tensor::empty({B, T, W});
  {
    const size_t row_bytes = size_t(W) * dtype_size(tok_emb_.dtype());
    const uint8_t* tok = static_cast<const uint8_t*>(tok_emb_.data());
    const float* pos = pos_emb_.f32();
    float* d = h.f32();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) {
        float* row = d + (b * T + t) * W;
        convert(tok + size_t(ids[size_t(b)][size_t(t)]) * row_bytes, tok_emb_.dtype(), row,
                DType::F32, size_t(W));
        for (int64_t c = 0; c < W; ++c) row[c] += pos[t * W + c];
      }
    for (const TokenOverride& o : overrides) {
      DF_CHECK(o.row >= 0 && o.row < B && o.pos >= 0 && o.pos < T && o.vec, "clip text encoder: token override at (",
               o.row, ", ", o.pos, ") is outside ", B, " rows of ", T, " tokens");
      float* row = d + (o.row * T + o.pos) * W;
      for (int64_t c = 0; c < W; ++c) row[c] = o.vec[c] + pos[o.pos * W + c];
    }
  }

  Output out;
  Arena scratch;
  Ctx sc{ctx.be, scratch, DType::F32, ctx.ws, ctx.grads};
  if (tr) tr->ids = ids;
  if (n == 1) out.penultimate = h;
  for (int i = 0; i < n; ++i) {
    if (tr) tr->inputs.push_back(h);
    h = run_layer(sc, layers_[size_t(i)], h);
    scratch.reset();
    if (i == n - 2) out.penultimate = h;  // never written in place: each layer makes a new tensor
  }
  out.last_hidden = apply_final_norm(ctx, h);
  if (tr) tr->last = h;

  // Pooled: the first eos_token of each row (transformers with eos_token_id 49407; identical to
  // the legacy argmax-of-ids rule whenever 49407 is present, since it is the largest id).
  out.pooled = Tensor::empty({B, W});
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<int>& r = ids[size_t(b)];
    int64_t at = -1, best = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (r[size_t(t)] == cfg_.eos_token) {
        at = t;
        break;
      }
      if (r[size_t(t)] > r[size_t(best)]) best = t;
    }
    if (at < 0) at = best;
    if (tr) tr->pooled_at.push_back(at);
    std::memcpy(out.pooled.f32() + b * W, out.last_hidden.f32() + (b * T + at) * W, size_t(W) * 4);
  }
  if (has_proj_) {
    out.text_embeds = Tensor::empty({B, int64_t(cfg_.projection_dim)});
    ctx.be.linear(out.pooled, *proj_.w, out.text_embeds);
  }
  return out;
}

Tensor ClipTextModel::apply_final_norm(Ctx& ctx, const Tensor& hidden) const {
  DF_CHECK(hidden.rank() >= 1 && hidden.dim(-1) == cfg_.width, "clip text encoder: final norm of ",
           hidden.str(), ", expected [..., ", cfg_.width, "]");
  Tensor y = Tensor::empty(hidden.shape());
  ctx.be.layer_norm(hidden, final_ln_.gamma, final_ln_.beta, final_ln_.eps, y);
  return y;
}

}  // namespace diffuse
