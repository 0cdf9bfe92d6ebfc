// The module names `diffuse train lora` writes, as kohya's trainers do:
//  - diffusers_unet_name_to_ldm (models/name_map.h): every UNet tensor of the tiny sd1, sd2 and
//    SDXL fixtures (single files in the ldm layout) maps from its diffusers name to the very ldm
//    name the file stores it under, and back through ldm_unet_name_to_diffusers; at full size
//    (the real SD 1.5, 2.1 and SDXL layouts of tests/data/manifests) every diffusers UNet tensor
//    maps to a distinct tensor of the ldm layout;
//  - LoraNetwork on SDXL: UNet modules (kohya's default targets and LoCon) keyed in ldm names
//    ("lora_unet_input_blocks_…", kohya's sdxl_original_unet), text-encoder modules under
//    lora_te1_ / lora_te2_ with HF CLIP paths; saved and read back (from_file, what
//    --network-weights does) with the same keys, layers, targets and values; a file with
//    text-encoder modules is refused, naming the file and key, when the encoders are not given;
//  - on SD 1.x the UNet keys stay in diffusers form ("lora_unet_down_blocks_…"), as kohya writes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "models/name_map.h"
#include "models/sd_model.h"
#include "train/lora_network.h"
#include "lora_net_util.h"

using namespace diffuse;
using namespace diffuse::train;

namespace {

std::string fixture(const std::string& fam) {
  for (const std::string& root : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures", std::string(DIFFUSE_TEST_DATA)}) {
    const std::string p = root + "/" + fam + "/model/tiny-" + fam + ".safetensors";
    if (std::filesystem::exists(p)) return p;
  }
  return {};
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// A fixture model (no VAE) with a fresh network on its UNet: kohya's default targets and LoCon.
struct WithNetwork {
  std::unique_ptr<Backend> be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> model;
  std::unique_ptr<LoraNetwork> net;
  int unet_default = 0;  // modules before LoCon
  explicit WithNetwork(const std::string& path) {
    SDLoadOptions o;
    o.vae_encoder = o.vae_decoder = false;
    model = SDModel::load(path, *be, o);
    net = LoraNetwork::create_unet(model->unet, 4, 2, 1);
    unet_default = int(net->modules().size());
    net->add_unet_conv_targets(model->unet, 4, 2, 3, 1, 1);
  }
};

}  // namespace

class LdmNames : public ::testing::TestWithParam<const char*> {};

TEST_P(LdmNames, EveryUNetTensorMapsToItsLdmNameAndBack) {
  const std::string path = fixture(GetParam());
  if (path.empty()) GTEST_SKIP() << "tiny-" << GetParam() << " fixture not found";
  const TensorFile f = open_model_file(path);
  const Family fam = summarize_model(f).family;
  const WeightStore store = component_weights(f, Component::UNet, fam);
  const UNetConfig cfg = UNetConfig::from_weights(store);
  int n = 0;
  for (const std::string& name : store.names()) {
    SCOPED_TRACE(name);
    const std::string ldm = diffusers_unet_name_to_ldm(name, cfg.layers_per_block, cfg.cross_attn);
    ASSERT_FALSE(ldm.empty());
    EXPECT_NE(f.find("model.diffusion_model." + ldm), nullptr) << ldm << " is not in the file";
    EXPECT_EQ(ldm_unet_name_to_diffusers(ldm, cfg.layers_per_block), name) << ldm;
    ++n;
  }
  std::printf("[names] %s: %d UNet tensors map to their ldm names and back\n", GetParam(), n);
  EXPECT_GT(n, 100);
  // Not UNet names: nothing.
  for (const char* bad : {"text_model.encoder.layers.0.mlp.fc1.weight", "down_blocks.9.resnets.0.conv1.weight",
                          "up_blocks.0.upsamplers.1.conv.weight", "mid_block.resnets.2.norm1.weight", "conv_in"})
    EXPECT_EQ(diffusers_unet_name_to_ldm(bad, cfg.layers_per_block, cfg.cross_attn), "") << bad;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LdmNames, ::testing::Values("sd1", "sd2", "sdxl"));

// The real layouts at full size (tests/data/manifests: every tensor of SD 1.5, 2.1 and SDXL base in
// both layouts, with the diffusers UNet config): every diffusers UNet tensor maps to a tensor of
// the ldm layout, all of them to distinct ones.
class LdmNamesAtFullSize : public ::testing::TestWithParam<const char*> {};

TEST_P(LdmNamesAtFullSize, EveryUNetTensorMapsToAnLdmTensor) {
  std::string dir;
  for (const std::string& d : {std::string(DIFFUSE_TEST_DATA) + "/manifests", std::string(DIFFUSE_SHARED_DIR) + "/manifests"})
    if (std::filesystem::exists(d + "/" + GetParam() + ".tsv")) dir = d;
  if (dir.empty()) GTEST_SKIP() << GetParam() << ".tsv not found in tests/data/manifests or the shared folder";
  std::ifstream cfg_in(dir + "/" + GetParam() + ".config.json");
  const nlohmann::json cfg_json = nlohmann::json::parse(cfg_in);
  const UNetConfig cfg = UNetConfig::from_diffusers_config(cfg_json.at("unet").dump());
  std::ifstream tsv(dir + "/" + GetParam() + ".tsv");
  std::set<std::string> diffusers, ldm;
  std::string line;
  while (std::getline(tsv, line)) {
    std::istringstream row(line);
    std::string layout, component, name;
    row >> layout >> component >> name;
    const std::string prefix = "model.diffusion_model.";
    if (layout == "diffusers" && component == "unet") diffusers.insert(name);
    if (layout == "ldm" && name.rfind(prefix, 0) == 0) ldm.insert(name.substr(prefix.size()));
  }
  ASSERT_GT(diffusers.size(), 600u);
  std::set<std::string> mapped;
  for (const std::string& name : diffusers) {
    const std::string l = diffusers_unet_name_to_ldm(name, cfg.layers_per_block, cfg.cross_attn);
    EXPECT_TRUE(ldm.count(l)) << name << " -> '" << l << "'";
    mapped.insert(l);
  }
  EXPECT_EQ(mapped.size(), diffusers.size());
  std::printf("[names] %s at full size: %zu UNet tensors map to distinct ldm tensors\n", GetParam(), mapped.size());
}

INSTANTIATE_TEST_SUITE_P(Manifests, LdmNamesAtFullSize, ::testing::Values("sd15", "sd21", "sdxl"));

TEST(LoraNames, SdxlNetworkUsesKohyaNamesAndReadsThemBack) {
  const std::string path = fixture("sdxl");
  if (path.empty()) GTEST_SKIP() << "tiny-sdxl fixture not found";
  WithNetwork w(path);
  std::unique_ptr<SDModel>& model = w.model;
  std::unique_ptr<LoraNetwork>& net = w.net;
  const int unet_default = w.unet_default;
  const int te1 = net->add_text_encoder(model->te, "lora_te1", 4, 2, 1);
  const int te2 = net->add_text_encoder(model->te2, "lora_te2", 4, 2, 1, 0.5f);
  EXPECT_EQ(te1, 6 * model->te.config().layers);
  EXPECT_EQ(te2, 6 * model->te2.config().layers);
  EXPECT_EQ(net->count(LoraTarget::TextEncoder), te1);
  EXPECT_EQ(net->count(LoraTarget::TextEncoder2), te2);
  std::printf("[names] tiny sdxl: %d default UNet modules, %d with LoCon, te1 %d, te2 %d\n", unet_default,
              net->count(LoraTarget::UNet), te1, te2);

  const TensorFile f = open_model_file(path);
  const UNetConfig& cfg = model->unet.config();
  for (const LoraModule& m : net->modules()) {
    SCOPED_TRACE(m.key);
    if (m.target == LoraTarget::UNet) {
      // kohya's SDXL key: the layer's ldm module path (a tensor of the file), dots as '_'.
      std::string ldm = diffusers_unet_name_to_ldm(m.weight_name, cfg.layers_per_block, cfg.cross_attn);
      ASSERT_NE(f.find("model.diffusion_model." + ldm), nullptr);
      ldm = ldm.substr(0, ldm.size() - 7);
      std::replace(ldm.begin(), ldm.end(), '.', '_');
      EXPECT_EQ(m.key, "lora_unet_" + ldm);
      EXPECT_TRUE(starts_with(m.key, "lora_unet_input_blocks_") || starts_with(m.key, "lora_unet_middle_block_") ||
                  starts_with(m.key, "lora_unet_output_blocks_"));
    } else {
      const bool second = m.target == LoraTarget::TextEncoder2;
      EXPECT_TRUE(starts_with(m.key, second ? "lora_te2_text_model_encoder_layers_" : "lora_te1_text_model_encoder_layers_"));
      EXPECT_EQ(m.down.lr_scale, second ? 0.5f : 1.0f);
    }
  }

  std::mt19937 rng(3);
  for (LoraModule& m : net->modules()) {
    std::normal_distribution<float> nd(0.0f, 0.1f);
    for (int64_t i = 0; i < m.up.value.numel(); ++i) m.up.value.f32()[i] = nd(rng);
  }
  const std::string file = (std::filesystem::temp_directory_path() / "diffuse_test_sdxl_names.safetensors").string();
  net->save(file, DType::F32, {});
  std::unique_ptr<LoraNetwork> back = LoraNetwork::from_file(file, model->unet, &model->te, &model->te2);
  loratest::expect_same_modules(*net, *back);
  // Without the text encoders given: refused, naming the file and a text-encoder key.
  loratest::expect_error_naming([&] { LoraNetwork::from_file(file, model->unet); }, {file, "lora_te"});
  std::filesystem::remove(file);
}

TEST(LoraNames, Sd1KeepsDiffusersNames) {
  const std::string path = fixture("sd1");
  if (path.empty()) GTEST_SKIP() << "tiny-sd1 fixture not found";
  WithNetwork w(path);
  w.net->add_text_encoder(w.model->te, "lora_te", 4, 2, 1);
  for (const LoraModule& m : w.net->modules()) {
    SCOPED_TRACE(m.key);
    if (m.target != LoraTarget::UNet) {
      EXPECT_TRUE(starts_with(m.key, "lora_te_text_model_encoder_layers_"));
      continue;
    }
    std::string d = m.weight_name.substr(0, m.weight_name.size() - 7);
    std::replace(d.begin(), d.end(), '.', '_');
    EXPECT_EQ(m.key, "lora_unet_" + d);
  }
}
