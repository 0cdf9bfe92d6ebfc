// LoCon (LoRA on convolutions, kohya's conv_dim/conv_alpha):
//  - a Conv2d with a LoRA adapter (down a k×k convolution with the layer's stride and padding, up
//    1×1) against a plain double-precision reference on odd shapes: the forward, and dL/d(down),
//    dL/d(up), dL/dx of L = Σ G·y against central differences of the reference's L (L is linear in
//    each of x, down and up, so the differences are exact up to double rounding and the tolerance
//    is f32 rounding only: a missing term or a wrong scale is off by O(1) relative);
//  - the adapter sees an in-place change of down (what an optimiser step does) on the next pass;
//  - LoraNetwork's LoCon targets on the tiny sd1 UNet: ranks, shapes, init, and a save/from_file
//    round trip; a conv module whose shape does not fit is an error naming the file and key.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/tensor_file.h"
#include "models/sd_model.h"
#include "nn/layers.h"
#include "train/lora_network.h"
#include "lora_net_util.h"

using namespace diffuse;
using namespace diffuse::train;

namespace {

Tensor randn(const Shape& s, std::mt19937& g, float sd = 1.0f) {
  std::normal_distribution<float> n(0.0f, sd);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(g);
  return t;
}

std::vector<double> to_double(const Tensor& t) { return std::vector<double>(t.f32(), t.f32() + t.numel()); }

// A convolution in double. x: NHWC [N, H, W, I]; w: [O, I, k, k] (bias b: [O] or empty) ->
// y [N, Ho, Wo, O] with stride/padding p.
std::vector<double> conv_ref(const std::vector<double>& x, int64_t N, int64_t H, int64_t W, int64_t I,
                             const std::vector<double>& w, const std::vector<double>& b, int64_t O, int64_t k,
                             const Conv2dParams& p, int64_t& Ho, int64_t& Wo) {
  Ho = (H + p.pad_top + p.pad_bottom - k) / p.stride + 1;
  Wo = (W + p.pad_left + p.pad_right - k) / p.stride + 1;
  std::vector<double> y(size_t(N * Ho * Wo * O), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox)
        for (int64_t o = 0; o < O; ++o) {
          double acc = b.empty() ? 0.0 : b[size_t(o)];
          for (int64_t a = 0; a < k; ++a)
            for (int64_t c = 0; c < k; ++c) {
              const int64_t iy = oy * p.stride - p.pad_top + a, ix = ox * p.stride - p.pad_left + c;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              for (int64_t i = 0; i < I; ++i)
                acc += x[size_t(((n * H + iy) * W + ix) * I + i)] * w[size_t(((o * I + i) * k + a) * k + c)];
            }
          y[size_t(((n * Ho + oy) * Wo + ox) * O + o)] = acc;
        }
  return y;
}

struct Case {
  const char* name;
  int64_t N, H, W, in, out, r, k;
  int stride;
  bool flat_pointwise;  // a 1×1 layer's adapter stored [r, in] / [out, r] (accepted from files)
};

// The layer, its adapter and the reference's inputs for one case.
struct ConvLora {
  Case cs;
  std::unique_ptr<Backend> be = make_cpu_backend(Precision::F32);
  WeightStore store{"test", "unet"};
  Conv2d conv;
  Grads grads;
  LoraAdapter a;
  Tensor x, w, b, G;

  ConvLora(const Case& c, std::mt19937& rng) : cs(c) {
    w = randn({c.out, c.in, c.k, c.k}, rng, 0.3f), b = randn({c.out}, rng, 0.1f);
    store.add("conv.weight", w);
    store.add("conv.bias", b);
    conv.bind(*be, Binder(store).sub("conv"), c.in, c.out, c.k, c.stride);
    register_layers(grads, store.take_prepared(), {}, store);
    a.key = std::string("lora_unet_") + c.name;
    const Shape ds = c.flat_pointwise ? Shape{c.r, c.in} : Shape{c.r, c.in, c.k, c.k};
    const Shape us = c.flat_pointwise ? Shape{c.out, c.r} : Shape{c.out, c.r, 1, 1};
    a.down = randn(ds, rng, 0.4f), a.up = randn(us, rng, 0.4f), a.scale = 0.75f;
    a.gdown = Tensor::zeros(ds), a.gup = Tensor::zeros(us);
    grads.adapters[conv.w.get()] = &a;
    x = randn({c.N, c.H, c.W, c.in}, rng);
  }

  // The reference output for (x, down, up) in double.
  std::vector<double> ref_y(const std::vector<double>& xd, const std::vector<double>& down,
                            const std::vector<double>& up) const {
    int64_t Ho, Wo;
    std::vector<double> y =
        conv_ref(xd, cs.N, cs.H, cs.W, cs.in, to_double(w), to_double(b), cs.out, cs.k, conv.p, Ho, Wo);
    const std::vector<double> h = conv_ref(xd, cs.N, cs.H, cs.W, cs.in, down, {}, cs.r, cs.k, conv.p, Ho, Wo);
    for (int64_t q = 0; q < cs.N * Ho * Wo; ++q)
      for (int64_t o = 0; o < cs.out; ++o) {
        double acc = 0;
        for (int64_t j = 0; j < cs.r; ++j) acc += up[size_t(o * cs.r + j)] * h[size_t(q * cs.r + j)];
        y[size_t(q * cs.out + o)] += double(a.scale) * acc;
      }
    return y;
  }
  double ref_loss(const std::vector<double>& xd, const std::vector<double>& down, const std::vector<double>& up) const {
    const std::vector<double> y = ref_y(xd, down, up);
    double L = 0;
    for (size_t i = 0; i < y.size(); ++i) L += double(G.f32()[i]) * y[i];
    return L;
  }
};

// max |got − want| ≤ tol·max|want|, with both printed.
void expect_close(const std::string& what, const float* got, const std::vector<double>& want, double tol) {
  double mx = 0, err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    mx = std::max(mx, std::abs(want[i]));
    err = std::max(err, std::abs(double(got[i]) - want[i]));
  }
  std::printf("%-44s max err %.2e of max %.3e\n", what.c_str(), err, mx);
  EXPECT_GT(mx, 0) << what;
  EXPECT_LE(err, tol * mx) << what;
}

// Central differences of L along every element of `p` (one of the reference's inputs).
std::vector<double> central_differences(std::vector<double>& p, const std::function<double()>& L) {
  std::vector<double> g(p.size());
  const double h = 0.5;  // L is linear in p: the difference is exact whatever h
  for (size_t i = 0; i < p.size(); ++i) {
    const double v = p[i];
    p[i] = v + h;
    const double up = L();
    p[i] = v - h;
    const double dn = L();
    p[i] = v;
    g[i] = (up - dn) / (2 * h);
  }
  return g;
}

const Case kCases[] = {
    {"resnet_conv1", 2, 7, 5, 3, 5, 2, 3, 1, false},      // 3×3, stride 1, padding 1
    {"downsampler_conv", 2, 7, 6, 4, 3, 3, 3, 2, false},  // 3×3, stride 2, padding 1 (odd H: a dropped row)
    {"conv_shortcut", 1, 5, 3, 6, 4, 2, 1, 1, false},     // 1×1 as a Conv2d layer
    {"conv_shortcut_flat", 2, 3, 4, 5, 3, 2, 1, 1, true},  // same, adapter stored [r, in] / [out, r]
};

}  // namespace

TEST(LoconAdapter, ConvForwardAndGradientsMatchDoubleReference) {
  std::mt19937 rng(17);
  for (const Case& cs : kCases) {
    SCOPED_TRACE(cs.name);
    ConvLora t(cs, rng);
    Arena arena;
    Ctx c{*t.be, arena, DType::F32, nullptr, &t.grads};
    std::vector<double> xd = to_double(t.x), down = to_double(t.a.down), up = to_double(t.a.up);

    Tensor y = t.conv(c, t.x);
    const std::vector<double> want_y = t.ref_y(xd, down, up);
    ASSERT_EQ(size_t(y.numel()), want_y.size());
    expect_close(std::string(cs.name) + " forward", y.f32(), want_y, 1e-5);

    t.G = randn(y.shape(), rng);
    Tensor dx = t.conv.backward(c, t.x, t.G);
    auto L = [&] { return t.ref_loss(xd, down, up); };
    expect_close(std::string(cs.name) + " dL/d(down)", t.a.gdown.f32(), central_differences(down, L), 1e-5);
    expect_close(std::string(cs.name) + " dL/d(up)", t.a.gup.f32(), central_differences(up, L), 1e-5);
    expect_close(std::string(cs.name) + " dL/dx", dx.f32(), central_differences(xd, L), 1e-5);

    // Gradients accumulate, also when dx is not wanted.
    const std::vector<double> gd1 = to_double(t.a.gdown), gu1 = to_double(t.a.gup);
    EXPECT_FALSE(t.conv.backward(c, t.x, t.G, /*want_dx=*/false).defined());
    std::vector<double> gd2(gd1.size()), gu2(gu1.size());
    for (size_t i = 0; i < gd1.size(); ++i) gd2[i] = 2 * gd1[i];
    for (size_t i = 0; i < gu1.size(); ++i) gu2[i] = 2 * gu1[i];
    expect_close(std::string(cs.name) + " accumulated dL/d(down)", t.a.gdown.f32(), gd2, 1e-6);
    expect_close(std::string(cs.name) + " accumulated dL/d(up)", t.a.gup.f32(), gu2, 1e-6);
  }
}

// The prepared down convolution is remade when down changes in place (an optimiser step), and
// the layer without Grads (inference) runs without the adapter.
TEST(LoconAdapter, SeesInPlaceUpdatesOfDown) {
  std::mt19937 rng(23);
  ConvLora t(kCases[1], rng);
  Arena arena;
  Ctx c{*t.be, arena, DType::F32, nullptr, &t.grads};
  t.conv(c, t.x);  // prepares down
  for (int64_t i = 0; i < t.a.down.numel(); ++i) t.a.down.f32()[i] += 0.25f * std::sin(float(i));
  Tensor y = t.conv(c, t.x);
  expect_close("after an update of down", y.f32(), t.ref_y(to_double(t.x), to_double(t.a.down), to_double(t.a.up)),
               1e-5);

  Ctx plain{*t.be, arena, DType::F32};
  const std::vector<double> zero_up(size_t(t.a.up.numel()), 0.0);
  expect_close("without Grads", t.conv(plain, t.x).f32(), t.ref_y(to_double(t.x), to_double(t.a.down), zero_up), 1e-5);
}

TEST(LoconAdapter, MisshapenAdapterIsAnErrorNamingIt) {
  std::mt19937 rng(29);
  ConvLora t(kCases[0], rng);
  t.a.down = randn({2, t.cs.in, 1, 1}, rng);  // a 1×1 down on a 3×3 layer
  Arena arena;
  Ctx c{*t.be, arena, DType::F32, nullptr, &t.grads};
  try {
    t.conv(c, t.x);
    FAIL() << "a misshapen adapter should throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("lora_unet_resnet_conv1"), std::string::npos) << m;
    EXPECT_NE(m.find("[5, 3, 3, 3]"), std::string::npos) << m;
  }
}

namespace {

const std::string kModel = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";

std::unique_ptr<SDModel> load_unet(Backend& be) {
  SDLoadOptions o;
  o.text_encoders = o.vae_encoder = o.vae_decoder = false;
  return SDModel::load(kModel, be, o);
}

bool in_resnet_or_resampler(const std::string& key) {
  return key.find("_resnets_") != std::string::npos || key.find("_downsamplers_") != std::string::npos ||
         key.find("_upsamplers_") != std::string::npos;
}

}  // namespace

// kohya's targets with conv_dim: inside ResnetBlock2D/Downsample2D/Upsample2D, 3×3 convolutions
// at the conv rank and alpha, the 1×1 shortcut and the time projection at the network's; down
// Kaiming-uniform with fan_in = in·kh·kw, up zero; the default modules unchanged.
TEST(LoconNetwork, TargetsShapesAndInit) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  auto be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> model = load_unet(*be);
  UNet& unet = model->unet;
  std::unique_ptr<LoraNetwork> plain = LoraNetwork::create_unet(unet, 8, 4, 5);
  std::unique_ptr<LoraNetwork> net = LoraNetwork::create_unet(unet, 8, 4, 5);
  const size_t base = net->modules().size();
  const int added = net->add_unet_conv_targets(unet, 8, 4, 4, 2, 5);
  ASSERT_EQ(net->modules().size(), base + size_t(added));
  for (size_t i = 0; i < base; ++i) {  // the default modules start exactly as without LoCon
    const Tensor &a = net->modules()[i].down.value, &b = plain->modules()[i].down.value;
    ASSERT_EQ(a.shape(), b.shape());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.bytes()), 0) << net->modules()[i].key;
  }
  int kxk = 0, shortcut = 0, temb = 0, resamplers = 0;
  for (size_t i = base; i < net->modules().size(); ++i) {
    const LoraModule& m = net->modules()[i];
    SCOPED_TRACE(m.key);
    EXPECT_TRUE(in_resnet_or_resampler(m.key));
    const Shape& ws = unet.prepared().at(m.weight_name).checkpoint_shape;
    const bool is_kxk = ws.rank() == 4 && ws[2] == 3;
    const int64_t r = is_kxk ? 4 : 8, out = ws[0], in = ws[1], k = ws.rank() == 4 ? ws[2] : 1;
    kxk += is_kxk;
    shortcut += m.key.find("conv_shortcut") != std::string::npos;
    temb += m.key.find("time_emb_proj") != std::string::npos;
    resamplers += m.key.find("samplers_0_conv") != std::string::npos;
    EXPECT_EQ(m.alpha, is_kxk ? 2.0f : 4.0f);
    EXPECT_EQ(m.down.value.shape(), ws.rank() == 4 ? Shape({r, in, k, k}) : Shape({r, in}));
    EXPECT_EQ(m.up.value.shape(), ws.rank() == 4 ? Shape({out, r, 1, 1}) : Shape({out, r}));
    const double bound = 1.0 / std::sqrt(double(in * k * k));
    double mx = 0, up = 0;
    for (int64_t j = 0; j < m.down.value.numel(); ++j) mx = std::max(mx, double(std::abs(m.down.value.f32()[j])));
    for (int64_t j = 0; j < m.up.value.numel(); ++j) up = std::max(up, double(std::abs(m.up.value.f32()[j])));
    EXPECT_LE(mx, bound);
    EXPECT_GT(mx, 0.5 * bound);  // a uniform draw of ≥ 32 values reaches past half its bound
    EXPECT_EQ(up, 0.0);
  }
  // Every ResNet has conv1, conv2 and a time projection; every resampler one 3×3 convolution.
  EXPECT_EQ(added, kxk + shortcut + temb);
  EXPECT_EQ(kxk, 2 * temb + resamplers);
  EXPECT_GT(shortcut, 0);
  EXPECT_GT(resamplers, 0);
  std::printf("tiny sd1: %zu default + %d LoCon modules (%d 3×3 of which %d resamplers, %d conv_shortcut, %d "
              "time_emb_proj)\n",
              base, added, kxk, resamplers, shortcut, temb);
  EXPECT_THROW(net->add_unet_conv_targets(unet, 8, 4, 0, 2, 5), Error);
  EXPECT_THROW(net->add_unet_conv_targets(unet, 8, 4, 4, -1, 5), Error);
}

// A LoCon network saved and read back with from_file (what --network_weights does): the same
// modules, shapes, values and alphas on the same layers.
TEST(LoconNetwork, FromFileReadsConvModules) {
  if (!std::filesystem::exists(kModel)) GTEST_SKIP() << "tiny sd1 model not found: " << kModel;
  auto be = make_cpu_backend(Precision::F32);
  std::unique_ptr<SDModel> model = load_unet(*be);
  std::unique_ptr<LoraNetwork> net = LoraNetwork::create_unet(model->unet, 8, 4, 5);
  net->add_unet_conv_targets(model->unet, 8, 4, 4, 2, 5);
  std::mt19937 rng(31);
  for (LoraModule& m : net->modules()) m.up.value.copy_from(randn(m.up.value.shape(), rng, 0.1f));
  const std::string path = (std::filesystem::temp_directory_path() / "diffuse_test_locon.safetensors").string();
  net->save(path, DType::F32, {});
  std::unique_ptr<LoraNetwork> back = LoraNetwork::from_file(path, model->unet);
  loratest::expect_same_modules(*net, *back);

  // A 3×3 module whose down is 1×1: an error naming the file and the key.
  std::vector<std::pair<std::string, Tensor>> bad = {
      {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight", Tensor::zeros({4, 32, 1, 1})},
      {"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight", Tensor::zeros({32, 4, 1, 1})},
      {"lora_unet_down_blocks_0_resnets_0_conv1.alpha", Tensor::full(Shape{}, 2.0f)}};
  save_safetensors(path, bad, {});
  loratest::expect_error_naming([&] { LoraNetwork::from_file(path, model->unet); },  // a 1×1 down on a 3×3 layer
                                {path, "lora_unet_down_blocks_0_resnets_0_conv1", "do not fit"});
  std::filesystem::remove(path);
}
