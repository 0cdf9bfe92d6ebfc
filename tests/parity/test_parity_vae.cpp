// VAE (AutoencoderKL) parity against diffusers: decode vae.z -> vae.decoded and encode
// vae.image -> vae.enc_mean / vae.enc_std, for sd1, sd2 and sdxl, from the diffusers folder and
// from the single file (through name_map), in fp32 (bound 1e-4 · max(1, max|ref|)) and bf16
// (cosine ≥ 0.999 to the fp32 result).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>

#include "core/layout.h"
#include "backend/backend.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "models/name_map.h"
#include "models/vae.h"

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

const std::string kShared = std::string(DIFFUSE_SHARED_DIR) + "/fixtures/";
const std::string kBundled = std::string(DIFFUSE_TEST_DATA) + "/";

struct Diff {
  double max_abs = 0, max_ref = 0, cosine = 0;
};

Diff compare(const Tensor& got, const Tensor& ref) {
  EXPECT_EQ(got.shape(), ref.shape()) << got.str() << " vs " << ref.str();
  Diff d;
  if (got.shape() != ref.shape()) return d;
  Tensor r = ref.to(DType::F32);
  const float* a = got.f32();
  const float* b = r.f32();
  double dot = 0, na = 0, nb = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    d.max_abs = std::max(d.max_abs, double(std::fabs(a[i] - b[i])));
    d.max_ref = std::max(d.max_ref, double(std::fabs(b[i])));
    dot += double(a[i]) * b[i];
    na += double(a[i]) * a[i];
    nb += double(b[i]) * b[i];
  }
  d.cosine = dot / std::sqrt(std::max(na * nb, 1e-300));
  return d;
}

void expect_fp32(const char* what, const Tensor& got, const Tensor& ref) {
  Diff d = compare(got, ref);
  const double bound = 1e-4 * std::max(1.0, d.max_ref);
  std::printf("  fp32 %-24s max|d| = %.3g (max|ref| %.3g, bound %.3g)\n", what, d.max_abs, d.max_ref, bound);
  EXPECT_LE(d.max_abs, bound) << what;
}

void expect_bf16(const char* what, const Tensor& got, const Tensor& fp32) {
  Diff d = compare(got, fp32);
  std::printf("  bf16 %-24s cosine = %.6f (max|d| %.3g)\n", what, d.cosine, d.max_abs);
  EXPECT_GE(d.cosine, 0.999) << what;
}

// The fixture folder of a family, or "" if absent; sd1 falls back to the bundled copy.
std::string fixture_dir(const std::string& fam) {
  if (fs::exists(kShared + fam + "/components.safetensors")) return kShared + fam;
  if (fam == "sd1" && fs::exists(kBundled + "sd1/components.safetensors")) return kBundled + "sd1";
  return "";
}

// A diffusers folder's "vae/..." tensors under their names without the prefix.
WeightStore diffusers_vae(const std::string& dir) {
  TensorFile f = open_model_file(dir);
  WeightStore w(dir, "vae");
  for (const TensorEntry& e : f.tensors)
    if (e.name.rfind("vae/", 0) == 0) w.add(e.name.substr(4), e.tensor);
  return w;
}

Family family_of(const std::string& fam) {
  return fam == "sd1" ? Family::SD1 : fam == "sd2" ? Family::SD2 : Family::SDXL;
}
float scale_of(const std::string& fam) { return fam == "sdxl" ? 0.13025f : 0.18215f; }

struct Outputs {
  Tensor decoded, mean, std;  // NCHW, owned
};

Outputs run_vae(Backend& be, WeightStore& w, const VAEConfig& cfg, const TensorFile& ref) {
  VAE vae;
  vae.load(be, w, cfg);
  Arena arena;
  Ctx c{be, arena};
  Outputs o;
  o.decoded = nhwc_to_nchw(vae.decode(c, nchw_to_nhwc(*ref.find("vae.z"))));
  VAE::Posterior p = vae.encode(c, nchw_to_nhwc(*ref.find("vae.image")));
  o.mean = nhwc_to_nchw(p.mean);
  o.std = nhwc_to_nchw(p.std);
  return o;
}

// Checks one layout of one family: fp32 against the references, bf16 against fp32.
void check_parity(const std::string& fam, WeightStore& w) {
  TensorFile ref = load_safetensors(fixture_dir(fam) + "/components.safetensors");
  for (const char* k : {"vae.z", "vae.decoded", "vae.image", "vae.enc_mean", "vae.enc_std"})
    ASSERT_NE(ref.find(k), nullptr) << "reference " << k << " missing";
  VAEConfig cfg = VAEConfig::from_weights(w, scale_of(fam));
  EXPECT_EQ(cfg.block_out_channels, (std::vector<int>{32, 32, 64, 64}));
  EXPECT_EQ(cfg.layers_per_block, 2);
  EXPECT_EQ(cfg.latent_channels, 4);
  EXPECT_EQ(cfg.in_channels, 3);
  EXPECT_EQ(cfg.out_channels, 3);
  EXPECT_TRUE(cfg.mid_attention);

  auto f32 = make_cpu_backend(Precision::F32);
  Outputs a = run_vae(*f32, w, cfg, ref);
  expect_fp32("decoded", a.decoded, *ref.find("vae.decoded"));
  expect_fp32("enc_mean", a.mean, *ref.find("vae.enc_mean"));
  expect_fp32("enc_std", a.std, *ref.find("vae.enc_std"));

  auto bf16 = make_cpu_backend(Precision::BF16);
  if (bf16->effective_precision() != Precision::BF16)
    std::printf("  note: no bf16 hardware, the bf16 backend runs fp32\n");
  Outputs b = run_vae(*bf16, w, cfg, ref);
  expect_bf16("decoded", b.decoded, a.decoded);
  expect_bf16("enc_mean", b.mean, a.mean);
  expect_bf16("enc_std", b.std, a.std);
}

void parity_diffusers(const std::string& fam) {
  const std::string dir = kShared + fam + "/model/diffusers";
  if (!fs::exists(dir) || fixture_dir(fam).empty()) GTEST_SKIP() << "fixture " << dir << " absent";
  WeightStore w = diffusers_vae(dir);
  check_parity(fam, w);
}

// component_weights from a single file; skips (with the reason) while the name map throws.
bool single_file_store(const std::string& file, const std::string& fam, WeightStore* out, std::string* why) {
  try {
    *out = component_weights(open_model_file(file), Component::VAE, family_of(fam));
    return true;
  } catch (const Error& e) {
    *why = e.what();
    return false;
  }
}

void parity_single(const std::string& fam, const std::string& file) {
  if (!fs::exists(file) || fixture_dir(fam).empty()) GTEST_SKIP() << "fixture " << file << " absent";
  WeightStore w(file, "vae");
  std::string why;
  if (!single_file_store(file, fam, &w, &why)) GTEST_SKIP() << "name map cannot convert the VAE yet: " << why;
  check_parity(fam, w);
}

}  // namespace

TEST(VAEParity, Sd1Diffusers) { parity_diffusers("sd1"); }
TEST(VAEParity, Sd2Diffusers) { parity_diffusers("sd2"); }
TEST(VAEParity, SdxlDiffusers) { parity_diffusers("sdxl"); }
TEST(VAEParity, Sd1SingleFile) { parity_single("sd1", kShared + "sd1/model/tiny-sd1.safetensors"); }
TEST(VAEParity, Sd2SingleFile) { parity_single("sd2", kShared + "sd2/model/tiny-sd2.safetensors"); }
TEST(VAEParity, SdxlSingleFile) { parity_single("sdxl", kShared + "sdxl/model/tiny-sdxl.safetensors"); }

// The bundled copy: runs in a fresh clone without the shared fixtures.
TEST(VAEParity, Sd1BundledSingleFile) {
  const std::string file = kBundled + "sd1/model/tiny-sd1.safetensors";
  const std::string comps = kBundled + "sd1/components.safetensors";
  if (!fs::exists(file) || !fs::exists(comps)) GTEST_SKIP() << "bundled " << file << " absent";
  WeightStore w(file, "vae");
  std::string why;
  if (!single_file_store(file, "sd1", &w, &why)) GTEST_SKIP() << "name map cannot convert the VAE yet: " << why;
  TensorFile ref = load_safetensors(comps);
  VAEConfig cfg = VAEConfig::from_weights(w, 0.18215f);
  auto be = make_cpu_backend(Precision::F32);
  Outputs a = run_vae(*be, w, cfg, ref);
  expect_fp32("decoded", a.decoded, *ref.find("vae.decoded"));
  expect_fp32("enc_mean", a.mean, *ref.find("vae.enc_mean"));
  expect_fp32("enc_std", a.std, *ref.find("vae.enc_std"));
}

namespace {

// The sd1 VAE weights from whichever source is present, or false.
bool any_sd1_store(WeightStore* w) {
  const std::string dir = kShared + "sd1/model/diffusers";
  if (fs::exists(dir)) {
    *w = diffusers_vae(dir);
    return true;
  }
  std::string why;
  const std::string file = kBundled + "sd1/model/tiny-sd1.safetensors";
  return fs::exists(file) && single_file_store(file, "sd1", w, &why);
}

}  // namespace

TEST(VAE, OddSizes) {
  WeightStore w("", "vae");
  if (!any_sd1_store(&w)) GTEST_SKIP() << "no sd1 VAE weights (fixtures absent or name map not ready)";
  auto be = make_cpu_backend(Precision::F32);
  VAE vae;
  vae.load(*be, w, VAEConfig::from_weights(w, 0.18215f));
  Arena arena;
  Ctx c{*be, arena};
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  Tensor z = Tensor::empty({2, 3, 5, 4});
  for (int64_t i = 0; i < z.numel(); ++i) z.f32()[i] = nd(rng);
  Tensor img = vae.decode(c, z);
  EXPECT_EQ(img.shape(), (Shape{2, 24, 40, 3}));
  // Batch items are independent: the second item alone decodes to the same pixels.
  Tensor one = vae.decode(c, z.slice0(1, 2).clone());
  Diff d = compare(one, img.slice0(1, 2).clone());
  EXPECT_LE(d.max_abs, 1e-5);

  Tensor x = Tensor::empty({1, 40, 24, 3});
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = std::tanh(nd(rng));
  VAE::Posterior p = vae.encode(c, x);
  EXPECT_EQ(p.mean.shape(), (Shape{1, 5, 3, 4}));
  EXPECT_EQ(p.std.shape(), (Shape{1, 5, 3, 4}));
  for (int64_t i = 0; i < p.std.numel(); ++i) ASSERT_GT(p.std.f32()[i], 0.0f);

  // Sizes that are not multiples of 8 and wrong channel counts are refused with a message.
  EXPECT_THROW(vae.encode(c, Tensor::zeros({1, 36, 24, 3})), Error);
  EXPECT_THROW(vae.decode(c, Tensor::zeros({1, 4, 4, 3})), Error);
}

TEST(VAE, PartialLoadAndStrictBinding) {
  WeightStore w("", "vae");
  if (!any_sd1_store(&w)) GTEST_SKIP() << "no sd1 VAE weights (fixtures absent or name map not ready)";
  auto be = make_cpu_backend(Precision::F32);
  const VAEConfig cfg = VAEConfig::from_weights(w, 0.18215f);
  VAE dec_only;
  dec_only.load(*be, w, cfg, /*encoder=*/false, /*decoder=*/true);
  EXPECT_TRUE(dec_only.has_decoder());
  EXPECT_FALSE(dec_only.has_encoder());
  Arena arena;
  Ctx c{*be, arena};
  EXPECT_THROW(dec_only.encode(c, Tensor::zeros({1, 64, 64, 3})), Error);

  // A wrong width is reported naming the file and the tensor.
  VAEConfig bad = cfg;
  bad.block_out_channels[0] = 64;
  VAE v;
  try {
    v.load(*be, w, bad);
    ADD_FAILURE() << "a wrong config was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("encoder.conv_in.weight"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

namespace {

// Random weights for a config, under diffusers names (the VAE's own naming of its parts).
WeightStore random_store(const VAEConfig& cfg) {
  WeightStore w("random", "vae");
  uint64_t state = 7;
  auto add = [&](const std::string& name, const Shape& s, float scale) {
    Tensor t = Tensor::empty(s);
    float* p = t.f32();
    for (int64_t i = 0; i < t.numel(); ++i) {  // scale < 0: ones; else uniform in ±scale (LCG)
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      p[i] = scale < 0 ? 1.0f : scale * (float(state >> 40) / float(1 << 23) - 1.0f);
    }
    w.add(name, t);
  };
  auto conv = [&](const std::string& p, int64_t o, int64_t i, int64_t k) {
    add(p + ".weight", {o, i, k, k}, 1.0f / std::sqrt(float(i * k * k)));
    add(p + ".bias", {o}, 0.01f);
  };
  auto norm = [&](const std::string& p, int64_t c) {
    add(p + ".weight", {c}, -1);
    add(p + ".bias", {c}, 0.01f);
  };
  auto res = [&](const std::string& p, int64_t i, int64_t o) {
    norm(p + ".norm1", i);
    conv(p + ".conv1", o, i, 3);
    norm(p + ".norm2", o);
    conv(p + ".conv2", o, o, 3);
    if (i != o) conv(p + ".conv_shortcut", o, i, 1);
  };
  auto mid = [&](const std::string& p, int64_t c) {
    res(p + ".resnets.0", c, c);
    res(p + ".resnets.1", c, c);
    norm(p + ".attentions.0.group_norm", c);
    for (const char* l : {"to_q", "to_k", "to_v", "to_out.0"}) {
      add(p + ".attentions.0." + l + ".weight", {c, c}, 1.0f / std::sqrt(float(c)));
      add(p + ".attentions.0." + l + ".bias", {c}, 0.01f);
    }
  };
  const auto& ch = cfg.block_out_channels;
  const int n = int(ch.size()), L = cfg.latent_channels;
  conv("encoder.conv_in", ch[0], 3, 3);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < cfg.layers_per_block; ++j)
      res("encoder.down_blocks." + std::to_string(i) + ".resnets." + std::to_string(j), j ? ch[i] : ch[std::max(i - 1, 0)], ch[i]);
    if (i < n - 1) conv("encoder.down_blocks." + std::to_string(i) + ".downsamplers.0.conv", ch[i], ch[i], 3);
  }
  mid("encoder.mid_block", ch[n - 1]);
  norm("encoder.conv_norm_out", ch[n - 1]);
  conv("encoder.conv_out", 2 * L, ch[n - 1], 3);
  conv("quant_conv", 2 * L, 2 * L, 1);
  conv("post_quant_conv", L, L, 1);
  conv("decoder.conv_in", ch[n - 1], L, 3);
  mid("decoder.mid_block", ch[n - 1]);
  for (int i = 0; i < n; ++i) {
    const int c = ch[n - 1 - i], prev = ch[n - 1 - std::max(i - 1, 0)];
    for (int j = 0; j <= cfg.layers_per_block; ++j)
      res("decoder.up_blocks." + std::to_string(i) + ".resnets." + std::to_string(j), j ? c : prev, c);
    if (i < n - 1) conv("decoder.up_blocks." + std::to_string(i) + ".upsamplers.0.conv", c, c, 3);
  }
  norm("decoder.conv_norm_out", ch[0]);
  conv("decoder.conv_out", 3, ch[0], 3);
  return w;
}

}  // namespace

// Full-size SD VAE with random weights: config detection, and the memory a decode needs
// (measured on an 8×8 latent; activations scale with the pixel count, so a 64×64 latent, 512²
// pixels, needs 64× as much).
TEST(VAE, SdSizeMemory) {
  const VAEConfig sd = VAEConfig::sd();
  WeightStore w = random_store(sd);
  VAEConfig cfg = VAEConfig::from_weights(w, 0.18215f);
  EXPECT_EQ(cfg.block_out_channels, sd.block_out_channels);
  EXPECT_EQ(cfg.layers_per_block, sd.layers_per_block);
  EXPECT_EQ(cfg.latent_channels, 4);
  auto be = make_cpu_backend(Precision::F32);
  VAE vae;
  vae.load(*be, w, cfg);
  Arena arena;
  Ctx c{*be, arena};
  Tensor z = Tensor::zeros({1, 8, 8, 4});
  Tensor img = vae.decode(c, z);
  ASSERT_EQ(img.shape(), (Shape{1, 64, 64, 3}));
  for (int64_t i = 0; i < img.numel(); ++i) ASSERT_TRUE(std::isfinite(img.f32()[i]));
  const double mib = 1024.0 * 1024.0;
  const double scratch = vae.scratch_peak() / mib, caller = arena.peak() / mib;
  std::printf("  decode 8x8 latent: scratch peak %.2f MiB (capacity %.2f MiB), caller arena %.3f MiB; "
              "a 64x64 latent (512^2) needs ~%.0f MiB of scratch\n",
              scratch, vae.scratch_capacity() / mib, caller, 64 * scratch);
  // The biggest single activation at 64² is 64²·256·4 B = 4 MiB; the whole decode stays within
  // a small multiple of it (without scratch reuse it would be ~20×). Only the image is the caller's.
  EXPECT_LT(scratch, 4 * 8.0);
  EXPECT_LE(arena.peak(), size_t(64 * 64 * 3 * 4 + 64));
  // The scratch is sized to its peak, and a second pass of the same size allocates nothing.
  EXPECT_LE(vae.scratch_capacity(), vae.scratch_peak());
  const size_t cap = vae.scratch_capacity();
  vae.decode(c, z);
  EXPECT_EQ(vae.scratch_capacity(), cap);
  vae.release_scratch();
  EXPECT_EQ(vae.scratch_capacity(), 0u);
}
