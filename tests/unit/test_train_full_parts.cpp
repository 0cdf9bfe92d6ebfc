// The pieces of full fine-tuning that need no training run: the EMA's decay schedule and update
// (train/ema.h), and the checkpoint writer (train/checkpoint_writer.h): its refusals and the save
// precision it writes every float tensor in. The rest of the writer's output and the EMA of a real
// run are checked end to end in tests/cli/test_train_full.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>

#include "../common/expect_error.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "train/checkpoint_writer.h"
#include "train/ema.h"

using namespace diffuse;
using namespace diffuse::train;
namespace fs = std::filesystem;

TEST(Ema, DecayScheduleIsDiffusersWarmupOrConstant) {
  // diffusers' EMAModel.get_decay without use_ema_warmup: s = k - 1; 0 at s = 0, else
  // min(decay, (1 + s) / (10 + s)).
  EXPECT_EQ(ema_decay(0.9999, 1, true), 0.0);
  EXPECT_DOUBLE_EQ(ema_decay(0.9999, 2, true), 2.0 / 11.0);
  EXPECT_DOUBLE_EQ(ema_decay(0.9999, 9, true), 0.5);
  EXPECT_DOUBLE_EQ(ema_decay(0.9, 1000, true), 0.9);  // capped by the decay
  EXPECT_DOUBLE_EQ(ema_decay(0.9, 81, true), 0.9);    // (1 + 80) / 90 = 0.9
  EXPECT_DOUBLE_EQ(ema_decay(0.9, 80, true), 80.0 / 89.0);
  EXPECT_EQ(ema_decay(0.5, 1, false), 0.5);
}

TEST(Ema, UpdateAndSwap) {
  Param p;
  p.value = Tensor::zeros({3});
  float* w = p.value.f32();
  w[0] = 1, w[1] = -2, w[2] = 4;
  Ema ema({&p}, 0.75, /*warmup=*/false);  // shadow = (1, -2, 4)
  w[0] = 3, w[1] = 2, w[2] = 4;
  ema.update(1);  // 0.75·shadow + 0.25·w
  EXPECT_FLOAT_EQ(ema.shadow(0).f32()[0], 1.5f);
  EXPECT_FLOAT_EQ(ema.shadow(0).f32()[1], -1.0f);
  EXPECT_FLOAT_EQ(ema.shadow(0).f32()[2], 4.0f);
  ema.swap_with_params();
  EXPECT_FLOAT_EQ(w[0], 1.5f);
  EXPECT_FLOAT_EQ(ema.shadow(0).f32()[0], 3.0f);
  ema.swap_with_params();
  EXPECT_FLOAT_EQ(w[0], 3.0f);
  // Warmup: the first step's decay is 0, the shadow becomes the weights exactly.
  Ema warm({&p}, 0.9999, /*warmup=*/true);
  w[1] = 1e-7f;
  warm.update(1);
  EXPECT_EQ(warm.shadow(0).f32()[1], 1e-7f);
  expect_error([&] { Ema bad({&p}, 1.0, true); }, "--ema 1", "must be in [0, 1)");
}

namespace {
std::string fixture(const std::string& rel) {
  for (const std::string& base : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/", std::string(DIFFUSE_TEST_DATA) + "/"})
    if (fs::exists(base + rel)) return base + rel;
  return "";
}
}  // namespace

TEST(CheckpointWriter, RefusesPartsWithoutAPlaceOrIncomplete) {
  const std::string sd2 = fixture("sd2/model/tiny-sd2.safetensors");
  if (sd2.empty()) GTEST_SKIP() << "tiny sd2 fixture not found";
  const TensorFile f = open_model_file(sd2);
  const std::string out = ::testing::TempDir() + "/diffuse_writer_refused.safetensors";
  // OpenCLIP's q, k, v are one fused in_proj tensor: q alone cannot be written.
  TrainedComponent te{Component::TextEncoder, {{"text_model.encoder.layers.0.self_attn.q_proj.weight", Tensor()}}};
  const Tensor* in = f.find("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight");
  ASSERT_NE(in, nullptr);
  te.tensors.begin()->second = Tensor::zeros({in->dim(0) / 3, in->dim(1)});
  expect_error([&] { save_ldm_checkpoint(out, f, Family::SD2, {te}, DType::F32, {}); }, sd2,
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight is made of 3 trained tensors but "
               "only 1");
  TrainedComponent unet{Component::UNet, {{"down_blocks.9.resnets.0.conv1.weight", Tensor::zeros({1})}}};
  expect_error([&] { save_ldm_checkpoint(out, f, Family::SD2, {unet}, DType::F32, {}); }, sd2,
               "the trained unet tensor down_blocks.9.resnets.0.conv1.weight has no place");
  EXPECT_FALSE(fs::exists(out));
}

// Like kohya's --save_precision: every float tensor is written in the save precision, the untrained
// ones too (with their values: f16 -> f32 is exact), integer tensors as stored; the counts say so.
TEST(CheckpointWriter, WritesEveryFloatTensorInTheSavePrecision) {
  const std::string sd1 = fixture("sd1/model/tiny-sd1.safetensors");
  if (sd1.empty()) GTEST_SKIP() << "tiny sd1 fixture not found";
  const TensorFile f = open_model_file(sd1);
  const std::string out = ::testing::TempDir() + "/diffuse_writer_cast.safetensors";
  int floats = 0, others = 0;
  for (const TensorEntry& e : f.tensors) (dtype_is_float(e.tensor.dtype()) ? floats : others) += 1;
  ASSERT_GT(floats, 100);
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    const CheckpointWriteResult r = save_ldm_checkpoint(out, f, Family::SD1, {}, dt, {});
    EXPECT_EQ(r.replaced, 0);
    EXPECT_EQ(r.kept, floats + others);
    int stored_as_dt = 0;
    for (const TensorEntry& e : f.tensors) stored_as_dt += e.tensor.dtype() == dt;
    EXPECT_EQ(r.converted, floats - stored_as_dt) << dtype_name(dt);
    const TensorFile g = load_safetensors(out);
    ASSERT_EQ(g.size(), f.size());
    for (const TensorEntry& e : f.tensors) {
      const Tensor* t = g.find(e.name);
      ASSERT_NE(t, nullptr) << e.name;
      if (!dtype_is_float(e.tensor.dtype())) {
        EXPECT_EQ(t->dtype(), e.tensor.dtype()) << e.name;
        continue;
      }
      ASSERT_EQ(t->dtype(), dt) << e.name;
      const Tensor want = e.tensor.to(dt).to(DType::F32), got = t->to(DType::F32);
      ASSERT_EQ(std::memcmp(want.data(), got.data(), want.bytes()), 0) << e.name << " in " << dtype_name(dt);
    }
  }
  EXPECT_NE(describe_untrained({0, 980, 40, 0}, DType::F16).find("980 untrained (40 converted to f16)"),
            std::string::npos);
  EXPECT_NE(describe_untrained({0, 3, 0, 0}, DType::F16).find("3 untrained as they were"), std::string::npos);
  fs::remove(out);
}
