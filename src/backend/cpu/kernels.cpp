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

// The kernels themselves (kernels_body.h), compiled twice: for the x86-64 baseline (SSE2) and
// for AVX-512 (F/BW/VL: 16-wide vectors, one-instruction bf16 narrowing), with floating-point
// contraction off so that no a·b + c becomes an FMA: both copies round every operation the same
// way and give the same bits. The AVX-512 copy runs where the CPU and OS support it (every CPU
// with bf16 compute does).
namespace baseline {
namespace {
#include "backend/cpu/kernels_body.h"
}  // namespace
}  // namespace baseline

#if defined(__GNUC__) && !defined(__clang__)  // (clang: a second baseline copy)
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

static bool avx512_supported() {
  const CpuFeatures& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512vl;
}

static std::atomic<int> g_isa{-1};  // -1: not chosen yet

KernelIsa kernel_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = int(avx512_supported() ? KernelIsa::Avx512 : KernelIsa::Baseline);
    g_isa.store(v, std::memory_order_relaxed);
  }
  return KernelIsa(v);
}

void set_kernel_isa(KernelIsa isa) {
  DF_CHECK(isa != KernelIsa::Avx512 || avx512_supported(),
           "set_kernel_isa: this CPU has no AVX-512 (F/BW/VL)");
  g_isa.store(int(isa), std::memory_order_relaxed);
}

const char* kernel_isa_name(KernelIsa isa) { return isa == KernelIsa::Avx512 ? "avx512" : "baseline"; }

#define DIFFUSE_DISPATCH(fn, ...)                                        \
  do {                                                                   \
    if (kernel_isa() == KernelIsa::Avx512) avx512::fn(__VA_ARGS__);      \
    else baseline::fn(__VA_ARGS__);                                      \
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
