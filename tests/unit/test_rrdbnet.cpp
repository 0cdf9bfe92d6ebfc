// ESRGAN / Real-ESRGAN upscalers (models/rrdbnet, pipeline/upscale): tiny random RRDBNets written
// here in the published key layouts (Real-ESRGAN safetensors and BasicSR .pth with params_ema,
// xinntao/ESRGAN, old ESRGAN "model.N"), run against a double-precision forward pass written here
// (plain NCHW loops), tiled against untiled, and the strict binding's errors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "../common/expect_error.h"
#include "../common/torch_pth.h"
#include "backend/backend.h"
#include "core/arena.h"
#include "io/tensor_file.h"
#include "models/controlnet.h"
#include "models/rrdbnet.h"
#include "pipeline/upscale.h"

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

// ---- the network's weights, in Real-ESRGAN names -----------------------------------------------

struct Spec {
  int in_ch = 3, out_ch = 3, nf = 8, nb = 2, gc = 4, ups = 2, unshuffle = 1;
};

struct Param {
  std::vector<int64_t> shape;
  std::vector<float> v;
};
using Weights = std::map<std::string, Param>;  // "conv_first.weight" -> values

Weights random_weights(const Spec& s, uint32_t seed) {
  std::mt19937 g(seed);
  Weights w;
  auto conv = [&](const std::string& name, int in, int out) {
    // uniform(±sqrt(3/fan_in)): unit-variance outputs for unit-variance inputs
    const float a = std::sqrt(3.0f / float(in * 9));
    std::uniform_real_distribution<float> dw(-a, a), db(-0.1f, 0.1f);
    Param wt{{out, in, 3, 3}, std::vector<float>(size_t(out * in * 9))}, bs{{out}, std::vector<float>(size_t(out))};
    for (float& x : wt.v) x = dw(g);
    for (float& x : bs.v) x = db(g);
    w[name + ".weight"] = wt;
    w[name + ".bias"] = bs;
  };
  conv("conv_first", s.in_ch * s.unshuffle * s.unshuffle, s.nf);
  for (int i = 0; i < s.nb; ++i)
    for (int k = 1; k <= 3; ++k)
      for (int m = 1; m <= 5; ++m)
        conv("body." + std::to_string(i) + ".rdb" + std::to_string(k) + ".conv" + std::to_string(m),
             s.nf + (m - 1) * s.gc, m == 5 ? s.nf : s.gc);
  conv("conv_body", s.nf, s.nf);
  for (int k = 1; k <= s.ups; ++k) conv("conv_up" + std::to_string(k), s.nf, s.nf);
  conv("conv_hr", s.nf, s.nf);
  conv("conv_last", s.nf, s.out_ch);
  return w;
}

// The other layouts' names for a Real-ESRGAN name.
std::string esrgan_name(const std::string& n) {
  std::smatch m;
  if (std::regex_match(n, m, std::regex(R"(body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias))")))
    return "RRDB_trunk." + m[1].str() + ".RDB" + m[2].str() + ".conv" + m[3].str() + "." + m[4].str();
  if (std::regex_match(n, m, std::regex(R"(conv_up(\d)\.(weight|bias))"))) return "upconv" + m[1].str() + "." + m[2].str();
  if (std::regex_match(n, m, std::regex(R"(conv_body\.(weight|bias))"))) return "trunk_conv." + m[1].str();
  if (std::regex_match(n, m, std::regex(R"(conv_hr\.(weight|bias))"))) return "HRconv." + m[1].str();
  return n;  // conv_first, conv_last
}

std::string old_name(const std::string& n, const Spec& s) {
  std::smatch m;
  if (std::regex_match(n, m, std::regex(R"(body\.(\d+)\.rdb(\d)\.conv(\d)\.(weight|bias))")))
    return "model.1.sub." + m[1].str() + ".RDB" + m[2].str() + ".conv" + m[3].str() + ".0." + m[4].str();
  if (std::regex_match(n, m, std::regex(R"(conv_up(\d)\.(weight|bias))")))
    return "model." + std::to_string(3 * std::stoi(m[1].str())) + "." + m[2].str();
  if (std::regex_match(n, m, std::regex(R"(conv_first\.(weight|bias))"))) return "model.0." + m[1].str();
  if (std::regex_match(n, m, std::regex(R"(conv_body\.(weight|bias))")))
    return "model.1.sub." + std::to_string(s.nb) + "." + m[1].str();
  if (std::regex_match(n, m, std::regex(R"(conv_hr\.(weight|bias))")))
    return "model." + std::to_string(3 * s.ups + 2) + "." + m[1].str();
  if (std::regex_match(n, m, std::regex(R"(conv_last\.(weight|bias))")))
    return "model." + std::to_string(3 * s.ups + 4) + "." + m[1].str();
  ADD_FAILURE() << "no old name for " << n;
  return n;
}

std::string tmp(const std::string& name) {
  static const std::string dir = [] {
    std::string d = ::testing::TempDir() + "diffuse_rrdbnet_" + std::to_string(::getpid());
    fs::create_directories(d);
    return d;
  }();
  return dir + "/" + name;
}

Tensor to_tensor(const Param& p) {
  Tensor t = Tensor::empty(Shape(p.shape));
  std::copy(p.v.begin(), p.v.end(), t.f32());
  return t;
}

// Writes `w` as safetensors with names renamed by `rename` (and an optional prefix).
std::string write_st(const std::string& file, const Weights& w, const std::function<std::string(const std::string&)>& rename = {}) {
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const auto& [n, p] : w) ts.emplace_back(rename ? rename(n) : n, to_tensor(p));
  const std::string path = tmp(file);
  save_safetensors(path, ts);
  return path;
}

std::vector<torch_pth::Tensor> pth_tensors(const Weights& w) {
  std::vector<torch_pth::Tensor> out;
  for (const auto& [n, p] : w) out.push_back({n, p.shape, p.v});
  return out;
}

// ---- the double-precision reference (NCHW, plain loops) ----------------------------------------

struct Img {
  int C = 0, H = 0, W = 0;
  std::vector<double> v;  // [C, H, W]
  double& at(int c, int y, int x) { return v[(size_t(c) * size_t(H) + size_t(y)) * size_t(W) + size_t(x)]; }
  double at(int c, int y, int x) const { return v[(size_t(c) * size_t(H) + size_t(y)) * size_t(W) + size_t(x)]; }
};
Img blank(int C, int H, int W) { return Img{C, H, W, std::vector<double>(size_t(C) * size_t(H) * size_t(W), 0.0)}; }

// 3×3, stride 1, zero padding 1, with bias.
Img conv3(const Img& x, const Weights& w, const std::string& name) {
  const Param& wt = w.at(name + ".weight");
  const Param& b = w.at(name + ".bias");
  const int O = int(wt.shape[0]), I = int(wt.shape[1]);
  EXPECT_EQ(I, x.C) << name;
  Img y = blank(O, x.H, x.W);
  for (int o = 0; o < O; ++o)
    for (int yy = 0; yy < x.H; ++yy)
      for (int xx = 0; xx < x.W; ++xx) {
        double acc = b.v[size_t(o)];
        for (int i = 0; i < I; ++i)
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const int sy = yy + ky - 1, sx = xx + kx - 1;
              if (sy < 0 || sy >= x.H || sx < 0 || sx >= x.W) continue;
              acc += double(wt.v[((size_t(o) * size_t(I) + size_t(i)) * 3 + size_t(ky)) * 3 + size_t(kx)]) * x.at(i, sy, sx);
            }
        y.at(o, yy, xx) = acc;
      }
  return y;
}
Img lrelu(Img x) {
  for (double& v : x.v) v = v < 0 ? 0.2 * v : v;
  return x;
}
Img cat(const Img& a, const Img& b) {
  Img y = a;
  y.C += b.C;
  y.v.insert(y.v.end(), b.v.begin(), b.v.end());
  return y;
}
Img axpy(double s, const Img& x, const Img& y) {  // s·x + y
  Img r = y;
  for (size_t i = 0; i < r.v.size(); ++i) r.v[i] = s * x.v[i] + y.v[i];
  return r;
}
Img up2(const Img& x) {
  Img y = blank(x.C, 2 * x.H, 2 * x.W);
  for (int c = 0; c < x.C; ++c)
    for (int yy = 0; yy < y.H; ++yy)
      for (int xx = 0; xx < y.W; ++xx) y.at(c, yy, xx) = x.at(c, yy / 2, xx / 2);
  return y;
}
// BasicSR's pixel_unshuffle: view(b, c, h, r, w, r).permute(0, 1, 3, 5, 2, 4).
Img unshuffle(const Img& x, int r) {
  Img y = blank(x.C * r * r, x.H / r, x.W / r);
  for (int c = 0; c < x.C; ++c)
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < r; ++j)
        for (int yy = 0; yy < y.H; ++yy)
          for (int xx = 0; xx < y.W; ++xx) y.at((c * r + i) * r + j, yy, xx) = x.at(c, yy * r + i, xx * r + j);
  return y;
}

Img reference(const Spec& s, const Weights& w, const Img& image) {
  const Img in = s.unshuffle > 1 ? unshuffle(image, s.unshuffle) : image;
  const Img feat = conv3(in, w, "conv_first");
  Img h = feat;
  for (int i = 0; i < s.nb; ++i) {
    Img x = h;
    for (int k = 1; k <= 3; ++k) {
      const std::string p = "body." + std::to_string(i) + ".rdb" + std::to_string(k) + ".conv";
      Img x1 = lrelu(conv3(x, w, p + "1"));
      Img x2 = lrelu(conv3(cat(x, x1), w, p + "2"));
      Img x3 = lrelu(conv3(cat(cat(x, x1), x2), w, p + "3"));
      Img x4 = lrelu(conv3(cat(cat(cat(x, x1), x2), x3), w, p + "4"));
      Img x5 = conv3(cat(cat(cat(cat(x, x1), x2), x3), x4), w, p + "5");
      x = axpy(0.2, x5, x);
    }
    h = axpy(0.2, x, h);
  }
  Img f = axpy(1.0, conv3(h, w, "conv_body"), feat);
  for (int k = 1; k <= s.ups; ++k) f = lrelu(conv3(up2(f), w, "conv_up" + std::to_string(k)));
  return conv3(lrelu(conv3(f, w, "conv_hr")), w, "conv_last");
}

Img random_image(int C, int H, int W, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> d(0.0, 1.0);
  Img x = blank(C, H, W);
  for (double& v : x.v) v = float(d(g));  // f32-representable
  return x;
}

Tensor nhwc(const Img& x) {  // [1, H, W, C] f32
  Tensor t = Tensor::empty({1, x.H, x.W, x.C});
  for (int c = 0; c < x.C; ++c)
    for (int y = 0; y < x.H; ++y)
      for (int xx = 0; xx < x.W; ++xx) t.f32()[(int64_t(y) * x.W + xx) * x.C + c] = float(x.at(c, y, xx));
  return t;
}

// max|got - ref| over all elements, relative to max(1, max|ref|).
double rel_err(const Tensor& got, const Img& ref) {
  EXPECT_EQ(got.shape(), (Shape{1, ref.H, ref.W, ref.C}));
  if (got.shape() != (Shape{1, ref.H, ref.W, ref.C})) return INFINITY;
  double err = 0, mx = 1;
  for (int c = 0; c < ref.C; ++c)
    for (int y = 0; y < ref.H; ++y)
      for (int x = 0; x < ref.W; ++x) {
        const double r = ref.at(c, y, x), g = got.f32()[(int64_t(y) * ref.W + x) * ref.C + c];
        err = std::max(err, std::isfinite(g) ? std::abs(g - r) : INFINITY);
        mx = std::max(mx, std::abs(r));
      }
  return err / mx;
}

std::unique_ptr<Backend> f32_backend() { return make_cpu_backend(Precision::F32); }

Tensor run(const RRDBNet& net, Backend& be, const Img& x) {
  static Arena arena;
  arena.reset();
  Ctx c{be, arena, DType::F32};
  return net.forward(c, nhwc(x)).clone();
}

// f32 convolutions (≤ 9·24 terms each, ~40 in sequence) against double: the error stays near
// 1e-6 of the output's scale; 2e-5 leaves room and still catches any wrong term (a misordered
// concat or a missing 0.2 moves the output by O(1)).
constexpr double kTol = 2e-5;

// ---- tests -------------------------------------------------------------------------------------

TEST(RRDBNet, X4RealESRGANSafetensorsMatchesDoubleReference) {
  const Spec s;
  const Weights w = random_weights(s, 1);
  const std::string path = write_st("x4.safetensors", w);
  auto be = f32_backend();
  const RRDBNet net = load_rrdbnet(path, *be);
  const RRDBNetConfig& k = net.config();
  EXPECT_EQ(net.layout(), RRDBLayout::RealESRGAN);
  EXPECT_EQ(k.num_feat, 8);
  EXPECT_EQ(k.num_block, 2);
  EXPECT_EQ(k.num_grow_ch, 4);
  EXPECT_EQ(k.num_upsample, 2);
  EXPECT_EQ(k.unshuffle, 1);
  EXPECT_EQ(k.scale(), 4);
  const Img x = random_image(3, 13, 11, 2);
  const Img ref = reference(s, w, x);
  ASSERT_EQ(ref.H, 52);
  const double e = rel_err(run(net, *be, x), ref);
  EXPECT_LE(e, kTol);
  std::printf("x4 13x11: max|Δ| / max(1, max|ref|) = %.2e\n", e);
}

TEST(RRDBNet, X2AndX1PixelUnshuffleMatchDoubleReference) {
  for (int r : {2, 4}) {
    SCOPED_TRACE(r);
    Spec s;
    s.unshuffle = r;
    const Weights w = random_weights(s, 10 + r);
    const std::string path = write_st("unshuffle" + std::to_string(r) + ".safetensors", w);
    auto be = f32_backend();
    const RRDBNet net = load_rrdbnet(path, *be);
    EXPECT_EQ(net.config().unshuffle, r);
    EXPECT_EQ(net.config().in_channels, 3);
    EXPECT_EQ(net.config().scale(), 4 / r);
    const Img x = random_image(3, 3 * r, 5 * r, 3);  // odd multiples: 6×10 and 12×20
    const Img ref = reference(s, w, x);
    EXPECT_EQ(ref.H, 3 * r * 4 / r);
    EXPECT_LE(rel_err(run(net, *be, x), ref), kTol);
    // H, W must be multiples of the unshuffle factor.
    static Arena a;
    Ctx c{*be, a, DType::F32};
    EXPECT_THROW(net.forward(c, nhwc(random_image(3, 3 * r + 1, 5 * r, 4))), Error);
  }
}

TEST(RRDBNet, AllLayoutsAndBasicSRPthGiveTheSameOutput) {
  Spec s;
  const Weights w = random_weights(s, 5);
  const Img x = random_image(3, 9, 7, 6);
  const Img ref = reference(s, w, x);
  auto be = f32_backend();
  const RRDBNet base = load_rrdbnet(write_st("base.safetensors", w), *be);
  const Tensor y = run(base, *be, x);
  EXPECT_LE(rel_err(y, ref), kTol);

  auto same = [&](const std::string& path, RRDBLayout layout) {
    SCOPED_TRACE(path);
    const RRDBNet net = load_rrdbnet(path, *be);
    EXPECT_EQ(net.layout(), layout);
    const Tensor z = run(net, *be, x);
    ASSERT_EQ(z.shape(), y.shape());
    EXPECT_EQ(std::memcmp(z.data(), y.data(), y.bytes()), 0) << "differs from the Real-ESRGAN names' output";
  };
  same(write_st("esrgan.safetensors", w, esrgan_name), RRDBLayout::ESRGAN);
  same(write_st("old.safetensors", w, [&](const std::string& n) { return old_name(n, s); }), RRDBLayout::OldESRGAN);
  same(write_st("prefixed.safetensors", w, [](const std::string& n) { return "params_ema." + n; }),
       RRDBLayout::RealESRGAN);

  // BasicSR's .pth: {"params": ..., "params_ema": ...}; the EMA weights run (params holds others).
  const Weights other = random_weights(s, 99);
  const std::string pth = tmp("RealESRGAN_x4plus.pth");
  torch_pth::write(pth, {{"params", pth_tensors(other)}, {"params_ema", pth_tensors(w)}});
  same(pth, RRDBLayout::RealESRGAN);
  const std::string only_params = tmp("net_g.pth");
  torch_pth::write(only_params, {{"params", pth_tensors(w)}});
  same(only_params, RRDBLayout::RealESRGAN);
  const std::string flat = tmp("flat.pth");  // a bare state dict (the old ESRGAN .pth files)
  std::vector<torch_pth::Tensor> old;
  for (const auto& [n, p] : w) old.push_back({old_name(n, s), p.shape, p.v});
  torch_pth::write(flat, {{"", old}});
  same(flat, RRDBLayout::OldESRGAN);
}

TEST(RRDBNet, OldLayoutX2AndX8UpsampleCounts) {
  for (int ups : {1, 3}) {
    SCOPED_TRACE(ups);
    Spec s;
    s.nb = 1;
    s.ups = ups;
    const Weights w = random_weights(s, 20 + ups);
    auto be = f32_backend();
    // x2: model.3, HR model.5, last model.7; x8: model.3, 6, 9, HR 11, last 13.
    const RRDBNet net = load_rrdbnet(write_st("old_up" + std::to_string(ups) + ".safetensors", w,
                                              [&](const std::string& n) { return old_name(n, s); }),
                                     *be);
    EXPECT_EQ(net.config().num_upsample, ups);
    EXPECT_EQ(net.config().scale(), 1 << ups);
    const Img x = random_image(3, 5, 6, 7);
    EXPECT_LE(rel_err(run(net, *be, x), reference(s, w, x)), kTol);
  }
}

// ---- images and tiles --------------------------------------------------------------------------

Image random_rgb(int W, int H, int channels, uint32_t seed) {
  Image im;
  im.width = W;
  im.height = H;
  im.channels = channels;
  im.pixels.resize(size_t(W) * size_t(H) * size_t(channels));
  std::mt19937 g(seed);
  // smooth-ish content plus noise, like a picture
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x)
      for (int c = 0; c < channels; ++c)
        im.pixels[(size_t(y) * size_t(W) + size_t(x)) * size_t(channels) + size_t(c)] =
            uint8_t(std::clamp(128.0 + 90.0 * std::sin(0.2 * x + 0.13 * y + c) + double(g() % 41) - 20.0, 0.0, 255.0));
  return im;
}

struct PixDiff {
  int max = 0;
  double mean = 0;
  size_t differing = 0;
};
PixDiff pixdiff(const Image& a, const Image& b) {
  PixDiff d;
  EXPECT_EQ(a.width, b.width);
  EXPECT_EQ(a.height, b.height);
  EXPECT_EQ(a.channels, b.channels);
  if (a.pixels.size() != b.pixels.size()) return {255, 255, a.pixels.size()};
  double sum = 0;
  for (size_t i = 0; i < a.pixels.size(); ++i) {
    const int e = std::abs(int(a.pixels[i]) - int(b.pixels[i]));
    d.max = std::max(d.max, e);
    d.differing += e != 0;
    sum += e;
  }
  d.mean = sum / double(a.pixels.size());
  return d;
}

TEST(Upscale, TilesCoverTheImageOnceOnMultiplesOfTheUnshuffle) {
  for (int m : {1, 2, 4})
    for (int tile : {0, 8, 24, 100}) {
      const int W = 60 * m / 2 * 2, H = 44;
      const std::vector<UpscaleTile> ts = upscale_tiles(W, H, tile, 5, m);
      std::vector<int> owned(size_t(W) * size_t(H), 0);
      for (const UpscaleTile& t : ts) {
        for (int v : {t.x0, t.x1, t.y0, t.y1, t.rx0, t.rx1, t.ry0, t.ry1}) EXPECT_EQ(v % m, 0);
        EXPECT_LE(t.x1 - t.x0, tile ? std::max(tile / m * m, m) : W);
        EXPECT_LE(t.rx0, t.x0);
        EXPECT_GE(t.rx1, t.x1);
        EXPECT_GE(t.x0 - t.rx0, std::min(5, t.x0));  // at least the overlap, where the image allows
        EXPECT_GE(t.ry1 - t.y1, std::min(5, H - t.y1));
        for (int y = t.y0; y < t.y1; ++y)
          for (int x = t.x0; x < t.x1; ++x) ++owned[size_t(y) * size_t(W) + size_t(x)];
      }
      EXPECT_TRUE(std::all_of(owned.begin(), owned.end(), [](int n) { return n == 1; })) << m << " " << tile;
    }
  EXPECT_THROW(upscale_tiles(64, 64, -1, 8), Error);
  EXPECT_THROW(upscale_tiles(64, 64, 64, -1), Error);
  EXPECT_THROW(upscale_tiles(64, 64, 2, 8, 4), Error);
}

// The untiled image against the double reference: RGB/255 in, clamp(0, 1)·255 rounded out; an odd
// size for an x2 model is reflect-padded to even and the output cropped (Real-ESRGAN's mod pad).
TEST(Upscale, UntiledImageMatchesReferenceIncludingReflectPadding) {
  for (int r : {1, 2}) {
    SCOPED_TRACE(r);
    Spec s;
    s.unshuffle = r;
    const Weights w = random_weights(s, 30 + r);
    auto be = f32_backend();
    const RRDBNet net = load_rrdbnet(write_st("img" + std::to_string(r) + ".safetensors", w), *be);
    const Image im = random_rgb(13, 11, 3, 8);
    UpscaleOptions o;
    o.tile = 0;
    const Image out = upscale_image(net, *be, im, o);
    const int sc = 4 / r;
    ASSERT_EQ(out.width, 13 * sc);
    ASSERT_EQ(out.height, 11 * sc);
    ASSERT_EQ(out.channels, 3);
    const int Wp = (13 + r - 1) / r * r, Hp = (11 + r - 1) / r * r;
    Img x = blank(3, Hp, Wp);
    auto refl = [](int v, int n) { return v < n ? v : 2 * n - 2 - v; };
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < Hp; ++y)
        for (int xx = 0; xx < Wp; ++xx)
          x.at(c, y, xx) = double(float(im.pixels[(size_t(refl(y, 11)) * 13 + size_t(refl(xx, 13))) * 3 + size_t(c)]) / 255.0f);
    const Img ref = reference(s, w, x);
    Image expect = out;
    for (int y = 0; y < out.height; ++y)
      for (int xx = 0; xx < out.width; ++xx)
        for (int c = 0; c < 3; ++c)
          expect.pixels[(size_t(y) * size_t(out.width) + size_t(xx)) * 3 + size_t(c)] =
              uint8_t(std::lround(std::clamp(ref.at(c, y, xx), 0.0, 1.0) * 255.0));
    const PixDiff d = pixdiff(out, expect);
    EXPECT_LE(d.max, 1);  // f32 vs double may round a value near k + 0.5 the other way
    EXPECT_LE(d.differing, out.pixels.size() / 100);
  }
}

// Receptive field of the 1-block net: (4 + 15 + 2) = 21 input pixels (x1: ×1; x2: ×2 = 42).
TEST(Upscale, TiledEqualsUntiledWithEnoughOverlapAndStaysCloseWithLittle) {
  for (int r : {1, 2}) {
    SCOPED_TRACE(r);
    Spec s;
    s.nb = 1;
    s.unshuffle = r;
    const Weights w = random_weights(s, 40 + r);
    auto be = f32_backend();
    const RRDBNet net = load_rrdbnet(write_st("tile" + std::to_string(r) + ".safetensors", w), *be);
    const Image im = random_rgb(r == 1 ? 81 : 121, r == 1 ? 67 : 97, 3, 9);
    UpscaleOptions whole;
    whole.tile = 0;
    const Image ref = upscale_image(net, *be, im, whole);
    UpscaleOptions tiled;
    tiled.tile = 24;
    tiled.overlap = 21 * r;
    int calls = 0, last_total = 0;
    tiled.progress = [&](int done, int total, int pass) {
      ++calls;
      EXPECT_EQ(done, calls);
      EXPECT_EQ(pass, 0);
      last_total = total;
    };
    const Image t = upscale_image(net, *be, im, tiled);
    EXPECT_GT(last_total, 6);
    EXPECT_EQ(calls, last_total);
    const PixDiff d = pixdiff(t, ref);
    EXPECT_LE(d.max, 1);
    EXPECT_LE(d.differing, ref.pixels.size() / 1000);
    std::printf("x%d, %d tiles, overlap %d: max %d, %zu of %zu values differ\n", 4 / r, last_total, tiled.overlap,
                d.max, d.differing, ref.pixels.size());
    // Less overlap than the receptive field: the seams' pixels lose context. With none they
    // change a lot (measured: mean 2.7 / 7.3 levels for x4 / x2, max ~100); a few pixels already
    // keep all but the faint far context of this random net (measured: max 1, mean ~0.01).
    tiled.progress = nullptr;
    tiled.overlap = 0;
    const PixDiff d0 = pixdiff(upscale_image(net, *be, im, tiled), ref);
    tiled.overlap = 4 * r;
    const PixDiff d4 = pixdiff(upscale_image(net, *be, im, tiled), ref);
    std::printf("  overlap 0: max %d mean %.4f; overlap %d: max %d mean %.4f\n", d0.max, d0.mean, 4 * r, d4.max, d4.mean);
    EXPECT_GT(d0.max, 10);
    EXPECT_LE(d4.max, 2);
    EXPECT_LT(d4.mean, d0.mean / 20);
  }
}

TEST(Upscale, AlphaIsResizedAndTargetSizesUseLanczos) {
  const Spec s;
  const Weights w = random_weights(s, 50);
  auto be = f32_backend();
  const RRDBNet net = load_rrdbnet(write_st("alpha.safetensors", w), *be);
  Image rgba = random_rgb(10, 7, 4, 11);
  rgba.text = {{"parameters", "a cat"}};
  UpscaleOptions o;
  const Image out = upscale_image(net, *be, rgba, o);
  ASSERT_EQ(out.channels, 4);
  ASSERT_EQ(out.width, 40);
  EXPECT_EQ(out.text, rgba.text);
  Image alpha;
  alpha.width = 10, alpha.height = 7, alpha.channels = 1;
  for (size_t i = 0; i < 70; ++i) alpha.pixels.push_back(rgba.pixels[i * 4 + 3]);
  const Image a = resize_lanczos(alpha, 40, 28);
  for (size_t i = 0; i < a.pixels.size(); ++i) ASSERT_EQ(out.pixels[i * 4 + 3], a.pixels[i]) << i;
  Image rgb;  // the RGBA image without its alpha
  rgb.width = 10, rgb.height = 7, rgb.channels = 3;
  for (size_t i = 0; i < 70; ++i)
    for (int c = 0; c < 3; ++c) rgb.pixels.push_back(rgba.pixels[i * 4 + size_t(c)]);
  const Image x4 = upscale_image(net, *be, rgb, o);
  for (size_t i = 0; i < x4.pixels.size() / 3; ++i)
    for (int c = 0; c < 3; ++c)
      ASSERT_EQ(out.pixels[i * 4 + size_t(c)], x4.pixels[i * 3 + size_t(c)]) << "RGBA's RGB differs from RGB's at " << i;
  // Hires fix's 2× with an x4 model: one pass, then Lanczos down.
  const Image x2 = upscale_image_to(net, *be, rgb, 20, 14, o);
  EXPECT_EQ(pixdiff(x2, resize_lanczos(x4, 20, 14)).max, 0);
  // 16× with an x4 model: two passes.
  int passes = 0;
  o.progress = [&](int done, int total, int pass) { passes = std::max(passes, pass + 1); };
  const Image x16 = upscale_image_to(net, *be, rgb, 160, 112, o);
  EXPECT_EQ(passes, 2);
  EXPECT_EQ(pixdiff(x16, upscale_image(net, *be, x4)).max, 0);
  EXPECT_THROW(upscale_image_to(net, *be, rgb, 0, 10), Error);
}

// ---- strict binding ----------------------------------------------------------------------------

TEST(RRDBNet, StrictBindingErrorsNameTheFileAndTheProblem) {
  Spec s;
  s.nb = 1;
  const Weights w = random_weights(s, 60);
  auto be = f32_backend();
  auto load = [&](const std::string& path) { return [&be, path] { load_rrdbnet(path, *be); }; };

  Weights missing = w;
  missing.erase("body.0.rdb2.conv3.bias");
  std::string p = write_st("missing.safetensors", missing);
  expect_error(load(p), p, "body.0.rdb2.conv3.bias");

  Weights bad = w;
  bad["body.0.rdb3.conv5.weight"].shape = {8, 20, 3, 3};  // 16 + 4·4 = 24 inputs expected
  bad["body.0.rdb3.conv5.weight"].v.resize(8 * 20 * 9);
  p = write_st("badshape.safetensors", bad);
  expect_error(load(p), p, "body.0.rdb3.conv5.weight is f32[8, 20, 3, 3], expected [8, 24, 3, 3]");

  Weights extra = w;
  extra["body.0.rdb1.conv1x1.weight"] = Param{{4, 8, 1, 1}, std::vector<float>(32, 0.f)};  // ESRGAN+
  p = write_st("extra.safetensors", extra);
  expect_error(load(p), p, "conv1x1");

  // Old layout: names in the file's own layout.
  Weights old_missing = w;
  old_missing.erase("conv_hr.weight");
  p = write_st("old_missing.safetensors", old_missing, [&](const std::string& n) { return old_name(n, s); });
  expect_error(load(p), p, "model.8.weight");

  // Wrong architectures.
  Weights lora;
  lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = Param{{4, 320}, std::vector<float>(1280, 0.f)};
  lora["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = Param{{320, 4}, std::vector<float>(1280, 0.f)};
  p = write_st("style_lora.safetensors", lora);
  expect_error(load(p), p, "not an ESRGAN / Real-ESRGAN upscaler (RRDBNet)");
  expect_error(load(p), p, "LoRA");
  Weights sd;
  sd["model.diffusion_model.input_blocks.0.0.weight"] = Param{{320, 4, 3, 3}, std::vector<float>(320 * 36, 0.f)};
  sd["first_stage_model.decoder.conv_in.weight"] = Param{{512, 4, 3, 3}, std::vector<float>(512 * 36, 0.f)};
  p = write_st("sd.safetensors", sd);
  expect_error(load(p), p, "expected Real-ESRGAN's conv_first.weight");
  p = tmp("missing_file.pth");
  expect_error(load(p), p, "no such file");

  // A model whose upsampling cannot undo its unshuffle would shrink images.
  Spec shrink = s;
  shrink.unshuffle = 4;
  shrink.ups = 1;
  p = write_st("shrink.safetensors", random_weights(shrink, 61));
  expect_error(load(p), p, "shrink");
}

}  // namespace
