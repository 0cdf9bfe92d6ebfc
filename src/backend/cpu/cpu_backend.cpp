#include "backend/cpu/cpu_backend.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <vector>

#include "backend/cpu/attention.h"
#include "backend/cpu/kernels.h"
#include "core/error.h"
#include "core/threads.h"

namespace diffuse {

using dt = dnnl::memory::data_type;
using cpu::DnnlWeight;

namespace {

bool is_act(DType t) { return t == DType::F32 || t == DType::BF16; }

void check_act(const char* op, const char* what, const Tensor& t) {
  DF_CHECK(t.defined(), op, ": ", what, " is undefined");
  DF_CHECK(is_act(t.dtype()), op, ": ", what, " ", t.str(), " must be f32 or bf16");
}

void check_f32(const char* op, const char* what, const Tensor& t) {
  DF_CHECK(t.defined(), op, ": ", what, " is undefined");
  DF_CHECK(t.dtype() == DType::F32, op, ": ", what, " ", t.str(), " must be f32");
}

// gamma/beta of a norm: undefined (identity) or f32 [C].
const float* affine(const char* op, const char* what, const Tensor& t, int64_t C, const Tensor& x) {
  if (!t.defined()) return nullptr;
  check_f32(op, what, t);
  DF_CHECK(t.rank() == 1 && t.dim(0) == C, op, ": ", what, " ", t.str(), " does not match input ",
           x.str(), " (need [", C, "])");
  return t.f32();
}

void check_same(const char* op, const Tensor& x, const Tensor& y) {
  DF_CHECK(y.shape() == x.shape(), op, ": output ", y.str(), " does not match input ", x.str());
}

// The kernels run in place only on buffers of one dtype: an output overlapping an input of
// another dtype would be overwritten before it is read.
void check_overlap(const char* op, const char* what, const Tensor& x, const Tensor& y) {
  if (x.dtype() == y.dtype() || x.numel() == 0 || y.numel() == 0) return;
  const auto *x0 = static_cast<const uint8_t*>(x.data()), *y0 = static_cast<const uint8_t*>(y.data());
  DF_CHECK(x0 + x.bytes() <= y0 || y0 + y.bytes() <= x0, op, ": output ", y.str(), " overlaps ",
           what, " ", x.str(), " of another dtype");
}

cpu::ConstBuf in(const Tensor& t) { return {t.data(), t.dtype()}; }
cpu::Buf out(Tensor& t) { return {t.data(), t.dtype()}; }

const DnnlWeight& as_dnnl(const char* op, const PreparedWeight& w, DnnlWeight::Kind kind) {
  auto* d = dynamic_cast<const DnnlWeight*>(&w);
  DF_CHECK(d != nullptr, op, ": weight ", w.shape().str(), " was not prepared by the CPU backend");
  DF_CHECK(d->kind() == kind, op, ": weight ", w.shape().str(), " was prepared for ",
           kind == DnnlWeight::Kind::Conv2d ? "linear" : "conv2d");
  return *d;
}


}  // namespace

CpuBackend::CpuBackend(Precision p, WeightFormat wf) : requested_(p), effective_(p), format_(wf) {
  num_threads();  // applies the default thread count to OpenMP (and so to oneDNN) if unset
  if (p == Precision::BF16 && !cpu_features().bf16_fast()) {
    static std::atomic<bool> said{false};  // once per process, not per backend (one per run)
    if (!said.exchange(true)) std::fprintf(stderr, "diffuse: bf16 compute not supported by this CPU; using fp32\n");
    effective_ = Precision::F32;
  }
}

void CpuBackend::release_scratch() {
  for (cpu::Scratch& s : scratch_) s = cpu::Scratch();
  dequant_ = cpu::Scratch();
  cpu::release_weight_scratch();
}

std::unique_ptr<Backend> make_cpu_backend(Precision p, WeightFormat wf) {
  return std::make_unique<CpuBackend>(p, wf);
}

dt CpuBackend::compute_dt() const { return effective_ == Precision::BF16 ? dt::bf16 : dt::f32; }

std::shared_ptr<PreparedWeight> CpuBackend::prepare_conv2d(const Tensor& w, const Tensor& bias,
                                                           const Conv2dParams& p) {
  return std::make_shared<DnnlWeight>(DnnlWeight::Kind::Conv2d, w, bias, p, compute_dt(), format_);
}

std::shared_ptr<PreparedWeight> CpuBackend::prepare_linear(const Tensor& w, const Tensor& bias) {
  return std::make_shared<DnnlWeight>(DnnlWeight::Kind::Linear, w, bias, Conv2dParams{},
                                      compute_dt(), format_);
}

std::shared_ptr<PreparedWeight> CpuBackend::prepare_like(const PreparedWeight& like, const Tensor& w,
                                                         const Tensor& bias, bool conv, const Conv2dParams& p) {
  const DnnlWeight& l = as_dnnl("prepare_like", like, conv ? DnnlWeight::Kind::Conv2d : DnnlWeight::Kind::Linear);
  if (l.is_int8() || format_ == WeightFormat::Int8 || l.compute_dt() != compute_dt())
    return conv ? prepare_conv2d(w, bias, p) : prepare_linear(w, bias);
  return std::make_shared<DnnlWeight>(l, w, bias);
}

// Source in compute type `cdt`: x itself or a converted copy in scratch.
static const void* source_in(const Tensor& x, dt cdt, cpu::Scratch& s) {
  if (cpu::dnnl_dt(x.dtype()) == cdt) return x.data();
  const int64_t n = x.numel();
  if (cdt == dt::bf16) {
    auto* p = static_cast<uint16_t*>(s.get(size_t(n) * 2));
    cpu::f32_to_bf16(x.data<float>(), p, n);
    return p;
  }
  auto* p = static_cast<float*>(s.get(size_t(n) * 4));
  cpu::bf16_to_f32(x.data<uint16_t>(), p, n);
  return p;
}

// oneDNN's f32 kernels write f32 only: a bf16 output of an f32 computation goes through scratch.
static void* dest_in(Tensor& y, dt cdt, cpu::Scratch& s, dt& ddt) {
  if (cdt == dt::f32 && y.dtype() == DType::BF16) {
    ddt = dt::f32;
    return s.get(size_t(y.numel()) * 4);
  }
  ddt = cpu::dnnl_dt(y.dtype());
  return y.data();
}

static void dest_done(Tensor& y, const void* out) {
  if (out != y.data()) cpu::f32_to_bf16(static_cast<const float*>(out), y.data<uint16_t>(), y.numel());
}

void CpuBackend::conv2d(const Tensor& x, const PreparedWeight& pw, Tensor& y) {
  const DnnlWeight& w = as_dnnl("conv2d", pw, DnnlWeight::Kind::Conv2d);
  check_act("conv2d", "input", x);
  check_act("conv2d", "output", y);
  DF_CHECK(x.rank() == 4, "conv2d: input ", x.str(), " must be [N, H, W, C] (weight ",
           w.shape().str(), ")");
  DF_CHECK(x.dim(3) == w.in_channels(), "conv2d: input ", x.str(), " has ", x.dim(3),
           " channels, weight ", w.shape().str(), " expects ", w.in_channels());
  const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2);
  const int64_t Ho = w.conv_out_h(H), Wo = w.conv_out_w(W);
  DF_CHECK(N > 0 && Ho > 0 && Wo > 0, "conv2d: input ", x.str(), " is too small for weight ",
           w.shape().str(), " with stride ", w.params().stride);
  const Shape want{N, Ho, Wo, w.out_channels()};
  DF_CHECK(y.shape() == want, "conv2d: output ", y.str(), " should be ", want.str(), " for input ",
           x.str(), " and weight ", w.shape().str());
  const dt cdt = w.compute_dt();
  const void* src = source_in(x, cdt, scratch_[0]);
  dt ddt;
  void* dst = dest_in(y, cdt, scratch_[2], ddt);
  size_t before = cpu::primitives_created();
  const cpu::CachedPrimitive& e = w.primitive({N, H, W}, cdt, ddt);
  if (cpu::primitives_created() != before) last_conv_ = e.impl;
  void* wq = w.is_int8() ? dequant_.get(DnnlWeight::dequant_bytes(e)) : nullptr;
  if (wq) w.dequantize(e, wq);
  cpu::run_primitive(e, src, dst, wq);
  dest_done(y, dst);
}

void CpuBackend::linear(const Tensor& x, const PreparedWeight& pw, Tensor& y) {
  const DnnlWeight& w = as_dnnl("linear", pw, DnnlWeight::Kind::Linear);
  check_act("linear", "input", x);
  check_act("linear", "output", y);
  const int64_t I = w.in_channels(), O = w.out_channels();
  DF_CHECK(x.rank() >= 1 && x.dim(-1) == I, "linear: input ", x.str(), " has ",
           x.rank() ? x.dim(-1) : 0, " features, weight ", w.shape().str(), " expects ", I);
  bool ok = y.rank() == x.rank() && y.dim(-1) == O;
  for (int i = 0; ok && i + 1 < x.rank(); ++i) ok = y.dim(i) == x.dim(i);
  if (!ok) {
    Shape want = x.shape();
    want[-1] = O;
    fail("linear: output ", y.str(), " should be ", want.str(), " for input ", x.str(),
         " and weight ", w.shape().str());
  }
  const int64_t M = x.numel() / I;
  if (M == 0) return;
  // One sample at a time: oneDNN's GEMM kernels sum a row in an order that depends on the whole
  // matrix's row count (seen with its AVX2 sgemm), so rows of a batch would differ in the last bits
  // from the same rows alone. Per sample, an image of a batch is the image its seed draws alone.
  if ((x.rank() >= 3 || x.rank() == 2) && x.dim(0) > 1) {
    for (int64_t b = 0; b < x.dim(0); ++b) {
      Tensor yb = y.slice0(b, b + 1);
      linear(x.slice0(b, b + 1), pw, yb);
    }
    return;
  }
  const dt cdt = w.compute_dt();
  const void* src = source_in(x, cdt, scratch_[0]);
  dt ddt;
  void* dst = dest_in(y, cdt, scratch_[2], ddt);
  size_t before = cpu::primitives_created();
  const cpu::CachedPrimitive& e = w.primitive({M}, cdt, ddt);
  if (cpu::primitives_created() != before) last_linear_ = e.impl;
  void* wq = w.is_int8() ? dequant_.get(DnnlWeight::dequant_bytes(e)) : nullptr;
  if (wq) w.dequantize(e, wq);
  cpu::run_primitive(e, src, dst, wq);
  dest_done(y, dst);
}

void CpuBackend::matmul(const Tensor& a, const Tensor& b, Tensor& c, bool trans_b, float alpha) {
  check_act("matmul", "a", a);
  check_act("matmul", "b", b);
  check_act("matmul", "c", c);
  DF_CHECK(a.rank() == 3 && b.rank() == 3 && c.rank() == 3, "matmul: a ", a.str(), ", b ",
           b.str(), ", c ", c.str(), " must all be rank 3 [B, rows, cols]");
  const int64_t B = a.dim(0), M = a.dim(1), K = a.dim(2);
  const int64_t bK = trans_b ? b.dim(2) : b.dim(1), N = trans_b ? b.dim(1) : b.dim(2);
  DF_CHECK(b.dim(0) == B && bK == K, "matmul: a ", a.str(), " and b ", b.str(),
           trans_b ? " (transposed)" : "", " do not match (need b ",
           trans_b ? Shape{B, N, K}.str() : Shape{B, K, N}.str(), ")");
  DF_CHECK(c.shape() == (Shape{B, M, N}), "matmul: output ", c.str(), " should be ",
           Shape{B, M, N}.str(), " for a ", a.str(), " and b ", b.str());
  if (B == 0 || M == 0 || N == 0) return;
  DF_CHECK(K > 0, "matmul: a ", a.str(), " has an empty inner dim");
  const dt cdt = compute_dt();
  const void* pa = source_in(a, cdt, scratch_[0]);
  const void* pb = source_in(b, cdt, scratch_[1]);
  dt ddt;
  void* dst = dest_in(c, cdt, scratch_[2], ddt);
  cpu::CachedPrimitive& e = matmuls_.get(B, M, K, N, trans_b, alpha, cdt, ddt);
  cpu::run_primitive(e, pa, dst, pb);
  dest_done(c, dst);
}

void CpuBackend::attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads,
                           float scale, Tensor& o) {
  for (auto [t, what] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&o, "o"}}) {
    check_act("attention", what, *t);
    DF_CHECK(t->rank() == 3, "attention: ", what, " ", t->str(), " must be [B, N, heads*D]");
  }
  const int64_t B = q.dim(0), HD = q.dim(2);
  DF_CHECK(heads > 0 && HD % heads == 0, "attention: q ", q.str(), " width ", HD,
           " is not divisible by ", heads, " heads");
  DF_CHECK(k.dim(0) == B && k.dim(2) == HD && v.shape() == k.shape(), "attention: q ", q.str(),
           ", k ", k.str(), ", v ", v.str(), " do not match (need k, v [", B, ", Nk, ", HD, "])");
  check_same("attention", q, o);
  if (effective_ == Precision::BF16) cpu::attention_bf16(q, k, v, heads, scale, o);
  else cpu::attention_f32(q, k, v, heads, scale, o);
}

void CpuBackend::group_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, int groups,
                            float eps, bool fuse_silu, Tensor& y) {
  check_act("group_norm", "input", x);
  check_act("group_norm", "output", y);
  DF_CHECK(x.rank() >= 2, "group_norm: input ", x.str(), " must be [N, S..., C]");
  const int64_t N = x.dim(0), C = x.dim(-1);
  DF_CHECK(groups > 0 && C % groups == 0, "group_norm: input ", x.str(), " has ", C,
           " channels, not divisible into ", groups, " groups");
  check_same("group_norm", x, y);
  check_overlap("group_norm", "input", x, y);
  const float* g = affine("group_norm", "gamma", gamma, C, x);
  const float* b = affine("group_norm", "beta", beta, C, x);
  if (x.numel() == 0) return;
  cpu::group_norm(in(x), g, b, N, x.numel() / (N * C), C, groups, eps, fuse_silu, out(y));
}

namespace {
// x: [N, S..., C] with C divisible by groups; a stats tensor must be f32 [N, groups].
void check_gn_input(const char* op, const Tensor& x, int groups) {
  check_act(op, "input", x);
  DF_CHECK(x.rank() >= 2, op, ": input ", x.str(), " must be [N, S..., C]");
  DF_CHECK(groups > 0 && x.dim(-1) % groups == 0, op, ": input ", x.str(), " has ", x.dim(-1),
           " channels, not divisible into ", groups, " groups");
}
void check_gn_stats(const char* op, const char* what, const Tensor& t, const Tensor& x, int groups) {
  check_f32(op, what, t);
  DF_CHECK(t.shape() == Shape({x.dim(0), int64_t(groups)}), op, ": ", what, " ", t.str(),
           " does not match input ", x.str(), " (need [", x.dim(0), ", ", groups, "])");
}
}  // namespace

void CpuBackend::group_norm_stats(const Tensor& x, int groups, Tensor& mean, Tensor& var) {
  check_gn_input("group_norm_stats", x, groups);
  check_gn_stats("group_norm_stats", "mean", mean, x, groups);
  check_gn_stats("group_norm_stats", "var", var, x, groups);
  const int64_t N = x.dim(0), C = x.dim(-1), G = groups, S = (N * C) != 0 ? x.numel() / (N * C) : 0;
  DF_CHECK(S > 0 || N == 0, "group_norm_stats: input ", x.str(), " is empty: no statistics");
  std::vector<double> m(size_t(N * G)), v(size_t(N * G));
  if (N) cpu::group_norm_stats(in(x), N, S, C, G, m.data(), v.data());
  for (int64_t i = 0; i < N * G; ++i) {
    mean.f32()[i] = float(m[size_t(i)]);
    var.f32()[i] = float(v[size_t(i)]);
  }
}

void CpuBackend::group_norm_apply(const Tensor& x, const Tensor& mean, const Tensor& var,
                                  const Tensor& gamma, const Tensor& beta, int groups, float eps,
                                  bool fuse_silu, Tensor& y) {
  check_gn_input("group_norm_apply", x, groups);
  check_act("group_norm_apply", "output", y);
  check_same("group_norm_apply", x, y);
  check_overlap("group_norm_apply", "input", x, y);
  check_gn_stats("group_norm_apply", "mean", mean, x, groups);
  check_gn_stats("group_norm_apply", "var", var, x, groups);
  const int64_t N = x.dim(0), C = x.dim(-1), G = groups;
  const float* g = affine("group_norm_apply", "gamma", gamma, C, x);
  const float* b = affine("group_norm_apply", "beta", beta, C, x);
  if (x.numel() == 0) return;
  std::vector<double> m(size_t(N * G)), v(size_t(N * G));
  for (int64_t i = 0; i < N * G; ++i) {
    m[size_t(i)] = mean.f32()[i];
    v[size_t(i)] = var.f32()[i];
    DF_CHECK(std::isfinite(v[size_t(i)]) && v[size_t(i)] >= 0 && std::isfinite(m[size_t(i)]),
             "group_norm_apply: statistics of sample ", i / G, " group ", i % G, " are not finite (mean ",
             m[size_t(i)], ", var ", v[size_t(i)], ")");
  }
  cpu::group_norm_apply(in(x), m.data(), v.data(), g, b, N, x.numel() / (N * C), C, G, eps, fuse_silu,
                        out(y));
}

void CpuBackend::layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                            Tensor& y) {
  check_act("layer_norm", "input", x);
  check_act("layer_norm", "output", y);
  DF_CHECK(x.rank() >= 1, "layer_norm: input ", x.str(), " must have rank >= 1");
  check_same("layer_norm", x, y);
  check_overlap("layer_norm", "input", x, y);
  const int64_t C = x.dim(-1);
  const float* g = affine("layer_norm", "gamma", gamma, C, x);
  const float* b = affine("layer_norm", "beta", beta, C, x);
  if (x.numel() == 0) return;
  cpu::layer_norm(in(x), g, b, x.numel() / C, C, eps, out(y));
}

void CpuBackend::softmax(const Tensor& x, Tensor& y) {
  check_act("softmax", "input", x);
  check_act("softmax", "output", y);
  DF_CHECK(x.rank() >= 1, "softmax: input ", x.str(), " must have rank >= 1");
  check_same("softmax", x, y);
  check_overlap("softmax", "input", x, y);
  if (x.numel() == 0) return;
  cpu::softmax(in(x), x.numel() / x.dim(-1), x.dim(-1), out(y));
}

void CpuBackend::unary(Unary op, const Tensor& x, Tensor& y) {
  check_act("unary", "input", x);
  check_act("unary", "output", y);
  check_same("unary", x, y);
  check_overlap("unary", "input", x, y);
  if (x.numel() == 0) return;
  cpu::unary(op, in(x), x.numel(), out(y));
}

void CpuBackend::geglu(const Tensor& x, Tensor& y) {
  check_act("geglu", "input", x);
  check_act("geglu", "output", y);
  DF_CHECK(x.rank() >= 1 && x.dim(-1) % 2 == 0, "geglu: input ", x.str(),
           " must have an even last dim");
  Shape want = x.shape();
  want[-1] = x.dim(-1) / 2;
  DF_CHECK(y.shape() == want, "geglu: output ", y.str(), " should be ", want.str(), " for input ",
           x.str());
  DF_CHECK(x.data() != y.data() || x.numel() == 0, "geglu: output must not alias the input");
  check_overlap("geglu", "input", x, y);
  if (y.numel() == 0) return;
  cpu::geglu(in(x), y.numel() / want[-1], want[-1], out(y));
}

void CpuBackend::binary(Binary op, const Tensor& a, const Tensor& b, Tensor& y) {
  const char* name = op == Binary::Add ? "add" : "mul";
  check_act(name, "a", a);
  check_act(name, "b", b);
  check_act(name, "output", y);
  check_same(name, a, y);
  check_overlap(name, "a", a, y);
  check_overlap(name, "b", b, y);
  const int r = a.rank(), rb = b.rank();
  DF_CHECK(rb <= r, name, ": b ", b.str(), " cannot broadcast to a ", a.str());
  int64_t shape[Shape::kMaxDims], strides[Shape::kMaxDims];
  int64_t st = 1;
  for (int i = r - 1; i >= 0; --i) {
    shape[i] = a.dim(i);
    const int j = i - (r - rb);
    const int64_t bd = j >= 0 ? b.dim(j) : 1;
    DF_CHECK(bd == a.dim(i) || bd == 1, name, ": b ", b.str(), " cannot broadcast to a ", a.str(),
             " (dim ", i, ")");
    strides[i] = bd == 1 ? 0 : st;
    st *= bd;
  }
  if (a.numel() == 0) return;
  cpu::binary(op, in(a), shape, r, in(b), strides, out(y));
}

void CpuBackend::scale(const Tensor& x, float s, Tensor& y) {
  check_act("scale", "input", x);
  check_act("scale", "output", y);
  check_same("scale", x, y);
  check_overlap("scale", "input", x, y);
  if (x.numel() == 0) return;
  cpu::scale(in(x), s, x.numel(), out(y));
}

void CpuBackend::upsample_nearest(const Tensor& x, Tensor& y) {
  check_act("upsample_nearest", "input", x);
  check_act("upsample_nearest", "output", y);
  DF_CHECK(x.rank() == 4 && y.rank() == 4 && x.dim(0) == y.dim(0) && x.dim(3) == y.dim(3),
           "upsample_nearest: input ", x.str(), " and output ", y.str(),
           " must be [N, H, W, C] and [N, Ho, Wo, C]");
  DF_CHECK(x.data() != y.data() || x.numel() == 0, "upsample_nearest: output must not alias the input");
  check_overlap("upsample_nearest", "input", x, y);
  if (y.numel() == 0) return;
  DF_CHECK(x.numel() > 0, "upsample_nearest: empty input ", x.str(), " for output ", y.str());
  cpu::upsample_nearest(in(x), x.dim(0), x.dim(1), x.dim(2), x.dim(3), y.dim(1), y.dim(2), out(y));
}

void CpuBackend::pixel_unshuffle(const Tensor& x, int r, Tensor& y) {
  check_act("pixel_unshuffle", "input", x);
  check_act("pixel_unshuffle", "output", y);
  DF_CHECK(r >= 1, "pixel_unshuffle: factor ", r, " must be >= 1");
  DF_CHECK(x.rank() == 4 && y.rank() == 4 && x.dim(1) % r == 0 && x.dim(2) % r == 0 &&
               y.shape() == (Shape{x.dim(0), x.dim(1) / r, x.dim(2) / r, x.dim(3) * r * r}),
           "pixel_unshuffle: input ", x.str(), " and output ", y.str(), " with factor ", r,
           " must be [N, H·r, W·r, C] and [N, H, W, C·r²]");
  DF_CHECK(x.data() != y.data() || x.numel() == 0, "pixel_unshuffle: output must not alias the input");
  check_overlap("pixel_unshuffle", "input", x, y);
  if (y.numel() == 0) return;
  cpu::pixel_unshuffle(in(x), x.dim(0), x.dim(1), x.dim(2), x.dim(3), r, out(y));
}

void CpuBackend::concat_last(const Tensor& a, const Tensor& b, Tensor& y) {
  check_act("concat_last", "a", a);
  check_act("concat_last", "b", b);
  check_act("concat_last", "output", y);
  bool ok = a.rank() >= 1 && b.rank() == a.rank() && y.rank() == a.rank() &&
            y.dim(-1) == a.dim(-1) + b.dim(-1);
  for (int i = 0; ok && i + 1 < a.rank(); ++i) ok = b.dim(i) == a.dim(i) && y.dim(i) == a.dim(i);
  DF_CHECK(ok, "concat_last: a ", a.str(), ", b ", b.str(), " and output ", y.str(),
           " do not match (need [..., Ca], [..., Cb] -> [..., Ca + Cb])");
  check_overlap("concat_last", "a", a, y);
  check_overlap("concat_last", "b", b, y);
  if (y.numel() == 0) return;
  const int64_t rows = y.numel() / y.dim(-1);
  cpu::concat_last(in(a), a.dim(-1), in(b), b.dim(-1), rows, out(y));
}

void CpuBackend::timestep_embedding(const Tensor& t, int dim, bool flip_sin_to_cos,
                                    float downscale_freq_shift, float max_period, Tensor& y) {
  check_f32("timestep_embedding", "timesteps", t);
  check_f32("timestep_embedding", "output", y);
  DF_CHECK(t.rank() == 1, "timestep_embedding: timesteps ", t.str(), " must be [N]");
  DF_CHECK(dim >= 1, "timestep_embedding: dim ", dim, " must be >= 1");
  DF_CHECK(y.shape() == (Shape{t.dim(0), dim}), "timestep_embedding: output ", y.str(),
           " should be [", t.dim(0), ", ", dim, "]");
  DF_CHECK(dim / 2 == 0 || float(dim / 2) != downscale_freq_shift, "timestep_embedding: dim ", dim,
           " with downscale_freq_shift ", downscale_freq_shift, " divides by zero");
  DF_CHECK(max_period > 0, "timestep_embedding: max_period ", max_period, " must be > 0");
  cpu::timestep_embedding(t.f32(), t.dim(0), dim, flip_sin_to_cos, downscale_freq_shift,
                          max_period, y.f32());
}

std::string CpuBackend::impl_info(const PreparedWeight& w) {
  auto* d = dynamic_cast<const DnnlWeight*>(&w);
  return d ? d->impl_info() : std::string();
}

std::string CpuBackend::describe(const std::string& op) const {
  if (op.rfind("conv2d", 0) == 0) return last_conv_;
  if (op == "linear") return last_linear_;
  if (op == "matmul") return matmuls_.impl_info();
  if (op == "attention")
    return effective_ == Precision::BF16 ? cpu::attention_bf16_path() : cpu::attention_f32_path();
  return {};
}

std::string CpuBackend::last_impl(const std::string& op) const {
  if (op == "conv2d") return last_conv_;
  if (op == "linear") return last_linear_;
  if (op == "matmul") return matmuls_.impl_info();
  fail("last_impl: unknown op '", op, "' (conv2d, linear or matmul)");
}

}  // namespace diffuse
