// The CPU backend's own ops (norms, softmax, activations, elementwise, resampling, concat) with
// bf16 activations: every input and output f32 or bf16 independently. Each op is checked
//  - against a double-precision reference computed from the (bf16-rounded) inputs, element by
//    element, with the bound derived at `bound()` below;
//  - for exactness of the contract "compute in f32, round once on store": a bf16 output is
//    bit-for-bit diffuse::f32_to_bf16 of the same op's f32 output, and a bf16 input gives the
//    same bits as its f32 widening;
//  - in place (same dtype) where the op allows it, and for the dtype errors.
// Odd shapes throughout: channel counts 5/13/37, several group counts, 1×1 spatial, batch 3.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/kernels.h"
#include "core/error.h"
#include "core/threads.h"

using namespace diffuse;

namespace {

constexpr DType kTypes[] = {DType::F32, DType::BF16};

Tensor rnd(const Shape& s, uint32_t seed, float lo = -1.0f, float hi = 1.0f, DType t = DType::F32) {
  Tensor f = Tensor::empty(s, DType::F32);
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < f.numel(); ++i) f.f32()[i] = d(g);
  return t == DType::F32 ? f : f.to(t);
}

// Element values as double (exact for f32 and bf16).
std::vector<double> vals(const Tensor& t) {
  Tensor f = t.dtype() == DType::F32 ? t : t.to(DType::F32);
  return std::vector<double>(f.f32(), f.f32() + f.numel());
}

const char* dn(DType t) { return dtype_name(t); }

// The error bound, per element. The ops compute in f32 and round the result once to the output
// dtype.
//  - f32 compute: the value v the kernel computes is within t of the exact result ref of the
//    (already rounded) inputs, where t = 1e-5·max(1, max|ref|) is the bound test_ops.cpp holds
//    the f32 kernels to (float arithmetic, the fast exp/erf polynomials).
//  - bf16 output: bf16 has 8 significant bits, so rounding to nearest moves v by at most half an
//    ulp, i.e. by at most 2^-8·|v| ≤ 2^-8·(|ref| + t).
//  So |got - ref| ≤ t + 2^-8·(|ref| + t) for a bf16 output, and ≤ t for an f32 one. The inputs
//  the reference uses are the bf16 values the kernel read, so input rounding is not an error.
//  Truncating instead of rounding errs by up to 2^-7·|v| and breaks this on random data.
double bound(double ref, double t, DType out) {
  return out == DType::BF16 ? t + std::ldexp(std::abs(ref) + t, -8) : t;
}

// Returns the worst |got - ref| / bound (≤ 1 passes).
double expect_close(const Tensor& got, const std::vector<double>& ref, const std::string& what) {
  std::vector<double> g = vals(got);
  EXPECT_EQ(g.size(), ref.size()) << what;
  double mx = 0;
  for (double r : ref) mx = std::max(mx, std::abs(r));
  const double t = 1e-5 * std::max(1.0, mx);
  double worst = 0;
  int bad = 0;
  for (size_t i = 0; i < std::min(g.size(), ref.size()); ++i) {
    const double b = bound(ref[i], t, got.dtype());
    const double err = std::abs(g[i] - ref[i]);
    worst = std::max(worst, std::isfinite(g[i]) ? err / b : INFINITY);
    if (!(err <= b) && bad++ < 3)
      ADD_FAILURE() << what << ": element " << i << " got " << g[i] << ", reference " << ref[i]
                    << ", |Δ| " << err << " > bound " << b;
  }
  return worst;
}

// y_bf16 == f32_to_bf16(y_f32), bit for bit.
void expect_rounded(const Tensor& yb, const Tensor& yf, const std::string& what) {
  ASSERT_EQ(yb.dtype(), DType::BF16);
  ASSERT_EQ(yf.dtype(), DType::F32);
  ASSERT_EQ(yb.numel(), yf.numel());
  int bad = 0;
  for (int64_t i = 0; i < yb.numel(); ++i) {
    const uint16_t want = f32_to_bf16(yf.f32()[i]), got = yb.data<uint16_t>()[i];
    if (got != want && bad++ < 3)
      ADD_FAILURE() << what << ": element " << i << " is bf16 0x" << std::hex << got
                    << ", f32 result " << std::dec << yf.f32()[i] << " rounds to 0x" << std::hex
                    << want;
  }
}

void expect_same_bits(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.dtype(), b.dtype());
  ASSERT_EQ(a.bytes(), b.bytes());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.bytes()), 0) << what;
}

// The same bits, except that a NaN matches any NaN (which NaN an operation on two NaN operands
// returns depends on operand order, which IEEE 754 leaves open and vector code may swap).
void expect_same_values(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.dtype(), b.dtype());
  ASSERT_EQ(a.numel(), b.numel());
  const std::vector<double> va = vals(a), vb = vals(b);
  int bad = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    const size_t w = dtype_size(a.dtype());
    const bool same = std::memcmp(static_cast<const char*>(a.data()) + i * w, static_cast<const char*>(b.data()) + i * w, w) == 0;
    if (!same && !(std::isnan(va[i]) && std::isnan(vb[i])) && bad++ < 3)
      ADD_FAILURE() << what << ": element " << i << " is " << va[i] << " vs " << vb[i];
  }
}

using Op = std::function<void(const Tensor& x, Tensor& y)>;
using Ref = std::function<std::vector<double>(const std::vector<double>& x)>;

// One-input op: every (input, output) dtype pair against the reference, plus the exactness
// checks. x32 holds the source values (rounded to bf16 for a bf16 input).
void check_op(const std::string& what, const Tensor& x32, const Shape& ys, const Op& op,
              const Ref& ref) {
  double worst[2][2] = {};
  for (DType xt : kTypes) {
    const Tensor x = x32.to(xt);
    const std::vector<double> r = ref(vals(x));
    Tensor yf = Tensor::empty(ys, DType::F32), yb = Tensor::empty(ys, DType::BF16);
    op(x, yf);
    op(x, yb);
    const std::string tag = what + " " + dn(xt) + " -> ";
    worst[xt == DType::BF16][0] = expect_close(yf, r, tag + "f32");
    worst[xt == DType::BF16][1] = expect_close(yb, r, tag + "bf16");
    expect_rounded(yb, yf, tag + "bf16 vs rounded f32");
    if (xt == DType::BF16) {  // reading bf16 = reading its f32 widening
      Tensor yw = Tensor::empty(ys, DType::F32);
      op(x.to(DType::F32), yw);
      expect_same_bits(yf, yw, what + " bf16 input vs its f32 widening");
    }
  }
  std::printf("  %-34s worst |Δ|/bound  f32->f32 %.3f  f32->bf16 %.3f  bf16->f32 %.3f  bf16->bf16 %.3f\n",
              what.c_str(), worst[0][0], worst[0][1], worst[1][0], worst[1][1]);
}

// In place (y == x, one dtype) gives the out-of-place bits.
void check_in_place(const std::string& what, const Tensor& x32, const Op& op) {
  for (DType t : kTypes) {
    Tensor x = x32.to(t), y = Tensor::empty(x.shape(), t);
    op(x, y);
    op(x, x);
    expect_same_bits(x, y, what + " in place, " + dn(t));
  }
}

std::unique_ptr<CpuBackend> make() { return std::make_unique<CpuBackend>(Precision::F32); }

double silu(double v) { return v / (1.0 + std::exp(-v)); }

// ---- group norm ------------------------------------------------------------------------------

// x: [N, S..., C] values; group statistics in double.
void gn_stats_ref(const std::vector<double>& x, const Shape& s, int64_t G, std::vector<double>& mean,
                  std::vector<double>& var) {
  const int64_t N = s[0], C = s[-1], S = s.numel() / (N * C), cg = C / G;
  mean.assign(size_t(N * G), 0.0);
  var.assign(size_t(N * G), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0, sq = 0;
      for (int64_t i = 0; i < S; ++i)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sum += x[size_t((n * S + i) * C + c)];
      const double m = sum / double(S * cg);
      for (int64_t i = 0; i < S; ++i)
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) sq += std::pow(x[size_t((n * S + i) * C + c)] - m, 2);
      mean[size_t(n * G + g)] = m;
      var[size_t(n * G + g)] = sq / double(S * cg);
    }
}

std::vector<double> gn_apply_ref(const std::vector<double>& x, const Shape& s, int64_t G,
                                 const std::vector<double>& mean, const std::vector<double>& var,
                                 const Tensor& gamma, const Tensor& beta, double eps, bool fuse_silu) {
  const int64_t N = s[0], C = s[-1], S = s.numel() / (N * C), cg = C / G;
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const int64_t n = int64_t(i) / (S * C), c = int64_t(i) % C, k = n * G + c / cg;
    double v = (x[i] - mean[size_t(k)]) / std::sqrt(var[size_t(k)] + eps) * gamma.f32()[c] + beta.f32()[c];
    y[i] = fuse_silu ? silu(v) : v;
  }
  return y;
}

struct GnCase {
  Shape s;
  int G;
  float offset;
};
// 5 channels in 5 groups, 13 in 1 group, 37 in 37 groups, 1×1 spatial, tokens [N, T, C], batch 3,
// a large mean offset, and a [1, 64, 64, 40] case big enough to run threaded.
const GnCase kGnCases[] = {{{2, 3, 5, 5}, 5, 0.0f},     {{3, 7, 5, 13}, 1, 0.0f},  {{1, 3, 3, 37}, 37, 0.0f},
                           {{2, 1, 1, 64}, 32, 0.0f},   {{3, 9, 15}, 3, 0.0f},     {{2, 6, 6, 64}, 32, 50.0f},
                           {{1, 64, 64, 40}, 4, 3.0f}};

TEST(OpsBf16, GroupNorm) {
  auto be = make();
  int idx = 0;
  for (const GnCase& c : kGnCases) {
    const int64_t C = c.s[-1];
    Tensor x32 = rnd(c.s, 10 + idx, -2.0f + c.offset, 2.0f + c.offset);
    Tensor g = rnd({C}, 20 + idx, 0.5f, 1.5f), b = rnd({C}, 30 + idx);
    for (bool fs : {false, true}) {
      const std::string what = cat("group_norm ", c.s.str(), "/", c.G, fs ? " silu" : "");
      check_op(what, x32, c.s,
               [&](const Tensor& x, Tensor& y) { be->group_norm(x, g, b, c.G, 1e-6f, fs, y); },
               [&](const std::vector<double>& x) {
                 std::vector<double> m, v;
                 gn_stats_ref(x, c.s, c.G, m, v);
                 return gn_apply_ref(x, c.s, c.G, m, v, g, b, 1e-6, fs);
               });
      check_in_place(what, x32, [&](const Tensor& x, Tensor& y) { be->group_norm(x, g, b, c.G, 1e-6f, fs, y); });
    }
    ++idx;
  }
}

TEST(OpsBf16, GroupNormStatsAndApply) {
  auto be = make();
  int idx = 0;
  for (const GnCase& c : kGnCases) {
    const int64_t N = c.s[0], C = c.s[-1];
    Tensor x32 = rnd(c.s, 40 + idx, -2.0f + c.offset, 2.0f + c.offset);
    Tensor g = rnd({C}, 50 + idx, 0.5f, 1.5f), b = rnd({C}, 60 + idx);
    // Statistics of a bf16 input are those of its values (f32 outputs: bound t).
    Tensor xb = x32.to(DType::BF16);
    Tensor mean = Tensor::empty({N, c.G}), var = Tensor::empty({N, c.G});
    be->group_norm_stats(xb, c.G, mean, var);
    std::vector<double> rm, rv;
    gn_stats_ref(vals(xb), c.s, c.G, rm, rv);
    const std::string what = cat("group_norm_apply ", c.s.str(), "/", c.G);
    EXPECT_LE(expect_close(mean, rm, what + " mean of bf16"), 1.0);
    EXPECT_LE(expect_close(var, rv, what + " var of bf16"), 1.0);
    // The split op with its own (f32-rounded) statistics is group_norm, for either output dtype.
    const std::vector<double> own = gn_apply_ref(vals(xb), c.s, c.G, rm, rv, g, b, 1e-6, true);
    for (DType yt : kTypes) {
      Tensor y = Tensor::empty(c.s, yt);
      be->group_norm_apply(xb, mean, var, g, b, c.G, 1e-6f, true, y);
      EXPECT_LE(expect_close(y, own, what + " own stats, bf16 -> " + dn(yt)), 1.0);
    }
    // Given statistics.
    Tensor m2 = rnd({N, c.G}, 70 + idx, -1.0f + c.offset, 1.0f + c.offset), v2 = rnd({N, c.G}, 80 + idx, 0.2f, 3.0f);
    const std::vector<double> m2v = vals(m2), v2v = vals(v2);
    for (bool fs : {false, true}) {
      auto op = [&](const Tensor& x, Tensor& y) { be->group_norm_apply(x, m2, v2, g, b, c.G, 1e-3f, fs, y); };
      check_op(what + (fs ? " silu" : ""), x32, c.s, op, [&](const std::vector<double>& x) {
        return gn_apply_ref(x, c.s, c.G, m2v, v2v, g, b, 1e-3, fs);
      });
      check_in_place(what, x32, op);
    }
    ++idx;
  }
}

// ---- layer norm, softmax ---------------------------------------------------------------------

TEST(OpsBf16, LayerNorm) {
  auto be = make();
  const Shape shapes[] = {{3, 5, 37}, {2, 13}, {1, 1, 5}, {2, 77, 320}};
  int idx = 0;
  for (const Shape& s : shapes) {
    const int64_t C = s[-1];
    Tensor x32 = rnd(s, 1 + idx, 9.0f, 11.0f), g = rnd({C}, 2 + idx), b = rnd({C}, 3 + idx);
    auto op = [&](const Tensor& x, Tensor& y) { be->layer_norm(x, g, b, 1e-5f, y); };
    check_op(cat("layer_norm ", s.str()), x32, s, op, [&](const std::vector<double>& x) {
      std::vector<double> y(x.size());
      for (size_t r = 0; r < x.size() / size_t(C); ++r) {
        double m = 0, v = 0;
        for (int64_t c = 0; c < C; ++c) m += x[r * C + c];
        m /= double(C);
        for (int64_t c = 0; c < C; ++c) v += std::pow(x[r * C + c] - m, 2);
        const double rstd = 1.0 / std::sqrt(v / double(C) + 1e-5);
        for (int64_t c = 0; c < C; ++c) y[r * C + c] = (x[r * C + c] - m) * rstd * g.f32()[c] + b.f32()[c];
      }
      return y;
    });
    check_in_place("layer_norm", x32, op);
    ++idx;
  }
}

TEST(OpsBf16, Softmax) {
  auto be = make();
  const Shape shapes[] = {{3, 7, 13}, {2, 5}, {1, 1}, {8, 77, 77}};
  int idx = 0;
  for (const Shape& s : shapes) {
    const int64_t C = s[-1];
    Tensor x32 = rnd(s, 5 + idx, -30.0f, 80.0f);
    auto op = [&](const Tensor& x, Tensor& y) { be->softmax(x, y); };
    check_op(cat("softmax ", s.str()), x32, s, op, [&](const std::vector<double>& x) {
      std::vector<double> y(x.size());
      for (size_t r = 0; r < x.size() / size_t(C); ++r) {
        double mx = -1e300, sum = 0;
        for (int64_t c = 0; c < C; ++c) mx = std::max(mx, x[r * C + c]);
        for (int64_t c = 0; c < C; ++c) sum += std::exp(x[r * C + c] - mx);
        for (int64_t c = 0; c < C; ++c) y[r * C + c] = std::exp(x[r * C + c] - mx) / sum;
      }
      return y;
    });
    check_in_place("softmax", x32, op);
    ++idx;
  }
}

// ---- elementwise -------------------------------------------------------------------------------

TEST(OpsBf16, UnaryAndScale) {
  auto be = make();
  struct U {
    Unary op;
    const char* name;
    double (*f)(double);
  };
  const U ops[] = {
      {Unary::SiLU, "silu", [](double v) { return silu(v); }},
      {Unary::GeluErf, "gelu_erf", [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }},
      {Unary::GeluTanh, "gelu_tanh",
       [](double v) { return 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); }},
      {Unary::QuickGelu, "quick_gelu", [](double v) { return v / (1 + std::exp(-1.702 * v)); }},
  };
  // An odd small shape and one big enough to run threaded, with extreme values.
  const std::pair<Shape, float> cases[] = {{{3, 5, 37}, 8.0f}, {{1 << 16}, 100.0f}, {{1, 1, 1, 5}, 4.0f}};
  int idx = 0;
  for (auto& [s, range] : cases) {
    Tensor x32 = rnd(s, 7 + idx++, -range, range);
    for (const U& u : ops) {
      auto op = [&](const Tensor& x, Tensor& y) { be->unary(u.op, x, y); };
      check_op(cat(u.name, " ", s.str()), x32, s, op, [&](const std::vector<double>& x) {
        std::vector<double> y;
        for (double v : x) y.push_back(u.f(v));
        return y;
      });
      check_in_place(u.name, x32, op);
    }
    const float k = -0.18215f;
    auto op = [&](const Tensor& x, Tensor& y) { be->scale(x, k, y); };
    check_op(cat("scale ", s.str()), x32, s, op, [&](const std::vector<double>& x) {
      std::vector<double> y;
      for (double v : x) y.push_back(v * double(k));
      return y;
    });
    check_in_place("scale", x32, op);
  }
}

TEST(OpsBf16, Geglu) {
  auto be = make();
  const std::pair<Shape, Shape> cases[] = {{{3, 5, 26}, {3, 5, 13}}, {{2, 74}, {2, 37}}, {{1, 1, 10}, {1, 1, 5}},
                                           {{2, 256, 640}, {2, 256, 320}}};
  int idx = 0;
  for (auto& [xs, ys] : cases) {
    const int64_t C = ys[-1];
    Tensor x32 = rnd(xs, 11 + idx++, -4.0f, 4.0f);
    check_op(cat("geglu ", xs.str()), x32, ys, [&](const Tensor& x, Tensor& y) { be->geglu(x, y); },
             [&](const std::vector<double>& x) {
               std::vector<double> y;
               for (size_t r = 0; r < x.size() / size_t(2 * C); ++r)
                 for (int64_t c = 0; c < C; ++c) {
                   const double h = x[r * 2 * C + c], g = x[r * 2 * C + C + c];
                   y.push_back(h * 0.5 * g * (1 + std::erf(g / std::sqrt(2.0))));
                 }
               return y;
             });
  }
}

// numpy broadcasting reference (b aligned at the last dim).
std::vector<double> binary_ref(Binary op, const Tensor& a, const Tensor& b) {
  const std::vector<double> av = vals(a), bv = vals(b);
  const int r = a.rank(), rb = b.rank();
  std::vector<double> y(av.size());
  for (int64_t i = 0; i < a.numel(); ++i) {
    int64_t rem = i, bi = 0, bst = 1;
    for (int d = r - 1; d >= 0; --d) {
      const int64_t idx = rem % a.dim(d);
      rem /= a.dim(d);
      const int j = d - (r - rb);
      if (j >= 0) {
        if (b.dim(j) != 1) bi += idx * bst;
        bst *= b.dim(j);
      }
    }
    y[size_t(i)] = op == Binary::Add ? av[size_t(i)] + bv[size_t(bi)] : av[size_t(i)] * bv[size_t(bi)];
  }
  return y;
}

// Every (a, b, y) dtype triple, same-shape and broadcast b, threaded; in place y == a.
TEST(OpsBf16, BinaryMixedAndBroadcast) {
  auto be = make();
  const Shape as{3, 5, 7, 13};
  const Shape bshapes[] = {{3, 5, 7, 13}, {13}, {3, 1, 1, 13}, {1, 5, 1, 13}, {5, 7, 1}, {1}, {3, 5, 7, 1}};
  int idx = 0;
  double worst = 0;
  for (const Shape& bs : bshapes)
    for (Binary op : {Binary::Add, Binary::Mul}) {
      const Tensor a32 = rnd(as, 1 + idx, -3.0f, 3.0f), b32 = rnd(bs, 100 + idx, -3.0f, 3.0f);
      ++idx;
      for (DType at : kTypes)
        for (DType bt : kTypes) {
          const Tensor a = a32.to(at), b = b32.to(bt);
          const std::vector<double> ref = binary_ref(op, a, b);
          Tensor yf = Tensor::empty(as, DType::F32), yb = Tensor::empty(as, DType::BF16);
          be->binary(op, a, b, yf);
          be->binary(op, a, b, yb);
          const std::string what = cat(op == Binary::Add ? "add" : "mul", " a ", dn(at), " b ", dn(bt),
                                       bs.str(), " -> ");
          worst = std::max(worst, expect_close(yf, ref, what + "f32"));
          worst = std::max(worst, expect_close(yb, ref, what + "bf16"));
          expect_rounded(yb, yf, what + "bf16 vs rounded f32");
          // in place: y == a
          Tensor ai = a.clone();
          be->binary(op, ai, b, ai);
          expect_same_bits(ai, at == DType::F32 ? yf : yb, what + "in place");
        }
    }
  std::printf("  binary (all dtype triples)          worst |Δ|/bound %.3f\n", worst);
  // tokens [N, T, C] + [N, 1, C], big enough to run threaded, bf16 a/y with an f32 b.
  for (DType bt : kTypes) {
    Tensor a = rnd({2, 4096, 40}, 7, -1, 1, DType::BF16), b = rnd({2, 1, 40}, 8, -1, 1, bt);
    const std::vector<double> ref = binary_ref(Binary::Add, a, b);
    be->binary(Binary::Add, a, b, a);
    EXPECT_LE(expect_close(a, ref, cat("threaded in-place add, b ", dn(bt))), 1.0);
  }
}

// ---- resampling, concat: pure copies (exact for a matching dtype, rounded once otherwise) ------

TEST(OpsBf16, UpsampleNearest) {
  auto be = make();
  const std::pair<Shape, Shape> cases[] = {{{3, 2, 3, 5}, {3, 4, 6, 5}}, {{1, 2, 3, 13}, {1, 3, 6, 13}},
                                           {{2, 3, 3, 37}, {2, 2, 7, 37}}, {{1, 1, 1, 3}, {1, 5, 4, 3}},
                                           {{1, 32, 32, 64}, {1, 64, 64, 64}}};
  for (auto& [xs, ys] : cases) {
    Tensor x32 = rnd(xs, 3);
    check_op(cat("upsample_nearest ", xs.str(), "->", ys.str()), x32, ys,
             [&](const Tensor& x, Tensor& y) { be->upsample_nearest(x, y); },
             [&](const std::vector<double>& x) {
               std::vector<double> ref;
               for (int64_t n = 0; n < ys[0]; ++n)
                 for (int64_t i = 0; i < ys[1]; ++i)
                   for (int64_t j = 0; j < ys[2]; ++j)
                     for (int64_t c = 0; c < ys[3]; ++c)
                       ref.push_back(x[size_t(((n * xs[1] + i * xs[1] / ys[1]) * xs[2] + j * xs[2] / ys[2]) * xs[3] + c)]);
               return ref;
             });
  }
}

TEST(OpsBf16, ConcatLast) {
  auto be = make();
  const std::pair<Shape, Shape> cases[] = {{{2, 3, 5}, {2, 3, 13}}, {{1, 1, 37}, {1, 1, 5}}, {{2, 1024, 64}, {2, 1024, 37}}};
  for (auto& [as, bs] : cases) {
    Shape ys = as;
    ys[-1] = as[-1] + bs[-1];
    const Tensor a32 = rnd(as, 1), b32 = rnd(bs, 2);
    for (DType at : kTypes)
      for (DType bt : kTypes) {
        const Tensor a = a32.to(at), b = b32.to(bt);
        const std::vector<double> av = vals(a), bv = vals(b);
        std::vector<double> ref;
        for (int64_t r = 0; r < a.numel() / as[-1]; ++r) {
          for (int64_t c = 0; c < as[-1]; ++c) ref.push_back(av[size_t(r * as[-1] + c)]);
          for (int64_t c = 0; c < bs[-1]; ++c) ref.push_back(bv[size_t(r * bs[-1] + c)]);
        }
        Tensor yf = Tensor::empty(ys, DType::F32), yb = Tensor::empty(ys, DType::BF16);
        be->concat_last(a, b, yf);
        be->concat_last(a, b, yb);
        EXPECT_EQ(vals(yf), ref) << "concat_last " << dn(at) << " " << dn(bt);  // exact
        expect_rounded(yb, yf, cat("concat_last ", dn(at), " ", dn(bt), " -> bf16"));
      }
  }
}

// ---- rounding at the bit level --------------------------------------------------------------------

// f32 -> bf16 stores round to nearest even and keep NaN a NaN, exactly as diffuse::f32_to_bf16:
// ties both ways, values that round up into the next binade or to infinity, subnormals, signed
// zeros, NaNs with payloads, then random bit patterns. Through a pure copy (upsample_nearest 1:1) and the
// bulk converter the conv/matmul paths use.
TEST(OpsBf16, RoundingMatchesScalarConversion) {
  std::vector<uint32_t> bits = {0x3f808000u,  // 1 + 2^-8: a tie, rounds down to even 1.0
                                0x3f818000u,  // 1 + 3·2^-8: a tie, rounds up to even
                                0x3f807fffu, 0x3f808001u, 0xbf808000u, 0xbf818000u,
                                0x3fffffffu,  // rounds up into the next binade (2.0)
                                0x7f7fffffu,  // FLT_MAX: rounds to +inf
                                0xff7fffffu, 0x7f7f7fffu, 0x7f800000u, 0xff800000u,
                                0x00000000u, 0x80000000u, 0x00000001u, 0x00008000u, 0x00018000u,
                                0x807fffffu, 0x7fc00000u, 0xffc00000u, 0x7f800001u,  // signalling NaN
                                0x7fbfffffu, 0xff800001u, 0x7fffffffu, 0x7f80ffffu};
  std::mt19937 g(42);
  for (int i = 0; i < 40000; ++i) bits.push_back(uint32_t(g()));
  const int64_t n = int64_t(bits.size());
  Tensor a = Tensor::empty({1, 1, n, 1}), y = Tensor::empty({1, 1, n, 1}, DType::BF16);
  std::memcpy(a.data(), bits.data(), size_t(n) * 4);
  make()->upsample_nearest(a, y);  // 1:1, a plain converting copy
  std::vector<uint16_t> bulk(static_cast<size_t>(n));
  cpu::f32_to_bf16(a.f32(), bulk.data(), n);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    float f;
    std::memcpy(&f, &bits[size_t(i)], 4);
    const uint16_t want = f32_to_bf16(f);
    if ((y.data<uint16_t>()[i] != want || bulk[size_t(i)] != want) && bad++ < 5)
      ADD_FAILURE() << std::hex << "f32 0x" << bits[size_t(i)] << ": op gives 0x" << y.data<uint16_t>()[i]
                    << ", bulk 0x" << bulk[size_t(i)] << ", want 0x" << want;
  }
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);  // the tie cases really are ties
  EXPECT_EQ(y.data<uint16_t>()[0], 0x3f80);
  EXPECT_EQ(y.data<uint16_t>()[1], 0x3f82);
  EXPECT_EQ(y.data<uint16_t>()[7], 0x7f80);  // FLT_MAX -> inf
  // NaN stays NaN through arithmetic kernels too.
  Tensor x = Tensor::full({3}, NAN), yb = Tensor::empty({3}, DType::BF16);
  make()->unary(Unary::SiLU, x, yb);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(std::isnan(bf16_to_f32(yb.data<uint16_t>()[i])));
}

// ---- the two compiled copies of the kernels -----------------------------------------------------

// The baseline (SSE2), AVX2 and AVX-512 copies give the same bits (up to which NaN), for every op
// and dtype pair, on odd sizes (vector remainders) and threaded sizes, with NaN, ±inf, subnormals
// and -0 among the inputs. Each copy the CPU supports is compared with the baseline.
TEST(OpsBf16, KernelIsasAgree) {
  std::vector<cpu::KernelIsa> wide;
  for (cpu::KernelIsa isa : {cpu::KernelIsa::Avx2, cpu::KernelIsa::Avx512})
    if (cpu::kernel_isa_supported(isa)) wide.push_back(isa);
  if (wide.empty()) GTEST_SKIP() << "no AVX2 or AVX-512: only the baseline kernels run here";
  struct Restore {
    cpu::KernelIsa saved = cpu::kernel_isa();
    ~Restore() { cpu::set_kernel_isa(saved); }
  } restore;
  auto be = make();
  using Run = std::function<Tensor()>;
  std::vector<std::pair<std::string, Run>> runs;
  const Shape shapes[] = {{3, 5, 7, 37}, {1, 64, 64, 40}};
  int idx = 0;
  for (const Shape& s : shapes) {
    const int64_t C = s[-1], N = s[0];
    Tensor x32 = rnd(s, 200 + idx, -6.0f, 6.0f);
    const float special[] = {NAN, INFINITY, -INFINITY, 1e-40f, -0.0f, 3.0e38f, -1e-45f};
    for (size_t i = 0; i < std::size(special); ++i) x32.f32()[i * 13 + 1] = special[i];
    Tensor g = rnd({C}, 300 + idx, 0.5f, 1.5f), b = rnd({C}, 400 + idx);
    Tensor m = rnd({N, 1}, 500 + idx), v = rnd({N, 1}, 600 + idx, 0.5f, 2.0f);
    Tensor half = rnd(Shape{s[0], s[1], s[2], C / 2 + 1}, 700 + idx);
    Shape gs = s;
    gs[-1] = 2 * C;
    Tensor gx32 = rnd(gs, 900 + idx, -6.0f, 6.0f);
    for (size_t i = 0; i < std::size(special); ++i) gx32.f32()[i * 29 + 3] = special[i];
    Shape us = s;
    us[1] = s[1] * 2 - 1;
    for (DType xt : kTypes)
      for (DType yt : kTypes) {
        const Tensor x = x32.to(xt), bx = rnd({C}, 800 + idx, -1, 1, xt == DType::F32 ? DType::BF16 : DType::F32);
        const std::string tag = cat(s.str(), " ", dn(xt), " -> ", dn(yt));
        auto out = [=](const Shape& sh) { return Tensor::empty(sh, yt); };
        for (bool fs : {false, true})
          runs.push_back({"group_norm " + tag, [=, &be] { Tensor y = out(s); be->group_norm(x, g, b, 1, 1e-6f, fs, y); return y; }});
        runs.push_back({"group_norm_stats " + tag, [=, &be] {
                          Tensor mean = Tensor::empty({N, 1}), var = Tensor::empty({N, 1}), y = Tensor::empty({2, N});
                          be->group_norm_stats(x, 1, mean, var);
                          std::memcpy(y.f32(), mean.f32(), size_t(N) * 4);
                          std::memcpy(y.f32() + N, var.f32(), size_t(N) * 4);
                          return y;
                        }});
        runs.push_back({"group_norm_apply " + tag, [=, &be] { Tensor y = out(s); be->group_norm_apply(x, m, v, g, b, 1, 1e-5f, true, y); return y; }});
        runs.push_back({"layer_norm " + tag, [=, &be] { Tensor y = out(s); be->layer_norm(x, g, b, 1e-5f, y); return y; }});
        runs.push_back({"softmax " + tag, [=, &be] { Tensor y = out(s); be->softmax(x, y); return y; }});
        for (Unary op : {Unary::SiLU, Unary::GeluErf, Unary::GeluTanh, Unary::QuickGelu})
          runs.push_back({cat("unary ", int(op), " ", tag), [=, &be] { Tensor y = out(s); be->unary(op, x, y); return y; }});
        runs.push_back({"scale " + tag, [=, &be] { Tensor y = out(s); be->scale(x, 0.37f, y); return y; }});
        const Tensor xg = gx32.to(xt);
        runs.push_back({"geglu " + tag, [=, &be] { Tensor y = out(s); be->geglu(xg, y); return y; }});
        for (Binary op : {Binary::Add, Binary::Mul}) {
          runs.push_back({cat("binary same ", int(op), " ", tag), [=, &be] { Tensor y = out(s); be->binary(op, x, x32, y); return y; }});
          runs.push_back({cat("binary [C] ", int(op), " ", tag), [=, &be] { Tensor y = out(s); be->binary(op, x, bx, y); return y; }});
        }
        runs.push_back({"upsample_nearest " + tag, [=, &be] { Tensor y = out(us); be->upsample_nearest(x, y); return y; }});
        runs.push_back({"concat_last " + tag, [=, &be] {
                          Shape cs = s;
                          cs[-1] = C + half.dim(-1);
                          Tensor y = out(cs);
                          be->concat_last(x, half, y);
                          return y;
                        }});
      }
    ++idx;
  }
  for (cpu::KernelIsa isa : wide) {
    const std::string vs = cat(": baseline vs ", cpu::kernel_isa_name(isa));
    for (auto& [name, run] : runs) {
      cpu::set_kernel_isa(cpu::KernelIsa::Baseline);
      const Tensor a = run();
      cpu::set_kernel_isa(isa);
      const Tensor b = run();
      expect_same_values(a, b, name + vs);
    }
    // The bulk converters (conv/matmul sources) too.
    Tensor x = rnd({4099}, 9, -5, 5);
    x.f32()[3] = NAN;
    std::vector<uint16_t> h0(4099), h1(4099);
    std::vector<float> f0(4099), f1(4099);
    cpu::set_kernel_isa(cpu::KernelIsa::Baseline);
    cpu::f32_to_bf16(x.f32(), h0.data(), 4099);
    cpu::bf16_to_f32(h0.data(), f0.data(), 4099);
    cpu::set_kernel_isa(isa);
    cpu::f32_to_bf16(x.f32(), h1.data(), 4099);
    cpu::bf16_to_f32(h1.data(), f1.data(), 4099);
    EXPECT_EQ(h0, h1) << vs;
    EXPECT_EQ(std::memcmp(f0.data(), f1.data(), f0.size() * 4), 0) << vs;
  }
}

TEST(OpsBf16, KernelIsaSelection) {
  const CpuFeatures& f = cpu_features();
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl;
  std::printf("  kernels: %s\n", cpu::kernel_isa_name(cpu::kernel_isa()));
  EXPECT_EQ(cpu::kernel_isa(), avx512 ? cpu::KernelIsa::Avx512 : f.avx2 ? cpu::KernelIsa::Avx2 : cpu::KernelIsa::Baseline);
  if (!avx512) {
    EXPECT_THROW(cpu::set_kernel_isa(cpu::KernelIsa::Avx512), Error);
  }
  if (!f.avx2) {
    EXPECT_THROW(cpu::set_kernel_isa(cpu::KernelIsa::Avx2), Error);
  }
}

// ---- errors -------------------------------------------------------------------------------------

void expect_error(const std::function<void()>& f, const std::string& starts, const std::string& has) {
  try {
    f();
    ADD_FAILURE() << "no error; expected '" << starts << "...'";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.rfind(starts, 0), 0u) << m;
    EXPECT_NE(m.find(has), std::string::npos) << m;
  }
}

TEST(OpsBf16, DtypeErrorsNameTheOp) {
  auto be = make();
  const Shape s{2, 3, 3, 4};
  Tensor xh = rnd(s, 1).to(DType::F16), xb = rnd(s, 1, -1, 1, DType::BF16), yb = Tensor::empty(s, DType::BF16);
  Tensor yh = Tensor::empty(s, DType::F16), yf = Tensor::empty(s);
  Tensor g = rnd({4}, 2), b = rnd({4}, 3), m = Tensor::zeros({2, 2}), v = Tensor::full({2, 2}, 1.0f);
  const std::string f16 = "must be f32 or bf16";
  expect_error([&] { be->group_norm(xh, g, b, 2, 1e-5f, false, yb); }, "group_norm: input f16[2, 3, 3, 4]", f16);
  expect_error([&] { be->group_norm(xb, g, b, 2, 1e-5f, false, yh); }, "group_norm: output f16", f16);
  expect_error([&] { be->group_norm(xb, g.to(DType::BF16), b, 2, 1e-5f, false, yb); }, "group_norm: gamma bf16", "must be f32");
  expect_error([&] { be->group_norm_stats(xh, 2, m, v); }, "group_norm_stats: input f16", f16);
  Tensor mb = m.to(DType::BF16);
  expect_error([&] { be->group_norm_stats(xb, 2, mb, v); }, "group_norm_stats: mean bf16", "must be f32");
  expect_error([&] { be->group_norm_apply(xb, m, v, g, b, 2, 1e-5f, false, yh); }, "group_norm_apply: output f16", f16);
  expect_error([&] { be->group_norm_apply(xb, m, v, g, b.to(DType::BF16), 2, 1e-5f, false, yb); },
               "group_norm_apply: beta bf16", "must be f32");
  expect_error([&] { be->layer_norm(xh, g, b, 1e-5f, yb); }, "layer_norm: input f16", f16);
  expect_error([&] { be->softmax(xb, yh); }, "softmax: output f16", f16);
  expect_error([&] { be->unary(Unary::SiLU, xh, yb); }, "unary: input f16", f16);
  expect_error([&] { be->scale(xb, 2.0f, yh); }, "scale: output f16", f16);
  Tensor y2 = Tensor::empty({2, 3, 3, 2}, DType::F16);
  expect_error([&] { be->geglu(xb, y2); }, "geglu: output f16", f16);
  expect_error([&] { be->binary(Binary::Add, xb, xh, yb); }, "add: b f16", f16);
  expect_error([&] { be->binary(Binary::Mul, xh, xb, yb); }, "mul: a f16", f16);
  Tensor yu = Tensor::empty({2, 6, 6, 4}, DType::F16);
  expect_error([&] { be->upsample_nearest(xb, yu); }, "upsample_nearest: output f16", f16);
  Tensor yc = Tensor::empty({2, 3, 3, 8});
  expect_error([&] { be->concat_last(xb, xh, yc); }, "concat_last: b f16", f16);
  // An output overlapping an input of another dtype cannot be computed in place.
  Tensor alias = Tensor(xb.storage(), 0, s, DType::BF16);  // same memory as xb
  Tensor xf = rnd(s, 4), alias_b = Tensor(xf.storage(), 0, s, DType::BF16);  // first half of xf
  expect_error([&] { be->unary(Unary::SiLU, xf, alias_b); }, "unary: output bf16[2, 3, 3, 4] overlaps input f32", "another dtype");
  expect_error([&] { be->binary(Binary::Add, xb, xf, alias_b); }, "add: output bf16", "overlaps b f32");
  EXPECT_NO_THROW(be->unary(Unary::SiLU, xb, alias));  // same dtype: in place is fine
  // f32 and bf16 are both accepted everywhere.
  EXPECT_NO_THROW(be->group_norm(xb, g, b, 2, 1e-5f, true, yf));
  EXPECT_NO_THROW(be->binary(Binary::Add, yf, xb, yb));
}

}  // namespace
