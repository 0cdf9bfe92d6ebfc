// CPU backend ops against plain double-precision references written here, on awkward shapes
// (channel counts that are not multiples of 16, odd spatial sizes, batch 3, 1×1 inputs).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#include "core/threads.h"

using namespace diffuse;

namespace {

Tensor rnd(const Shape& s, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = d(g);
  return t;
}

std::vector<double> vals(const Tensor& t) {
  Tensor f = t.dtype() == DType::F32 ? t : t.to(DType::F32);
  return std::vector<double>(f.f32(), f.f32() + f.numel());
}

struct Diff {
  double max_abs = 0, max_ref = 0, cosine = 1;
};

Diff compare(const Tensor& got, const std::vector<double>& ref) {
  std::vector<double> g = vals(got);
  EXPECT_EQ(g.size(), ref.size());
  Diff d;
  double dot = 0, ng = 0, nr = 0;
  for (size_t i = 0; i < std::min(g.size(), ref.size()); ++i) {
    d.max_abs = std::max(d.max_abs, std::abs(g[i] - ref[i]));
    if (!std::isfinite(g[i])) d.max_abs = INFINITY;
    d.max_ref = std::max(d.max_ref, std::abs(ref[i]));
    dot += g[i] * ref[i], ng += g[i] * g[i], nr += ref[i] * ref[i];
  }
  d.cosine = (ng > 0 && nr > 0) ? dot / std::sqrt(ng * nr) : (ng == nr ? 1.0 : 0.0);
  return d;
}

// fp32: max|Δ| ≤ 1e-5 · max(1, max|ref|).
void expect_f32(const Tensor& got, const std::vector<double>& ref, const char* what = "") {
  Diff d = compare(got, ref);
  EXPECT_LE(d.max_abs, 1e-5 * std::max(1.0, d.max_ref)) << what << " max|ref| " << d.max_ref;
}

// bf16 conv/linear/matmul bound. Inputs and weights are rounded to bf16 (8 significant bits,
// unit roundoff u = 2^-9), so each product carries a relative error ≤ ~2u = 2^-8; products are
// accumulated in f32 (negligible extra error). With random-sign inputs the errors of the K terms
// add like a random walk, as does the sum itself, so an output's error relative to its own
// typical magnitude is about 2^-8/√3 ≈ 2.3e-3 rms, independent of K; a bf16 output adds one more
// rounding (≤ 2^-9 ≈ 2e-3 relative). The largest error over a few thousand outputs is ~4σ ≈ 1e-2
// of a typical output, and max|ref| is ~3× a typical output, so max|Δ| ≤ 1e-2·max|ref| holds
// with margin (measured on AVX512-BF16: 1.0e-3 to 3.6e-3 · max|ref|, printed below). The cosine similarity is
// 1 - rms_rel²/2 ≈ 1 - 3e-6 (measured ≥ 0.999996), so cosine ≥ 0.9999 is also a comfortable bound that catches a
// wrong layout or a wrong element immediately.
void expect_bf16(const Tensor& got, const std::vector<double>& ref, const char* what = "") {
  Diff d = compare(got, ref);
  std::printf("  bf16 %-28s max|Δ|/max|ref| = %.2e  cosine = %.7f\n", what, d.max_abs / d.max_ref, d.cosine);
  EXPECT_LE(d.max_abs, 1e-2 * d.max_ref) << what;
  EXPECT_GE(d.cosine, 0.9999) << what;
}

std::unique_ptr<CpuBackend> make(Precision p) { return std::make_unique<CpuBackend>(p); }

// ---- conv2d ----------------------------------------------------------------------------------

struct ConvCase {
  int64_t N, H, W, Ci, Co, k;
  Conv2dParams p;
  bool bias;
};

int64_t out_dim(int64_t in, int lo, int hi, int64_t k, int s) { return (in + lo + hi - k) / s + 1; }

// x: f32 [N, H, W, Ci]; w: f32 [Co, Ci, k, k].
std::vector<double> conv_ref(const Tensor& x, const Tensor& w, const Tensor& b, const Conv2dParams& p) {
  const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), Ci = x.dim(3);
  const int64_t Co = w.dim(0), kh = w.dim(2), kw = w.dim(3);
  const int64_t Ho = out_dim(H, p.pad_top, p.pad_bottom, kh, p.stride);
  const int64_t Wo = out_dim(W, p.pad_left, p.pad_right, kw, p.stride);
  const float *X = x.f32(), *Wt = w.f32();
  std::vector<double> y(size_t(N * Ho * Wo * Co));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox)
        for (int64_t o = 0; o < Co; ++o) {
          double s = b.defined() ? b.f32()[o] : 0.0;
          for (int64_t ky = 0; ky < kh; ++ky)
            for (int64_t kx = 0; kx < kw; ++kx) {
              int64_t iy = oy * p.stride - p.pad_top + ky, ix = ox * p.stride - p.pad_left + kx;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              for (int64_t i = 0; i < Ci; ++i)
                s += double(X[((n * H + iy) * W + ix) * Ci + i]) * Wt[((o * Ci + i) * kh + ky) * kw + kx];
            }
          y[size_t(((n * Ho + oy) * Wo + ox) * Co + o)] = s;
        }
  return y;
}

const ConvCase kConvCases[] = {
    {3, 7, 5, 5, 13, 1, {1, 0, 0, 0, 0}, true},           // 1×1, batch 3, odd H/W
    {2, 9, 9, 13, 37, 3, Conv2dParams::same(3), true},   // 3×3 stride 1
    {1, 8, 8, 5, 16, 3, {2, 0, 0, 1, 1}, true},          // VAE downsample: pad (0,1,0,1) stride 2
    {2, 9, 7, 5, 13, 3, {2, 0, 0, 1, 1}, false},         // same, odd sizes, no bias
    {1, 7, 11, 37, 5, 3, Conv2dParams::same(3, 2), true}, // 3×3 stride 2 symmetric
    {3, 1, 1, 13, 5, 3, Conv2dParams::same(3), true},    // 1×1 spatial
    {1, 6, 6, 4, 7, 5, {1, 1, 2, 3, 0}, true},           // 5×5, asymmetric pads
};

void run_conv(Precision prec, DType src_t, DType dst_t, DType w_t, bool bf16_check) {
  auto be = make(prec);
  int idx = 0;
  for (const ConvCase& c : kConvCases) {
    SCOPED_TRACE(cat("conv case ", idx++));
    Tensor x = rnd({c.N, c.H, c.W, c.Ci}, 1 + idx);
    Tensor w = rnd({c.Co, c.Ci, c.k, c.k}, 100 + idx, -0.5f, 0.5f);
    Tensor b = c.bias ? rnd({c.Co}, 200 + idx) : Tensor();
    Tensor wq = w.to(w_t).to(DType::F32);  // the weights the backend actually sees
    Tensor xq = x.to(src_t).to(DType::F32);
    auto pw = be->prepare_conv2d(w.to(w_t), b, c.p);
    const int64_t Ho = out_dim(c.H, c.p.pad_top, c.p.pad_bottom, c.k, c.p.stride);
    const int64_t Wo = out_dim(c.W, c.p.pad_left, c.p.pad_right, c.k, c.p.stride);
    Tensor y = Tensor::empty({c.N, Ho, Wo, c.Co}, dst_t);
    be->conv2d(x.to(src_t), *pw, y);
    if (bf16_check) {
      expect_bf16(y, conv_ref(x, w, b, c.p), "conv2d");
    } else if (dst_t == DType::BF16) {
      Diff d = compare(y, conv_ref(xq, wq, b, c.p));
      EXPECT_LE(d.max_abs, 4e-3 * std::max(1.0, d.max_ref));  // one bf16 rounding of the output
    } else {
      expect_f32(y, conv_ref(xq, wq, b, c.p), "conv2d");
    }
  }
}

TEST(Conv2d, F32) { run_conv(Precision::F32, DType::F32, DType::F32, DType::F32, false); }
TEST(Conv2d, F32FromF16AndBf16Weights) {
  run_conv(Precision::F32, DType::F32, DType::F32, DType::F16, false);
  run_conv(Precision::F32, DType::F32, DType::F32, DType::BF16, false);
}
TEST(Conv2d, F32WithBf16Activations) {
  run_conv(Precision::F32, DType::BF16, DType::F32, DType::F32, false);
  run_conv(Precision::F32, DType::F32, DType::BF16, DType::F32, false);
}

#define REQUIRE_BF16(be)                                                                    \
  if ((be)->effective_precision() != Precision::BF16)                                      \
  GTEST_SKIP() << "bf16 compute not supported by this CPU (no AMX / AVX512-BF16)"

TEST(Conv2d, Bf16) {
  REQUIRE_BF16(make(Precision::BF16));
  run_conv(Precision::BF16, DType::F32, DType::F32, DType::F32, true);
  run_conv(Precision::BF16, DType::BF16, DType::BF16, DType::F16, true);
  run_conv(Precision::BF16, DType::BF16, DType::F32, DType::F32, true);
}

TEST(Conv2d, Bf16PicksFastKernel) {
  auto be = make(Precision::BF16);
  REQUIRE_BF16(be);
  auto pw = be->prepare_conv2d(rnd({64, 64, 3, 3}, 1), rnd({64}, 2), Conv2dParams::same(3));
  Tensor x = rnd({1, 16, 16, 64}, 3), y = Tensor::empty({1, 16, 16, 64});
  be->conv2d(x, *pw, y);
  std::string impl = CpuBackend::impl_info(*pw);
  std::printf("  conv2d bf16 impl: %s\n", impl.c_str());
  EXPECT_EQ(impl, be->last_impl("conv2d"));
  EXPECT_EQ(impl.find("gemm:jit"), std::string::npos) << impl;
  EXPECT_EQ(impl.find("ref"), std::string::npos) << impl;
  EXPECT_NE(impl.find("bf16"), std::string::npos) << impl;  // avx512_core_bf16 / amx_bf16 kernels
  auto lw = be->prepare_linear(rnd({320, 768}, 4), rnd({320}, 5));
  Tensor lx = rnd({2, 77, 768}, 6), ly = Tensor::empty({2, 77, 320});
  be->linear(lx, *lw, ly);
  Tensor a = rnd({4, 64, 40}, 7), b = rnd({4, 64, 40}, 8), c = Tensor::empty({4, 64, 64});
  be->matmul(a, b, c, true, 0.15f);
  for (const char* op : {"linear", "matmul"}) {
    std::string s = be->last_impl(op);
    std::printf("  %s bf16 impl: %s\n", op, s.c_str());
    EXPECT_EQ(s.find("gemm:jit"), std::string::npos) << op << ": " << s;
    EXPECT_EQ(s.find("ref"), std::string::npos) << op << ": " << s;
  }
  EXPECT_EQ(CpuBackend::impl_info(*lw), be->last_impl("linear"));
}

TEST(Conv2d, PrimitivesCachedPerShape) {
  auto be = make(Precision::F32);
  auto pw = be->prepare_conv2d(rnd({13, 5, 3, 3}, 1), rnd({13}, 2), Conv2dParams::same(3));
  Tensor x = rnd({2, 9, 7, 5}, 3), y = Tensor::empty({2, 9, 7, 13});
  be->conv2d(x, *pw, y);
  EXPECT_FALSE(CpuBackend::impl_info(*pw).empty());
  size_t n = CpuBackend::primitives_created();
  std::vector<double> first = vals(y);
  for (int i = 0; i < 3; ++i) be->conv2d(x, *pw, y);
  EXPECT_EQ(CpuBackend::primitives_created(), n);
  EXPECT_EQ(vals(y), first);
  Tensor x2 = rnd({1, 4, 4, 5}, 4), y2 = Tensor::empty({1, 4, 4, 13});
  be->conv2d(x2, *pw, y2);  // a new shape makes a new primitive
  EXPECT_GT(CpuBackend::primitives_created(), n);
  n = CpuBackend::primitives_created();
  be->conv2d(x, *pw, y);
  be->conv2d(x2, *pw, y2);
  EXPECT_EQ(CpuBackend::primitives_created(), n);
}

TEST(Conv2d, Errors) {
  auto be = make(Precision::F32);
  auto pw = be->prepare_conv2d(rnd({4, 4, 3, 3}, 1), Tensor(), Conv2dParams::same(3));
  Tensor y = Tensor::empty({2, 8, 8, 4});
  Tensor x5 = rnd({2, 8, 8, 5}, 2);
  try {
    be->conv2d(x5, *pw, y);
    ADD_FAILURE() << "no error for wrong channel count";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("conv2d: input f32[2, 8, 8, 5] has 5 channels"), std::string::npos)
        << e.what();
  }
  Tensor x = rnd({2, 8, 8, 4}, 3), ybad = Tensor::empty({2, 8, 8, 5});
  EXPECT_THROW(be->conv2d(x, *pw, ybad), Error);                          // wrong output shape
  Tensor x3 = rnd({8, 8, 4}, 4);
  EXPECT_THROW(be->conv2d(x3, *pw, y), Error);                            // rank mismatch
  Tensor yi = Tensor::empty({2, 8, 8, 4}, DType::I32);
  EXPECT_THROW(be->conv2d(x, *pw, yi), Error);                            // dtype
  EXPECT_THROW(be->prepare_conv2d(rnd({4, 4, 3}, 5), Tensor(), {}), Error);  // weight rank
  EXPECT_THROW(be->prepare_conv2d(rnd({4, 4, 3, 3}, 5), rnd({5}, 6), {}), Error);  // bias size
  auto lin = be->prepare_linear(rnd({4, 4}, 7), Tensor());
  EXPECT_THROW(be->conv2d(x, *lin, y), Error);                            // wrong weight kind
  Tensor tiny = rnd({1, 1, 1, 4}, 8), yt = Tensor::empty({1, 1, 1, 4});
  auto nopad = be->prepare_conv2d(rnd({4, 4, 3, 3}, 9), Tensor(), {});
  EXPECT_THROW(be->conv2d(tiny, *nopad, yt), Error);                      // input too small
}

// ---- linear / matmul ---------------------------------------------------------------------------

std::vector<double> linear_ref(const Tensor& x, const Tensor& w, const Tensor& b) {
  const int64_t O = w.dim(0), I = w.dim(1), M = x.numel() / I;
  std::vector<double> y(size_t(M * O));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < O; ++o) {
      double s = b.defined() ? b.f32()[o] : 0.0;
      for (int64_t i = 0; i < I; ++i) s += double(x.f32()[m * I + i]) * w.f32()[o * I + i];
      y[size_t(m * O + o)] = s;
    }
  return y;
}

void run_linear(Precision prec, DType src_t, DType dst_t, bool bf16_check) {
  auto be = make(prec);
  struct Case { Shape x; int64_t O; bool bias; };
  const Case cases[] = {{{3, 7, 37}, 13, true}, {{5, 16}, 5, false}, {{1, 77, 13}, 40, true}, {{1, 1}, 3, true}};
  int idx = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(cat("linear case ", idx++));
    const int64_t I = c.x[-1];
    Tensor x = rnd(c.x, 10 + idx), w = rnd({c.O, I}, 20 + idx, -0.5f, 0.5f);
    Tensor b = c.bias ? rnd({c.O}, 30 + idx) : Tensor();
    auto pw = be->prepare_linear(w.to(DType::F16), b);
    Tensor wq = w.to(DType::F16).to(DType::F32);
    Shape ys = c.x;
    ys[-1] = c.O;
    Tensor y = Tensor::empty(ys, dst_t);
    be->linear(x.to(src_t), *pw, y);
    if (bf16_check) expect_bf16(y, linear_ref(x, wq, b), "linear");
    else expect_f32(y, linear_ref(x.to(src_t).to(DType::F32), wq, b), "linear");
  }
}

TEST(Linear, F32) { run_linear(Precision::F32, DType::F32, DType::F32, false); }
TEST(Linear, F32WithBf16Input) { run_linear(Precision::F32, DType::BF16, DType::F32, false); }
TEST(Linear, Bf16) {
  REQUIRE_BF16(make(Precision::BF16));
  run_linear(Precision::BF16, DType::F32, DType::F32, true);
  run_linear(Precision::BF16, DType::BF16, DType::BF16, true);
}

// Each sample of a batch gets the bits it gets alone (dim 0 is the batch: [B, N, I] and [B, I]):
// what makes image i of a batch the image its seed draws alone. oneDNN's GEMMs sum a row in an
// order that depends on the matrix's row count (its AVX2 sgemm does), so the backend runs them per
// sample. Shapes where that was seen: [2, 64, 64], [2, 16, 96], [4, 320].
TEST(Linear, BatchSamplesEqualTheSameSamplesAlone) {
  for (Precision prec : {Precision::F32, Precision::BF16}) {
    auto be = make(prec);
    if (be->effective_precision() != prec) continue;  // bf16 not available here
    for (const Shape& xs : {Shape{2, 64, 64}, Shape{2, 16, 96}, Shape{3, 77, 40}, Shape{4, 320}, Shape{5, 33}}) {
      SCOPED_TRACE(cat("linear batch ", xs.str(), prec == Precision::BF16 ? " bf16" : " f32"));
      const int64_t I = xs[-1], O = I + 7;
      auto pw = be->prepare_linear(rnd({O, I}, 41, -0.5f, 0.5f), rnd({O}, 42));
      Tensor x = rnd(xs, 43);
      Shape ys = xs;
      ys[-1] = O;
      Tensor y = Tensor::empty(ys);
      be->linear(x, *pw, y);
      for (int64_t b = 0; b < xs[0]; ++b) {
        Shape s1 = ys;
        s1[0] = 1;
        Tensor one = Tensor::empty(s1);
        be->linear(x.slice0(b, b + 1).clone(), *pw, one);
        Tensor row = y.slice0(b, b + 1);
        int64_t differ = 0;
        for (int64_t i = 0; i < one.numel(); ++i) differ += one.f32()[i] != row.f32()[i];
        EXPECT_EQ(differ, 0) << "sample " << b << ": " << differ << " of " << one.numel() << " outputs differ";
      }
    }
  }
}

TEST(Linear, CachedAndErrors) {
  auto be = make(Precision::F32);
  auto pw = be->prepare_linear(rnd({13, 37}, 1), rnd({13}, 2));
  Tensor x = rnd({3, 7, 37}, 3), y = Tensor::empty({3, 7, 13});
  be->linear(x, *pw, y);
  size_t n = CpuBackend::primitives_created();
  be->linear(x, *pw, y);
  be->linear(x, *pw, y);
  EXPECT_EQ(CpuBackend::primitives_created(), n);
  EXPECT_FALSE(be->last_impl("linear").empty());
  Tensor xbad = rnd({3, 7, 36}, 4);
  EXPECT_THROW(be->linear(xbad, *pw, y), Error);            // wrong feature count
  Tensor ybad = Tensor::empty({3, 7, 12});
  EXPECT_THROW(be->linear(x, *pw, ybad), Error);            // wrong output width
  Tensor yrank = Tensor::empty({21, 13});
  EXPECT_THROW(be->linear(x, *pw, yrank), Error);           // rank mismatch
  EXPECT_THROW(be->prepare_linear(rnd({13, 37}, 5), rnd({12}, 6)), Error);
}

std::vector<double> matmul_ref(const Tensor& a, const Tensor& b, bool tb, float alpha) {
  const int64_t B = a.dim(0), M = a.dim(1), K = a.dim(2), N = tb ? b.dim(1) : b.dim(2);
  std::vector<double> c(size_t(B * M * N));
  for (int64_t z = 0; z < B; ++z)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += double(a.f32()[(z * M + m) * K + k]) *
               b.f32()[tb ? (z * N + n) * K + k : (z * K + k) * N + n];
        c[size_t((z * M + m) * N + n)] = alpha * s;
      }
  return c;
}

void run_matmul(Precision prec, DType src_t, DType dst_t, bool bf16_check) {
  auto be = make(prec);
  const int64_t B = 3, M = 7, K = 37, N = 13;
  for (bool tb : {false, true})
    for (float alpha : {1.0f, 0.125f, -1.7f}) {
      SCOPED_TRACE(cat("trans_b ", tb, " alpha ", alpha));
      Tensor a = rnd({B, M, K}, 1), b = tb ? rnd({B, N, K}, 2) : rnd({B, K, N}, 2);
      Tensor c = Tensor::empty({B, M, N}, dst_t);
      be->matmul(a.to(src_t), b.to(src_t), c, tb, alpha);
      if (bf16_check) expect_bf16(c, matmul_ref(a, b, tb, alpha), "matmul");
      else expect_f32(c, matmul_ref(a.to(src_t).to(DType::F32), b.to(src_t).to(DType::F32), tb, alpha), "matmul");
    }
}

TEST(Matmul, F32) { run_matmul(Precision::F32, DType::F32, DType::F32, false); }
TEST(Matmul, F32WithBf16Inputs) { run_matmul(Precision::F32, DType::BF16, DType::F32, false); }
TEST(Matmul, Bf16) {
  REQUIRE_BF16(make(Precision::BF16));
  run_matmul(Precision::BF16, DType::F32, DType::F32, true);
  run_matmul(Precision::BF16, DType::BF16, DType::BF16, true);
}

TEST(Matmul, CachedAndErrors) {
  auto be = make(Precision::F32);
  Tensor a = rnd({2, 5, 7}, 1), b = rnd({2, 7, 3}, 2), c = Tensor::empty({2, 5, 3});
  be->matmul(a, b, c, false, 0.5f);
  size_t n = CpuBackend::primitives_created();
  Tensor a2 = rnd({2, 5, 7}, 3);
  be->matmul(a2, b, c, false, 0.5f);  // same shape, new data: no new primitive
  EXPECT_EQ(CpuBackend::primitives_created(), n);
  expect_f32(c, matmul_ref(a2, b, false, 0.5f));
  EXPECT_FALSE(be->last_impl("matmul").empty());
  EXPECT_THROW(be->matmul(a, b, c, true, 1.0f), Error);  // b is [B, K, N], not [B, N, K]
  Tensor cbad = Tensor::empty({2, 5, 4});
  EXPECT_THROW(be->matmul(a, b, cbad, false, 1.0f), Error);
  Tensor a2d = rnd({5, 7}, 4);
  EXPECT_THROW(be->matmul(a2d, b, c, false, 1.0f), Error);
  Tensor b3 = rnd({3, 7, 3}, 5);
  EXPECT_THROW(be->matmul(a, b3, c, false, 1.0f), Error);  // batch mismatch
  EXPECT_THROW(be->last_impl("pool"), Error);
}

// ---- attention (wiring only; the kernels have their own tests) ----------------------------------

TEST(Attention, MatchesNaive) {
  auto be = make(Precision::F32);
  const int64_t B = 2, Nq = 5, Nk = 7, H = 2, D = 8;
  Tensor q = rnd({B, Nq, H * D}, 1), k = rnd({B, Nk, H * D}, 2), v = rnd({B, Nk, H * D}, 3);
  Tensor o = Tensor::empty({B, Nq, H * D});
  const float sc = 0.35f;
  be->attention(q, k, v, int(H), sc, o);
  std::vector<double> ref(size_t(o.numel()));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Nq; ++i) {
        std::vector<double> s(Nk);
        double mx = -1e300, sum = 0;
        for (int64_t j = 0; j < Nk; ++j) {
          double d = 0;
          for (int64_t e = 0; e < D; ++e)
            d += double(q.f32()[(b * Nq + i) * H * D + h * D + e]) * k.f32()[(b * Nk + j) * H * D + h * D + e];
          s[j] = d * sc;
          mx = std::max(mx, s[j]);
        }
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int64_t e = 0; e < D; ++e) {
          double acc = 0;
          for (int64_t j = 0; j < Nk; ++j) acc += s[j] / sum * v.f32()[(b * Nk + j) * H * D + h * D + e];
          ref[size_t((b * Nq + i) * H * D + h * D + e)] = acc;
        }
      }
  expect_f32(o, ref, "attention");
  EXPECT_THROW(be->attention(q, k, v, 3, sc, o), Error);  // 16 not divisible by 3 heads
  Tensor vbad = rnd({B, Nk + 1, H * D}, 4);
  EXPECT_THROW(be->attention(q, k, vbad, int(H), sc, o), Error);
}

// ---- normalisation -----------------------------------------------------------------------------

std::vector<double> group_norm_ref(const Tensor& x, const Tensor& g, const Tensor& b, int64_t G,
                                   double eps, bool silu) {
  const int64_t N = x.dim(0), C = x.dim(-1), S = x.numel() / (N * C), cg = C / G;
  const float* X = x.f32();
  std::vector<double> y(size_t(x.numel()));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t grp = 0; grp < G; ++grp) {
      double sum = 0, sq = 0;
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = grp * cg; c < (grp + 1) * cg; ++c) sum += X[(n * S + s) * C + c];
      const double mean = sum / double(S * cg);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = grp * cg; c < (grp + 1) * cg; ++c) {
          double d = X[(n * S + s) * C + c] - mean;
          sq += d * d;
        }
      const double rstd = 1.0 / std::sqrt(sq / double(S * cg) + eps);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t c = grp * cg; c < (grp + 1) * cg; ++c) {
          size_t i = size_t((n * S + s) * C + c);
          double v = (X[i] - mean) * rstd * g.f32()[c] + b.f32()[c];
          y[i] = silu ? v / (1.0 + std::exp(-v)) : v;
        }
    }
  return y;
}

TEST(GroupNorm, MatchesReference) {
  auto be = make(Precision::F32);
  struct Case { Shape s; int G; float offset; };
  // 32 groups over 64 channels (NHWC, odd spatial); 3 groups over 15; tokens [N, T, C]; a large
  // mean offset to catch a one-pass variance; a big spatial size to exercise the threaded path.
  const Case cases[] = {{{2, 5, 7, 64}, 32, 0.0f}, {{3, 3, 5, 15}, 3, 0.0f}, {{2, 9, 15}, 3, 0.0f},
                        {{1, 1, 1, 64}, 32, 0.0f}, {{2, 6, 6, 64}, 32, 100.0f}, {{1, 64, 64, 40}, 4, 3.0f}};
  int idx = 0;
  for (const Case& c : cases)
    for (bool silu : {false, true}) {
      SCOPED_TRACE(cat("case ", idx, " silu ", silu));
      Tensor x = rnd(c.s, 40 + idx, -2.0f + c.offset, 2.0f + c.offset);
      Tensor g = rnd({c.s[-1]}, 50 + idx, 0.5f, 1.5f), b = rnd({c.s[-1]}, 60 + idx);
      Tensor y = Tensor::empty(c.s);
      be->group_norm(x, g, b, c.G, 1e-6f, silu, y);
      expect_f32(y, group_norm_ref(x, g, b, c.G, 1e-6, silu));
      ++idx;
    }
  Tensor x = rnd({2, 4, 4, 15}, 1), y = Tensor::empty({2, 4, 4, 15});
  EXPECT_THROW(be->group_norm(x, rnd({15}, 2), rnd({15}, 3), 4, 1e-5f, false, y), Error);  // 15 % 4
  EXPECT_THROW(be->group_norm(x, rnd({16}, 2), rnd({15}, 3), 3, 1e-5f, false, y), Error);  // gamma
  Tensor ybad = Tensor::empty({2, 4, 4, 16});
  EXPECT_THROW(be->group_norm(x, rnd({15}, 2), rnd({15}, 3), 3, 1e-5f, false, ybad), Error);
}

// group_norm_stats / group_norm_apply (the tiled VAE's shared statistics) against plain double
// references: the statistics, the split op equal to the fused one, and given statistics applied.
TEST(GroupNorm, StatsAndApplyMatchReference) {
  auto be = make(Precision::F32);
  struct Case { Shape s; int G; float offset; };
  const Case cases[] = {{{2, 5, 7, 64}, 32, 0.0f}, {{3, 3, 5, 15}, 3, 0.0f}, {{2, 9, 15}, 5, 0.0f},
                        {{1, 1, 1, 64}, 32, 0.0f}, {{2, 6, 6, 64}, 32, 100.0f}, {{1, 64, 64, 40}, 4, 3.0f}};
  int idx = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(cat("case ", idx, " ", c.s.str(), " groups ", c.G));
    const int64_t N = c.s[0], C = c.s[-1], S = c.s.numel() / (N * C), cg = C / c.G;
    Tensor x = rnd(c.s, 70 + idx, -2.0f + c.offset, 2.0f + c.offset);
    Tensor g = rnd({C}, 80 + idx, 0.5f, 1.5f), b = rnd({C}, 90 + idx);
    Tensor mean = Tensor::empty({N, c.G}), var = Tensor::empty({N, c.G});
    be->group_norm_stats(x, c.G, mean, var);
    std::vector<double> rm, rv;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t grp = 0; grp < c.G; ++grp) {
        double sum = 0, sq = 0;
        for (int64_t s = 0; s < S; ++s)
          for (int64_t ch = grp * cg; ch < (grp + 1) * cg; ++ch) sum += x.f32()[(n * S + s) * C + ch];
        const double m = sum / double(S * cg);
        for (int64_t s = 0; s < S; ++s)
          for (int64_t ch = grp * cg; ch < (grp + 1) * cg; ++ch) {
            double d = x.f32()[(n * S + s) * C + ch] - m;
            sq += d * d;
          }
        rm.push_back(m);
        rv.push_back(sq / double(S * cg));
      }
    expect_f32(mean, rm, "mean");
    expect_f32(var, rv, "var");
    for (bool silu : {false, true}) {
      // Its own statistics: the split op is the fused one.
      Tensor y1 = Tensor::empty(c.s), y2 = Tensor::empty(c.s);
      be->group_norm(x, g, b, c.G, 1e-6f, silu, y1);
      be->group_norm_apply(x, mean, var, g, b, c.G, 1e-6f, silu, y2);
      expect_f32(y2, vals(y1), "apply(own stats) vs group_norm");
      // Other statistics: (x - m)/sqrt(v + eps)·g + b with the given m, v.
      Tensor m2 = rnd({N, c.G}, 100 + idx, -1.0f + c.offset, 1.0f + c.offset), v2 = rnd({N, c.G}, 110 + idx, 0.2f, 3.0f);
      Tensor y3 = Tensor::empty(c.s);
      be->group_norm_apply(x, m2, v2, g, b, c.G, 1e-3f, silu, y3);
      std::vector<double> ref(size_t(x.numel()));
      for (int64_t i = 0; i < x.numel(); ++i) {
        const int64_t n = i / (S * C), ch = i % C, k = n * c.G + ch / cg;
        double v = (x.f32()[i] - double(m2.f32()[k])) / std::sqrt(double(v2.f32()[k]) + 1e-3) * g.f32()[ch] + b.f32()[ch];
        ref[size_t(i)] = silu ? v / (1.0 + std::exp(-v)) : v;
      }
      expect_f32(y3, ref, "apply(given stats)");
    }
    ++idx;
  }
  // Shapes and values are checked.
  Tensor x = rnd({2, 4, 4, 15}, 1), y = Tensor::empty({2, 4, 4, 15});
  Tensor m = Tensor::zeros({2, 3}), v = Tensor::full({2, 3}, 1.0f), g = rnd({15}, 2), b = rnd({15}, 3);
  EXPECT_THROW(be->group_norm_stats(x, 4, m, v), Error);                     // 15 % 4
  Tensor m_bad = Tensor::zeros({1, 3});
  EXPECT_THROW(be->group_norm_stats(x, 3, m_bad, v), Error);                 // [1, 3] for N = 2
  EXPECT_THROW(be->group_norm_apply(x, m, m_bad, g, b, 3, 1e-5f, false, y), Error);
  Tensor v_neg = Tensor::full({2, 3}, -1.0f);
  EXPECT_THROW(be->group_norm_apply(x, m, v_neg, g, b, 3, 1e-5f, false, y), Error);  // negative variance
  Tensor ybad = Tensor::empty({2, 4, 4, 16});
  EXPECT_THROW(be->group_norm_apply(x, m, v, g, b, 3, 1e-5f, false, ybad), Error);
  EXPECT_NO_THROW(be->group_norm_apply(x, m, v, g, b, 3, 1e-5f, false, y));
}

TEST(LayerNorm, MatchesReference) {
  auto be = make(Precision::F32);
  Tensor x = rnd({3, 5, 37}, 1, 9.0f, 11.0f), g = rnd({37}, 2), b = rnd({37}, 3);
  Tensor y = Tensor::empty(x.shape());
  be->layer_norm(x, g, b, 1e-5f, y);
  std::vector<double> ref(size_t(x.numel()));
  for (int64_t r = 0; r < 15; ++r) {
    double m = 0, v = 0;
    for (int c = 0; c < 37; ++c) m += x.f32()[r * 37 + c];
    m /= 37;
    for (int c = 0; c < 37; ++c) v += std::pow(x.f32()[r * 37 + c] - m, 2);
    double rstd = 1.0 / std::sqrt(v / 37 + 1e-5);
    for (int c = 0; c < 37; ++c) ref[size_t(r * 37 + c)] = (x.f32()[r * 37 + c] - m) * rstd * g.f32()[c] + b.f32()[c];
  }
  expect_f32(y, ref);
  EXPECT_THROW(be->layer_norm(x, rnd({36}, 4), b, 1e-5f, y), Error);
}

TEST(Softmax, MatchesReference) {
  auto be = make(Precision::F32);
  Tensor x = rnd({3, 7, 13}, 1, -30.0f, 80.0f), y = Tensor::empty(x.shape());
  be->softmax(x, y);
  std::vector<double> ref(size_t(x.numel()));
  for (int64_t r = 0; r < 21; ++r) {
    double mx = -1e300, s = 0;
    for (int c = 0; c < 13; ++c) mx = std::max(mx, double(x.f32()[r * 13 + c]));
    for (int c = 0; c < 13; ++c) s += std::exp(x.f32()[r * 13 + c] - mx);
    for (int c = 0; c < 13; ++c) ref[size_t(r * 13 + c)] = std::exp(x.f32()[r * 13 + c] - mx) / s;
  }
  expect_f32(y, ref);
  Tensor ybad = Tensor::empty({3, 7, 12});
  EXPECT_THROW(be->softmax(x, ybad), Error);
}

// ---- elementwise -------------------------------------------------------------------------------

TEST(Unary, MatchesReference) {
  auto be = make(Precision::F32);
  Tensor x = rnd({3, 5, 37}, 1, -8.0f, 8.0f), y = Tensor::empty(x.shape());
  auto check = [&](Unary op, double (*f)(double)) {
    be->unary(op, x, y);
    std::vector<double> ref;
    for (double v : vals(x)) ref.push_back(f(v));
    expect_f32(y, ref);
  };
  check(Unary::SiLU, [](double v) { return v / (1 + std::exp(-v)); });
  check(Unary::GeluErf, [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); });
  check(Unary::GeluTanh, [](double v) {
    return 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
  });
  check(Unary::QuickGelu, [](double v) { return v / (1 + std::exp(-1.702 * v)); });
  Tensor big = rnd({1 << 16}, 2, -100.0f, 100.0f), yb = Tensor::empty(big.shape());  // threaded, extremes
  be->unary(Unary::SiLU, big, yb);
  std::vector<double> ref;
  for (double v : vals(big)) ref.push_back(v / (1 + std::exp(-v)));
  expect_f32(yb, ref);
}

// ReLU: max(x, 0) exactly (a NaN stays NaN, as in torch.relu), in place too, f32 and bf16 out.
TEST(Unary, ReLU) {
  auto be = make(Precision::F32);
  Tensor x = rnd({1 << 16}, 3, -5.0f, 5.0f), y = Tensor::empty(x.shape());  // threaded
  x.f32()[7] = NAN;
  x.f32()[8] = 0.0f;
  be->unary(Unary::ReLU, x, y);
  int64_t zeros = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float v = x.f32()[i], r = y.f32()[i];
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(r)) << i;
      continue;
    }
    ASSERT_EQ(r, v > 0.0f ? v : 0.0f) << "x[" << i << "] = " << v;
    zeros += r == 0.0f;
  }
  EXPECT_GT(zeros, x.numel() / 3);  // about half the inputs are negative
  Tensor z = x.clone();
  be->unary(Unary::ReLU, z, z);
  for (int64_t i = 0; i < 64; ++i) {
    if (std::isnan(x.f32()[i])) continue;
    EXPECT_EQ(z.f32()[i], x.f32()[i] > 0.0f ? x.f32()[i] : 0.0f) << i;
  }
  Tensor yb = Tensor::empty(x.shape(), DType::BF16);
  be->unary(Unary::ReLU, x, yb);
  const Tensor yf = yb.to(DType::F32);
  EXPECT_EQ(yf.f32()[0], Tensor::full({1}, y.f32()[0]).to(DType::BF16).to(DType::F32).f32()[0]);
  EXPECT_EQ(yf.f32()[8], 0.0f);
}

// LeakyReLU(0.2): x for x >= 0, x·0.2f (one f32 rounding) below; NaN stays NaN; in place; bf16 out.
TEST(Unary, LeakyRelu02) {
  auto be = make(Precision::F32);
  Tensor x = rnd({3, 7, 4099}, 5, -6.0f, 6.0f), y = Tensor::empty(x.shape());  // odd, threaded
  x.f32()[3] = NAN;
  x.f32()[4] = 0.0f;
  x.f32()[5] = -0.0f;
  be->unary(Unary::LeakyRelu02, x, y);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float v = x.f32()[i];
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(y.f32()[i])) << i;
      continue;
    }
    // PyTorch multiplies by the slope as the tensor's type: 0.2f, one rounding of the exact product
    ASSERT_EQ(y.f32()[i], v < 0.0f ? float(double(v) * double(0.2f)) : v) << "x[" << i << "] = " << v;
  }
  Tensor z = x.clone();
  be->unary(Unary::LeakyRelu02, z, z);
  EXPECT_EQ(std::memcmp(z.data(), y.data(), 64 * 4), 0);
  Tensor yb = Tensor::empty(x.shape(), DType::BF16);
  be->unary(Unary::LeakyRelu02, x, yb);
  EXPECT_EQ(std::memcmp(yb.data(), y.to(DType::BF16).data(), yb.bytes()), 0);
}

TEST(Geglu, MatchesReference) {
  auto be = make(Precision::F32);
  Tensor x = rnd({3, 5, 26}, 1, -4.0f, 4.0f), y = Tensor::empty({3, 5, 13});
  be->geglu(x, y);
  std::vector<double> ref;
  for (int64_t r = 0; r < 15; ++r)
    for (int c = 0; c < 13; ++c) {
      double h = x.f32()[r * 26 + c], g = x.f32()[r * 26 + 13 + c];
      ref.push_back(h * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0))));
    }
  expect_f32(y, ref);
  Tensor ybad = Tensor::empty({3, 5, 26});
  EXPECT_THROW(be->geglu(x, ybad), Error);
  Tensor odd = rnd({3, 5}, 2), yo = Tensor::empty({3, 2});
  EXPECT_THROW(be->geglu(odd, yo), Error);
}

// numpy broadcasting reference (b aligned at the last dim).
std::vector<double> binary_ref(Binary op, const Tensor& a, const Tensor& b) {
  const int r = a.rank(), rb = b.rank();
  std::vector<double> y(size_t(a.numel()));
  for (int64_t i = 0; i < a.numel(); ++i) {
    int64_t rem = i, bi = 0, bst = 1;
    for (int d = r - 1; d >= 0; --d) {
      int64_t idx = rem % a.dim(d);
      rem /= a.dim(d);
      int j = d - (r - rb);
      if (j >= 0) {
        if (b.dim(j) != 1) bi += idx * bst;
        bst *= b.dim(j);
      }
    }
    double av = a.f32()[i], bv = b.f32()[bi];
    y[size_t(i)] = op == Binary::Add ? av + bv : av * bv;
  }
  return y;
}

TEST(Binary, Broadcasting) {
  auto be = make(Precision::F32);
  const Shape as{3, 5, 7, 13};
  const Shape bshapes[] = {{3, 5, 7, 13}, {13}, {3, 1, 1, 13}, {1, 5, 1, 13}, {5, 7, 1}, {1}, {7, 13}, {3, 5, 7, 1}};
  int idx = 0;
  for (const Shape& bs : bshapes)
    for (Binary op : {Binary::Add, Binary::Mul}) {
      SCOPED_TRACE(cat("b ", bs.str(), " op ", int(op)));
      Tensor a = rnd(as, 1 + idx), b = rnd(bs, 100 + idx), y = Tensor::empty(as);
      be->binary(op, a, b, y);
      expect_f32(y, binary_ref(op, a, b));
      ++idx;
    }
  // tokens [N, T, C] + [N, 1, C]; in place; big enough to run threaded
  Tensor a = rnd({2, 4096, 40}, 7), b = rnd({2, 1, 40}, 8);
  std::vector<double> ref = binary_ref(Binary::Add, a, b);
  be->binary(Binary::Add, a, b, a);
  expect_f32(a, ref);
  Tensor y = Tensor::empty(as);
  Tensor bad1 = rnd({5, 13}, 9), bad2 = rnd({1, 1, 1, 1, 13}, 10), bad3 = rnd({3, 13}, 11);
  EXPECT_THROW(be->binary(Binary::Add, rnd(as, 1), bad1, y), Error);
  EXPECT_THROW(be->binary(Binary::Add, rnd(as, 1), bad2, y), Error);  // b has higher rank
  EXPECT_THROW(be->binary(Binary::Mul, rnd(as, 1), bad3, y), Error);
  Tensor ybad = Tensor::empty({3, 5, 7, 12});
  EXPECT_THROW(be->binary(Binary::Add, rnd(as, 1), rnd({13}, 2), ybad), Error);
}

TEST(Scale, MatchesReference) {
  auto be = make(Precision::F32);
  Tensor x = rnd({3, 37}, 1), y = Tensor::empty({3, 37});
  be->scale(x, -0.18215f, y);
  std::vector<double> ref;
  for (double v : vals(x)) ref.push_back(double(float(v * double(-0.18215f))));
  expect_f32(y, ref);
}

// ---- resampling / layout ------------------------------------------------------------------------

// PyTorch's pixel_unshuffle (NCHW: view(n, c, h, r, w, r).permute(0, 1, 3, 5, 2, 4)) in NHWC,
// on odd sizes, batch 2, r = 1..4; bf16 out; shape and alias errors.
TEST(PixelUnshuffle, MatchesReference) {
  auto be = make(Precision::F32);
  for (int r = 1; r <= 4; ++r) {
    const int64_t N = 2, C = 3, Ho = 5, Wo = 7;
    Tensor x = rnd({N, Ho * r, Wo * r, C}, uint32_t(20 + r)), y = Tensor::empty({N, Ho, Wo, C * r * r});
    be->pixel_unshuffle(x, r, y);
    std::vector<double> ref(size_t(y.numel()));
    // NCHW index of out[n, c·r² + i·r + j, h, w] is in[n, c, h·r + i, w·r + j]; stored NHWC.
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < r; ++i)
          for (int64_t j = 0; j < r; ++j)
            for (int64_t h = 0; h < Ho; ++h)
              for (int64_t w = 0; w < Wo; ++w) {
                const int64_t oc = (c * r + i) * r + j;
                ref[size_t(((n * Ho + h) * Wo + w) * C * r * r + oc)] =
                    x.f32()[((n * Ho * r + h * r + i) * Wo * r + w * r + j) * C + c];
              }
    std::vector<double> got = vals(y);
    EXPECT_EQ(got, ref) << "r = " << r;
  }
  Tensor x = rnd({1, 6, 4, 5}, 30), yb = Tensor::empty({1, 3, 2, 20}, DType::BF16), y = Tensor::empty({1, 3, 2, 20});
  be->pixel_unshuffle(x, 2, yb);
  be->pixel_unshuffle(x, 2, y);
  EXPECT_EQ(std::memcmp(yb.data(), y.to(DType::BF16).data(), yb.bytes()), 0);
  Tensor bad = Tensor::empty({1, 3, 2, 19});
  EXPECT_THROW(be->pixel_unshuffle(x, 2, bad), Error);
  Tensor odd = rnd({1, 5, 4, 5}, 31);
  EXPECT_THROW(be->pixel_unshuffle(odd, 2, y), Error);
  Tensor same = Tensor::empty({1, 6, 4, 5});
  EXPECT_THROW(be->pixel_unshuffle(x, 1, x), Error);  // aliasing
  be->pixel_unshuffle(x, 1, same);
  EXPECT_EQ(vals(same), vals(x));
}

TEST(UpsampleNearest, TwoXAndToSize) {
  auto be = make(Precision::F32);
  const std::pair<Shape, Shape> cases[] = {{{3, 2, 3, 5}, {3, 4, 6, 5}},   // 2×
                                           {{1, 2, 3, 13}, {1, 3, 6, 13}},  // 2→3, 3→6
                                           {{2, 3, 3, 4}, {2, 2, 7, 4}},    // down and odd up
                                           {{1, 1, 1, 3}, {1, 5, 4, 3}}};
  for (auto& [xs, ys] : cases) {
    SCOPED_TRACE(xs.str() + " -> " + ys.str());
    Tensor x = rnd(xs, 1), y = Tensor::empty(ys);
    be->upsample_nearest(x, y);
    std::vector<double> ref;
    for (int64_t n = 0; n < ys[0]; ++n)
      for (int64_t i = 0; i < ys[1]; ++i)
        for (int64_t j = 0; j < ys[2]; ++j)
          for (int64_t c = 0; c < ys[3]; ++c) {
            int64_t si = i * xs[1] / ys[1], sj = j * xs[2] / ys[2];
            ref.push_back(x.f32()[((n * xs[1] + si) * xs[2] + sj) * xs[3] + c]);
          }
    expect_f32(y, ref);
  }
  // PyTorch's 2× nearest of [[a, b]] is [[a, a, b, b]] (checked by value).
  Tensor x = Tensor::empty({1, 1, 2, 1});
  x.f32()[0] = 1, x.f32()[1] = 2;
  Tensor y = Tensor::empty({1, 2, 4, 1});
  be->upsample_nearest(x, y);
  EXPECT_EQ(vals(y), (std::vector<double>{1, 1, 2, 2, 1, 1, 2, 2}));
  Tensor ybad = Tensor::empty({1, 2, 4, 2});
  EXPECT_THROW(be->upsample_nearest(x, ybad), Error);
}

TEST(ConcatLast, MatchesReference) {
  auto be = make(Precision::F32);
  Tensor a = rnd({2, 3, 5}, 1), b = rnd({2, 3, 7}, 2), y = Tensor::empty({2, 3, 12});
  be->concat_last(a, b, y);
  std::vector<double> ref;
  for (int r = 0; r < 6; ++r) {
    for (int c = 0; c < 5; ++c) ref.push_back(a.f32()[r * 5 + c]);
    for (int c = 0; c < 7; ++c) ref.push_back(b.f32()[r * 7 + c]);
  }
  expect_f32(y, ref);
  Tensor ybad = Tensor::empty({2, 3, 11}), bbad = rnd({2, 4, 7}, 3);
  EXPECT_THROW(be->concat_last(a, b, ybad), Error);
  EXPECT_THROW(be->concat_last(a, bbad, y), Error);
}

// diffusers' get_timestep_embedding. The argument t·freq is formed in f32 exactly as PyTorch's
// f32 tensors do (exponent, division, exp, product each rounded to f32); sin/cos in double.
TEST(TimestepEmbedding, MatchesDiffusers) {
  auto be = make(Precision::F32);
  Tensor t = Tensor::empty({4});
  const float ts[] = {0.0f, 1.0f, 500.5f, 999.0f};
  for (int i = 0; i < 4; ++i) t.f32()[i] = ts[i];
  for (int dim : {320, 7})
    for (bool flip : {false, true})
      for (float shift : {0.0f, 1.0f}) {
        SCOPED_TRACE(cat("dim ", dim, " flip ", flip, " shift ", shift));
        Tensor y = Tensor::empty({4, dim});
        be->timestep_embedding(t, dim, flip, shift, 10000.0f, y);
        const int half = dim / 2;
        std::vector<double> ref;
        for (float tv : ts) {
          std::vector<double> s, c;
          for (int i = 0; i < half; ++i) {
            float e = float(-std::log(10000.0)) * float(i);
            e = e / (float(half) - shift);
            float arg = tv * float(std::exp(double(e)));
            s.push_back(std::sin(double(arg)));
            c.push_back(std::cos(double(arg)));
          }
          for (double v : flip ? c : s) ref.push_back(v);
          for (double v : flip ? s : c) ref.push_back(v);
          if (dim % 2) ref.push_back(0.0);
        }
        expect_f32(y, ref);
      }
  // t = 0: sin part 0, cos part 1 (flip puts cos first).
  Tensor y = Tensor::empty({4, 320});
  be->timestep_embedding(t, 320, true, 0.0f, 10000.0f, y);
  EXPECT_EQ(y.f32()[0], 1.0f);
  EXPECT_EQ(y.f32()[160], 0.0f);
  Tensor ybad = Tensor::empty({4, 321});
  EXPECT_THROW(be->timestep_embedding(t, 320, true, 0.0f, 10000.0f, ybad), Error);
}

TEST(Backend, PrecisionAndFactory) {
  auto be = make_cpu_backend(Precision::F32);
  EXPECT_EQ(be->name(), "cpu");
  EXPECT_EQ(be->effective_precision(), Precision::F32);
  auto b16 = make_cpu_backend(Precision::BF16);
  EXPECT_EQ(b16->precision(), Precision::BF16);
  EXPECT_EQ(b16->effective_precision(),
            cpu_features().bf16_fast() ? Precision::BF16 : Precision::F32);
  Tensor x = rnd({4}, 1), yi = Tensor::empty({4}, DType::F16);
  EXPECT_THROW(be->scale(x, 2.0f, yi), Error);  // kernels take f32 or bf16 (test_ops_bf16.cpp)
}

}  // namespace
