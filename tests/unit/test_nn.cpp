// nn: strict weight binding and the basic layers against plain references.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "nn/layers.h"

using namespace diffuse;

namespace {
Tensor ramp(const Shape& s, float scale) {
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = std::sin(float(i) * 0.37f) * scale;
  return t;
}
}  // namespace

TEST(WeightStore, ReportsMissingWrongShapeAndUnused) {
  WeightStore store("model.safetensors", "unet");
  store.add("a.weight", Tensor::zeros({4, 3}));
  store.add("b.weight", Tensor::zeros({5}));
  store.add("extra", Tensor::zeros({1}));
  store.add("position_ids", Tensor::zeros({1, 77}, DType::I64));
  Binder b(store);
  EXPECT_EQ(b.sub("a").take("weight", {4, 3}).shape(), Shape({4, 3}));
  Tensor bad = b.take("b.weight", {6});  // wrong shape: zeros of the expected shape come back
  EXPECT_EQ(bad.shape(), Shape({6}));
  b.take("c.weight", {2});
  store.ignore("position_ids");
  try {
    store.finish();
    FAIL() << "finish() should throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("model.safetensors: unet"), std::string::npos) << m;
    EXPECT_NE(m.find("1 missing tensor(s): c.weight"), std::string::npos) << m;
    EXPECT_NE(m.find("b.weight is f32[5], expected [6]"), std::string::npos) << m;
    EXPECT_NE(m.find("1 unused tensor(s): extra"), std::string::npos) << m;
  }
  EXPECT_THROW(store.add("extra", Tensor::zeros({1})), Error);
}

TEST(WeightStore, CompleteBindingPasses) {
  WeightStore store("m", "vae");
  store.add("w", Tensor::zeros({2}, DType::F16));
  Binder(store).take("w", {2});
  EXPECT_NO_THROW(store.finish());
  store.add("ema.w", Tensor::zeros({2}));
  EXPECT_NO_THROW(store.finish([](const std::string& n) { return n.rfind("ema.", 0) == 0; }));
  EXPECT_THROW(store.finish(), Error);
}

TEST(Layers, LinearConvNormsMatchReferences) {
  auto be = make_cpu_backend(Precision::F32);
  Arena arena;
  Ctx c{*be, arena};
  WeightStore store("m", "test");
  store.add("fc.weight", ramp({3, 5}, 0.5f).to(DType::F16));
  store.add("fc.bias", ramp({3}, 0.1f));
  store.add("conv.weight", ramp({2, 3, 3, 3}, 0.3f));
  store.add("conv.bias", ramp({2}, 0.2f));
  store.add("gn.weight", ramp({6}, 1.0f));
  store.add("gn.bias", ramp({6}, 0.5f));
  Binder b(store);
  Linear fc;
  fc.bind(*be, b.sub("fc"), 5, 3);
  Conv2d conv;
  conv.bind(*be, b.sub("conv"), 3, 2, 3, 2);
  GroupNorm gn;
  gn.bind(b.sub("gn"), 6, 3, 1e-5f);
  store.finish();

  Tensor x = ramp({2, 5}, 1.0f);
  Tensor y = fc(c, x);
  Tensor wf = ramp({3, 5}, 0.5f).to(DType::F16).to(DType::F32), bf = ramp({3}, 0.1f);
  for (int n = 0; n < 2; ++n)
    for (int o = 0; o < 3; ++o) {
      double acc = bf.f32()[o];
      for (int i = 0; i < 5; ++i) acc += double(x.f32()[n * 5 + i]) * wf.f32()[o * 5 + i];
      EXPECT_NEAR(y.f32()[n * 3 + o], acc, 1e-5);
    }

  // Stride-2 3x3 conv with padding 1 on a 5x5 NHWC input -> 3x3.
  Tensor xi = ramp({1, 5, 5, 3}, 1.0f);
  Tensor yc = conv(c, xi);
  ASSERT_EQ(yc.shape(), Shape({1, 3, 3, 2}));
  Tensor wc = ramp({2, 3, 3, 3}, 0.3f), bc = ramp({2}, 0.2f);
  for (int oy = 0; oy < 3; ++oy)
    for (int ox = 0; ox < 3; ++ox)
      for (int o = 0; o < 2; ++o) {
        double acc = bc.f32()[o];
        for (int ky = 0; ky < 3; ++ky)
          for (int kx = 0; kx < 3; ++kx) {
            int iy = oy * 2 - 1 + ky, ix = ox * 2 - 1 + kx;
            if (iy < 0 || iy >= 5 || ix < 0 || ix >= 5) continue;
            for (int i = 0; i < 3; ++i)
              acc += double(xi.f32()[(iy * 5 + ix) * 3 + i]) * wc.f32()[((o * 3 + i) * 3 + ky) * 3 + kx];
          }
        EXPECT_NEAR(yc.f32()[(oy * 3 + ox) * 2 + o], acc, 1e-5);
      }

  Tensor g = gn(c, ramp({1, 2, 2, 6}, 2.0f), true);
  EXPECT_EQ(g.shape(), Shape({1, 2, 2, 6}));
  arena.reset();
}
