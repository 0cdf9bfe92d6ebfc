// Synthetic checkpoints: manifest parsing (the real SD 1.5 / 2.1 / XL layouts), the value
// generator, and round trips of small written checkpoints in both layouts. Full-size writes are
// not done here (see `diffuse synth`).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "io/tensor_file.h"
#include "models/synthetic.h"
#include "models/tokenizer.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

std::string manifest_path(const std::string& name) {
  for (std::string dir : {std::string(DIFFUSE_TEST_DATA) + "/manifests", std::string(DIFFUSE_SHARED_DIR) + "/manifests"}) {
    std::string p = dir + "/" + name + ".tsv";
    if (fs::is_regular_file(p)) return p;
  }
  return "";
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class SyntheticFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("diffuse_test_synth_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& text) {
    std::string p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary) << text;
    return p;
  }
  fs::path dir_;
};

// ---- real manifests ----

struct Counts {
  std::map<std::string, int64_t> tensors, params;  // key "layout/component"
};

Counts count(const std::vector<ManifestRow>& rows) {
  Counts c;
  for (const ManifestRow& r : rows) {
    c.tensors[r.layout + "/" + r.component] += 1;
    c.params[r.layout + "/" + r.component] += r.shape.numel();
  }
  return c;
}

TEST(SyntheticManifest, Sd15) {
  std::string p = manifest_path("sd15");
  if (p.empty()) GTEST_SKIP() << "manifest sd15.tsv not found under tests/data/manifests or shared/manifests";
  Counts c = count(read_manifest(p));
  for (const char* layout : {"diffusers", "ldm"}) {
    std::string l = layout;
    EXPECT_EQ(c.tensors[l + "/unet"], 686) << l;
    EXPECT_EQ(c.tensors[l + "/vae"], 248) << l;
    EXPECT_EQ(c.tensors[l + "/text_encoder"], 196) << l;
    // The well-known parameter counts of SD 1.5.
    EXPECT_EQ(c.params[l + "/unet"], 859520964) << l;
    EXPECT_EQ(c.params[l + "/vae"], 83653863) << l;
    EXPECT_EQ(c.params[l + "/text_encoder"], 123060480) << l;
  }
  EXPECT_EQ(c.tensors.size(), 6u);
}

TEST(SyntheticManifest, Sd21) {
  std::string p = manifest_path("sd21");
  if (p.empty()) GTEST_SKIP() << "manifest sd21.tsv not found under tests/data/manifests or shared/manifests";
  std::vector<ManifestRow> rows = read_manifest(p);
  Counts c = count(rows);
  for (const char* comp : {"unet", "vae"}) {
    EXPECT_EQ(c.tensors[std::string("diffusers/") + comp], c.tensors[std::string("ldm/") + comp]) << comp;
    EXPECT_EQ(c.params[std::string("diffusers/") + comp], c.params[std::string("ldm/") + comp]) << comp;
  }
  EXPECT_EQ(c.tensors["diffusers/unet"], 686);
  EXPECT_EQ(c.params["diffusers/unet"], 865910724);  // SD 2.x UNet
  // Text encoder: diffusers keeps 23 layers (16 tensors each, separate q/k/v), the single file 24
  // (12 tensors each, fused in_proj); the 24th is the one extra block.
  EXPECT_EQ(c.tensors["diffusers/text_encoder"], 23 * 16 + 4);
  EXPECT_EQ(c.tensors["ldm/text_encoder"], 24 * 12 + 4);
  int64_t layer = 0;
  for (const ManifestRow& r : rows)
    if (r.layout == "diffusers" && r.name.rfind("text_model.encoder.layers.22.", 0) == 0) layer += r.shape.numel();
  EXPECT_EQ(layer, 12596224);  // 4*(1024^2+1024) + 2*1024*4096 + 4096 + 1024 + 4*1024
  EXPECT_EQ(c.params["ldm/text_encoder"] - c.params["diffusers/text_encoder"], layer);
}

TEST(SyntheticManifest, Sdxl) {
  std::string p = manifest_path("sdxl");
  if (p.empty()) GTEST_SKIP() << "manifest sdxl.tsv not found under tests/data/manifests or shared/manifests";
  Counts c = count(read_manifest(p));
  for (const char* comp : {"unet", "vae", "text_encoder", "text_encoder_2"})
    EXPECT_EQ(c.params[std::string("diffusers/") + comp], c.params[std::string("ldm/") + comp]) << comp;
  EXPECT_EQ(c.tensors["diffusers/unet"], 1680);
  EXPECT_EQ(c.tensors["ldm/unet"], 1680);
  EXPECT_EQ(c.params["diffusers/unet"], 2567463684);  // SDXL base UNet
  EXPECT_EQ(c.tensors["diffusers/text_encoder_2"], 32 * 16 + 5);  // + text_projection
  EXPECT_EQ(c.tensors["ldm/text_encoder_2"], 32 * 12 + 5);
  int64_t total = 0;
  for (auto& [k, v] : c.params)
    if (k.rfind("ldm/", 0) == 0) total += v;
  std::printf("sdxl ldm parameters: %lld\n", static_cast<long long>(total));
  EXPECT_GT(total, 3400000000);
  EXPECT_LT(total, 3600000000);
}

// Both layouts of a component must get the same initialisation kinds: ldm's unnamed GroupNorms
// ("in_layers.0.weight", "out.0.weight") are norms just like diffusers' "norm1.weight".
TEST(SyntheticManifest, InitKindsAgreeAcrossLayouts) {
  int checked = 0;
  for (const char* m : {"sd15", "sd21", "sdxl"}) {
    std::string p = manifest_path(m);
    if (p.empty()) continue;
    std::map<std::string, std::map<int, int64_t>> kinds;  // layout/component -> kind -> tensors
    for (const ManifestRow& r : read_manifest(p)) kinds[r.layout + "/" + r.component][synthetic_init(r.name, r.shape).kind]++;
    for (const char* comp : {"unet", "vae", "text_encoder_2"}) {
      if (!kinds.count(std::string("ldm/") + comp)) continue;
      auto d = kinds[std::string("diffusers/") + comp], l = kinds[std::string("ldm/") + comp];
      EXPECT_EQ(d[SyntheticInit::Ones], l[SyntheticInit::Ones]) << m << " " << comp;
      EXPECT_EQ(d[SyntheticInit::Embedding], l[SyntheticInit::Embedding]) << m << " " << comp;
      EXPECT_GT(d[SyntheticInit::Ones], 0) << m << " " << comp;
      ++checked;
    }
    EXPECT_EQ(kinds["diffusers/text_encoder"][SyntheticInit::Embedding], 2) << m;
    EXPECT_EQ(kinds["ldm/text_encoder"][SyntheticInit::Embedding], 2) << m;
  }
  if (checked == 0) GTEST_SKIP() << "no manifests found";
}

// ---- parser errors ----

TEST_F(SyntheticFiles, ManifestErrorsNameFileAndLine) {
  const std::string hdr = "layout\tcomponent\tname\tshape\n";
  auto expect_error = [&](const std::string& text, const std::string& where, const std::string& what) {
    std::string p = write("m.tsv", text);
    try {
      read_manifest(p);
      ADD_FAILURE() << "no error for: " << text;
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find(p + where), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  };
  expect_error("name\tshape\n", ":1:", "header");
  expect_error(hdr + "ldm\tunet\ta.weight\t4x4\nldm\tunet\tb.weight\n", ":3:", "4 tab-separated");
  expect_error(hdr + "ldm\tunet\ta.weight\t4x\n", ":2:", "bad shape");
  expect_error(hdr + "ldm\tunet\ta.weight\t4xa\n", ":2:", "bad shape");
  expect_error(hdr + "ldm\tunet\ta.weight\t0x4\n", ":2:", "not positive");
  expect_error(hdr + "ckpt\tunet\ta.weight\t4\n", ":2:", "layout 'ckpt'");
  expect_error(hdr + "ldm\tunet\ta.weight\t4\nldm\tvae\ta.weight\t4\n", ":3:", "already listed on line 2");
  expect_error(hdr + "ldm\tunet\ta weight\t4\n", ":2:", "space");
  expect_error(hdr, "", "no rows");
  EXPECT_THROW(read_manifest((dir_ / "missing.tsv").string()), Error);

  // The same name in two diffusers components is fine (separate folders); CRLF and a scalar too.
  std::string p = write("ok.tsv", "layout\tcomponent\tname\tshape\r\ndiffusers\tunet\ta.weight\t2x3\r\n"
                                  "diffusers\tvae\ta.weight\t5\r\nldm\tunet\tlogit_scale\t\r\n");
  std::vector<ManifestRow> rows = read_manifest(p);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].shape, Shape({2, 3}));
  EXPECT_EQ(rows[2].shape.rank(), 0);
  EXPECT_EQ(rows[2].name, "logit_scale");
}

TEST_F(SyntheticFiles, FindManifest) {
  write("sd15.tsv", "x");
  EXPECT_EQ(find_manifest("sd15", {"/nonexistent", dir_.string()}), (dir_ / "sd15.tsv").string());
  EXPECT_THROW(find_manifest("sd21", {dir_.string()}), Error);
  EXPECT_THROW(find_manifest("sd3", {dir_.string()}), Error);
  EXPECT_EQ(manifest_config_path((dir_ / "sd15.tsv").string()), "");
  write("sd15.config.json", "{}");
  EXPECT_EQ(manifest_config_path((dir_ / "sd15.tsv").string()), (dir_ / "sd15.config.json").string());
}

// ---- values ----

TEST(SyntheticValues, InitRules) {
  EXPECT_EQ(synthetic_init("down_blocks.0.resnets.0.norm1.weight", Shape{320}).kind, SyntheticInit::Ones);
  EXPECT_EQ(synthetic_init("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", Shape{320}).kind,
            SyntheticInit::Ones);
  EXPECT_EQ(synthetic_init("cond_stage_model.model.ln_final.weight", Shape{1024}).kind, SyntheticInit::Ones);
  EXPECT_EQ(synthetic_init("conv_in.bias", Shape{320}).kind, SyntheticInit::Bias);
  EXPECT_EQ(synthetic_init("x.attn.in_proj_bias", Shape{3072}).kind, SyntheticInit::Bias);
  EXPECT_EQ(synthetic_init("text_model.embeddings.token_embedding.weight", Shape{49408, 768}).kind,
            SyntheticInit::Embedding);
  EXPECT_EQ(synthetic_init("cond_stage_model.model.positional_embedding", Shape{77, 1024}).kind,
            SyntheticInit::Embedding);
  SyntheticInit conv = synthetic_init("conv_in.weight", Shape{320, 4, 3, 3});
  EXPECT_EQ(conv.kind, SyntheticInit::FanIn);
  EXPECT_FLOAT_EQ(conv.std, 1.0f / 6.0f);
  // time_embedding.linear_1 contains "embedding" but is a Linear.
  EXPECT_EQ(synthetic_init("time_embedding.linear_1.weight", Shape{1280, 320}).kind, SyntheticInit::FanIn);
}

TEST(SyntheticValues, DistributionDeterminismChunking) {
  const Shape shape{512, 256, 3, 3};  // fan_in 2304
  const int64_t n = shape.numel();
  std::vector<float> a(n), b(n), c(n);
  synthetic_fill("w.weight", shape, 7, 0, n, a.data());
  synthetic_fill("w.weight", shape, 7, 0, 1000, b.data());  // the same values in uneven chunks
  synthetic_fill("w.weight", shape, 7, 1000, n - 1000, b.data() + 1000);
  EXPECT_EQ(a, b);
  synthetic_fill("w.weight", shape, 8, 0, n, c.data());
  int64_t same = 0;
  for (int64_t i = 0; i < n; ++i) same += a[i] == c[i];
  EXPECT_LT(same, n / 100) << "seed 7 and seed 8 give the same values";
  synthetic_fill("v.weight", shape, 7, 0, n, c.data());
  same = 0;
  for (int64_t i = 0; i < n; ++i) same += a[i] == c[i];
  EXPECT_LT(same, n / 100) << "two tensors share their values";

  double s1 = 0, s2 = 0, s4 = 0, mx = 0;
  for (float v : a) {
    s1 += v;
    s2 += double(v) * v;
    mx = std::max(mx, std::fabs(double(v)));
  }
  const double mean = s1 / n, var = s2 / n - mean * mean, sd = std::sqrt(var), want = 1.0 / 48.0;
  for (float v : a) s4 += std::pow((v - mean) / sd, 4);
  const double kurt = s4 / n;
  std::printf("N(0, 1/fan_in) check: n %lld mean %.3g std %.6f (want %.6f) kurtosis %.3f max %.2f sigma\n",
              static_cast<long long>(n), mean, sd, want, kurt, mx / want);
  EXPECT_LT(std::fabs(mean), 0.01 * want);
  EXPECT_NEAR(sd / want, 1.0, 0.01);
  EXPECT_NEAR(kurt, 2.7, 0.05);  // sum of four uniforms: excess kurtosis -0.3
  EXPECT_LE(mx / want, 3.47);
  EXPECT_GT(mx / want, 3.0);

  std::vector<float> ones(10, 0.0f);
  synthetic_fill("norm.weight", Shape{10}, 7, 0, 10, ones.data());
  for (float v : ones) EXPECT_EQ(v, 1.0f);
}

// ---- writing ----

const char* kTinyManifest =
    "layout\tcomponent\tname\tshape\n"
    "diffusers\tunet\tconv_in.weight\t8x4x3x3\n"
    "diffusers\tunet\tconv_in.bias\t8\n"
    "diffusers\tunet\tdown_blocks.0.resnets.0.norm1.weight\t8\n"
    "diffusers\tunet\tdown_blocks.0.resnets.0.norm1.bias\t8\n"
    "diffusers\tunet\tbig.weight\t1100x1024\n"  // more than one generation chunk
    "diffusers\tvae\tdecoder.conv_out.weight\t3x8x3x3\n"
    "diffusers\tvae\tdecoder.conv_norm_out.weight\t8\n"
    "diffusers\ttext_encoder\ttext_model.embeddings.token_embedding.weight\t100x16\n"
    "diffusers\ttext_encoder\ttext_model.final_layer_norm.weight\t16\n"
    "ldm\tunet\tmodel.diffusion_model.input_blocks.0.0.weight\t8x4x3x3\n"
    "ldm\tunet\tmodel.diffusion_model.input_blocks.0.0.bias\t8\n"
    "ldm\tunet\tmodel.diffusion_model.input_blocks.1.0.in_layers.0.weight\t8\n"
    "ldm\tvae\tfirst_stage_model.decoder.conv_out.weight\t3x8x3x3\n"
    "ldm\ttext_encoder\tcond_stage_model.transformer.text_model.embeddings.token_embedding.weight\t100x16\n"
    "ldm\ttext_encoder\tcond_stage_model.transformer.text_model.final_layer_norm.weight\t16\n";

std::vector<float> values(const Tensor& t) {
  Tensor f = t.to(DType::F32);
  return std::vector<float>(f.f32(), f.f32() + f.numel());
}

TEST_F(SyntheticFiles, LdmRoundTrip) {
  std::vector<ManifestRow> rows = read_manifest(write("tiny.tsv", kTinyManifest));
  const std::string out = (dir_ / "tiny.safetensors").string();
  SynthStats s = write_synthetic_checkpoint(rows, "ldm", out, DType::F16, 1);
  EXPECT_EQ(s.tensors, 6);
  EXPECT_EQ(s.parameters, 288 + 8 + 8 + 216 + 1600 + 16);
  EXPECT_EQ(s.bytes, uint64_t(s.parameters) * 2);
  EXPECT_FALSE(fs::exists(out + ".tmp"));
  TensorFile f = open_model_file(out);
  EXPECT_EQ(f.format, "safetensors");
  EXPECT_TRUE(f.warnings.empty());
  ASSERT_EQ(f.size(), 6u);
  for (const ManifestRow& r : rows) {
    if (r.layout != "ldm") continue;
    const Tensor* t = f.find(r.name);
    ASSERT_NE(t, nullptr) << r.name;
    EXPECT_EQ(t->shape(), r.shape) << r.name;
    EXPECT_EQ(t->dtype(), DType::F16) << r.name;
    // Exactly the generator's values, rounded to f16.
    std::vector<float> want(r.shape.numel());
    synthetic_fill(r.name, r.shape, 1, 0, r.shape.numel(), want.data());
    std::vector<float> got = values(*t);
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(got[i], f16_to_f32(f32_to_f16(want[i]))) << r.name << " " << i;
  }
  for (float v : values(*f.find("model.diffusion_model.input_blocks.1.0.in_layers.0.weight"))) EXPECT_EQ(v, 1.0f);
  EXPECT_NE(f.metadata["diffuse_synthetic"].find("seed 1"), std::string::npos);

  // Same seed: identical bytes; another seed: different data, same header layout.
  const std::string again = (dir_ / "again.safetensors").string(), other = (dir_ / "other.safetensors").string();
  write_synthetic_checkpoint(rows, "ldm", again, DType::F16, 1);
  write_synthetic_checkpoint(rows, "ldm", other, DType::F16, 2);
  EXPECT_EQ(read_text(out), read_text(again));
  TensorFile o = open_model_file(other);
  EXPECT_NE(values(*o.find("model.diffusion_model.input_blocks.0.0.weight")),
            values(*f.find("model.diffusion_model.input_blocks.0.0.weight")));

  // Other dtypes.
  for (DType dt : {DType::F32, DType::BF16}) {
    const std::string p = (dir_ / "dt.safetensors").string();
    write_synthetic_checkpoint(rows, "ldm", p, dt, 1);
    TensorFile g = open_model_file(p);
    const Tensor* t = g.find("model.diffusion_model.input_blocks.0.0.weight");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype(), dt);
    std::vector<float> want(288);
    synthetic_fill("model.diffusion_model.input_blocks.0.0.weight", Shape{8, 4, 3, 3}, 1, 0, 288, want.data());
    std::vector<float> got = values(*t);
    for (int i = 0; i < 288; ++i) EXPECT_NEAR(got[i], want[i], std::fabs(want[i]) * 0.008f + 1e-7f);
  }
  EXPECT_THROW(write_synthetic_checkpoint(rows, "ldm", out, DType::I32, 1), Error);
  EXPECT_THROW(write_synthetic_checkpoint(rows, "ckpt", out, DType::F16, 1), Error);
  EXPECT_THROW(write_synthetic_checkpoint(rows, "ldm", dir_.string(), DType::F16, 1), Error);
}

TEST_F(SyntheticFiles, DiffusersRoundTrip) {
  std::vector<ManifestRow> rows = read_manifest(write("tiny.tsv", kTinyManifest));
  std::string cfg = write("tiny.config.json",
                          R"({"unet": {"in_channels": 4, "block_out_channels": [8]}, "vae": {"latent_channels": 4},
                              "text_encoder": {"hidden_size": 16, "hidden_act": "quick_gelu"}, "text_encoder_2": null})");
  const fs::path out = dir_ / "pipe";
  SynthStats s = write_synthetic_checkpoint(rows, "diffusers", out.string(), DType::F16, 3, cfg);
  EXPECT_EQ(s.tensors, 9);
  EXPECT_EQ(s.parameters, 288 + 8 + 8 + 8 + 1100 * 1024 + 216 + 8 + 1600 + 16);

  EXPECT_TRUE(fs::is_regular_file(out / "unet" / "diffusion_pytorch_model.safetensors"));
  EXPECT_TRUE(fs::is_regular_file(out / "vae" / "diffusion_pytorch_model.safetensors"));
  EXPECT_TRUE(fs::is_regular_file(out / "text_encoder" / "model.safetensors"));
  TensorFile f = open_model_file(out.string());
  EXPECT_EQ(f.format, "diffusers");
  EXPECT_TRUE(f.warnings.empty());
  ASSERT_EQ(f.size(), 9u);
  for (const ManifestRow& r : rows) {
    if (r.layout != "diffusers") continue;
    const Tensor* t = f.find(r.component + "/" + r.name);
    ASSERT_NE(t, nullptr) << r.name;
    EXPECT_EQ(t->shape(), r.shape);
    EXPECT_EQ(t->dtype(), DType::F16);
  }
  // The tensor that spans two chunks has exactly the generator's values.
  {
    const Shape sh{1100, 1024};
    std::vector<float> want(sh.numel());
    synthetic_fill("big.weight", sh, 3, 0, sh.numel(), want.data());
    std::vector<float> got = values(*f.find("unet/big.weight"));
    ASSERT_EQ(got.size(), want.size());
    int64_t bad = 0;
    for (size_t i = 0; i < want.size(); ++i) bad += got[i] != f16_to_f32(f32_to_f16(want[i]));
    EXPECT_EQ(bad, 0);
  }
  for (float v : values(*f.find("unet/down_blocks.0.resnets.0.norm1.weight"))) EXPECT_EQ(v, 1.0f);
  for (float v : values(*f.find("vae/decoder.conv_norm_out.weight"))) EXPECT_EQ(v, 1.0f);

  using json = nlohmann::json;
  json index = json::parse(f.metadata.at("model_index.json"));
  EXPECT_EQ(index["_class_name"], "StableDiffusionPipeline");
  EXPECT_EQ(index["unet"], json::array({"diffusers", "UNet2DConditionModel"}));
  EXPECT_EQ(index["vae"], json::array({"diffusers", "AutoencoderKL"}));
  EXPECT_EQ(index["text_encoder"], json::array({"transformers", "CLIPTextModel"}));
  EXPECT_EQ(index["tokenizer"], json::array({"transformers", "CLIPTokenizer"}));
  EXPECT_EQ(index["scheduler"], json::array({"diffusers", "PNDMScheduler"}));
  EXPECT_FALSE(index.contains("text_encoder_2"));
  json ucfg = json::parse(f.metadata.at("unet/config.json"));
  EXPECT_EQ(ucfg["_class_name"], "UNet2DConditionModel");
  EXPECT_EQ(ucfg["block_out_channels"], json::array({8}));
  json vcfg = json::parse(f.metadata.at("vae/config.json"));
  EXPECT_DOUBLE_EQ(vcfg["scaling_factor"].get<double>(), 0.18215);
  json tcfg = json::parse(f.metadata.at("text_encoder/config.json"));
  EXPECT_EQ(tcfg["architectures"], json::array({"CLIPTextModel"}));
  EXPECT_EQ(tcfg["hidden_size"], 16);
  json sched = json::parse(f.metadata.at("scheduler/scheduler_config.json"));
  EXPECT_EQ(sched["prediction_type"], "epsilon");

  // The tokenizer folder holds the built-in vocabulary.
  ClipTokenizer tok = ClipTokenizer::from_diffusers_dir((out / "tokenizer").string());
  const ClipTokenizer& ref = ClipTokenizer::builtin();
  EXPECT_EQ(tok.vocab_size(), ref.vocab_size());
  EXPECT_EQ(tok.encode("a photograph of an astronaut riding a horse, 8k!"),
            ref.encode("a photograph of an astronaut riding a horse, 8k!"));
  EXPECT_EQ(json::parse(read_text(out / "tokenizer" / "tokenizer_config.json"))["pad_token"], "<|endoftext|>");

  // Rewriting into the same folder works (files are replaced).
  write_synthetic_checkpoint(rows, "diffusers", out.string(), DType::F16, 3, cfg);
  EXPECT_EQ(open_model_file(out.string()).size(), 9u);
}

TEST_F(SyntheticFiles, DiffusersFamilies) {
  using json = nlohmann::json;
  // SDXL-like: a second text encoder makes it an XL pipeline with two tokenizers.
  std::string xl = write("xl.tsv",
                         "layout\tcomponent\tname\tshape\n"
                         "diffusers\tunet\tconv_in.weight\t8x4x3x3\n"
                         "diffusers\ttext_encoder\ttext_model.embeddings.token_embedding.weight\t10x768\n"
                         "diffusers\ttext_encoder_2\ttext_model.embeddings.token_embedding.weight\t10x1280\n"
                         "diffusers\ttext_encoder_2\ttext_projection.weight\t1280x1280\n"
                         "diffusers\tvae\tdecoder.conv_out.weight\t3x8x3x3\n");
  fs::path out = dir_ / "xl";
  write_synthetic_checkpoint(read_manifest(xl), "diffusers", out.string(), DType::BF16, 0);
  json index = json::parse(read_text(out / "model_index.json"));
  EXPECT_EQ(index["_class_name"], "StableDiffusionXLPipeline");
  EXPECT_EQ(index["text_encoder_2"], json::array({"transformers", "CLIPTextModelWithProjection"}));
  EXPECT_EQ(index["tokenizer_2"], json::array({"transformers", "CLIPTokenizer"}));
  EXPECT_EQ(index["scheduler"], json::array({"diffusers", "EulerDiscreteScheduler"}));
  EXPECT_EQ(json::parse(read_text(out / "tokenizer" / "tokenizer_config.json"))["pad_token"], "<|endoftext|>");
  EXPECT_EQ(json::parse(read_text(out / "tokenizer_2" / "tokenizer_config.json"))["pad_token"], "!");
  EXPECT_DOUBLE_EQ(json::parse(read_text(out / "vae" / "config.json"))["scaling_factor"].get<double>(), 0.13025);
  EXPECT_EQ(open_model_file(out.string()).find("text_encoder_2/text_projection.weight")->dtype(), DType::BF16);

  // SD 2.x 768-v: a 1024-wide text encoder, and the config's UNet sample_size 96 means v-prediction.
  std::string sd2 = write("sd2.tsv",
                          "layout\tcomponent\tname\tshape\n"
                          "diffusers\tunet\tconv_in.weight\t8x4x3x3\n"
                          "diffusers\ttext_encoder\ttext_model.embeddings.token_embedding.weight\t10x1024\n");
  std::string cfg = write("sd2.config.json", R"({"unet": {"sample_size": 96}, "text_encoder": {"hidden_size": 1024}})");
  out = dir_ / "sd2";
  write_synthetic_checkpoint(read_manifest(sd2), "diffusers", out.string(), DType::F16, 0, cfg);
  index = json::parse(read_text(out / "model_index.json"));
  EXPECT_EQ(index["_class_name"], "StableDiffusionPipeline");
  EXPECT_EQ(index["scheduler"], json::array({"diffusers", "DDIMScheduler"}));
  EXPECT_EQ(json::parse(read_text(out / "scheduler" / "scheduler_config.json"))["prediction_type"], "v_prediction");
  EXPECT_EQ(json::parse(read_text(out / "tokenizer" / "tokenizer_config.json"))["pad_token"], "!");

  // Unknown components and absent layouts are errors.
  std::string bad = write("bad.tsv", "layout\tcomponent\tname\tshape\ndiffusers\tcontrolnet\tx.weight\t4x4\n");
  EXPECT_THROW(write_synthetic_checkpoint(read_manifest(bad), "diffusers", (dir_ / "bad").string()), Error);
  EXPECT_THROW(write_synthetic_checkpoint(read_manifest(bad), "ldm", (dir_ / "bad.safetensors").string()), Error);
}

}  // namespace
}  // namespace diffuse
