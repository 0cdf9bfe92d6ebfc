// A1111's inpainting controls and outpainting (pipeline/inpaint_prep.h, api/inpaint_request.h):
// each step against the rule computed here by the test's own loops — the mask read and rounded,
// inverted, Gaussian-blurred (cv2's kernel and reflect-101 border), the "only masked" box, the
// "fill" of the masked area (PIL's box-blur Gaussian, premultiplied, composited), the padded
// image and feathered outpainting mask, the plan's paste-back — and the request checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "api/inpaint_request.h"
#include "core/error.h"
#include "pipeline/inpaint_prep.h"

using namespace diffuse;

namespace {

Image grey(int w, int h, uint8_t v = 0) {
  Image m;
  m.width = w;
  m.height = h;
  m.channels = 1;
  m.pixels.assign(size_t(w) * h, v);
  return m;
}

Image rgb_noise(int w, int h, unsigned seed) {
  Image im;
  im.width = w;
  im.height = h;
  im.channels = 3;
  std::mt19937 g(seed);
  for (int i = 0; i < w * h * 3; ++i) im.pixels.push_back(uint8_t(g() % 256));
  return im;
}

uint8_t& at(Image& m, int x, int y, int c = 0) { return m.pixels[(size_t(y) * m.width + x) * m.channels + c]; }
uint8_t at(const Image& m, int x, int y, int c = 0) { return m.pixels[(size_t(y) * m.width + x) * m.channels + c]; }

// Reflect-101 by walking: bounce off the ends until inside.
int mirror(int i, int n) {
  if (n == 1) return 0;
  while (i < 0 || i >= n) i = i < 0 ? -i : 2 * (n - 1) - i;
  return i;
}

// cv2.GaussianBlur((k, 1) or (1, k), sigma) on an 8-bit plane, k = 2·int(2.5σ + 0.5) + 1.
Image cv2_blur_1d(const Image& m, double sigma, bool x_axis) {
  const int k = 2 * int(2.5 * sigma + 0.5) + 1;
  std::vector<double> g;
  double sum = 0;
  for (int i = 0; i < k; ++i) {
    const double d = i - (k - 1) / 2.0;
    g.push_back(std::exp(-d * d / (2 * sigma * sigma)));
    sum += g.back();
  }
  Image out = m;
  for (int y = 0; y < m.height; ++y)
    for (int x = 0; x < m.width; ++x) {
      double v = 0;
      for (int i = 0; i < k; ++i) {
        const int o = i - (k - 1) / 2;
        v += g[size_t(i)] / sum * (x_axis ? at(m, mirror(x + o, m.width), y) : at(m, x, mirror(y + o, m.height)));
      }
      at(out, x, y) = uint8_t(std::floor(v + 0.5));
    }
  return out;
}

// PIL's GaussianBlur on float planes, naively: for each of 3 passes per axis, each output is the
// weighted window sum (weight 1 within l, a at l + 1, clamped indices) over 2(l + a) + 1.
void naive_pil_blur(std::vector<float>& p, int w, int h, int ch, float radius) {
  if (radius <= 0) return;
  const double s2 = double(radius) * radius / 3;
  const double L = std::sqrt(12 * s2 + 1);
  const int l = int(std::floor((L - 1) / 2));
  const double a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - double(l + 1) * (l + 1)));
  for (int axis = 0; axis < 2; ++axis)
    for (int pass = 0; pass < 3; ++pass) {
      std::vector<float> q = p;
      for (int y = 0; y < h; ++y)
        for (int x = 0; x < w; ++x)
          for (int c = 0; c < ch; ++c) {
            double v = 0;
            for (int o = -l - 1; o <= l + 1; ++o) {
              const double wt = std::abs(o) <= l ? 1.0 : a;
              const int sx = axis == 0 ? std::clamp(x + o, 0, w - 1) : x;
              const int sy = axis == 1 ? std::clamp(y + o, 0, h - 1) : y;
              v += wt * p[(size_t(sy) * w + sx) * ch + c];
            }
            q[(size_t(y) * w + x) * ch + c] = float(v / (2 * (l + a) + 1));
          }
      p = q;
    }
}

// A1111's masking.fill, written out: premultiplied by k = 1 - mask, blurred, composited.
Image naive_fill(const Image& im, const Image& mask) {
  const int w = im.width, h = im.height;
  std::vector<float> pre(size_t(w) * h * 4);
  for (int i = 0; i < w * h; ++i) {
    const float k = 1 - mask.pixels[size_t(i)] / 255.0f;
    for (int c = 0; c < 3; ++c) pre[size_t(i) * 4 + c] = im.pixels[size_t(i) * 3 + c] / 255.0f * k;
    pre[size_t(i) * 4 + 3] = k;
  }
  std::vector<float> col(size_t(w) * h * 3, 0), al(size_t(w) * h, 0);
  const std::pair<float, int> steps[] = {{256.f, 1}, {64.f, 1}, {16.f, 2}, {4.f, 4}, {2.f, 2}, {0.f, 1}};
  for (auto [radius, reps] : steps) {
    std::vector<float> b = pre;
    naive_pil_blur(b, w, h, 4, radius);
    for (int r = 0; r < reps; ++r)
      for (int i = 0; i < w * h; ++i) {
        const float as = b[size_t(i) * 4 + 3], ad = al[size_t(i)];
        if (as <= 0) continue;
        const float ao = as + ad * (1 - as);
        for (int c = 0; c < 3; ++c)
          col[size_t(i) * 3 + c] = (b[size_t(i) * 4 + c] + col[size_t(i) * 3 + c] * ad * (1 - as)) / ao;
        al[size_t(i)] = ao;
      }
  }
  Image out = im;
  for (size_t i = 0; i < col.size(); ++i) out.pixels[i] = uint8_t(std::clamp(int(std::lround(col[i] * 255)), 0, 255));
  return out;
}

// A1111's get_crop_region_v2 + expand_crop_region, transcribed with Python's int() and //.
CropBox a1111_box(const Image& m, int pad, int pw, int ph) {
  int x1 = m.width, y1 = m.height, x2 = 0, y2 = 0;
  for (int y = 0; y < m.height; ++y)
    for (int x = 0; x < m.width; ++x)
      if (at(m, x, y)) x1 = std::min(x1, x), y1 = std::min(y1, y), x2 = std::max(x2, x + 1), y2 = std::max(y2, y + 1);
  if (x2 == 0) return {};
  x1 = std::max(x1 - pad, 0), y1 = std::max(y1 - pad, 0), x2 = std::min(x2 + pad, m.width), y2 = std::min(y2 + pad, m.height);
  auto floordiv2 = [](int v) { return int(std::floor(v / 2.0)); };
  if (double(x2 - x1) / (y2 - y1) > double(pw) / ph) {
    const double desired = (x2 - x1) / (double(pw) / ph);
    const int diff = int(desired - (y2 - y1));
    y1 -= floordiv2(diff);
    y2 += diff - floordiv2(diff);
    if (y2 >= m.height) { const int d = y2 - m.height; y2 -= d; y1 -= d; }
    if (y1 < 0) { y2 -= y1; y1 = 0; }
    if (y2 >= m.height) y2 = m.height;
  } else {
    const double desired = (y2 - y1) * (double(pw) / ph);
    const int diff = int(desired - (x2 - x1));
    x1 -= floordiv2(diff);
    x2 += diff - floordiv2(diff);
    if (x2 >= m.width) { const int d = x2 - m.width; x2 -= d; x1 -= d; }
    if (x1 < 0) { x2 -= x1; x1 = 0; }
    if (x2 >= m.width) x2 = m.width;
  }
  return {x1, y1, x2, y2};
}

}  // namespace

TEST(InpaintPrep, MaskGreyRoundAndInvert) {
  Image m;
  m.width = 4;
  m.height = 1;
  m.channels = 3;
  m.pixels = {128, 128, 128, 129, 129, 129, 0, 0, 0, 255, 255, 255};
  EXPECT_EQ(mask_to_grey(m, false).pixels, (std::vector<uint8_t>{128, 129, 0, 255}));
  EXPECT_EQ(mask_to_grey(m, true).pixels, (std::vector<uint8_t>{0, 255, 0, 255}));  // > 128
  EXPECT_EQ(invert_mask(mask_to_grey(m, false)).pixels, (std::vector<uint8_t>{127, 126, 255, 0}));
  // RGBA whose alpha is not all opaque: the alpha is the mask.
  Image a;
  a.width = 2;
  a.height = 1;
  a.channels = 4;
  a.pixels = {255, 255, 255, 10, 0, 0, 0, 200};
  EXPECT_EQ(mask_to_grey(a, false).pixels, (std::vector<uint8_t>{10, 200}));
  Image color;  // luma of a colour: 0.299 R + 0.587 G + 0.114 B
  color.width = 1;
  color.height = 1;
  color.channels = 3;
  color.pixels = {200, 100, 50};
  EXPECT_EQ(mask_to_grey(color, false).pixels[0], uint8_t(std::lround(0.299 * 200 + 0.587 * 100 + 0.114 * 50)));
}

TEST(InpaintPrep, MaskBlurIsCv2Gaussian) {
  // An impulse: row = round(255 · normalized Gaussian tap).
  Image d = grey(41, 1);
  at(d, 20, 0) = 255;
  const double s = 4;
  const Image b = gaussian_blur_mask(d, s, 0);
  const int k = 2 * int(2.5 * s + 0.5) + 1;  // 21 taps
  double sum = 0;
  for (int i = -(k / 2); i <= k / 2; ++i) sum += std::exp(-i * i / (2 * s * s));
  for (int x = 0; x < 41; ++x) {
    const int o = x - 20;
    const double want = std::abs(o) <= k / 2 ? 255 * std::exp(-o * o / (2 * s * s)) / sum : 0;
    EXPECT_EQ(int(b.pixels[size_t(x)]), int(std::floor(want + 0.5))) << x;
  }
  // A random mask, both axes, sigmas 3 and 2, small enough that reflect-101 wraps more than once.
  Image m = grey(9, 7);
  std::mt19937 g(3);
  for (uint8_t& v : m.pixels) v = g() % 2 ? 255 : 0;
  const Image want = cv2_blur_1d(cv2_blur_1d(m, 3, true), 2, false);
  EXPECT_EQ(gaussian_blur_mask(m, 3, 2).pixels, want.pixels);
  EXPECT_EQ(gaussian_blur_mask(m, 0, 0).pixels, m.pixels);
}

TEST(InpaintPrep, OnlyMaskedBoxIsA1111s) {
  Image m = grey(100, 80);
  for (int y = 30; y < 40; ++y)
    for (int x = 40; x < 50; ++x) at(m, x, y) = 255;
  // Worked by hand: bbox [40,50)x[30,40), padding 4 -> [36,54)x[26,44) (18x18); processing 64x32
  // (ratio 2 > 1): width to 36, diff 18 split 9/9 -> x [27, 63).
  CropBox b = only_masked_box(m, 4, 64, 32);
  EXPECT_EQ(b.x0, 27);
  EXPECT_EQ(b.x1, 63);
  EXPECT_EQ(b.y0, 26);
  EXPECT_EQ(b.y1, 44);
  // Against the transcription: boxes at the edges (shifted back inside), odd differences, both axes.
  std::mt19937 g(7);
  for (int t = 0; t < 300; ++t) {
    Image r = grey(40 + int(g() % 60), 30 + int(g() % 60));
    const int x0 = int(g() % r.width), y0 = int(g() % r.height);
    const int x1 = std::min(r.width, x0 + 1 + int(g() % 20)), y1 = std::min(r.height, y0 + 1 + int(g() % 20));
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) at(r, x, y) = uint8_t(1 + g() % 255);
    const int pad = int(g() % 40), pw = 8 * (1 + int(g() % 16)), ph = 8 * (1 + int(g() % 16));
    const CropBox got = only_masked_box(r, pad, pw, ph), want = a1111_box(r, pad, pw, ph);
    ASSERT_EQ(got.x0, want.x0) << t;
    ASSERT_EQ(got.x1, want.x1) << t;
    ASSERT_EQ(got.y0, want.y0) << t;
    ASSERT_EQ(got.y1, want.y1) << t;
  }
  EXPECT_TRUE(only_masked_box(grey(10, 10), 4, 8, 8).empty());
}

TEST(InpaintPrep, PilGaussianHasSigmaRadius) {
  // Three box passes of radius l + a: an impulse keeps its sum and gets variance radius².
  for (float radius : {2.0f, 4.0f, 16.0f, 64.0f}) {
    const int w = 1001;
    std::vector<float> p(size_t(w), 0.0f);
    p[500] = 1.0f;
    pil_gaussian_blur(p, w, 1, 1, radius);
    double s = 0, var = 0;
    for (int x = 0; x < w; ++x) s += p[size_t(x)], var += p[size_t(x)] * double(x - 500) * (x - 500);
    EXPECT_NEAR(s, 1.0, 1e-4) << radius;
    EXPECT_NEAR(var, double(radius) * radius, 1e-3 * radius * radius) << radius;
  }
  // Against the naive window sums (clamped edges), 2 channels.
  std::vector<float> a(12 * 9 * 2);
  std::mt19937 g(5);
  for (float& v : a) v = float(g() % 1000) / 999.0f;
  std::vector<float> b = a;
  pil_gaussian_blur(a, 12, 9, 2, 3.0f);
  naive_pil_blur(b, 12, 9, 2, 3.0f);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-5) << i;
}

TEST(InpaintPrep, FillTakesTheSurroundingColours) {
  // Unmasked pixels stay; a masked hole in a uniform colour becomes that colour.
  Image im = rgb_noise(24, 16, 1);
  Image mask = grey(24, 16);
  for (int y = 4; y < 12; ++y)
    for (int x = 6; x < 14; ++x) {
      at(mask, x, y) = 255;
      for (int c = 0; c < 3; ++c) at(im, x, y, c) = 0;
    }
  Image flat = im;
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 24; ++x)
      if (!at(mask, x, y)) at(flat, x, y, 0) = 30, at(flat, x, y, 1) = 120, at(flat, x, y, 2) = 220;
  const Image ff = fill_masked(flat, mask);
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 24; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_NEAR(at(ff, x, y, c), at(flat, x, y, c) + (at(mask, x, y) ? (c == 0 ? 30 : c == 1 ? 120 : 220) : 0), 1);
  const Image f = fill_masked(im, mask);
  const Image want = naive_fill(im, mask);
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 24; ++x)
      for (int c = 0; c < 3; ++c) {
        if (!at(mask, x, y)) {
          ASSERT_EQ(at(f, x, y, c), at(im, x, y, c));
        }
        ASSERT_NEAR(at(f, x, y, c), at(want, x, y, c), 1) << x << "," << y;
      }
}

TEST(InpaintPrep, OutpaintPaddingAndFeatheredMask) {
  const Image im = rgb_noise(24, 16, 2);
  const OutpaintPad pad{16, 8, 0, 8};
  const Image p = pad_image(im, pad);
  ASSERT_EQ(p.width, 24 + 16 + 8);
  ASSERT_EQ(p.height, 16 + 0 + 8);
  for (int y = 0; y < p.height; ++y)
    for (int x = 0; x < p.width; ++x)
      for (int c = 0; c < 3; ++c) {
        const bool inside = x >= 16 && x < 40 && y < 16;
        ASSERT_EQ(at(p, x, y, c), inside ? at(im, x - 16, y, c) : 0);
      }
  const Image m = outpaint_mask(24, 16, pad, 3);
  for (int y = 0; y < p.height; ++y)
    for (int x = 0; x < p.width; ++x) {
      // Black over the original shrunk by 3 on the padded sides (left, right, bottom), not the top.
      const bool keep = x >= 16 + 3 && x < 40 - 3 && y >= 0 && y < 16 - 3;
      ASSERT_EQ(at(m, x, y), keep ? 0 : 255) << x << "," << y;
    }

  // The plan: init + padding, the latent mask shrunk by blur / 2, the overlay clip(2 · blurred
  // mask shrunk by 2 · blur), the padding filled, the kept area the original.
  InpaintSettings s;
  s.blur_x = s.blur_y = 4;
  s.content = MaskedContent::Fill;
  s.outpaint = pad;
  const InpaintPlan plan = prepare_inpaint(im, nullptr, 0, 0, s);
  EXPECT_EQ(plan.width, 48);
  EXPECT_EQ(plan.height, 24);
  EXPECT_TRUE(plan.composite);
  EXPECT_FALSE(plan.only_masked);
  EXPECT_EQ(plan.mask.pixels, outpaint_mask(24, 16, pad, 2).pixels);
  Image ov = cv2_blur_1d(cv2_blur_1d(outpaint_mask(24, 16, pad, 8), 4, true), 4, false);
  for (uint8_t& v : ov.pixels) v = uint8_t(std::min(255, 2 * v));
  EXPECT_EQ(plan.overlay.pixels, ov.pixels);
  const Image filled = naive_fill(p, plan.mask);
  for (int y = 0; y < 24; ++y)
    for (int x = 0; x < 48; ++x)
      for (int c = 0; c < 3; ++c) ASSERT_NEAR(at(plan.init, x, y, c), at(filled, x, y, c), 1);
  // finish(): the original where the overlay is 0, the generated image where it is 255.
  Image gen = rgb_noise(48, 24, 9);
  const Image g0 = gen;
  plan.finish(gen);
  for (int y = 0; y < 24; ++y)
    for (int x = 0; x < 48; ++x)
      for (int c = 0; c < 3; ++c) {
        const int a = at(plan.overlay, x, y);
        ASSERT_EQ(at(gen, x, y, c), (at(p, x, y, c) * (255 - a) + at(g0, x, y, c) * a + 127) / 255);
      }
}

TEST(InpaintPrep, OnlyMaskedPlanCropsAndPastesBack) {
  const Image im = rgb_noise(60, 40, 4);
  Image mask = grey(60, 40);
  for (int y = 10; y < 18; ++y)
    for (int x = 30; x < 42; ++x) at(mask, x, y) = 255;
  InpaintSettings s;
  s.only_masked = true;
  s.only_masked_padding = 2;
  s.blur_x = s.blur_y = 1;
  const InpaintPlan plan = prepare_inpaint(im, &mask, 32, 16, s);
  ASSERT_TRUE(plan.only_masked);
  EXPECT_EQ(plan.width, 32);
  EXPECT_EQ(plan.height, 16);
  const Image blurred = cv2_blur_1d(cv2_blur_1d(mask, 1, true), 1, false);
  EXPECT_EQ(plan.overlay.pixels, blurred.pixels);
  const CropBox want = a1111_box(blurred, 2, 32, 16);
  EXPECT_EQ(plan.box.x0, want.x0);
  EXPECT_EQ(plan.box.x1, want.x1);
  EXPECT_EQ(plan.box.y0, want.y0);
  EXPECT_EQ(plan.box.y1, want.y1);
  EXPECT_EQ(plan.init.pixels, resize_image(crop_image(im, want), 32, 16, 2).pixels);
  EXPECT_EQ(plan.mask.pixels, resize_image(crop_image(blurred, want), 32, 16, 2).pixels);
  // A uniform generated image pasted back: outside the box the original, inside blended by the mask.
  Image gen = rgb_noise(32, 16, 0);
  std::fill(gen.pixels.begin(), gen.pixels.end(), uint8_t(200));
  plan.finish(gen);
  ASSERT_EQ(gen.width, 60);
  ASSERT_EQ(gen.height, 40);
  for (int y = 0; y < 40; ++y)
    for (int x = 0; x < 60; ++x)
      for (int c = 0; c < 3; ++c) {
        const bool in = x >= want.x0 && x < want.x1 && y >= want.y0 && y < want.y1;
        const int a = at(blurred, x, y);
        ASSERT_EQ(at(gen, x, y, c), in ? (at(im, x, y, c) * (255 - a) + 200 * a + 127) / 255 : at(im, x, y, c));
      }
  // Inverted: the mask is 255 - the rounded mask (no blur, whole image, no composite).
  InpaintSettings inv;
  inv.invert = true;
  const InpaintPlan pi = prepare_inpaint(im, &mask, 60, 40, inv);
  for (size_t i = 0; i < mask.pixels.size(); ++i) ASSERT_EQ(pi.mask.pixels[i], 255 - mask.pixels[i]);
  EXPECT_FALSE(pi.composite);
  // An empty mask with only masked: the whole image resized to the processing size (A1111's fallback).
  Image empty = grey(60, 40);
  const InpaintPlan fb = prepare_inpaint(im, &empty, 32, 16, s);
  EXPECT_FALSE(fb.only_masked);
  EXPECT_EQ(fb.width, 32);
  EXPECT_EQ(fb.init.pixels, resize_image(im, 32, 16, 0).pixels);
}

TEST(InpaintPrep, ResizeAndFillStretchesTheEdges) {
  const Image im = rgb_noise(20, 10, 6);
  const Image r = resize_image(im, 16, 16, 2);  // fit: 16x8, centred, 4 rows above and below
  ASSERT_EQ(r.width, 16);
  ASSERT_EQ(r.height, 16);
  for (int x = 0; x < 16; ++x)
    for (int c = 0; c < 3; ++c) {
      for (int y = 0; y < 4; ++y) ASSERT_EQ(at(r, x, y, c), at(r, x, 4, c));
      for (int y = 12; y < 16; ++y) ASSERT_EQ(at(r, x, y, c), at(r, x, 11, c));
    }
  EXPECT_EQ(resize_image(im, 20, 10, 2).pixels, im.pixels);
}

TEST(InpaintRequest, ChecksNameTheFlag) {
  auto msg = [](const api::Request& r, api::Engine::ImagesGiven g) {
    try {
      api::check_inpaint_settings(r, g);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const api::Engine::ImagesGiven init{true, false, false}, none{}, both{true, true, false};
  api::Request r;
  r.outpaint_left = -8;
  EXPECT_NE(msg(r, init).find("--outpaint"), std::string::npos);
  r.outpaint_left = 64;
  EXPECT_NE(msg(r, none).find("--outpaint needs an init image"), std::string::npos);
  EXPECT_NE(msg(r, both).find("leave --mask out"), std::string::npos);
  r.width = 512;
  EXPECT_NE(msg(r, init).find("-W/--width"), std::string::npos);
  r.width = 0;
  EXPECT_EQ(msg(r, init), "");
  api::Request q;
  q.mask_blur = 4;
  EXPECT_NE(msg(q, init).find("--mask-blur needs a mask"), std::string::npos);
  EXPECT_EQ(msg(q, both), "");
  q.mask_blur = 65;
  EXPECT_NE(msg(q, both).find("--mask-blur 65"), std::string::npos);
  q.mask_blur = -1;
  q.masked_content = "noise";
  EXPECT_NE(msg(q, both).find("--masked-content noise"), std::string::npos);
  q.masked_content = "latent-nothing";
  EXPECT_EQ(msg(q, both), "");
  EXPECT_EQ(api::masked_content(q), MaskedContent::LatentNothing);
  q.only_masked_padding = 300;
  EXPECT_NE(msg(q, both).find("--only-masked-padding 300"), std::string::npos);

  // Outpainting's size: the init's plus the padding, multiples of 8.
  api::Request o;
  o.init.width = 60;
  o.init.height = 40;
  o.outpaint_left = 2;
  o.outpaint_top = 4;
  int w = 0, h = 0;
  api::inpaint_output_size(o, &w, &h);
  EXPECT_EQ(w, 62);
  EXPECT_EQ(h, 44);
  try {
    api::check_inpaint_images(o);
    ADD_FAILURE() << "62x44 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--outpaint 2,0,4,0"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("e.g. --outpaint 2,2,4,4"), std::string::npos) << e.what();
  }
  o.outpaint_right = 2;
  o.outpaint_bottom = 4;
  EXPECT_NO_THROW(api::check_inpaint_images(o));
  // Defaults: outpainting fills and blurs 4; a plain mask keeps the original, no blur.
  const InpaintSettings so = api::inpaint_settings(o);
  EXPECT_EQ(so.blur_x, 4);
  EXPECT_EQ(so.content, MaskedContent::Fill);
  const InpaintSettings sm = api::inpaint_settings(api::Request{});
  EXPECT_EQ(sm.blur_x, 0);
  EXPECT_EQ(sm.content, MaskedContent::Original);
}
