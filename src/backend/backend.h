// The compute backend interface. Models call these ops; the CPU backend implements them with
// oneDNN (convolution, matmul) and its own kernels; a CUDA backend implements the same interface.
//
// Conventions:
//  - Image activations are NHWC ([N, H, W, C]) and dense row-major, so a transformer block's
//    [N, H*W, C] token view is a free reshape.
//  - Outputs are preallocated by the caller (from an Arena) with the right shape; ops check shapes
//    and dtypes and throw diffuse::Error naming the op and the shapes on a mismatch.
//  - Activations are f32 or bf16: every activation input and output of every op (except
//    timestep_embedding, f32 only) may be either, independently (binary(a bf16, b f32) -> y
//    bf16 is fine); an op reads its inputs' dtypes and writes its output's. conv2d/linear/
//    matmul/attention compute as Precision says; the other ops compute in f32 (statistics in
//    double) and round a bf16 output once, to nearest even. Norm gamma/beta and group-norm
//    statistics are f32. An op that may run in place (elementwise ops, group_norm_apply, binary
//    with y == a) does so only when input and output have the same dtype; an output overlapping
//    an input of another dtype is an error.
//  - Precision::BF16 makes conv2d, linear, matmul and attention compute with bf16 inputs and
//    f32 accumulation (AMX or AVX512-BF16); without hardware support the backend says so and
//    falls back to F32 (see effective_precision()).
#pragma once
#include <memory>
#include <string>

#include "core/tensor.h"

namespace diffuse {

enum class Precision { F32, BF16 };
const char* precision_name(Precision p);  // "fp32", "bf16"

// How conv2d/linear weights are stored after prepare_*. Native: in the compute type (bf16 or
// f32). Int8: symmetric int8 with one f32 scale per output channel (scale = max|w_o| / 127,
// q = round(w / scale); an all-zero channel gets scale 1) plus the f32 bias, about half the
// memory of bf16; at run time each layer's q is converted to the compute type (exactly) and
// its output scaled per channel (weight-only: activations keep the compute type).
enum class WeightFormat { Native, Int8 };
const char* weight_format_name(WeightFormat f);  // "native", "int8"

struct Conv2dParams {
  int stride = 1;
  int pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  static Conv2dParams same(int k, int stride = 1) {  // symmetric (k-1)/2 padding
    int p = (k - 1) / 2;
    return {stride, p, p, p, p};
  }
};

// Weights prepared once at load for one backend (reordered, converted). Opaque to callers.
class PreparedWeight {
 public:
  virtual ~PreparedWeight() = default;
  virtual const Shape& shape() const = 0;  // the original weight shape
  // Exchanges what this weight and `other` hold (same backend, kind and shape; checked): the
  // layers holding this object run the other's values from now on. Never throws after its
  // checks, so a set of prepared replacements can be swapped in all-or-nothing. Not while a pass
  // that uses either weight runs.
  virtual void swap_contents(PreparedWeight& other) = 0;
};

// LeakyRelu02: LeakyReLU with negative slope 0.2 (x for x >= 0, else 0.2·x; ESRGAN's activation).
// ReLU: max(x, 0) (TAESD's activation).
enum class Unary { SiLU, GeluErf, GeluTanh, QuickGelu, LeakyRelu02, ReLU };
enum class Binary { Add, Mul };

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;             // "cpu"
  virtual Precision precision() const = 0;          // requested
  virtual Precision effective_precision() const = 0;  // what runs (after any fallback)
  virtual WeightFormat weight_format() const { return WeightFormat::Native; }
  // The implementation last chosen for an op kind ("conv2d_3x3", "attention", "matmul", ...),
  // e.g. oneDNN's "brg:avx512_core_amx_bf16"; empty if unknown. For benchmarks and logs.
  virtual std::string describe(const std::string& op) const { return {}; }
  // Frees the backend's own scratch buffers (conversion and dequantisation buffers; they grow
  // again on demand), e.g. between the denoising loop and the VAE decode.
  virtual void release_scratch() {}

  // ---- weights (once, at load) ----
  // w: [O, I, kh, kw] (any float dtype), bias: [O] or undefined.
  virtual std::shared_ptr<PreparedWeight> prepare_conv2d(const Tensor& w, const Tensor& bias,
                                                         const Conv2dParams& p) = 0;
  // w: [O, I] (any float dtype), bias: [O] or undefined.
  virtual std::shared_ptr<PreparedWeight> prepare_linear(const Tensor& w, const Tensor& bias) = 0;
  // A replacement for `like` (prepared by this backend: same kind, shape and parameters) holding
  // `w` and `bias` in every layout `like` holds now, so that like.swap_contents(replacement)
  // keeps like's primitives (the next pass creates and reorders nothing). Default: a plain
  // prepare_conv2d / prepare_linear.
  virtual std::shared_ptr<PreparedWeight> prepare_like(const PreparedWeight& like, const Tensor& w, const Tensor& bias,
                                                       bool conv, const Conv2dParams& p) {
    return conv ? prepare_conv2d(w, bias, p) : prepare_linear(w, bias);
  }

  // ---- ops ----
  // x: [N, H, W, I] -> y: [N, Ho, Wo, O]
  virtual void conv2d(const Tensor& x, const PreparedWeight& w, Tensor& y) = 0;
  // x: [..., I] -> y: [..., O]   (y = x·Wᵀ + b)
  virtual void linear(const Tensor& x, const PreparedWeight& w, Tensor& y) = 0;
  // a: [B, M, K]; b: [B, K, N] (or [B, N, K] with trans_b) -> c: [B, M, N] = alpha · a·b
  virtual void matmul(const Tensor& a, const Tensor& b, Tensor& c, bool trans_b, float alpha) = 0;
  // q: [B, Nq, H*D], k, v: [B, Nk, H*D] -> o: [B, Nq, H*D]; softmax(q·kᵀ·scale)·v per head,
  // fused (never materialises the Nq×Nk score matrix).
  virtual void attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale,
                         Tensor& o) = 0;

  // x: [N, S..., C] (NHWC or tokens), normalised over (S, C/groups) per group; gamma, beta: [C].
  virtual void group_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups,
                          float eps, bool fuse_silu, Tensor& y) = 0;
  // The statistics group_norm normalises with, for normalising several parts of one tensor alike
  // (tiled VAE): x: [N, S..., C] -> mean, var: [N, groups] f32, the per-(sample, group) mean and
  // biased variance over (S, C/groups). (The variance rather than rstd: statistics of parts
  // combine exactly, and eps stays with the layer.)
  virtual void group_norm_stats(const Tensor& x, int groups, Tensor& mean, Tensor& var) = 0;
  // group_norm with given statistics: y = (x - mean)·gamma/sqrt(var + eps) + beta per (sample,
  // group), optionally SiLU. mean, var: [N, groups] f32 (e.g. from group_norm_stats).
  virtual void group_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var,
                                const Tensor& gamma, const Tensor& beta, int groups, float eps,
                                bool fuse_silu, Tensor& y) = 0;
  // x: [..., C] normalised over C; gamma, beta: [C].
  virtual void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                          Tensor& y) = 0;
  // Softmax over the last dim.
  virtual void softmax(const Tensor& x, Tensor& y) = 0;
  virtual void unary(Unary op, const Tensor& x, Tensor& y) = 0;
  // x: [..., 2C] -> y: [..., C] = x[..., :C] · gelu_erf(x[..., C:])
  virtual void geglu(const Tensor& x, Tensor& y) = 0;
  // y = a op b, b broadcast to a's shape (numpy rules, aligned at the last dim).
  virtual void binary(Binary op, const Tensor& a, const Tensor& b, Tensor& y) = 0;
  // y = x · s
  virtual void scale(const Tensor& x, float s, Tensor& y) = 0;
  // x: [N, H, W, C] -> y: [N, Ho, Wo, C], nearest (source index floor(i · H / Ho)).
  virtual void upsample_nearest(const Tensor& x, Tensor& y) = 0;
  // x: [N, H·r, W·r, C] -> y: [N, H, W, C·r²]: PyTorch's pixel_unshuffle (space to depth) in
  // NHWC, y[n, h, w, c·r² + i·r + j] = x[n, h·r + i, w·r + j, c]. y must not alias x.
  virtual void pixel_unshuffle(const Tensor& x, int r, Tensor& y) = 0;
  // a: [..., Ca], b: [..., Cb] -> y: [..., Ca + Cb]
  virtual void concat_last(const Tensor& a, const Tensor& b, Tensor& y) = 0;
  // t: [N] (f32 timesteps) -> y: [N, dim]; diffusers' get_timestep_embedding.
  virtual void timestep_embedding(const Tensor& t, int dim, bool flip_sin_to_cos,
                                  float downscale_freq_shift, float max_period, Tensor& y) = 0;

  // ---- backward passes (training) ----
  // Gradients of the ops above. Every tensor is f32 (compute is f32, accumulation in f32; norm
  // statistics in double), dense, shaped as in the forward op. `dy` is dL/d(output); an output
  // gradient dx is overwritten unless the op says "+=" (parameter gradients accumulate, so
  // micro-batches and shared weights add up). Optional outputs are pointers (null: not wanted).
  // Weights are the plain checkpoint tensors (f32 [O, I, kh, kw] / [O, I]), not prepared ones:
  // training keeps them (models/ and train/ hold them per layer).

  // conv2d: dy [N, Ho, Wo, O], w [O, I, kh, kw], same params as the forward -> dx [N, H, W, I].
  virtual void conv2d_backward_data(const Tensor& dy, const Tensor& w, const Conv2dParams& p, Tensor& dx) = 0;
  // x [N, H, W, I], dy [N, Ho, Wo, O] -> dw [O, I, kh, kw] +=, db [O] +=.
  virtual void conv2d_backward_weights(const Tensor& x, const Tensor& dy, const Conv2dParams& p, Tensor* dw,
                                       Tensor* db) = 0;
  // linear (y = x·Wᵀ + b): dy [..., O], w [O, I] -> dx [..., I] (+= when accumulate).
  virtual void linear_backward_data(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate = false) = 0;
  // x [..., I], dy [..., O] -> dw [O, I] +=, db [O] +=.
  virtual void linear_backward_weights(const Tensor& x, const Tensor& dy, Tensor* dw, Tensor* db) = 0;
  // matmul c = alpha·a·b (b [B, K, N]) or alpha·a·bᵀ (trans_b: b [B, N, K]); dc [B, M, N] ->
  // da [B, M, K], db shaped as b (overwritten; either may be null).
  virtual void matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dc, bool trans_b, float alpha,
                               Tensor* da, Tensor* db) = 0;
  // attention: q, k, v and the forward's output o, do = dL/do -> dq, dk, dv (overwritten). Fused
  // as flash attention's backward: scores are recomputed block by block (memory O(N·D), never
  // Nq×Nk).
  virtual void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                  const Tensor& d_o, int heads, float scale, Tensor& dq, Tensor& dk,
                                  Tensor& dv) = 0;
  // group_norm (optionally fused SiLU): x, gamma, beta, dy -> dx; dgamma, dbeta [C] +=.
  virtual void group_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups, float eps,
                                   bool fused_silu, const Tensor& dy, Tensor& dx, Tensor* dgamma, Tensor* dbeta) = 0;
  // layer_norm: x, gamma, dy -> dx; dgamma, dbeta [C] +=.
  virtual void layer_norm_backward(const Tensor& x, const Tensor& gamma, float eps, const Tensor& dy, Tensor& dx,
                                   Tensor* dgamma, Tensor* dbeta) = 0;
  // softmax over the last dim, from its output y: dx = y·(dy − Σ dy·y).
  virtual void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx) = 0;
  // unary: x (the forward's input), dy -> dx (may alias dy).
  virtual void unary_backward(Unary op, const Tensor& x, const Tensor& dy, Tensor& dx) = 0;
  // geglu: x [..., 2C], dy [..., C] -> dx [..., 2C].
  virtual void geglu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) = 0;
  // The gradient of a broadcast operand: dy summed over the dims where `db` (shape of the
  // broadcast operand b) was broadcast to dy's shape (numpy rules) -> db (overwritten).
  virtual void sum_to(const Tensor& dy, Tensor& db) = 0;
  // upsample_nearest: dy [N, Ho, Wo, C] -> dx [N, H, W, C] (each source sums the outputs it fed).
  virtual void upsample_nearest_backward(const Tensor& dy, Tensor& dx) = 0;
  // concat_last: dy [..., Ca + Cb] -> da [..., Ca], db [..., Cb].
  virtual void split_last(const Tensor& dy, Tensor& da, Tensor& db) = 0;
  // timestep_embedding: dy [N, dim] -> dt [N] (d/dt of the sinusoids; same settings as forward).
  virtual void timestep_embedding_backward(const Tensor& t, int dim, bool flip_sin_to_cos,
                                           float downscale_freq_shift, float max_period, const Tensor& dy,
                                           Tensor& dt) = 0;
  // y += a·x (f32, same shapes): gradient accumulation and optimisers' elementwise updates.
  virtual void axpy(float a, const Tensor& x, Tensor& y) = 0;
};

// The CPU backend (oneDNN + own kernels). Threads follow set_num_threads().
std::unique_ptr<Backend> make_cpu_backend(Precision p, WeightFormat wf = WeightFormat::Native);

}  // namespace diffuse
