// The CPU backend's own kernels: normalisation, activations, elementwise ops, resampling and the
// timestep embedding. Multi-threaded with OpenMP; plain loops written so GCC vectorises them, at
// the x86-64 baseline (SSE2) and again for AVX2 and for AVX-512 (see KernelIsa).
//
// Activation arguments (ConstBuf/Buf) are f32 or bf16, each independently (any other dtype is
// read as f32: callers validate). Compute is f32 (statistics in double); a bf16 output is rounded
// once, to nearest even (as diffuse::f32_to_bf16; NaN stays NaN). With every buffer f32 the
// results are the same bits as the f32-only kernels these replaced. gamma/beta and statistics are
// always f32/double.
// Callers (CpuBackend) validate shapes; these take raw pointers and sizes. Unless noted, y may
// alias x when both have the same dtype (elementwise kernels, group_norm_apply, binary's y == a);
// buffers of different dtypes must not overlap.
#pragma once
#include <cstdint>

#include "backend/backend.h"

namespace diffuse::cpu {

// An activation buffer: data and element type (DType::F32 or DType::BF16).
struct ConstBuf {
  const void* data;
  DType dtype;
};
struct Buf {
  void* data;
  DType dtype;
};

// Which compiled copy of the kernels runs: the x86-64 baseline (SSE2), AVX2 or AVX-512 (F/BW/VL).
// All give the same bits (no FMA contraction, same operation order; a NaN result may be another
// NaN); the widest the CPU and OS support is the default. set_kernel_isa() is for tests and
// benchmarks (an ISA the CPU lacks is an error); not thread-safe against running kernels.
enum class KernelIsa { Baseline, Avx512, Avx2 };
KernelIsa kernel_isa();
void set_kernel_isa(KernelIsa isa);
bool kernel_isa_supported(KernelIsa isa);
const char* kernel_isa_name(KernelIsa isa);  // "baseline", "avx512", "avx2"

void f32_to_bf16(const float* x, uint16_t* y, int64_t n);
void bf16_to_f32(const uint16_t* x, float* y, int64_t n);

// x: [N, S, C] (C innermost), groups over C; gamma/beta: [C] or null (identity).
void group_norm(ConstBuf x, const float* gamma, const float* beta, int64_t N, int64_t S, int64_t C,
                int64_t groups, float eps, bool fuse_silu, Buf y);
// The statistics group_norm uses: per (sample, group) mean and biased variance, [N · groups] each.
void group_norm_stats(ConstBuf x, int64_t N, int64_t S, int64_t C, int64_t groups, double* mean,
                      double* var);
// group_norm with given statistics (mean, var: [N · groups]); rstd = 1/sqrt(var + eps).
void group_norm_apply(ConstBuf x, const double* mean, const double* var, const float* gamma,
                      const float* beta, int64_t N, int64_t S, int64_t C, int64_t groups, float eps,
                      bool fuse_silu, Buf y);
// x: [rows, C]; gamma/beta: [C] or null.
void layer_norm(ConstBuf x, const float* gamma, const float* beta, int64_t rows, int64_t C,
                float eps, Buf y);
void softmax(ConstBuf x, int64_t rows, int64_t C, Buf y);
void unary(Unary op, ConstBuf x, int64_t n, Buf y);
// x: [rows, 2C] -> y: [rows, C] (y must not alias x).
void geglu(ConstBuf x, int64_t rows, int64_t C, Buf y);
void scale(ConstBuf x, float s, int64_t n, Buf y);

// y = a op b over `a_shape`, where b is broadcast: `b_strides[i]` is b's element stride along
// a's dim i (0 where broadcast). rank <= 8.
void binary(Binary op, ConstBuf a, const int64_t* a_shape, int rank, ConstBuf b,
            const int64_t* b_strides, Buf y);

// x: [N, H, W, C] -> y: [N, Ho, Wo, C], source index floor(i * H / Ho). y must not alias x.
void upsample_nearest(ConstBuf x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho,
                      int64_t Wo, Buf y);
// x: [N, H, W, C] (H, W multiples of r) -> y: [N, H/r, W/r, C·r²], PyTorch's pixel_unshuffle
// channel order (c·r² + i·r + j). y must not alias x.
void pixel_unshuffle(ConstBuf x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t r, Buf y);
// a: [rows, Ca], b: [rows, Cb] -> y: [rows, Ca + Cb] (y must not alias a or b).
void concat_last(ConstBuf a, int64_t Ca, ConstBuf b, int64_t Cb, int64_t rows, Buf y);
// diffusers' get_timestep_embedding (scale 1), rounding as PyTorch's fp32 ops do.
void timestep_embedding(const float* t, int64_t N, int64_t dim, bool flip_sin_to_cos,
                        float downscale_freq_shift, float max_period, float* y);

}  // namespace diffuse::cpu
