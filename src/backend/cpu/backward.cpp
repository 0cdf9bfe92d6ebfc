// The CPU backend's backward passes (training): f32 throughout. GEMM-shaped work (linear,
// matmul, convolution as im2col/col2im + GEMM) goes through oneDNN's sgemm; normalisations,
// activations and reductions are plain OpenMP loops here; the fused attention backward is in
// attention_backward.cpp. Shapes are validated (diffuse::Error naming the op and the shapes);
// the kernels below assume valid, dense f32 tensors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include "backend/cpu/attention.h"
#include "backend/cpu/cpu_backend.h"
#include "core/error.h"

namespace diffuse {
namespace {

void need_f32(const char* op, const char* what, const Tensor& t) {
  DF_CHECK(t.defined(), op, ": ", what, " is undefined");
  DF_CHECK(t.dtype() == DType::F32, op, ": ", what, " ", t.str(), " must be f32 (backward passes run in f32)");
}

void need_shape(const char* op, const char* what, const Tensor& t, const Shape& want) {
  need_f32(op, what, t);
  DF_CHECK(t.shape() == want, op, ": ", what, " ", t.str(), " should be ", want.str());
}

// Row-major C = alpha·op(A)·op(B) + beta·C (oneDNN's sgemm, multi-threaded).
void sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
           const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0 ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  DF_CHECK(st == dnnl_success, "sgemm: oneDNN failed (status ", int(st), ") for ", M, "x", N, "x", K);
}

// Column sums of a [rows, C] matrix added to out[C] (bias gradients).
void add_column_sums(const float* x, int64_t rows, int64_t C, float* out) {
  const int nt = omp_get_max_threads();
  std::vector<float> part(size_t(nt) * size_t(C), 0.0f);
#pragma omp parallel num_threads(nt)
  {
    float* p = part.data() + size_t(omp_get_thread_num()) * size_t(C);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * C;
      for (int64_t c = 0; c < C; ++c) p[c] += xr[c];
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) out[c] += part[size_t(t) * size_t(C) + size_t(c)];
}

struct ConvGeom {
  int64_t N, H, W, I, Ho, Wo, O, kh, kw;
  Conv2dParams p;
  bool pointwise() const {
    return kh == 1 && kw == 1 && p.stride == 1 && p.pad_top == 0 && p.pad_left == 0 && p.pad_bottom == 0 &&
           p.pad_right == 0;
  }
  int64_t patch() const { return kh * kw * I; }
};

ConvGeom conv_geom(const char* op, const Shape& xs, const Shape& ws, const Shape& ys, const Conv2dParams& p) {
  DF_CHECK(xs.rank() == 4 && ws.rank() == 4 && ys.rank() == 4, op, ": input ", xs.str(), ", weight ", ws.str(),
           ", output ", ys.str(), " must be [N, H, W, I], [O, I, kh, kw], [N, Ho, Wo, O]");
  ConvGeom g{xs[0], xs[1], xs[2], xs[3], ys[1], ys[2], ws[0], ws[2], ws[3], p};
  DF_CHECK(p.stride >= 1, op, ": stride ", p.stride);
  const int64_t ho = (g.H + p.pad_top + p.pad_bottom - g.kh) / p.stride + 1;
  const int64_t wo = (g.W + p.pad_left + p.pad_right - g.kw) / p.stride + 1;
  DF_CHECK(ws[1] == g.I && ys[0] == g.N && ys[3] == g.O && ho == g.Ho && wo == g.Wo, op, ": input ", xs.str(),
           ", weight ", ws.str(), " and output ", ys.str(), " do not fit (stride ", p.stride, ", output should be [",
           g.N, ", ", ho, ", ", wo, ", ", g.O, "])");
  return g;
}

// A buffer of at least n floats, reused by the calling thread (no fresh pages per call; contents
// undefined).
float* reusable(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Weight [O, I, kh, kw] as a [O, kh·kw·I] matrix (the patch order of im2col on NHWC).
const float* weight_matrix(const ConvGeom& g, const float* w) {
  static thread_local std::vector<float> buf;
  float* m = reusable(buf, size_t(g.O * g.patch()));
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t i = 0; i < g.I; ++i)
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b)
          m[size_t(o * g.patch() + (a * g.kw + b) * g.I + i)] = w[((o * g.I + i) * g.kh + a) * g.kw + b];
  return m;
}

float* col_buffer(size_t n) {
  static thread_local std::vector<float> buf;
  return reusable(buf, n);
}

// One sample's patches: col [Ho·Wo, kh·kw·I], zeros where the window reads padding.
void im2col(const ConvGeom& g, const float* x, float* col) {
#pragma omp parallel for schedule(static)
  for (int64_t oh = 0; oh < g.Ho; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      float* row = col + (oh * g.Wo + ow) * g.patch();
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b) {
          const int64_t ih = oh * g.p.stride + a - g.p.pad_top, iw = ow * g.p.stride + b - g.p.pad_left;
          float* dst = row + (a * g.kw + b) * g.I;
          if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) std::memset(dst, 0, size_t(g.I) * sizeof(float));
          else std::memcpy(dst, x + (ih * g.W + iw) * g.I, size_t(g.I) * sizeof(float));
        }
    }
}

// The adjoint of im2col for one sample: dx (overwritten) gathers every patch entry that read it.
// Parallel over input rows, so no two threads write one element.
void col2im(const ConvGeom& g, const float* col, float* dx) {
  const int s = g.p.stride;
#pragma omp parallel for schedule(static)
  for (int64_t ih = 0; ih < g.H; ++ih) {
    float* drow = dx + ih * g.W * g.I;
    std::memset(drow, 0, size_t(g.W * g.I) * sizeof(float));
    for (int64_t a = 0; a < g.kh; ++a) {
      const int64_t t = ih + g.p.pad_top - a;
      if (t < 0 || t % s) continue;
      const int64_t oh = t / s;
      if (oh >= g.Ho) continue;
      for (int64_t ow = 0; ow < g.Wo; ++ow)
        for (int64_t b = 0; b < g.kw; ++b) {
          const int64_t iw = ow * s + b - g.p.pad_left;
          if (iw < 0 || iw >= g.W) continue;
          const float* src = col + (oh * g.Wo + ow) * g.patch() + (a * g.kw + b) * g.I;
          float* d = drow + iw * g.I;
          for (int64_t i = 0; i < g.I; ++i) d[i] += src[i];
        }
    }
  }
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// d/dv of the activations (the exact functions; the forward kernels approximate erf/tanh to ~1e-7).
double unary_grad(Unary op, double v) {
  switch (op) {
    case Unary::SiLU: {
      const double s = sigmoid(v);
      return s * (1.0 + v * (1.0 - s));
    }
    case Unary::GeluErf:
      return 0.5 * (1.0 + std::erf(v * M_SQRT1_2)) + v * std::exp(-0.5 * v * v) * 0.3989422804014327;
    case Unary::GeluTanh: {
      const double k = 0.7978845608028654, u = k * (v + 0.044715 * v * v * v), th = std::tanh(u);
      return 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * v * v);
    }
    case Unary::QuickGelu: {
      const double s = sigmoid(1.702 * v);
      return s + 1.702 * v * s * (1.0 - s);
    }
    case Unary::LeakyRelu02:
      return v > 0.0 ? 1.0 : 0.2;  // PyTorch's choice at 0: the slope
    case Unary::ReLU:
      return v > 0.0 ? 1.0 : 0.0;  // PyTorch's choice at 0: 0
  }
  return 0;
}

double gelu_erf(double v) { return 0.5 * v * (1.0 + std::erf(v * M_SQRT1_2)); }

// Per-thread [C] partial sums, reduced into out (+=).
struct Partials {
  int nt;
  int64_t C;
  std::vector<double> buf;
  Partials(int64_t C_, int count = 1) : nt(omp_get_max_threads()), C(C_), buf(size_t(nt) * size_t(C_) * size_t(count), 0.0) {}
  double* at(int t, int which = 0) { return buf.data() + (size_t(which) * size_t(nt) + size_t(t)) * size_t(C); }
  void add_to(float* out, int which = 0) {
    if (!out) return;
    for (int t = 0; t < nt; ++t)
      for (int64_t c = 0; c < C; ++c) out[c] += float(at(t, which)[c]);
  }
};

}  // namespace

// ---- convolution ----

void CpuBackend::conv2d_backward_data(const Tensor& dy, const Tensor& w, const Conv2dParams& p, Tensor& dx) {
  const char* op = "conv2d_backward_data";
  need_f32(op, "dy", dy), need_f32(op, "weight", w), need_f32(op, "dx", dx);
  const ConvGeom g = conv_geom(op, dx.shape(), w.shape(), dy.shape(), p);
  if (g.pointwise()) {  // dx [NHW, I] = dy [NHW, O] · W [O, I] (the weight is already that matrix)
    sgemm(false, false, g.N * g.H * g.W, g.I, g.O, 1.0f, dy.f32(), g.O, w.f32(), g.I, 0.0f, dx.f32(), g.I);
    return;
  }
  const float* wm = weight_matrix(g, w.f32());
  float* col = col_buffer(size_t(g.Ho * g.Wo * g.patch()));
  for (int64_t n = 0; n < g.N; ++n) {
    sgemm(false, false, g.Ho * g.Wo, g.patch(), g.O, 1.0f, dy.f32() + n * g.Ho * g.Wo * g.O, g.O, wm, g.patch(), 0.0f,
          col, g.patch());
    col2im(g, col, dx.f32() + n * g.H * g.W * g.I);
  }
}

void CpuBackend::conv2d_backward_weights(const Tensor& x, const Tensor& dy, const Conv2dParams& p, Tensor* dw,
                                         Tensor* db) {
  const char* op = "conv2d_backward_weights";
  need_f32(op, "x", x), need_f32(op, "dy", dy);
  DF_CHECK(dw || db, op, ": neither dw nor db requested");
  DF_CHECK(dw || (x.rank() == 4 && dy.rank() == 4), op, ": x ", x.str(), " and dy ", dy.str(), " must be 4-d");
  if (dw) {
    need_f32(op, "dw", *dw);
    const ConvGeom g = conv_geom(op, x.shape(), dw->shape(), dy.shape(), p);
    std::vector<float> dwm(size_t(g.O * g.patch()), 0.0f);  // [O, kh·kw·I]
    if (g.pointwise()) {
      sgemm(true, false, g.O, g.I, g.N * g.H * g.W, 1.0f, dy.f32(), g.O, x.f32(), g.I, 0.0f, dwm.data(), g.I);
    } else {
      float* col = col_buffer(size_t(g.Ho * g.Wo * g.patch()));
      for (int64_t n = 0; n < g.N; ++n) {
        im2col(g, x.f32() + n * g.H * g.W * g.I, col);
        sgemm(true, false, g.O, g.patch(), g.Ho * g.Wo, 1.0f, dy.f32() + n * g.Ho * g.Wo * g.O, g.O, col, g.patch(),
              1.0f, dwm.data(), g.patch());
      }
    }
    float* d = dw->f32();
    for (int64_t o = 0; o < g.O; ++o)
      for (int64_t i = 0; i < g.I; ++i)
        for (int64_t a = 0; a < g.kh; ++a)
          for (int64_t b = 0; b < g.kw; ++b)
            d[((o * g.I + i) * g.kh + a) * g.kw + b] += dwm[size_t(o * g.patch() + (a * g.kw + b) * g.I + i)];
  }
  if (db) {
    need_shape(op, "db", *db, Shape{dy.dim(-1)});
    add_column_sums(dy.f32(), dy.numel() / dy.dim(-1), dy.dim(-1), db->f32());
  }
}

// ---- linear, matmul ----

void CpuBackend::linear_backward_data(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) {
  const char* op = "linear_backward_data";
  need_f32(op, "dy", dy), need_f32(op, "weight", w), need_f32(op, "dx", dx);
  DF_CHECK(w.rank() == 2 && dy.rank() >= 1 && dx.rank() == dy.rank() && dy.dim(-1) == w.dim(0) &&
               dx.dim(-1) == w.dim(1) && dx.numel() / w.dim(1) == dy.numel() / w.dim(0),
           op, ": dy ", dy.str(), ", weight ", w.str(), " and dx ", dx.str(), " do not fit");
  const int64_t O = w.dim(0), I = w.dim(1), R = dy.numel() / O;
  sgemm(false, false, R, I, O, 1.0f, dy.f32(), O, w.f32(), I, accumulate ? 1.0f : 0.0f, dx.f32(), I);
}

void CpuBackend::linear_backward_weights(const Tensor& x, const Tensor& dy, Tensor* dw, Tensor* db) {
  const char* op = "linear_backward_weights";
  need_f32(op, "x", x), need_f32(op, "dy", dy);
  DF_CHECK(x.rank() >= 1 && dy.rank() == x.rank() && x.numel() / std::max<int64_t>(x.dim(-1), 1) ==
                                                        dy.numel() / std::max<int64_t>(dy.dim(-1), 1),
           op, ": x ", x.str(), " and dy ", dy.str(), " do not fit");
  const int64_t I = x.dim(-1), O = dy.dim(-1), R = dy.numel() / std::max<int64_t>(O, 1);
  if (dw) {
    need_shape(op, "dw", *dw, Shape{O, I});
    sgemm(true, false, O, I, R, 1.0f, dy.f32(), O, x.f32(), I, 1.0f, dw->f32(), I);
  }
  if (db) {
    need_shape(op, "db", *db, Shape{O});
    add_column_sums(dy.f32(), R, O, db->f32());
  }
}

void CpuBackend::matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dc, bool trans_b, float alpha,
                                 Tensor* da, Tensor* db) {
  const char* op = "matmul_backward";
  need_f32(op, "a", a), need_f32(op, "b", b), need_f32(op, "dc", dc);
  DF_CHECK(a.rank() == 3 && b.rank() == 3 && dc.rank() == 3, op, ": a ", a.str(), ", b ", b.str(), ", dc ",
           dc.str(), " must be 3-d");
  const int64_t B = a.dim(0), M = a.dim(1), K = a.dim(2), N = trans_b ? b.dim(1) : b.dim(2);
  DF_CHECK(b.dim(0) == B && (trans_b ? b.dim(2) : b.dim(1)) == K && dc.shape() == (Shape{B, M, N}), op, ": a ",
           a.str(), ", b ", b.str(), " (trans_b ", trans_b, ") and dc ", dc.str(), " do not fit");
  if (da) need_shape(op, "da", *da, a.shape());
  if (db) need_shape(op, "db", *db, b.shape());
  for (int64_t i = 0; i < B; ++i) {
    const float *A = a.f32() + i * M * K, *Bm = b.f32() + i * K * N, *dC = dc.f32() + i * M * N;
    if (da) {  // da = α·dc·bᵀ (b [K, N]) or α·dc·b (b [N, K])
      sgemm(false, !trans_b, M, K, N, alpha, dC, N, Bm, trans_b ? K : N, 0.0f, da->f32() + i * M * K, K);
    }
    if (db) {
      if (trans_b) sgemm(true, false, N, K, M, alpha, dC, N, A, K, 0.0f, db->f32() + i * K * N, K);  // α·dcᵀ·a
      else sgemm(true, false, K, N, M, alpha, A, K, dC, N, 0.0f, db->f32() + i * K * N, N);          // α·aᵀ·dc
    }
  }
}

void CpuBackend::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                    const Tensor& d_o, int heads, float scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  cpu::attention_backward_f32(q, k, v, o, d_o, heads, scale, dq, dk, dv);
}

// ---- normalisation ----

void CpuBackend::group_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups, float eps,
                                     bool fused_silu, const Tensor& dy, Tensor& dx, Tensor* dgamma, Tensor* dbeta) {
  const char* op = "group_norm_backward";
  need_f32(op, "x", x);
  DF_CHECK(x.rank() >= 2 && groups > 0 && x.dim(-1) % groups == 0, op, ": input ", x.str(), " with ", groups,
           " groups");
  const int64_t N = x.dim(0), C = x.dim(-1), S = x.numel() / std::max<int64_t>(N * C, 1), Cg = C / groups;
  need_shape(op, "gamma", gamma, Shape{C});
  need_shape(op, "beta", beta, Shape{C});
  need_shape(op, "dy", dy, x.shape());
  need_shape(op, "dx", dx, x.shape());
  if (dgamma) need_shape(op, "dgamma", *dgamma, Shape{C});
  if (dbeta) need_shape(op, "dbeta", *dbeta, Shape{C});
  const float *X = x.f32(), *G = gamma.f32(), *Bt = beta.f32(), *DY = dy.f32();
  float* DX = dx.f32();
  // Each sample's rows are cut into chunks; a task is a (sample, chunk) pair, so that any batch
  // size keeps every thread busy. Every pass walks rows contiguously (inner loop over channels)
  // and sums per channel in double; groups are formed from the channel sums.
  constexpr int64_t kRows = 64;
  const int64_t chunks = (S + kRows - 1) / kRows, tasks = N * chunks;
  const double M = double(S * Cg);
  std::vector<double> acc(size_t(tasks * C)), acc2(size_t(tasks * C));
  std::vector<float> mc(size_t(N * C)), rc(size_t(N * C)), ac(size_t(N * C)), bc(size_t(N * C));
  std::vector<double> pg(size_t(N * C)), pb(size_t(N * C));
  auto for_tasks = [&](const auto& body) {  // body(n, s0, s1, acc row, acc2 row)
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / chunks, s0 = (t % chunks) * kRows;
      double* a = acc.data() + t * C;
      double* a2 = acc2.data() + t * C;
      std::fill(a, a + C, 0.0);
      std::fill(a2, a2 + C, 0.0);
      body(n, s0, std::min(S, s0 + kRows), a, a2);
    }
  };
  // Σ over the chunks of sample n, per channel, of acc (or acc2).
  auto sample_sum = [&](const std::vector<double>& v, int64_t n, int64_t c) {
    double r = 0;
    for (int64_t k = 0; k < chunks; ++k) r += v[size_t((n * chunks + k) * C + c)];
    return r;
  };
  // A per-channel value for each group of sample n, from per-channel sums: f(Σ_{c in g} sum(c)).
  auto per_group = [&](int64_t n, const std::function<double(int64_t c)>& sum, const std::function<float(double)>& f,
                       std::vector<float>& out) {
    for (int64_t g = 0; g < groups; ++g) {
      double s = 0;
      for (int64_t j = 0; j < Cg; ++j) s += sum(g * Cg + j);
      const float v = f(s);
      for (int64_t j = 0; j < Cg; ++j) out[size_t(n * C + g * Cg + j)] = v;
    }
  };
  // 1. Group means.
  for_tasks([&](int64_t n, int64_t s0, int64_t s1, double* a, double*) {
    for (int64_t s = s0; s < s1; ++s) {
      const float* r = X + (n * S + s) * C;
      for (int64_t c = 0; c < C; ++c) a[c] += r[c];
    }
  });
  for (int64_t n = 0; n < N; ++n)
    per_group(n, [&](int64_t c) { return sample_sum(acc, n, c); }, [&](double s) { return float(s / M); }, mc);
  // 2. Group variances (of x − mean) -> rstd.
  for_tasks([&](int64_t n, int64_t s0, int64_t s1, double* a, double*) {
    const float* m = mc.data() + n * C;
    for (int64_t s = s0; s < s1; ++s) {
      const float* r = X + (n * S + s) * C;
      for (int64_t c = 0; c < C; ++c) {
        const double d = double(r[c]) - double(m[c]);
        a[c] += d * d;
      }
    }
  });
  for (int64_t n = 0; n < N; ++n)
    per_group(n, [&](int64_t c) { return sample_sum(acc, n, c); },
              [&](double s) { return float(1.0 / std::sqrt(s / M + double(eps))); }, rc);
  // 3. dz = dL/d(affine output) (through the SiLU when fused), kept in dx; per channel Σ dz·x̂ and Σ dz.
  for_tasks([&](int64_t n, int64_t s0, int64_t s1, double* a, double* a2) {
    const float* m = mc.data() + n * C;
    const float* rs = rc.data() + n * C;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t o = (n * S + s) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (X[o + c] - m[c]) * rs[c];
        float dz = DY[o + c];
        if (fused_silu) {
          const float z = G[c] * xhat + Bt[c], sg = 1.0f / (1.0f + std::exp(-z));
          dz *= sg * (1.0f + z * (1.0f - sg));
        }
        DX[o + c] = dz;
        a[c] += double(dz) * double(xhat);
        a2[c] += double(dz);
      }
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      pg[size_t(n * C + c)] = sample_sum(acc, n, c);
      pb[size_t(n * C + c)] = sample_sum(acc2, n, c);
    }
    // dx = rstd·(γ·dz − A/M − x̂·B/M), A = Σ_group γ·dz, B = Σ_group γ·dz·x̂
    per_group(n, [&](int64_t c) { return double(G[c]) * pb[size_t(n * C + c)]; }, [&](double s) { return float(s / M); },
              ac);
    per_group(n, [&](int64_t c) { return double(G[c]) * pg[size_t(n * C + c)]; }, [&](double s) { return float(s / M); },
              bc);
  }
  // 4. dx.
  for_tasks([&](int64_t n, int64_t s0, int64_t s1, double*, double*) {
    const float* m = mc.data() + n * C;
    const float* rs = rc.data() + n * C;
    const float* A = ac.data() + n * C;
    const float* Bv = bc.data() + n * C;
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t o = (n * S + s) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (X[o + c] - m[c]) * rs[c];
        DX[o + c] = rs[c] * (G[c] * DX[o + c] - A[c] - xhat * Bv[c]);
      }
    }
  });
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      if (dgamma) dgamma->f32()[c] += float(pg[size_t(n * C + c)]);
      if (dbeta) dbeta->f32()[c] += float(pb[size_t(n * C + c)]);
    }
}

void CpuBackend::layer_norm_backward(const Tensor& x, const Tensor& gamma, float eps, const Tensor& dy, Tensor& dx,
                                     Tensor* dgamma, Tensor* dbeta) {
  const char* op = "layer_norm_backward";
  need_f32(op, "x", x);
  DF_CHECK(x.rank() >= 1 && x.dim(-1) > 0, op, ": input ", x.str());
  const int64_t C = x.dim(-1), R = x.numel() / C;
  need_shape(op, "gamma", gamma, Shape{C});
  need_shape(op, "dy", dy, x.shape());
  need_shape(op, "dx", dx, x.shape());
  if (dgamma) need_shape(op, "dgamma", *dgamma, Shape{C});
  if (dbeta) need_shape(op, "dbeta", *dbeta, Shape{C});
  const float *X = x.f32(), *G = gamma.f32(), *DY = dy.f32();
  float* DX = dx.f32();
  Partials part(C, 2);
#pragma omp parallel
  {
    double* pg = part.at(omp_get_thread_num(), 0);
    double* pb = part.at(omp_get_thread_num(), 1);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const float *xr = X + r * C, *dr = DY + r * C;
      double sum = 0, sq = 0;
      for (int64_t c = 0; c < C; ++c) sum += xr[c];
      const double mean = sum / double(C);
      for (int64_t c = 0; c < C; ++c) sq += (xr[c] - mean) * (xr[c] - mean);
      const double rstd = 1.0 / std::sqrt(sq / double(C) + double(eps));
      double s1 = 0, s2 = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double xhat = (xr[c] - mean) * rstd, dxh = double(dr[c]) * G[c];
        s1 += dxh, s2 += dxh * xhat;
        pg[c] += double(dr[c]) * xhat, pb[c] += dr[c];
      }
      s1 /= double(C), s2 /= double(C);
      for (int64_t c = 0; c < C; ++c) {
        const double xhat = (xr[c] - mean) * rstd;
        DX[r * C + c] = float(rstd * (double(dr[c]) * G[c] - s1 - xhat * s2));
      }
    }
  }
  part.add_to(dgamma ? dgamma->f32() : nullptr, 0);
  part.add_to(dbeta ? dbeta->f32() : nullptr, 1);
}

void CpuBackend::softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx) {
  const char* op = "softmax_backward";
  need_f32(op, "y", y);
  DF_CHECK(y.rank() >= 1 && y.dim(-1) > 0, op, ": y ", y.str());
  need_shape(op, "dy", dy, y.shape());
  need_shape(op, "dx", dx, y.shape());
  const int64_t C = y.dim(-1), R = y.numel() / C;
  const float *Y = y.f32(), *D = dy.f32();
  float* DX = dx.f32();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += double(D[r * C + c]) * Y[r * C + c];
    for (int64_t c = 0; c < C; ++c) DX[r * C + c] = float(Y[r * C + c] * (D[r * C + c] - s));
  }
}

// ---- elementwise ----

void CpuBackend::unary_backward(Unary op_kind, const Tensor& x, const Tensor& dy, Tensor& dx) {
  const char* op = "unary_backward";
  need_f32(op, "x", x);
  need_shape(op, "dy", dy, x.shape());
  need_shape(op, "dx", dx, x.shape());
  const float *X = x.f32(), *D = dy.f32();
  float* DX = dx.f32();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n > 4096)
  for (int64_t i = 0; i < n; ++i) DX[i] = float(double(D[i]) * unary_grad(op_kind, X[i]));
}

void CpuBackend::geglu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) {
  const char* op = "geglu_backward";
  need_f32(op, "x", x);
  DF_CHECK(x.rank() >= 1 && x.dim(-1) % 2 == 0, op, ": input ", x.str(), " needs an even last dim");
  Shape ys = x.shape();
  ys[ys.rank() - 1] /= 2;
  need_shape(op, "dy", dy, ys);
  need_shape(op, "dx", dx, x.shape());
  const int64_t C = ys[ys.rank() - 1], R = C ? dy.numel() / C : 0;
  const float *X = x.f32(), *D = dy.f32();
  float* DX = dx.f32();
#pragma omp parallel for schedule(static) if (R * C > 4096)
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const double a = X[r * 2 * C + c], g = X[r * 2 * C + C + c], d = D[r * C + c];
      DX[r * 2 * C + c] = float(d * gelu_erf(g));
      DX[r * 2 * C + C + c] = float(d * a * unary_grad(Unary::GeluErf, g));
    }
}

void CpuBackend::sum_to(const Tensor& dy, Tensor& db) {
  const char* op = "sum_to";
  need_f32(op, "dy", dy), need_f32(op, "db", db);
  const int r = dy.rank(), rb = db.rank();
  DF_CHECK(rb <= r && r <= Shape::kMaxDims, op, ": ", db.str(), " cannot broadcast to ", dy.str());
  int64_t strides[Shape::kMaxDims] = {};
  int64_t st = 1;
  for (int i = r - 1; i >= 0; --i) {
    const int j = i - (r - rb);
    const int64_t bd = j >= 0 ? db.dim(j) : 1;
    DF_CHECK(bd == dy.dim(i) || bd == 1, op, ": ", db.str(), " cannot broadcast to ", dy.str());
    strides[i] = bd == 1 ? 0 : st;
    st *= bd;
  }
  float* out = db.f32();
  std::vector<double> acc(size_t(db.numel()), 0.0);
  const float* in = dy.f32();
  int64_t idx[Shape::kMaxDims] = {};
  int64_t off = 0;
  for (int64_t e = 0, n = dy.numel(); e < n; ++e) {
    acc[size_t(off)] += in[e];
    for (int i = r - 1; i >= 0; --i) {  // next multi-index; keep db's offset in step
      off += strides[i];
      if (++idx[i] < dy.dim(i)) break;
      off -= strides[i] * idx[i];
      idx[i] = 0;
    }
  }
  for (int64_t i = 0; i < db.numel(); ++i) out[i] = float(acc[size_t(i)]);
}

void CpuBackend::upsample_nearest_backward(const Tensor& dy, Tensor& dx) {
  const char* op = "upsample_nearest_backward";
  need_f32(op, "dy", dy), need_f32(op, "dx", dx);
  DF_CHECK(dy.rank() == 4 && dx.rank() == 4 && dy.dim(0) == dx.dim(0) && dy.dim(3) == dx.dim(3) && dx.dim(1) > 0 &&
               dx.dim(2) > 0,
           op, ": dy ", dy.str(), " and dx ", dx.str(), " must be [N, Ho, Wo, C] and [N, H, W, C]");
  const int64_t N = dx.dim(0), H = dx.dim(1), W = dx.dim(2), C = dx.dim(3), Ho = dy.dim(1), Wo = dy.dim(2);
  const float* D = dy.f32();
  float* X = dx.f32();
#pragma omp parallel for schedule(static)
  for (int64_t nh = 0; nh < N * H; ++nh) {  // each source row gathers the output rows it fed
    const int64_t n = nh / H, ih = nh % H;
    float* xr = X + nh * W * C;
    std::memset(xr, 0, size_t(W * C) * sizeof(float));
    for (int64_t i = 0; i < Ho; ++i) {
      if (i * H / Ho != ih) continue;
      for (int64_t j = 0; j < Wo; ++j) {
        const float* src = D + ((n * Ho + i) * Wo + j) * C;
        float* d = xr + (j * W / Wo) * C;
        for (int64_t c = 0; c < C; ++c) d[c] += src[c];
      }
    }
  }
}

void CpuBackend::split_last(const Tensor& dy, Tensor& da, Tensor& db) {
  const char* op = "split_last";
  need_f32(op, "dy", dy), need_f32(op, "da", da), need_f32(op, "db", db);
  const int r = dy.rank();
  bool ok = r >= 1 && da.rank() == r && db.rank() == r && da.dim(-1) + db.dim(-1) == dy.dim(-1);
  for (int i = 0; ok && i + 1 < r; ++i) ok = da.dim(i) == dy.dim(i) && db.dim(i) == dy.dim(i);
  DF_CHECK(ok, op, ": dy ", dy.str(), " does not split into ", da.str(), " and ", db.str());
  const int64_t Ca = da.dim(-1), Cb = db.dim(-1), C = Ca + Cb, R = C ? dy.numel() / C : 0;
#pragma omp parallel for schedule(static) if (R > 256)
  for (int64_t i = 0; i < R; ++i) {
    std::memcpy(da.f32() + i * Ca, dy.f32() + i * C, size_t(Ca) * sizeof(float));
    std::memcpy(db.f32() + i * Cb, dy.f32() + i * C + Ca, size_t(Cb) * sizeof(float));
  }
}

void CpuBackend::timestep_embedding_backward(const Tensor& t, int dim, bool flip_sin_to_cos,
                                             float downscale_freq_shift, float max_period, const Tensor& dy,
                                             Tensor& dt) {
  const char* op = "timestep_embedding_backward";
  need_f32(op, "t", t);
  DF_CHECK(t.rank() == 1 && dim >= 1, op, ": timesteps ", t.str(), ", dim ", dim);
  need_shape(op, "dy", dy, Shape{t.dim(0), dim});
  need_shape(op, "dt", dt, t.shape());
  // Forward: arg_i = t·freq_i (freq as the forward rounds it), y = (sin, cos) or (cos, sin).
  const int64_t half = dim / 2;
  const float neg_log = float(-std::log(double(max_period)));
  const float denom = float(half) - downscale_freq_shift;
  for (int64_t n = 0; n < t.dim(0); ++n) {
    const float* g = dy.f32() + n * dim;
    double acc = 0;
    for (int64_t i = 0; i < half; ++i) {
      const float freq = float(std::exp(double((neg_log * float(i)) / denom)));
      const double arg = double(t.f32()[n] * freq);
      const double gs = flip_sin_to_cos ? g[half + i] : g[i], gc = flip_sin_to_cos ? g[i] : g[half + i];
      acc += double(freq) * (gs * std::cos(arg) - gc * std::sin(arg));
    }
    dt.f32()[n] = float(acc);
  }
}

void CpuBackend::axpy(float a, const Tensor& x, Tensor& y) {
  need_f32("axpy", "x", x);
  need_shape("axpy", "y", y, x.shape());
  const float* X = x.f32();
  float* Y = y.f32();
  const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) Y[i] += a * X[i];
}

}  // namespace diffuse
