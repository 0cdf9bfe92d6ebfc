// `diffuse train vae` (train/vae_trainer.h) end to end on a few generated shape images with the tiny
// sd1 model's VAE: the loss goes down; the saved VAE, run by the inference path (VAE::encode /
// decode), reconstructs the validation images exactly as the trainer measured them before the
// latent reparametrisation (so the reparametrisation changes no decoded pixel and the training
// forward is the inference forward), and its posterior means have per-channel mean 0 and std
// 1/scaling_factor; a run split by --resume ends bit-identical to one that never stopped; the
// cosine --lr-scheduler decays the rate after the warmup as diffusers' does (the loss log's lr).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "backend/backend.h"
#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "train/dataset.h"
#include "train/shapes_dataset.h"
#include "train/vae_trainer.h"

namespace fs = std::filesystem;
using namespace diffuse;
using namespace diffuse::train;

namespace {

const std::string kModel = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";

std::string dataset(const std::string& name, int64_t count) {
  const std::string dir = ::testing::TempDir() + name;
  fs::remove_all(dir);
  ShapesDatasetOptions o;
  o.count = count, o.size = 64, o.dir = dir, o.seed = 3;
  write_shapes_dataset(o, nullptr);
  return dir;
}

VaeTrainOptions options(const std::string& data, const std::string& out) {
  VaeTrainOptions o;
  o.model = kModel, o.data = data, o.output = out;
  o.steps = 6, o.batch = 2, o.lr = 1e-3, o.warmup_steps = 0, o.resolution = 64, o.save_precision = "float";
  return o;
}

const LogFn kQuiet = [](const std::string&, bool) {};

}  // namespace

TEST(TrainVae, ReparametrisedLatentsDecodeAsTrainedAndHaveUnitScale) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  const std::string data = dataset("vae_data", 24);
  const std::string out = ::testing::TempDir() + "vae_out.safetensors";
  const VaeTrainResult r = train_vae(options(data, out), kQuiet);
  EXPECT_LT(r.val_end, r.val_start) << "6 steps at lr 1e-3 did not lower the reconstruction error";

  auto be = make_cpu_backend(Precision::F32);
  SDLoadOptions lo;
  lo.text_encoders = false, lo.unet = false;
  std::unique_ptr<SDModel> m = SDModel::load(out, *be, lo);
  DatasetOptions dopt;
  dopt.resolution = 64;
  Dataset ds = scan_dataset(data, dopt);
  // The trainer's validation images: the first 8 in sorted order.
  Arena arena;
  Ctx c{*be, arena, DType::F32};
  double err = 0, n = 0;
  std::vector<double> s(4), s2(4);
  int64_t count = 0;
  for (size_t i = 0; i < ds.items.size(); ++i) {
    const Tensor x = load_training_image(ds.items[i]);
    const VAE::Posterior p = m->vae.encode(c, x);
    for (int64_t j = 0; j < p.mean.numel(); ++j)
      s[size_t(j % 4)] += p.mean.f32()[j], s2[size_t(j % 4)] += double(p.mean.f32()[j]) * p.mean.f32()[j];
    count += p.mean.numel() / 4;
    if (i < 8) {
      const Tensor y = m->vae.decode(c, p.mean);
      for (int64_t j = 0; j < x.numel(); ++j) err += std::fabs(double(y.f32()[j]) - x.f32()[j]), ++n;
    }
    arena.reset();
  }
  EXPECT_NEAR(err / n, r.val_end, 1e-4 * r.val_end) << "the saved VAE decodes differently from the trained one";
  const double target = 1.0 / m->vae_cfg.scaling_factor;
  for (int ch = 0; ch < 4; ++ch) {
    const double mean = s[size_t(ch)] / double(count), sd = std::sqrt(s2[size_t(ch)] / double(count) - mean * mean);
    EXPECT_NEAR(mean, 0.0, 1e-3 * target) << "latent channel " << ch;
    EXPECT_NEAR(sd, target, 1e-3 * target) << "latent channel " << ch;
  }
}

TEST(TrainVae, ResumedRunEndsBitIdentical) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  const std::string data = dataset("vae_resume_data", 12);
  const std::string a = ::testing::TempDir() + "vae_a.safetensors", b = ::testing::TempDir() + "vae_b.safetensors";
  train_vae(options(data, a), kQuiet);
  // A run that saves its state at step 3 (as if it had been stopped after it), then steps 4-6
  // again from that state.
  VaeTrainOptions first = options(data, b);
  first.save_every = 3;
  train_vae(first, kQuiet);
  VaeTrainOptions resumed = first;
  resumed.resume = b + ".state.safetensors";
  train_vae(resumed, kQuiet);
  const TensorFile fa = open_model_file(a), fb = open_model_file(b);
  int compared = 0;
  for (const TensorEntry& e : fa.tensors) {
    if (e.name.rfind("first_stage_model.", 0) != 0) continue;
    const Tensor* t = fb.find(e.name);
    ASSERT_NE(t, nullptr) << e.name;
    ASSERT_EQ(e.tensor.bytes(), t->bytes()) << e.name;
    EXPECT_EQ(std::memcmp(e.tensor.data(), t->data(), e.tensor.bytes()), 0) << e.name << " differs after --resume";
    ++compared;
  }
  EXPECT_GT(compared, 100);
}

// --decoder-only (with the edge term): the encoder and quant_conv are byte for byte the input's
// (so a UNet trained on its latents stays valid), the decoder changed, the reconstruction improved.
TEST(TrainVae, DecoderOnlyKeepsTheEncoder) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  const std::string data = dataset("vae_dec_data", 12);
  const std::string out = ::testing::TempDir() + "vae_dec.safetensors";
  VaeTrainOptions o = options(data, out);
  o.decoder_only = true, o.edge_weight = 0.5, o.save_precision = "fp16";  // the input's own dtype
  const VaeTrainResult r = train_vae(o, kQuiet);
  EXPECT_LT(r.val_end, r.val_start);
  const TensorFile in = open_model_file(kModel), res = open_model_file(out);
  int same = 0, changed = 0;
  for (const TensorEntry& e : in.tensors) {
    const bool enc = e.name.rfind("first_stage_model.encoder.", 0) == 0 ||
                     e.name.rfind("first_stage_model.quant_conv.", 0) == 0;
    const bool dec = e.name.rfind("first_stage_model.decoder.", 0) == 0;
    if (!enc && !dec) continue;
    const Tensor* t = res.find(e.name);
    ASSERT_NE(t, nullptr) << e.name;
    const bool equal = t->bytes() == e.tensor.bytes() && std::memcmp(t->data(), e.tensor.data(), t->bytes()) == 0;
    if (enc) {
      EXPECT_TRUE(equal) << e.name << " changed, but only the decoder trains";
      ++same;
    }
    if (dec && !equal) ++changed;
  }
  EXPECT_GT(same, 20);
  EXPECT_GT(changed, 20);
}

// --lr-scheduler cosine: the warmup's rates, then half a cosine from --lr to 0 over the remaining
// steps (the loss log's lr column, one row per step); a name it does not know fails naming it.
TEST(TrainVae, CosineScheduleDecaysAfterTheWarmup) {
  if (!fs::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  const std::string data = dataset("vae_cosine_data", 6);
  const std::string out = ::testing::TempDir() + "vae_cosine.safetensors";
  VaeTrainOptions o = options(data, out);
  o.steps = 7, o.warmup_steps = 2, o.lr_scheduler = "cosine";
  train_vae(o, kQuiet);
  std::ifstream csv(out + ".csv");
  std::string line;
  std::vector<double> lr;  // by step, 1-based rows with a loss
  while (std::getline(csv, line)) {
    std::vector<std::string> f;
    std::stringstream ss(line);
    for (std::string x; std::getline(ss, x, ',');) f.push_back(x);
    if (f.size() >= 3 && !f[1].empty() && f[0] != "step") lr.push_back(std::stod(f[2]));
  }
  ASSERT_EQ(lr.size(), 7u) << "rows with a loss in " << out << ".csv";
  const double pi = std::acos(-1.0);
  for (int i = 0; i < 7; ++i) {  // warmup (i + 1)/2 of the rate at i = 0, 1; then cos over the 5 others
    const double want = i < 2 ? 1e-3 * (i + 1) / 2 : 1e-3 * 0.5 * (1 + std::cos(pi * (i - 2) / 5));
    EXPECT_NEAR(lr[size_t(i)], want, 1e-3 * 1e-5) << "step " << i + 1;
  }
  o.lr_scheduler = "cosine_with_restarts";
  try {
    train_vae(o, kQuiet);
    ADD_FAILURE() << "an unknown --lr-scheduler was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("--lr-scheduler 'cosine_with_restarts'"), std::string::npos) << e.what();
  }
}
