// Op timing by class and by convolution/matmul shape (profiling.h).
#include "backend/profiling.h"

#include <algorithm>
#include <chrono>
#include <random>

#include "core/error.h"

namespace diffuse {

namespace {

using Clock = std::chrono::steady_clock;

std::string compact(const Shape& s) {
  std::string out = "[";
  for (int i = 0; i < s.rank(); ++i) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t rows_of(const Shape& s) { return s.rank() ? s.numel() / s[s.rank() - 1] : 0; }

// A conv2d or linear call's shape record.
OpShape weighted(const char* op, std::string shape, double flop, const Tensor& x, const PreparedWeight& w, const Tensor& y) {
  OpShape s;
  s.op = op;
  s.shape = std::move(shape);
  s.flop = flop;
  s.x = x.shape();
  s.y = y.shape();
  s.x_dtype = x.dtype();
  s.y_dtype = y.dtype();
  s.weight = &w;
  return s;
}

}  // namespace

Tensor random_normal(const Shape& s, DType dt, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Tensor t = Tensor::empty(s, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = nd(rng);
  return dt == DType::F32 ? t : t.to(dt);
}

const char* op_class_name(OpClass c) {
  switch (c) {
    case OpClass::Conv: return "conv";
    case OpClass::Matmul: return "matmul";
    case OpClass::Attention: return "attention";
    case OpClass::Norm: return "norm";
    case OpClass::Elementwise: return "elementwise";
    case OpClass::Layout: return "layout";
    case OpClass::Other: return "other";
  }
  return "?";
}

double OpProfile::total() const {
  double t = 0;
  for (double s : secs) t += s;
  return t;
}

ProfilingBackend::ProfilingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {
  DF_CHECK(inner_, "ProfilingBackend: no backend to wrap");
}

template <class F>
void ProfilingBackend::timed(OpClass c, F&& f) {
  const Clock::time_point t0 = Clock::now();
  f();
  prof_.secs[size_t(c)] += std::chrono::duration<double>(Clock::now() - t0).count();
  prof_.calls[size_t(c)] += 1;
}

void ProfilingBackend::record_shape(OpShape s, double secs) {
  const std::string key = s.op + " " + s.shape;
  auto it = prof_.shapes.find(key);
  if (it == prof_.shapes.end()) it = prof_.shapes.emplace(key, std::move(s)).first;
  it->second.calls += 1;
  it->second.secs += secs;
}

// x: [N, H, W, I] -> y: [N, Ho, Wo, O]
void ProfilingBackend::conv2d(const Tensor& x, const PreparedWeight& w, Tensor& y) {
  const Clock::time_point t0 = Clock::now();
  timed(OpClass::Conv, [&] { inner_->conv2d(x, w, y); });
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const Shape& ws = w.shape();  // [O, I, kh, kw]
  const int64_t stride = y.dim(1) > 0 ? std::max<int64_t>(1, x.dim(1) / y.dim(1)) : 1;
  record_shape(weighted("conv2d",
                        std::to_string(ws[2]) + "x" + std::to_string(ws[3]) + "/" + std::to_string(stride) + " " +
                            compact(x.shape()) + " -> " + compact(y.shape()) + " " + dtype_name(x.dtype()) + "->" +
                            dtype_name(y.dtype()),
                        2.0 * double(y.numel()) * double(ws[1] * ws[2] * ws[3]), x, w, y),
               secs);
}

// x: [..., I] -> y: [..., O]
void ProfilingBackend::linear(const Tensor& x, const PreparedWeight& w, Tensor& y) {
  const Clock::time_point t0 = Clock::now();
  timed(OpClass::Matmul, [&] { inner_->linear(x, w, y); });
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const Shape& ws = w.shape();  // [O, I]
  record_shape(weighted("linear", compact(x.shape()) + " x " + compact(ws) + " " + dtype_name(x.dtype()) + "->" +
                                      dtype_name(y.dtype()),
                        2.0 * double(rows_of(x.shape())) * double(ws[0]) * double(ws[1]), x, w, y),
               secs);
}

// a: [B, M, K]; b: [B, K, N] (or [B, N, K] with trans_b) -> c: [B, M, N]
void ProfilingBackend::matmul(const Tensor& a, const Tensor& b, Tensor& c, bool trans_b, float alpha) {
  const Clock::time_point t0 = Clock::now();
  timed(OpClass::Matmul, [&] { inner_->matmul(a, b, c, trans_b, alpha); });
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  OpShape s;
  s.op = "matmul";
  s.shape = compact(a.shape()) + " x " + compact(b.shape()) + (trans_b ? "^T " : " ") + dtype_name(a.dtype()) + "->" +
            dtype_name(c.dtype());
  s.flop = 2.0 * double(c.numel()) * double(a.dim(a.rank() - 1));
  s.x = a.shape();
  s.b = b.shape();
  s.y = c.shape();
  s.x_dtype = a.dtype();
  s.b_dtype = b.dtype();
  s.y_dtype = c.dtype();
  s.trans_b = trans_b;
  s.alpha = alpha;
  record_shape(std::move(s), secs);
}

void ProfilingBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o) {
  timed(OpClass::Attention, [&] { inner_->attention(q, k, v, heads, scale, o); });
}
void ProfilingBackend::group_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups, float eps,
                                  bool fuse_silu, Tensor& y) {
  timed(OpClass::Norm, [&] { inner_->group_norm(x, gamma, beta, groups, eps, fuse_silu, y); });
}
void ProfilingBackend::group_norm_stats(const Tensor& x, int groups, Tensor& mean, Tensor& var) {
  timed(OpClass::Norm, [&] { inner_->group_norm_stats(x, groups, mean, var); });
}
void ProfilingBackend::group_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& gamma,
                                        const Tensor& beta, int groups, float eps, bool fuse_silu, Tensor& y) {
  timed(OpClass::Norm, [&] { inner_->group_norm_apply(x, mean, var, gamma, beta, groups, eps, fuse_silu, y); });
}
void ProfilingBackend::layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y) {
  timed(OpClass::Norm, [&] { inner_->layer_norm(x, gamma, beta, eps, y); });
}
void ProfilingBackend::softmax(const Tensor& x, Tensor& y) {
  timed(OpClass::Elementwise, [&] { inner_->softmax(x, y); });
}
void ProfilingBackend::unary(Unary op, const Tensor& x, Tensor& y) {
  timed(OpClass::Elementwise, [&] { inner_->unary(op, x, y); });
}
void ProfilingBackend::geglu(const Tensor& x, Tensor& y) {
  timed(OpClass::Elementwise, [&] { inner_->geglu(x, y); });
}
void ProfilingBackend::binary(Binary op, const Tensor& a, const Tensor& b, Tensor& y) {
  timed(OpClass::Elementwise, [&] { inner_->binary(op, a, b, y); });
}
void ProfilingBackend::scale(const Tensor& x, float s, Tensor& y) {
  timed(OpClass::Elementwise, [&] { inner_->scale(x, s, y); });
}
void ProfilingBackend::upsample_nearest(const Tensor& x, Tensor& y) {
  timed(OpClass::Layout, [&] { inner_->upsample_nearest(x, y); });
}
void ProfilingBackend::pixel_unshuffle(const Tensor& x, int r, Tensor& y) {
  timed(OpClass::Layout, [&] { inner_->pixel_unshuffle(x, r, y); });
}
void ProfilingBackend::concat_last(const Tensor& a, const Tensor& b, Tensor& y) {
  timed(OpClass::Layout, [&] { inner_->concat_last(a, b, y); });
}
void ProfilingBackend::timestep_embedding(const Tensor& t, int dim, bool flip_sin_to_cos, float downscale_freq_shift,
                                          float max_period, Tensor& y) {
  timed(OpClass::Other, [&] { inner_->timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift, max_period, y); });
}

void ProfilingBackend::conv2d_backward_data(const Tensor& dy, const Tensor& w, const Conv2dParams& p, Tensor& dx) {
  timed(OpClass::Other, [&] { inner_->conv2d_backward_data(dy, w, p, dx); });
}
void ProfilingBackend::conv2d_backward_weights(const Tensor& x, const Tensor& dy, const Conv2dParams& p, Tensor* dw,
                                               Tensor* db) {
  timed(OpClass::Other, [&] { inner_->conv2d_backward_weights(x, dy, p, dw, db); });
}
void ProfilingBackend::linear_backward_data(const Tensor& dy, const Tensor& w, Tensor& dx, bool accumulate) {
  timed(OpClass::Other, [&] { inner_->linear_backward_data(dy, w, dx, accumulate); });
}
void ProfilingBackend::linear_backward_weights(const Tensor& x, const Tensor& dy, Tensor* dw, Tensor* db) {
  timed(OpClass::Other, [&] { inner_->linear_backward_weights(x, dy, dw, db); });
}
void ProfilingBackend::matmul_backward(const Tensor& a, const Tensor& b, const Tensor& dc, bool trans_b, float alpha,
                                       Tensor* da, Tensor* db) {
  timed(OpClass::Other, [&] { inner_->matmul_backward(a, b, dc, trans_b, alpha, da, db); });
}
void ProfilingBackend::attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                                          const Tensor& d_o, int heads, float scale, Tensor& dq, Tensor& dk,
                                          Tensor& dv) {
  timed(OpClass::Other, [&] { inner_->attention_backward(q, k, v, o, d_o, heads, scale, dq, dk, dv); });
}
void ProfilingBackend::group_norm_backward(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups,
                                           float eps, bool fused_silu, const Tensor& dy, Tensor& dx, Tensor* dgamma,
                                           Tensor* dbeta) {
  timed(OpClass::Other, [&] { inner_->group_norm_backward(x, gamma, beta, groups, eps, fused_silu, dy, dx, dgamma, dbeta); });
}
void ProfilingBackend::layer_norm_backward(const Tensor& x, const Tensor& gamma, float eps, const Tensor& dy, Tensor& dx,
                                           Tensor* dgamma, Tensor* dbeta) {
  timed(OpClass::Other, [&] { inner_->layer_norm_backward(x, gamma, eps, dy, dx, dgamma, dbeta); });
}
void ProfilingBackend::softmax_backward(const Tensor& y, const Tensor& dy, Tensor& dx) {
  timed(OpClass::Other, [&] { inner_->softmax_backward(y, dy, dx); });
}
void ProfilingBackend::unary_backward(Unary op, const Tensor& x, const Tensor& dy, Tensor& dx) {
  timed(OpClass::Other, [&] { inner_->unary_backward(op, x, dy, dx); });
}
void ProfilingBackend::geglu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) {
  timed(OpClass::Other, [&] { inner_->geglu_backward(x, dy, dx); });
}
void ProfilingBackend::sum_to(const Tensor& dy, Tensor& db) {
  timed(OpClass::Other, [&] { inner_->sum_to(dy, db); });
}
void ProfilingBackend::upsample_nearest_backward(const Tensor& dy, Tensor& dx) {
  timed(OpClass::Other, [&] { inner_->upsample_nearest_backward(dy, dx); });
}
void ProfilingBackend::split_last(const Tensor& dy, Tensor& da, Tensor& db) {
  timed(OpClass::Other, [&] { inner_->split_last(dy, da, db); });
}
void ProfilingBackend::timestep_embedding_backward(const Tensor& t, int dim, bool flip_sin_to_cos,
                                                   float downscale_freq_shift, float max_period, const Tensor& dy,
                                                   Tensor& dt) {
  timed(OpClass::Other,
        [&] { inner_->timestep_embedding_backward(t, dim, flip_sin_to_cos, downscale_freq_shift, max_period, dy, dt); });
}
void ProfilingBackend::axpy(float a, const Tensor& x, Tensor& y) {
  timed(OpClass::Other, [&] { inner_->axpy(a, x, y); });
}

double time_shape_alone(Backend& be, const OpShape& s, DType act, int repeats) {
  DF_CHECK(repeats >= 1, "time_shape_alone: repeats must be at least 1");
  Tensor x = random_normal(s.x, act, 1);
  Tensor y = Tensor::empty(s.y, act);
  Tensor b;
  if (s.op == "matmul") b = random_normal(s.b, act, 2);
  DF_CHECK(s.op == "matmul" || s.weight, "time_shape_alone: ", s.op, " ", s.shape, " has no weight to run");
  auto run = [&] {
    if (s.op == "conv2d") be.conv2d(x, *s.weight, y);
    else if (s.op == "linear") be.linear(x, *s.weight, y);
    else be.matmul(x, b, y, s.trans_b, s.alpha);
  };
  run();  // warm-up: primitive creation, first touch of the output
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const Clock::time_point t0 = Clock::now();
    run();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace diffuse
