#include "models/canny.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/error.h"

namespace diffuse {

namespace {

// Mirrored index without repeating the border pixel (BORDER_REFLECT_101); n >= 1.
int reflect101(int i, int n) {
  if (n == 1) return 0;
  while (i < 0 || i >= n) i = i < 0 ? -i : 2 * (n - 1) - i;
  return i;
}

// Separable 3- or 5-tap filter: rows with kx, then columns with ky.
std::vector<float> separable(const std::vector<float>& src, int W, int H, const std::vector<float>& kx,
                             const std::vector<float>& ky) {
  const int rx = int(kx.size()) / 2, ry = int(ky.size()) / 2;
  std::vector<float> tmp(src.size()), out(src.size());
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      float s = 0;
      for (int k = -rx; k <= rx; ++k) s += kx[size_t(k + rx)] * src[size_t(y) * W + reflect101(x + k, W)];
      tmp[size_t(y) * W + x] = s;
    }
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      float s = 0;
      for (int k = -ry; k <= ry; ++k) s += ky[size_t(k + ry)] * tmp[size_t(reflect101(y + k, H)) * W + x];
      out[size_t(y) * W + x] = s;
    }
  return out;
}

}  // namespace

Image canny(const Image& im_in, const CannyOptions& o) {
  DF_CHECK(std::isfinite(o.low) && std::isfinite(o.high) && o.low >= 0 && o.high >= o.low, "canny: thresholds low ",
           o.low, " and high ", o.high, " must satisfy 0 <= low <= high (gradient magnitude on the 0..255 scale, ",
           "e.g. 100 and 200)");
  DF_CHECK(std::isfinite(o.sigma) && o.sigma >= 0 && o.sigma <= 100, "canny: sigma ", o.sigma,
           " must be between 0 (no blur) and 100");
  const Image im = to_rgb(im_in);
  const int W = im.width, H = im.height;
  DF_CHECK(W >= 1 && H >= 1, "canny: empty image");
  const size_t N = size_t(W) * H;

  std::vector<float> g(N);
  for (size_t i = 0; i < N; ++i)
    g[i] = 0.299f * im.pixels[3 * i] + 0.587f * im.pixels[3 * i + 1] + 0.114f * im.pixels[3 * i + 2];
  if (o.sigma > 0) {
    std::vector<float> k(5);
    float sum = 0;
    for (int i = -2; i <= 2; ++i) sum += k[size_t(i + 2)] = float(std::exp(-(i * i) / (2 * o.sigma * o.sigma)));
    for (float& v : k) v /= sum;
    g = separable(g, W, H, k, k);
  }
  const std::vector<float> gx = separable(g, W, H, {-1, 0, 1}, {1, 2, 1});
  const std::vector<float> gy = separable(g, W, H, {1, 2, 1}, {-1, 0, 1});
  std::vector<float> mag(N);
  for (size_t i = 0; i < N; ++i)
    mag[i] = o.l2 ? std::sqrt(gx[i] * gx[i] + gy[i] * gy[i]) : std::fabs(gx[i]) + std::fabs(gy[i]);

  // Non-maximum suppression + double threshold: 0 none, 1 candidate, 2 seed.
  const float tan22 = float(std::tan(M_PI / 8)), tan67 = float(std::tan(3 * M_PI / 8));
  auto at = [&](int x, int y) { return x < 0 || y < 0 || x >= W || y >= H ? 0.0f : mag[size_t(y) * W + x]; };
  std::vector<uint8_t> cls(N, 0);
  std::vector<int> stack;
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const size_t i = size_t(y) * W + x;
      const float m = mag[i];
      if (!(m > o.low)) continue;
      const float ax = std::fabs(gx[i]), ay = std::fabs(gy[i]);
      int dx, dy;  // neighbour offset along the gradient
      if (ay <= ax * tan22) dx = 1, dy = 0;
      else if (ay >= ax * tan67) dx = 0, dy = 1;
      else if ((gx[i] > 0) == (gy[i] > 0)) dx = 1, dy = 1;
      else dx = 1, dy = -1;
      // Strictly above the pixel before, at least the one after: a tie marks one pixel only.
      if (!(m > at(x - dx, y - dy) && m >= at(x + dx, y + dy))) continue;
      cls[i] = m > o.high ? 2 : 1;
      if (cls[i] == 2) stack.push_back(int(i));
    }

  // Hysteresis: grow the seeds through 8-connected candidates.
  std::vector<uint8_t> edge(N, 0);
  for (int i : stack) edge[size_t(i)] = 1;
  while (!stack.empty()) {
    const int i = stack.back();
    stack.pop_back();
    const int x = i % W, y = i / W;
    for (int dy = -1; dy <= 1; ++dy)
      for (int dx = -1; dx <= 1; ++dx) {
        const int nx = x + dx, ny = y + dy;
        if (nx < 0 || ny < 0 || nx >= W || ny >= H) continue;
        const size_t j = size_t(ny) * W + nx;
        if (cls[j] && !edge[j]) {
          edge[j] = 1;
          stack.push_back(int(j));
        }
      }
  }

  Image out;
  out.width = W;
  out.height = H;
  out.channels = 3;
  out.format = "png";
  out.pixels.resize(3 * N);
  for (size_t i = 0; i < N; ++i) out.pixels[3 * i] = out.pixels[3 * i + 1] = out.pixels[3 * i + 2] = edge[i] ? 255 : 0;
  return out;
}

}  // namespace diffuse
