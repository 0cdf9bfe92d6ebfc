// Tiled VAE decode and encode (see VAETiling in vae.h for the scheme).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "models/vae.h"
#include "models/vae_blocks.h"

namespace diffuse {

using namespace vae_blocks;

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The decoder's tiles start at up level kDecoderSplit's upsampler (0: everything at latent
// resolution is untiled). Running up level 1 untiled too (exact GroupNorm statistics for its 6
// norms, ~0.6 GiB more at 1024²) cut the statistics estimate's error by only ~25% on the tiny
// model, so the trunk stops at latent resolution.
constexpr size_t kDecoderSplit = 0;

// One axis cut into tiles: `count` tiles of `size` units starting at `starts` (units of the tiled
// input: latent pixels), the first at 0 and the last ending at the axis end, neighbours
// overlapping by at least the overlap asked for.
struct Axis {
  int64_t size = 0;
  std::vector<int64_t> starts;
  size_t count() const { return starts.size(); }
};

// n units, tiles of at most t units overlapping by at least o (t >= 2·o, t >= 1): the fewest
// tiles k with k·t - (k-1)·o >= n, all of the smallest equal size that covers n, spread evenly.
// (Neighbours overlap by size - ceil((n - size)/(k - 1)) >= o, as size·k >= n + (k-1)·o.)
Axis split_axis(int64_t n, int64_t t, int64_t o) {
  Axis a;
  if (n <= t) {
    a.size = n;
    a.starts = {0};
    return a;
  }
  const int64_t k = ceil_div(n - o, t - o);
  a.size = ceil_div(n + (k - 1) * o, k);
  for (int64_t i = 0; i < k; ++i) a.starts.push_back(i * (n - a.size) / (k - 1));
  return a;
}

// Blend weights of tile i along one axis at output resolution (r output pixels per unit): 1 in
// the tile's own part, linear ramps `ramp` output pixels wide centred in the overlaps with its
// neighbours. A tile's falling ramp and its neighbour's rising ramp sum to 1 everywhere, so the
// weights of all tiles sum to 1 at every pixel (in 2-D too: the weights are products).
std::vector<float> axis_weights(const Axis& a, size_t i, int64_t r, double ramp) {
  const int64_t p = a.starts[i], len = r * a.size;
  std::vector<float> w(size_t(len), 1.0f);
  auto rise = [&](double mid, double x) {  // 0 before the ramp, 1 after
    if (ramp <= 0) return x >= mid ? 1.0 : 0.0;
    return std::clamp((x - (mid - ramp / 2)) / ramp, 0.0, 1.0);
  };
  for (int64_t j = 0; j < len; ++j) {
    const double x = double(r * p + j) + 0.5;  // pixel centre, global coordinates
    double v = 1.0;
    if (i > 0) v *= rise(0.5 * double(r) * double(p + a.starts[i - 1] + a.size), x);
    if (i + 1 < a.count()) v *= 1.0 - rise(0.5 * double(r) * double(a.starts[i + 1] + p + a.size), x);
    w[size_t(j)] = float(v);
  }
  return w;
}

// out[:, y0 + i, x0 + j, :] += wy[i] · wx[j] · tile[:, i, j, :]
void blend_into(Tensor& out, const Tensor& tile, int64_t y0, int64_t x0, const std::vector<float>& wy,
                const std::vector<float>& wx) {
  const int64_t B = tile.dim(0), th = tile.dim(1), tw = tile.dim(2), C = tile.dim(3);
  const int64_t H = out.dim(1), W = out.dim(2);
  DF_CHECK(out.dim(0) == B && out.dim(3) == C && y0 + th <= H && x0 + tw <= W && int64_t(wy.size()) == th &&
               int64_t(wx.size()) == tw,
           "VAE tiling: tile ", tile.str(), " at (", y0, ", ", x0, ") does not fit the output ", out.str());
  const float* src = tile.f32();
  float* dst = out.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < th; ++i) {
      if (wy[size_t(i)] == 0.0f) continue;
      for (int64_t j = 0; j < tw; ++j) {
        const float w = wy[size_t(i)] * wx[size_t(j)];
        if (w == 0.0f) continue;
        const float* s = src + ((b * th + i) * tw + j) * C;
        float* d = dst + ((b * H + y0 + i) * W + x0 + j) * C;
        for (int64_t c = 0; c < C; ++c) d[c] += w * s[c];
      }
    }
}

// dst = src[:, y0 : y0 + dst.H, x0 : x0 + dst.W, :]
void crop_into(const Tensor& src, int64_t y0, int64_t x0, Tensor& dst) {
  const int64_t B = dst.dim(0), h = dst.dim(1), w = dst.dim(2), C = dst.dim(3), H = src.dim(1), W = src.dim(2);
  const float* s = src.f32();
  float* d = dst.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i)
      std::memcpy(d + (b * h + i) * w * C, s + ((b * H + y0 + i) * W + x0) * C, size_t(w * C) * sizeof(float));
}

// Nearest resampling to [B, h, w, C]: source index floor((i + 1/2) · H / h), the pixel nearest
// to the output pixel's centre (values are picked, not averaged).
Tensor nearest(const Tensor& src, int64_t h, int64_t w) {
  const int64_t B = src.dim(0), H = src.dim(1), W = src.dim(2), C = src.dim(3);
  Tensor dst = Tensor::empty({B, h, w, C});
  const float* s = src.f32();
  float* d = dst.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < h; ++i) {
      const int64_t si = std::min(H - 1, (2 * i + 1) * H / (2 * h));
      for (int64_t j = 0; j < w; ++j) {
        const int64_t sj = std::min(W - 1, (2 * j + 1) * W / (2 * w));
        std::memcpy(d + ((b * h + i) * w + j) * C, s + ((b * H + si) * W + sj) * C, size_t(C) * sizeof(float));
      }
    }
  return dst;
}

void check_tiling(const VAETiling& t, int64_t f, const char* op) {
  DF_CHECK(t.tile_px > 0 && t.tile_px % f == 0 && t.overlap_px >= 0 && t.overlap_px % f == 0 &&
               t.tile_px >= 2 * t.overlap_px && t.stats_subsample >= 0 && t.stats_passes >= 0 &&
               t.stats_passes <= 8,
           op, ": VAE tiling with tile ", t.tile_px, " px, overlap ", t.overlap_px, " px, statistics subsample ",
           t.stats_subsample, ": need a tile and overlap that are multiples of ", f,
           " with tile >= 2 x overlap, a subsample factor >= 0 and 0 to 8 statistics passes (", t.stats_passes, ")");
}

// The part of the axis tile i owns: from the previous seam to the next (axis ends at the ends).
std::pair<double, double> owned_span(const Axis& a, size_t i, int64_t n) {
  auto seam = [&](size_t j) { return 0.5 * double(a.starts[j] + a.size + a.starts[j + 1]); };
  return {i > 0 ? seam(i - 1) : 0.0, i + 1 < a.count() ? seam(i) : double(n)};
}

// The subsampling factor for the statistics pass: as asked, or the least that fits one tile.
int64_t stats_factor(const VAETiling& t, int64_t h, int64_t w, const Axis& ay, const Axis& ax) {
  if (t.stats_subsample > 0) return t.stats_subsample;
  return std::max(ceil_div(h, ay.size), ceil_div(w, ax.size));
}

}  // namespace

// ---- NormStats -----------------------------------------------------------------------------------
void NormStats::record() {
  mode_ = Mode::Record;
  measuring_ = false;
  stats_.clear();
  next_ = 0;
}

void NormStats::apply() {
  mode_ = Mode::Apply;
  measuring_ = false;
  next_ = 0;
}

void NormStats::apply_and_measure(const Owned& owned) {
  apply();
  measuring_ = true;
  owned_ = owned;
  acc_.resize(stats_.size());
}

void NormStats::take_measured() {
  DF_CHECK(acc_.size() == stats_.size(), "VAE tiling: no measured GroupNorm statistics to take");
  for (size_t k = 0; k < stats_.size(); ++k) {
    Acc& a = acc_[k];
    Tensor& mean = stats_[k].first;
    Tensor& var = stats_[k].second;
    DF_CHECK(a.n > 0 && int64_t(a.mean.size()) == mean.numel(), "VAE tiling: GroupNorm ", k,
             " measured nothing");
    for (int64_t i = 0; i < mean.numel(); ++i) {
      mean.f32()[i] = float(a.mean[size_t(i)]);
      var.f32()[i] = float(a.m2[size_t(i)] / a.n);
    }
  }
  acc_.clear();
}

// Adds the statistics of x over the owned window, row by row (a row of an NHWC window is
// contiguous), combining (count, mean, M2) exactly.
void NormStats::measure(Ctx& c, const Tensor& x, int groups, Acc& acc) const {
  DF_CHECK(x.rank() == 4 && owned_.in_h > 0, "VAE tiling: cannot measure GroupNorm input ", x.str());
  const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3), G = groups;
  const double sc = double(H) / double(owned_.in_h);  // GroupNorm resolution per tile-input unit
  auto local = [&](double g, int64_t start, int64_t len) {
    return std::clamp(int64_t(std::floor(g * sc + 1e-9)) - int64_t(std::llround(double(start) * sc)), int64_t(0), len);
  };
  const int64_t y0 = local(owned_.y0, owned_.start_y, H), y1 = local(owned_.y1, owned_.start_y, H);
  const int64_t x0 = local(owned_.x0, owned_.start_x, W), x1 = local(owned_.x1, owned_.start_x, W);
  if (acc.mean.empty()) acc.mean.assign(size_t(N * G), 0.0), acc.m2.assign(size_t(N * G), 0.0);
  if (y1 <= y0 || x1 <= x0) return;
  const double nb = double(x1 - x0) * double(C / G);  // values per (sample, group) in one row
  Tensor m = Tensor::empty({1, G}), v = Tensor::empty({1, G});
  const Tensor flat = x.reshape({N * H * W, C});
  double n = acc.n;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t b = 0; b < N; ++b) {
      Tensor row = flat.slice0((b * H + y) * W + x0, (b * H + y) * W + x1).reshape({1, x1 - x0, C});
      c.be.group_norm_stats(row, groups, m, v);
      for (int64_t g = 0; g < G; ++g) {
        const size_t k = size_t(b * G + g);
        const double mb = m.f32()[g], d = mb - acc.mean[k], tot = n + nb;
        acc.mean[k] += d * nb / tot;
        acc.m2[k] += double(v.f32()[g]) * nb + d * d * n * nb / tot;
      }
    }
    n += nb;
  }
  acc.n = n;
}

Tensor NormStats::operator()(Ctx& c, const GroupNorm& gn, const Tensor& x, bool silu) {
  const int64_t n = x.dim(0);
  if (mode_ == Mode::Record) {
    Tensor mean = Tensor::empty({n, gn.groups}), var = Tensor::empty({n, gn.groups});
    c.be.group_norm_stats(x, gn.groups, mean, var);
    stats_.emplace_back(mean, var);
  }
  DF_CHECK(next_ < stats_.size(), "VAE tiling: GroupNorm ", next_, " of input ", x.str(),
           " has no recorded statistics (", stats_.size(), " recorded)");
  if (measuring_) measure(c, x, gn.groups, acc_[next_]);
  const auto& [mean, var] = stats_[next_++];
  Tensor y = c.alloc(x.shape());
  c.be.group_norm_apply(x, mean, var, gn.gamma, gn.beta, gn.groups, gn.eps, silu, y);
  return y;
}

VAETileAxis vae_tile_axis(const VAETiling& t, int64_t pixels, int64_t f) {
  check_tiling(t, f, "vae_tile_axis");
  const Axis a = split_axis(pixels / f, t.tile_px / f, t.overlap_px / f);
  VAETileAxis r;
  r.size = f * a.size;
  for (size_t i = 0; i < a.count(); ++i) {
    r.starts.push_back(f * a.starts[i]);
    if (i > 0) r.seams.push_back(0.5 * double(f) * double(a.starts[i - 1] + a.size + a.starts[i]));
  }
  return r;
}

Tensor VAE::decode(Ctx& c, const Tensor& z, const VAETiling& tiling) const {
  const int64_t f = cfg_.downscale();
  check_tiling(tiling, f, "VAE::decode");
  if (!has_decoder() || z.rank() != 4 || !tiling.active(z.dim(1) * f, z.dim(2) * f)) return decode(c, z);
  const Impl& m = *impl_;
  const size_t split = kDecoderSplit;
  // Units of the tail's input: 2^split per latent pixel, r output pixels each.
  const int64_t up = int64_t(1) << split, r = f / up;
  const int64_t B = z.dim(0), h = z.dim(1) * up, w = z.dim(2) * up;
  const Axis ay = split_axis(h, tiling.tile_px / r, tiling.overlap_px / r);
  const Axis ax = split_axis(w, tiling.tile_px / r, tiling.overlap_px / r);
  if (ay.count() == 1 && ax.count() == 1) return decode(c, z);
  DF_CHECK(z.dim(3) == cfg_.latent_channels && z.dtype() == DType::F32,
           "VAE::decode: latent ", z.str(), " should be f32 [B, h, w, ", cfg_.latent_channels, "] (NHWC)");
  ScratchLease sl(c, Workspace::kVAE, m.own, m.mu);

  // The untiled trunk, kept on the heap while the tiles run.
  Tensor trunk;
  {
    Stages s(c, sl->arenas, sl->peaks);
    trunk = m.dec_trunk(s, z, split).clone();
  }
  // The tail's activations are bf16 when the backend computes in bf16 (as in the untiled decode);
  // the trunk output, the crops and the blended image stay f32.
  Ctx tail{c.be, c.arena, c.be.effective_precision() == Precision::BF16 ? DType::BF16 : c.act, c.ws};
  // GroupNorm statistics of the tail from a nearest-subsampled copy of the trunk output.
  NormStats ns;
  ns.record();
  {
    const int64_t fs = stats_factor(tiling, h, w, ay, ax);
    Tensor sub = fs == 1 ? trunk : nearest(trunk, ceil_div(h, fs), ceil_div(w, fs));
    Stages s(tail, sl->arenas, sl->peaks);
    m.dec_tail(s, sub, &ns, false, split);
  }
  const size_t norms = ns.size();

  Tensor out = c.alloc({B, h * r, w * r, int64_t(cfg_.out_channels)});
  std::memset(out.data(), 0, out.bytes());
  Tensor crop = Tensor::empty({B, ay.size, ax.size, trunk.dim(3)});
  const double ramp = double(tiling.overlap_px) / 4;
  // Measuring passes (statistics of the whole image as the tiles compute it), then the output pass.
  for (int pass = 0; pass <= tiling.stats_passes; ++pass) {
    const bool last = pass == tiling.stats_passes;
    for (size_t ty = 0; ty < ay.count(); ++ty) {
      const std::vector<float> wy = axis_weights(ay, ty, r, ramp);
      for (size_t tx = 0; tx < ax.count(); ++tx) {
        const std::vector<float> wx = axis_weights(ax, tx, r, ramp);
        crop_into(trunk, ay.starts[ty], ax.starts[tx], crop);
        if (last) {
          ns.apply();
        } else {
          NormStats::Owned o;
          std::tie(o.y0, o.y1) = owned_span(ay, ty, h);
          std::tie(o.x0, o.x1) = owned_span(ax, tx, w);
          o.start_y = ay.starts[ty], o.start_x = ax.starts[tx], o.in_h = ay.size;
          ns.apply_and_measure(o);
        }
        Stages s(tail, sl->arenas, sl->peaks);
        Tensor y = m.dec_tail(s, crop, &ns, false, split);
        DF_CHECK(ns.all_used(), "VAE::decode: a tile used fewer GroupNorms than the statistics pass's ", norms);
        if (last) blend_into(out, y.dtype() == DType::F32 ? y : y.to(DType::F32), r * ay.starts[ty], r * ax.starts[tx], wy, wx);
      }
    }
    if (!last) ns.take_measured();
  }
  return out;
}

VAE::Posterior VAE::encode(Ctx& c, const Tensor& image, const VAETiling& tiling) const {
  const int64_t f = cfg_.downscale();
  check_tiling(tiling, f, "VAE::encode");
  if (!has_encoder() || image.rank() != 4 || image.dim(1) % f || image.dim(2) % f ||
      !tiling.active(image.dim(1), image.dim(2)))
    return encode(c, image);
  const int64_t B = image.dim(0), H = image.dim(1), W = image.dim(2), h = H / f, w = W / f;
  const Axis ay = split_axis(h, tiling.tile_px / f, tiling.overlap_px / f);
  const Axis ax = split_axis(w, tiling.tile_px / f, tiling.overlap_px / f);
  if (ay.count() == 1 && ax.count() == 1) return encode(c, image);
  DF_CHECK(image.dim(3) == cfg_.in_channels && image.dtype() == DType::F32, "VAE::encode: image ", image.str(),
           " should be f32 [B, H, W, ", cfg_.in_channels, "] (NHWC)");
  const Impl& m = *impl_;
  ScratchLease sl(c, Workspace::kVAE, m.own, m.mu);

  // GroupNorm statistics of the head from a nearest-subsampled copy of the image.
  NormStats ns;
  ns.record();
  {
    const int64_t fs = stats_factor(tiling, h, w, ay, ax);
    Tensor sub = fs == 1 ? image : nearest(image, f * ceil_div(h, fs), f * ceil_div(w, fs));
    Stages s(c, sl->arenas, sl->peaks);
    m.enc_head(s, sub, &ns);
  }
  const size_t norms = ns.size();

  // The head tile by tile (measuring passes first), blended at latent resolution into `feat` (heap).
  Tensor feat;
  Tensor crop = Tensor::empty({B, f * ay.size, f * ax.size, image.dim(3)});
  const double ramp = double(tiling.overlap_px) / double(4 * f);
  for (int pass = 0; pass <= tiling.stats_passes; ++pass) {
    const bool last = pass == tiling.stats_passes;
    for (size_t ty = 0; ty < ay.count(); ++ty) {
      const std::vector<float> wy = axis_weights(ay, ty, 1, ramp);
      for (size_t tx = 0; tx < ax.count(); ++tx) {
        const std::vector<float> wx = axis_weights(ax, tx, 1, ramp);
        crop_into(image, f * ay.starts[ty], f * ax.starts[tx], crop);
        if (last) {
          ns.apply();
        } else {
          NormStats::Owned o;
          std::tie(o.y0, o.y1) = owned_span(ay, ty, h);
          std::tie(o.x0, o.x1) = owned_span(ax, tx, w);
          o.y0 *= f, o.y1 *= f, o.x0 *= f, o.x1 *= f;
          o.start_y = f * ay.starts[ty], o.start_x = f * ax.starts[tx], o.in_h = f * ay.size;
          ns.apply_and_measure(o);
        }
        Stages s(c, sl->arenas, sl->peaks);
        Tensor y = m.enc_head(s, crop, &ns);
        DF_CHECK(ns.all_used(), "VAE::encode: a tile used fewer GroupNorms than the statistics pass's ", norms);
        if (!last) continue;
        if (!feat.defined()) feat = Tensor::zeros({B, h, w, y.dim(3)});
        blend_into(feat, y, ay.starts[ty], ax.starts[tx], wy, wx);
      }
    }
    if (!last) ns.take_measured();
  }
  Stages s(c, sl->arenas, sl->peaks);
  return m.enc_rest(s, feat);
}

}  // namespace diffuse
