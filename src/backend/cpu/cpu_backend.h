// The CPU backend: oneDNN for convolution/linear/matmul, fused attention kernels (attention.h)
// and own OpenMP kernels (kernels.h) for everything else.
//
// Precision::BF16 runs conv2d/linear/matmul with bf16 sources and weights and f32 accumulation;
// f32 sources are converted into a backend-owned scratch buffer first (reused: no heap
// allocation once it has grown). Without AMX or AVX512-BF16 a BF16 request falls back to F32
// (one line on stderr) and effective_precision() says F32.
//
// Primitives are created once per input shape and cached (in the prepared weight for
// conv2d/linear, in the backend for matmul); primitives_created() counts them so tests and
// benchmarks can check that a steady-state forward creates none. One backend is used from one
// thread at a time.
#pragma once
#include <memory>
#include <string>

#include "backend/backend.h"
#include "backend/cpu/onednn.h"

namespace diffuse {

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(Precision p, WeightFormat wf = WeightFormat::Native);

  std::string name() const override { return "cpu"; }
  Precision precision() const override { return requested_; }
  Precision effective_precision() const override { return effective_; }
  WeightFormat weight_format() const override { return format_; }

  std::shared_ptr<PreparedWeight> prepare_conv2d(const Tensor& w, const Tensor& bias,
                                                 const Conv2dParams& p) override;
  std::shared_ptr<PreparedWeight> prepare_linear(const Tensor& w, const Tensor& bias) override;
  std::shared_ptr<PreparedWeight> prepare_like(const PreparedWeight& like, const Tensor& w, const Tensor& bias,
                                               bool conv, const Conv2dParams& p) override;

  void conv2d(const Tensor& x, const PreparedWeight& w, Tensor& y) override;
  void linear(const Tensor& x, const PreparedWeight& w, Tensor& y) override;
  void matmul(const Tensor& a, const Tensor& b, Tensor& c, bool trans_b, float alpha) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale,
                 Tensor& o) override;

  void group_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups, float eps,
                  bool fuse_silu, Tensor& y) override;
  void group_norm_stats(const Tensor& x, int groups, Tensor& mean, Tensor& var) override;
  void group_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& gamma,
                        const Tensor& beta, int groups, float eps, bool fuse_silu, Tensor& y) override;
  void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                  Tensor& y) override;
  void softmax(const Tensor& x, Tensor& y) override;
  void unary(Unary op, const Tensor& x, Tensor& y) override;
  void geglu(const Tensor& x, Tensor& y) override;
  void binary(Binary op, const Tensor& a, const Tensor& b, Tensor& y) override;
  void scale(const Tensor& x, float s, Tensor& y) override;
  void upsample_nearest(const Tensor& x, Tensor& y) override;
  void pixel_unshuffle(const Tensor& x, int r, Tensor& y) override;
  void concat_last(const Tensor& a, const Tensor& b, Tensor& y) override;
  void timestep_embedding(const Tensor& t, int dim, bool flip_sin_to_cos,
                          float downscale_freq_shift, float max_period, Tensor& y) override;

  // ---- backward passes (backward.cpp; attention: attention_backward.cpp) ----
  void conv2d_backward_data(const Tensor& dy, const Tensor& w, const Conv2dParams& p, Tensor& dx) override;
  void conv2d_backward_weights(const Tensor& x, const Tensor& dy, const Conv2dParams& p, Tensor* dw,
                               Tensor* db) override;
  void linear_backward_data(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate = false) override;
  void linear_backward_weights(const Tensor& x, const Tensor& dy, Tensor* dw, Tensor* db) override;
  void matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dc, bool trans_b, float alpha, Tensor* da,
                       Tensor* db) override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& d_o,
                          int heads, float scale, Tensor& dq, Tensor& dk, Tensor& dv) override;
  void group_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups, float eps,
                           bool fused_silu, const Tensor& dy, Tensor& dx, Tensor* dgamma, Tensor* dbeta) override;
  void layer_norm_backward(const Tensor& x, const Tensor& gamma, float eps, const Tensor& dy, Tensor& dx,
                           Tensor* dgamma, Tensor* dbeta) override;
  void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx) override;
  void unary_backward(Unary op, const Tensor& x, const Tensor& dy, Tensor& dx) override;
  void geglu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) override;
  void sum_to(const Tensor& dy, Tensor& db) override;
  void upsample_nearest_backward(const Tensor& dy, Tensor& dx) override;
  void split_last(const Tensor& dy, Tensor& da, Tensor& db) override;
  void timestep_embedding_backward(const Tensor& t, int dim, bool flip_sin_to_cos, float downscale_freq_shift,
                                   float max_period, const Tensor& dy, Tensor& dt) override;
  void axpy(float a, const Tensor& x, Tensor& y) override;

  // ---- introspection (benchmarks, tests) ----
  std::string describe(const std::string& op) const override;
  // oneDNN kernel of the last primitive created for this weight ("brg_conv_fwd:avx512_core_amx",
  // "brg:avx512_core_bf16", ...); empty before its first forward.
  static std::string impl_info(const PreparedWeight& w);
  // Kernel of the last primitive created by this backend for "conv2d", "linear" or "matmul".
  std::string last_impl(const std::string& op) const;
  // oneDNN primitives (incl. weight reorders) created by all backends since process start.
  static size_t primitives_created() { return cpu::primitives_created(); }
  void release_scratch() override;

 private:
  dnnl::memory::data_type compute_dt() const;

  Precision requested_, effective_;
  cpu::Scratch scratch_[3];  // 0, 1: converted sources; 2: f32 output for a bf16 y in f32 mode
  WeightFormat format_ = WeightFormat::Native;
  cpu::Scratch dequant_;     // int8 weights: one layer's dequantised weights at a time
  cpu::MatmulCache matmuls_;
  std::string last_conv_, last_linear_;
};

}  // namespace diffuse
