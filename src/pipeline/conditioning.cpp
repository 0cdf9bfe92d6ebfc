// Prompt conditioning: weighted, chunked prompts through each family's text encoder(s), A1111
// "Original" emphasis, and the unconditional side of guidance.
#include "pipeline/conditioning.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>
#include <utility>

#include "core/error.h"

namespace diffuse {

void apply_emphasis(Tensor& z, const std::vector<float>& weights) {
  DF_CHECK(z.dtype() == DType::F32 && z.rank() >= 2 && z.dim(-2) == int64_t(weights.size()),
           "prompt emphasis: ", z.str(), " does not match ", weights.size(), " token weights");
  if (std::all_of(weights.begin(), weights.end(), [](float w) { return w == 1.0f; })) return;
  const int64_t T = z.dim(-2), C = z.dim(-1), rows = z.numel() / (T * C);
  float* d = z.f32();
  double before = 0, after = 0;
  for (int64_t i = 0; i < z.numel(); ++i) before += d[i];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t t = 0; t < T; ++t) {
      float* row = d + (r * T + t) * C;
      const float w = weights[size_t(t)];
      for (int64_t c = 0; c < C; ++c) row[c] *= w;
    }
  for (int64_t i = 0; i < z.numel(); ++i) after += d[i];
  // Restore the original mean (A1111: z *= original_mean / new_mean). A zero or non-finite new
  // mean (every weight 0, say) would only spread NaN: leave the weighted values as they are.
  const double scale = before / after;
  if (after == 0 || !std::isfinite(scale)) return;
  const float s = float(scale);
  for (int64_t i = 0; i < z.numel(); ++i) d[i] *= s;
}

namespace {

// Encodes chunks through one model's encoders, caching raw outputs by token ids (the empty chunk
// and a negative equal to the prompt are encoded once).
class Encoder {
 public:
  Encoder(Ctx& ctx, const SDModel& model, const PromptOptions& opts)
      : ctx_(ctx), m_(model), embeddings_(opts.embeddings) {
    DF_CHECK(model.family == Family::SD1 || model.family == Family::SD2 || model.family == Family::SDXL,
             model.path, ": prompt encoding needs an sd1, sd2 or sdxl model, got ", family_name(model.family));
    DF_CHECK(model.family != Family::SDXL || model.has_te2, model.path,
             ": SDXL prompt encoding needs both text encoders, the second is not loaded");
    DF_CHECK(opts.clip_skip >= 0, "clip skip ", opts.clip_skip, " is negative: allowed 0 (default) to ",
             te(first()).config().layers);
    const int k = std::max(opts.clip_skip, 1);
    for (int e = first(); e < encoders(); ++e) {
      const int L = te(e).config().layers;
      DF_CHECK(k <= L, "clip skip ", opts.clip_skip, " is outside 0..", L, " for ", model.path,
               " (its text encoder", e == 1 ? " 2" : "", " has ", L, " layers)");
      stop_[e] = L - k + 1;
    }
  }

  bool xl() const { return m_.family == Family::SDXL; }
  const EmbeddingSet* embeddings() const { return embeddings_; }
  int encoders() const { return xl() ? 2 : 1; }
  // The SDXL refiner has encoder 2 (OpenCLIP bigG) only: its context is that encoder's alone.
  bool refiner() const { return m_.refiner; }
  int first() const { return refiner() ? 1 : 0; }
  const ClipTextModel& te(int e) const { return e == 0 ? m_.te : m_.te2; }

  // The encoder's hidden state for one chunk's ids (and embeddings), before emphasis: [1, 77, C].
  // Shared: do not modify.
  const Tensor& hidden(int e, const TokenChunk& ch) {
    Key key{e, ch.ids, ch.fixes};
    auto it = hidden_.find(key);
    if (it != hidden_.end()) return it->second;
    const int L = te(e).config().layers;
    ClipTextModel::Output out = te(e).forward(ctx_, {ch.ids}, stop_[e] == L ? 0 : stop_[e], overrides(e, ch));
    if (xl() && e == 1 && stop_[e] == L) pooled_.emplace(Key{1, ch.ids, ch.fixes}, out.text_embeds);
    Tensor z = xl() ? out.penultimate : out.last_hidden;
    return hidden_.emplace(std::move(key), z).first->second;
  }

  // SDXL: encoder 2's projected pooled output of a full run on the chunk: [1, P].
  Tensor pooled(const TokenChunk& ch) {
    Key key{1, ch.ids, ch.fixes};
    auto it = pooled_.find(key);
    if (it == pooled_.end()) it = pooled_.emplace(key, te(1).forward(ctx_, {ch.ids}, 0, overrides(1, ch)).text_embeds).first;
    DF_CHECK(it->second.defined(), m_.path, ": SDXL text encoder 2 has no text_projection");
    return it->second;
  }

  // One chunk's weighted output for encoder e: [1, 77, C] owned.
  Tensor weighted(int e, const TokenChunk& ch) {
    DF_CHECK(ch.ids.size() == ch.weights.size(), "prompt chunk: ", ch.ids.size(), " ids but ",
             ch.weights.size(), " weights");
    Tensor z = hidden(e, ch).clone();
    apply_emphasis(z, ch.weights);
    return z;
  }

 private:
  struct Key {
    int e;
    std::vector<int> ids;
    std::vector<EmbeddingFix> fixes;
    bool operator<(const Key& o) const {
      return std::tie(e, ids, fixes) < std::tie(o.e, o.ids, o.fixes);
    }
  };

  // The embeddings' vectors at their chunk positions, for encoder e (checked against its width).
  std::vector<TokenOverride> overrides(int e, const TokenChunk& ch) const {
    std::vector<TokenOverride> o;
    const int64_t W = te(e).config().width;
    for (const EmbeddingFix& f : ch.fixes) {
      const Tensor& v = f.emb->for_encoder(m_.family, e, W);
      for (int64_t j = 0; j < v.dim(0); ++j) {
        DF_ASSERT(f.pos + j < int64_t(ch.ids.size()));
        o.push_back({0, f.pos + j, v.f32() + j * W});
      }
    }
    return o;
  }

  Ctx& ctx_;
  const SDModel& m_;
  const EmbeddingSet* embeddings_;
  int stop_[2] = {0, 0};
  std::map<Key, Tensor> hidden_;
  std::map<Key, Tensor> pooled_;
};

// One side as per-chunk [1, 77, C] tensors (C = both encoders' widths for SDXL) and pooled.
struct Side {
  std::vector<Tensor> chunks;
  Tensor pooled;
};

// [1, T, Ca] and [1, T, Cb] -> [1, T, Ca + Cb]
Tensor concat_channels(const Tensor& a, const Tensor& b) {
  const int64_t T = a.dim(1), Ca = a.dim(2), Cb = b.dim(2);
  DF_ASSERT(b.dim(1) == T);
  Tensor y = Tensor::empty({1, T, Ca + Cb});
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(y.f32() + t * (Ca + Cb), a.f32() + t * Ca, size_t(Ca) * 4);
    std::memcpy(y.f32() + t * (Ca + Cb) + Ca, b.f32() + t * Cb, size_t(Cb) * 4);
  }
  return y;
}

// [1, 77, C] × n -> [1, 77·n, C]
Tensor concat_tokens(const std::vector<Tensor>& parts) {
  DF_ASSERT(!parts.empty());
  int64_t T = 0;
  const int64_t C = parts[0].dim(2);
  for (const Tensor& p : parts) T += p.dim(1);
  Tensor y = Tensor::empty({1, T, C});
  size_t off = 0;
  for (const Tensor& p : parts) {
    std::memcpy(y.f32() + off, p.f32(), p.bytes());
    off += size_t(p.numel());
  }
  return y;
}

Side encode_side(Encoder& enc, const std::vector<TokenChunk>& c1, const std::vector<TokenChunk>& c2,
                 const SDModel& model) {
  Side s;
  if (enc.refiner()) {
    DF_CHECK(!c2.empty(), "prompt encoding: no token chunks");
    for (const TokenChunk& ch : c2) s.chunks.push_back(enc.weighted(1, ch));
    s.pooled = enc.pooled(c2[0]).clone();
    return s;
  }
  DF_CHECK(!c1.empty(), "prompt encoding: no token chunks");
  if (!enc.xl()) {
    for (const TokenChunk& ch : c1) s.chunks.push_back(enc.weighted(0, ch));
    return s;
  }
  DF_CHECK(!c2.empty(), "prompt encoding: SDXL needs token chunks for both text encoders");
  const size_t n = std::max(c1.size(), c2.size());
  const TokenChunk e1 = empty_chunk(pad_token(model.family, 0)), e2 = empty_chunk(pad_token(model.family, 1));
  for (size_t i = 0; i < n; ++i) {
    const Tensor a = enc.weighted(0, i < c1.size() ? c1[i] : e1);
    const Tensor b = enc.weighted(1, i < c2.size() ? c2[i] : e2);
    s.chunks.push_back(concat_channels(a, b));
  }
  s.pooled = enc.pooled(c2[0]).clone();
  return s;
}

Side encode_text(Encoder& enc, const SDModel& model, const std::string& prompt) {
  const std::vector<WeightedText> runs = parse_prompt_weights(prompt);
  const ClipTokenizer& tok = ClipTokenizer::builtin();
  std::vector<TokenChunk> c1 = chunk_weighted(runs, pad_token(model.family, 0), tok, enc.embeddings()), c2;
  if (enc.xl()) c2 = chunk_weighted(runs, pad_token(model.family, 1), tok, enc.embeddings());
  return encode_side(enc, c1, c2, model);
}

// Pads a side to n chunks with the encoding of an empty chunk.
void pad_side(Encoder& enc, const SDModel& model, Side& s, size_t n) {
  if (s.chunks.size() >= n) return;
  const Side empty = encode_side(enc, {empty_chunk(pad_token(model.family, 0))},
                                 {empty_chunk(pad_token(model.family, 1))}, model);
  while (s.chunks.size() < n) s.chunks.push_back(empty.chunks[0]);
}

Conditioning finish(const Side& s) { return {concat_tokens(s.chunks), s.pooled}; }

}  // namespace

Conditioning encode_chunks(Ctx& ctx, const SDModel& model, const std::vector<TokenChunk>& chunks,
                           const std::vector<TokenChunk>& chunks2, const PromptOptions& opts) {
  Encoder enc(ctx, model, opts);
  return finish(encode_side(enc, chunks, chunks2, model));
}

Conditioning encode_prompt(Ctx& ctx, const SDModel& model, const std::string& prompt, const PromptOptions& opts) {
  Encoder enc(ctx, model, opts);
  return finish(encode_text(enc, model, prompt));
}

PromptPair encode_prompts(Ctx& ctx, const SDModel& model, const std::string& prompt, const std::string& negative,
                          const PromptOptions& opts) {
  DF_CHECK((model.refiner || model.te.loaded()) && (!model.has_te2 || model.te2.loaded()), model.path,
           ": the text encoder is not loaded (released after an earlier run, or not loaded at all)");
  Encoder enc(ctx, model, opts);
  Side cond = encode_text(enc, model, prompt);
  const bool zero_uncond = enc.xl() && negative.empty();
  Side uncond;
  if (!zero_uncond) {
    uncond = encode_text(enc, model, negative);
    const size_t n = std::max(cond.chunks.size(), uncond.chunks.size());
    pad_side(enc, model, cond, n);
    pad_side(enc, model, uncond, n);
  } else {
    // SDXL force_zeros_for_empty_prompt: zeros shaped like the prompt's conditioning.
    for (const Tensor& c : cond.chunks) uncond.chunks.push_back(Tensor::zeros(c.shape()));
    uncond.pooled = Tensor::zeros(cond.pooled.shape());
  }
  return {finish(cond), finish(uncond)};
}

}  // namespace diffuse
