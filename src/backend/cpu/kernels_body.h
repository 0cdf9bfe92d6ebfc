// The CPU kernels' implementation, included three times by kernels.cpp: once for the x86-64
// baseline and under `#pragma GCC target` for AVX2 and for AVX-512 (each in its own namespace;
// kernels.cpp picks one at run time). Not a standalone header: it expects kernels.cpp's includes and kParallelMin.
// Keep it free of anything whose result depends on the instruction set (no -ffast-math-style
// reassociation, no fused multiply-add: kernels.cpp turns contraction off for the AVX-512 copy),
// so both copies give the same bits. And use no library templates (std::vector, std::max,
// std::bit_cast, ...): GCC compiles a template instantiated under the AVX-512 pragma with AVX-512
// even where baseline code calls it too, and an out-of-line copy would be a weak symbol the linker
// could pick for the whole program. Everything here has internal linkage (kernels.cpp includes it
// in an unnamed namespace).

template <class To, class From> static inline To bitcast(From v) { return __builtin_bit_cast(To, v); }

// A per-thread scratch array that only grows (freed at thread exit); see above for why not
// std::vector.
template <class T> struct Scratch {
  T* p = nullptr;
  size_t n = 0;
  T* get(size_t k) {
    if (k > n) {
      std::free(p);
      p = static_cast<T*>(std::malloc(k * sizeof(T)));
      n = p ? k : 0;
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};

// ---------------------------------------------------------------------------------------------
// Element access. Kernels are templates over their buffers' element types: float (f32) or
// uint16_t (bf16 bits). ld() widens to f32 (bf16 -> f32 is exact: the bits shifted up 16),
// st() narrows: bf16 by round-to-nearest-even on the bits, NaN kept NaN (quieted), the same as
// diffuse::f32_to_bf16 but branch-free so the loops vectorise.

static inline float ld(const float* p, int64_t i) { return p[i]; }
static inline float ld(const uint16_t* p, int64_t i) {
  return bitcast<float>(uint32_t(p[i]) << 16);
}
static inline uint16_t round_bf16(float f) {
  const uint32_t u = bitcast<uint32_t>(f);
  const uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
  const uint32_t m = 0u - uint32_t(f != f);  // all ones for NaN (IEEE compare: no -ffinite-math-only)
  const uint32_t q = u | 0x400000u;  // NaN: keep sign and payload, set the quiet bit
  return uint16_t(((q & m) | (r & ~m)) >> 16);
}
static inline void st(float* p, int64_t i, float v) { p[i] = v; }
static inline void st(uint16_t* p, int64_t i, float v) { p[i] = round_bf16(v); }

template <class T> struct Tag { using type = T; };
template <class T> static const T* cptr(ConstBuf b) { return static_cast<const T*>(b.data); }
template <class T> static T* ptr(Buf b) { return static_cast<T*>(b.data); }

// Calls f(Tag<element type>{}) for a buffer's dtype.
template <class F> static inline void on_type(DType t, F&& f) {
  if (t == DType::BF16) f(Tag<uint16_t>{});
  else f(Tag<float>{});
}

// Calls f(x as const TI*, y as TO*) for the element types of an input and an output.
template <class F> static inline void with_io(ConstBuf x, Buf y, F&& f) {
  on_type(x.dtype, [&](auto ti) {
    on_type(y.dtype, [&](auto to) {
      f(cptr<typename decltype(ti)::type>(x), ptr<typename decltype(to)::type>(y));
    });
  });
}

// n elements from src to dst, converting (a plain copy when the types match).
template <class TI, class TO> static inline void copy_row(const TI* src, TO* dst, int64_t n) {
  if constexpr (std::is_same_v<TI, TO>) {
    std::memcpy(dst, src, size_t(n) * sizeof(TI));
  } else {
    for (int64_t i = 0; i < n; ++i) st(dst, i, ld(src, i));
  }
}

void f32_to_bf16(const float* x, uint16_t* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = round_bf16(x[i]);
}

void bf16_to_f32(const uint16_t* x, float* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] = ld(x, i);
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
  return bitcast<float>((bitcast<uint32_t>(a) & m) | (bitcast<uint32_t>(b) & ~m));
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
  return p * bitcast<float>(bits);
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
// one fused pass y = x·a_c + b_c (optionally SiLU). group_norm = group_norm_stats followed by
// group_norm_apply (the same arithmetic, so the fused op and the split one agree bit for bit).

template <class TI>
static void group_norm_stats_t(const TI* x, int64_t N, int64_t S, int64_t C, int64_t G,
                               double* mean, double* var) {
  const int64_t cg = C / G;
  const int nt = omp_get_max_threads();
  static thread_local Scratch<double> acc_buf, stat_buf;
  double* accp = acc_buf.get(size_t(nt) * C);  // [nt, C]: per-thread per-channel sums
  double* stat = stat_buf.get(size_t(C) + G);
  double* mean_c = stat;      // [C]: the group mean broadcast per channel
  double* gsum = stat + C;    // [G]
  const bool par = S * C > kParallelMin;
  const double count = double(S) * double(cg);

  for (int64_t n = 0; n < N; ++n) {
    const TI* xn = x + n * S * C;
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t i = 0; i < int64_t(nt) * C; ++i) accp[i] = 0.0;
#pragma omp parallel num_threads(nt) if (par)
      {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t s0 = S * tid / nth, s1 = S * (tid + 1) / nth;
        double* a = accp + int64_t(tid) * C;
        for (int64_t s = s0; s < s1; ++s) {
          const TI* row = xn + s * C;
          if (pass == 0) {
            for (int64_t c = 0; c < C; ++c) a[c] += double(ld(row, c));
          } else {
            for (int64_t c = 0; c < C; ++c) {
              double d = double(ld(row, c)) - mean_c[c];
              a[c] += d * d;
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) gsum[g] = 0.0;
      for (int t = 0; t < nt; ++t)
        for (int64_t c = 0; c < C; ++c) gsum[c / cg] += accp[size_t(t) * C + c];
      if (pass == 0) {
        for (int64_t g = 0; g < G; ++g) mean[n * G + g] = gsum[g] / count;
        for (int64_t c = 0; c < C; ++c) mean_c[c] = mean[n * G + c / cg];
      } else {
        for (int64_t g = 0; g < G; ++g) var[n * G + g] = gsum[g] / count;
      }
    }
  }
}

// (Entry points that others here call have their own names: a call with a ConstBuf argument
// would otherwise also find the public dispatcher of the same name by argument-dependent lookup.)
static void gn_stats(ConstBuf x, int64_t N, int64_t S, int64_t C, int64_t G, double* mean, double* var) {
  on_type(x.dtype, [&](auto ti) {
    using TI = typename decltype(ti)::type;
    group_norm_stats_t(cptr<TI>(x), N, S, C, G, mean, var);
  });
}

template <class TI, class TO, bool SILU>
static void group_norm_rows(const TI* x, const float* pa, const float* pb, int64_t S, int64_t C,
                            TO* y) {
#pragma omp parallel for schedule(static) if (S * C > kParallelMin)
  for (int64_t s = 0; s < S; ++s) {
    const TI* row = x + s * C;
    TO* out = y + s * C;
    for (int64_t c = 0; c < C; ++c) {
      float v = ld(row, c) * pa[c] + pb[c];
      if constexpr (SILU) v = silu1(v);
      st(out, c, v);
    }
  }
}

void group_norm_stats(ConstBuf x, int64_t N, int64_t S, int64_t C, int64_t G, double* mean, double* var) {
  gn_stats(x, N, S, C, G, mean, var);
}

static void gn_apply(ConstBuf x, const double* mean, const double* var, const float* gamma,
                     const float* beta, int64_t N, int64_t S, int64_t C, int64_t G, float eps,
                     bool fuse_silu, Buf y) {
  const int64_t cg = C / G;
  static thread_local Scratch<float> buf;
  float* ca = buf.get(size_t(2 * C));  // [C] scale, then [C] shift
  float* cb = ca + C;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const double m = mean[n * G + c / cg];
      double rstd = 1.0 / std::sqrt(var[n * G + c / cg] + double(eps));
      double g = gamma ? double(gamma[c]) : 1.0, b = beta ? double(beta[c]) : 0.0;
      ca[c] = float(rstd * g);
      cb[c] = float(b - m * rstd * g);
    }
    on_type(x.dtype, [&](auto ti) {
      on_type(y.dtype, [&](auto to) {
        using TI = typename decltype(ti)::type;
        using TO = typename decltype(to)::type;
        const TI* xn = cptr<TI>(x) + n * S * C;
        TO* yn = ptr<TO>(y) + n * S * C;
        if (fuse_silu) group_norm_rows<TI, TO, true>(xn, ca, cb, S, C, yn);
        else group_norm_rows<TI, TO, false>(xn, ca, cb, S, C, yn);
      });
    });
  }
}

void group_norm_apply(ConstBuf x, const double* mean, const double* var, const float* gamma,
                      const float* beta, int64_t N, int64_t S, int64_t C, int64_t G, float eps,
                      bool fuse_silu, Buf y) {
  gn_apply(x, mean, var, gamma, beta, N, S, C, G, eps, fuse_silu, y);
}

void group_norm(ConstBuf x, const float* gamma, const float* beta, int64_t N, int64_t S, int64_t C,
                int64_t G, float eps, bool fuse_silu, Buf y) {
  static thread_local Scratch<double> buf;
  double* mv = buf.get(size_t(2 * N * G));
  gn_stats(x, N, S, C, G, mv, mv + N * G);
  gn_apply(x, mv, mv + N * G, gamma, beta, N, S, C, G, eps, fuse_silu, y);
}

template <class TI, class TO>
static void layer_norm_t(const TI* x, const float* gamma, const float* beta, int64_t rows,
                         int64_t C, float eps, TO* y) {
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const TI* row = x + r * C;
    TO* out = y + r * C;
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) sum += double(ld(row, c));
    const double mean = sum / double(C);
    double sq = 0;
    for (int64_t c = 0; c < C; ++c) {
      double d = double(ld(row, c)) - mean;
      sq += d * d;
    }
    const float rstd = float(1.0 / std::sqrt(sq / double(C) + double(eps)));
    const float m = float(mean);
    for (int64_t c = 0; c < C; ++c) {
      float v = (ld(row, c) - m) * rstd;
      if (gamma) v *= gamma[c];
      if (beta) v += beta[c];
      st(out, c, v);
    }
  }
}

void layer_norm(ConstBuf x, const float* gamma, const float* beta, int64_t rows, int64_t C,
                float eps, Buf y) {
  with_io(x, y, [&](auto xp, auto yp) { layer_norm_t(xp, gamma, beta, rows, C, eps, yp); });
}

// The exponentials are kept in f32 until the final scaling: in the output row itself when it is
// f32 (as before), else in a per-thread f32 row.
template <class TI, class TO>
static void softmax_t(const TI* x, int64_t rows, int64_t C, TO* y) {
  const int nt = omp_get_max_threads();
  static thread_local Scratch<float> buf;
  float* tmp = std::is_same_v<TO, float> ? nullptr : buf.get(size_t(nt) * C);  // [nt, C]
#pragma omp parallel num_threads(nt) if (rows * C > kParallelMin)
  {
    float* e = tmp ? tmp + int64_t(omp_get_thread_num()) * C : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const TI* row = x + r * C;
      TO* out = y + r * C;
      if constexpr (std::is_same_v<TO, float>) e = out;
      float mx = -INFINITY;
      for (int64_t c = 0; c < C; ++c) {
        const float v = ld(row, c);
        mx = mx < v ? v : mx;  // std::max(mx, v)
      }
      for (int64_t c = 0; c < C; ++c) e[c] = fast_exp(ld(row, c) - mx);
      double sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += double(e[c]);
      const float inv = float(1.0 / sum);
      for (int64_t c = 0; c < C; ++c) st(out, c, e[c] * inv);
    }
  }
}

void softmax(ConstBuf x, int64_t rows, int64_t C, Buf y) {
  with_io(x, y, [&](auto xp, auto yp) { softmax_t(xp, rows, C, yp); });
}

template <class TI, class TO>
static void unary_t(Unary op, const TI* x, int64_t n, TO* y) {
  const bool par = n > kParallelMin;
  switch (op) {
    case Unary::SiLU:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) st(y, i, silu1(ld(x, i)));
      break;
    case Unary::GeluErf:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) st(y, i, gelu_erf1(ld(x, i)));
      break;
    case Unary::GeluTanh:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) {
        float v = ld(x, i);
        st(y, i, 0.5f * v * (1.0f + fast_tanh(0.79788456080286536f * (v + 0.044715f * v * v * v))));
      }
      break;
    case Unary::QuickGelu:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) {
        float v = ld(x, i);
        st(y, i, v / (1.0f + fast_exp(-1.702f * v)));
      }
      break;
    case Unary::LeakyRelu02:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) {
        float v = ld(x, i);
        st(y, i, v < 0.0f ? v * 0.2f : v);
      }
      break;
    case Unary::ReLU:
#pragma omp parallel for schedule(static) if (par)
      for (int64_t i = 0; i < n; ++i) {
        float v = ld(x, i);
        st(y, i, v < 0.0f ? 0.0f : v);  // a NaN stays NaN, as in torch.relu
      }
      break;
  }
}

void unary(Unary op, ConstBuf x, int64_t n, Buf y) {
  with_io(x, y, [&](auto xp, auto yp) { unary_t(op, xp, n, yp); });
}

template <class TI, class TO>
static void geglu_t(const TI* x, int64_t rows, int64_t C, TO* y) {
#pragma omp parallel for schedule(static) if (rows * C > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const TI* h = x + r * 2 * C;
    const TI* g = h + C;
    TO* out = y + r * C;
    for (int64_t c = 0; c < C; ++c) st(out, c, ld(h, c) * gelu_erf1(ld(g, c)));
  }
}

void geglu(ConstBuf x, int64_t rows, int64_t C, Buf y) {
  with_io(x, y, [&](auto xp, auto yp) { geglu_t(xp, rows, C, yp); });
}

template <class TI, class TO>
static void scale_t(const TI* x, float s, int64_t n, TO* y) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) st(y, i, ld(x, i) * s);
}

void scale(ConstBuf x, float s, int64_t n, Buf y) {
  with_io(x, y, [&](auto xp, auto yp) { scale_t(xp, s, n, yp); });
}

// ---------------------------------------------------------------------------------------------
// binary

template <Binary OP>
static inline float apply(float a, float b) {
  if constexpr (OP == Binary::Add) return a + b;
  else return a * b;
}

template <Binary OP, class TA, class TB, class TY>
static void binary_t(const TA* a, const int64_t* shape, int rank, const TB* b,
                     const int64_t* bstr, TY* y) {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[i];
  if (n == 0) return;
  const int64_t C = rank > 0 ? shape[rank - 1] : 1;
  const int64_t rows = n / C;
  // Same shape: b's strides are a's dense strides.
  bool same = true;
  int64_t st_ = 1;
  for (int i = rank - 1; i >= 0; st_ *= shape[i], --i)
    if (shape[i] != 1 && bstr[i] != st_) same = false;
  if (same) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) st(y, i, apply<OP>(ld(a, i), ld(b, i)));
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
    const TA* ar = a + r * C;
    const TB* br = b + off;
    TY* yr = y + r * C;
    if (cstride == 1) {
      for (int64_t c = 0; c < C; ++c) st(yr, c, apply<OP>(ld(ar, c), ld(br, c)));
    } else {
      const float bv = ld(br, 0);
      for (int64_t c = 0; c < C; ++c) st(yr, c, apply<OP>(ld(ar, c), bv));
    }
  }
}

void binary(Binary op, ConstBuf a, const int64_t* a_shape, int rank, ConstBuf b,
            const int64_t* b_strides, Buf y) {
  on_type(a.dtype, [&](auto ta) {
    on_type(b.dtype, [&](auto tb) {
      on_type(y.dtype, [&](auto ty) {
        using TA = typename decltype(ta)::type;
        using TB = typename decltype(tb)::type;
        using TY = typename decltype(ty)::type;
        if (op == Binary::Add)
          binary_t<Binary::Add>(cptr<TA>(a), a_shape, rank, cptr<TB>(b), b_strides, ptr<TY>(y));
        else
          binary_t<Binary::Mul>(cptr<TA>(a), a_shape, rank, cptr<TB>(b), b_strides, ptr<TY>(y));
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------

template <class TI, class TO>
static void upsample_nearest_t(const TI* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho,
                               int64_t Wo, TO* y) {
#pragma omp parallel for schedule(static) if (N * Ho * Wo * C > kParallelMin)
  for (int64_t r = 0; r < N * Ho; ++r) {
    const int64_t n = r / Ho, oy = r % Ho;
    const int64_t iy = oy * H / Ho;
    const TI* src = x + (n * H + iy) * W * C;
    TO* dst = y + r * Wo * C;
    for (int64_t ox = 0; ox < Wo; ++ox) copy_row(src + (ox * W / Wo) * C, dst + ox * C, C);
  }
}

void upsample_nearest(ConstBuf x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho,
                      int64_t Wo, Buf y) {
  with_io(x, y, [&](auto xp, auto yp) { upsample_nearest_t(xp, N, H, W, C, Ho, Wo, yp); });
}

template <class TI, class TO>
static void pixel_unshuffle_t(const TI* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t r, TO* y) {
  const int64_t Ho = H / r, Wo = W / r, Co = C * r * r;
#pragma omp parallel for schedule(static) if (N * H * W * C > kParallelMin)
  for (int64_t row = 0; row < N * Ho; ++row) {
    const int64_t n = row / Ho, oh = row % Ho;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      TO* dst = y + (row * Wo + ow) * Co;
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j) {
          const TI* src = x + ((n * H + oh * r + i) * W + ow * r + j) * C;
          for (int64_t c = 0; c < C; ++c) st(dst, c * r * r + i * r + j, ld(src, c));
        }
    }
  }
}

void pixel_unshuffle(ConstBuf x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t r, Buf y) {
  with_io(x, y, [&](auto xp, auto yp) { pixel_unshuffle_t(xp, N, H, W, C, r, yp); });
}

template <class TA, class TB, class TY>
static void concat_last_t(const TA* a, int64_t Ca, const TB* b, int64_t Cb, int64_t rows, TY* y) {
  const int64_t Cy = Ca + Cb;
#pragma omp parallel for schedule(static) if (rows * Cy > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    copy_row(a + r * Ca, y + r * Cy, Ca);
    copy_row(b + r * Cb, y + r * Cy + Ca, Cb);
  }
}

void concat_last(ConstBuf a, int64_t Ca, ConstBuf b, int64_t Cb, int64_t rows, Buf y) {
  on_type(a.dtype, [&](auto ta) {
    on_type(b.dtype, [&](auto tb) {
      on_type(y.dtype, [&](auto ty) {
        using TA = typename decltype(ta)::type;
        using TB = typename decltype(tb)::type;
        using TY = typename decltype(ty)::type;
        concat_last_t(cptr<TA>(a), Ca, cptr<TB>(b), Cb, rows, ptr<TY>(y));
      });
    });
  });
}
