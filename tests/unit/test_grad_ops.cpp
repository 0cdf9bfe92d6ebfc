// Gradient checks for the CPU backend's backward ops (backend.h, "backward passes"): each op's f32
// backward against central finite differences of a plain DOUBLE reference forward written here
// (NHWC, exactly the forward op's definition), on odd shapes.
//
// Method. Inputs x and an upstream gradient G are drawn from fixed seeds and rounded to f32 (the
// backend sees f32, so the reference runs on the same, exactly representable values). With
// L = Σ G∘y(x), the reference gradient dL/dx_i is the central difference
//     Σ_k G_k·(y_k(x + h·e_i) − y_k(x − h·e_i)) / (2h)
// in double (the outputs are differenced before they are summed, so outputs that x_i does not
// touch cancel exactly). Its own error is estimated and added to each tolerance (it is always
// orders of magnitude below the f32 part): the roundoff of the difference, 64·ε_d·Σ|G_k|·(|y+_k| +
// |y-_k|)/(2h) over the outputs that moved, plus |g(h) − g(2h)|, which bounds the truncation
// error (central differences: error(2h) ≈ 4·error(h)). Linear ops use h = 2^-10 (their central
// difference has no truncation error, and a large step keeps the roundoff small); the others
// h = 1e-5.
//
// Tolerances are derived per op from f32 rounding (unit roundoff u = 2^-24 ≈ 6e-8): a sum of K
// rounded terms computed in f32 in any order (blocked, threaded, FMA or not) is within
// (K+1)·u·Σ|terms| of the exact sum (Higham's γ_K bound, +1 for the rounding of each product),
// and Σ|terms| ≤ K·max|term|, with max|term| taken from the drawn data (max|G|·max|w| etc.). The
// other ops state their own error budget next to the check. Every check also asserts that its
// tolerance is below 1e-3·max|gradient|, so a passing check means something. Each check prints
// its worst error and its tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/error.h"
#include "core/tensor.h"

using namespace diffuse;

namespace {

using V = std::vector<double>;

const double kU = std::ldexp(1.0, -24);   // f32 unit roundoff
const double kEpsD = std::ldexp(1.0, -52);  // double machine epsilon
const double kHLinear = std::ldexp(1.0, -10);
const double kHSmooth = 1e-5;

std::unique_ptr<Backend> make() { return make_cpu_backend(Precision::F32); }

// n values uniform in [lo, hi), rounded to f32.
V draw(size_t n, std::mt19937& g, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  V v(n);
  for (double& x : v) x = double(float(d(g)));
  return v;
}

Tensor tensor(const Shape& s, const V& v) {
  Tensor t = Tensor::empty(s);
  EXPECT_EQ(size_t(t.numel()), v.size()) << s.str();
  for (size_t i = 0; i < v.size(); ++i) t.f32()[i] = float(v[i]);
  return t;
}

V values(const Tensor& t) { return V(t.f32(), t.f32() + t.numel()); }

double maxabs(const V& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

V offset_by(const V& a, double c) {
  V r(a);
  for (double& x : r) x += c;
  return r;
}

// ---- finite differences ------------------------------------------------------------------------

struct Fd {
  V grad;
  double err = 0;  // estimated error of the difference quotient (roundoff + truncation)
};

// dL/dx for L = Σ G∘f(x), by central differences with step h (and 2h for the truncation estimate).
Fd fd_grad(const std::function<V(const V&)>& f, V x, const V& G, double h) {
  Fd r;
  r.grad.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double xi = x[i];
    double g[2] = {0, 0}, noise = 0;
    for (int s = 0; s < 2; ++s) {
      const double hs = s == 0 ? h : 2 * h;
      x[i] = xi + hs;
      const V yp = f(x);
      x[i] = xi - hs;
      const V ym = f(x);
      x[i] = xi;
      EXPECT_EQ(yp.size(), G.size());
      double sum = 0, mag = 0;
      for (size_t k = 0; k < G.size(); ++k) {
        if (yp[k] == ym[k]) continue;
        sum += G[k] * (yp[k] - ym[k]);
        mag += std::abs(G[k]) * (std::abs(yp[k]) + std::abs(ym[k]));
      }
      g[s] = sum / (2 * hs);
      if (s == 0) noise = 64 * kEpsD * mag / (2 * hs);
    }
    r.grad[i] = g[0];
    r.err = std::max(r.err, noise + std::abs(g[0] - g[1]));
  }
  return r;
}

// ---- comparison ----------------------------------------------------------------------------------

// max|got − ref| ≤ tol, and tol < 1e-3·scale (scale: max|gradient|; defaults to max|ref|).
void expect_grad(const std::string& what, const Tensor& got, const V& ref, double tol, double scale = -1) {
  const V g = values(got);
  ASSERT_EQ(g.size(), ref.size()) << what;
  if (scale < 0) scale = maxabs(ref);
  double err = 0;
  size_t worst = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double e = std::isfinite(g[i]) ? std::abs(g[i] - ref[i]) : INFINITY;
    if (e > err) err = e, worst = i;
  }
  std::printf("  %-46s max|err| %.2e  tol %.2e  (err/tol %.3f)  max|grad| %.2e\n", what.c_str(), err, tol,
              err / tol, scale);
  EXPECT_LE(err, tol) << what << ": worst at flat index " << worst << ": got " << g[worst] << ", want "
                      << ref[worst];
  EXPECT_LT(tol, 1e-3 * scale) << what << ": tolerance " << tol << " is not well below max|grad| " << scale;
}

// ---- conv2d --------------------------------------------------------------------------------------

struct ConvGeom {
  int64_t N, H, W, I, O, kh, kw;
  Conv2dParams p;
  int64_t Ho() const { return (H + p.pad_top + p.pad_bottom - kh) / p.stride + 1; }
  int64_t Wo() const { return (W + p.pad_left + p.pad_right - kw) / p.stride + 1; }
};

// y [N, Ho, Wo, O] = conv(x [N, H, W, I], w [O, I, kh, kw]) + b [O]; zero padding.
V conv_fwd(const ConvGeom& c, const V& x, const V& w, const V& b) {
  const int64_t Ho = c.Ho(), Wo = c.Wo();
  V y(size_t(c.N * Ho * Wo * c.O));
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox)
        for (int64_t o = 0; o < c.O; ++o) {
          double s = b[size_t(o)];
          for (int64_t ky = 0; ky < c.kh; ++ky)
            for (int64_t kx = 0; kx < c.kw; ++kx) {
              const int64_t iy = oy * c.p.stride - c.p.pad_top + ky, ix = ox * c.p.stride - c.p.pad_left + kx;
              if (iy < 0 || iy >= c.H || ix < 0 || ix >= c.W) continue;
              for (int64_t i = 0; i < c.I; ++i)
                s += x[size_t(((n * c.H + iy) * c.W + ix) * c.I + i)] * w[size_t(((o * c.I + i) * c.kh + ky) * c.kw + kx)];
            }
          y[size_t(((n * Ho + oy) * Wo + ox) * c.O + o)] = s;
        }
  return y;
}

void conv_case(const std::string& name, const ConvGeom& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const V x = draw(size_t(c.N * c.H * c.W * c.I), rng, -1, 1);
  const V w = draw(size_t(c.O * c.I * c.kh * c.kw), rng, -1, 1);
  const V b = draw(size_t(c.O), rng, -1, 1);
  const int64_t Ho = c.Ho(), Wo = c.Wo();
  const V G = draw(size_t(c.N * Ho * Wo * c.O), rng, -1, 1);
  const Fd gx = fd_grad([&](const V& v) { return conv_fwd(c, v, w, b); }, x, G, kHLinear);
  const Fd gw = fd_grad([&](const V& v) { return conv_fwd(c, x, v, b); }, w, G, kHLinear);
  const Fd gb = fd_grad([&](const V& v) { return conv_fwd(c, x, w, v); }, b, G, kHLinear);

  auto be = make();
  const Tensor xt = tensor({c.N, c.H, c.W, c.I}, x), wt = tensor({c.O, c.I, c.kh, c.kw}, w);
  const Tensor dy = tensor({c.N, Ho, Wo, c.O}, G);
  const double Gm = maxabs(G), xm = maxabs(x), wm = maxabs(w);

  // dx: each element sums at most K = O·kh·kw products G·w, |G·w| ≤ max|G|·max|w|:
  // tol = (K+1)·u·K·max|G|·max|w|. dx is overwritten: pre-filled with garbage.
  Tensor dx = Tensor::full({c.N, c.H, c.W, c.I}, 123.0f);
  be->conv2d_backward_data(dy, wt, c.p, dx);
  {
    const double K = double(c.O * c.kh * c.kw);
    expect_grad(name + " dx", dx, gx.grad, (K + 1) * kU * K * Gm * wm + gx.err);
  }

  // dw (+=): each element sums K = N·Ho·Wo products G·x: tol = (K+1)·u·K·max|G|·max|x|, plus
  // the rounding of the final add to the pre-filled P = 0.25: u·max|P + dw|.
  // db (+=): K = N·Ho·Wo terms G: tol = (K+1)·u·K·max|G| + u·max|P + db|, P = -0.5.
  const float Pw = 0.25f, Pb = -0.5f;
  Tensor dw = Tensor::full({c.O, c.I, c.kh, c.kw}, Pw), db = Tensor::full({c.O}, Pb);
  be->conv2d_backward_weights(xt, dy, c.p, &dw, &db);
  const double K = double(c.N * Ho * Wo);
  const V rw = offset_by(gw.grad, Pw), rb = offset_by(gb.grad, Pb);
  expect_grad(name + " dw (+= 0.25)", dw, rw, (K + 1) * kU * K * Gm * xm + kU * maxabs(rw) + gw.err, maxabs(gw.grad));
  expect_grad(name + " db (+= -0.5)", db, rb, (K + 1) * kU * K * Gm + kU * maxabs(rb) + gb.err, maxabs(gb.grad));

  // Optional outputs: db alone, then dw alone (into zeros), give the same gradients.
  Tensor db2 = Tensor::zeros({c.O}), dw2 = Tensor::zeros({c.O, c.I, c.kh, c.kw});
  be->conv2d_backward_weights(xt, dy, c.p, nullptr, &db2);
  be->conv2d_backward_weights(xt, dy, c.p, &dw2, nullptr);
  expect_grad(name + " db alone", db2, gb.grad, (K + 1) * kU * K * Gm + gb.err);
  expect_grad(name + " dw alone", dw2, gw.grad, (K + 1) * kU * K * Gm * xm + gw.err);
}

TEST(GradConv2d, K3Stride1Pad1) { conv_case("conv 3x3 s1 p1", {2, 5, 7, 3, 4, 3, 3, Conv2dParams::same(3)}, 11); }

// SD's VAE downsample: stride 2, padding (0, 1) on each spatial axis (top/left 0, bottom/right 1).
TEST(GradConv2d, K3Stride2AsymmetricPad) {
  Conv2dParams p;
  p.stride = 2, p.pad_top = 0, p.pad_left = 0, p.pad_bottom = 1, p.pad_right = 1;
  conv_case("conv 3x3 s2 pad(0,0,1,1)", {2, 7, 6, 3, 4, 3, 3, p}, 12);
}

TEST(GradConv2d, OneByOne) { conv_case("conv 1x1", {2, 3, 5, 5, 3, 1, 1, Conv2dParams{}}, 13); }

// ---- linear -------------------------------------------------------------------------------------

// y [R, O] = x [R, I]·wᵀ + b, w [O, I].
V linear_fwd(const V& x, const V& w, const V& b, int64_t R, int64_t I, int64_t O) {
  V y(size_t(R * O));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t o = 0; o < O; ++o) {
      double s = b[size_t(o)];
      for (int64_t i = 0; i < I; ++i) s += x[size_t(r * I + i)] * w[size_t(o * I + i)];
      y[size_t(r * O + o)] = s;
    }
  return y;
}

TEST(GradLinear, DataWeightsBias) {
  const int64_t R = 6, I = 5, O = 7;  // x [2, 3, 5]
  std::mt19937 rng(21);
  const V x = draw(size_t(R * I), rng, -1, 1), w = draw(size_t(O * I), rng, -1, 1), b = draw(size_t(O), rng, -1, 1);
  const V G = draw(size_t(R * O), rng, -1, 1);
  const Fd gx = fd_grad([&](const V& v) { return linear_fwd(v, w, b, R, I, O); }, x, G, kHLinear);
  const Fd gw = fd_grad([&](const V& v) { return linear_fwd(x, v, b, R, I, O); }, w, G, kHLinear);
  const Fd gb = fd_grad([&](const V& v) { return linear_fwd(x, w, v, R, I, O); }, b, G, kHLinear);
  auto be = make();
  const Tensor xt = tensor({2, 3, I}, x), wt = tensor({O, I}, w), dy = tensor({2, 3, O}, G);
  const double Gm = maxabs(G), xm = maxabs(x), wm = maxabs(w);

  // dx = dy·W: K = O products G·w per element: tol = (K+1)·u·K·max|G|·max|w|.
  const double Kx = double(O), tol_x = (Kx + 1) * kU * Kx * Gm * wm + gx.err;
  Tensor dx = Tensor::full({2, 3, I}, 77.0f);
  be->linear_backward_data(dy, wt, dx);
  expect_grad("linear dx", dx, gx.grad, tol_x);
  // accumulate = true: dx += ...; one more rounding of the add: + u·max|P + dx|.
  const float P = 0.375f;
  Tensor dxa = Tensor::full({2, 3, I}, P);
  be->linear_backward_data(dy, wt, dxa, true);
  const V rxa = offset_by(gx.grad, P);
  expect_grad("linear dx (accumulate, += 0.375)", dxa, rxa, tol_x + kU * maxabs(rxa), maxabs(gx.grad));

  // dw = dyᵀ·x (+=): K = R products G·x: tol = (K+1)·u·K·max|G|·max|x| + u·max|P + dw|.
  // db = Σ_rows dy (+=): K = R terms: tol = (K+1)·u·K·max|G| + u·max|P + db|.
  const double K = double(R);
  const float Pw = -0.25f, Pb = 0.5f;
  Tensor dw = Tensor::full({O, I}, Pw), db = Tensor::full({O}, Pb);
  be->linear_backward_weights(xt, dy, &dw, &db);
  const V rw = offset_by(gw.grad, Pw), rb = offset_by(gb.grad, Pb);
  expect_grad("linear dw (+= -0.25)", dw, rw, (K + 1) * kU * K * Gm * xm + kU * maxabs(rw) + gw.err, maxabs(gw.grad));
  expect_grad("linear db (+= 0.5)", db, rb, (K + 1) * kU * K * Gm + kU * maxabs(rb) + gb.err, maxabs(gb.grad));
  Tensor db2 = Tensor::zeros({O});
  be->linear_backward_weights(xt, dy, nullptr, &db2);
  expect_grad("linear db alone", db2, gb.grad, (K + 1) * kU * K * Gm + gb.err);
}

// ---- matmul -------------------------------------------------------------------------------------

// c [B, M, N] = alpha·a [B, M, K]·b [B, K, N] (trans_b: b [B, N, K], c = alpha·a·bᵀ).
V matmul_fwd(const V& a, const V& b, int64_t B, int64_t M, int64_t K, int64_t N, bool tb, double alpha) {
  V c(size_t(B * M * N));
  for (int64_t z = 0; z < B; ++z)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += a[size_t((z * M + m) * K + k)] * (tb ? b[size_t((z * N + n) * K + k)] : b[size_t((z * K + k) * N + n)]);
        c[size_t((z * M + m) * N + n)] = alpha * s;
      }
  return c;
}

void matmul_case(bool tb, uint32_t seed) {
  const int64_t B = 2, M = 3, K = 5, N = 4;
  const float alpha = -0.37f;  // not a power of two: its product rounds
  std::mt19937 rng(seed);
  const V a = draw(size_t(B * M * K), rng, -1, 1), b = draw(size_t(B * K * N), rng, -1, 1);
  const V G = draw(size_t(B * M * N), rng, -1, 1);
  const Fd ga = fd_grad([&](const V& v) { return matmul_fwd(v, b, B, M, K, N, tb, alpha); }, a, G, kHLinear);
  const Fd gb = fd_grad([&](const V& v) { return matmul_fwd(a, v, B, M, K, N, tb, alpha); }, b, G, kHLinear);
  auto be = make();
  const Tensor at = tensor({B, M, K}, a), bt = tensor(tb ? Shape{B, N, K} : Shape{B, K, N}, b);
  const Tensor dc = tensor({B, M, N}, G);
  Tensor da = Tensor::full({B, M, K}, 55.0f), db = Tensor::full(bt.shape(), -55.0f);  // overwritten
  be->matmul_backward(at, bt, dc, tb, alpha, &da, &db);
  const double Gm = maxabs(G), am = maxabs(a), bm = maxabs(b), al = std::abs(double(alpha));
  // da = alpha·dc·bᵀ: K = N products per element, each with the alpha product too (+1 rounding):
  // tol = (N+2)·u·N·|alpha|·max|G|·max|b|. db = alpha·aᵀ·dc: K = M: tol = (M+2)·u·M·|alpha|·max|G|·max|a|.
  const std::string name = tb ? "matmul trans_b" : "matmul";
  expect_grad(name + " da", da, ga.grad, double(N + 2) * kU * double(N) * al * Gm * bm + ga.err);
  expect_grad(name + " db", db, gb.grad, double(M + 2) * kU * double(M) * al * Gm * am + gb.err);
  // Either output alone.
  Tensor da2 = Tensor::zeros({B, M, K}), db2 = Tensor::zeros(bt.shape());
  be->matmul_backward(at, bt, dc, tb, alpha, &da2, nullptr);
  be->matmul_backward(at, bt, dc, tb, alpha, nullptr, &db2);
  expect_grad(name + " da alone", da2, ga.grad, double(N + 2) * kU * double(N) * al * Gm * bm + ga.err);
  expect_grad(name + " db alone", db2, gb.grad, double(M + 2) * kU * double(M) * al * Gm * am + gb.err);
}

TEST(GradMatmul, Plain) { matmul_case(false, 31); }
TEST(GradMatmul, TransB) { matmul_case(true, 32); }

// ---- normalisation ------------------------------------------------------------------------------

// Group norm over x [N, S, C] (G groups of C/G channels; per (sample, group) over S·C/G values,
// biased variance, eps inside the sqrt), affine, then optionally SiLU. Layer norm is the case
// S = 1, G = 1 (one row per "sample").
V group_norm_fwd(const V& x, const V& gam, const V& bet, int64_t N, int64_t S, int64_t C, int64_t G, double eps,
                 bool silu) {
  const int64_t cg = C / G;
  V y(x.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sum += x[size_t((n * S + s) * C + c)];
      const double mean = sum / double(S * cg);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          const double d = x[size_t((n * S + s) * C + c)] - mean;
          sq += d * d;
        }
      const double rstd = 1.0 / std::sqrt(sq / double(S * cg) + eps);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          const size_t i = size_t((n * S + s) * C + c);
          const double z = (x[i] - mean) * rstd * gam[size_t(c)] + bet[size_t(c)];
          y[i] = silu ? z / (1.0 + std::exp(-z)) : z;
        }
    }
  return y;
}

// Magnitudes the norm tolerances need, from the data: r = max rstd, Xa = max r·(|x − μ| + |μ|)
// (bounds |x̂| and the f32 rounding scale of x − μ), Zm = max|z| (the SiLU argument).
struct NormMags {
  double r = 0, Xa = 0, Zm = 0;
};
NormMags norm_mags(const V& x, const V& gam, const V& bet, int64_t N, int64_t S, int64_t C, int64_t G, double eps) {
  NormMags m;
  const int64_t cg = C / G;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sum += x[size_t((n * S + s) * C + c)];
      const double mean = sum / double(S * cg);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sq += std::pow(x[size_t((n * S + s) * C + c)] - mean, 2);
      const double r = 1.0 / std::sqrt(sq / double(S * cg) + eps);
      m.r = std::max(m.r, r);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          const double d = x[size_t((n * S + s) * C + c)] - mean;
          m.Xa = std::max(m.Xa, r * (std::abs(d) + std::abs(mean)));
          m.Zm = std::max(m.Zm, std::abs(d * r * gam[size_t(c)] + bet[size_t(c)]));
        }
    }
  return m;
}

// Tolerances of a normalisation backward (f32 compute; statistics may be double or f32).
// Notation: M = values per (sample, group) (group norm S·C/G, layer norm C), NS = values summed
// per channel for dgamma/dbeta (N·S, or rows), Gm = max|G|, Γ = max|γ|, D = max|dy/dz| (1, or
// 1.1 ≥ max silu' ≈ 1.0998), r, Xa, Zm as above. Error budget:
//  - x̂ = (x − μ)·rstd in f32 (μ and rstd rounded to f32, one subtraction, one product):
//    |δx̂| ≤ ex = 4u·Xa.
//  - g = G·silu'(z) (fused SiLU only; ~10 rounded ops including exp's ~2 ulp, and z itself off by
//    Γ·ex + u·|z|, times |silu''| ≤ 0.5): |δg| ≤ eg = u·Gm·(10·D + 2Γ·Xa + Zm); 0 without SiLU.
//  - dbeta = Σ_NS g: (NS+1)·u·NS·Gm·D + NS·eg. dgamma = Σ_NS g·x̂: (NS+1)·u·NS·Gm·D·Xa +
//    NS·(eg·Xa + Gm·D·ex).
//  - dx = rstd·(gγ − A/M − x̂·B/M) with A = Σ_M gγ, B = Σ_M gγx̂: |δA| ≤ (M+1)·u·M·Gm·D·Γ +
//    M·Γ·eg, |δB| ≤ (M+1)·u·M·Gm·D·Γ·Xa + M·Γ·(eg·Xa + Gm·D·ex); then dx's own roundings
//    (~4 ops on terms ≤ Gm·D·Γ·(2 + Xa²)) and x̂'s error times B/M: rstd·(Γ·eg + |δA|/M +
//    Xa·|δB|/M + ex·Gm·D·Γ·Xa + 4u·Gm·D·Γ·(2 + Xa²)).
// Each gets a safety factor of 2.
struct NormTols {
  double dx, dgamma, dbeta;
};
NormTols norm_tols(const NormMags& m, double M, double NS, double Gm, double Gam, bool silu) {
  const double D = silu ? 1.1 : 1.0;
  const double ex = 4 * kU * m.Xa;
  const double eg = silu ? kU * Gm * (10 * D + 2 * Gam * m.Xa + m.Zm) : 0.0;
  NormTols t;
  t.dbeta = 2 * ((NS + 1) * kU * NS * Gm * D + NS * eg);
  t.dgamma = 2 * ((NS + 1) * kU * NS * Gm * D * m.Xa + NS * (eg * m.Xa + Gm * D * ex));
  const double eA = (M + 1) * kU * M * Gm * D * Gam + M * Gam * eg;
  const double eB = (M + 1) * kU * M * Gm * D * Gam * m.Xa + M * Gam * (eg * m.Xa + Gm * D * ex);
  t.dx = 2 * m.r *
         (Gam * eg + eA / M + m.Xa * eB / M + ex * Gm * D * Gam * m.Xa + 4 * kU * Gm * D * Gam * (2 + m.Xa * m.Xa));
  return t;
}

void group_norm_case(bool silu, uint32_t seed, int64_t N = 2, int64_t Hs = 3, int64_t Ws = 5) {
  const int64_t S = Hs * Ws, C = 12, G = 4;
  const float eps = 1e-5f;
  std::mt19937 rng(seed);
  const V x = draw(size_t(N * S * C), rng, -1.5, 2.5);  // off-centre: the mean matters
  const V gam = draw(size_t(C), rng, 0.5, 1.5), bet = draw(size_t(C), rng, -1, 1);
  const V Gr = draw(size_t(N * S * C), rng, -1, 1);
  auto f = [&](const V& xv, const V& gv, const V& bv) { return group_norm_fwd(xv, gv, bv, N, S, C, G, eps, silu); };
  const Fd gx = fd_grad([&](const V& v) { return f(v, gam, bet); }, x, Gr, kHSmooth);
  const Fd gg = fd_grad([&](const V& v) { return f(x, v, bet); }, gam, Gr, kHSmooth);
  const Fd gb = fd_grad([&](const V& v) { return f(x, gam, v); }, bet, Gr, kHSmooth);

  auto be = make();
  const Tensor xt = tensor({N, Hs, Ws, C}, x), gt = tensor({C}, gam), bt = tensor({C}, bet);
  const Tensor dy = tensor({N, Hs, Ws, C}, Gr);
  Tensor dx = Tensor::full({N, Hs, Ws, C}, 9.0f);
  const float Pg = 0.125f, Pb = -0.75f;
  Tensor dgam = Tensor::full({C}, Pg), dbet = Tensor::full({C}, Pb);
  be->group_norm_backward(xt, gt, bt, int(G), eps, silu, dy, dx, &dgam, &dbet);

  const NormTols t = norm_tols(norm_mags(x, gam, bet, N, S, C, G, eps), double(S * C / G), double(N * S),
                               maxabs(Gr), maxabs(gam), silu);
  const std::string name = silu ? "group_norm+silu" : "group_norm";
  const V rg = offset_by(gg.grad, Pg), rb = offset_by(gb.grad, Pb);
  expect_grad(name + " dx", dx, gx.grad, t.dx + gx.err);
  expect_grad(name + " dgamma (+= 0.125)", dgam, rg, t.dgamma + kU * maxabs(rg) + gg.err, maxabs(gg.grad));
  expect_grad(name + " dbeta (+= -0.75)", dbet, rb, t.dbeta + kU * maxabs(rb) + gb.err, maxabs(gb.grad));

  // Without the parameter gradients: dx alone is the same.
  Tensor dx2 = Tensor::empty({N, Hs, Ws, C});
  be->group_norm_backward(xt, gt, bt, int(G), eps, silu, dy, dx2, nullptr, nullptr);
  expect_grad(name + " dx (no dgamma/dbeta)", dx2, gx.grad, t.dx + gx.err);
}

TEST(GradGroupNorm, Plain) { group_norm_case(false, 41); }
TEST(GradGroupNorm, FusedSilu) { group_norm_case(true, 42); }
// 65 rows, one sample: more than the backend's chunk of 64 rows per task (sums across chunks;
// more rows make the f32 error bound above too loose to check anything).
TEST(GradGroupNorm, FusedSiluManyRows) { group_norm_case(true, 43, 1, 5, 13); }

TEST(GradLayerNorm, Rows7C9) {
  const int64_t R = 7, C = 9;
  const float eps = 1e-5f;
  std::mt19937 rng(51);
  const V x = draw(size_t(R * C), rng, -1.5, 2.5);
  const V gam = draw(size_t(C), rng, 0.5, 1.5), bet = draw(size_t(C), rng, -1, 1);
  const V Gr = draw(size_t(R * C), rng, -1, 1);
  auto f = [&](const V& xv, const V& gv, const V& bv) { return group_norm_fwd(xv, gv, bv, R, 1, C, 1, eps, false); };
  const Fd gx = fd_grad([&](const V& v) { return f(v, gam, bet); }, x, Gr, kHSmooth);
  const Fd gg = fd_grad([&](const V& v) { return f(x, v, bet); }, gam, Gr, kHSmooth);
  const Fd gb = fd_grad([&](const V& v) { return f(x, gam, v); }, bet, Gr, kHSmooth);
  auto be = make();
  const Tensor xt = tensor({R, C}, x), gt = tensor({C}, gam), dy = tensor({R, C}, Gr);
  Tensor dx = Tensor::full({R, C}, 9.0f);
  const float Pg = 0.5f, Pb = 0.25f;
  Tensor dgam = Tensor::full({C}, Pg), dbet = Tensor::full({C}, Pb);
  be->layer_norm_backward(xt, gt, eps, dy, dx, &dgam, &dbet);
  // The group-norm budget with M = C values per row and NS = R rows per channel.
  const NormTols t = norm_tols(norm_mags(x, gam, bet, R, 1, C, 1, eps), double(C), double(R), maxabs(Gr),
                               maxabs(gam), false);
  const V rg = offset_by(gg.grad, Pg), rb = offset_by(gb.grad, Pb);
  expect_grad("layer_norm dx", dx, gx.grad, t.dx + gx.err);
  expect_grad("layer_norm dgamma (+= 0.5)", dgam, rg, t.dgamma + kU * maxabs(rg) + gg.err, maxabs(gg.grad));
  expect_grad("layer_norm dbeta (+= 0.25)", dbet, rb, t.dbeta + kU * maxabs(rb) + gb.err, maxabs(gb.grad));
}

// ---- softmax ------------------------------------------------------------------------------------

V softmax_fwd(const V& x, int64_t R, int64_t C) {
  V y(x.size());
  for (int64_t r = 0; r < R; ++r) {
    double mx = -INFINITY, s = 0;
    for (int64_t c = 0; c < C; ++c) mx = std::max(mx, x[size_t(r * C + c)]);
    for (int64_t c = 0; c < C; ++c) s += (y[size_t(r * C + c)] = std::exp(x[size_t(r * C + c)] - mx));
    for (int64_t c = 0; c < C; ++c) y[size_t(r * C + c)] /= s;
  }
  return y;
}

TEST(GradSoftmax, FromOutput) {
  const int64_t R = 5, C = 11;
  std::mt19937 rng(61);
  const V x = draw(size_t(R * C), rng, -3, 3), G = draw(size_t(R * C), rng, -1, 1);
  const Fd gx = fd_grad([&](const V& v) { return softmax_fwd(v, R, C); }, x, G, kHSmooth);
  const V y = softmax_fwd(x, R, C);
  auto be = make();
  const Tensor yt = tensor({R, C}, y);  // the forward output, rounded to f32 once
  Tensor dx = Tensor::full({R, C}, 3.0f);
  be->softmax_backward(yt, tensor({R, C}, G), dx);
  // dx = y·(G − s), s = Σ_C G·y. The f32 y is off by u·y; s sums C products with Σ|G·y| ≤ Gm
  // (Σy = 1): |δs| ≤ (C+1)·u·Gm + u·Gm; then one subtraction and one product: ~2u·(Gm + |s|) ≤ 4u·Gm,
  // all times y ≤ ymax: tol = 2·ymax·Gm·u·(C + 8) (safety 2).
  const double tol = 2 * maxabs(y) * maxabs(G) * kU * double(C + 8);
  expect_grad("softmax dx", dx, gx.grad, tol + gx.err);
}

// ---- unary, geglu -------------------------------------------------------------------------------

double sigm(double v) { return 1.0 / (1.0 + std::exp(-v)); }
double gelu_erf(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }
const double kSqrt2OverPi = std::sqrt(2.0 / M_PI);

double unary_f(Unary op, double v) {
  switch (op) {
    case Unary::SiLU: return v * sigm(v);
    case Unary::GeluErf: return gelu_erf(v);
    case Unary::GeluTanh: return 0.5 * v * (1.0 + std::tanh(kSqrt2OverPi * (v + 0.044715 * v * v * v)));
    case Unary::QuickGelu: return v * sigm(1.702 * v);
    case Unary::LeakyRelu02: return v < 0 ? 0.2 * v : v;
    case Unary::ReLU: return v < 0 ? 0.0 : v;
  }
  return 0;
}

// The magnitude of the terms of f'(v) (what its f32 evaluation rounds), taking |1 − s²|-style
// differences at their operands' size (1 + s²) since they cancel.
double unary_terms(Unary op, double v) {
  switch (op) {
    case Unary::SiLU: return sigm(v) + std::abs(v) * sigm(v) * (1 + sigm(v));
    case Unary::GeluErf:
      return 0.5 * (1 + std::abs(std::erf(v / std::sqrt(2.0)))) + std::abs(v) * std::exp(-v * v / 2) / std::sqrt(2 * M_PI);
    case Unary::GeluTanh: {
      const double th = std::tanh(kSqrt2OverPi * (v + 0.044715 * v * v * v));
      return 0.5 * (1 + std::abs(th)) + 0.5 * std::abs(v) * (1 + th * th) * kSqrt2OverPi * (1 + 3 * 0.044715 * v * v);
    }
    case Unary::QuickGelu: {
      const double s = sigm(1.702 * v);
      return s + 1.702 * std::abs(v) * s * (1 + s);
    }
    case Unary::LeakyRelu02: return 1;
    case Unary::ReLU: return 1;
  }
  return 0;
}

const char* unary_name(Unary op) {
  switch (op) {
    case Unary::SiLU: return "silu";
    case Unary::GeluErf: return "gelu_erf";
    case Unary::GeluTanh: return "gelu_tanh";
    case Unary::QuickGelu: return "quick_gelu";
    case Unary::LeakyRelu02: return "leaky_relu_0.2";
    case Unary::ReLU: return "relu";
  }
  return "?";
}

// An f32 erf such as the forward's (Abramowitz & Stegun 7.1.26) is off by up to 1.5e-7 absolute.
const double kErfApprox = 1.5e-7;

TEST(GradUnary, AllOps) {
  const int64_t R = 3, C = 29;
  for (Unary op : {Unary::SiLU, Unary::GeluErf, Unary::GeluTanh, Unary::QuickGelu}) {
    SCOPED_TRACE(unary_name(op));
    std::mt19937 rng(71 + int(op));
    const V x = draw(size_t(R * C), rng, -4, 4), G = draw(size_t(R * C), rng, -1, 1);
    const Fd gx = fd_grad(
        [&](const V& v) {
          V y(v.size());
          for (size_t i = 0; i < v.size(); ++i) y[i] = unary_f(op, v[i]);
          return y;
        },
        x, G, kHSmooth);
    // dx = G·f'(x): f' takes ~10 rounded f32 operations (exp/tanh ~2 ulp each) on terms of size
    // T = max unary_terms(x); erf-based GELU adds the erf approximation, 0.5·1.5e-7.
    // tol = 2·max|G|·(10·u·T + E) (safety 2).
    double T = 0;
    for (double v : x) T = std::max(T, unary_terms(op, v));
    const double E = op == Unary::GeluErf ? 0.5 * kErfApprox : 0.0;
    const double tol = 2 * maxabs(G) * (10 * kU * T + E) + gx.err;
    auto be = make();
    const Tensor xt = tensor({R, C}, x);
    Tensor dx = Tensor::full({R, C}, 5.0f);
    be->unary_backward(op, xt, tensor({R, C}, G), dx);
    expect_grad(std::string("unary ") + unary_name(op) + " dx", dx, gx.grad, tol);
    // dx may alias dy.
    Tensor d = tensor({R, C}, G);
    be->unary_backward(op, xt, d, d);
    expect_grad(std::string("unary ") + unary_name(op) + " dx (in place)", d, gx.grad, tol);
  }
}

// ReLU's gradient: dy where x > 0, else 0 (PyTorch's choice at 0), exactly; in place too.
TEST(GradUnary, ReLU) {
  std::mt19937 rng(97);
  V x = draw(64, rng, -4, 4), G = draw(64, rng, -1, 1);
  x[0] = 0.0;
  Tensor dx = Tensor::full({8, 8}, 5.0f), d = tensor({8, 8}, G);
  make()->unary_backward(Unary::ReLU, tensor({8, 8}, x), tensor({8, 8}, G), dx);
  make()->unary_backward(Unary::ReLU, tensor({8, 8}, x), d, d);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(dx.f32()[i], x[i] > 0 ? float(G[i]) : 0.0f) << "x = " << x[i];
    EXPECT_EQ(d.f32()[i], dx.f32()[i]) << i;
  }
}

// LeakyReLU(0.2)'s gradient: dy where x > 0, else 0.2·dy exactly (PyTorch's choice at 0: the
// slope). The finite differences keep away from the kink at 0, where they are not the derivative.
TEST(GradUnary, LeakyRelu02) {
  const int64_t R = 3, C = 31;
  std::mt19937 rng(98);
  V x = draw(size_t(R * C), rng, -4, 4);
  for (double& v : x) v = v < 0 ? std::min(v, -0.01) : std::max(v, 0.01);
  {
    Tensor dx0 = Tensor::full({1}, 5.0f);
    make()->unary_backward(Unary::LeakyRelu02, Tensor::zeros({1}), Tensor::full({1}, 0.5f), dx0);
    EXPECT_EQ(dx0.f32()[0], 0.1f);
  }
  const V G = draw(size_t(R * C), rng, -1, 1);
  const Fd gx = fd_grad(
      [&](const V& v) {
        V y(v.size());
        for (size_t i = 0; i < v.size(); ++i) y[i] = unary_f(Unary::LeakyRelu02, v[i]);
        return y;
      },
      x, G, kHSmooth);
  auto be = make();
  Tensor dx = Tensor::full({R, C}, 5.0f);
  be->unary_backward(Unary::LeakyRelu02, tensor({R, C}, x), tensor({R, C}, G), dx);
  expect_grad("unary leaky_relu_0.2 dx", dx, gx.grad, gx.err + 1e-7);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_EQ(dx.f32()[i], x[i] > 0 ? float(G[i]) : float(0.2 * double(float(G[i])))) << i;
}

TEST(GradGeglu, Rows6C5) {
  const int64_t R = 6, C = 5;
  std::mt19937 rng(81);
  const V x = draw(size_t(R * 2 * C), rng, -3, 3), G = draw(size_t(R * C), rng, -1, 1);
  auto f = [&](const V& v) {
    V y(size_t(R * C));
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) y[size_t(r * C + c)] = v[size_t(r * 2 * C + c)] * gelu_erf(v[size_t(r * 2 * C + C + c)]);
    return y;
  };
  const Fd gx = fd_grad(f, x, G, kHSmooth);
  auto be = make();
  Tensor dx = Tensor::full({R, 2 * C}, 4.0f);
  be->geglu_backward(tensor({R, 2 * C}, x), tensor({R, C}, G), dx);
  // y = a·gelu(b). da = G·gelu(b): gelu(b) = 0.5·b·(1 + erf) rounds ~5 times on size |b| and
  // the erf approximation adds 0.5·|b|·1.5e-7; one more product: tol_a = 2·Gm·Bm·(8u + 0.5·E).
  // db = G·a·gelu'(b): as the unary GELU (10u on terms T ≤ unary_terms, plus 0.5·E) times |a|,
  // two more products: tol_b = 2·Gm·Am·(12u·T + 0.5·E).
  double Am = 0, Bm = 0, T = 0;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      Am = std::max(Am, std::abs(x[size_t(r * 2 * C + c)]));
      const double b = x[size_t(r * 2 * C + C + c)];
      Bm = std::max(Bm, std::abs(b));
      T = std::max(T, unary_terms(Unary::GeluErf, b));
    }
  const double Gm = maxabs(G);
  const double tol_a = 2 * Gm * Bm * (8 * kU + 0.5 * kErfApprox), tol_b = 2 * Gm * Am * (12 * kU * T + 0.5 * kErfApprox);
  // Check the two halves with their own tolerances.
  V ga, gb, got_a, got_b;
  const V got = values(dx);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < 2 * C; ++c) {
      const size_t i = size_t(r * 2 * C + c);
      (c < C ? ga : gb).push_back(gx.grad[i]);
      (c < C ? got_a : got_b).push_back(got[i]);
    }
  expect_grad("geglu dx[..., :C] (d gate input a)", tensor({R, C}, got_a), ga, tol_a + gx.err);
  expect_grad("geglu dx[..., C:] (d gelu input b)", tensor({R, C}, got_b), gb, tol_b + gx.err);
}

// ---- sum_to, upsample, split ---------------------------------------------------------------------

TEST(GradSumTo, BroadcastShapes) {
  const Shape ys{2, 3, 4, 5};
  std::mt19937 rng(91);
  const V dyv = draw(size_t(ys.numel()), rng, -1, 1);
  const Tensor dy = tensor(ys, dyv);
  auto be = make();
  const Shape targets[] = {{2, 1, 1, 5}, {5}, {3, 1, 1}, {2, 3, 4, 5}};
  for (const Shape& bs : targets) {
    // Direct sum in double: align bs at the last dim (numpy), sum dy over dims where b is 1 or absent.
    const int off = ys.rank() - bs.rank();
    V ref(size_t(bs.numel()), 0.0);
    int64_t K = ys.numel() / bs.numel();
    for (int64_t i = 0; i < ys.numel(); ++i) {
      int64_t rem = i, bi = 0, bstride = 1;
      for (int d = ys.rank() - 1; d >= 0; --d) {
        const int64_t idx = rem % ys[d];
        rem /= ys[d];
        if (d >= off) {
          const int64_t bd = bs[d - off];
          if (bd != 1) bi += idx * bstride;
          bstride *= bd;
        }
      }
      ref[size_t(bi)] += dyv[size_t(i)];
    }
    Tensor db = Tensor::full(bs, 42.0f);  // overwritten
    be->sum_to(dy, db);
    // K terms per output, |terms| ≤ max|dy|: tol = (K+1)·u·K·max|dy|; K = 1 (same shape) is exact.
    const double tol = K == 1 ? 0.0 : double(K + 1) * kU * double(K) * maxabs(dyv);
    if (K == 1) {
      const V got = values(db);
      EXPECT_EQ(got, ref) << "sum_to to the same shape is a copy";
      std::printf("  %-46s exact copy: %s\n", ("sum_to -> " + bs.str()).c_str(), got == ref ? "yes" : "NO");
    } else {
      expect_grad("sum_to -> " + bs.str(), db, ref, tol);
    }
  }
}

// Broadcast multiply y = a ∘ b (b [3, 1, 5] broadcast to a [2, 3, 4, 5]): its backward is the
// forward op and sum_to composed, da = dy ∘ b (binary Mul), db = sum_to(dy ∘ a) — as the models use
// them. Checked against finite differences of a double broadcast product.
TEST(GradBroadcastMul, ThroughMulAndSumTo) {
  const Shape as{2, 3, 4, 5}, bs{3, 1, 5};
  std::mt19937 rng(93);
  const V av = draw(size_t(as.numel()), rng, -1, 1), bv = draw(size_t(bs.numel()), rng, -1, 1);
  const V G = draw(size_t(as.numel()), rng, -1, 1);
  auto bidx = [&](int64_t i) {  // a's flat index -> b's (dims 1 and 3 of a; dim 2 broadcast)
    const int64_t c = i % 5, h = (i / 20) % 3;
    return size_t(h * 5 + c);
  };
  auto fa = [&](const V& x) {
    V y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * bv[bidx(int64_t(i))];
    return y;
  };
  auto fb = [&](const V& x) {
    V y(av.size());
    for (size_t i = 0; i < av.size(); ++i) y[i] = av[i] * x[bidx(int64_t(i))];
    return y;
  };
  const Fd ra = fd_grad(fa, av, G, kHLinear), rb = fd_grad(fb, bv, G, kHLinear);
  auto be = make();
  const Tensor a = tensor(as, av), b = tensor(bs, bv), dy = tensor(as, G);
  Tensor da = Tensor::empty(as), prod = Tensor::empty(as), db = Tensor::empty(bs);
  be->binary(Binary::Mul, dy, b, da);
  be->binary(Binary::Mul, dy, a, prod);
  be->sum_to(prod, db);
  // da: one f32 product per element (≤ u relative); db: K = 8 rounded products summed,
  // (K+1)·u·K·max|G·a| plus one rounding per product.
  const double K = 8, m = maxabs(G) * maxabs(av);
  expect_grad("broadcast mul da", da, ra.grad, 2 * kU * maxabs(G) * maxabs(bv) + ra.err);
  expect_grad("broadcast mul db", db, rb.grad, (K + 1) * kU * K * m + K * kU * m + rb.err);
}

// y [N, Ho, Wo, C] from x [N, H, W, C], source floor(i·H/Ho).
V upsample_fwd(const V& x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo) {
  V y(size_t(N * Ho * Wo * C));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox)
        for (int64_t c = 0; c < C; ++c)
          y[size_t(((n * Ho + oy) * Wo + ox) * C + c)] = x[size_t(((n * H + oy * H / Ho) * W + ox * W / Wo) * C + c)];
  return y;
}

void upsample_case(int64_t Ho, int64_t Wo, uint32_t seed) {
  const int64_t N = 2, H = 3, W = 5, C = 3;
  std::mt19937 rng(seed);
  const V x = draw(size_t(N * H * W * C), rng, -1, 1), G = draw(size_t(N * Ho * Wo * C), rng, -1, 1);
  const Fd gx = fd_grad([&](const V& v) { return upsample_fwd(v, N, H, W, C, Ho, Wo); }, x, G, kHLinear);
  auto be = make();
  Tensor dx = Tensor::full({N, H, W, C}, 8.0f);
  be->upsample_nearest_backward(tensor({N, Ho, Wo, C}, G), dx);
  // Each source sums the K outputs it fed; K ≤ ceil(Ho/H)·ceil(Wo/W): tol = (K+1)·u·K·max|G|.
  const double K = double(((Ho + H - 1) / H) * ((Wo + W - 1) / W));
  expect_grad("upsample " + std::to_string(H) + "x" + std::to_string(W) + " -> " + std::to_string(Ho) + "x" +
                  std::to_string(Wo) + " dx",
              dx, gx.grad, (K + 1) * kU * K * maxabs(G) + gx.err);
}

TEST(GradUpsampleNearest, TwoX) { upsample_case(6, 10, 101); }
TEST(GradUpsampleNearest, NonIntegerRatio) { upsample_case(7, 8, 102); }

TEST(GradSplitLast, Exact) {
  const int64_t Ca = 3, Cb = 4;
  std::mt19937 rng(111);
  const V d = draw(size_t(2 * 3 * (Ca + Cb)), rng, -1, 1);
  auto be = make();
  Tensor da = Tensor::full({2, 3, Ca}, 1.0f), db = Tensor::full({2, 3, Cb}, 1.0f);
  be->split_last(tensor({2, 3, Ca + Cb}, d), da, db);
  for (int64_t r = 0; r < 6; ++r) {
    for (int64_t c = 0; c < Ca; ++c) EXPECT_EQ(da.f32()[r * Ca + c], float(d[size_t(r * (Ca + Cb) + c)])) << r << "," << c;
    for (int64_t c = 0; c < Cb; ++c)
      EXPECT_EQ(db.f32()[r * Cb + c], float(d[size_t(r * (Ca + Cb) + Ca + c)])) << r << "," << c;
  }
}

// ---- timestep embedding -------------------------------------------------------------------------

double ts_freq(int64_t i, int64_t half, double shift, double max_period) {
  return std::exp(-std::log(max_period) * double(i) / (double(half) - shift));
}

// diffusers' get_timestep_embedding in double: [sin(t·f_i)], [cos(t·f_i)] (swapped when flipped),
// zero last column for odd dim.
V timestep_fwd(const V& t, int64_t dim, bool flip, double shift, double max_period) {
  const int64_t half = dim / 2;
  V y(size_t(int64_t(t.size()) * dim), 0.0);
  for (size_t n = 0; n < t.size(); ++n)
    for (int64_t i = 0; i < half; ++i) {
      const double a = t[n] * ts_freq(i, half, shift, max_period);
      y[n * size_t(dim) + size_t(i)] = flip ? std::cos(a) : std::sin(a);
      y[n * size_t(dim) + size_t(half + i)] = flip ? std::sin(a) : std::cos(a);
    }
  return y;
}

TEST(GradTimestepEmbedding, LargeArguments) {
  const V t = {3.0, 87.5, 391.0};
  const double max_period = 10000.0;
  auto be = make();
  uint32_t seed = 121;
  for (int64_t dim : {10, 9})
    for (bool flip : {true, false})
      for (float shift : {0.0f, 1.0f}) {
        const std::string name = "timestep dim " + std::to_string(dim) + (flip ? " flip" : " noflip") + " shift " +
                                 std::to_string(int(shift));
        SCOPED_TRACE(name);
        std::mt19937 rng(seed++);
        const int64_t N = int64_t(t.size()), half = dim / 2;
        const V G = draw(size_t(N * dim), rng, -1, 1);
        // The sinusoids' third derivative is f³ ≤ 1, so h = 1e-4 keeps the truncation error
        // (h²/6·Σ|G|f³ ≈ 1e-8) and the roundoff (sin's argument is off by ε_d·|t·f| ≈ 1e-13 in
        // double, /2h ≈ 1e-9 per term) far below the f32 budget.
        const Fd gt = fd_grad([&](const V& v) { return timestep_fwd(v, dim, flip, shift, max_period); }, t, G, 1e-4);
        Tensor dt = Tensor::full({N}, 6.0f);
        be->timestep_embedding_backward(tensor({N}, t), int(dim), flip, shift, float(max_period), tensor({N, dim}, G),
                                        dt);
        // dt_n = Σ_i f_i·(G_sin,i·cos(t f_i) − G_cos,i·sin(t f_i)). The f32 op forms f_i as diffusers
        // does (exponent, division, exp each rounded: f_i off by ≤ 3u relative) and the argument
        // t·f_i in f32 (one more rounding), so the argument is off by up to 4u·|t·f_i| ABSOLUTE
        // (t·f_i up to 391 rad: ~1e-4 rad), which moves sin/cos by as much; the remaining ~6
        // roundings per term and the sum of 2·half terms add (2·half + 6)·u relative to each term.
        // Per element: tol_n = 2·Σ_i |f_i|·(|G_sin,i| + |G_cos,i|)·u·(4·|t_n·f_i| + 2·half + 6)
        // (safety 2); tol_n must stay < 1e-2·A_n, A_n = Σ_i f_i·(|G_sin,i| + |G_cos,i|), the
        // gradient's own scale, and < 1e-3·max|dt| overall.
        const V got = values(dt);
        double worst = 0, max_tol = 0;
        for (int64_t n = 0; n < N; ++n) {
          double tol = 0, A = 0;
          for (int64_t i = 0; i < half; ++i) {
            const double f = ts_freq(i, half, shift, max_period);
            const double g = std::abs(G[size_t(n * dim + i)]) + std::abs(G[size_t(n * dim + half + i)]);
            tol += 2 * f * g * kU * (4 * std::abs(t[size_t(n)] * f) + double(2 * half + 6));
            A += f * g;
          }
          tol += gt.err;
          max_tol = std::max(max_tol, tol);
          EXPECT_LT(tol, 1e-2 * A) << "t = " << t[size_t(n)];
          const double err = std::abs(got[size_t(n)] - gt.grad[size_t(n)]);
          worst = std::max(worst, err / tol);
          EXPECT_LE(err, tol) << "t = " << t[size_t(n)] << ": got " << got[size_t(n)] << ", want " << gt.grad[size_t(n)];
        }
        const double scale = maxabs(gt.grad);
        EXPECT_LT(max_tol, 1e-3 * scale);
        std::printf("  %-46s max err/tol %.3f  (max tol %.2e, max|grad| %.2e)\n", (name + " dt").c_str(), worst,
                    max_tol, scale);
      }
}

// ---- axpy ---------------------------------------------------------------------------------------

TEST(GradAxpy, ExactF32) {
  const int64_t n = 3 * 37;
  std::mt19937 rng(131);
  const V x = draw(size_t(n), rng, -2, 2), y0 = draw(size_t(n), rng, -2, 2);
  const float a = 0.3f;  // not a power of two: a·x rounds
  auto be = make();
  Tensor y = tensor({3, 37}, y0);
  be->axpy(a, tensor({3, 37}, x), y);
  // y + a·x in f32: the product and the sum each rounded once, or fused into one rounding (FMA).
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float xi = float(x[size_t(i)]), yi = float(y0[size_t(i)]);
    volatile float prod = a * xi;  // the product rounded to f32 on its own (no contraction)
    const float unfused = yi + prod;
    const float fused = std::fma(a, xi, yi);
    const float got = y.f32()[i];
    if (got != unfused && got != fused && ++bad <= 5)
      ADD_FAILURE() << "axpy at " << i << ": got " << got << ", want " << unfused << " (or fused " << fused << ")";
  }
  EXPECT_EQ(bad, 0);
}

// ---- errors -------------------------------------------------------------------------------------

TEST(GradErrors, MisShapedOutputsThrow) {
  auto be = make();
  const Tensor w = Tensor::full({4, 3, 3, 3}, 0.1f), dy = Tensor::full({2, 5, 7, 4}, 1.0f);
  Tensor dx_bad = Tensor::empty({2, 5, 7, 4});  // I = 3, not 4
  EXPECT_THROW(be->conv2d_backward_data(dy, w, Conv2dParams::same(3), dx_bad), Error);
  Tensor dx_bad2 = Tensor::empty({2, 5, 6, 3});  // W = 6 does not give Wo = 7 at stride 1, pad 1
  EXPECT_THROW(be->conv2d_backward_data(dy, w, Conv2dParams::same(3), dx_bad2), Error);

  const Tensor lw = Tensor::full({7, 5}, 0.1f), ldy = Tensor::full({2, 3, 7}, 1.0f);
  Tensor ldx_bad = Tensor::empty({2, 3, 6});
  EXPECT_THROW(be->linear_backward_data(ldy, lw, ldx_bad), Error);

  Tensor sdb_bad = Tensor::empty({4});  // cannot broadcast [4] to [2, 3, 4, 5]
  EXPECT_THROW(be->sum_to(Tensor::full({2, 3, 4, 5}, 1.0f), sdb_bad), Error);

  Tensor da = Tensor::empty({2, 3}), db = Tensor::empty({2, 3});  // 3 + 3 != 7
  EXPECT_THROW(be->split_last(Tensor::full({2, 7}, 1.0f), da, db), Error);
}

}  // namespace
