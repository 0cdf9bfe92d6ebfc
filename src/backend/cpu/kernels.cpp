#include "backend/cpu/kernels.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "core/dtype.h"
#include "core/error.h"
#include "core/threads.h"

namespace diffuse::cpu {

// Below this many elements the OpenMP fork/join costs more than it saves.
static constexpr int64_t kParallelMin = 1 << 14;

// The kernels themselves (kernels_body.h), compiled three times: for the x86-64 baseline (SSE2),
// for AVX2 (8-wide vectors) and for AVX-512 (F/BW/VL: 16-wide vectors, one-instruction bf16
// narrowing), with floating-point contraction off so that no a·b + c becomes an FMA: every copy
// rounds every operation the same way and gives the same bits. The widest copy the CPU and OS
// support runs (every CPU with bf16 compute has AVX-512; AMD Zen 1-3 and many Intel parts stop
// at AVX2).
namespace baseline {
namespace {
#include "backend/cpu/kernels_body.h"
}  // namespace
}  // namespace baseline

#if defined(__GNUC__) && !defined(__clang__)  // (clang: more baseline copies)
#pragma GCC push_options
#pragma GCC target("avx2")
#pragma GCC optimize("fp-contract=off")
#endif
namespace avx2 {
namespace {
#include "backend/cpu/kernels_body.h"
}  // namespace
}  // namespace avx2
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,prefer-vector-width=512")
#pragma GCC optimize("fp-contract=off")
#endif
namespace avx512 {
namespace {
#include "backend/cpu/kernels_body.h"
}  // namespace
}  // namespace avx512
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

bool kernel_isa_supported(KernelIsa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case KernelIsa::Baseline: return true;
    case KernelIsa::Avx2: return f.avx2;
    case KernelIsa::Avx512: return f.avx512f && f.avx512bw && f.avx512vl;
  }
  return false;
}

static std::atomic<int> g_isa{-1};  // -1: not chosen yet

KernelIsa kernel_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = int(kernel_isa_supported(KernelIsa::Avx512) ? KernelIsa::Avx512
            : kernel_isa_supported(KernelIsa::Avx2) ? KernelIsa::Avx2
                                                    : KernelIsa::Baseline);
    g_isa.store(v, std::memory_order_relaxed);
  }
  return KernelIsa(v);
}

void set_kernel_isa(KernelIsa isa) {
  DF_CHECK(kernel_isa_supported(isa), "set_kernel_isa: this CPU has no ",
           isa == KernelIsa::Avx512 ? "AVX-512 (F/BW/VL)" : "AVX2");
  g_isa.store(int(isa), std::memory_order_relaxed);
}

const char* kernel_isa_name(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::Baseline: return "baseline";
    case KernelIsa::Avx2: return "avx2";
    case KernelIsa::Avx512: return "avx512";
  }
  return "?";
}

#define DIFFUSE_DISPATCH(fn, ...)                                        \
  do {                                                                   \
    switch (kernel_isa()) {                                              \
      case KernelIsa::Avx512: avx512::fn(__VA_ARGS__); break;            \
      case KernelIsa::Avx2: avx2::fn(__VA_ARGS__); break;                \
      default: baseline::fn(__VA_ARGS__); break;                         \
    }                                                                    \
  } while (0)

void f32_to_bf16(const float* x, uint16_t* y, int64_t n) { DIFFUSE_DISPATCH(f32_to_bf16, x, y, n); }
void bf16_to_f32(const uint16_t* x, float* y, int64_t n) { DIFFUSE_DISPATCH(bf16_to_f32, x, y, n); }
void group_norm(ConstBuf x, const float* gamma, const float* beta, int64_t N, int64_t S, int64_t C,
                int64_t groups, float eps, bool fuse_silu, Buf y) {
  DIFFUSE_DISPATCH(group_norm, x, gamma, beta, N, S, C, groups, eps, fuse_silu, y);
}
void group_norm_stats(ConstBuf x, int64_t N, int64_t S, int64_t C, int64_t groups, double* mean,
                      double* var) {
  DIFFUSE_DISPATCH(group_norm_stats, x, N, S, C, groups, mean, var);
}
void group_norm_apply(ConstBuf x, const double* mean, const double* var, const float* gamma,
                      const float* beta, int64_t N, int64_t S, int64_t C, int64_t groups, float eps,
                      bool fuse_silu, Buf y) {
  DIFFUSE_DISPATCH(group_norm_apply, x, mean, var, gamma, beta, N, S, C, groups, eps, fuse_silu, y);
}
void layer_norm(ConstBuf x, const float* gamma, const float* beta, int64_t rows, int64_t C,
                float eps, Buf y) {
  DIFFUSE_DISPATCH(layer_norm, x, gamma, beta, rows, C, eps, y);
}
void softmax(ConstBuf x, int64_t rows, int64_t C, Buf y) { DIFFUSE_DISPATCH(softmax, x, rows, C, y); }
void unary(Unary op, ConstBuf x, int64_t n, Buf y) { DIFFUSE_DISPATCH(unary, op, x, n, y); }
void geglu(ConstBuf x, int64_t rows, int64_t C, Buf y) { DIFFUSE_DISPATCH(geglu, x, rows, C, y); }
void scale(ConstBuf x, float s, int64_t n, Buf y) { DIFFUSE_DISPATCH(scale, x, s, n, y); }
void binary(Binary op, ConstBuf a, const int64_t* a_shape, int rank, ConstBuf b,
            const int64_t* b_strides, Buf y) {
  DIFFUSE_DISPATCH(binary, op, a, a_shape, rank, b, b_strides, y);
}
void upsample_nearest(ConstBuf x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho,
                      int64_t Wo, Buf y) {
  DIFFUSE_DISPATCH(upsample_nearest, x, N, H, W, C, Ho, Wo, y);
}
void pixel_unshuffle(ConstBuf x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t r, Buf y) {
  DIFFUSE_DISPATCH(pixel_unshuffle, x, N, H, W, C, r, y);
}
void concat_last(ConstBuf a, int64_t Ca, ConstBuf b, int64_t Cb, int64_t rows, Buf y) {
  DIFFUSE_DISPATCH(concat_last, a, Ca, b, Cb, rows, y);
}

#undef DIFFUSE_DISPATCH

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
