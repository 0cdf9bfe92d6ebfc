#include "backend/cpu/kernels.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/dtype.h"

namespace diffuse::cpu {

// Below this many elements the OpenMP fork/join costs more than it saves.
static constexpr int64_t kParallelMin = 1 << 14;

void f32_to_bf16(const float* x, uint16_t* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = diffuse::f32_to_bf16(x[i]);
}

void bf16_to_f32(const uint16_t* x, float* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = diffuse::bf16_to_f32(x[i]);
}

// ---------------------------------------------------------------------------------------------
// Branch-free exp / erf / tanh that GCC vectorises (SSE2 at the baseline; glibc's expf/erff are
// scalar calls). exp: x = n·ln2 + r, |r| ≤ ln2/2, degree-7 Taylor polynomial for e^r (truncation
// 5e-9 relative) times 2^n built in the exponent bits: ~2 ulp. Inputs are clamped to
// [-87, 88] so 2^n stays a normal float (e^-87 ≈ 1.6e-38 stands in for smaller results, which
// only ever meet a "1 +").

// Select by bit mask: with -ftrapping-math (the default) GCC splits a float `c ? a : b` into
// branches that block vectorisation; this form stays branch-free.
static inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - uint32_t(c);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & m) | (std::bit_cast<uint32_t>(b) & ~m));
}

static inline float fast_exp(float x) {
  x = select(x < -87.0f, -87.0f, x);
  x = select(x > 88.0f, 88.0f, x);
  float fn = x * 1.44269504088896341f + 12582912.0f;  // 1.5·2^23: rounds to the nearest integer
  fn -= 12582912.0f;
  float r = x - fn * 0.693359375f;  // ln2 split in two for an exact reduction (Cody-Waite)
  r = r + fn * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(fn) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// erf via Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7 absolute), odd symmetry.
static inline float fast_erf(float x) {
  const float a = std::abs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float e = 1.0f - p * t * fast_exp(-a * a);
  return std::copysign(e, x);
}

static inline float fast_tanh(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }

static inline float silu1(float v) { return v / (1.0f + fast_exp(-v)); }
static inline float gelu_erf1(float v) { return 0.5f * v * (1.0f + fast_erf(v * 0.70710678118654752f)); }

// ---------------------------------------------------------------------------------------------
// group_norm: per sample, two passes over [S, C] with per-thread per-channel double accumulators
// (mean first, then the sum of squared deviations from the group mean: no cancellation), then
// one fused pass y = x·a_c + b_c (optionally SiLU).

void group_norm(const float* x, const float* gamma, const float* beta, int64_t N, int64_t S,
                int64_t C, int64_t G, float eps, bool fuse_silu, float* y) {
  const int64_t cg = C / G;
  const int nt = omp_get_max_threads();
  static thread_local std::vector<double> acc, stat;
  static thread_local std::vector<float> ca, cb;
  acc.resize(size_t(nt) * C);
  stat.resize(size_t(C) + G);
  ca.resize(C);
  cb.resize(C);
  double* mean_c = stat.data();      // [C]: the group mean broadcast per channel
  double* gsum = stat.data() + C;    // [G]
  const bool par = S * C > kParallelMin;

  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * S * C;
    float* yn = y + n * S * C;
    for (int pass = 0; pass < 2; ++pass) {
      std::fill(acc.begin(), acc.end(), 0.0);
      double* accp = acc.data();
#pragma omp parallel num_threads(nt) if (par)
      {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t s0 = S * tid / nth, s1 = S * (tid + 1) / nth;
        double* a = accp + int64_t(tid) * C;
        for (int64_t s = s0; s < s1; ++s) {
          const float* row = xn + s * C;
          if (pass == 0) {
            for (int64_t c = 0; c < C; ++c) a[c] += double(row[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) {
              double d = double(row[c]) - mean_c[c];
              a[c] += d * d;
            }
          }
        }
      }
      std::fill(gsum, gsum + G, 0.0);
      for (int t = 0; t < nt; ++t)
        for (int64_t c = 0; c < C; ++c) gsum[c / cg] += acc[size_t(t) * C + c];
      const double count = double(S) * double(cg);
      if (pass == 0) {
        for (int64_t c = 0; c < C; ++c) mean_c[c] = gsum[c / cg] / count;
      } else {
        for (int64_t c = 0; c < C; ++c) {
          double rstd = 1.0 / std::sqrt(gsum[c / cg] / count + double(eps));
          double g = gamma ? double(gamma[c]) : 1.0, b = beta ? double(beta[c]) : 0.0;
          ca[c] = float(rstd * g);
          cb[c] = float(b - mean_c[c] * rstd * g);
        }
      }
    }
    const float* pa = ca.data();
    const float* pb = cb.data();
#pragma omp parallel for schedule(static) if (par)
    for (int64_t s = 0; s < S; ++s) {
      const float* row = xn + s * C;
      float* out = yn + s * C;
      for (int64_t c = 0; c < C; ++c) out[c] = row[c] * pa[c] + pb[c];
      if (fuse_silu)
        for (int64_t c = 0; c < C; ++c) out[c] = silu1(out[c]);
    }
  }
}

void layer_norm(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t C,
                float eps, float* y) {
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
    float* out = y + r * C;
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += double(row[c]);
    const double mean = sum / double(C);
    double sq = 0;
    for (int64_t c = 0; c < C; ++c) {
      double d = double(row[c]) - mean;
      sq += d * d;
    }
    const float rstd = float(1.0 / std::sqrt(sq / double(C) + double(eps)));
    const float m = float(mean);
    for (int64_t c = 0; c < C; ++c) {
      float v = (row[c] - m) * rstd;
      if (gamma) v *= gamma[c];
      if (beta) v += beta[c];
      out[c] = v;
    }
  }
}

void softmax(const float* x, int64_t rows, int64_t C, float* y) {
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * C;
    float* out = y + r * C;
    float mx = -INFINITY;
    for (int64_t c = 0; c < C; ++c) mx = std::max(mx, row[c]);
    for (int64_t c = 0; c < C; ++c) out[c] = fast_exp(row[c] - mx);
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += double(out[c]);
    const float inv = float(1.0 / sum);
    for (int64_t c = 0; c < C; ++c) out[c] *= inv;
  }
}

void unary(Unary op, const float* x, int64_t n, float* y) {
  const bool par = n > kParallelMin;
  switch (op) {
    case Unary::SiLU:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) y[i] = silu1(x[i]);
      break;
    case Unary::GeluErf:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) y[i] = gelu_erf1(x[i]);
      break;
    case Unary::GeluTanh:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + fast_tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
      }
      break;
    case Unary::QuickGelu:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) y[i] = x[i] / (1.0f + fast_exp(-1.702f * x[i]));
      break;
  }
}

void geglu(const float* x, int64_t rows, int64_t C, float* y) {
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* h = x + r * 2 * C;
    const float* g = h + C;
    float* out = y + r * C;
    for (int64_t c = 0; c < C; ++c) out[c] = h[c] * gelu_erf1(g[c]);
  }
}

void scale(const float* x, float s, int64_t n, float* y) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * s;
}

// ---------------------------------------------------------------------------------------------
// binary

template <Binary OP>
static inline float apply(float a, float b) {
  if constexpr (OP == Binary::Add) return a + b;
  else return a * b;
}

template <Binary OP>
static void binary_t(const float* a, const int64_t* shape, int rank, const float* b,
                     const int64_t* bstr, float* y) {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[i];
  if (n == 0) return;
  const int64_t C = rank > 0 ? shape[rank - 1] : 1;
  const int64_t rows = n / C;
  // Same shape: b's strides are a's dense strides.
  bool same = true;
  int64_t st = 1;
  for (int i = rank - 1; i >= 0; st *= shape[i], --i)
    if (shape[i] != 1 && bstr[i] != st) same = false;
  if (same) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] = apply<OP>(a[i], b[i]);
    return;
  }
  const int64_t cstride = rank > 0 ? bstr[rank - 1] : 0;
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    // b's offset for this row: decompose r over the leading dims.
    int64_t off = 0, rem = r;
    for (int i = rank - 2; i >= 0; --i) {
      off += (rem % shape[i]) * bstr[i];
      rem /= shape[i];
    }
    const float* ar = a + r * C;
    const float* br = b + off;
    float* yr = y + r * C;
    if (cstride == 1) {
      for (int64_t c = 0; c < C; ++c) yr[c] = apply<OP>(ar[c], br[c]);
    } else {
      const float bv = br[0];
      for (int64_t c = 0; c < C; ++c) yr[c] = apply<OP>(ar[c], bv);
    }
  }
}

void binary(Binary op, const float* a, const int64_t* a_shape, int rank, const float* b,
            const int64_t* b_strides, float* y) {
  if (op == Binary::Add) binary_t<Binary::Add>(a, a_shape, rank, b, b_strides, y);
  else binary_t<Binary::Mul>(a, a_shape, rank, b, b_strides, y);
}

// ---------------------------------------------------------------------------------------------

void upsample_nearest(const float* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho,
                      int64_t Wo, float* y) {
#pragma omp parallel for schedule(static) if (N * Ho * Wo * C > kParallelMin)
  for (int64_t r = 0; r < N * Ho; ++r) {
    const int64_t n = r / Ho, oy = r % Ho;
    const int64_t iy = oy * H / Ho;
    const float* src = x + (n * H + iy) * W * C;
    float* dst = y + r * Wo * C;
    for (int64_t ox = 0; ox < Wo; ++ox)
      std::memcpy(dst + ox * C, src + (ox * W / Wo) * C, size_t(C) * sizeof(float));
  }
}

void concat_last(const float* a, int64_t Ca, const float* b, int64_t Cb, int64_t rows, float* y) {
  const int64_t Cy = Ca + Cb;
#pragma omp parallel for schedule(static) if (rows * Cy > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(y + r * Cy, a + r * Ca, size_t(Ca) * sizeof(float));
    std::memcpy(y + r * Cy + Ca, b + r * Cb, size_t(Cb) * sizeof(float));
  }
}

void timestep_embedding(const float* t, int64_t N, int64_t dim, bool flip_sin_to_cos,
                        float downscale_freq_shift, float max_period, float* y) {
  // diffusers: exponent = -ln(max_period) * arange(half) [f32]; exponent /= (half - shift);
  // emb = t[:, None] * exp(exponent); cat(sin, cos) (cos, sin if flipped); zero-pad odd dim.
  // Each step is rounded to f32 as PyTorch's f32 tensors are; exp/sin/cos are evaluated in
  // double and rounded once.
  const int64_t half = dim / 2;
  const float neg_log = float(-std::log(double(max_period)));
  const float denom = float(half) - downscale_freq_shift;
  for (int64_t n = 0; n < N; ++n) {
    float* out = y + n * dim;
    for (int64_t i = 0; i < half; ++i) {
      float e = (neg_log * float(i)) / denom;
      float freq = float(std::exp(double(e)));
      float arg = t[n] * freq;
      float s = float(std::sin(double(arg))), c = float(std::cos(double(arg)));
      out[i] = flip_sin_to_cos ? c : s;
      out[half + i] = flip_sin_to_cos ? s : c;
    }
    if (dim % 2) out[dim - 1] = 0.0f;
  }
}

}  // namespace diffuse::cpu
