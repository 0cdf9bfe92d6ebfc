// T2I-Adapter (models/t2i_adapter.h): files written by this test in TencentARC's original layout
// (conv_in, body.K.block1/block2/in_conv, as t2iadapter_*_sd14v1.pth) and diffusers' (adapter.
// conv_in, adapter.body.I.resnets.J.block1/block2, adapter.body.I.in_conv) bind strictly and give
// the features of a double-precision reference computed here (PyTorch's pixel_unshuffle, convs,
// ReLU, 2×2 average pools); a wrong-architecture file is an error naming the file and what was
// expected.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "backend/backend.h"
#include "core/arena.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/t2i_adapter.h"
#include "nn/layers.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

// An NHWC double image.
struct Img {
  int64_t n, h, w, c;
  std::vector<double> v;
  double& at(int64_t a, int64_t y, int64_t x, int64_t k) { return v[size_t(((a * h + y) * w + x) * c + k)]; }
  double at(int64_t a, int64_t y, int64_t x, int64_t k) const { return v[size_t(((a * h + y) * w + x) * c + k)]; }
};
Img zeros(int64_t n, int64_t h, int64_t w, int64_t c) { return {n, h, w, c, std::vector<double>(size_t(n * h * w * c))}; }

struct Conv {
  Tensor w, b;  // [O, I, k, k], [O]
};

// Cross-correlation, stride 1, zero padding (k-1)/2.
Img conv(const Img& x, const Conv& cv) {
  const int64_t O = cv.w.dim(0), I = cv.w.dim(1), k = cv.w.dim(2), p = (k - 1) / 2;
  EXPECT_EQ(I, x.c);
  Img y = zeros(x.n, x.h, x.w, O);
  for (int64_t a = 0; a < x.n; ++a)
    for (int64_t i = 0; i < x.h; ++i)
      for (int64_t j = 0; j < x.w; ++j)
        for (int64_t o = 0; o < O; ++o) {
          double s = cv.b.f32()[o];
          for (int64_t di = 0; di < k; ++di)
            for (int64_t dj = 0; dj < k; ++dj) {
              const int64_t yy = i + di - p, xx = j + dj - p;
              if (yy < 0 || yy >= x.h || xx < 0 || xx >= x.w) continue;
              for (int64_t c = 0; c < I; ++c) s += double(cv.w.f32()[((o * I + c) * k + di) * k + dj]) * x.at(a, yy, xx, c);
            }
          y.at(a, i, j, o) = s;
        }
  return y;
}

// nn.AvgPool2d(2, 2, ceil_mode=True) (diffusers' AdapterBlock; the same as the original's on even sizes).
Img pool(const Img& x) {
  Img y = zeros(x.n, (x.h + 1) / 2, (x.w + 1) / 2, x.c);
  for (int64_t a = 0; a < x.n; ++a)
    for (int64_t i = 0; i < y.h; ++i)
      for (int64_t j = 0; j < y.w; ++j)
        for (int64_t k = 0; k < x.c; ++k) {
          double s = 0;
          int cnt = 0;
          for (int64_t di = 0; di < 2; ++di)
            for (int64_t dj = 0; dj < 2; ++dj)
              if (2 * i + di < x.h && 2 * j + dj < x.w) s += x.at(a, 2 * i + di, 2 * j + dj, k), ++cnt;
          y.at(a, i, j, k) = s / cnt;
        }
  return y;
}

struct Model {
  int cin = 3;  // hint channels
  std::vector<int> ch = {32, 64, 64, 64};  // 4 levels, as the published configs
  int nrb = 2;
  Conv conv_in;
  std::vector<Conv> in_conv;               // per level (empty tensors where the width is kept)
  std::vector<std::vector<Conv>> b1, b2;   // per level, per block
};

Conv rand_conv(std::mt19937& g, int64_t o, int64_t i, int64_t k) {
  std::normal_distribution<float> n(0.0f, 1.0f / std::sqrt(float(i * k * k)));
  Conv c{Tensor::empty({o, i, k, k}), Tensor::empty({o})};
  for (int64_t q = 0; q < c.w.numel(); ++q) c.w.f32()[q] = n(g);
  for (int64_t q = 0; q < o; ++q) c.b.f32()[q] = 0.1f * n(g);
  return c;
}

Model make_model(uint32_t seed, int cin) {
  std::mt19937 g(seed);
  Model m;
  m.cin = cin;
  m.conv_in = rand_conv(g, m.ch[0], 64 * cin, 3);
  int prev = m.ch[0];
  for (size_t i = 0; i < m.ch.size(); ++i) {
    m.in_conv.push_back(prev != m.ch[i] ? rand_conv(g, m.ch[i], prev, 1) : Conv{});
    m.b1.emplace_back();
    m.b2.emplace_back();
    for (int j = 0; j < m.nrb; ++j) {
      m.b1.back().push_back(rand_conv(g, m.ch[i], m.ch[i], 3));
      m.b2.back().push_back(rand_conv(g, m.ch[i], m.ch[i], 1));
    }
    prev = m.ch[i];
  }
  return m;
}

void add(std::vector<std::pair<std::string, Tensor>>& out, const std::string& name, const Conv& c) {
  out.emplace_back(name + ".weight", c.w);
  out.emplace_back(name + ".bias", c.b);
}

// The file in one layout: "original" (TencentARC) or "diffusers".
std::vector<std::pair<std::string, Tensor>> tensors(const Model& m, bool diffusers) {
  std::vector<std::pair<std::string, Tensor>> out;
  const std::string pre = diffusers ? "adapter." : "";
  add(out, pre + "conv_in", m.conv_in);
  for (size_t i = 0; i < m.ch.size(); ++i)
    for (int j = 0; j < m.nrb; ++j) {
      const std::string blk = diffusers ? cat(pre, "body.", i, ".resnets.", j) : cat("body.", int(i) * m.nrb + j);
      add(out, blk + ".block1", m.b1[i][size_t(j)]);
      add(out, blk + ".block2", m.b2[i][size_t(j)]);
      if (j == 0 && m.in_conv[i].w.defined())
        add(out, diffusers ? cat(pre, "body.", i, ".in_conv") : cat("body.", int(i) * m.nrb, ".in_conv"), m.in_conv[i]);
    }
  return out;
}

std::vector<Img> reference(const Model& m, const Tensor& hint) {
  const int64_t N = hint.dim(0), H = hint.dim(1), W = hint.dim(2);
  Img x = zeros(N, H, W, m.cin);
  for (int64_t i = 0; i < N * H * W; ++i) {
    const float* p = hint.f32() + 3 * i;
    if (m.cin == 1) x.v[size_t(i)] = (299.0 * p[0] + 587.0 * p[1] + 114.0 * p[2]) / 1000.0;
    else
      for (int k = 0; k < 3; ++k) x.v[size_t(3 * i + k)] = p[k];
  }
  // torch.nn.functional.pixel_unshuffle(x, 8): channel c·64 + i·8 + j holds pixel (8y + i, 8x + j) of c.
  Img u = zeros(N, H / 8, W / 8, 64 * m.cin);
  for (int64_t a = 0; a < N; ++a)
    for (int64_t y = 0; y < H / 8; ++y)
      for (int64_t xx = 0; xx < W / 8; ++xx)
        for (int64_t c = 0; c < m.cin; ++c)
          for (int64_t i = 0; i < 8; ++i)
            for (int64_t j = 0; j < 8; ++j) u.at(a, y, xx, c * 64 + i * 8 + j) = x.at(a, 8 * y + i, 8 * xx + j, c);
  Img h = conv(u, m.conv_in);
  std::vector<Img> feats;
  for (size_t i = 0; i < m.ch.size(); ++i) {
    if (i > 0) h = pool(h);
    if (m.in_conv[i].w.defined()) h = conv(h, m.in_conv[i]);
    for (int j = 0; j < m.nrb; ++j) {
      Img r = conv(h, m.b1[i][size_t(j)]);
      for (double& v : r.v) v = std::max(v, 0.0);
      r = conv(r, m.b2[i][size_t(j)]);
      for (size_t q = 0; q < r.v.size(); ++q) h.v[q] += r.v[q];
    }
    feats.push_back(h);
  }
  return feats;
}

class T2IAdapterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    be_ = make_cpu_backend(Precision::F32);
    dir_ = fs::temp_directory_path() / ("diffuse_test_t2i_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string write(const std::string& name, const std::vector<std::pair<std::string, Tensor>>& t) {
    const std::string p = (dir_ / name).string();
    save_safetensors(p, t);
    return p;
  }
  std::unique_ptr<Backend> be_;
  fs::path dir_;
};

TEST_F(T2IAdapterTest, BothLayoutsMatchTheDoubleReference) {
  for (int cin : {3, 1}) {
    const Model m = make_model(7 + uint32_t(cin), cin);
    // A 2-image hint of 40×24 pixels: 5×3 after the unshuffle, then 3×2, 2×1, 1×1 (pools round up).
    Tensor hint = Tensor::empty({2, 40, 24, 3});
    for (int64_t i = 0; i < hint.numel(); ++i) hint.f32()[i] = float((i * 7919) % 1000) / 999.0f;
    const std::vector<Img> ref = reference(m, hint);
    for (bool diffusers : {false, true}) {
      const std::string path = write(cat(diffusers ? "diffusers" : "original", cin, ".safetensors"), tensors(m, diffusers));
      T2IAdapter a = T2IAdapter::load_file(path, *be_);
      EXPECT_EQ(a.layout(), diffusers ? "diffusers" : "TencentARC");
      EXPECT_EQ(a.config().in_channels, cin);
      EXPECT_EQ(a.config().nums_rb, 2);
      EXPECT_EQ(a.config().channels, m.ch);
      Arena arena;
      Ctx c{*be_, arena};
      const std::vector<Tensor> f = a.forward(c, hint);
      ASSERT_EQ(f.size(), ref.size());
      double worst = 0;
      for (size_t i = 0; i < f.size(); ++i) {
        ASSERT_EQ(f[i].shape(), (Shape{ref[i].n, ref[i].h, ref[i].w, ref[i].c})) << "feature " << i;
        double d = 0, mx = 1;
        for (int64_t q = 0; q < f[i].numel(); ++q) {
          d = std::max(d, std::fabs(double(f[i].f32()[q]) - ref[i].v[size_t(q)]));
          mx = std::max(mx, std::fabs(ref[i].v[size_t(q)]));
        }
        worst = std::max(worst, d / mx);
      }
      std::printf("  %s layout, %d-channel hint: %zu features, max relative |Δ| vs double %.3g\n",
                  diffusers ? "diffusers" : "TencentARC", cin, f.size(), worst);
      EXPECT_LE(worst, 1e-5);
    }
  }
}

TEST_F(T2IAdapterTest, WrongFilesNameTheFileAndWhatWasExpected) {
  const Model m = make_model(3, 3);
  auto expect_error = [&](const std::string& path, const std::vector<std::string>& needles) {
    try {
      T2IAdapter::load_file(path, *be_);
      ADD_FAILURE() << path << " was accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << n << " not in: " << msg;
    }
  };
  // Not an adapter at all (a ControlNet-like name set).
  expect_error(write("other.safetensors", {{"controlnet_mid_block.weight", Tensor::zeros({4, 4, 1, 1})}}),
               {"not a T2I-Adapter", "body.K.block1"});
  // A block2 of the wrong kernel (an sk=False, ksize=3 variant): the shape names the tensor.
  auto t = tensors(m, false);
  for (auto& [n, v] : t)
    if (n == "body.1.block2.weight") v = Tensor::zeros({m.ch[0], m.ch[0], 3, 3});
  expect_error(write("bad_shape.safetensors", t), {"body.1.block2.weight"});
  // A missing tensor.
  t = tensors(m, true);
  t.erase(std::remove_if(t.begin(), t.end(), [](const auto& e) { return e.first == "adapter.body.2.resnets.1.block1.bias"; }),
          t.end());
  expect_error(write("missing.safetensors", t), {"adapter.body.2.resnets.1.block1.bias"});
  // skep convs (sk=False) and the light adapter's names are other architectures.
  t = tensors(m, false);
  t.emplace_back("body.0.skep.weight", Tensor::zeros({m.ch[0], m.ch[0], 1, 1}));
  expect_error(write("skep.safetensors", t), {"body.0.skep.weight", "not supported"});
  // An adapter of other widths does not fit an SD 1.5 UNet.
  T2IAdapter a = T2IAdapter::load_file(write("ok.safetensors", tensors(m, true)), *be_);
  try {
    a.check_compatible(UNetConfig::sd15());
    ADD_FAILURE() << "a [32, 64, 64, 64] adapter was accepted for SD 1.5";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not fit"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace diffuse
