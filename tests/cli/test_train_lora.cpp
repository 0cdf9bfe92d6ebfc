// `diffuse train lora` end to end on the tiny sd1 model: a LoRA trained for 300 steps on eight
// 64×64 images of one pattern lowers the validation loss and pulls generation towards the
// training latents; the file it writes is a kohya LoRA (keys, shapes, ss_* metadata, the
// safetensors data hash) that `diffuse generate --lora` loads; bad inputs are one-line errors
// that write nothing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <regex>
#include <set>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "cli_util.h"
#include "train_util.h"
#include "core/arena.h"
#include "core/sha256.h"
#include "io/image.h"
#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "nn/layers.h"

using namespace clitest;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// One training run shared by the tests that inspect its output (under ctest each test is its own
// process, so each of the two trains once).
class TrainLora : public ::testing::Test {
 protected:
  static inline std::string data_dir, out_path;
  static inline Result train;
  static inline double train_s = 0;

  static void SetUpTestSuite() {
    if (sd1_model().empty()) return;
    data_dir = write_dataset(temp_dir() + "/data_sks");
    fs::create_directories(temp_dir() + "/out");
    out_path = temp_dir() + "/out/sks.safetensors";
    const auto t0 = std::chrono::steady_clock::now();
    train = run({"train", "lora", "-m", sd1_model(), "--data", data_dir, "-o", out_path, "--resolution",
                 std::to_string(kSide), "--steps", std::to_string(kSteps), "--lr", "1e-3", "--rank", std::to_string(kRank),
                 "--seed", "1"},
                600);
    train_s = seconds_since(t0);
    std::printf("[ train    ] %d steps in %.1f s (exit %d)\n", kSteps, train_s, train.exit_code);
  }

  void SetUp() override {
    if (sd1_model().empty()) GTEST_SKIP() << "tiny-sd1 fixture not found";
    ASSERT_EQ(train.exit_code, 0) << "signal " << train.signal << "\n" << train.err;
  }
};

// Generates with the LoRA at `mult` and returns the saved latent (NCHW [1, 4, 8, 8], not divided
// by the scaling factor).
std::vector<float> generate_latent(const std::string& lora, const std::string& mult, const std::string& tag) {
  const std::string lat = temp_dir() + "/latent_" + tag + ".safetensors";
  const std::string png = temp_dir() + "/gen_" + tag + ".png";
  Result r = run({"generate", "-m", sd1_model(), "-W", "64", "-H", "64", "-p", kCaption, "--sampler", "euler", "--rng",
                  "cpu", "--steps", "20", "-s", "7", "--save-latent", lat, "--lora", lora + ":" + mult, "-o", png, "-q"},
                 300);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  if (r.exit_code != 0) return {};
  diffuse::TensorFile f = diffuse::load_safetensors(lat);
  const diffuse::Tensor* t = f.find("latent");
  EXPECT_NE(t, nullptr) << lat << ": no 'latent' tensor";
  if (!t) return {};
  EXPECT_EQ(t->shape().str(), diffuse::Shape({1, 4, kSide / 8, kSide / 8}).str());
  diffuse::Tensor c = t->to(diffuse::DType::F32);
  return std::vector<float>(c.f32(), c.f32() + c.numel());
}

// The issue's acceptance: validation loss at the end ≤ 0.8 × the start, and a generation with the
// LoRA at 1 lands at least 30% nearer (mean squared distance) to the nearest training latent than
// the same generation at 0.
TEST_F(TrainLora, LearnsThePattern) {
  const double v0 = parse_loss(train.err, "start"), v1 = parse_loss(train.err, "end");
  std::printf("[ figures  ] validation loss start %.6f end %.6f (ratio %.3f)\n", v0, v1, v1 / v0);
  ASSERT_TRUE(std::isfinite(v0) && std::isfinite(v1)) << train.err;
  EXPECT_LE(v1, 0.8 * v0) << "validation loss did not fall by 20%";

  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<float> g1 = generate_latent(out_path, "1", "m1");
  const std::vector<float> g0 = generate_latent(out_path, "0", "m0");
  ASSERT_FALSE(g1.empty() || g0.empty());
  const std::vector<std::vector<float>> tl = training_latents(sd1_model(), 0);
  const double d1 = nearest_msd(g1, tl), d0 = nearest_msd(g0, tl);
  std::printf("[ figures  ] nearest training latent: d(:1) %.5f d(:0) %.5f ratio %.3f (generation + VAE %.1f s)\n", d1,
              d0, d1 / d0, seconds_since(t0));
  auto rms = [](const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += double(x) * x;
    return std::sqrt(s / double(v.size()));
  };
  std::printf("[ figures  ] latent RMS: :1 %.3f, :0 %.3f, training image 0 %.3f\n", rms(g1), rms(g0), rms(tl[0]));
  ASSERT_TRUE(std::isfinite(d1) && std::isfinite(d0));
  EXPECT_LE(d1, 0.7 * d0) << "the LoRA did not pull generation 30% nearer to the training latents";
}

TEST_F(TrainLora, FileIsKohyaCompatible) {
  const std::string bytes = slurp(out_path);
  const Header h = read_header(bytes);
  ASSERT_TRUE(h.j.is_object()) << out_path << ": unreadable header";

  // Keys: <module>.lora_down.weight [rank, in] (or [rank, in, 1, 1]), .lora_up.weight [out, rank]
  // (or [out, rank, 1, 1]), .alpha (a scalar equal to network_alpha, 1 by default).
  std::map<std::string, std::set<std::string>> modules;
  for (const auto& [name, e] : h.j.items()) {
    if (name == "__metadata__") continue;
    EXPECT_EQ(name.rfind("lora_unet_", 0), 0u) << name;
    for (const char* suffix : {".lora_down.weight", ".lora_up.weight", ".alpha"}) {
      const std::string sfx = suffix;
      if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
        modules[name.substr(0, name.size() - sfx.size())].insert(sfx);
        break;
      }
    }
  }
  EXPECT_EQ(modules.size(), 192u);
  diffuse::TensorFile f = diffuse::load_safetensors(out_path);
  size_t conv1x1 = 0;
  for (const auto& [m, parts] : modules) {
    ASSERT_EQ(parts.size(), 3u) << m << ": missing one of lora_down/lora_up/alpha";
    const diffuse::Tensor* down = f.find(m + ".lora_down.weight");
    const diffuse::Tensor* up = f.find(m + ".lora_up.weight");
    const diffuse::Tensor* alpha = f.find(m + ".alpha");
    ASSERT_TRUE(down && up && alpha) << m;
    const diffuse::Shape ds = down->shape(), us = up->shape();
    const bool is_conv = m.find("proj_in") != std::string::npos || m.find("proj_out") != std::string::npos;
    if (ds.rank() == 4) {
      ++conv1x1;
      EXPECT_TRUE(is_conv) << m << ": 4-D lora_down " << ds.str();
      EXPECT_EQ(ds[2], 1) << m;
      EXPECT_EQ(ds[3], 1) << m;
      ASSERT_EQ(us.rank(), 4) << m;
      EXPECT_EQ(us[2], 1) << m;
      EXPECT_EQ(us[3], 1) << m;
    } else {
      ASSERT_EQ(ds.rank(), 2) << m << ": lora_down " << ds.str();
      ASSERT_EQ(us.rank(), 2) << m << ": lora_up " << us.str();
    }
    EXPECT_EQ(ds[0], kRank) << m;
    EXPECT_EQ(us[1], kRank) << m;
    EXPECT_GT(ds[1], 0) << m;
    EXPECT_GT(us[0], 0) << m;
    ASSERT_EQ(alpha->numel(), 1) << m;
    EXPECT_FLOAT_EQ(alpha->to(diffuse::DType::F32).f32()[0], 1.0f) << m;
  }
  std::printf("[ file     ] %zu modules (%zu as 1x1 convs), %zu bytes\n", modules.size(), conv1x1, bytes.size());

  // Metadata.
  ASSERT_TRUE(h.j.contains("__metadata__"));
  const json& md = h.j["__metadata__"];
  auto meta = [&](const std::string& k) { return md.contains(k) ? md[k].get<std::string>() : std::string("<absent>"); };
  EXPECT_EQ(meta("ss_network_module"), "networks.lora");
  EXPECT_EQ(meta("ss_base_model_version"), "sd_v1");
  EXPECT_EQ(meta("ss_v2"), "False");
  EXPECT_EQ(meta("ss_v_parameterization"), "False");
  EXPECT_EQ(meta("ss_network_dim"), std::to_string(kRank));
  EXPECT_EQ(json::parse(meta("ss_tag_frequency"), nullptr, false), tag_frequency_of(data_dir))
      << meta("ss_tag_frequency");
  EXPECT_EQ(json::parse(meta("ss_tag_frequency"), nullptr, false), json::parse(R"({"10_sks": {"sks pattern": 8}})"));
  EXPECT_EQ(json::parse(meta("ss_dataset_dirs"), nullptr, false),
            json::parse(R"({"10_sks": {"n_repeats": 10, "img_count": 8}})"))
      << meta("ss_dataset_dirs");
  // sshs_model_hash: SHA-256 of the bytes after the 8-byte length and the JSON header.
  diffuse::Sha256 sha;
  sha.update(bytes.data() + 8 + h.size, bytes.size() - 8 - size_t(h.size));
  EXPECT_EQ(meta("sshs_model_hash"), sha.hex());

  // The loss log: a header, the start's validation row, one row per step, the end's row.
  const std::string csv = slurp(out_path + ".csv");
  std::vector<std::string> lines;
  for (size_t p = 0; p < csv.size();) {
    size_t nl = csv.find('\n', p);
    if (nl == std::string::npos) nl = csv.size();
    lines.push_back(csv.substr(p, nl - p));
    p = nl + 1;
  }
  ASSERT_FALSE(lines.empty()) << out_path << ".csv is empty";
  EXPECT_EQ(lines[0], "step,loss,lr,val_loss");
  int step_rows = 0, next = 1;
  for (size_t i = 1; i < lines.size(); ++i) {
    const std::string& l = lines[i];
    const int step = std::atoi(l.c_str());
    const bool val_only = l.find(",,,") != std::string::npos;
    if (val_only) continue;  // the validation rows at 0 and at the end
    EXPECT_EQ(step, next) << "row " << i << ": " << l;
    ++next;
    ++step_rows;
  }
  EXPECT_EQ(step_rows, kSteps);

  // diffuse itself loads it.
  Result g = run({"generate", "-m", sd1_model(), "-W", "64", "-H", "64", "-p", kCaption, "--steps", "2", "--lora",
                  out_path + ":1", "-o", temp_dir() + "/kohya_check.png"},
                 300);
  EXPECT_EQ(g.exit_code, 0) << g.err;
  EXPECT_NE(g.err.find("lora: 192 modules merged"), std::string::npos) << g.err;
}

// ---- LoCon: --conv-rank / --conv-alpha (kohya's conv_dim / conv_alpha) ----

struct LoconExpected {
  float alpha;
  diffuse::Shape down, up;
};

bool in_resnet_or_resampler(const std::string& name) {
  return name.find("resnets.") != std::string::npos || name.find("downsamplers.") != std::string::npos ||
         name.find("upsamplers.") != std::string::npos;
}

// kohya's modules with conv_dim, from a UNet's diffusers tensor names: the default set (linear
// layers and 1×1 convolutions inside attentions) at the network's rank and alpha, and every
// linear layer and convolution inside a ResNet block or resampler: k×k ones at the conv rank and
// alpha, the rest (conv_shortcut 1×1, time_emb_proj) at the network's. Key -> alpha and shapes.
std::map<std::string, LoconExpected> locon_modules(const diffuse::TensorFile& unet, int64_t rank, float alpha,
                                                   int64_t conv_rank, float conv_alpha) {
  std::map<std::string, LoconExpected> out;
  for (const diffuse::TensorEntry& e : unet.tensors) {
    const std::string& n = e.name;
    const diffuse::Shape& s = e.tensor.shape();
    if (n.size() < 7 || n.compare(n.size() - 7, 7, ".weight") != 0 || (s.rank() != 2 && s.rank() != 4)) continue;
    const bool kxk = s.rank() == 4 && (s[2] > 1 || s[3] > 1);
    const bool attn = n.find("attentions.") != std::string::npos;
    if (!(attn && !kxk) && !in_resnet_or_resampler(n)) continue;
    std::string key = "lora_unet_" + n.substr(0, n.size() - 7);
    std::replace(key.begin(), key.end(), '.', '_');
    const int64_t r = kxk ? conv_rank : rank;
    out[key] = {kxk ? conv_alpha : alpha, s.rank() == 4 ? diffuse::Shape{r, s[1], s[2], s[3]} : diffuse::Shape{r, s[1]},
                s.rank() == 4 ? diffuse::Shape{s[0], r, 1, 1} : diffuse::Shape{s[0], r}};
  }
  return out;
}

// The single-file checkpoint's ResNet/resampler layers by their ldm names: 3×3 convolutions
// other than conv_in (input_blocks.0.0) and conv_out (out.2), and the skip_connection /
// emb_layers.1 layers.
void count_ldm_resnet_layers(const diffuse::TensorFile& ckpt, int& k3, int& other) {
  k3 = other = 0;
  const std::string p = "model.diffusion_model.";
  for (const diffuse::TensorEntry& e : ckpt.tensors) {
    const std::string& n = e.name;
    if (n.rfind(p, 0) != 0 || n.size() < 7 || n.compare(n.size() - 7, 7, ".weight") != 0) continue;
    const diffuse::Shape& s = e.tensor.shape();
    if (s.rank() == 4 && s[2] == 3 && n != p + "input_blocks.0.0.weight" && n != p + "out.2.weight") ++k3;
    if (n.find(".skip_connection.") != std::string::npos || n.find(".emb_layers.1.") != std::string::npos) ++other;
  }
}

// --conv-rank 4 --conv-alpha 2 --rank 8 --alpha 4, 20 steps: the file holds exactly kohya's
// LoCon modules (keys, shapes, alphas), the 3×3 ups have trained away from zero, ss_network_args
// says conv_dim/conv_alpha, and `generate --lora` applies it: the whole file and its conv modules
// alone each change the latent from the one at multiplier 0.
TEST(TrainLoraLocon, ConvModulesMetadataAndGeneration) {
  const std::string df_unet = data("sd1/model/diffusers/unet/diffusion_pytorch_model.safetensors");
  if (sd1_model().empty() || df_unet.empty()) GTEST_SKIP() << "tiny-sd1 fixture (single file and diffusers) not found";
  const std::string dir = write_dataset(temp_dir() + "/data_locon");
  fs::create_directories(temp_dir() + "/out");
  const std::string out = temp_dir() + "/out/locon.safetensors";
  const auto t0 = std::chrono::steady_clock::now();
  Result r = run({"train", "lora", "-m", sd1_model(), "--data", dir, "-o", out, "--resolution", std::to_string(kSide),
                  "--steps", "20", "--lr", "1e-3", "--rank", "8", "--alpha", "4", "--conv-rank", "4", "--conv-alpha",
                  "2", "--seed", "1"},
                 600);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::printf("[ locon    ] 20 steps in %.1f s\n", seconds_since(t0));

  const std::map<std::string, LoconExpected> want = locon_modules(diffuse::load_safetensors(df_unet), 8, 4.0f, 4, 2.0f);
  int want_k3 = 0, want_other = 0, ldm_k3 = 0, ldm_other = 0;
  std::set<std::string> resnet_keys;  // the LoCon additions
  for (const auto& [k, e] : want) {
    const bool resnet = k.find("_resnets_") != std::string::npos || k.find("samplers_") != std::string::npos;
    if (resnet) resnet_keys.insert(k);
    want_k3 += e.down.rank() == 4 && e.down[2] == 3;
    want_other += resnet && !(e.down.rank() == 4 && e.down[2] == 3);
  }
  count_ldm_resnet_layers(diffuse::load_safetensors(sd1_model()), ldm_k3, ldm_other);
  EXPECT_EQ(want_k3, ldm_k3) << "3×3 ResNet/resampler convolutions: diffusers folder vs single file";
  EXPECT_EQ(want_other, ldm_other) << "conv_shortcut + time_emb_proj: diffusers folder vs single file";

  diffuse::TensorFile f = diffuse::load_safetensors(out);
  std::set<std::string> got;
  for (const diffuse::TensorEntry& e : f.tensors) got.insert(e.name.substr(0, e.name.find('.')));
  std::vector<std::string> missing, extra;
  for (const auto& [k, e] : want)
    if (!got.count(k)) missing.push_back(k);
  for (const std::string& k : got)
    if (!want.count(k)) extra.push_back(k);
  EXPECT_TRUE(missing.empty()) << missing.size() << " modules missing, first " << missing.front();
  EXPECT_TRUE(extra.empty()) << extra.size() << " unexpected modules, first " << extra.front();
  int trained_k3 = 0;
  for (const auto& [k, e] : want) {
    const diffuse::Tensor *down = f.find(k + ".lora_down.weight"), *up = f.find(k + ".lora_up.weight"),
                          *alpha = f.find(k + ".alpha");
    if (!down || !up || !alpha) continue;  // reported above
    EXPECT_EQ(down->shape().str(), e.down.str()) << k;
    EXPECT_EQ(up->shape().str(), e.up.str()) << k;
    EXPECT_FLOAT_EQ(alpha->to(diffuse::DType::F32).f32()[0], e.alpha) << k;
    if (e.down.rank() == 4 && e.down[2] == 3) {
      const diffuse::Tensor u = up->to(diffuse::DType::F32);
      float mx = 0;
      for (int64_t i = 0; i < u.numel(); ++i) mx = std::max(mx, std::abs(u.f32()[i]));
      trained_k3 += mx > 0;
    }
  }
  EXPECT_EQ(trained_k3, want_k3) << "3×3 modules whose up is still zero after 20 steps";
  std::printf("[ locon    ] %zu modules: %d 3×3 (conv rank 4), %d conv_shortcut/time_emb_proj (rank 8), the rest "
              "attention\n",
              want.size(), want_k3, want_other);

  const json md = read_header(slurp(out)).j["__metadata__"];
  EXPECT_EQ(json::parse(md.value("ss_network_args", "null"), nullptr, false),
            json::parse(R"({"conv_dim": "4", "conv_alpha": "2"})"))
      << md.value("ss_network_args", "<absent>");
  EXPECT_EQ(md.value("ss_network_dim", ""), "8");
  EXPECT_EQ(md.value("ss_network_alpha", ""), "4");

  // The conv modules alone, as their own LoRA file.
  std::vector<std::pair<std::string, diffuse::Tensor>> conv_only;
  for (const diffuse::TensorEntry& e : f.tensors)
    if (resnet_keys.count(e.name.substr(0, e.name.find('.')))) conv_only.emplace_back(e.name, e.tensor);
  ASSERT_FALSE(conv_only.empty());
  const std::string conv_path = temp_dir() + "/out/locon_conv_only.safetensors";
  diffuse::save_safetensors(conv_path, conv_only);

  const std::vector<float> g0 = generate_latent(out, "0", "locon0"), g1 = generate_latent(out, "1", "locon1"),
                           gc = generate_latent(conv_path, "1", "locon_conv");
  ASSERT_TRUE(!g0.empty() && g0.size() == g1.size() && g0.size() == gc.size());
  auto max_diff = [&](const std::vector<float>& a) {
    double d = 0;
    for (size_t i = 0; i < a.size(); ++i) d = std::max(d, double(std::abs(a[i] - g0[i])));
    return d;
  };
  std::printf("[ locon    ] max |latent − latent at :0|: whole file %.2e, conv modules alone %.2e\n", max_diff(g1),
              max_diff(gc));
  EXPECT_GT(max_diff(g1), 1e-3);
  EXPECT_GT(max_diff(gc), 1e-3);
}

// ---- errors: exit 1, one "diffuse: error:" line naming the problem, nothing written ----

void expect_error(const std::vector<std::string>& extra, const std::string& out, const std::string& needle,
                  const std::string& data_dir) {
  std::vector<std::string> args = {"train", "lora", "-m", sd1_model(), "-o", out};
  if (!data_dir.empty()) args.insert(args.end(), {"--data", data_dir});
  args.insert(args.end(), extra.begin(), extra.end());
  Result r = run(args, 300);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(count_lines_with(r.err, "diffuse: error:"), 1) << r.err;
  const size_t at = r.err.find("diffuse: error:");
  const std::string line = at == std::string::npos ? "" : r.err.substr(at, r.err.find('\n', at) - at);
  EXPECT_NE(line.find(needle), std::string::npos) << "expected '" << needle << "' in: " << line;
  EXPECT_FALSE(fs::exists(out)) << out;
  EXPECT_FALSE(fs::exists(out + ".csv")) << out << ".csv";
  EXPECT_FALSE(fs::exists(out + ".state.safetensors")) << out << ".state.safetensors";
}

class TrainLoraErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    if (sd1_model().empty()) GTEST_SKIP() << "tiny-sd1 fixture not found";
  }
};

TEST_F(TrainLoraErrors, EmptyDataFolder) {
  const std::string empty = temp_dir() + "/err_empty";
  fs::create_directories(empty);
  expect_error({"--resolution", "64", "--steps", "2"}, temp_dir() + "/err_empty.safetensors", empty, empty);
}

TEST_F(TrainLoraErrors, ResolutionNotAMultipleOf8) {
  const std::string dir = write_dataset(temp_dir() + "/err_res");
  expect_error({"--resolution", "100", "--steps", "2"}, temp_dir() + "/err_res.safetensors", "--resolution 100", dir);
}

TEST_F(TrainLoraErrors, DataIsAFile) {
  const std::string file = temp_dir() + "/err_file.png";
  diffuse::write_png(file, pattern_image(0));
  expect_error({"--resolution", "64", "--steps", "2"}, temp_dir() + "/err_file.safetensors", file, file);
}

TEST_F(TrainLoraErrors, NoStepsOrEpochs) {
  const std::string dir = write_dataset(temp_dir() + "/err_steps");
  expect_error({"--resolution", "64"}, temp_dir() + "/err_steps.safetensors", "--steps", dir);
}

TEST_F(TrainLoraErrors, BadConvRank) {
  const std::string dir = write_dataset(temp_dir() + "/err_conv");
  expect_error({"--resolution", "64", "--steps", "2", "--conv-rank", "-1"}, temp_dir() + "/err_conv.safetensors",
               "--conv-rank -1", dir);
  expect_error({"--resolution", "64", "--steps", "2", "--conv-rank", "4", "--network-weights", sd1_model()},
               temp_dir() + "/err_conv.safetensors", "--conv-rank: not with --network-weights", dir);
}

TEST_F(TrainLoraErrors, CorruptPngIsSkippedOrWithStrictAnError) {
  const std::string dir = temp_dir() + "/err_corrupt";
  fs::create_directories(dir + "/2_sks");
  for (int i = 0; i < 2; ++i) {
    diffuse::write_png(dir + "/2_sks/good_" + std::to_string(i) + ".png", pattern_image(i));
    write_file(dir + "/2_sks/good_" + std::to_string(i) + ".txt", std::string(kCaption) + "\n");
  }
  // A PNG signature followed by garbage.
  write_file(dir + "/2_sks/broken.png", std::string("\x89PNG\r\n\x1a\n", 8) + std::string(200, '\x5a'));
  write_file(dir + "/2_sks/broken.txt", std::string(kCaption) + "\n");

  // Default: skipped with a warning naming it; training goes on with the two good images.
  const std::string out = temp_dir() + "/corrupt_ok.safetensors";
  Result r = run({"train", "lora", "-m", sd1_model(), "--data", dir, "-o", out, "--resolution", "64", "--steps", "2",
                  "--rank", "2"},
                 300);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(count_lines_with(r.err, "diffuse: error:"), 0) << r.err;
  bool warned = false;
  for (size_t p = 0; (p = r.err.find("warning", p)) != std::string::npos; ++p) {
    const size_t bol = r.err.rfind('\n', p) == std::string::npos ? 0 : r.err.rfind('\n', p) + 1;
    const std::string line = r.err.substr(bol, r.err.find('\n', p) - bol);
    if (line.find("broken.png") != std::string::npos) warned = true;
  }
  EXPECT_TRUE(warned) << "no warning line names broken.png:\n" << r.err;
  EXPECT_TRUE(fs::exists(out));
  if (fs::exists(out)) {
    const json md = read_header(slurp(out)).j["__metadata__"];
    EXPECT_EQ(json::parse(md.value("ss_dataset_dirs", "{}"), nullptr, false),
              json::parse(R"({"2_sks": {"n_repeats": 2, "img_count": 2}})"));
  }

  // --strict: an error naming it.
  expect_error({"--resolution", "64", "--steps", "2", "--strict"}, temp_dir() + "/corrupt_strict.safetensors",
               "broken.png", dir);
}

}  // namespace
