// LyCORIS files (models/lora.h, models/lycoris.cpp) against the tiny sd1 model: the test writes
// LoHa, LoHa-Tucker, LoKr (full and decomposed factors, with and without Tucker), LoCon-Tucker,
// DoRA, full-difference and PEFT-with-metadata files in their published key layouts, computes the
// merged weights itself in double precision (its own loops, written from LyCORIS's formulas), and
// compares them with merge_loras(); generating with a LoHa equals generating with a model file
// whose weights the test merged; inconsistent factor shapes, files for another architecture and
// PEFT metadata that disagrees with the tensors are errors naming the file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/lora.h"
#include "models/sd_model.h"
#include "pipeline/generate.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

std::string model_path() {
  for (const std::string& p : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1/model/tiny-sd1.safetensors",
                               std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors"})
    if (fs::exists(p)) return p;
  return {};
}
#define REQUIRE_MODEL() \
  if (model_path().empty()) GTEST_SKIP() << "tiny-sd1.safetensors not found (DIFFUSE_SHARED_DIR/fixtures or DIFFUSE_TEST_DATA)"

fs::path scratch(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("diffuse_test_lycoris_" + std::to_string(::getpid())) / name;
  fs::create_directories(p);
  return p;
}

// A weight of the tiny sd1 model: its diffusers name (what merge_loras() reports), its name in the
// single file, and the kohya key stem a LoRA file gives it.
struct Weight {
  const char* diffusers;
  const char* ldm;
  bool te = false;
  std::string kohya() const {
    std::string m = diffusers;
    m.resize(m.size() - 7);  // ".weight"
    std::replace(m.begin(), m.end(), '.', '_');
    return (te ? "lora_te_" : "lora_unet_") + m;
  }
  std::string peft() const {
    std::string m = diffusers;
    m.resize(m.size() - 7);
    return (te ? "text_encoder." : "unet.") + m;
  }
};
const Weight kToQ{"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                  "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"};            // [32, 32]
const Weight kToK{"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
                  "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"};            // [32, 32]
const Weight kToV{"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight",
                  "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight"};            // [32, 32]
const Weight kCrossK{"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                     "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"};         // [32, 64]
const Weight kFf{"down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                 "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"};          // [256, 32]
const Weight kFf2{"down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
                  "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"};              // [32, 128]
const Weight kProjIn{"down_blocks.0.attentions.0.proj_in.weight",
                     "model.diffusion_model.input_blocks.1.1.proj_in.weight"};                                 // [32, 32, 1, 1]
const Weight kConv1{"down_blocks.0.resnets.0.conv1.weight", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"};
const Weight kConv2{"down_blocks.0.resnets.0.conv2.weight", "model.diffusion_model.input_blocks.1.0.out_layers.3.weight"};
const Weight kDown{"down_blocks.0.downsamplers.0.conv.weight", "model.diffusion_model.input_blocks.3.0.op.weight"};
const Weight kTime{"time_embedding.linear_1.weight", "model.diffusion_model.time_embed.0.weight"};           // [128, 32]
const Weight kTeQ{"text_model.encoder.layers.0.self_attn.q_proj.weight",
                  "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", true};  // [64, 64]
const Weight kTeFc1{"text_model.encoder.layers.0.mlp.fc1.weight",
                    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", true};         // [256, 64]

// Doubles of a tensor (any float type), row-major.
using Vec = std::vector<double>;
Vec dbl(const Tensor& t) {
  Tensor f = t.to(DType::F32);
  return Vec(f.f32(), f.f32() + f.numel());
}

Tensor rnd(const Shape& s, std::mt19937& g, float sd) {
  std::normal_distribution<float> n(0.0f, sd);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
  return t;
}
Tensor positive(const Shape& s, std::mt19937& g) {
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = u(g);
  return t;
}

// a [M, K] · b [K, N] in double.
Vec matmul(const Vec& a, const Vec& b, int64_t M, int64_t K, int64_t N) {
  Vec c(size_t(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += a[size_t(m * K + k)] * b[size_t(k * N + n)];
      c[size_t(m * N + n)] = s;
    }
  return c;
}

// LyCORIS's rebuild_tucker: out[p, q, k] = Σ_i Σ_j t[i, j, k] · wa[i, p] · wb[j, q], t [R1, R2, KK],
// wa [R1, P], wb [R2, Q] -> [P, Q·KK].
Vec tucker(const Vec& t, const Vec& wa, const Vec& wb, int64_t R1, int64_t R2, int64_t KK, int64_t P, int64_t Q) {
  Vec out(size_t(P * Q * KK), 0.0);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t k = 0; k < KK; ++k) {
        double s = 0;
        for (int64_t i = 0; i < R1; ++i)
          for (int64_t j = 0; j < R2; ++j) s += t[size_t((i * R2 + j) * KK + k)] * wa[size_t(i * P + p)] * wb[size_t(j * Q + q)];
        out[size_t((p * Q + q) * KK + k)] = s;
      }
  return out;
}

// torch.kron of A [a, c] (as [a, c, 1, 1] when B is 4-D) and B [b, d, KK]: [a·b, c·d, KK].
Vec kron(const Vec& A, const Vec& B, int64_t a, int64_t c, int64_t b, int64_t d, int64_t KK) {
  Vec out(size_t(a * b * c * d * KK));
  for (int64_t r = 0; r < a * b; ++r)
    for (int64_t s = 0; s < c * d; ++s)
      for (int64_t k = 0; k < KK; ++k)
        out[size_t((r * c * d + s) * KK + k)] = A[size_t((r / b) * c + s / d)] * B[size_t(((r % b) * d + s % d) * KK + k)];
  return out;
}

// DoRA as LyCORIS merges it (apply_weight_decompose) at multiplier 1, and W + M·(that − W) at M:
// V = W + s·Δ; per input channel (LyCORIS dora_scale [1, I, ...], + f32 epsilon) or per output
// channel (PEFT's magnitude, no epsilon).
Vec dora(const Vec& w, const Vec& delta, double s, const Vec& m, bool per_output, double eps, double mult,
         int64_t O, int64_t I, int64_t KK) {
  Vec v(w.size());
  for (size_t i = 0; i < w.size(); ++i) v[i] = w[i] + s * delta[i];
  const int64_t n = per_output ? O : I;
  Vec norm(size_t(n), 0.0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i)
      for (int64_t k = 0; k < KK; ++k) norm[size_t(per_output ? o : i)] += std::pow(v[size_t((o * I + i) * KK + k)], 2);
  Vec out(w.size());
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i)
      for (int64_t k = 0; k < KK; ++k) {
        const size_t x = size_t((o * I + i) * KK + k);
        const int64_t c = per_output ? o : i;
        out[x] = w[x] + mult * (m[size_t(c)] * v[x] / (std::sqrt(norm[size_t(c)]) + eps) - w[x]);
      }
  return out;
}

// One module of a test file: its tensors and the merged weight expected at the file's multiplier.
struct Module {
  Weight w;
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::function<Vec(const Vec& base)> merged;
};

class LycorisTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (model_path().empty()) return;
    be_ = make_cpu_backend(Precision::F32);
    SDLoadOptions lo;
    lo.vae_encoder = lo.vae_decoder = false;
    model_ = SDModel::load(model_path(), *be_, lo);
    file_ = std::make_unique<TensorFile>(load_safetensors(model_path()));
  }
  static void TearDownTestSuite() {
    model_.reset();
    file_.reset();
    be_.reset();
    std::error_code ec;
    fs::remove_all(fs::temp_directory_path() / ("diffuse_test_lycoris_" + std::to_string(::getpid())), ec);
  }
  static Vec base(const Weight& w) {
    const Tensor* t = file_->find(w.ldm);
    EXPECT_NE(t, nullptr) << w.ldm;
    return t ? dbl(*t) : Vec();
  }
  static Shape base_shape(const Weight& w) { return file_->find(w.ldm)->shape(); }

  // Writes `mods` to one file, merges it at `mult` and compares every module with its expected
  // weight; returns the file.
  static LoraFile check(const std::string& name, const std::vector<Module>& mods, float mult,
                        const std::map<std::string, std::string>& metadata = {}) {
    std::vector<std::pair<std::string, Tensor>> all;
    for (const Module& m : mods) all.insert(all.end(), m.tensors.begin(), m.tensors.end());
    const std::string path = (scratch(name) / (name + ".safetensors")).string();
    save_safetensors(path, all, metadata);
    LoraFile f = load_lora(path);
    EXPECT_EQ(f.entries.size(), mods.size()) << name;
    const LoraMerge got = merge_loras(*model_, {{&f, mult}});
    EXPECT_EQ(got.report.matched, int(mods.size())) << name;
    for (const Module& m : mods) {
      SCOPED_TRACE(name + ": " + m.w.diffusers);
      const auto& map = m.w.te ? got.te : got.unet;
      auto it = map.find(m.w.diffusers);
      if (it == map.end()) {
        ADD_FAILURE() << "not merged";
        continue;
      }
      EXPECT_EQ(it->second.shape(), base_shape(m.w));
      const Vec b = base(m.w), want = m.merged(b), have = dbl(it->second);
      EXPECT_EQ(want.size(), have.size());
      if (want.size() != have.size()) continue;
      double worst = 0, change = 0, scale = 1;
      for (size_t i = 0; i < want.size(); ++i) {
        worst = std::max(worst, std::fabs(want[i] - have[i]));
        change = std::max(change, std::fabs(want[i] - b[i]));
        scale = std::max(scale, std::fabs(want[i]));
      }
      std::printf("  %-12s %-62s max|Δ| %.3g  (change %.3g)\n", name.c_str(), m.w.diffusers, worst, change);
      EXPECT_LE(worst, 2e-6 * scale);
      EXPECT_GT(change, 2e-2) << "the module should change the weight measurably";
    }
    return f;
  }

  static inline std::unique_ptr<Backend> be_;
  static inline std::unique_ptr<SDModel> model_;
  static inline std::unique_ptr<TensorFile> file_;
};

// W + mult · scale · Δ.
Vec plus(const Vec& w, const Vec& delta, double k) {
  Vec o(w.size());
  for (size_t i = 0; i < w.size(); ++i) o[i] = w[i] + k * delta[i];
  return o;
}

// The message of the diffuse::Error f throws ("" if it throws none).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    std::printf("  error: %s\n", e.what());
    return e.what();
  }
  return {};
}
// msg is one line that mentions every one of `parts`.
void expect_mentions(const std::string& msg, const std::vector<std::string>& parts) {
  EXPECT_FALSE(msg.empty()) << "no error; expected one mentioning " << parts.front();
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
}

// ---- LoHa ----------------------------------------------------------------------------------------

// ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank; a convolution's w1b/w2b [r, I·kh·kw] (LyCORIS) or
// [r, I, kh, kw].
Module loha(const Weight& w, const Shape& bs, int64_t r, float alpha, bool b4d, double mult, std::mt19937& g) {
  const int64_t O = bs[0], I = bs[1], KK = bs.numel() / (O * I);
  const Shape bshape = b4d ? Shape{r, I, bs[2], bs[3]} : Shape{r, I * KK};
  Tensor a1 = rnd({O, r}, g, 0.5f), b1 = rnd(bshape, g, 0.5f), a2 = rnd({O, r}, g, 0.5f), b2 = rnd(bshape, g, 0.5f);
  Module m{w, {{w.kohya() + ".hada_w1_a", a1}, {w.kohya() + ".hada_w1_b", b1}, {w.kohya() + ".hada_w2_a", a2},
               {w.kohya() + ".hada_w2_b", b2}, {w.kohya() + ".alpha", Tensor::full({}, alpha)}}, {}};
  m.merged = [=](const Vec& base) {
    const Vec p1 = matmul(dbl(a1), dbl(b1), O, r, I * KK), p2 = matmul(dbl(a2), dbl(b2), O, r, I * KK);
    Vec d(p1.size());
    for (size_t i = 0; i < d.size(); ++i) d[i] = p1[i] * p2[i];
    return plus(base, d, mult * alpha / double(r));
  };
  return m;
}

// Tucker: hada_t1/t2 [r, r, kh, kw], hada_w1_a/w2_a [r, O], hada_w1_b/w2_b [r, I].
Module loha_tucker(const Weight& w, const Shape& bs, int64_t r, float alpha, double mult, std::mt19937& g) {
  const int64_t O = bs[0], I = bs[1], KK = bs[2] * bs[3];
  Tensor t1 = rnd({r, r, bs[2], bs[3]}, g, 0.5f), t2 = rnd({r, r, bs[2], bs[3]}, g, 0.5f);
  Tensor a1 = rnd({r, O}, g, 0.5f), b1 = rnd({r, I}, g, 0.5f), a2 = rnd({r, O}, g, 0.5f), b2 = rnd({r, I}, g, 0.5f);
  const std::string k = w.kohya();
  Module m{w, {{k + ".hada_t1", t1}, {k + ".hada_t2", t2}, {k + ".hada_w1_a", a1}, {k + ".hada_w1_b", b1},
               {k + ".hada_w2_a", a2}, {k + ".hada_w2_b", b2}, {k + ".alpha", Tensor::full({}, alpha)}}, {}};
  m.merged = [=](const Vec& base) {
    const Vec p1 = tucker(dbl(t1), dbl(a1), dbl(b1), r, r, KK, O, I), p2 = tucker(dbl(t2), dbl(a2), dbl(b2), r, r, KK, O, I);
    Vec d(p1.size());
    for (size_t i = 0; i < d.size(); ++i) d[i] = p1[i] * p2[i];
    return plus(base, d, mult * alpha / double(r));
  };
  return m;
}

TEST_F(LycorisTest, LoHa) {
  REQUIRE_MODEL();
  std::mt19937 g(1);
  const double mult = 0.7;
  std::vector<Module> mods = {
      loha(kToQ, base_shape(kToQ), 4, 2.0f, false, mult, g),
      loha(kCrossK, base_shape(kCrossK), 8, 8.0f, false, mult, g),
      loha(kProjIn, base_shape(kProjIn), 4, 1.0f, false, mult, g),        // 1×1 convolution
      loha(kConv1, base_shape(kConv1), 4, 3.0f, false, mult, g),          // 3×3: w1b [r, I·9]
      loha(kConv2, base_shape(kConv2), 2, 2.0f, true, mult, g),           // 3×3: w1b [r, I, 3, 3]
      loha_tucker(kDown, base_shape(kDown), 3, 1.5f, mult, g),
      loha(kTeQ, base_shape(kTeQ), 4, 4.0f, false, mult, g),
  };
  LoraFile f = check("loha", mods, float(mult));
  for (const LoraEntry& e : f.entries) EXPECT_EQ(e.kind, LoraKind::LoHa) << e.key;
  EXPECT_FLOAT_EQ(f.entries[0].scale(), 0.5f);
  EXPECT_EQ(f.entries[5].rank(), 3);
  const auto sum = lora_summary(f);
  const std::vector<std::pair<std::string, int>> want = {{"LoHa", 6}, {"LoHa Tucker", 1}, {"unet", 6}, {"text_encoder", 1}};
  EXPECT_EQ(sum, want);
}

// ---- LoKr ----------------------------------------------------------------------------------------

struct LokrSpec {
  int64_t a, c;       // w1 [a, c]
  int64_t r1 = 0;     // > 0: w1 = lokr_w1_a [a, r1] · lokr_w1_b [r1, c]
  int64_t r2 = 0;     // > 0: w2 decomposed with this rank
  bool tucker = false;
  bool w2_4d = false;  // full lokr_w2 [b, d, kh, kw]
};

// ΔW = kron(w1, w2) reshaped to the base; scale alpha / rank only with a decomposed factor.
Module lokr(const Weight& w, const Shape& bs, const LokrSpec& sp, float alpha, double mult, std::mt19937& g) {
  const int64_t O = bs[0], I = bs[1], KK = bs.numel() / (O * I);
  const int64_t kh = bs.rank() == 4 ? bs[2] : 1, kw = bs.rank() == 4 ? bs[3] : 1;
  const int64_t b = O / sp.a, d = I / sp.c;
  const std::string k = w.kohya();
  Module m{w, {{k + ".alpha", Tensor::full({}, alpha)}}, {}};
  Vec w1;
  if (sp.r1) {
    Tensor x = rnd({sp.a, sp.r1}, g, 0.5f), y = rnd({sp.r1, sp.c}, g, 0.5f);
    m.tensors.push_back({k + ".lokr_w1_a", x});
    m.tensors.push_back({k + ".lokr_w1_b", y});
    w1 = matmul(dbl(x), dbl(y), sp.a, sp.r1, sp.c);
  } else {
    Tensor x = rnd({sp.a, sp.c}, g, 0.5f);
    m.tensors.push_back({k + ".lokr_w1", x});
    w1 = dbl(x);
  }
  // w2 as [b, d, KK] for the kron, or as the flat [b, d·KK] LyCORIS multiplies out for 2-D factors.
  Vec w2;
  bool flat = false;
  if (sp.tucker) {
    Tensor t = rnd({sp.r2, sp.r2, kh, kw}, g, 0.5f), x = rnd({sp.r2, b}, g, 0.5f), y = rnd({sp.r2, d}, g, 0.5f);
    m.tensors.push_back({k + ".lokr_t2", t});
    m.tensors.push_back({k + ".lokr_w2_a", x});
    m.tensors.push_back({k + ".lokr_w2_b", y});
    w2 = tucker(dbl(t), dbl(x), dbl(y), sp.r2, sp.r2, KK, b, d);
  } else if (sp.r2) {
    Tensor x = rnd({b, sp.r2}, g, 0.5f), y = rnd({sp.r2, d * KK}, g, 0.5f);
    m.tensors.push_back({k + ".lokr_w2_a", x});
    m.tensors.push_back({k + ".lokr_w2_b", y});
    w2 = matmul(dbl(x), dbl(y), b, sp.r2, d * KK);
    flat = true;
  } else {
    Tensor x = rnd(sp.w2_4d ? Shape{b, d, kh, kw} : Shape{b, d * KK}, g, 0.5f);
    m.tensors.push_back({k + ".lokr_w2", x});
    w2 = dbl(x);
    flat = !sp.w2_4d;
  }
  const int64_t rank = sp.r1 ? sp.r1 : sp.r2;
  const double s = rank ? alpha / double(rank) : 1.0;
  m.merged = [=](const Vec& base) {
    // A 2-D w2 [b, d·KK]: torch.kron of two matrices, then viewed as [O, I, kh, kw].
    const Vec delta = flat ? kron(w1, w2, sp.a, sp.c, b, d * KK, 1) : kron(w1, w2, sp.a, sp.c, b, d, KK);
    return plus(base, delta, mult * s);
  };
  return m;
}

TEST_F(LycorisTest, LoKr) {
  REQUIRE_MODEL();
  std::mt19937 g(2);
  const double mult = 0.9;
  std::vector<Module> mods = {
      lokr(kToQ, base_shape(kToQ), {4, 4}, 4.0f, mult, g),                            // both full: scale 1
      lokr(kToK, base_shape(kToK), {4, 8, 0, 2}, 1.0f, mult, g),                      // w2 = w2_a·w2_b
      lokr(kToV, base_shape(kToV), {8, 4, 2, 2}, 3.0f, mult, g),                      // both decomposed
      lokr(kFf, base_shape(kFf), {16, 4, 0, 3}, 2.0f, mult, g),                       // [256, 32]
      lokr(kConv1, base_shape(kConv1), {4, 4, 0, 2}, 1.0f, mult, g),                  // 3×3, w2_b [r, d·9]
      lokr(kConv2, base_shape(kConv2), {2, 8, 0, 3, true}, 1.5f, mult, g),            // 3×3 Tucker
      lokr(kDown, base_shape(kDown), {4, 2, 0, 0, false, true}, 5.0f, mult, g),       // 3×3, full w2 4-D
      lokr(kProjIn, base_shape(kProjIn), {2, 4}, 1.0f, mult, g),                      // 1×1
      lokr(kTeFc1, base_shape(kTeFc1), {16, 8, 0, 4}, 2.0f, mult, g),
  };
  LoraFile f = check("lokr", mods, float(mult));
  EXPECT_FLOAT_EQ(f.entries[0].scale(), 1.0f);  // alpha 4 ignored without a decomposed factor
  EXPECT_EQ(f.entries[1].rank(), 2);
  EXPECT_FLOAT_EQ(f.entries[1].scale(), 0.5f);
  const auto sum = lora_summary(f);
  const std::vector<std::pair<std::string, int>> want = {{"LoKr", 8}, {"LoKr Tucker", 1}, {"unet", 8}, {"text_encoder", 1}};
  EXPECT_EQ(sum, want);
}

// ---- kohya LoCon with a Tucker core, full differences ---------------------------------------------

TEST_F(LycorisTest, LoConTuckerAndFullDiff) {
  REQUIRE_MODEL();
  std::mt19937 g(3);
  const double mult = 0.6;
  std::vector<Module> mods;
  for (const Weight* w : {&kConv1, &kDown}) {  // down [r, I, 1, 1], lora_mid [r, r, 3, 3], up [O, r, 1, 1]
    const Shape bs = base_shape(*w);
    const int64_t O = bs[0], I = bs[1], r = 4;
    Tensor down = rnd({r, I, 1, 1}, g, 0.4f), mid = rnd({r, r, 3, 3}, g, 0.4f), up = rnd({O, r, 1, 1}, g, 0.4f);
    const float alpha = 2.0f;
    Module m{*w, {{w->kohya() + ".lora_down.weight", down}, {w->kohya() + ".lora_mid.weight", mid},
                  {w->kohya() + ".lora_up.weight", up}, {w->kohya() + ".alpha", Tensor::full({}, alpha)}}, {}};
    m.merged = [=](const Vec& base) {
      const Vec u = dbl(up), dn = dbl(down), md = dbl(mid);
      Vec delta(base.size(), 0.0);
      for (int64_t o = 0; o < O; ++o)
        for (int64_t i = 0; i < I; ++i)
          for (int64_t k = 0; k < 9; ++k)
            for (int64_t n = 0; n < r; ++n)
              for (int64_t q = 0; q < r; ++q)
                delta[size_t((o * I + i) * 9 + k)] += md[size_t((n * r + q) * 9 + k)] * u[size_t(o * r + n)] * dn[size_t(q * I + i)];
      return plus(base, delta, mult * alpha / double(r));
    };
    mods.push_back(m);
  }
  for (const Weight* w : {&kTime, &kConv2}) {  // LyCORIS full: "<module>.diff" (and "diff_b"), scale 1
    const Shape bs = base_shape(*w);
    Tensor diff = rnd(bs, g, 0.1f);
    Module m{*w, {{w->kohya() + ".diff", diff}}, {}};
    if (w == &kTime) m.tensors.push_back({w->kohya() + ".diff_b", rnd({bs[0]}, g, 0.1f)});
    m.merged = [=](const Vec& base) { return plus(base, dbl(diff), mult); };
    mods.push_back(m);
  }
  LoraFile f = check("locon_full", mods, float(mult));
  ASSERT_EQ(f.unknown.size(), 1u);
  EXPECT_NE(f.unknown[0].find("lora_unet_time_embedding_linear_1.diff_b (bias differences are not applied)"),
            std::string::npos) << f.unknown[0];
  const LoraMerge m = merge_loras(*model_, {{&f, 1.0f}});
  ASSERT_EQ(m.report.unmatched.size(), 1u);  // the bias difference is reported
  EXPECT_NE(m.report.summary().find("4 modules merged; 1 key not applied"), std::string::npos) << m.report.summary();
}

// ---- DoRA ----------------------------------------------------------------------------------------

// m (built at multiplier 1) with a LyCORIS dora_scale, [1, I(, 1, 1)] or per output channel [O, 1]:
// the expected weight is DoRA of m's own delta at `mult`.
Module with_dora(Module m, const Shape& bs, bool per_output, double mult, std::mt19937& g) {
  const int64_t O = bs[0], I = bs[1], KK = bs.numel() / (O * I);
  Tensor ds = positive(per_output ? Shape{O, 1} : bs.rank() == 4 ? Shape{1, I, 1, 1} : Shape{1, I}, g);
  m.tensors.push_back({m.w.kohya() + ".dora_scale", ds});
  const auto plain = m.merged;  // W + s·Δ
  m.merged = [=](const Vec& base) {
    const Vec v = plain(base);
    Vec delta(v.size());
    for (size_t i = 0; i < v.size(); ++i) delta[i] = v[i] - base[i];
    return dora(base, delta, 1.0, dbl(ds), per_output, FLT_EPSILON, mult, O, I, KK);
  };
  return m;
}

TEST_F(LycorisTest, DoRA) {
  REQUIRE_MODEL();
  std::mt19937 g(4);
  for (double mult : {1.0, 0.55}) {
    std::vector<Module> mods;
    {  // kohya LoRA + LyCORIS dora_scale [1, I]: per input channel
      const Shape bs = base_shape(kToQ);
      const int64_t O = bs[0], I = bs[1], r = 4;
      Tensor down = rnd({r, I}, g, 0.4f), up = rnd({O, r}, g, 0.4f), ds = positive({1, I}, g);
      const std::string k = kToQ.kohya();
      Module m{kToQ, {{k + ".lora_down.weight", down}, {k + ".lora_up.weight", up}, {k + ".alpha", Tensor::full({}, 2.0f)},
                      {k + ".dora_scale", ds}}, {}};
      m.merged = [=](const Vec& base) {
        return dora(base, matmul(dbl(up), dbl(down), O, r, I), 0.5, dbl(ds), false, FLT_EPSILON, mult, O, I, 1);
      };
      mods.push_back(m);
    }
    // LoHa on a 3×3 convolution + dora_scale [1, I, 1, 1]; LoKr + dora_scale [O, 1]: per output channel.
    mods.push_back(with_dora(loha(kConv1, base_shape(kConv1), 4, 2.0f, false, 1.0, g), base_shape(kConv1), false, mult, g));
    mods.push_back(with_dora(lokr(kFf, base_shape(kFf), {16, 4, 0, 3}, 2.0f, 1.0, g), base_shape(kFf), true, mult, g));
    SCOPED_TRACE(mult);
    LoraFile f = check(mult == 1.0 ? "dora" : "dora_m", mods, float(mult));
    const auto sum = lora_summary(f);
    const std::vector<std::pair<std::string, int>> want = {{"LoRA", 1}, {"LoHa", 1}, {"LoKr", 1}, {"DoRA", 3}, {"unet", 3}};
    EXPECT_EQ(sum, want);
  }
}

// ---- PEFT: lora_alpha from diffusers' lora_adapter_metadata, lora_magnitude_vector ----------------

TEST_F(LycorisTest, PeftAlphaFromMetadata) {
  REQUIRE_MODEL();
  std::mt19937 g(5);
  const double mult = 0.8;
  // unet: lora_alpha 8, r 4, alpha_pattern attn2.to_k -> 2, rank_pattern ff.net.0.proj -> 8;
  // text_encoder: lora_alpha 16, r 4, rsLoRA (16 / √4).
  const std::string meta = R"({
  "text_encoder.lora_alpha": 16, "text_encoder.r": 4, "text_encoder.use_rslora": true,
  "text_encoder.alpha_pattern": {}, "text_encoder.rank_pattern": {},
  "unet.alpha_pattern": {"attn2.to_k": 2}, "unet.lora_alpha": 8, "unet.r": 4,
  "unet.rank_pattern": {"ff.net.0.proj": 8}, "unet.use_dora": true, "unet.use_rslora": false
})";
  struct P {
    const Weight* w;
    int64_t r;
    double scale;
    bool magnitude;
  };
  const P ps[] = {{&kToQ, 4, 2.0, false}, {&kCrossK, 4, 0.5, false}, {&kFf, 8, 1.0, false},
                  {&kProjIn, 4, 2.0, true}, {&kTeQ, 4, 8.0, false}};
  std::vector<Module> mods;
  for (const P& p : ps) {
    const Shape bs = base_shape(*p.w);
    const int64_t O = bs[0], I = bs[1];
    const bool conv = bs.rank() == 4;
    Tensor a = rnd(conv ? Shape{p.r, I, 1, 1} : Shape{p.r, I}, g, 0.3f), b = rnd(conv ? Shape{O, p.r, 1, 1} : Shape{O, p.r}, g, 0.3f);
    Module m{*p.w, {{p.w->peft() + ".lora_A.weight", a}, {p.w->peft() + ".lora_B.weight", b}}, {}};
    const double s = p.scale;
    if (p.magnitude) {  // PEFT's DoRA magnitude on a convolution: [1, O, 1, 1], per output channel
      Tensor mag = positive({1, O, 1, 1}, g);
      m.tensors.push_back({p.w->peft() + ".lora_magnitude_vector", mag});
      m.merged = [=](const Vec& base) {
        return dora(base, matmul(dbl(b), dbl(a), O, p.r, I), s, dbl(mag), true, 0.0, mult, O, I, 1);
      };
    } else {
      m.merged = [=](const Vec& base) { return plus(base, matmul(dbl(b), dbl(a), O, p.r, I), mult * s); };
    }
    mods.push_back(m);
  }
  LoraFile f = check("peft", mods, float(mult), {{"format", "pt"}, {"lora_adapter_metadata", meta}});
  EXPECT_EQ(f.metadata_alphas, 5);
  for (size_t i = 0; i < f.entries.size(); ++i) EXPECT_FLOAT_EQ(f.entries[i].scale(), float(ps[i].scale)) << f.entries[i].key;

  // Without the metadata the same tensors merge at scale 1 (PEFT files carry their scale in B).
  std::vector<std::pair<std::string, Tensor>> all;
  for (const Module& m : mods) all.insert(all.end(), m.tensors.begin(), m.tensors.end());
  const std::string plain = (scratch("peft") / "plain.safetensors").string();
  save_safetensors(plain, all);
  LoraFile p = load_lora(plain);
  EXPECT_EQ(p.metadata_alphas, 0);
  for (const LoraEntry& e : p.entries) EXPECT_FLOAT_EQ(e.scale(), 1.0f) << e.key;

  // Metadata whose rank disagrees with the tensors, or that is not JSON, is an error.
  const std::string bad = (scratch("peft") / "bad-rank.safetensors").string();
  save_safetensors(bad, all, {{"lora_adapter_metadata", R"({"unet.lora_alpha": 8, "unet.r": 16})"}});
  expect_mentions(error_of([&] { load_lora(bad); }),
                  {"bad-rank.safetensors", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "rank 4", "r = 16"});
  const std::string junk = (scratch("peft") / "junk.safetensors").string();
  save_safetensors(junk, all, {{"lora_adapter_metadata", "{not json"}});
  expect_mentions(error_of([&] { load_lora(junk); }), {"junk.safetensors", "lora_adapter_metadata is not JSON"});
}

// ---- End to end: generate with a LoHa = generate with the weights merged by the test ---------------

TEST_F(LycorisTest, GenerateWithLoHaEqualsMergedModel) {
  REQUIRE_MODEL();
  std::mt19937 g(6);
  const double mult = 0.8;
  const std::vector<Module> mods = {
      loha(kToQ, base_shape(kToQ), 4, 2.0f, false, mult, g),   loha(kFf, base_shape(kFf), 4, 4.0f, false, mult, g),
      loha(kConv1, base_shape(kConv1), 4, 2.0f, false, mult, g), loha_tucker(kDown, base_shape(kDown), 3, 3.0f, mult, g),
      loha(kTeQ, base_shape(kTeQ), 4, 4.0f, false, mult, g),   loha(kTeFc1, base_shape(kTeFc1), 4, 4.0f, false, mult, g),
  };
  std::vector<std::pair<std::string, Tensor>> lora;
  for (const Module& m : mods) lora.insert(lora.end(), m.tensors.begin(), m.tensors.end());
  const fs::path dir = scratch("e2e");
  save_safetensors((dir / "loha.safetensors").string(), lora);
  // The model file with the test's merged weights in place of the base ones.
  std::vector<std::pair<std::string, Tensor>> merged;
  for (const TensorEntry& e : file_->tensors) {
    Tensor t = e.tensor;
    for (const Module& m : mods) {
      if (e.name != m.w.ldm) continue;
      const Vec v = m.merged(dbl(e.tensor));
      t = Tensor::empty(e.tensor.shape());
      for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = float(v[size_t(i)]);
    }
    merged.emplace_back(e.name, t);
  }
  save_safetensors((dir / "merged.safetensors").string(), merged);

  GenerateParams p;
  p.prompt = "a photograph of an astronaut riding a horse";
  p.negative = "blurry";
  p.width = p.height = 64;
  p.steps = 4;
  p.cfg = 7.5;
  p.seed = 42;
  p.sampler = "euler";
  auto run = [&](const std::string& path, const LoraFile* f) {
    auto m = SDModel::load(path, *be_);
    if (f) {
      LoraApplyReport r = apply_loras(*m, *be_, {{f, float(mult)}});
      EXPECT_EQ(r.matched, int(mods.size()));
      EXPECT_TRUE(r.unmatched.empty()) << r.summary();
    }
    return generate(*m, *be_, p).at(0).latent;
  };
  const LoraFile f = load_lora((dir / "loha.safetensors").string());
  const Tensor with = run(model_path(), &f), want = run((dir / "merged.safetensors").string(), nullptr),
               none = run(model_path(), nullptr);
  double d = 0, change = 0, big = 1;
  for (int64_t i = 0; i < want.numel(); ++i) {
    d = std::max(d, double(std::fabs(with.f32()[i] - want.f32()[i])));
    change = std::max(change, double(std::fabs(none.f32()[i] - want.f32()[i])));
    big = std::max(big, double(std::fabs(want.f32()[i])));
  }
  std::printf("  LoHa applied vs merged model: latent max|Δ| %.3g (max|latent| %.3g; the LoHa changes it by %.3g)\n", d,
              big, change);
  EXPECT_LE(d, 1e-4 * big);
  EXPECT_GT(change, 1e-2);
}

// ---- Errors --------------------------------------------------------------------------------------

TEST(LycorisFiles, InconsistentFactorsAreErrors) {
  const fs::path d = scratch("inconsistent");
  const std::string k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
  auto write = [&](const std::string& name, const std::vector<std::pair<std::string, Tensor>>& t) {
    const std::string p = (d / (name + ".safetensors")).string();
    save_safetensors(p, t);
    return p;
  };
  auto z = [](const Shape& s) { return Tensor::zeros(s); };
  // LoHa whose inner ranks disagree.
  std::string p = write("loha-rank", {{k + ".hada_w1_a", z({32, 4})}, {k + ".hada_w1_b", z({3, 32})},
                                      {k + ".hada_w2_a", z({32, 4})}, {k + ".hada_w2_b", z({4, 32})}});
  expect_mentions(error_of([&] { load_lora(p); }), {"loha-rank.safetensors", k, "hada_w1_a [32, 4]", "hada_w1_b [3, 32]", "inconsistent"});
  // LoHa Tucker with one core.
  p = write("loha-t1", {{k + ".hada_w1_a", z({4, 32})}, {k + ".hada_w1_b", z({4, 32})}, {k + ".hada_w2_a", z({4, 32})},
                        {k + ".hada_w2_b", z({4, 32})}, {k + ".hada_t1", z({4, 4, 3, 3})}});
  expect_mentions(error_of([&] { load_lora(p); }), {"loha-t1.safetensors", k, "hada_t1 and hada_t2"});
  // LoKr with a full and a decomposed w1.
  p = write("lokr-both", {{k + ".lokr_w1", z({4, 4})}, {k + ".lokr_w1_a", z({4, 2})}, {k + ".lokr_w1_b", z({2, 4})},
                          {k + ".lokr_w2", z({8, 8})}});
  expect_mentions(error_of([&] { load_lora(p); }), {"lokr-both.safetensors", k, "both a full and a decomposed factor"});
  // LoKr Tucker whose core does not match its factors.
  p = write("lokr-t2", {{k + ".lokr_w1", z({4, 4})}, {k + ".lokr_t2", z({3, 3, 3, 3})}, {k + ".lokr_w2_a", z({4, 8})},
                        {k + ".lokr_w2_b", z({4, 8})}});
  expect_mentions(error_of([&] { load_lora(p); }), {"lokr-t2.safetensors", k, "lokr_t2 [3, 3, 3, 3]", "inconsistent"});
  // LoCon Tucker with a core of the wrong rank.
  p = write("mid", {{k + ".lora_down.weight", z({4, 32, 1, 1})}, {k + ".lora_mid.weight", z({4, 2, 3, 3})},
                    {k + ".lora_up.weight", z({32, 4, 1, 1})}});
  expect_mentions(error_of([&] { load_lora(p); }), {"mid.safetensors", k, "mid [4, 2, 3, 3]", "LoCon Tucker"});
  // One module with LoRA and LoHa tensors.
  p = write("mixed", {{k + ".lora_down.weight", z({4, 32})}, {k + ".lora_up.weight", z({32, 4})}, {k + ".hada_w1_a", z({32, 4})}});
  expect_mentions(error_of([&] { load_lora(p); }), {"mixed.safetensors", k, "mixes", "hada_w1_a"});
  // An incomplete LoHa is reported, not applied; with nothing else in the file, that is an error.
  p = write("partial", {{k + ".hada_w1_a", z({32, 4})}, {k + ".hada_w1_b", z({4, 32})}, {k + ".alpha", Tensor::full({}, 1.0f)}});
  expect_mentions(error_of([&] { load_lora(p); }), {"partial.safetensors", "no LoRA tensors", "incomplete LoHa: no hada_w2_a"});
}

TEST_F(LycorisTest, WrongArchitectureIsAnError) {
  REQUIRE_MODEL();
  const fs::path d = scratch("misfit");
  const std::string q = kToQ.kohya(), c = kConv1.kohya();
  auto z = [](const Shape& s) { return Tensor::full(s, 0.01f); };
  struct Case {
    const char* name;
    std::vector<std::pair<std::string, Tensor>> t;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"loha48", {{q + ".hada_w1_a", z({48, 4})}, {q + ".hada_w1_b", z({4, 48})}, {q + ".hada_w2_a", z({48, 4})},
                  {q + ".hada_w2_b", z({4, 48})}},
       {"loha48.safetensors", q, "hada_w1_a [48, 4]", "do not fit unet weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q [32, 32]", "LoHa"}},
      {"lokr", {{q + ".lokr_w1", z({4, 4})}, {q + ".lokr_w2", z({8, 16})}},
       {"lokr.safetensors", q, "lokr_w2 [8, 16]", "[32, 32]", "LoKr for another model architecture"}},
      {"loha-conv", {{c + ".hada_w1_a", z({32, 4})}, {c + ".hada_w1_b", z({4, 32})}, {c + ".hada_w2_a", z({32, 4})},
                     {c + ".hada_w2_b", z({4, 32})}},  // a linear's factors on a 3×3 convolution
       {"loha-conv.safetensors", c, "[32, 32, 3, 3]"}},
      {"dora", {{q + ".lora_down.weight", z({4, 32})}, {q + ".lora_up.weight", z({32, 4})}, {q + ".dora_scale", z({1, 48})}},
       {"dora.safetensors", q, "dora_scale [1, 48]", "[32, 32]"}},
      {"diff", {{q + ".diff", z({32, 64})}}, {"diff.safetensors", q, "diff [32, 64]", "[32, 32]", "full difference"}},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const std::string p = (d / (std::string(k.name) + ".safetensors")).string();
    save_safetensors(p, k.t);
    LoraFile f = load_lora(p);
    expect_mentions(error_of([&] { merge_loras(*model_, {{&f, 1.0f}}); }), k.parts);
  }
}

}  // namespace
}  // namespace diffuse
