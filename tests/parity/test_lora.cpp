// LoRA (models/lora.h):
//  - end to end against diffusers: the tiny sd1 model with sd1-lora's kohya and PEFT files merged at
//    multiplier 0.8, Euler, 5 steps (lora.safetensors: lora.mult0.8.latent);
//  - both formats give the same merged weights; kohya ldm-style module names (SDXL files) and LoCon
//    on 3×3 convolutions resolve to the right weights with the right values;
//  - switching sets in one process (A -> none -> B) equals fresh loads bit for bit;
//  - unknown and unmatched keys are reported, a file that matches nothing or does not fit is an error;
//  - A1111 prompt tags, LoRA paths, and the A1111 LoRA hash.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/layout.h"
#include "backend/backend.h"
#include "core/arena.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/lora.h"
#include "models/sd_model.h"
#include "nn/layers.h"
#include "pipeline/conditioning.h"
#include "pipeline/denoise.h"
#include "pipeline/rng.h"
#include "pipeline/scheduler.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

// The shared fixture if present, else the bundled copy; empty if neither exists.
std::string data_path(const std::string& shared_rel, const std::string& bundled_rel) {
  std::string p = std::string(DIFFUSE_SHARED_DIR) + "/fixtures/" + shared_rel;
  if (fs::exists(p)) return p;
  p = std::string(DIFFUSE_TEST_DATA) + "/" + bundled_rel;
  return fs::exists(p) ? p : std::string();
}

std::string model_path() { return data_path("sd1/model/tiny-sd1.safetensors", "sd1/model/tiny-sd1.safetensors"); }
std::string kohya_path() { return data_path("sd1-lora/model/lora-kohya.safetensors", "sd1-lora/lora-kohya.safetensors"); }
std::string peft_path() { return data_path("sd1-lora/model/lora-peft.safetensors", "sd1-lora/lora-peft.safetensors"); }
std::string ref_path() { return data_path("sd1-lora/lora.safetensors", "sd1-lora/lora.safetensors"); }

bool have_fixtures() {
  return !model_path().empty() && !kohya_path().empty() && !peft_path().empty() && !ref_path().empty();
}
#define REQUIRE_FIXTURES()                                                                              \
  if (!have_fixtures())                                                                                 \
  GTEST_SKIP() << "sd1 / sd1-lora fixtures not found (tiny-sd1.safetensors, lora-kohya/peft.safetensors, " \
                  "lora.safetensors under DIFFUSE_SHARED_DIR/fixtures or DIFFUSE_TEST_DATA)"

std::unique_ptr<SDModel> load_model(Backend& be) {
  SDLoadOptions lo;
  lo.vae_encoder = lo.vae_decoder = false;
  return SDModel::load(model_path(), be, lo);
}


// The fixtures' txt2img: prompt / negative, 64×64, Euler, 5 steps, guidance 7.5, torch CPU seed 42.
// Returns the final latent NCHW [1, 4, 8, 8].
Tensor txt2img(const SDModel& m, Backend& be) {
  Arena arena;
  Ctx ctx{be, arena};
  PromptPair pp = encode_prompts(ctx, m, "a photograph of an astronaut riding a horse", "blurry, low quality", {});
  auto sched = make_scheduler("euler", "default", Prediction::Epsilon);
  sched->set_timesteps(5);
  auto rng = make_cpu_rng(42);
  const Shape nchw{1, 4, 8, 8};
  Tensor x = nchw_to_nhwc(rng->randn(nchw));
  const float sigma = float(sched->init_noise_sigma());
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] *= sigma;
  Guidance g;
  g.cond = pp.cond.context;
  g.uncond = pp.uncond.context;
  g.cfg = 7.5f;
  NoiseFn noise = [&rng, nchw] { return nchw_to_nhwc(rng->randn(nchw)); };
  return nhwc_to_nchw(denoise(ctx, m.unet, *sched, x, g, noise));
}

double max_abs(const Tensor& t) {
  Tensor f = t.to(DType::F32);
  double m = 0;
  for (int64_t i = 0; i < f.numel(); ++i) m = std::max(m, double(std::fabs(f.f32()[i])));
  return m;
}
double max_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  Tensor fa = a.to(DType::F32), fb = b.to(DType::F32);
  double m = 0;
  for (int64_t i = 0; i < fa.numel(); ++i) m = std::max(m, double(std::fabs(fa.f32()[i] - fb.f32()[i])));
  return m;
}
bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

// f throws a one-line diffuse::Error containing every string of `parts`.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << parts.front() << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing '" << p << "' in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    std::printf("  error: %s\n", msg.c_str());
  }
}

// A scratch folder for files written by a test.
fs::path scratch(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("diffuse_test_lora_" + std::to_string(::getpid())) / name;
  fs::create_directories(p);
  return p;
}

class LoraTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!have_fixtures()) return;
    be_ = make_cpu_backend(Precision::F32);
    kohya_ = std::make_unique<LoraFile>(load_lora(kohya_path()));
    peft_ = std::make_unique<LoraFile>(load_lora(peft_path()));
    ref_ = std::make_unique<TensorFile>(load_safetensors(ref_path()));
  }
  static void TearDownTestSuite() {
    kohya_.reset();
    peft_.reset();
    ref_.reset();
    be_.reset();
    std::error_code ec;
    fs::remove_all(fs::temp_directory_path() / ("diffuse_test_lora_" + std::to_string(::getpid())), ec);
  }
  static inline std::unique_ptr<Backend> be_;
  static inline std::unique_ptr<LoraFile> kohya_, peft_;
  static inline std::unique_ptr<TensorFile> ref_;
};

// ---- Reading ------------------------------------------------------------------------------------

TEST_F(LoraTest, ReadsBothFormats) {
  REQUIRE_FIXTURES();
  // 3 layers × 6 text-encoder projections + 16 UNet transformers × (8 attention + 2 ff + 2 proj) = 210.
  EXPECT_EQ(kohya_->entries.size(), 210u);
  EXPECT_EQ(peft_->entries.size(), 210u);
  EXPECT_TRUE(kohya_->unknown.empty());
  EXPECT_TRUE(peft_->unknown.empty());
  EXPECT_EQ(kohya_->name, "lora-kohya");
  int te = 0, conv = 0;
  for (const LoraEntry& e : kohya_->entries) {
    EXPECT_TRUE(e.underscored);
    EXPECT_TRUE(e.has_alpha);
    EXPECT_EQ(e.rank(), 4);
    EXPECT_FLOAT_EQ(e.scale(), 0.5f);  // alpha 2 / rank 4
    te += e.target == LoraTarget::TextEncoder;
    conv += e.down.rank() == 4;
  }
  EXPECT_EQ(te, 18);
  EXPECT_EQ(conv, 32);  // proj_in / proj_out of SD 1.x are 1×1 convolutions
  for (const LoraEntry& e : peft_->entries) {
    EXPECT_FALSE(e.underscored);
    EXPECT_FALSE(e.has_alpha);
    EXPECT_FLOAT_EQ(e.scale(), 1.0f);
  }
  const LoraEntry& k0 = kohya_->entries[0];
  EXPECT_EQ(k0.key, "lora_te_text_model_encoder_layers_0_mlp_fc1");
  EXPECT_EQ(k0.module, "text_model_encoder_layers_0_mlp_fc1");
  const LoraEntry& p0 = peft_->entries[0];
  EXPECT_EQ(p0.target, LoraTarget::TextEncoder);
  EXPECT_EQ(p0.module, "text_model.encoder.layers.0.mlp.fc1");
}

TEST_F(LoraTest, ReadErrors) {
  fs::path d = scratch("read_errors");
  // No LoRA tensors at all.
  save_safetensors((d / "none.safetensors").string(), {{"foo.weight", Tensor::zeros({2, 2})}});
  expect_error([&] { load_lora((d / "none.safetensors").string()); }, {"none.safetensors", "no LoRA tensors", "foo.weight"});
  // A pair whose ranks disagree.
  save_safetensors((d / "bad.safetensors").string(),
                   {{"lora_unet_x.lora_down.weight", Tensor::zeros({4, 8})}, {"lora_unet_x.lora_up.weight", Tensor::zeros({8, 3})}});
  expect_error([&] { load_lora((d / "bad.safetensors").string()); }, {"bad.safetensors", "lora_unet_x", "[4, 8]", "[8, 3]"});
  expect_error([&] { load_lora((d / "absent.safetensors").string()); }, {"absent.safetensors"});
}

// ---- End to end against diffusers ---------------------------------------------------------------

TEST_F(LoraTest, MatchesDiffusersKohyaAndPeft) {
  REQUIRE_FIXTURES();
  const Tensor* want = ref_->find("lora.mult0.8.latent");
  ASSERT_NE(want, nullptr);
  const double max_ref = max_abs(*want), bound = 1e-3 * std::max(1.0, max_ref);
  auto base = load_model(*be_);
  const double base_d = max_diff(txt2img(*base, *be_), *want);
  for (const LoraFile* f : {kohya_.get(), peft_.get()}) {
    auto m = load_model(*be_);
    LoraApplyReport r = apply_loras(*m, *be_, {{f, 0.8f}});
    EXPECT_EQ(r.matched, 210) << f->name;
    EXPECT_TRUE(r.unmatched.empty()) << r.summary();
    const double d = max_diff(txt2img(*m, *be_), *want);
    std::printf("  %-11s lora.mult0.8 max|Δ| %.3g  (max|ref| %.3g, bound %.3g; without the LoRA %.3g)\n",
                f->name.c_str(), d, max_ref, bound, base_d);
    EXPECT_LE(d, bound) << f->name;
  }
  EXPECT_GT(base_d, 100 * bound) << "the LoRA should change the result measurably";
}

TEST_F(LoraTest, BothFormatsMergeTheSameWeights) {
  REQUIRE_FIXTURES();
  auto m = load_model(*be_);
  LoraMerge a = merge_loras(*m, {{kohya_.get(), 0.8f}});
  LoraMerge b = merge_loras(*m, {{peft_.get(), 0.8f}});
  EXPECT_EQ(a.report.matched, 210);
  EXPECT_EQ(a.unet.size(), 192u);
  EXPECT_EQ(a.te.size(), 18u);
  EXPECT_TRUE(a.te2.empty());
  double worst = 0;
  for (auto* pair : {&a.unet, &a.te}) {
    const auto& other = pair == &a.unet ? b.unet : b.te;
    ASSERT_EQ(pair->size(), other.size());
    for (const auto& [name, t] : *pair) {
      auto it = other.find(name);
      ASSERT_NE(it, other.end()) << name;
      EXPECT_EQ(t.shape(), it->second.shape()) << name;
      const double d = max_diff(t, it->second), rel = d / std::max(1e-30, max_abs(t));
      worst = std::max(worst, rel);
      EXPECT_LE(rel, 1e-6) << name;
    }
  }
  EXPECT_TRUE(a.unet.count("down_blocks.0.attentions.0.proj_in.weight"));
  EXPECT_EQ(a.unet.at("down_blocks.0.attentions.0.proj_in.weight").rank(), 4);  // 1×1 conv keeps its shape
  std::printf("  kohya vs PEFT merged weights: max relative difference %.3g\n", worst);
}

// The same LoRA on the same model stored as a diffusers folder and as a .ckpt merges to exactly the
// same weights (names resolve against each layout's converted names).
TEST_F(LoraTest, SameMergeForEveryModelLayout) {
  REQUIRE_FIXTURES();
  const std::string dir = std::string(DIFFUSE_SHARED_DIR) + "/fixtures/sd1/model/";
  if (!fs::exists(dir + "diffusers") || !fs::exists(dir + "tiny-sd1.ckpt"))
    GTEST_SKIP() << "the sd1 diffusers folder / .ckpt are only in the shared fixtures";
  auto m = load_model(*be_);
  const LoraMerge want = merge_loras(*m, {{kohya_.get(), 0.8f}, {peft_.get(), 0.25f}});
  for (const char* other : {"diffusers", "tiny-sd1.ckpt"}) {
    SCOPED_TRACE(other);
    SDLoadOptions lo;
    lo.vae_encoder = lo.vae_decoder = false;
    auto o = SDModel::load(dir + other, *be_, lo);
    const LoraMerge got = merge_loras(*o, {{kohya_.get(), 0.8f}, {peft_.get(), 0.25f}});
    EXPECT_EQ(got.report.matched, 420);
    for (auto [a, b] : {std::pair{&want.unet, &got.unet}, std::pair{&want.te, &got.te}}) {
      ASSERT_EQ(a->size(), b->size());
      for (const auto& [name, t] : *a) {
        auto it = b->find(name);
        ASSERT_NE(it, b->end()) << name;
        EXPECT_TRUE(bit_equal(t, it->second)) << name;
      }
    }
  }
}

// ---- Switching sets -----------------------------------------------------------------------------

TEST_F(LoraTest, SwitchingEqualsFreshLoadsBitForBit) {
  REQUIRE_FIXTURES();
  const std::vector<std::pair<const LoraFile*, float>> A = {{kohya_.get(), 0.8f}};
  const std::vector<std::pair<const LoraFile*, float>> B = {{peft_.get(), -0.5f}, {kohya_.get(), 0.3f}};
  auto fresh = [&](const std::vector<std::pair<const LoraFile*, float>>& set) {
    auto m = load_model(*be_);
    if (!set.empty()) apply_loras(*m, *be_, set);
    return txt2img(*m, *be_);
  };
  const Tensor fa = fresh(A), fn = fresh({}), fb = fresh(B);
  auto m = load_model(*be_);
  apply_loras(*m, *be_, A);
  EXPECT_TRUE(m->lora_merged.unet && m->lora_merged.te);
  const Tensor sa = txt2img(*m, *be_);
  apply_loras(*m, *be_, {});
  EXPECT_FALSE(m->lora_merged.unet || m->lora_merged.te);
  const Tensor sn = txt2img(*m, *be_);
  apply_loras(*m, *be_, B);
  const Tensor sb = txt2img(*m, *be_);
  apply_loras(*m, *be_, A);  // and back again
  const Tensor sa2 = txt2img(*m, *be_);
  EXPECT_TRUE(bit_equal(sa, fa)) << "A: max|Δ| " << max_diff(sa, fa);
  EXPECT_TRUE(bit_equal(sn, fn)) << "none: max|Δ| " << max_diff(sn, fn);
  EXPECT_TRUE(bit_equal(sb, fb)) << "B: max|Δ| " << max_diff(sb, fb);
  EXPECT_TRUE(bit_equal(sa2, fa)) << "A again: max|Δ| " << max_diff(sa2, fa);
  EXPECT_GT(max_diff(fa, fb), 1e-2);
  EXPECT_GT(max_diff(fa, fn), 1e-2);
  std::printf("  A -> none -> B -> A in one process: bit-identical to fresh loads (|A - B| %.3g, |A - none| %.3g)\n",
              max_diff(fa, fb), max_diff(fa, fn));
}

// ---- Name forms: kohya ldm-style names, LoCon on 3×3 convolutions ----------------------------------

// kohya's ldm module name for a diffusers one of the tiny sd1 UNet (2 resnets per level).
std::string to_ldm(const std::string& mod) {
  int a = 0, b = 0;
  char rest[256];
  if (std::sscanf(mod.c_str(), "down_blocks_%d_attentions_%d_%255s", &a, &b, rest) == 3)
    return "input_blocks_" + std::to_string(1 + a * 3 + b) + "_1_" + rest;
  if (std::sscanf(mod.c_str(), "up_blocks_%d_attentions_%d_%255s", &a, &b, rest) == 3)
    return "output_blocks_" + std::to_string(a * 3 + b) + "_1_" + rest;
  if (std::sscanf(mod.c_str(), "mid_block_attentions_0_%255s", rest) == 1) return std::string("middle_block_1_") + rest;
  return {};
}

Tensor random_tensor(const Shape& s, std::mt19937& g, float scale) {
  std::normal_distribution<float> n(0.0f, scale);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
  return t;
}

TEST_F(LoraTest, LdmNamesAndLoConResolve) {
  REQUIRE_FIXTURES();
  auto m = load_model(*be_);
  // The kohya file's UNet modules renamed to ldm form (as kohya's SDXL files are written).
  std::vector<std::pair<std::string, Tensor>> tensors;
  const TensorFile src = load_safetensors(kohya_path());
  int renamed = 0;
  for (const TensorEntry& e : src.tensors) {
    std::string name = e.name;
    const std::string pre = "lora_unet_";
    if (name.rfind(pre, 0) == 0) {
      size_t dot = name.find('.');
      std::string ldm = to_ldm(name.substr(pre.size(), dot - pre.size()));
      ASSERT_FALSE(ldm.empty()) << name;
      name = pre + ldm + name.substr(dot);
      ++renamed;
    }
    tensors.emplace_back(name, e.tensor);
  }
  EXPECT_EQ(renamed, 192 * 3);
  // LoCon: down_blocks.0.resnets.0.conv1 (3×3, ldm input_blocks.1.0.in_layers.2), the first
  // downsampler (input_blocks.3.0.op) and the time embedding's first linear (time_embed.0).
  std::mt19937 g(7);
  struct Extra {
    const char* key;
    const char* weight;
    Shape down, up;
    float alpha;
  };
  const Extra extras[] = {
      {"lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1.weight", {8, 32, 3, 3}, {32, 8, 1, 1}, 4},
      {"lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv.weight", {2, 32, 3, 3}, {32, 2, 1, 1}, 1},
      {"lora_unet_time_embed_0", "time_embedding.linear_1.weight", {4, 32}, {128, 4}, 8},
  };
  for (const Extra& x : extras) {
    tensors.emplace_back(std::string(x.key) + ".lora_down.weight", random_tensor(x.down, g, 0.3f));
    tensors.emplace_back(std::string(x.key) + ".lora_up.weight", random_tensor(x.up, g, 0.3f));
    tensors.emplace_back(std::string(x.key) + ".alpha", Tensor::full({}, x.alpha));
  }
  const fs::path p = scratch("ldm") / "ldm-names.safetensors";
  save_safetensors(p.string(), tensors);
  LoraFile ldm = load_lora(p.string());
  LoraMerge got = merge_loras(*m, {{&ldm, 0.7f}});
  LoraMerge want = merge_loras(*m, {{kohya_.get(), 0.7f}});
  EXPECT_EQ(got.report.matched, 213);
  EXPECT_TRUE(got.report.unmatched.empty()) << got.report.summary();
  for (const auto& [name, t] : want.unet) {
    auto it = got.unet.find(name);
    ASSERT_NE(it, got.unet.end()) << name;
    EXPECT_TRUE(bit_equal(t, it->second)) << name;
  }
  // The extras, against W + 0.7 · alpha / rank · up·down computed here in double.
  const TensorFile model_file = load_safetensors(model_path());
  const std::map<std::string, std::string> ldm_of = {
      {"down_blocks.0.resnets.0.conv1.weight", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"},
      {"down_blocks.0.downsamplers.0.conv.weight", "model.diffusion_model.input_blocks.3.0.op.weight"},
      {"time_embedding.linear_1.weight", "model.diffusion_model.time_embed.0.weight"}};
  for (size_t k = 0; k < 3; ++k) {
    const Extra& x = extras[k];
    SCOPED_TRACE(x.key);
    auto it = got.unet.find(x.weight);
    ASSERT_NE(it, got.unet.end());
    const Tensor* base = model_file.find(ldm_of.at(x.weight));
    ASSERT_NE(base, nullptr);
    ASSERT_EQ(it->second.shape(), base->shape());
    const Tensor w = base->to(DType::F32);
    auto find = [&](const std::string& n) -> const Tensor& {
      return std::find_if(tensors.begin(), tensors.end(), [&](const auto& e) { return e.first == n; })->second;
    };
    const Tensor& d = find(std::string(x.key) + ".lora_down.weight");
    const Tensor& u = find(std::string(x.key) + ".lora_up.weight");
    const int64_t O = w.dim(0), K = w.numel() / O, r = d.dim(0);
    const double s = 0.7 * x.alpha / double(r);
    double worst = 0, biggest = 0;
    for (int64_t o = 0; o < O; ++o)
      for (int64_t c = 0; c < K; ++c) {
        double acc = 0;
        for (int64_t j = 0; j < r; ++j) acc += double(u.f32()[o * r + j]) * double(d.f32()[j * K + c]);
        const double want_v = double(w.f32()[o * K + c]) + s * acc;
        worst = std::max(worst, std::fabs(want_v - double(it->second.f32()[o * K + c])));
        biggest = std::max(biggest, std::fabs(s * acc));
      }
    EXPECT_LE(worst, 1e-5);
    EXPECT_GT(biggest, 1e-2);  // the delta is not negligible
  }
}

// ---- Reporting ----------------------------------------------------------------------------------

TEST_F(LoraTest, UnmatchedKeysAreReported) {
  REQUIRE_FIXTURES();
  auto m = load_model(*be_);
  const fs::path d = scratch("report");
  const Tensor down = Tensor::full({4, 32}, 0.01f), up = Tensor::full({32, 4}, 0.01f);
  save_safetensors((d / "mixed.safetensors").string(),
                   {{"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", down},
                    {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", up},
                    {"lora_unet_down_blocks_7_attentions_0_proj_zz.lora_down.weight", down},
                    {"lora_unet_down_blocks_7_attentions_0_proj_zz.lora_up.weight", up},
                    {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", Tensor::full({4, 64}, 0.01f)},
                    {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", Tensor::full({64, 4}, 0.01f)},
                    {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", down},
                    {"lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight", Tensor::full({4, 64, 1, 1}, 0.01f)}});
  LoraFile f = load_lora((d / "mixed.safetensors").string());
  EXPECT_EQ(f.entries.size(), 3u);
  EXPECT_EQ(f.unknown.size(), 2u);
  LoraApplyReport r = apply_loras(*m, *be_, {{&f, 1.0f}});
  EXPECT_EQ(r.matched, 1);
  ASSERT_EQ(r.unmatched.size(), 4u);
  const std::string s = r.summary();
  std::printf("  %s\n", s.c_str());
  for (const char* want : {"1 module merged", "4 keys not applied"}) EXPECT_NE(s.find(want), std::string::npos) << s;
  std::string all;
  for (const std::string& u : r.unmatched) all += u + "\n";
  for (const char* want : {"mixed: lora_unet_down_blocks_7_attentions_0_proj_zz (no such module in unet)",
                           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj (text_encoder_2 not loaded)",
                           "hada_w1_a", "lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight (no matching"})
    EXPECT_NE(all.find(want), std::string::npos) << want << "\n" << all;
  EXPECT_TRUE(m->lora_merged.unet);
  EXPECT_FALSE(m->lora_merged.te);

  // A file of which nothing applies is an error, and leaves the model as it was.
  save_safetensors((d / "nothing.safetensors").string(),
                   {{"lora_unet_nowhere.lora_down.weight", down}, {"lora_unet_nowhere.lora_up.weight", up}});
  LoraFile nothing = load_lora((d / "nothing.safetensors").string());
  const Tensor before = txt2img(*m, *be_);
  expect_error([&] { apply_loras(*m, *be_, {{&nothing, 1.0f}}); },
               {"nothing.safetensors", "none of its", "lora_unet_nowhere (no such module in unet)"});
  // So is a module whose shapes do not fit (a LoRA for another architecture).
  save_safetensors((d / "misfit.safetensors").string(),
                   {{"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", Tensor::full({4, 48, 1, 1}, 0.01f)},
                    {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", Tensor::full({32, 4, 1, 1}, 0.01f)}});
  LoraFile misfit = load_lora((d / "misfit.safetensors").string());
  expect_error([&] { apply_loras(*m, *be_, {{&misfit, 1.0f}}); },
               {"misfit.safetensors", "lora_unet_down_blocks_0_attentions_0_proj_in", "[4, 48, 1, 1]",
                "down_blocks.0.attentions.0.proj_in", "[32, 32, 1, 1]"});
  EXPECT_TRUE(bit_equal(before, txt2img(*m, *be_)));
}

// ---- Prompt tags, paths, hashes -----------------------------------------------------------------

TEST(LoraTags, ExtractsA1111Tags) {
  std::vector<std::pair<std::string, float>> tags;
  EXPECT_EQ(extract_lora_tags("a cat <lora:detail:0.8>, sharp <lora:style_v2> done", &tags), "a cat , sharp  done");
  ASSERT_EQ(tags.size(), 2u);
  EXPECT_EQ(tags[0].first, "detail");
  EXPECT_FLOAT_EQ(tags[0].second, 0.8f);
  EXPECT_EQ(tags[1].first, "style_v2");
  EXPECT_FLOAT_EQ(tags[1].second, 1.0f);
  tags.clear();
  EXPECT_EQ(extract_lora_tags("<lora:my lora.v1: -0.5 >x", &tags), "x");
  ASSERT_EQ(tags.size(), 1u);
  EXPECT_EQ(tags[0].first, "my lora.v1");
  EXPECT_FLOAT_EQ(tags[0].second, -0.5f);
  // Not tags: other extra networks, brackets of prompt weighting, incomplete syntax.
  tags.clear();
  const std::string keep = "a <hypernet:foo:1> (b:1.2) <lora> <lora:> x < y > <lora:unclosed";
  EXPECT_EQ(extract_lora_tags(keep, &tags), keep);
  EXPECT_TRUE(tags.empty());
  EXPECT_EQ(extract_lora_tags("no tags", nullptr), "no tags");
  expect_error([] { extract_lora_tags("x <lora:a:lots>", nullptr); }, {"<lora:a:lots>", "not a number"});
  expect_error([] { extract_lora_tags("x <lora::1>", nullptr); }, {"<lora::1>", "empty LoRA name"});
  expect_error([] { extract_lora_tags("x <lora:a:1:0.5>", nullptr); }, {"<lora:a:1:0.5>", "not supported"});
}

TEST(LoraPaths, ResolvesNamesInADirectory) {
  const fs::path d = scratch("paths");
  std::ofstream(d / "a.safetensors") << "x";
  std::ofstream(d / "a.pt") << "x";
  std::ofstream(d / "b.ckpt") << "x";
  EXPECT_EQ(resolve_lora_path("a", d.string()), (d / "a.safetensors").string());
  EXPECT_EQ(resolve_lora_path("b", d.string()), (d / "b.ckpt").string());
  EXPECT_EQ(resolve_lora_path("a.pt", d.string()), (d / "a.pt").string());
  expect_error([&] { resolve_lora_path("zz", d.string()); }, {"'zz'", "zz.safetensors", "zz.pt", "zz.ckpt", d.string()});
  expect_error([] { resolve_lora_path("zz", ""); }, {"'zz'", "no LoRA directory"});
}

TEST(LoraHash, A1111AddnetHash) {
  const std::string k = data_path("sd1-lora/model/lora-kohya.safetensors", "sd1-lora/lora-kohya.safetensors");
  if (k.empty()) GTEST_SKIP() << "lora-kohya.safetensors not found";
  // sha256 of the data after the safetensors header (hashlib, computed once).
  EXPECT_EQ(lora_hash(k), "24486299d7298c138c8382046566a44c2cdcccdd88daadcb1fef438a2f2ff23c");
  const fs::path d = scratch("hash");
  std::ofstream(d / "x.pt", std::ios::binary) << "abc";  // other formats: the whole file
  EXPECT_EQ(lora_hash((d / "x.pt").string()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(format_lora_hashes({{"lora-kohya", lora_hash(k)}, {"we:ird,name", "0123456789abcdef"}}),
            "\"lora-kohya: 24486299d729, weirdname: 0123456789ab\"");
  EXPECT_EQ(format_lora_hashes({}), "");
  expect_error([&] { lora_hash((d / "missing").string()); }, {"missing"});
}

}  // namespace
}  // namespace diffuse
