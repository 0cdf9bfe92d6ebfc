// The CPU backend's own kernels: normalisation, activations, elementwise ops, resampling and the
// timestep embedding. All f32 in / f32 out, f32 compute (statistics in double), multi-threaded
// with OpenMP; plain loops written so GCC vectorises them at the x86-64 baseline (SSE2).
// Callers (CpuBackend) validate shapes; these take raw pointers and sizes. Unless noted, y may
// alias x (elementwise kernels).
#pragma once
#include <cstdint>

#include "backend/backend.h"

namespace diffuse::cpu {

void f32_to_bf16(const float* x, uint16_t* y, int64_t n);
void bf16_to_f32(const uint16_t* x, float* y, int64_t n);

// x: [N, S, C] (C innermost), groups over C; gamma/beta: [C] or null (identity).
void group_norm(const float* x, const float* gamma, const float* beta, int64_t N, int64_t S,
                int64_t C, int64_t groups, float eps, bool fuse_silu, float* y);
// x: [rows, C]; gamma/beta: [C] or null.
void layer_norm(const float* x, const float* gamma, const float* beta, int64_t rows, int64_t C,
                float eps, float* y);
void softmax(const float* x, int64_t rows, int64_t C, float* y);
void unary(Unary op, const float* x, int64_t n, float* y);
// x: [rows, 2C] -> y: [rows, C] (y must not alias x).
void geglu(const float* x, int64_t rows, int64_t C, float* y);
void scale(const float* x, float s, int64_t n, float* y);

// y = a op b over `a_shape`, where b is broadcast: `b_strides[i]` is b's element stride along
// a's dim i (0 where broadcast). rank <= 8.
void binary(Binary op, const float* a, const int64_t* a_shape, int rank, const float* b,
            const int64_t* b_strides, float* y);

// x: [N, H, W, C] -> y: [N, Ho, Wo, C], source index floor(i * H / Ho). y must not alias x.
void upsample_nearest(const float* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t Ho,
                      int64_t Wo, float* y);
// a: [rows, Ca], b: [rows, Cb] -> y: [rows, Ca + Cb].
void concat_last(const float* a, int64_t Ca, const float* b, int64_t Cb, int64_t rows, float* y);
// diffusers' get_timestep_embedding (scale 1), rounding as PyTorch's fp32 ops do.
void timestep_embedding(const float* t, int64_t N, int64_t dim, bool flip_sin_to_cos,
                        float downscale_freq_shift, float max_period, float* y);

}  // namespace diffuse::cpu
