// Prompt conditioning: A1111 prompt weighting, A1111 chunking of long prompts (comma backtracking,
// BREAK), emphasis, and per-family encoding checked against plain encodings and the fixtures.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "pipeline/conditioning.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

const std::string kFix = DIFFUSE_SHARED_DIR "/fixtures";
const std::string kData = DIFFUSE_TEST_DATA;
const std::string kPrompt = "a photograph of an astronaut riding a horse";
const std::string kNegative = "blurry, low quality";

const ClipTokenizer& tok() { return ClipTokenizer::builtin(); }
int eos() { return tok().eos_id(); }
int bang() { return tok().bang_id(); }

struct Expected {
  std::string text;
  double weight;
};

void expect_parse(const std::string& prompt, const std::vector<Expected>& want) {
  std::vector<WeightedText> got = parse_prompt_weights(prompt);
  ASSERT_EQ(got.size(), want.size()) << "prompt: " << prompt;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].text, want[i].text) << "prompt: " << prompt << " run " << i;
    EXPECT_NEAR(got[i].weight, want[i].weight, 1e-6) << "prompt: " << prompt << " run " << i;
  }
}

int id_of(const std::string& word) {
  std::vector<int> t = tok().tokenize(word);
  EXPECT_EQ(t.size(), 1u) << word;
  return t.empty() ? -1 : t[0];
}

std::string repeat(const std::string& w, int n, const std::string& sep = " ") {
  std::string s;
  for (int i = 0; i < n; ++i) s += (i ? sep : "") + w;
  return s;
}

// Content ids of a chunk (between BOS and the first EOS).
std::vector<int> content(const TokenChunk& c) {
  EXPECT_EQ(c.ids.size(), 77u);
  EXPECT_EQ(c.ids[0], tok().bos_id());
  auto end = std::find(c.ids.begin() + 1, c.ids.end(), eos());
  return {c.ids.begin() + 1, end};
}

// ---- tensors ----

std::vector<std::vector<int>> ids_from(const Tensor& t) {
  Tensor f = t.to(DType::F32);
  std::vector<std::vector<int>> ids(size_t(f.dim(0)));
  for (int64_t b = 0; b < f.dim(0); ++b)
    for (int64_t i = 0; i < f.dim(1); ++i) ids[size_t(b)].push_back(int(std::lround(f.f32()[b * f.dim(1) + i])));
  return ids;
}

// Row b of [B, ...] as an owned [1, ...] f32 tensor.
Tensor row(const Tensor& t, int64_t b) {
  std::vector<int64_t> d = t.shape().vec();
  d[0] = 1;
  Tensor r = Tensor::empty(Shape(d));
  r.copy_from(t.to(DType::F32).slice0(b, b + 1));
  return r;
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.defined() && b.defined() && a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape()) << a.str() << " vs " << b.str();
  if (a.shape() != b.shape()) return INFINITY;
  Tensor x = a.to(DType::F32), y = b.to(DType::F32);
  double m = 0;
  for (int64_t i = 0; i < x.numel(); ++i) m = std::max(m, double(std::fabs(x.f32()[i] - y.f32()[i])));
  return m;
}

double max_abs(const Tensor& a) {
  Tensor x = a.to(DType::F32);
  double m = 0;
  for (int64_t i = 0; i < x.numel(); ++i) m = std::max(m, double(std::fabs(x.f32()[i])));
  return m;
}

// fp32 parity with a reference: max|Δ| ≤ 1e-4 · max(1, max|ref|).
void expect_close(const std::string& what, const Tensor& got, const Tensor& ref) {
  ASSERT_TRUE(got.defined()) << what;
  const double d = max_abs_diff(got, ref), r = max_abs(ref);
  std::printf("  %-44s max|d| = %.3g (max|ref| = %.3g)\n", what.c_str(), d, r);
  EXPECT_LE(d, 1e-4 * std::max(1.0, r)) << what;
}

// Tokens [t0, t1) of [1, T, C].
Tensor token_slice(const Tensor& t, int64_t t0, int64_t t1) {
  const int64_t C = t.dim(2);
  Tensor r = Tensor::empty({1, t1 - t0, C});
  std::memcpy(r.f32(), t.f32() + t0 * C, size_t((t1 - t0) * C) * 4);
  return r;
}

Tensor concat_c(const Tensor& a, const Tensor& b) {
  const int64_t T = a.dim(1), Ca = a.dim(2), Cb = b.dim(2);
  Tensor y = Tensor::empty({1, T, Ca + Cb});
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(y.f32() + t * (Ca + Cb), a.f32() + t * Ca, size_t(Ca) * 4);
    std::memcpy(y.f32() + t * (Ca + Cb) + Ca, b.f32() + t * Cb, size_t(Cb) * 4);
  }
  return y;
}

bool all_zero(const Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (t.f32()[i] != 0.0f) return false;
  return t.numel() > 0;
}

struct Loaded {
  std::unique_ptr<Backend> be;
  std::unique_ptr<SDModel> model;
  Arena arena;
  std::unique_ptr<Ctx> ctx;
};

std::unique_ptr<Loaded> load_te(const std::string& path) {
  auto l = std::make_unique<Loaded>();
  l->be = make_cpu_backend(Precision::F32);
  SDLoadOptions o;
  o.unet = o.vae_encoder = o.vae_decoder = false;
  l->model = SDModel::load(path, *l->be, o);
  l->ctx = std::make_unique<Ctx>(Ctx{*l->be, l->arena});
  return l;
}

std::unique_ptr<Loaded>& sd1() {
  static std::unique_ptr<Loaded> l = load_te(kData + "/sd1/model/tiny-sd1.safetensors");
  return l;
}

}  // namespace

// ---- parsing (A1111's documented examples and the rules behind them) ----

TEST(PromptWeights, A1111DocExamples) {
  expect_parse("normal text", {{"normal text", 1.0}});
  expect_parse("an (important) word", {{"an ", 1.0}, {"important", 1.1}, {" word", 1.0}});
  expect_parse("(unbalanced", {{"unbalanced", 1.1}});
  expect_parse("\\(literal\\]", {{"(literal]", 1.0}});
  expect_parse("(unnecessary)(parens)", {{"unnecessaryparens", 1.1}});
  expect_parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
               {{"a ", 1.0},
                {"house", 1.573},
                {" ", 1.1},
                {"on", 1.0},
                {" a ", 1.1},
                {"hill", 0.55},
                {", sun, ", 1.1},
                {"sky", 1.4641},
                {".", 1.1}});
}

TEST(PromptWeights, BracketsAndWeights) {
  expect_parse("(abc)", {{"abc", 1.1}});
  expect_parse("[abc]", {{"abc", 1.0 / 1.1}});
  expect_parse("(abc:3.12)", {{"abc", 3.12}});
  expect_parse("((abc))", {{"abc", 1.21}});
  expect_parse("[[abc]]", {{"abc", 1.0 / 1.21}});
  expect_parse("a ((b:1.5) c)", {{"a ", 1.0}, {"b", 1.65}, {" c", 1.1}});
  expect_parse("(a:-0.5) b", {{"a", -0.5}, {" b", 1.0}});
  expect_parse("(a:.5)(b:2.)", {{"a", 0.5}, {"b", 2.0}});
  expect_parse("[unclosed square", {{"unclosed square", 1.0 / 1.1}});
  expect_parse("((a) b", {{"a", 1.21}, {" b", 1.1}});
  // A weight inside square brackets is not a weight: ':' and the number stay text.
  expect_parse("[a:1.5]", {{"a:1.5", 1.0 / 1.1}});
  expect_parse("a:b", {{"a:b", 1.0}});
}

TEST(PromptWeights, UnmatchedClosersAndEscapes) {
  expect_parse("a) b]", {{"a) b]", 1.0}});
  expect_parse("x:1.2) y", {{"x:1.2) y", 1.0}});
  expect_parse("a \\\\ b", {{"a \\ b", 1.0}});
  expect_parse("a\\b", {{"ab", 1.0}});  // a lone backslash is dropped
  expect_parse("\\(a\\) (b)", {{"(a) ", 1.0}, {"b", 1.1}});
  expect_parse("", {{"", 1.0}});
  expect_parse("()", {{"", 1.0}});
  EXPECT_THROW(parse_prompt_weights("(a:1.2.3)"), Error);
  EXPECT_THROW(parse_prompt_weights("(a:.)"), Error);
}

TEST(PromptWeights, Break) {
  std::vector<WeightedText> r = parse_prompt_weights("a cat BREAK a dog");
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].text, "a cat");
  EXPECT_TRUE(r[1].is_break());
  EXPECT_EQ(r[2].text, "a dog");
  // Only a whole word, and only outside brackets (inside it is multiplied and so stays text).
  expect_parse("BREAKfast", {{"BREAKfast", 1.0}});
  r = parse_prompt_weights("(a BREAK b)");
  ASSERT_EQ(r.size(), 3u);
  EXPECT_FALSE(r[1].is_break());
  EXPECT_NEAR(r[1].weight, -1.1, 1e-6);
  r = parse_prompt_weights("x,BREAK\ny");
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].text, "x,");
  EXPECT_TRUE(r[1].is_break());
  EXPECT_EQ(r[2].text, "y");
}

// ---- chunking ----

TEST(PromptChunks, ShortPromptIsThePlainEncoding) {
  for (const std::string& p : {kPrompt, kNegative, std::string(), std::string("A Cat wearing a TOP HAT!!")}) {
    for (int pad : {eos(), bang()}) {
      std::vector<TokenChunk> c = chunk_prompt(p, pad);
      ASSERT_EQ(c.size(), 1u) << p;
      EXPECT_EQ(c[0].ids, tok().encode_padded(p, pad)) << p << " pad " << pad;
      EXPECT_EQ(c[0].weights, std::vector<float>(77, 1.0f));
    }
  }
}

TEST(PromptChunks, WeightsFollowTheirTokens) {
  std::vector<TokenChunk> c = chunk_prompt("a (red cat:1.5) [dog]", eos());
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(content(c[0]), tok().tokenize("a red cat dog"));
  const std::vector<float> w = {1.0f, 1.0f, 1.5f, 1.5f, float(1 / 1.1), 1.0f, 1.0f};
  for (size_t i = 0; i < w.size(); ++i) EXPECT_FLOAT_EQ(c[0].weights[i], w[i]) << i;
}

TEST(PromptChunks, LongPromptSplitsAt75) {
  const int cat = id_of("cat");
  std::vector<TokenChunk> c = chunk_prompt(repeat("cat", 100), eos());
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(content(c[0]), std::vector<int>(75, cat));
  EXPECT_EQ(c[0].ids[76], eos());
  EXPECT_EQ(content(c[1]), std::vector<int>(25, cat));
  EXPECT_EQ(chunk_prompt(repeat("cat", 75), eos()).size(), 1u);
  EXPECT_EQ(chunk_prompt(repeat("cat", 76), eos()).size(), 2u);
  // "!" pad: BOS, content, EOS, then id 0.
  c = chunk_prompt(repeat("cat", 80), bang());
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[1].ids[6], eos());
  EXPECT_EQ(c[1].ids[7], 0);
  EXPECT_EQ(c[1].ids[76], 0);
  // The fixtures' 100-word prompt.
  std::string words;
  for (int i = 0; i < 100; ++i) words += (i ? " word" : "word") + std::to_string(i);
  c = chunk_prompt(words, eos());
  std::vector<int> all = tok().tokenize(words), joined;
  for (const TokenChunk& ch : c) {
    std::vector<int> part = content(ch);
    EXPECT_LE(part.size(), 75u);
    joined.insert(joined.end(), part.begin(), part.end());
  }
  EXPECT_EQ(joined, all);
  EXPECT_EQ(c.size(), size_t((all.size() + 74) / 75));
  std::printf("  100-word prompt: %zu tokens -> %zu chunks\n", all.size(), c.size());
}

TEST(PromptChunks, CommaBacktracking) {
  const int cat = id_of("cat"), dog = id_of("dog"), comma = id_of(",");
  // 70 cats, a comma, 10 dogs: the chunk fills at 75 with a comma 5 tokens back, so the 4 dogs after
  // the comma move to the next chunk.
  std::vector<TokenChunk> c = chunk_prompt(repeat("cat", 70) + ", " + repeat("dog", 10), eos());
  ASSERT_EQ(c.size(), 2u);
  std::vector<int> want0(70, cat);
  want0.push_back(comma);
  EXPECT_EQ(content(c[0]), want0);
  EXPECT_EQ(content(c[1]), std::vector<int>(10, dog));
  // Weights move with their tokens.
  c = chunk_prompt(repeat("cat", 70) + ", (" + repeat("dog", 10) + ":1.3)", eos());
  ASSERT_EQ(c.size(), 2u);
  EXPECT_FLOAT_EQ(c[1].weights[1], 1.3f);
  EXPECT_FLOAT_EQ(c[1].weights[10], 1.3f);
  EXPECT_FLOAT_EQ(c[1].weights[11], 1.0f);
  // A comma more than 20 tokens back: no backtracking.
  c = chunk_prompt(repeat("cat", 50) + ", " + repeat("dog", 30), eos());
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(content(c[0]).size(), 75u);
  EXPECT_EQ(content(c[1]), std::vector<int>(6, dog));
  // Exactly 20 back still counts.
  c = chunk_prompt(repeat("cat", 55) + ", " + repeat("dog", 30), eos());
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(content(c[0]).size(), 56u);
  EXPECT_EQ(content(c[1]).size(), 30u);
}

TEST(PromptChunks, Break) {
  std::vector<TokenChunk> c = chunk_prompt("a cat BREAK a dog", eos());
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(content(c[0]), tok().tokenize("a cat"));
  EXPECT_EQ(content(c[1]), tok().tokenize("a dog"));
  EXPECT_EQ(chunk_prompt("a cat BREAK", eos()).size(), 1u);  // nothing after: no empty chunk
  c = chunk_prompt("BREAK a cat", eos());
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].ids, empty_chunk(eos()).ids);
  EXPECT_EQ(empty_chunk(eos()).ids, tok().encode_padded("", eos()));
  EXPECT_EQ(empty_chunk(bang()).ids, tok().encode_padded("", bang()));
}

TEST(PromptEmphasis, Formula) {
  Tensor z = Tensor::empty({1, 3, 2});
  const float v[] = {1, 2, 3, 4, 5, 6};
  std::memcpy(z.f32(), v, sizeof v);
  apply_emphasis(z, {1, 2, 1});
  // weighted: 1 2 6 8 5 6 (sum 28), original sum 21 -> scale 0.75
  const float want[] = {0.75f, 1.5f, 4.5f, 6.0f, 3.75f, 4.5f};
  for (int i = 0; i < 6; ++i) EXPECT_FLOAT_EQ(z.f32()[i], want[i]) << i;
  Tensor u = Tensor::empty({1, 3, 2});
  std::memcpy(u.f32(), v, sizeof v);
  apply_emphasis(u, {1, 1, 1});
  EXPECT_EQ(std::memcmp(u.f32(), v, sizeof v), 0);
  EXPECT_THROW(apply_emphasis(u, {1, 1}), Error);
}

// ---- SD 1.x (bundled tiny model) ----

TEST(ConditioningSD1, PlainPromptsEqualDiffusersEncoding) {
  auto& l = sd1();
  const ClipTextModel& te = l->model->te;
  PromptPair p = encode_prompts(*l->ctx, *l->model, kPrompt, kNegative, {});
  Tensor want_c = te.forward(*l->ctx, {tok().encode_padded(kPrompt, eos())}).last_hidden;
  Tensor want_u = te.forward(*l->ctx, {tok().encode_padded(kNegative, eos())}).last_hidden;
  EXPECT_EQ(p.cond.context.shape(), Shape({1, 77, 64}));
  EXPECT_TRUE(bit_equal(p.cond.context, want_c)) << "max|d| " << max_abs_diff(p.cond.context, want_c);
  EXPECT_TRUE(bit_equal(p.uncond.context, want_u)) << "max|d| " << max_abs_diff(p.uncond.context, want_u);
  EXPECT_FALSE(p.cond.pooled.defined());
  // Empty negative: the encoding of "".
  PromptPair e = encode_prompts(*l->ctx, *l->model, kPrompt, "", {});
  EXPECT_TRUE(bit_equal(e.uncond.context, te.forward(*l->ctx, {tok().encode_padded("", eos())}).last_hidden));
  // And against transformers' own numbers.
  const std::string comp = kData + "/sd1/components.safetensors";
  if (fs::exists(comp)) {
    TensorFile ref = load_safetensors(comp);
    auto ids = ids_from(*ref.find("te.input_ids"));
    ASSERT_EQ(ids[0], tok().encode_padded(kPrompt, eos()));
    expect_close("sd1 prompt vs te.last_hidden_state[0]", p.cond.context, row(*ref.find("te.last_hidden_state"), 0));
    expect_close("sd1 \"\" vs te.last_hidden_state[2]", e.uncond.context, row(*ref.find("te.last_hidden_state"), 2));
  }
}

TEST(ConditioningSD1, ClipSkip2MatchesFixture) {
  const std::string pipes = kData + "/sd1/pipelines.safetensors";
  if (!fs::exists(pipes)) GTEST_SKIP() << pipes << " not found";
  auto& l = sd1();
  TensorFile ref = load_safetensors(pipes);
  PromptOptions o;
  o.clip_skip = 2;
  PromptPair p = encode_prompts(*l->ctx, *l->model, kPrompt, kNegative, o);
  expect_close("sd1 clip skip 2 prompt", p.cond.context, *ref.find("clipskip2.prompt_embeds"));
  expect_close("sd1 clip skip 2 negative", p.uncond.context, *ref.find("clipskip2.negative_prompt_embeds"));
  // It is the penultimate state + final norm of a full run.
  const ClipTextModel& te = l->model->te;
  auto full = te.forward(*l->ctx, {tok().encode_padded(kPrompt, eos())});
  EXPECT_LE(max_abs_diff(p.cond.context, te.apply_final_norm(*l->ctx, full.penultimate)), 1e-5);
  EXPECT_GT(max_abs_diff(p.cond.context, full.last_hidden), 1e-3);
  // clip skip 1 is the default; beyond the encoder's depth is an error.
  o.clip_skip = 1;
  EXPECT_TRUE(bit_equal(encode_prompts(*l->ctx, *l->model, kPrompt, kNegative, o).cond.context, full.last_hidden));
  o.clip_skip = te.config().layers + 1;
  EXPECT_THROW(encode_prompts(*l->ctx, *l->model, kPrompt, kNegative, o), Error);
  o.clip_skip = -1;
  EXPECT_THROW(encode_prompts(*l->ctx, *l->model, kPrompt, kNegative, o), Error);
}

TEST(ConditioningSD1, WeightedPromptFollowsA1111Formula) {
  auto& l = sd1();
  const std::string weighted = "a (photograph:1.5) of an [astronaut] riding a horse";
  std::vector<TokenChunk> ch = chunk_prompt(weighted, eos());
  ASSERT_EQ(ch.size(), 1u);
  ASSERT_EQ(ch[0].ids, tok().encode_padded(kPrompt, eos()));
  Tensor got = encode_prompt(*l->ctx, *l->model, weighted, {}).context;
  Tensor plain = l->model->te.forward(*l->ctx, {ch[0].ids}).last_hidden;
  ASSERT_EQ(got.shape(), plain.shape());
  // Direct computation: z·w per token, then × mean(z) / mean(z·w).
  const int64_t T = 77, C = plain.dim(2);
  double s0 = 0, s1 = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      s0 += plain.f32()[t * C + c];
      s1 += double(plain.f32()[t * C + c]) * ch[0].weights[size_t(t)];
    }
  double worst = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      const double want = double(plain.f32()[t * C + c]) * ch[0].weights[size_t(t)] * (s0 / s1);
      worst = std::max(worst, std::fabs(want - got.f32()[t * C + c]));
    }
  std::printf("  weighted prompt vs direct formula: max|d| = %.3g (mean scale %.6f)\n", worst, s0 / s1);
  EXPECT_LE(worst, 1e-5 * std::max(1.0, max_abs(plain)));
  // Direction: "photograph" (token 2) scaled 1.5× relative to unweighted tokens, "astronaut" (5) ÷1.1.
  auto ratio = [&](int64_t t) { return double(got.f32()[t * C]) / plain.f32()[t * C]; };
  EXPECT_NEAR(ratio(2) / ratio(1), 1.5, 1e-5);
  EXPECT_NEAR(ratio(5) / ratio(1), 1 / 1.1, 1e-5);
  EXPECT_NEAR(ratio(30) / ratio(1), 1.0, 1e-5);
  EXPECT_GT(max_abs_diff(got, plain), 1e-3);
}

TEST(ConditioningSD1, LongPromptsAndChunkPadding) {
  auto& l = sd1();
  const ClipTextModel& te = l->model->te;
  const std::string lp = repeat("cat", 70) + ", " + repeat("dog", 10);
  PromptPair p = encode_prompts(*l->ctx, *l->model, lp, kNegative, {});
  ASSERT_EQ(p.cond.context.shape(), Shape({1, 154, 64}));
  ASSERT_EQ(p.uncond.context.shape(), Shape({1, 154, 64}));
  std::vector<TokenChunk> ch = chunk_prompt(lp, eos());
  ASSERT_EQ(ch.size(), 2u);
  for (int k = 0; k < 2; ++k)
    EXPECT_TRUE(bit_equal(token_slice(p.cond.context, 77 * k, 77 * (k + 1)),
                          te.forward(*l->ctx, {ch[size_t(k)].ids}).last_hidden))
        << "chunk " << k;
  // The shorter negative is padded with the encoding of an empty chunk.
  EXPECT_TRUE(bit_equal(token_slice(p.uncond.context, 0, 77),
                        te.forward(*l->ctx, {tok().encode_padded(kNegative, eos())}).last_hidden));
  EXPECT_TRUE(bit_equal(token_slice(p.uncond.context, 77, 154),
                        te.forward(*l->ctx, {empty_chunk(eos()).ids}).last_hidden));
  // And the other way round: a long negative pads the prompt.
  PromptPair q = encode_prompts(*l->ctx, *l->model, kPrompt, lp, {});
  EXPECT_EQ(q.cond.context.shape(), Shape({1, 154, 64}));
  EXPECT_TRUE(bit_equal(token_slice(q.cond.context, 77, 154), token_slice(p.uncond.context, 77, 154)));
  // BREAK gives two chunks.
  EXPECT_EQ(encode_prompt(*l->ctx, *l->model, "a cat BREAK a dog", {}).context.dim(1), 154);
}

// ---- SD 2.x and SDXL (shared fixtures) ----

TEST(ConditioningSD2, PlainPromptEqualsDiffusersEncoding) {
  const std::string model = kFix + "/sd2/model/tiny-sd2.safetensors", comp = kFix + "/sd2/components.safetensors";
  if (!fs::exists(model) || !fs::exists(comp)) GTEST_SKIP() << model << " or " << comp << " not found";
  auto l = load_te(model);
  TensorFile ref = load_safetensors(comp);
  auto ids = ids_from(*ref.find("te.input_ids"));
  // The prompt's text: the ids up to the first EOS (decode would keep the "!" pads).
  const std::string text = tok().decode({ids[0].begin(), std::find(ids[0].begin(), ids[0].end(), eos())});
  ASSERT_EQ(tok().encode_padded(text, bang()), ids[0]) << text;
  PromptPair p = encode_prompts(*l->ctx, *l->model, text, "", {});
  const ClipTextModel& te = l->model->te;
  EXPECT_TRUE(bit_equal(p.cond.context, te.forward(*l->ctx, {ids[0]}).last_hidden));
  EXPECT_TRUE(bit_equal(p.uncond.context, te.forward(*l->ctx, {tok().encode_padded("", bang())}).last_hidden));
  expect_close("sd2 prompt vs te.last_hidden_state[0]", p.cond.context, row(*ref.find("te.last_hidden_state"), 0));
  ASSERT_EQ(ids[2], tok().encode_padded("", bang()));
  expect_close("sd2 \"\" vs te.last_hidden_state[2]", p.uncond.context, row(*ref.find("te.last_hidden_state"), 2));
  EXPECT_FALSE(p.cond.pooled.defined());
}

TEST(ConditioningSDXL, ContextPooledAndZeroNegative) {
  const std::string model = kFix + "/sdxl/model/tiny-sdxl.safetensors", comp = kFix + "/sdxl/components.safetensors";
  if (!fs::exists(model) || !fs::exists(comp)) GTEST_SKIP() << model << " or " << comp << " not found";
  auto l = load_te(model);
  TensorFile ref = load_safetensors(comp);
  auto ids1 = ids_from(*ref.find("te1.input_ids")), ids2 = ids_from(*ref.find("te2.input_ids"));
  const std::vector<float> ones(77, 1.0f);

  // Ids-level: the fixture's own ids.
  Conditioning c = encode_chunks(*l->ctx, *l->model, {{ids1[0], ones, {}}}, {{ids2[0], ones, {}}}, {});
  ASSERT_EQ(c.context.shape(), Shape({1, 77, 128}));
  expect_close("sdxl context vs te1|te2 penultimate[0]", c.context,
               concat_c(row(*ref.find("te1.penultimate_hidden_state"), 0),
                        row(*ref.find("te2.penultimate_hidden_state"), 0)));
  expect_close("sdxl pooled vs te2.text_embeds[0]", c.pooled, row(*ref.find("te2.text_embeds"), 0));
  if (const Tensor* ctx_ref = ref.find("unet.context")) expect_close("sdxl context vs unet.context", c.context, *ctx_ref);

  // Text-level: exactly the plain encodings, and an empty negative gives zeros.
  const std::string text = tok().decode(ids1[0]);
  ASSERT_EQ(tok().encode_padded(text, eos()), ids1[0]) << text;
  ASSERT_EQ(tok().encode_padded(text, bang()), ids2[0]) << text;
  PromptPair p = encode_prompts(*l->ctx, *l->model, text, "", {});
  auto o1 = l->model->te.forward(*l->ctx, {ids1[0]});
  auto o2 = l->model->te2.forward(*l->ctx, {ids2[0]});
  EXPECT_TRUE(bit_equal(p.cond.context, concat_c(o1.penultimate, o2.penultimate)));
  EXPECT_TRUE(bit_equal(p.cond.pooled, o2.text_embeds));
  EXPECT_EQ(p.uncond.context.shape(), Shape({1, 77, 128}));
  EXPECT_EQ(p.uncond.pooled.shape(), Shape({1, 64}));
  EXPECT_TRUE(all_zero(p.uncond.context));
  EXPECT_TRUE(all_zero(p.uncond.pooled));

  // A real negative is encoded; a long prompt keeps the first chunk's pooled output.
  PromptPair n = encode_prompts(*l->ctx, *l->model, text, kNegative, {});
  EXPECT_FALSE(all_zero(n.uncond.context));
  EXPECT_TRUE(bit_equal(n.uncond.pooled,
                        l->model->te2.forward(*l->ctx, {tok().encode_padded(kNegative, bang())}).text_embeds));
  const std::string lp = text + ", " + repeat("cat", 90);
  PromptPair g = encode_prompts(*l->ctx, *l->model, lp, "", {});
  EXPECT_EQ(g.cond.context.shape(), Shape({1, 154, 128}));
  EXPECT_EQ(g.uncond.context.shape(), Shape({1, 154, 128}));
  std::vector<TokenChunk> ch2 = chunk_prompt(lp, bang());
  EXPECT_TRUE(bit_equal(g.cond.pooled, l->model->te2.forward(*l->ctx, {ch2[0].ids}).text_embeds));

  // "!!" is one token for encoder 1 but two "!" pads for encoder 2: the encoder with fewer chunks
  // is padded with empty chunks.
  const std::string bangs = repeat("!!", 40);
  ASSERT_EQ(chunk_prompt(bangs, eos()).size(), 1u);
  ASSERT_EQ(chunk_prompt(bangs, bang()).size(), 2u);
  Conditioning b = encode_prompt(*l->ctx, *l->model, bangs, {});
  ASSERT_EQ(b.context.shape(), Shape({1, 154, 128}));
  Tensor te1_empty = l->model->te.forward(*l->ctx, {empty_chunk(eos()).ids}).penultimate;
  Tensor second = token_slice(b.context, 77, 154);
  double worst = 0;
  for (int64_t t = 0; t < 77; ++t)
    for (int64_t ch = 0; ch < 64; ++ch)
      worst = std::max(worst, double(std::fabs(second.f32()[t * 128 + ch] - te1_empty.f32()[t * 64 + ch])));
  EXPECT_EQ(worst, 0.0);

  // clip skip 2 for SDXL: one layer further back on both encoders (diffusers clip_skip 1).
  PromptOptions o;
  o.clip_skip = 2;
  Conditioning s = encode_prompt(*l->ctx, *l->model, text, o);
  const int L1 = l->model->te.config().layers, L2 = l->model->te2.config().layers;
  EXPECT_TRUE(bit_equal(s.context, concat_c(l->model->te.forward(*l->ctx, {ids1[0]}, L1 - 1).penultimate,
                                            l->model->te2.forward(*l->ctx, {ids2[0]}, L2 - 1).penultimate)));
  EXPECT_TRUE(bit_equal(s.pooled, o2.text_embeds));
}
