#include "backend/cpu/onednn.h"

#include <atomic>
#include <cstring>

#include "core/error.h"

namespace diffuse::cpu {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
using dnnl::memory;

dnnl::engine& dnnl_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& dnnl_stream() {
  static dnnl::stream s(dnnl_engine());
  return s;
}

dt dnnl_dt(DType t) {
  switch (t) {
    case DType::F32: return dt::f32;
    case DType::BF16: return dt::bf16;
    default: fail("oneDNN: unsupported activation dtype ", dtype_name(t), " (need f32 or bf16)");
  }
}

static std::atomic<size_t> g_primitives{0};
size_t primitives_created() { return g_primitives.load(); }
void note_primitive_created() { g_primitives.fetch_add(1); }

void* Scratch::get(size_t bytes) {
  if (!storage_ || storage_->bytes() < bytes) {
    // Grow geometrically so a sequence of slightly larger requests settles quickly.
    size_t want = std::max(bytes, capacity() + capacity() / 2);
    storage_.reset();
    storage_ = Storage::allocate(want);
  }
  return storage_->data();
}

// ---------------------------------------------------------------------------------------------
// Prepared weights

DnnlWeight::DnnlWeight(Kind kind, const Tensor& w, const Tensor& bias, const Conv2dParams& p,
                       dt compute_dt)
    : kind_(kind), shape_(w.shape()), params_(p), cdt_(compute_dt) {
  const char* op = kind == Kind::Conv2d ? "prepare_conv2d" : "prepare_linear";
  int want_rank = kind == Kind::Conv2d ? 4 : 2;
  DF_CHECK(w.defined(), op, ": weight is undefined");
  DF_CHECK(w.rank() == want_rank, op, ": weight ", w.str(), " must have rank ", want_rank,
           kind == Kind::Conv2d ? " [O, I, kh, kw]" : " [O, I]");
  DF_CHECK(dtype_is_float(w.dtype()), op, ": weight ", w.str(), " must be a float type");
  for (int i = 0; i < w.rank(); ++i) DF_CHECK(w.dim(i) > 0, op, ": weight ", w.str(), " has an empty dim");
  if (kind == Kind::Conv2d) {
    DF_CHECK(p.stride >= 1, op, ": stride ", p.stride, " must be >= 1 (weight ", w.str(), ")");
    DF_CHECK(p.pad_top >= 0 && p.pad_left >= 0 && p.pad_bottom >= 0 && p.pad_right >= 0, op,
             ": negative padding (", p.pad_top, ", ", p.pad_left, ", ", p.pad_bottom, ", ",
             p.pad_right, ") for weight ", w.str());
  }
  const int64_t O = shape_[0];
  if (bias.defined()) {
    DF_CHECK(bias.rank() == 1 && bias.dim(0) == O, op, ": bias ", bias.str(),
             " does not match weight ", w.str(), " (need [", O, "])");
    DF_CHECK(dtype_is_float(bias.dtype()), op, ": bias ", bias.str(), " must be a float type");
    bias_ = memory(memory::desc({O}, dt::f32, tag::x), dnnl_engine());
    convert(bias.data(), bias.dtype(), bias_.get_data_handle(), DType::F32, size_t(O));
  }

  // Plain f32 copy of the weights (freed at the end of the constructor), reordered once into
  // the layout the primitive prefers for a nominal input shape.
  memory::desc plain_md = kind == Kind::Conv2d
                              ? memory::desc({O, shape_[1], shape_[2], shape_[3]}, dt::f32, tag::oihw)
                              // logical [I, O] (matmul weights) over [O, I] row-major storage
                              : memory::desc({shape_[1], O}, dt::f32, tag::ba);
  memory plain(plain_md, dnnl_engine());
  convert(w.data(), w.dtype(), plain.get_data_handle(), DType::F32, size_t(w.numel()));
  std::vector<int64_t> nominal;
  if (kind == Kind::Conv2d) {
    int64_t h = std::max<int64_t>(32, std::max(kh(), kw()));
    nominal = {1, h, h};
  } else {
    nominal = {64};
  }
  dnnl::primitive_desc pd = make_pd(nominal, cdt_, cdt_);
  memory::desc wmd = pd.weights_desc();
  memory target(wmd, dnnl_engine());
  dnnl::reorder(plain, target).execute(dnnl_stream(), plain, target);
  note_primitive_created();
  dnnl_stream().wait();
  weights_.push_back(target);
}

int64_t DnnlWeight::conv_out_h(int64_t h) const {
  return (h + params_.pad_top + params_.pad_bottom - kh()) / params_.stride + 1;
}
int64_t DnnlWeight::conv_out_w(int64_t w) const {
  return (w + params_.pad_left + params_.pad_right - kw()) / params_.stride + 1;
}

dnnl::primitive_desc DnnlWeight::make_pd(const std::vector<int64_t>& d, dt src_dt, dt dst_dt) const {
  const int64_t O = shape_[0], I = shape_[1];
  memory::desc bias_md = bias_ ? bias_.get_desc() : memory::desc();
  if (kind_ == Kind::Conv2d) {
    const int64_t N = d[0], H = d[1], W = d[2];
    memory::desc src({N, I, H, W}, src_dt, tag::nhwc);
    memory::desc wei({O, I, kh(), kw()}, cdt_, tag::any);
    memory::desc dst({N, O, conv_out_h(H), conv_out_w(W)}, dst_dt, tag::nhwc);
    memory::dims strides = {params_.stride, params_.stride};
    memory::dims pl = {params_.pad_top, params_.pad_left}, pr = {params_.pad_bottom, params_.pad_right};
    auto desc = bias_ ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                         dnnl::algorithm::convolution_direct, src,
                                                         wei, bias_md, dst, strides, pl, pr)
                      : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                         dnnl::algorithm::convolution_direct, src,
                                                         wei, dst, strides, pl, pr);
    return dnnl::convolution_forward::primitive_desc(desc, dnnl_engine());
  }
  const int64_t M = d[0];
  memory::desc src({M, I}, src_dt, tag::ab);
  memory::desc wei({I, O}, cdt_, tag::any);
  memory::desc dst({M, O}, dst_dt, tag::ab);
  if (bias_) {
    memory::desc b2({1, O}, dt::f32, tag::ab);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, b2, dst), dnnl_engine());
  }
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), dnnl_engine());
}

const memory& DnnlWeight::weights_for(const memory::desc& md) const {
  for (const memory& m : weights_)
    if (m.get_desc() == md) return m;
  memory target(md, dnnl_engine());
  dnnl::reorder(weights_[0], target).execute(dnnl_stream(), weights_[0], target);
  note_primitive_created();
  dnnl_stream().wait();
  weights_.push_back(target);
  return weights_.back();
}

CachedPrimitive& DnnlWeight::primitive(const std::vector<int64_t>& dims, dt src_dt, dt dst_dt) const {
  std::vector<int64_t> key = dims;
  key.push_back(int64_t(src_dt));
  key.push_back(int64_t(dst_dt));
  auto it = cache_.find(key);
  if (it != cache_.end()) return it->second;

  dnnl::primitive_desc pd = make_pd(dims, src_dt, dst_dt);
  CachedPrimitive e;
  e.prim = dnnl::primitive(pd);
  note_primitive_created();
  e.impl = pd.impl_info_str();
  e.src = memory(pd.src_desc(), dnnl_engine(), DNNL_MEMORY_NONE);
  e.dst = memory(pd.dst_desc(), dnnl_engine(), DNNL_MEMORY_NONE);
  e.weights = weights_for(pd.weights_desc());
  e.args = {{DNNL_ARG_SRC, e.src}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_DST, e.dst}};
  if (bias_) e.args[DNNL_ARG_BIAS] = kind_ == Kind::Conv2d
                                          ? bias_
                                          : memory(memory::desc({1, shape_[0]}, dt::f32, tag::ab),
                                                   dnnl_engine(), bias_.get_data_handle());
  impl_ = e.impl;
  return cache_.emplace(std::move(key), std::move(e)).first->second;
}

// ---------------------------------------------------------------------------------------------
// Activation × activation matmul

CachedPrimitive& MatmulCache::get(int64_t B, int64_t M, int64_t K, int64_t N, bool trans_b,
                                  float alpha, dt src_dt, dt dst_dt) {
  uint32_t alpha_bits;
  std::memcpy(&alpha_bits, &alpha, 4);
  std::vector<int64_t> key = {B, M, K, N, trans_b, int64_t(alpha_bits), int64_t(src_dt), int64_t(dst_dt)};
  auto it = cache_.find(key);
  if (it != cache_.end()) return it->second;

  memory::desc a({B, M, K}, src_dt, tag::abc);
  // b is logically [B, K, N]; with trans_b it is stored as [B, N, K] (strides, no copy).
  memory::desc b = trans_b ? memory::desc({B, K, N}, src_dt, memory::dims{N * K, 1, K})
                           : memory::desc({B, K, N}, src_dt, tag::abc);
  memory::desc c({B, M, N}, dst_dt, tag::abc);
  dnnl::primitive_attr attr;
  if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, dnnl_engine());
  CachedPrimitive e;
  e.prim = dnnl::matmul(pd);
  note_primitive_created();
  e.impl = pd.impl_info_str();
  e.src = memory(pd.src_desc(), dnnl_engine(), DNNL_MEMORY_NONE);
  e.weights = memory(pd.weights_desc(), dnnl_engine(), DNNL_MEMORY_NONE);
  e.dst = memory(pd.dst_desc(), dnnl_engine(), DNNL_MEMORY_NONE);
  e.args = {{DNNL_ARG_SRC, e.src}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_DST, e.dst}};
  impl_ = e.impl;
  return cache_.emplace(std::move(key), std::move(e)).first->second;
}

}  // namespace diffuse::cpu
