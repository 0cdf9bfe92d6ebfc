// A Backend that times every op call of the backend it wraps, by op class, and keeps the shapes
// of the convolutions and matmuls it saw so that each can be timed again alone (`diffuse bench
// --profile`). The wrapped backend does the work; this one only measures (a steady-clock read
// before and after each call: ~50 ns an op). Prepared weights come from the wrapped backend (or
// one of its kind) and are passed through untouched.
//
// Not for concurrent use: one caller at a time, as any run's backend.
#pragma once
#include <array>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace diffuse {

enum class OpClass { Conv, Matmul, Attention, Norm, Elementwise, Layout, Other };
constexpr int kOpClasses = 7;
const char* op_class_name(OpClass c);  // "conv", "matmul", "attention", "norm", "elementwise", "layout", "other"

// One convolution or matmul shape as the pipeline ran it, with what is needed to run it again.
struct OpShape {
  std::string op;     // "conv2d", "linear", "matmul"
  std::string shape;  // e.g. "3x3/1 [2,64,64,320] -> [2,64,64,320] bf16->bf16"
  int64_t calls = 0;
  double secs = 0;    // summed over the calls
  double flop = 0;    // per call
  // Replay: the inputs' and output's shapes and dtypes, the weight (conv2d, linear; must still be
  // alive when replayed) or the matmul's transposition and scale.
  Shape x, b, y;
  DType x_dtype = DType::F32, b_dtype = DType::F32, y_dtype = DType::F32;
  const PreparedWeight* weight = nullptr;
  bool trans_b = false;
  float alpha = 1.0f;
};

struct OpProfile {
  std::array<double, kOpClasses> secs{};     // time inside op calls, by class
  std::array<int64_t, kOpClasses> calls{};
  std::map<std::string, OpShape> shapes;     // conv2d / linear / matmul, by op + shape
  double total() const;
};

class ProfilingBackend : public Backend {
 public:
  explicit ProfilingBackend(std::unique_ptr<Backend> inner);
  Backend& inner() { return *inner_; }
  const OpProfile& profile() const { return prof_; }
  void reset() { prof_ = OpProfile{}; }

  std::string name() const override { return inner_->name(); }
  Precision precision() const override { return inner_->precision(); }
  Precision effective_precision() const override { return inner_->effective_precision(); }
  WeightFormat weight_format() const override { return inner_->weight_format(); }
  std::string describe(const std::string& op) const override { return inner_->describe(op); }
  void release_scratch() override { inner_->release_scratch(); }

  std::shared_ptr<PreparedWeight> prepare_conv2d(const Tensor& w, const Tensor& bias, const Conv2dParams& p) override {
    return inner_->prepare_conv2d(w, bias, p);
  }
  std::shared_ptr<PreparedWeight> prepare_linear(const Tensor& w, const Tensor& bias) override {
    return inner_->prepare_linear(w, bias);
  }
  std::shared_ptr<PreparedWeight> prepare_like(const PreparedWeight& like, const Tensor& w, const Tensor& bias, bool conv,
                                               const Conv2dParams& p) override {
    return inner_->prepare_like(like, w, bias, conv, p);
  }

  void conv2d(const Tensor& x, const PreparedWeight& w, Tensor& y) override;
  void linear(const Tensor& x, const PreparedWeight& w, Tensor& y) override;
  void matmul(const Tensor& a, const Tensor& b, Tensor& c, bool trans_b, float alpha) override;
  void attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o) override;
  void group_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups, float eps, bool fuse_silu,
                  Tensor& y) override;
  void group_norm_stats(const Tensor& x, int groups, Tensor& mean, Tensor& var) override;
  void group_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& gamma, const Tensor& beta,
                        int groups, float eps, bool fuse_silu, Tensor& y) override;
  void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y) override;
  void softmax(const Tensor& x, Tensor& y) override;
  void unary(Unary op, const Tensor& x, Tensor& y) override;
  void geglu(const Tensor& x, Tensor& y) override;
  void binary(Binary op, const Tensor& a, const Tensor& b, Tensor& y) override;
  void scale(const Tensor& x, float s, Tensor& y) override;
  void upsample_nearest(const Tensor& x, Tensor& y) override;
  void pixel_unshuffle(const Tensor& x, int r, Tensor& y) override;
  void concat_last(const Tensor& a, const Tensor& b, Tensor& y) override;
  void timestep_embedding(const Tensor& t, int dim, bool flip_sin_to_cos, float downscale_freq_shift, float max_period,
                          Tensor& y) override;

  // Training's backward ops: passed through, timed as "other".
  void conv2d_backward_data(const Tensor& dy, const Tensor& w, const Conv2dParams& p, Tensor& dx) override;
  void conv2d_backward_weights(const Tensor& x, const Tensor& dy, const Conv2dParams& p, Tensor* dw, Tensor* db) override;
  void linear_backward_data(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) override;
  void linear_backward_weights(const Tensor& x, const Tensor& dy, Tensor* dw, Tensor* db) override;
  void matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dc, bool trans_b, float alpha, Tensor* da,
                       Tensor* db) override;
  void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& d_o,
                          int heads, float scale, Tensor& dq, Tensor& dk, Tensor& dv) override;
  void group_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups, float eps,
                           bool fused_silu, const Tensor& dy, Tensor& dx, Tensor* dgamma, Tensor* dbeta) override;
  void layer_norm_backward(const Tensor& x, const Tensor& gamma, float eps, const Tensor& dy, Tensor& dx, Tensor* dgamma,
                           Tensor* dbeta) override;
  void softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx) override;
  void unary_backward(Unary op, const Tensor& x, const Tensor& dy, Tensor& dx) override;
  void geglu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) override;
  void sum_to(const Tensor& dy, Tensor& db) override;
  void upsample_nearest_backward(const Tensor& dy, Tensor& dx) override;
  void split_last(const Tensor& dy, Tensor& da, Tensor& db) override;
  void timestep_embedding_backward(const Tensor& t, int dim, bool flip_sin_to_cos, float downscale_freq_shift,
                                   float max_period, const Tensor& dy, Tensor& dt) override;
  void axpy(float a, const Tensor& x, Tensor& y) override;

 private:
  template <class F>
  void timed(OpClass c, F&& f);
  void record_shape(OpShape s, double secs);

  std::unique_ptr<Backend> inner_;
  OpProfile prof_;
};

// Runs a recorded shape alone on `be` (the backend that prepared its weight, or one of its kind):
// random inputs in the dtype `act` (the backend's best: bf16 in bf16 mode), output in `act`; one
// warm-up call, then the median of `repeats` calls, in seconds.
double time_shape_alone(Backend& be, const OpShape& s, DType act, int repeats);

// Standard-normal values (std::mt19937 seeded with `seed`), drawn in f32 and converted to `dt`:
// benchmark inputs.
Tensor random_normal(const Shape& s, DType dt, uint32_t seed);

}  // namespace diffuse
