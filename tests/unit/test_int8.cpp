// Int8 weights (WeightFormat::Int8): symmetric per-output-channel quantisation of conv2d/linear
// weights, kept as int8 in the primitive's layout, converted to the compute type per call and
// scaled per output channel by a fused post-op. On odd shapes:
//  - the stored int8 values and scales (scale_o = max|w_o| / 127, all-zero channel -> scale 1, q 0,
//    |w - q·s| <= s/2), and no native copy is kept;
//  - outputs against a double reference of the same math, (x·q)·s + b (fp32 bound 1e-5; bf16
//    with the bf16-rounded input, so only the accumulation order differs), which catches a
//    wrong channel for a scale (the channels here have very different magnitudes);
//  - outputs against the unquantised weights, with the bound that follows from the rounding step,
//    and the statistics of the rounding errors on a large layer;
//  - bias, all-zero channels, the shared conversion buffer across layers and shapes, errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

using namespace diffuse;
using cpu::DnnlWeight;

namespace {

// Random weights [O, L...] whose output channels have magnitudes spread over 4 decades, one
// channel all zero (`zero_row`, if >= 0) and one channel with a single large outlier.
Tensor weights(const Shape& s, uint32_t seed, int64_t zero_row) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f), mag(-3.0f, 1.0f);
  const int64_t O = s[0], L = t.numel() / O;
  float* p = t.f32();
  for (int64_t o = 0; o < O; ++o) {
    const float m = std::pow(10.0f, mag(g));
    for (int64_t i = 0; i < L; ++i) p[o * L + i] = o == zero_row ? 0.0f : m * d(g);
  }
  const int64_t outlier = (zero_row + 1) % O;
  p[outlier * L + L / 2] *= 25.0f;
  return t;
}

Tensor rnd(const Shape& s, uint32_t seed) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(g);
  return t;
}

std::vector<double> vals(const Tensor& t) {
  Tensor f = t.dtype() == DType::F32 ? t : t.to(DType::F32);
  return std::vector<double>(f.f32(), f.f32() + f.numel());
}

// Values of t after rounding to `dt` and back (what a kernel computing in `dt` reads).
std::vector<double> rounded(const std::vector<double>& v, DType dt) {
  Tensor t = Tensor::empty({int64_t(v.size())});
  for (size_t i = 0; i < v.size(); ++i) t.f32()[i] = float(v[i]);
  return vals(t.to(dt));
}

const DnnlWeight& as_dnnl(const PreparedWeight& w) { return dynamic_cast<const DnnlWeight&>(w); }

// The stored int8 values ([O, L] row-major) as doubles.
std::vector<double> int8_weights(const DnnlWeight& w) {
  std::vector<int8_t> q = w.int8_values();
  return std::vector<double>(q.begin(), q.end());
}

// y and, per output element, Σ|x| and Σx² over its receptive field (for the quantisation bounds).
struct Ref {
  std::vector<double> y, absx, sqx;
};

int64_t out_dim(int64_t in, int lo, int hi, int64_t k, int s) { return (in + lo + hi - k) / s + 1; }

// x: [N, H, W, Ci] values; w: [Co, Ci, k, k] values; bias: [Co] or empty.
Ref conv_ref(const Shape& xs, const std::vector<double>& X, const Shape& ws, const std::vector<double>& Wt,
             const std::vector<double>& b, const Conv2dParams& p) {
  const int64_t N = xs[0], H = xs[1], W = xs[2], Ci = xs[3], Co = ws[0], kh = ws[2], kw = ws[3];
  const int64_t Ho = out_dim(H, p.pad_top, p.pad_bottom, kh, p.stride), Wo = out_dim(W, p.pad_left, p.pad_right, kw, p.stride);
  Ref r;
  r.y.resize(size_t(N * Ho * Wo * Co));
  r.absx.resize(r.y.size());
  r.sqx.resize(r.y.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox)
        for (int64_t o = 0; o < Co; ++o) {
          double s = b.empty() ? 0.0 : b[size_t(o)], a = 0, a2 = 0;
          for (int64_t ky = 0; ky < kh; ++ky)
            for (int64_t kx = 0; kx < kw; ++kx) {
              int64_t iy = oy * p.stride - p.pad_top + ky, ix = ox * p.stride - p.pad_left + kx;
              if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
              for (int64_t i = 0; i < Ci; ++i) {
                double xv = X[size_t(((n * H + iy) * W + ix) * Ci + i)];
                s += xv * Wt[size_t(((o * Ci + i) * kh + ky) * kw + kx)];
                a += std::fabs(xv);
                a2 += xv * xv;
              }
            }
          size_t at = size_t(((n * Ho + oy) * Wo + ox) * Co + o);
          r.y[at] = s;
          r.absx[at] = a;
          r.sqx[at] = a2;
        }
  return r;
}

// x: [M, I]; w: [O, I].
Ref linear_ref(int64_t M, int64_t I, int64_t O, const std::vector<double>& X, const std::vector<double>& Wt,
               const std::vector<double>& b) {
  Ref r;
  r.y.resize(size_t(M * O));
  r.absx.resize(r.y.size());
  r.sqx.resize(r.y.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < O; ++o) {
      double s = b.empty() ? 0.0 : b[size_t(o)], a = 0, a2 = 0;
      for (int64_t i = 0; i < I; ++i) {
        const double xv = X[size_t(m * I + i)];
        s += xv * Wt[size_t(o * I + i)];
        a += std::fabs(xv), a2 += xv * xv;
      }
      r.y[size_t(m * O + o)] = s, r.absx[size_t(m * O + o)] = a, r.sqx[size_t(m * O + o)] = a2;
    }
  return r;
}

// The int8 layer's math from the reference of x·q (no bias): y = (x·q)·s_o + b_o.
Ref scaled(Ref r, int64_t O, const std::vector<float>& scales, const std::vector<double>& bias) {
  for (size_t i = 0; i < r.y.size(); ++i) {
    const size_t o = i % size_t(O);
    r.y[i] = r.y[i] * scales[o] + (bias.empty() ? 0.0 : bias[o]);
  }
  return r;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}


// Checks one int8 layer's output `got` ([..., O], channel = index % O) against
//  (1) `deq`: the reference of the int8 math, (x̃·q)·s + b with x̃ the input as the kernel reads
//      it (rounded to bf16 for bf16 compute; q is exact in bf16). max|Δ| <= 1e-5·max(1, max|ref|)
//      (f32 accumulation, as test_ops' fp32 bound) for both compute types.
//  (2) `orig`: the reference with the unquantised weights and unrounded inputs. Each weight moved
//      by at most s_o/2, so |Δy| <= s_o/2 · Σ|x| over the receptive field, exactly; plus the
//      compute error: fp32 1e-5·max(1, max|ref|); bf16 1e-2·max|ref| (test_ops' bf16 bound, from
//      rounding inputs and weights to 8 significant bits).
//      Also printed: the error energy Σ(Δy)² over the energy predicted for independent rounding
//      errors uniform in ±s/2, Σ s_o²/12 · Σx² (asserted on a large layer in
//      RoundingErrorsAreUniform; these small cases have too few weights for a tight bound).
void check(const char* what, const Tensor& got_t, int64_t O, const Ref& deq, const Ref& orig,
           const std::vector<float>& scales, bool bf16, int64_t zero_row) {
  std::vector<double> got = vals(got_t);
  ASSERT_EQ(got.size(), deq.y.size());
  const double ref_max = max_abs(deq.y), orig_max = max_abs(orig.y);
  double worst_deq = 0, worst_ratio = 0, energy = 0, predicted = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(got[i] - deq.y[i]);
    worst_deq = std::max(worst_deq, d);
    ASSERT_TRUE(std::isfinite(got[i])) << what << " [" << i << "]";
    const double q_bound = scales[i % size_t(O)] / 2 * orig.absx[i];
    const double slack = bf16 ? 1e-2 * orig_max : 1e-5 * std::max(1.0, orig_max);
    const double e = std::fabs(got[i] - orig.y[i]);
    const double so = scales[i % size_t(O)];
    energy += e * e;
    if (int64_t(i % size_t(O)) != zero_row) predicted += so * so / 12 * orig.sqx[i];  // zero channel: exact
    worst_ratio = std::max(worst_ratio, e / (q_bound + slack));
    ASSERT_LE(e, q_bound + slack) << what << " [" << i << "] vs unquantised weights, channel " << i % size_t(O);
  }
  std::printf("  %-26s max|Δ| vs int8 math %.2e (bound %.2e); vs unquantised: worst Δ/bound %.3f, "
              "error energy / predicted %.3f\n",
              what, worst_deq, 1e-5 * std::max(1.0, ref_max), worst_ratio, energy / predicted);
  EXPECT_LE(worst_deq, 1e-5 * std::max(1.0, ref_max)) << what;

}

std::unique_ptr<CpuBackend> make(Precision p) { return std::make_unique<CpuBackend>(p, WeightFormat::Int8); }

#define REQUIRE_BF16(be)                                                                    \
  if ((be)->effective_precision() != Precision::BF16)                                      \
  GTEST_SKIP() << "bf16 compute not supported by this CPU (no AMX / AVX512-BF16)"

struct ConvCase {
  int64_t N, H, W, Ci, Co, k;
  Conv2dParams p;
  bool bias;
  int64_t zero_row;
};

const ConvCase kConvCases[] = {
    {3, 7, 5, 5, 13, 1, {1, 0, 0, 0, 0}, true, 4},            // 1×1, batch 3
    {2, 9, 9, 13, 37, 3, Conv2dParams::same(3), true, 36},    // 3×3, last channel zero
    {1, 9, 7, 5, 13, 3, {2, 0, 0, 1, 1}, false, 0},           // stride 2, asymmetric pad, no bias
    {1, 7, 11, 37, 5, 3, Conv2dParams::same(3, 2), true, 2},  // stride 2
    {1, 6, 6, 4, 7, 5, {1, 1, 2, 3, 0}, true, -1},            // 5×5, no zero channel
};

void run_conv(Precision prec, DType w_t) {
  auto be = make(prec);
  const bool bf16 = be->effective_precision() == Precision::BF16;
  const DType cdt = bf16 ? DType::BF16 : DType::F32;
  int idx = 0;
  for (const ConvCase& c : kConvCases) {
    SCOPED_TRACE(cat("conv case ", idx++, " weights ", dtype_name(w_t)));
    Tensor x = rnd({c.N, c.H, c.W, c.Ci}, 10 + idx);
    Tensor w = weights({c.Co, c.Ci, c.k, c.k}, 100 + idx, c.zero_row).to(w_t);
    Tensor b = c.bias ? rnd({c.Co}, 200 + idx) : Tensor();
    auto pw = be->prepare_conv2d(w, b, c.p);
    const DnnlWeight& dw = as_dnnl(*pw);
    ASSERT_TRUE(dw.is_int8());
    const int64_t Ho = out_dim(c.H, c.p.pad_top, c.p.pad_bottom, c.k, c.p.stride);
    const int64_t Wo = out_dim(c.W, c.p.pad_left, c.p.pad_right, c.k, c.p.stride);
    Tensor y = Tensor::empty({c.N, Ho, Wo, c.Co});
    be->conv2d(x, *pw, y);
    std::vector<double> bias = c.bias ? vals(b) : std::vector<double>();
    Ref deq = scaled(conv_ref(x.shape(), rounded(vals(x), cdt), w.shape(), int8_weights(dw), {}, c.p), c.Co,
                     dw.scales(), bias);
    Ref orig = conv_ref(x.shape(), vals(x), w.shape(), vals(w), bias, c.p);
    check(bf16 ? "conv2d int8 (bf16 compute)" : "conv2d int8 (fp32 compute)", y, c.Co, deq, orig, dw.scales(), bf16, c.zero_row);
    if (c.zero_row >= 0) {  // an all-zero channel outputs exactly its bias (or 0)
      std::vector<double> got = vals(y);
      for (size_t i = size_t(c.zero_row); i < got.size(); i += size_t(c.Co))
        ASSERT_EQ(got[i], c.bias ? double(b.f32()[c.zero_row]) : 0.0) << "zero channel, element " << i;
    }
  }
}

struct LinearCase {
  Shape x;
  int64_t O;
  bool bias;
  int64_t zero_row;
};

const LinearCase kLinearCases[] = {
    {{3, 5, 37}, 29, true, 7},
    {{1, 77}, 13, false, 12},
    {{2, 64, 40}, 120, true, 0},
};

void run_linear(Precision prec, DType w_t) {
  auto be = make(prec);
  const bool bf16 = be->effective_precision() == Precision::BF16;
  const DType cdt = bf16 ? DType::BF16 : DType::F32;
  int idx = 0;
  for (const LinearCase& c : kLinearCases) {
    SCOPED_TRACE(cat("linear case ", idx++, " weights ", dtype_name(w_t)));
    const int64_t I = c.x[-1];
    Tensor x = rnd(c.x, 30 + idx);
    Tensor w = weights({c.O, I}, 300 + idx, c.zero_row).to(w_t);
    Tensor b = c.bias ? rnd({c.O}, 400 + idx) : Tensor();
    auto pw = be->prepare_linear(w, b);
    const DnnlWeight& dw = as_dnnl(*pw);
    Shape ys = c.x;
    ys[-1] = c.O;
    Tensor y = Tensor::empty(ys);
    be->linear(x, *pw, y);
    const int64_t M = x.numel() / I;
    std::vector<double> bias = c.bias ? vals(b) : std::vector<double>();
    Ref deq = scaled(linear_ref(M, I, c.O, rounded(vals(x), cdt), int8_weights(dw), {}), c.O, dw.scales(), bias);
    Ref orig = linear_ref(M, I, c.O, vals(x), vals(w), bias);
    check(bf16 ? "linear int8 (bf16 compute)" : "linear int8 (fp32 compute)", y, c.O, deq, orig, dw.scales(), bf16, c.zero_row);
    std::vector<double> got = vals(y);
    for (size_t i = size_t(c.zero_row); i < got.size(); i += size_t(c.O))
      ASSERT_EQ(got[i], c.bias ? double(b.f32()[c.zero_row]) : 0.0) << "zero channel, element " << i;
  }
}

}  // namespace

TEST(Int8Weights, BackendReportsFormat) {
  auto be = make_cpu_backend(Precision::F32, WeightFormat::Int8);
  EXPECT_EQ(be->weight_format(), WeightFormat::Int8);
  EXPECT_EQ(make_cpu_backend(Precision::F32)->weight_format(), WeightFormat::Native);
  EXPECT_STREQ(weight_format_name(WeightFormat::Int8), "int8");
}

// The stored values: per output channel (dim 0 of [O, I, kh, kw] and of [O, I]) scale = max|w|/127,
// the largest weight maps to ±127, every weight is within s/2 of q·s, zero channels get s = 1, q = 0;
// and only int8 + scales are kept (no reordered native copy).
TEST(Int8Weights, PerOutputChannelQuantisation) {
  auto be = make(Precision::F32);
  for (bool conv : {true, false}) {
    SCOPED_TRACE(conv ? "conv" : "linear");
    const int64_t O = 11, zero_row = 3;
    Tensor w = conv ? weights({O, 7, 3, 3}, 5, zero_row) : weights({O, 23}, 6, zero_row);
    auto pw = conv ? be->prepare_conv2d(w, Tensor(), Conv2dParams::same(3)) : be->prepare_linear(w, Tensor());
    const DnnlWeight& dw = as_dnnl(*pw);
    ASSERT_TRUE(dw.is_int8());
    const std::vector<int8_t> values = dw.int8_values();
    ASSERT_EQ(values.size(), size_t(w.numel()));
    ASSERT_EQ(dw.scales().size(), size_t(O));
    EXPECT_EQ(dw.weight_layouts(), 0u);
    EXPECT_GE(dw.int8_bytes(), size_t(w.numel()));  // blocked layouts may pad small layers
    const int64_t L = w.numel() / O;
    for (int64_t o = 0; o < O; ++o) {
      const float* row = w.f32() + o * L;
      const int8_t* q = values.data() + o * L;
      float amax = 0;
      int qmax = 0;
      for (int64_t i = 0; i < L; ++i) amax = std::max(amax, std::fabs(row[i])), qmax = std::max(qmax, std::abs(int(q[i])));
      const float s = dw.scales()[size_t(o)];
      if (o == zero_row) {
        EXPECT_EQ(s, 1.0f);
        EXPECT_EQ(qmax, 0);
        continue;
      }
      EXPECT_FLOAT_EQ(s, amax / 127.0f) << "channel " << o;
      EXPECT_EQ(qmax, 127) << "channel " << o;
      for (int64_t i = 0; i < L; ++i)
        ASSERT_LE(std::fabs(double(row[i]) - double(q[i]) * s), 0.5 * s * (1 + 1e-6)) << "channel " << o << " [" << i << "]";
    }
  }
}

// SD-sized layers (channels multiples of 64) are stored in exactly one byte per weight, before
// and after the first call moves them into the primitive's layout.
TEST(Int8Weights, OneBytePerWeight) {
  for (Precision prec : {Precision::F32, Precision::BF16}) {
    auto be = make(prec);
    auto conv = be->prepare_conv2d(weights({128, 64, 3, 3}, 1, -1), rnd({128}, 2), Conv2dParams::same(3));
    auto lin = be->prepare_linear(weights({1280, 320}, 3, -1), rnd({1280}, 4));
    for (int pass = 0; pass < 2; ++pass) {
      EXPECT_EQ(as_dnnl(*conv).int8_bytes(), size_t(128 * 64 * 9)) << precision_name(prec) << " pass " << pass;
      EXPECT_EQ(as_dnnl(*lin).int8_bytes(), size_t(1280 * 320)) << precision_name(prec) << " pass " << pass;
      Tensor x = rnd({2, 16, 16, 64}, 5), y = Tensor::empty({2, 16, 16, 128});
      be->conv2d(x, *conv, y);
      Tensor xl = rnd({2, 77, 320}, 6), yl = Tensor::empty({2, 77, 1280});
      be->linear(xl, *lin, yl);
    }
  }
}

// One layer called with many input shapes and output types: the first shape's layout is the
// stored one (no conversion reorder); shapes whose primitive wants another layout go through a
// converting reorder (counted by int8_relayouts()). Every result matches the int8 math.
TEST(Int8Weights, ManyShapesOneLayer) {
  for (Precision prec : {Precision::F32, Precision::BF16}) {
    auto be = make(prec);
    const bool bf16 = be->effective_precision() == Precision::BF16;
    SCOPED_TRACE(precision_name(be->effective_precision()));
    Tensor w = weights({64, 48, 3, 3}, 7, 5), b = rnd({64}, 8);
    auto pw = be->prepare_conv2d(w, b, Conv2dParams::same(3));
    const DnnlWeight& dw = as_dnnl(*pw);
    int idx = 0;
    for (int64_t hw : {16, 1, 2, 3, 9, 40}) {
      for (DType yt : {DType::F32, DType::BF16}) {
        SCOPED_TRACE(cat("hw ", hw, " y ", dtype_name(yt)));
        Tensor x = rnd({1, hw, hw, 48}, 20 + idx++), y = Tensor::empty({1, hw, hw, 64}, yt);
        be->conv2d(x, *pw, y);
        if (hw == 16 && yt == DType::F32) {
          EXPECT_EQ(dw.int8_relayouts(), 0u);  // the first shape set the stored layout
        }
        Ref deq = scaled(conv_ref(x.shape(), rounded(vals(x), bf16 ? DType::BF16 : DType::F32), w.shape(),
                                  int8_weights(dw), {}, Conv2dParams::same(3)),
                         64, dw.scales(), vals(b));
        std::vector<double> got = vals(y);
        double maxd = 0;
        for (size_t i = 0; i < got.size(); ++i) maxd = std::max(maxd, std::fabs(got[i] - deq.y[i]));
        // f32 output: the f32 bound; bf16 output: plus one bf16 rounding (2^-8 relative).
        const double bound = (yt == DType::F32 ? 1e-5 : 4e-3) * std::max(1.0, max_abs(deq.y));
        EXPECT_LE(maxd, bound);
      }
    }
    std::printf("  %s: %zu layouts besides the stored one over 6 shapes × 2 output types\n",
                precision_name(be->effective_precision()), dw.int8_relayouts());
  }
}

TEST(Int8Weights, Conv2dF32) {
  run_conv(Precision::F32, DType::F32);
  run_conv(Precision::F32, DType::F16);
}

TEST(Int8Weights, Conv2dBf16) {
  REQUIRE_BF16(make(Precision::BF16));
  run_conv(Precision::BF16, DType::F32);
  run_conv(Precision::BF16, DType::BF16);
}

TEST(Int8Weights, LinearF32) {
  run_linear(Precision::F32, DType::F32);
  run_linear(Precision::F32, DType::F16);
}

TEST(Int8Weights, LinearBf16) {
  REQUIRE_BF16(make(Precision::BF16));
  run_linear(Precision::BF16, DType::F32);
  run_linear(Precision::BF16, DType::F16);
}

// One dequantisation buffer serves every layer: interleaving layers and input shapes (each with
// its own primitive) must give the same results as running each alone, and steady-state calls
// create no primitives.
TEST(Int8Weights, SharedBufferAcrossLayersAndShapes) {
  for (Precision prec : {Precision::F32, Precision::BF16}) {
    auto be = make(prec);
    SCOPED_TRACE(precision_name(be->effective_precision()));
    auto big = be->prepare_conv2d(weights({48, 32, 3, 3}, 1, 5), rnd({48}, 2), Conv2dParams::same(3));
    auto small = be->prepare_conv2d(weights({32, 48, 1, 1}, 3, 7), Tensor(), Conv2dParams{});
    auto lin = be->prepare_linear(weights({40, 32}, 4, 0), rnd({40}, 5));
    Tensor x1 = rnd({1, 6, 5, 32}, 6), x2 = rnd({2, 3, 3, 32}, 7), xl = rnd({9, 32}, 8);
    Tensor y1 = Tensor::empty({1, 6, 5, 48}), y2 = Tensor::empty({2, 3, 3, 48});
    Tensor s1 = Tensor::empty({1, 6, 5, 32}), yl = Tensor::empty({9, 40});
    be->conv2d(x1, *big, y1);
    const std::vector<double> first1 = vals(y1);
    be->conv2d(y1, *small, s1);
    const std::vector<double> firsts = vals(s1);
    be->linear(xl, *lin, yl);
    const std::vector<double> firstl = vals(yl);
    be->conv2d(x2, *big, y2);
    const std::vector<double> first2 = vals(y2);
    const size_t n = CpuBackend::primitives_created();
    for (int rep = 0; rep < 2; ++rep) {
      be->linear(xl, *lin, yl);
      be->conv2d(x2, *big, y2);
      be->conv2d(y1, *small, s1);
      be->conv2d(x1, *big, y1);
      EXPECT_EQ(vals(y1), first1);
      EXPECT_EQ(vals(y2), first2);
      EXPECT_EQ(vals(s1), firsts);
      EXPECT_EQ(vals(yl), firstl);
    }
    EXPECT_EQ(CpuBackend::primitives_created(), n);
  }
}

// Native and int8 backends agree to within the quantisation bound on the same layer (and are
// not identical: the int8 path really quantises).
TEST(Int8Weights, DiffersFromNativeOnlyByQuantisation) {
  auto native = std::make_unique<CpuBackend>(Precision::F32);
  auto q8 = make(Precision::F32);
  Tensor w = weights({21, 9, 3, 3}, 9, -1), b = rnd({21}, 10), x = rnd({2, 5, 6, 9}, 11);
  auto pn = native->prepare_conv2d(w, b, Conv2dParams::same(3));
  auto pq = q8->prepare_conv2d(w, b, Conv2dParams::same(3));
  Tensor yn = Tensor::empty({2, 5, 6, 21}), yq = Tensor::empty({2, 5, 6, 21});
  native->conv2d(x, *pn, yn);
  q8->conv2d(x, *pq, yq);
  std::vector<double> a = vals(yn), c = vals(yq);
  Ref r = conv_ref(x.shape(), vals(x), w.shape(), vals(w), vals(b), Conv2dParams::same(3));
  double maxd = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    maxd = std::max(maxd, std::fabs(a[i] - c[i]));
    EXPECT_LE(std::fabs(a[i] - c[i]), as_dnnl(*pq).scales()[i % 21] / 2 * r.absx[i] + 2e-5 * std::max(1.0, max_abs(a)));
  }
  EXPECT_GT(maxd, 0.0);
}

TEST(Int8Weights, NonFiniteWeightIsAnError) {
  auto be = make(Precision::F32);
  Tensor w = rnd({6, 4}, 1);
  w.f32()[4 * 4 + 2] = INFINITY;
  try {
    be->prepare_linear(w, Tensor());
    ADD_FAILURE() << "no error for an infinite weight";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("prepare_linear: weight f32[6, 4] has a non-finite value in output channel 4"),
              std::string::npos)
        << e.what();
  }
}

// Statistics of the run-time error on a layer with many weights (96 × 512, channels of 4
// magnitudes 0.01..0.04, 1024 input rows, fp32 compute): rounding to nearest leaves errors e
// uniform in ±s/2, independent across weights, so E[(Δy)²] = Σ_i x_i² · s_o²/12 per output. The
// cross terms Σ_{i≠j} e_i e_j Σ_m x_mi x_mj have relative std √(2/M) ≈ 4.4% per channel, ≈ 0.5%
// over 96 channels (measured 0.9925 to 1.0017 over 5 seeds); assert [0.95, 1.05]. Truncation
// (errors in [0, s): s²/3) would give 4, a scale off by 2 gives 4 or 0.25.
TEST(Int8Weights, RoundingErrorsAreUniform) {
  auto be = make(Precision::F32);
  const int64_t O = 96, I = 512, M = 1024;
  Tensor w = rnd({O, I}, 21);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i) w.f32()[o * I + i] *= 0.01f * float(1 + o % 4);
  Tensor x = rnd({M, I}, 22), y = Tensor::empty({M, O});
  auto pw = be->prepare_linear(w, Tensor());
  be->linear(x, *pw, y);
  Ref r = linear_ref(M, I, O, vals(x), vals(w), {});
  std::vector<double> got = vals(y);
  double energy = 0, predicted = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double s = as_dnnl(*pw).scales()[i % size_t(O)];
    energy += (got[i] - r.y[i]) * (got[i] - r.y[i]);
    predicted += s * s / 12 * r.sqx[i];
  }
  std::printf("  error energy / predicted (uniform rounding) = %.4f\n", energy / predicted);
  EXPECT_GE(energy / predicted, 0.95);
  EXPECT_LE(energy / predicted, 1.05);
}
