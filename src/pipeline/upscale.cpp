// Tiled ESRGAN / Real-ESRGAN upscaling (see upscale.h).
#include "pipeline/upscale.h"

#include <algorithm>
#include <cmath>

#include "core/arena.h"
#include "core/error.h"
#include "models/controlnet.h"  // resize_lanczos

namespace diffuse {

namespace {

// [0, n) (n a multiple of m) cut into the fewest near-equal parts of at most `tile` (rounded down
// to a multiple of m), every boundary a multiple of m; the whole range when tile is 0 or covers it.
std::vector<int> cuts(int n, int tile, int m) {
  if (tile <= 0 || tile >= n) return {0, n};
  const int units = n / m, per = std::max(1, tile / m), parts = (units + per - 1) / per;
  std::vector<int> b;
  for (int i = 0; i <= parts; ++i) b.push_back(int(int64_t(units) * i / parts) * m);
  return b;
}

// x in [0, n + pad) -> a source index in [0, n): reflected past the end (numpy's 'reflect').
int reflect(int x, int n) { return x < n ? x : std::max(0, 2 * n - 2 - x); }

uint8_t to_u8(float v) {
  const float c = std::min(1.0f, std::max(0.0f, v));  // NaN -> 0
  return uint8_t(std::nearbyint(c * 255.0f));
}

Image upscale_pass(const RRDBNet& net, Backend& be, const Image& in, const UpscaleOptions& o, int pass) {
  const RRDBNetConfig& k = net.config();
  DF_CHECK(net.loaded(), "upscale: no upscaler loaded");
  DF_CHECK(k.in_channels == 3 && k.out_channels == 3, "upscale: the upscaler takes ", k.in_channels,
           "-channel images and gives ", k.out_channels, "-channel ones; only RGB (3 -> 3) models are supported");
  DF_CHECK(in.width > 0 && in.height > 0 && in.channels >= 1 && in.channels <= 4 &&
               in.pixels.size() == size_t(in.width) * size_t(in.height) * size_t(in.channels),
           "upscale: the input image is empty or malformed (", in.width, "x", in.height, ", ", in.channels,
           " channels)");
  const int s = k.scale(), r = k.unshuffle;
  const int64_t ow = int64_t(in.width) * s, oh = int64_t(in.height) * s;
  DF_CHECK(ow <= kMaxImageSide && oh <= kMaxImageSide, "upscale: ", in.width, "x", in.height, " × ", s, " = ", ow,
           "x", oh, " exceeds the largest image side, ", kMaxImageSide);
  const Image rgb = in.channels == 3 ? Image() : to_rgb(in);
  const Image& src = in.channels == 3 ? in : rgb;
  const int W = in.width, H = in.height;
  const int Wp = (W + r - 1) / r * r, Hp = (H + r - 1) / r * r;  // reflect-padded to multiples of r
  const std::vector<UpscaleTile> tiles = upscale_tiles(Wp, Hp, o.tile, o.overlap, r);

  Image out;
  out.width = int(ow);
  out.height = int(oh);
  out.channels = (in.channels == 2 || in.channels == 4) ? 4 : 3;
  out.pixels.resize(size_t(ow) * size_t(oh) * size_t(out.channels));
  out.text = in.text;
  out.format = "png";
  const int oc = out.channels;

  Arena arena;
  int done = 0;
  for (const UpscaleTile& t : tiles) {
    const int rw = t.rx1 - t.rx0, rh = t.ry1 - t.ry0;
    Tensor x = arena.alloc({1, rh, rw, 3});  // [1, rh, rw, 3] in [0, 1]
    float* xp = x.f32();
    for (int yy = 0; yy < rh; ++yy) {
      const uint8_t* row = src.pixels.data() + size_t(reflect(t.ry0 + yy, H)) * size_t(W) * 3;
      for (int xx = 0; xx < rw; ++xx) {
        const uint8_t* p = row + size_t(reflect(t.rx0 + xx, W)) * 3;
        for (int c = 0; c < 3; ++c) xp[(int64_t(yy) * rw + xx) * 3 + c] = float(p[c]) / 255.0f;
      }
    }
    Ctx ctx{be, arena, DType::F32};
    const Tensor y = net.forward(ctx, x);  // [1, rh·s, rw·s, 3]
    const float* yp = y.f32();
    const int64_t yw = int64_t(rw) * s;
    const int64_t oy1 = std::min<int64_t>(int64_t(t.y1) * s, oh), ox1 = std::min<int64_t>(int64_t(t.x1) * s, ow);
    for (int64_t oy = int64_t(t.y0) * s; oy < oy1; ++oy) {
      const float* yrow = yp + (oy - int64_t(t.ry0) * s) * yw * 3;
      uint8_t* orow = out.pixels.data() + size_t(oy) * size_t(ow) * size_t(oc);
      for (int64_t ox = int64_t(t.x0) * s; ox < ox1; ++ox)
        for (int c = 0; c < 3; ++c) orow[ox * oc + c] = to_u8(yrow[(ox - int64_t(t.rx0) * s) * 3 + c]);
    }
    arena.reset();
    ++done;
    if (o.progress) o.progress(done, int(tiles.size()), pass);
  }

  if (oc == 4) {  // the alpha plane, resized
    Image alpha;
    alpha.width = W;
    alpha.height = H;
    alpha.channels = 1;
    alpha.pixels.resize(size_t(W) * size_t(H));
    for (size_t i = 0; i < alpha.pixels.size(); ++i) alpha.pixels[i] = in.pixels[i * size_t(in.channels) + size_t(in.channels) - 1];
    const Image a = resize_lanczos(alpha, int(ow), int(oh));
    for (size_t i = 0; i < a.pixels.size(); ++i) out.pixels[i * 4 + 3] = a.pixels[i];
  }
  return out;
}

}  // namespace

std::vector<UpscaleTile> upscale_tiles(int width, int height, int tile, int overlap, int multiple) {
  DF_CHECK(multiple >= 1 && width > 0 && height > 0 && width % multiple == 0 && height % multiple == 0,
           "upscale_tiles: ", width, "x", height, " is not a positive multiple of ", multiple);
  DF_CHECK(tile >= 0, "upscale: tile size ", tile, " must be >= 0 (0: the whole image in one pass)");
  DF_CHECK(tile == 0 || tile >= multiple, "upscale: tile size ", tile, " is smaller than the model's pixel-unshuffle (",
           multiple, ")");
  DF_CHECK(overlap >= 0, "upscale: tile overlap ", overlap, " must be >= 0");
  const std::vector<int> xs = cuts(width, tile, multiple), ys = cuts(height, tile, multiple);
  auto lo = [&](int v) { return std::max(0, v - overlap) / multiple * multiple; };
  auto hi = [&](int v, int n) { return int(std::min<int64_t>(n, (int64_t(v) + overlap + multiple - 1) / multiple * multiple)); };
  std::vector<UpscaleTile> out;
  for (size_t j = 0; j + 1 < ys.size(); ++j)
    for (size_t i = 0; i + 1 < xs.size(); ++i) {
      UpscaleTile t;
      t.x0 = xs[i], t.x1 = xs[i + 1], t.y0 = ys[j], t.y1 = ys[j + 1];
      t.rx0 = lo(t.x0), t.rx1 = hi(t.x1, width), t.ry0 = lo(t.y0), t.ry1 = hi(t.y1, height);
      out.push_back(t);
    }
  return out;
}

Image upscale_image(const RRDBNet& net, Backend& be, const Image& in, const UpscaleOptions& o) {
  return upscale_pass(net, be, in, o, 0);
}

Image upscale_image_to(const RRDBNet& net, Backend& be, const Image& in, int width, int height,
                       const UpscaleOptions& o) {
  DF_CHECK(width > 0 && height > 0 && width <= kMaxImageSide && height <= kMaxImageSide, "upscale: target size ",
           width, "x", height, " must be 1 to ", kMaxImageSide, " pixels a side");
  const int s = net.config().scale();
  Image cur = upscale_pass(net, be, in, o, 0);
  for (int pass = 1; pass < 4 && s > 1 && (cur.width < width || cur.height < height); ++pass) {
    if (int64_t(cur.width) * s > kMaxImageSide || int64_t(cur.height) * s > kMaxImageSide) break;  // Lanczos the rest
    cur = upscale_pass(net, be, cur, o, pass);
  }
  if (cur.width != width || cur.height != height) {
    Image resized = resize_lanczos(cur, width, height);
    resized.text = std::move(cur.text);
    resized.format = "png";
    cur = std::move(resized);
  }
  return cur;
}

}  // namespace diffuse
