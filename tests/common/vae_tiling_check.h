// Shared by the tiled-VAE tests (tests/parity/test_vae_tiling.cpp, tests/slow/test_vae_tiling_full.cpp):
// test inputs (noise, a picture-like image) and the tiled-vs-untiled figures (max/mean |Δ|, and
// |Δ| near the seams against |Δ| inside the tiles).
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "models/synthetic.h"
#include "models/vae.h"
#include "nn/weights.h"

namespace diffuse::vae_tiling_check {

inline Tensor noise(const Shape& s, uint32_t seed) {
  Tensor t = Tensor::empty(s);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = nd(rng);
  return t;
}

// A picture-like image in [-1, 1]: smooth colour gradients, a few discs and stripes with sharp
// edges, mild noise.
inline Tensor picture(int64_t B, int64_t H, int64_t W, uint32_t seed) {
  Tensor t = Tensor::empty({B, H, W, 3});
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::normal_distribution<float> nd;
  for (int64_t b = 0; b < B; ++b) {
    float cx[4], cy[4], r[4], col[4][3];
    for (int k = 0; k < 4; ++k) {
      cx[k] = u(rng) * W, cy[k] = u(rng) * H, r[k] = (0.1f + 0.2f * u(rng)) * float(std::min(H, W));
      for (float& c : col[k]) c = 2 * u(rng) - 1;
    }
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        float* p = t.f32() + ((b * H + y) * W + x) * 3;
        const float fy = float(y) / float(H), fx = float(x) / float(W);
        p[0] = 0.8f * fx - 0.4f, p[1] = 0.6f * std::sin(6.0f * fy), p[2] = 0.5f * (fx * fy) - 0.2f;
        if ((x / 24 + y / 40) % 5 == 0) p[1] += 0.5f;
        for (int k = 0; k < 4; ++k)
          if ((float(x) - cx[k]) * (float(x) - cx[k]) + (float(y) - cy[k]) * (float(y) - cy[k]) < r[k] * r[k])
            for (int c = 0; c < 3; ++c) p[c] = col[k][c];
        for (int c = 0; c < 3; ++c) p[c] = std::clamp(p[c] + 0.03f * nd(rng), -1.0f, 1.0f);
      }
  }
  return t;
}

struct Diff {
  double max_abs = 0, mean_abs = 0, max_ref = 0, std_ref = 0;
};

inline Diff compare(const Tensor& a, const Tensor& ref) {
  EXPECT_EQ(a.shape(), ref.shape());
  Diff d;
  if (a.shape() != ref.shape()) return d;
  double s = 0, s2 = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double e = std::fabs(double(a.f32()[i]) - ref.f32()[i]);
    if (!std::isfinite(e)) d.max_abs = INFINITY;
    d.max_abs = std::max(d.max_abs, e);
    d.mean_abs += e;
    d.max_ref = std::max(d.max_ref, std::fabs(double(ref.f32()[i])));
    s += ref.f32()[i], s2 += double(ref.f32()[i]) * ref.f32()[i];
  }
  const double n = double(a.numel());
  d.mean_abs /= n;
  d.std_ref = std::sqrt(std::max(0.0, s2 / n - (s / n) * (s / n)));
  return d;
}

// |Δ| split into the band within `band` px of a seam and the rest (NHWC [B, H, W, C]); and the
// same for the step of Δ between neighbouring pixels (a seam is a step in Δ across the cut).
struct Seams {
  double border_max = 0, border_mean = 0, inner_max = 0, inner_mean = 0;
  double border_step = 0, inner_step = 0;  // max |Δ(p) - Δ(p')| over horizontal/vertical neighbours
  int64_t border_n = 0, inner_n = 0;
};

inline Seams seam_metric(const Tensor& a, const Tensor& ref, const VAETileAxis& ay, const VAETileAxis& ax, double band) {
  const int64_t B = a.dim(0), H = a.dim(1), W = a.dim(2), C = a.dim(3);
  auto near = [&](const std::vector<double>& seams, int64_t p) {
    for (double s : seams)
      if (std::fabs(double(p) + 0.5 - s) <= band) return true;
    return false;
  };
  Seams m;
  double bs = 0, is = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const bool border = near(ay.seams, y) || near(ax.seams, x);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = ((b * H + y) * W + x) * C + c;
          const double e = std::fabs(double(a.f32()[i]) - ref.f32()[i]);
          if (border) m.border_max = std::max(m.border_max, e), bs += e, ++m.border_n;
          else m.inner_max = std::max(m.inner_max, e), is += e, ++m.inner_n;
        }
      }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const bool border = near(ay.seams, y) || near(ax.seams, x);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = ((b * H + y) * W + x) * C + c;
          const double d = double(a.f32()[i]) - ref.f32()[i];
          double step = 0;
          if (x + 1 < W) step = std::max(step, std::fabs(d - (double(a.f32()[i + C]) - ref.f32()[i + C])));
          if (y + 1 < H) step = std::max(step, std::fabs(d - (double(a.f32()[i + W * C]) - ref.f32()[i + W * C])));
          double& s = border ? m.border_step : m.inner_step;
          s = std::max(s, step);
        }
      }
  m.border_mean = m.border_n ? bs / double(m.border_n) : 0;
  m.inner_mean = m.inner_n ? is / double(m.inner_n) : 0;
  return m;
}

inline void print(const char* what, const Diff& d) {
  std::printf("  %-40s max|d| %.3g  mean|d| %.3g  (untiled max|x| %.3g, std %.3g)\n", what, d.max_abs, d.mean_abs,
              d.max_ref, d.std_ref);
}

inline void print(const char* what, const Seams& s) {
  std::printf("  %-40s |d| near seams: max %.3g mean %.3g, inside: max %.3g mean %.3g (ratios %.2f, %.2f); "
              "step of d near seams %.3g, inside %.3g (ratio %.2f)\n",
              what, s.border_max, s.border_mean, s.inner_max, s.inner_mean, s.border_max / std::max(s.inner_max, 1e-30),
              s.border_mean / std::max(s.inner_mean, 1e-30), s.border_step, s.inner_step,
              s.border_step / std::max(s.inner_step, 1e-30));
}

// A small VAE initialised as `diffuse synth` initialises the full-size ones (fan-in normal
// weights, unit norm gains, small biases), under diffusers names.
inline WeightStore synthetic_vae_store(const VAEConfig& cfg, uint64_t seed) {
  WeightStore w("synthetic", "vae");
  auto add = [&](const std::string& name, const Shape& s) {
    Tensor t = Tensor::empty(s);
    synthetic_fill(name, s, seed, 0, t.numel(), t.f32());
    w.add(name, t);
  };
  auto conv = [&](const std::string& p, int64_t o, int64_t i, int64_t k) {
    add(p + ".weight", {o, i, k, k});
    add(p + ".bias", {o});
  };
  auto norm = [&](const std::string& p, int64_t c) {
    add(p + ".weight", {c});
    add(p + ".bias", {c});
  };
  auto res = [&](const std::string& p, int64_t i, int64_t o) {
    norm(p + ".norm1", i);
    conv(p + ".conv1", o, i, 3);
    norm(p + ".norm2", o);
    conv(p + ".conv2", o, o, 3);
    if (i != o) conv(p + ".conv_shortcut", o, i, 1);
  };
  auto mid = [&](const std::string& p, int64_t c) {
    res(p + ".resnets.0", c, c);
    res(p + ".resnets.1", c, c);
    norm(p + ".attentions.0.group_norm", c);
    for (const char* l : {"to_q", "to_k", "to_v", "to_out.0"}) {
      add(p + ".attentions.0." + l + ".weight", {c, c});
      add(p + ".attentions.0." + l + ".bias", {c});
    }
  };
  const auto& ch = cfg.block_out_channels;
  const int n = int(ch.size());
  const int64_t L = cfg.latent_channels;
  auto s = [](int i) { return std::to_string(i); };
  conv("encoder.conv_in", ch[0], cfg.in_channels, 3);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < cfg.layers_per_block; ++j)
      res("encoder.down_blocks." + s(i) + ".resnets." + s(j), j ? ch[i] : ch[i > 0 ? i - 1 : 0], ch[i]);
    if (i < n - 1) conv("encoder.down_blocks." + s(i) + ".downsamplers.0.conv", ch[i], ch[i], 3);
  }
  mid("encoder.mid_block", ch[n - 1]);
  norm("encoder.conv_norm_out", ch[n - 1]);
  conv("encoder.conv_out", 2 * L, ch[n - 1], 3);
  conv("quant_conv", 2 * L, 2 * L, 1);
  conv("post_quant_conv", L, L, 1);
  conv("decoder.conv_in", ch[n - 1], L, 3);
  mid("decoder.mid_block", ch[n - 1]);
  for (int i = 0; i < n; ++i) {
    const int64_t c = ch[n - 1 - i], prev = ch[n - 1 - (i > 0 ? i - 1 : 0)];
    for (int j = 0; j <= cfg.layers_per_block; ++j)
      res("decoder.up_blocks." + s(i) + ".resnets." + s(j), j ? c : prev, c);
    if (i < n - 1) conv("decoder.up_blocks." + s(i) + ".upsamplers.0.conv", c, c, 3);
  }
  norm("decoder.conv_norm_out", ch[0]);
  conv("decoder.conv_out", cfg.out_channels, ch[0], 3);
  return w;
}
}  // namespace diffuse::vae_tiling_check
