// `diffuse train lora` on SDXL (the tiny SDXL fixture) with --train-text-encoder and LoCon: a
// 20-step run writes kohya's SDXL LoRA file
//  - UNet modules under kohya's SGM/ldm names (sdxl_original_unet: "lora_unet_input_blocks_4_1_…",
//    "lora_unet_middle_block_…", "lora_unet_output_blocks_…"), exactly the set computed here from
//    the model file's own (ldm) tensor names: every linear / 1×1 layer of the transformers, and
//    with --conv-rank every layer of the ResBlocks and resamplers;
//  - text-encoder modules lora_te1_… (CLIP-L) and lora_te2_… (OpenCLIP bigG, under HF CLIP names:
//    the file's fused in_proj as q/k/v) on every attention and MLP linear of both encoders, with
//    the layers' shapes; ss_base_model_version "sdxl_base_v1-0";
//  - both encoders learned (their lora_up moved off zero, encoder 2's last layer too: it reaches
//    the loss only through the pooled embedding), except encoder 1's last layer, whose output SDXL
//    does not read (its lora_up stays exactly zero);
//  - the start validation loss equals a run without --train-text-encoder's (the encoders' training
//    forward gives inference's conditioning);
//  - `generate --lora F:1` loads it with every module merged and differs from `:0`;
//  - --network-weights reads it back: a 1-step run from it reports, at its start, the first run's
//    final validation loss.
// And SD 1.x with --train-text-encoder: lora_te_ modules beside diffusers-named UNet ones, read
// back by --network-weights.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "cli_util.h"
#include "io/tensor_file.h"
#include "train_util.h"

using namespace clitest;

namespace {

constexpr int kSdxlRank = 4, kConvRank = 2;

std::string sdxl_model() { return data("sdxl/model/tiny-sdxl.safetensors"); }

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}

// The modules kohya's SDXL trainer makes for this model, from the file's ldm tensor names:
// module key -> the layer's weight shape [out, in(, kh, kw)].
std::map<std::string, std::vector<int64_t>> expected_modules(const json& model_header) {
  std::map<std::string, std::vector<int64_t>> out;
  const std::string unet = "model.diffusion_model.", te1 = "conditioner.embedders.0.transformer.",
                    te2 = "conditioner.embedders.1.model.transformer.resblocks.";
  for (const auto& [name, e] : model_header.items()) {
    if (name == "__metadata__") continue;
    const std::vector<int64_t> shape = e["shape"].get<std::vector<int64_t>>();
    const bool weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 && shape.size() >= 2;
    if (name.rfind(unet, 0) == 0 && weight) {
      const std::string m = name.substr(unet.size(), name.size() - unet.size() - 7);
      // Transformers (SpatialTransformer): proj_in/out and the blocks' linears.
      const bool transformer = has(m, ".transformer_blocks.") || has(m, ".proj_in") || has(m, ".proj_out");
      // LoCon: ResBlock layers (in_layers.2, emb_layers.1, out_layers.3, skip_connection),
      // downsamplers (input_blocks.N.0.op) and upsamplers (output_blocks.N.K.conv).
      const bool resblock = has(m, ".in_layers.2") || has(m, ".emb_layers.1") || has(m, ".out_layers.3") ||
                            has(m, ".skip_connection");
      const bool resampler = (m.rfind("input_blocks.", 0) == 0 && has(m, ".0.op")) ||
                             (m.rfind("output_blocks.", 0) == 0 && m.size() > 5 && m.compare(m.size() - 5, 5, ".conv") == 0);
      if (transformer || resblock || resampler) out["lora_unet_" + underscored(m)] = shape;
    } else if (name.rfind(te1, 0) == 0 && weight && (has(name, ".self_attn.") || has(name, ".mlp."))) {
      out["lora_te1_" + underscored(name.substr(te1.size(), name.size() - te1.size() - 7))] = shape;
    } else if (name.rfind(te2, 0) == 0) {
      // OpenCLIP resblocks.N.{attn.in_proj_weight [3W, W], attn.out_proj, mlp.c_fc, mlp.c_proj}
      // -> HF text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, mlp.fc1, mlp.fc2}.
      const std::string rest = name.substr(te2.size());
      const std::string n = rest.substr(0, rest.find('.')), tail = rest.substr(rest.find('.') + 1);
      const std::string pre = "lora_te2_text_model_encoder_layers_" + n + "_";
      if (tail == "attn.in_proj_weight")
        for (const char* p : {"q", "k", "v"}) out[pre + "self_attn_" + p + "_proj"] = {shape[0] / 3, shape[1]};
      else if (tail == "attn.out_proj.weight") out[pre + "self_attn_out_proj"] = shape;
      else if (tail == "mlp.c_fc.weight") out[pre + "mlp_fc1"] = shape;
      else if (tail == "mlp.c_proj.weight") out[pre + "mlp_fc2"] = shape;
    }
  }
  return out;
}

double max_abs(const diffuse::Tensor& t) {
  const diffuse::Tensor f = t.to(diffuse::DType::F32);
  double m = 0;
  for (int64_t i = 0; i < f.numel(); ++i) m = std::max(m, double(std::abs(f.f32()[i])));
  return m;
}

class TrainSdxl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (sdxl_model().empty()) GTEST_SKIP() << "tiny-sdxl fixture not found (../shared/fixtures/sdxl)";
  }
  std::string dir() const { return temp_dir() + "/sdxl_te"; }
  Result train(const std::string& data_dir, const std::string& out, int steps, const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"train", "lora", "-m", sdxl_model(), "--data", data_dir, "-o", out,
                                     "--resolution", std::to_string(kSide), "--steps", std::to_string(steps), "--lr",
                                     "1e-3", "--rank", std::to_string(kSdxlRank), "--alpha", "2", "--seed", "1",
                                     "--save-precision", "float"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args, 600);
  }
};

TEST_F(TrainSdxl, TextEncoderLoraWithKohyaNames) {
  const std::string data_dir = write_dataset(dir() + "/data", 0);
  const std::string lora = dir() + "/sdxl_te.safetensors";
  const auto t0 = std::chrono::steady_clock::now();
  Result r = train(data_dir, lora, 20,
                   {"--train-text-encoder", "--conv-rank", std::to_string(kConvRank), "--conv-alpha", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const double v0 = parse_loss(r.err, "start"), v1 = parse_loss(r.err, "end");
  std::printf("[ figures  ] sdxl te lora: 20 steps in %.1f s, validation loss %.6f -> %.6f\n", seconds_since(t0), v0, v1);
  ASSERT_TRUE(std::isfinite(v0) && std::isfinite(v1)) << r.err;

  // The file's modules: exactly the expected set, each with down/up/alpha of the layer's shape.
  const Header model_h = read_header(slurp(sdxl_model()));
  ASSERT_TRUE(model_h.j.is_object());
  const std::map<std::string, std::vector<int64_t>> want = expected_modules(model_h.j);
  const Header h = read_header(slurp(lora));
  ASSERT_TRUE(h.j.is_object()) << lora;
  std::set<std::string> got;
  for (const auto& [name, e] : h.j.items()) {
    if (name == "__metadata__") continue;
    const size_t dot = name.find('.');
    ASSERT_NE(dot, std::string::npos) << name;
    got.insert(name.substr(0, dot));
  }
  std::set<std::string> want_keys;
  for (const auto& [k, s] : want) want_keys.insert(k);
  std::vector<std::string> missing, extra;
  std::set_difference(want_keys.begin(), want_keys.end(), got.begin(), got.end(), std::back_inserter(missing));
  std::set_difference(got.begin(), got.end(), want_keys.begin(), want_keys.end(), std::back_inserter(extra));
  EXPECT_TRUE(missing.empty()) << missing.size() << " expected modules missing, first " << missing.front();
  EXPECT_TRUE(extra.empty()) << extra.size() << " unexpected modules, first " << extra.front();

  diffuse::TensorFile f = diffuse::load_safetensors(lora);
  int unet = 0, te1 = 0, te2 = 0, kxk = 0;
  std::vector<std::string> te_unlearned;
  int te_layers = 0;  // encoder 1's layers, from the expected keys
  for (const auto& [m, ws] : want)
    if (m.rfind("lora_te1_text_model_encoder_layers_", 0) == 0)
      te_layers = std::max(te_layers, 1 + std::stoi(m.substr(std::string("lora_te1_text_model_encoder_layers_").size())));
  for (const auto& [m, ws] : want) {
    SCOPED_TRACE(m);
    const diffuse::Tensor* down = f.find(m + ".lora_down.weight");
    const diffuse::Tensor* up = f.find(m + ".lora_up.weight");
    const diffuse::Tensor* alpha = f.find(m + ".alpha");
    ASSERT_TRUE(down && up && alpha);
    const bool conv3 = ws.size() == 4 && ws[2] > 1;
    const int64_t rank = conv3 ? kConvRank : kSdxlRank;
    std::vector<int64_t> ds = {rank, ws[1]}, us = {ws[0], rank};
    if (ws.size() == 4) ds.insert(ds.end(), {ws[2], ws[3]}), us.insert(us.end(), {1, 1});
    EXPECT_EQ(down->shape().vec(), ds);
    EXPECT_EQ(up->shape().vec(), us);
    EXPECT_FLOAT_EQ(alpha->to(diffuse::DType::F32).f32()[0], conv3 ? 1.0f : 2.0f);
    kxk += conv3;
    if (m.rfind("lora_unet_", 0) == 0) {
      ++unet;
      continue;
    }
    const bool first = m.rfind("lora_te1_", 0) == 0;
    ++(first ? te1 : te2);
    const bool unread = first && has(m, "_layers_" + std::to_string(te_layers - 1) + "_");
    if (unread) EXPECT_EQ(max_abs(*up), 0.0) << "encoder 1's last layer is not read by SDXL";
    else if (max_abs(*up) == 0.0) te_unlearned.push_back(m);
  }
  EXPECT_TRUE(te_unlearned.empty()) << te_unlearned.size() << " text-encoder modules did not learn, first "
                                    << te_unlearned.front();
  std::printf("[ file     ] %d UNet modules (%d on k×k convolutions), te1 %d, te2 %d\n", unet, kxk, te1, te2);
  EXPECT_GT(te_layers, 1);
  EXPECT_EQ(te1, 6 * te_layers);
  EXPECT_GT(te2, 0);
  EXPECT_GT(kxk, 0);
  EXPECT_TRUE(got.count("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q"));
  EXPECT_NE(r.err.find(std::to_string(te1 + te2) + " text encoder modules (te1 " + std::to_string(te1) + ", te2 " +
                       std::to_string(te2) + ")"),
            std::string::npos)
      << r.err;

  const json& md = h.j["__metadata__"];
  auto meta = [&](const std::string& k) { return md.contains(k) ? md[k].get<std::string>() : std::string("<absent>"); };
  EXPECT_EQ(meta("ss_base_model_version"), "sdxl_base_v1-0");
  EXPECT_EQ(meta("ss_text_encoder_lr"), "0.001");
  EXPECT_EQ(meta("modelspec.architecture"), "stable-diffusion-xl-v1-base/lora");

  // Without --train-text-encoder the run starts from the same validation loss.
  Result plain = train(data_dir, dir() + "/plain.safetensors", 1, {});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_NEAR(parse_loss(plain.err, "start"), v0, 2e-6) << "the training encoders' conditioning differs from inference's";

  // generate loads every module; the LoRA changes the image.
  auto generate = [&](const std::string& spec, const std::string& tag) {
    const std::string png = dir() + "/gen_" + tag + ".png";
    Result g = run({"generate", "-m", sdxl_model(), "-W", std::to_string(kSide), "-H", std::to_string(kSide), "-p",
                    kCaption, "--steps", "4", "--seed", "3", "--lora", spec, "-o", png},
                   300);
    EXPECT_EQ(g.exit_code, 0) << g.err;
    if (tag == "m1") {
      EXPECT_NE(g.err.find("lora: " + std::to_string(want.size()) + " modules merged"), std::string::npos) << g.err;
      EXPECT_EQ(g.err.find("not applied"), std::string::npos) << g.err;
    }
    return slurp(png);
  };
  const std::string g1 = generate(lora + ":1", "m1"), g0 = generate(lora + ":0", "m0");
  ASSERT_FALSE(g1.empty() || g0.empty());
  EXPECT_NE(g1, g0) << "the LoRA at multiplier 1 gives the image of multiplier 0";

  // --network-weights reads the file back (SGM UNet names, lora_te1_/lora_te2_).
  Result again = train(data_dir, dir() + "/again.safetensors", 1, {"--train-text-encoder", "--network-weights", lora});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NE(again.err.find("(" + std::to_string(want.size()) + " modules)"), std::string::npos) << again.err;
  EXPECT_NEAR(parse_loss(again.err, "start"), v1, 2e-6) << "the LoRA read back does not give the run's final loss";
  // Its text-encoder modules need --train-text-encoder.
  Result refused = train(data_dir, dir() + "/refused.safetensors", 1, {"--network-weights", lora});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.err.find(lora), std::string::npos) << refused.err;
  EXPECT_NE(refused.err.find("lora_te"), std::string::npos) << refused.err;
}

// SD 1.x keeps kohya's single-encoder form: lora_te_ modules (every layer's attention and MLP
// linears, all learning: SD 1.x reads the last layer) beside diffusers-named UNet modules, and
// --network-weights reads them back with the run's final validation loss.
TEST(TrainSd1TextEncoder, LoraTeModulesReadBack) {
  if (sd1_model().empty()) GTEST_SKIP() << "tiny-sd1 fixture not found";
  const std::string dir = temp_dir() + "/sd1_te", data_dir = write_dataset(dir + "/data", 0);
  const std::string lora = dir + "/sd1_te.safetensors";
  auto train = [&](const std::string& out, int steps, const std::vector<std::string>& extra) {
    std::vector<std::string> args = {"train", "lora", "-m", sd1_model(), "--data", data_dir, "-o", out,
                                     "--resolution", std::to_string(kSide), "--steps", std::to_string(steps),
                                     "--lr", "1e-3", "--rank", "4", "--seed", "1", "--save-precision", "float",
                                     "--train-text-encoder"};
    args.insert(args.end(), extra.begin(), extra.end());
    return run(args, 600);
  };
  Result r = train(lora, 10, {});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  diffuse::TensorFile f = diffuse::load_safetensors(lora);
  int unet = 0, te = 0;
  for (const diffuse::TensorEntry& e : f.tensors) {
    const std::string sfx = ".lora_up.weight";
    if (e.name.size() < sfx.size() || e.name.compare(e.name.size() - sfx.size(), sfx.size(), sfx) != 0) continue;
    if (e.name.rfind("lora_unet_", 0) == 0) {
      ++unet;
      EXPECT_TRUE(e.name.rfind("lora_unet_down_blocks_", 0) == 0 || e.name.rfind("lora_unet_mid_block_", 0) == 0 ||
                  e.name.rfind("lora_unet_up_blocks_", 0) == 0)
          << e.name;
      continue;
    }
    ++te;
    EXPECT_EQ(e.name.rfind("lora_te_text_model_encoder_layers_", 0), 0u) << e.name;
    EXPECT_GT(max_abs(e.tensor), 0.0) << e.name << " did not learn";
  }
  std::printf("[ file     ] sd1: %d UNet modules, %d text encoder modules\n", unet, te);
  EXPECT_GT(te, 0);
  EXPECT_EQ(te % 6, 0);
  Result again = train(dir + "/again.safetensors", 1, {"--network-weights", lora});
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_NEAR(parse_loss(again.err, "start"), parse_loss(r.err, "end"), 2e-6) << again.err;
}

}  // namespace
