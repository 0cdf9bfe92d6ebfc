#include "train/objective.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace diffuse::train {

Objective parse_objective(const std::string& s) {
  if (s == "eps" || s == "epsilon") return Objective::Eps;
  if (s == "v" || s == "v_prediction" || s == "v-prediction") return Objective::V;
  fail("objective '", s, "': expected eps or v");
}

const char* objective_name(Objective o) { return o == Objective::Eps ? "eps" : "v"; }

DdpmSchedule DdpmSchedule::sd(bool zero_terminal_snr) {
  DdpmSchedule s;
  NoiseSchedule n = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012);
  if (zero_terminal_snr) n.rescale_zero_terminal_snr();
  s.alphas_cumprod = n.alphas_cumprod_f32();
  return s;
}

static void check_t(const DdpmSchedule& s, int t) {
  DF_CHECK(t >= 0 && t < s.num_timesteps(), "timestep ", t, " is outside [0, ", s.num_timesteps(), ")");
}

float DdpmSchedule::sqrt_alpha(int t) const {
  check_t(*this, t);
  return std::sqrt(alphas_cumprod[size_t(t)]);
}

float DdpmSchedule::sqrt_one_minus_alpha(int t) const {
  check_t(*this, t);
  return std::sqrt(1.0f - alphas_cumprod[size_t(t)]);
}

float DdpmSchedule::snr(int t) const {
  const float r = sqrt_alpha(t) / sqrt_one_minus_alpha(t);
  return r * r;
}

NoisedBatch make_noised_batch(const DdpmSchedule& s, const Tensor& x0, const Tensor& noise,
                              const std::vector<int>& timesteps, Objective obj) {
  DF_CHECK(x0.dtype() == DType::F32 && noise.dtype() == DType::F32 && x0.shape() == noise.shape() && x0.rank() >= 1,
           "objective: latents ", x0.str(), " and noise ", noise.str(), " must be f32 of one shape");
  const int64_t B = x0.dim(0), per = B ? x0.numel() / B : 0;
  DF_CHECK(int64_t(timesteps.size()) == B, "objective: ", timesteps.size(), " timesteps for a batch of ", B);
  NoisedBatch nb{x0, noise, Tensor::empty(x0.shape()), Tensor::empty(x0.shape()), timesteps};
  for (int64_t b = 0; b < B; ++b) {
    const float sa = s.sqrt_alpha(timesteps[size_t(b)]), so = s.sqrt_one_minus_alpha(timesteps[size_t(b)]);
    const float *z = x0.f32() + b * per, *e = noise.f32() + b * per;
    float *zt = nb.noisy.f32() + b * per, *tg = nb.target.f32() + b * per;
    for (int64_t i = 0; i < per; ++i) {
      zt[i] = sa * z[i] + so * e[i];
      tg[i] = obj == Objective::Eps ? e[i] : sa * e[i] - so * z[i];
    }
  }
  return nb;
}

std::vector<float> loss_weights(const DdpmSchedule& s, const std::vector<int>& timesteps, Objective obj,
                                float min_snr_gamma) {
  std::vector<float> w(timesteps.size(), 1.0f);
  if (min_snr_gamma <= 0) return w;
  for (size_t b = 0; b < w.size(); ++b) {
    const float snr = s.snr(timesteps[b]);
    const float m = std::min(snr, min_snr_gamma);
    w[b] = obj == Objective::Eps ? m / snr : m / (snr + 1.0f);
  }
  return w;
}

LossResult mse_loss(const Tensor& pred, const Tensor& target, const std::vector<float>& weights, float grad_scale) {
  DF_CHECK(pred.dtype() == DType::F32 && target.dtype() == DType::F32 && pred.shape() == target.shape() &&
               pred.rank() >= 1 && pred.numel() > 0,
           "loss: prediction ", pred.str(), " and target ", target.str(), " must be f32 of one shape");
  const int64_t B = pred.dim(0), per = pred.numel() / B;
  DF_CHECK(weights.empty() || int64_t(weights.size()) == B, "loss: ", weights.size(), " weights for a batch of ", B);
  LossResult r;
  r.dpred = Tensor::empty(pred.shape());
  double total = 0, weighted = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double w = weights.empty() ? 1.0 : weights[size_t(b)];
    const float *p = pred.f32() + b * per, *t = target.f32() + b * per;
    float* d = r.dpred.f32() + b * per;
    double sq = 0;
    // L = mean_b(w_b · mean_i(e²)) -> dL/dp = 2·e·w_b / (B·per)
    const double g = 2.0 * w / double(B * per) * grad_scale;
    for (int64_t i = 0; i < per; ++i) {
      const double e = double(p[i]) - double(t[i]);
      sq += e * e;
      d[i] = float(g * e);
    }
    total += sq;
    weighted += w * sq / double(per);
  }
  r.unweighted = total / double(pred.numel());
  r.loss = weighted / double(B);
  return r;
}

void apply_noise_offset(Tensor& noise, float offset, Rng& rng) {
  if (offset == 0) return;
  DF_CHECK(noise.dtype() == DType::F32 && noise.rank() == 4, "noise offset: noise ", noise.str(),
           " must be f32 [B, H, W, C]");
  const int64_t B = noise.dim(0), HW = noise.dim(1) * noise.dim(2), C = noise.dim(3);
  std::vector<float> n(size_t(B * C));
  rng.randn(n.data(), B * C);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < HW; ++i)
      for (int64_t c = 0; c < C; ++c) noise.f32()[(b * HW + i) * C + c] += offset * n[size_t(b * C + c)];
}

// x: [B, h, w, C] -> [B, H, W, C], bilinear with half-pixel centres (align_corners=False).
static void add_upsampled(const std::vector<float>& x, int64_t B, int64_t h, int64_t w, int64_t C, float weight,
                          Tensor& y) {
  const int64_t H = y.dim(1), W = y.dim(2);
  auto src = [](int64_t o, int64_t in, int64_t out, int64_t& i0, int64_t& i1, float& f) {
    double s = (double(o) + 0.5) * double(in) / double(out) - 0.5;
    s = std::max(0.0, s);
    i0 = std::min<int64_t>(int64_t(s), in - 1);
    i1 = std::min<int64_t>(i0 + 1, in - 1);
    f = float(s - double(i0));
  };
  float* out = y.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t yy = 0; yy < H; ++yy) {
      int64_t y0, y1;
      float fy;
      src(yy, h, H, y0, y1, fy);
      for (int64_t xx = 0; xx < W; ++xx) {
        int64_t x0, x1;
        float fx;
        src(xx, w, W, x0, x1, fx);
        const float* p00 = &x[size_t(((b * h + y0) * w + x0) * C)];
        const float* p01 = &x[size_t(((b * h + y0) * w + x1) * C)];
        const float* p10 = &x[size_t(((b * h + y1) * w + x0) * C)];
        const float* p11 = &x[size_t(((b * h + y1) * w + x1) * C)];
        float* o = out + ((b * H + yy) * W + xx) * C;
        for (int64_t c = 0; c < C; ++c) {
          const float top = p00[c] + (p01[c] - p00[c]) * fx, bot = p10[c] + (p11[c] - p10[c]) * fx;
          o[c] += weight * (top + (bot - top) * fy);
        }
      }
    }
}

void apply_multires_noise(Tensor& noise, int iterations, float discount, Rng& rng,
                          const std::function<double()>& uniform) {
  if (iterations <= 0) return;
  DF_CHECK(noise.dtype() == DType::F32 && noise.rank() == 4, "multires noise: noise ", noise.str(),
           " must be f32 [B, H, W, C]");
  const int64_t B = noise.dim(0), H = noise.dim(1), W = noise.dim(2), C = noise.dim(3);
  for (int i = 0; i < iterations; ++i) {
    const double r = 2.0 + 2.0 * uniform(), scale = std::pow(r, double(i));
    const int64_t h = std::max<int64_t>(1, int64_t(double(H) / scale)), w = std::max<int64_t>(1, int64_t(double(W) / scale));
    std::vector<float> z(size_t(B * h * w * C));
    rng.randn(z.data(), int64_t(z.size()));
    add_upsampled(z, B, h, w, C, std::pow(discount, float(i)), noise);
    if (h == 1 || w == 1) break;
  }
  double sum = 0, sq = 0;
  const int64_t n = noise.numel();
  for (int64_t k = 0; k < n; ++k) sum += noise.f32()[k], sq += double(noise.f32()[k]) * noise.f32()[k];
  const double mean = sum / double(n), var = (sq - double(n) * mean * mean) / double(std::max<int64_t>(1, n - 1));
  const float inv = var > 0 ? float(1.0 / std::sqrt(var)) : 1.0f;
  for (int64_t k = 0; k < n; ++k) noise.f32()[k] *= inv;
}

int sample_timestep(double u, int min_t, int max_t) {
  DF_CHECK(min_t >= 0 && max_t > min_t && max_t <= 1000, "timestep range [", min_t, ", ", max_t, ") is empty or outside [0, 1000)");
  const int t = min_t + int(std::floor(u * double(max_t - min_t)));
  return std::min(t, max_t - 1);
}

static Tensor permute4(const Tensor& x, bool to_nhwc) {
  DF_CHECK(x.rank() == 4, "layout: ", x.str(), " is not 4-d");
  const Tensor xf = x.dtype() == DType::F32 ? x : x.to(DType::F32);
  const int64_t B = x.dim(0);
  // to_nhwc: x is [B, C, H, W]; else x is [B, H, W, C].
  const int64_t C = to_nhwc ? x.dim(1) : x.dim(3), H = to_nhwc ? x.dim(2) : x.dim(1), W = to_nhwc ? x.dim(3) : x.dim(2);
  Tensor y = Tensor::empty(to_nhwc ? Shape{B, H, W, C} : Shape{B, C, H, W});
  const float* s = xf.f32();
  float* d = y.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const int64_t nchw = ((b * C + c) * H + h) * W + w, nhwc = ((b * H + h) * W + w) * C + c;
          if (to_nhwc) d[nhwc] = s[nchw];
          else d[nchw] = s[nhwc];
        }
  return y;
}

Tensor nchw_to_nhwc(const Tensor& x) { return permute4(x, true); }
Tensor nhwc_to_nchw(const Tensor& x) { return permute4(x, false); }

}  // namespace diffuse::train
