// TAESD (models/taesd.h): a decoder and an encoder with random weights, written here in madebyollin's
// nn.Sequential layout and in diffusers' AutoencoderTiny layout, against a double-precision forward
// pass written here from the published architecture; the preview image (pipeline/preview.h); strict
// binding (missing, mis-shaped and unused tensors, other kinds of files) and --taesd DIR lookup.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "../common/expect_error.h"
#include "../common/taesd_files.h"
#include "../common/torch_pth.h"
#include "core/error.h"
#include "io/tensor_file.h"
#include "models/taesd.h"
#include "pipeline/preview.h"

namespace fs = std::filesystem;
using namespace diffuse;

namespace {

using namespace taesd_files;

std::string tmp_dir() {
  static const std::string d = [] {
    std::string t = ::testing::TempDir() + "diffuse_taesd_XXXXXX";
    std::vector<char> b(t.begin(), t.end());
    b.push_back('\0');
    const char* r = mkdtemp(b.data());
    return std::string(r ? r : "/tmp");
  }();
  return d;
}

std::string write(const std::string& name, const Named& tensors) {
  const std::string p = tmp_dir() + "/" + name;
  fs::create_directories(fs::path(p).parent_path());
  save_safetensors(p, tensors);
  return p;
}

void write_text(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << text;
}

// diffusers' published config for madebyollin/taesd (AutoencoderTiny).
const char* kConfig = R"({"_class_name": "AutoencoderTiny", "_diffusers_version": "0.20.0", "act_fn": "relu",
  "decoder_block_out_channels": [64, 64, 64, 64], "encoder_block_out_channels": [64, 64, 64, 64],
  "force_upcast": false, "in_channels": 3, "latent_channels": 4, "latent_magnitude": 3, "latent_shift": 0.5,
  "num_decoder_blocks": [3, 3, 3, 1], "num_encoder_blocks": [1, 3, 3, 3], "out_channels": 3,
  "scaling_factor": 1.0, "upsampling_scaling_factor": 2})";

// ---- the reference forward pass, in double, NHWC ----

struct Img {
  int h = 0, w = 0, c = 0;
  std::vector<double> v;  // [h, w, c]
  double& at(int y, int x, int k) { return v[(size_t(y) * w + x) * c + k]; }
  double get(int y, int x, int k) const { return v[(size_t(y) * w + x) * c + k]; }
};

Img conv(const Img& x, const Conv& cv) {
  Img y{(x.h - 1) / cv.stride + 1, (x.w - 1) / cv.stride + 1, cv.out, {}};  // 3×3, padding 1
  y.v.assign(size_t(y.h) * y.w * y.c, 0.0);
  for (int oy = 0; oy < y.h; ++oy)
    for (int ox = 0; ox < y.w; ++ox)
      for (int o = 0; o < cv.out; ++o) {
        double s = cv.bias ? cv.b[size_t(o)] : 0.0;
        for (int ky = 0; ky < 3; ++ky) {
          const int iy = oy * cv.stride + ky - 1;
          if (iy < 0 || iy >= x.h) continue;
          for (int kx = 0; kx < 3; ++kx) {
            const int ix = ox * cv.stride + kx - 1;
            if (ix < 0 || ix >= x.w) continue;
            for (int i = 0; i < cv.in; ++i) s += double(cv.w[((size_t(o) * cv.in + i) * 3 + ky) * 3 + kx]) * x.get(iy, ix, i);
          }
        }
        y.at(oy, ox, o) = s;
      }
  return y;
}
Img relu(Img x) {
  for (double& v : x.v) v = std::max(v, 0.0);
  return x;
}
Img block(const Img& x, const Blk& b) {
  Img h = conv(relu(conv(relu(conv(x, b.c[0])), b.c[1])), b.c[2]);
  for (size_t i = 0; i < h.v.size(); ++i) h.v[i] = std::max(h.v[i] + x.v[i], 0.0);
  return h;
}
Img upsample2(const Img& x) {
  Img y{x.h * 2, x.w * 2, x.c, {}};
  y.v.resize(size_t(y.h) * y.w * y.c);
  for (int yy = 0; yy < y.h; ++yy)
    for (int xx = 0; xx < y.w; ++xx)
      for (int k = 0; k < y.c; ++k) y.at(yy, xx, k) = x.get(yy / 2, xx / 2, k);
  return y;
}
// z: [h, w, 4] -> [8h, 8w, 3]
Img ref_decode(Img z, const Dec& d) {
  for (double& v : z.v) v = 3.0 * std::tanh(v / 3.0);
  Img x = relu(conv(z, d.in));
  for (int lv = 0; lv < 3; ++lv) {
    for (int k = 0; k < 3; ++k) x = block(x, d.blocks[lv * 3 + k]);
    x = conv(upsample2(x), d.up[lv]);
  }
  return conv(block(x, d.blocks[9]), d.out);
}
// image: [H, W, 3] -> [H/8, W/8, 4]
Img ref_encode(const Img& im, const Enc& e) {
  Img x = block(conv(im, e.in), e.blocks[0]);
  for (int lv = 0; lv < 3; ++lv) {
    x = conv(x, e.down[lv]);
    for (int k = 0; k < 3; ++k) x = block(x, e.blocks[1 + lv * 3 + k]);
  }
  return conv(x, e.out);
}

Img random_img(int h, int w, int c, uint32_t seed, double lo, double hi) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  Img x{h, w, c, {}};
  x.v.resize(size_t(h) * w * c);
  for (double& v : x.v) v = double(float(u(g)));  // f32 values, as the engine sees them
  return x;
}
// Images of a batch as one f32 NHWC tensor.
Tensor batch(const std::vector<Img>& ims) {
  Tensor t = Tensor::empty({int64_t(ims.size()), ims[0].h, ims[0].w, ims[0].c});
  float* p = t.f32();
  for (const Img& im : ims)
    for (double v : im.v) *p++ = float(v);
  return t;
}

// max|got − ref| over image `n` of `got`, and max|ref|.
std::pair<double, double> max_err(const Tensor& got, int64_t n, const Img& ref) {
  EXPECT_EQ(got.shape(), (Shape{got.dim(0), ref.h, ref.w, ref.c}));
  const Tensor f = got.dtype() == DType::F32 ? got : got.to(DType::F32);
  const float* p = f.f32() + n * int64_t(ref.v.size());
  double err = 0, mag = 0;
  for (size_t i = 0; i < ref.v.size(); ++i) {
    err = std::max(err, std::abs(double(p[i]) - ref.v[i]));
    mag = std::max(mag, std::abs(ref.v[i]));
  }
  return {err, mag};
}

// f32 with K-term dot products (K = 576) through about 20 layers: each layer's rounding is a few
// K·u relative at worst, far less in practice (errors of random sign); 1e-4 of the output's
// magnitude is ~5 layers' worst case, ~100× what random rounding gives.
constexpr double kRelTol = 1e-4;

TEST(TAESD, DecoderMatchesTheReferenceInBothLayouts) {
  const Dec d = make_decoder(1);
  const Enc e = make_encoder(2);
  Named orig, diff;
  add_decoder(orig, d, "", 1);
  add_decoder(diff, d, "decoder.layers.", 0);
  add_encoder(diff, e, "encoder.layers.");
  const std::string f_orig = write("taesd_decoder.safetensors", orig);
  const std::string f_diff = write("tiny/diffusion_pytorch_model.safetensors", diff);
  write_text(tmp_dir() + "/tiny/config.json", kConfig);
  // A1111 and ComfyUI download the original as taesd_decoder.pth: torch.save of the state dict.
  std::vector<torch_pth::Tensor> pth;
  for (const auto& [name, t] : orig)
    pth.push_back({name, t.shape().vec(), std::vector<float>(t.f32(), t.f32() + t.numel())});
  const std::string f_pth = tmp_dir() + "/pth/taesd_decoder.pth";
  fs::create_directories(tmp_dir() + "/pth");
  torch_pth::write(f_pth, {{"", pth}});

  // Latents beyond ±3 exercise the tanh clamp; a batch of 2 (image 1 is read by the preview).
  const Img z0 = random_img(5, 7, 4, 11, -4.5, 4.5), z1 = random_img(5, 7, 4, 12, -2, 2);
  const Img r0 = ref_decode(z0, d), r1 = ref_decode(z1, d);
  const Tensor z = batch({z0, z1});
  auto be = make_cpu_backend(Precision::F32);
  for (const std::string& path : {f_orig, f_pth, f_diff, tmp_dir() + "/tiny"}) {
    SCOPED_TRACE(path);
    const bool original = path == f_orig || path == f_pth;
    TAESD t;
    t.load(*be, open_model_file(path));
    EXPECT_TRUE(t.has_decoder());
    EXPECT_EQ(t.has_encoder(), !original);
    EXPECT_EQ(t.layout(), original ? "taesd" : "diffusers AutoencoderTiny");
    Arena arena;
    Ctx c{*be, arena};
    const Tensor y = t.decode(c, z);
    ASSERT_EQ(y.shape(), (Shape{2, 40, 56, 3}));
    for (int n = 0; n < 2; ++n) {
      const auto [err, mag] = max_err(y, n, n == 0 ? r0 : r1);
      std::printf("  decode %s image %d: max|err| %.3g, max|ref| %.3g, err/(tol·max|ref|) %.3f\n",
                  fs::path(path).filename().c_str(), n, err, mag, err / (kRelTol * mag));
      EXPECT_GT(mag, 0.1);  // not a degenerate (all-zero) network
      EXPECT_LE(err, kRelTol * mag);
    }

    // The preview: image 1, clamped to [0, 1] and rounded to 8 bits (±1 where f32 lands on a
    // rounding boundary).
    const Image im = taesd_preview(t, *be, z, 1);
    ASSERT_EQ(im.width, 56);
    ASSERT_EQ(im.height, 40);
    ASSERT_EQ(im.channels, 3);
    int off = 0, mid = 0;
    for (size_t i = 0; i < r1.v.size(); ++i) {
      const int want = int(std::lround(std::clamp(r1.v[i], 0.0, 1.0) * 255.0));
      EXPECT_LE(std::abs(int(im.pixels[i]) - want), 1) << i;
      off += int(im.pixels[i]) != want;
      mid += want > 0 && want < 255;
    }
    EXPECT_LE(off, 5);
    EXPECT_GT(mid, int(r1.v.size()) / 10);  // the comparison sees more than clamped pixels
  }
}

// With bf16 compute (where the CPU has it; else the backend says so and runs f32) the activations
// are stored in bf16 too: each of the ~20 layers rounds its inputs, weights and output to 8
// significant bits (2^-9 relative each); bound: 20 layers · 3 roundings · 2^-9 of the output's
// magnitude, the worst case of errors adding up in one direction.
TEST(TAESD, DecoderInBf16) {
  const Dec d = make_decoder(1);
  Named orig;
  add_decoder(orig, d, "", 1);
  const std::string path = write("bf16/taesd_decoder.safetensors", orig);
  const Img z = random_img(5, 7, 4, 13, -4.5, 4.5);
  const Img ref = ref_decode(z, d);
  auto be = make_cpu_backend(Precision::BF16);
  TAESD t;
  t.load(*be, open_model_file(path));
  Arena arena;
  Ctx c{*be, arena};
  const Tensor y = t.decode(c, batch({z}));
  EXPECT_EQ(y.dtype(), DType::F32);  // the image is f32 whatever the activations
  const auto [err, mag] = max_err(y, 0, ref);
  const double tol = 20 * 3 * std::ldexp(1.0, -9) * mag;
  std::printf("  decode %s: max|err| %.3g, max|ref| %.3g, err/tol %.3f\n",
              precision_name(be->effective_precision()), err, mag, err / tol);
  EXPECT_LE(err, tol);
}

TEST(TAESD, EncoderMatchesTheReferenceInBothLayouts) {
  const Dec d = make_decoder(3);
  const Enc e = make_encoder(4);
  Named orig, diff;
  add_encoder(orig, e, "");
  add_decoder(diff, d, "decoder.layers.", 0);
  add_encoder(diff, e, "encoder.layers.");
  const std::string f_orig = write("enc/taesd_encoder.safetensors", orig);
  const std::string f_diff = write("enc/tiny.safetensors", diff);
  const Img im = random_img(16, 24, 3, 21, 0, 1);
  const Img ref = ref_encode(im, e);
  auto be = make_cpu_backend(Precision::F32);
  for (const std::string& path : {f_orig, f_diff}) {
    SCOPED_TRACE(path);
    TAESD t;
    t.load(*be, open_model_file(path));
    EXPECT_TRUE(t.has_encoder());
    EXPECT_EQ(t.has_decoder(), path == f_diff);
    Arena arena;
    Ctx c{*be, arena};
    const Tensor y = t.encode(c, batch({im}));
    ASSERT_EQ(y.shape(), (Shape{1, 2, 3, 4}));
    const auto [err, mag] = max_err(y, 0, ref);
    std::printf("  encode %s: max|err| %.3g, max|ref| %.3g\n", fs::path(path).filename().c_str(), err, mag);
    EXPECT_GT(mag, 0.1);
    EXPECT_LE(err, kRelTol * mag);
    // An encoder-only file cannot make previews.
    if (path == f_orig) expect_error([&] { load_taesd_decoder(*be, path, Family::SD1); }, path, "decoder");
  }
}

// ---- strict binding ----

Named decoder_tensors() {
  Named n;
  add_decoder(n, make_decoder(5), "", 1);
  return n;
}

TEST(TAESD, BindsStrictly) {
  auto be = make_cpu_backend(Precision::F32);
  auto load = [&](const std::string& path) {
    TAESD t;
    t.load(*be, open_model_file(path));
  };
  {  // a tensor missing
    Named n = decoder_tensors();
    n.erase(std::find_if(n.begin(), n.end(), [](const auto& e) { return e.first == "7.weight"; }));
    const std::string p = write("bad/missing.safetensors", n);
    expect_error([&] { load(p); }, p, "missing tensor(s): 7.weight");
  }
  {  // a tensor of the wrong shape
    Named n = decoder_tensors();
    for (auto& [name, t] : n)
      if (name == "8.conv.2.weight") t = Tensor::zeros({64, 64, 1, 1});
    const std::string p = write("bad/shape.safetensors", n);
    expect_error([&] { load(p); }, p, "8.conv.2.weight is f32[64, 64, 1, 1], expected [64, 64, 3, 3]");
  }
  {  // a tensor nobody binds: the upsampling convs have no bias
    Named n = decoder_tensors();
    n.push_back({"7.bias", Tensor::zeros({64})});
    const std::string p = write("bad/extra.safetensors", n);
    expect_error([&] { load(p); }, p, "unused tensor(s): 7.bias");
  }
  {  // diffusers names, one missing: the message names the layout
    Named n;
    add_decoder(n, make_decoder(6), "decoder.layers.", 0);
    n.erase(std::find_if(n.begin(), n.end(), [](const auto& e) { return e.first == "decoder.layers.18.bias"; }));
    const std::string p = write("bad/diffusers_missing.safetensors", n);
    expect_error([&] { load(p); }, p, "decoder.layers.18.bias");
    expect_error([&] { load(p); }, p, "diffusers AutoencoderTiny");
  }
  {  // a TAESD for 16-channel latents (taesd3 / taef1)
    Named n;
    add_decoder(n, make_decoder(7, 16), "", 1);
    const std::string p = write("bad/taesd3_decoder.safetensors", n);
    expect_error([&] { load(p); }, p, "16-channel latents");
  }
  {  // a full VAE (AutoencoderKL, diffusers names) given as TAESD
    const std::string p = write("bad/vae.safetensors", {{"decoder.conv_in.weight", Tensor::zeros({512, 4, 3, 3})},
                                                        {"decoder.conv_in.bias", Tensor::zeros({512})},
                                                        {"post_quant_conv.weight", Tensor::zeros({4, 4, 1, 1})}});
    expect_error([&] { load(p); }, p, "not a TAESD");
    expect_error([&] { load(p); }, p, "full VAE");
    expect_error([&] { load_taesd_decoder(*be, p, Family::SD1); }, p, "taesd_decoder");
  }
  {  // the UNet's file: the tiny SD 1.x checkpoint
    const std::string p = std::string(DIFFUSE_TEST_DATA) + "/sd1/model/tiny-sd1.safetensors";
    expect_error([&] { load(p); }, p, "not a TAESD");
    expect_error([&] { load(p); }, p, "Stable Diffusion checkpoint");
  }
  {  // an nn.Sequential that is something else
    const std::string p = write("bad/seq.safetensors", {{"0.weight", Tensor::zeros({8, 3, 3, 3})}});
    expect_error([&] { load(p); }, p, "TAESD encoder");
  }
  {  // a diffusers folder whose config describes another architecture
    Named n;
    add_decoder(n, make_decoder(8), "decoder.layers.", 0);
    write("gelu/diffusion_pytorch_model.safetensors", n);
    std::string cfg = kConfig;
    cfg.replace(cfg.find("\"relu\""), 6, "\"gelu\"");
    write_text(tmp_dir() + "/gelu/config.json", cfg);
    const std::string dir = tmp_dir() + "/gelu";
    expect_error([&] { load(dir); }, dir + "/config.json", "act_fn is \"gelu\", expected \"relu\"");
  }
}

// --taesd DIR: the family's file, or a diffusers folder; the name-based family warning.
TEST(TAESD, FindsTheFamilysFileInAFolder) {
  const std::string dir = tmp_dir() + "/models";
  write("models/taesd_decoder.safetensors", decoder_tensors());
  EXPECT_EQ(resolve_taesd_path(dir, Family::SD1), dir + "/taesd_decoder.safetensors");
  EXPECT_EQ(resolve_taesd_path(dir, Family::SD2), dir + "/taesd_decoder.safetensors");
  // SDXL needs taesdxl_decoder: the SD one is not taken, and the message says why.
  expect_error([&] { resolve_taesd_path(dir, Family::SDXL); }, dir, "taesdxl_decoder.safetensors");
  expect_error([&] { resolve_taesd_path(dir, Family::SDXL); }, dir, "taesd_decoder.safetensors is for SD 1.x/2.x");
  write("models/taesdxl_decoder.safetensors", decoder_tensors());
  EXPECT_EQ(resolve_taesd_path(dir, Family::SDXL), dir + "/taesdxl_decoder.safetensors");
  // A file is itself, whatever its name.
  EXPECT_EQ(resolve_taesd_path(dir + "/taesdxl_decoder.safetensors", Family::SD1), dir + "/taesdxl_decoder.safetensors");
  // A diffusers AutoencoderTiny folder.
  const std::string hf = tmp_dir() + "/hf_taesd";
  Named n;
  add_decoder(n, make_decoder(9), "decoder.layers.", 0);
  write("hf_taesd/diffusion_pytorch_model.safetensors", n);
  write_text(hf + "/config.json", kConfig);
  EXPECT_EQ(resolve_taesd_path(hf, Family::SDXL), hf);
  auto be = make_cpu_backend(Precision::F32);
  EXPECT_TRUE(load_taesd_decoder(*be, hf, Family::SDXL).has_decoder());
  // Nothing usable.
  const std::string empty = tmp_dir() + "/empty";
  fs::create_directories(empty);
  expect_error([&] { resolve_taesd_path(empty, Family::SD1); }, empty, "no TAESD decoder for SD 1.x/2.x");
  expect_error([&] { resolve_taesd_path(empty + "/nope", Family::SD1); }, empty + "/nope", "no such file");

  // Only the name tells the family.
  EXPECT_NE(taesd_family_warning("x/taesdxl_decoder.pth", Family::SD1), "");
  EXPECT_EQ(taesd_family_warning("x/taesdxl_decoder.pth", Family::SDXL), "");
  EXPECT_NE(taesd_family_warning("x/taesd_decoder.safetensors", Family::SDXL), "");
  EXPECT_EQ(taesd_family_warning("x/taesd_decoder.safetensors", Family::SD2), "");
  EXPECT_EQ(taesd_family_warning("x/my_preview_decoder.safetensors", Family::SDXL), "");
  EXPECT_NE(taesd_family_warning("hf/taesd/", Family::SDXL), "");
}

}  // namespace
