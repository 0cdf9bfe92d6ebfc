#include "backend/cpu/onednn.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <sys/mman.h>

#include "core/error.h"

namespace diffuse::cpu {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
using dnnl::memory;

dnnl::engine& dnnl_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// One stream per thread: runs on separate threads (per-run workspaces) execute side by side.
dnnl::stream& dnnl_stream() {
  static thread_local dnnl::stream s(dnnl_engine());
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

// Scratchpads are the caller's (passed per execution from a per-thread buffer), never the
// library's shared one: primitives running at once on different threads would share it.
dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr a;
  a.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return a;
}

static void* thread_scratchpad(size_t bytes) {
  static thread_local Scratch pad;
  return bytes ? pad.get(bytes) : nullptr;
}

static void add_scratchpad(std::unordered_map<int, memory>& args, const memory::desc& md) {
  if (md.get_size() > 0) args[DNNL_ARG_SCRATCHPAD] = memory(md, dnnl_engine(), thread_scratchpad(md.get_size()));
}

Scratch& weight_scratch() {
  static thread_local Scratch pad;
  return pad;
}

void release_weight_scratch() { weight_scratch() = Scratch(); }

void reorder_now(const memory& from, const memory& to) {
  dnnl::reorder::primitive_desc pd(dnnl_engine(), from.get_desc(), dnnl_engine(), to.get_desc(), user_scratchpad());
  std::unordered_map<int, memory> args = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
  add_scratchpad(args, pd.scratchpad_desc());
  dnnl::reorder(pd).execute(dnnl_stream(), args);
  dnnl_stream().wait();
}

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

// Symmetric per-output-channel int8: the rows of w ([O, L] row-major, any float dtype) -> q
// ([O, L] int8) and scales ([O]): scale_o = max|w_o| / 127 (1 for an all-zero row),
// q = round-half-even(w / scale_o), so |w - q·scale_o| <= scale_o / 2.
static void quantize_rows(const char* op, const Tensor& w, int64_t O, int64_t L, int8_t* q,
                          float* scales) {
  const size_t es = dtype_size(w.dtype());
  const auto* src = static_cast<const uint8_t*>(w.data());
  int64_t bad = -1;
#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(L));
#pragma omp for schedule(dynamic, 16)
    for (int64_t o = 0; o < O; ++o) {
      convert(src + size_t(o) * size_t(L) * es, w.dtype(), row.data(), DType::F32, size_t(L));
      float amax = 0;
      bool finite = true;
      for (float v : row) {
        finite = finite && std::isfinite(v);
        amax = std::max(amax, std::fabs(v));
      }
      if (!finite) {
#pragma omp critical
        bad = bad < 0 ? o : std::min(bad, o);
        continue;
      }
      const float s = amax > 0 ? amax / 127.0f : 1.0f;
      scales[o] = s;
      int8_t* qo = q + o * L;
      for (int64_t i = 0; i < L; ++i) {
        float r = std::nearbyint(row[size_t(i)] / s);
        qo[i] = int8_t(std::clamp(r, -127.0f, 127.0f));
      }
    }
  }
  DF_CHECK(bad < 0, op, ": weight ", w.str(), " has a non-finite value in output channel ", bad,
           " (cannot quantise to int8)");
}

DnnlWeight::DnnlWeight(Kind kind, const Tensor& w, const Tensor& bias, const Conv2dParams& p,
                       dt compute_dt, WeightFormat wf)
    : kind_(kind), shape_(w.shape()), params_(p), cdt_(compute_dt), format_(wf) {
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
  set_bias(op, w, bias);

  if (format_ == WeightFormat::Int8) {
    prepare_int8(op, w);
    return;
  }

  // Plain f32 weights, reordered once into the layout the primitive prefers for a nominal input
  // shape.
  Tensor keep;
  memory plain = plain_source(w, keep);
  std::vector<int64_t> nominal;
  if (kind == Kind::Conv2d) {
    int64_t h = std::max<int64_t>(32, std::max(kh(), kw()));
    nominal = {1, h, h};
  } else {
    nominal = {64};
  }
  dnnl::primitive_desc pd = make_pd(nominal, cdt_, cdt_);
  memory::desc wmd = pd.weights_desc();
  memory target = new_weight_memory(wmd, false);
  reorder_now(plain, target);
  note_primitive_created();
  dnnl_stream().wait();
  weights_.push_back(target);
}

DnnlWeight::DnnlWeight(const DnnlWeight& like, const Tensor& w, const Tensor& bias)
    : kind_(like.kind_), shape_(like.shape_), params_(like.params_), cdt_(like.cdt_), format_(WeightFormat::Native) {
  DF_CHECK(!like.is_int8(), "prepare_like: int8 weight ", shape_.str(), " (prepare it anew)");
  DF_CHECK(w.defined() && w.shape() == shape_ && dtype_is_float(w.dtype()), "prepare_like: weight ",
           w.defined() ? w.str() : std::string("undefined"), " does not match the prepared ", shape_.str());
  set_bias("prepare_like", w, bias);
  // The layouts like's primitives use (all it holds before its first pass).
  std::vector<memory::desc> layouts;
  {
    std::lock_guard<std::mutex> lock(like.mu_);
    for (const auto& [k, e] : like.cache_) {
      auto it = e.args.find(DNNL_ARG_WEIGHTS);
      if (it == e.args.end()) continue;
      const memory::desc md = it->second.get_desc();
      if (std::find(layouts.begin(), layouts.end(), md) == layouts.end()) layouts.push_back(md);
    }
    if (layouts.empty())
      for (const memory& m : like.weights_) layouts.push_back(m.get_desc());
  }
  Tensor keep;
  memory plain = plain_source(w, keep);
  for (const memory::desc& md : layouts) {
    memory target = new_weight_memory(md, true);
    reorder_now(plain, target);
    weights_.push_back(target);
  }
}

void DnnlWeight::set_bias(const char* op, const Tensor& w, const Tensor& bias) {
  const int64_t O = shape_[0];
  if (!bias.defined()) return;
  DF_CHECK(bias.rank() == 1 && bias.dim(0) == O, op, ": bias ", bias.str(), " does not match weight ", w.str(),
           " (need [", O, "])");
  DF_CHECK(dtype_is_float(bias.dtype()), op, ": bias ", bias.str(), " must be a float type");
  bias_ = memory(memory::desc({O}, dt::f32, tag::x), dnnl_engine());
  convert(bias.data(), bias.dtype(), bias_.get_data_handle(), DType::F32, size_t(O));
  bias2d_ = memory(memory::desc({1, O}, dt::f32, tag::ab), dnnl_engine(), bias_.get_data_handle());
}

// The weights as a plain memory ([O, I, kh, kw] oihw; linear: logical [I, O] over [O, I] row-major
// storage) for the reorder into a primitive's layout: w's own data when it is f32, or bf16 with a
// bf16 compute type; else a conversion (f16 -> bf16 for bf16 compute: the rounding the f32 route
// made, in half the bytes) in this thread's reused weight_scratch(), described by `keep`. A fresh
// f32 copy per weight had the kernel map and zero ~3.4 GB of pages while an SD 1.5 UNet loaded.
memory DnnlWeight::plain_source(const Tensor& w, Tensor& keep) const {
  const int64_t O = shape_[0];
  const bool bf = cdt_ == dt::bf16 && (w.dtype() == DType::BF16 || w.dtype() == DType::F16);
  const dt t = bf ? dt::bf16 : dt::f32;
  const DType want = bf ? DType::BF16 : DType::F32;
  memory::desc md = kind_ == Kind::Conv2d ? memory::desc({O, shape_[1], shape_[2], shape_[3]}, t, tag::oihw)
                                          : memory::desc({shape_[1], O}, t, tag::ba);
  if (w.dtype() == want) {
    keep = w;
  } else {
    keep = Tensor::borrow(weight_scratch().get(size_t(w.numel()) * dtype_size(want)), w.shape(), want);
    keep.copy_from(w);
  }
  return memory(md, dnnl_engine(), const_cast<void*>(keep.data()));
}

namespace {

// Buffers of LoRA replacement weights, recycled: a switch replaces the same layers again and
// again, and fresh memory costs page faults and the kernel's zeroing (most of a switch's time
// otherwise). A buffer given back is MADV_FREE'd: the kernel takes its pages whenever it needs
// memory (a reuse then faults and zeroes like fresh memory); until then reusing it costs nothing.
// At most kCap bytes are kept.
class WeightPool {
 public:
  static WeightPool& get() {
    static WeightPool* pool = new WeightPool();  // never destroyed: weights may outlive statics
    return *pool;
  }
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    held_ -= bytes;
    return p;
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + bytes <= kCap) {
        madvise(p, bytes, MADV_FREE);
        free_.emplace(bytes, p);
        held_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  static constexpr size_t kCap = size_t(4) << 30;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t held_ = 0;
};

}  // namespace

// Memory for prepared weights. Buffers of 2 MiB and more are 2 MiB-aligned and advised to use
// transparent huge pages: preparing a model (or a LoRA switch) writes gigabytes of fresh memory,
// and 4 KiB page faults were most of its time. LoRA replacements (`recycled`) come from and go
// back to the WeightPool.
memory DnnlWeight::new_weight_memory(const memory::desc& md, bool recycled) const {
  const size_t bytes = md.get_size();
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < kHuge && !recycled) return memory(md, dnnl_engine());
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* p = recycled ? WeightPool::get().take(rounded) : nullptr;
  if (!p) {
    p = std::aligned_alloc(bytes >= kHuge ? kHuge : 4096, rounded);
    if (!p) throw std::bad_alloc();
    if (bytes >= kHuge) madvise(p, bytes / kHuge * kHuge, MADV_HUGEPAGE);
  }
  // A blocked layout may pad dims (e.g. 4 input channels to 16): padding must read as zeros,
  // which fresh pages are but a recycled or reused heap buffer need not be.
  const dnnl_memory_desc_t& c = md.data;
  for (int i = 0; i < c.ndims; ++i)
    if (c.padded_dims[i] != c.dims[i]) {
      std::memset(p, 0, bytes);
      break;
    }
  if (recycled) buffers_.emplace_back(p, [rounded](void* q) { WeightPool::get().give(q, rounded); });
  else buffers_.emplace_back(p, [](void* q) { std::free(q); });
  return memory(md, dnnl_engine(), p);
}

// `md` with its data type replaced by s8 (same dims, padding and blocking).
static memory::desc as_s8(const memory::desc& md) {
  dnnl_memory_desc_t c = md.data;
  c.data_type = dnnl_s8;
  return memory::desc(c);
}

// Quantises row by row into a plain s8 copy; the first primitive() moves it into its layout.
void DnnlWeight::prepare_int8(const char* op, const Tensor& w) {
  const int64_t O = shape_[0];
  memory::desc plain_md = kind_ == Kind::Conv2d
                              ? memory::desc({O, shape_[1], shape_[2], shape_[3]}, dt::s8, tag::oihw)
                              : memory::desc({shape_[1], O}, dt::s8, tag::ba);
  qweights_ = memory(plain_md, dnnl_engine());
  scales_.assign(size_t(O), 1.0f);
  quantize_rows(op, w, O, w.numel() / O, static_cast<int8_t*>(qweights_.get_data_handle()), scales_.data());
  memory::desc pmd = kind_ == Kind::Conv2d ? memory::desc({1, O, 1, 1}, dt::f32, tag::nchw)
                                           : memory::desc({1, O}, dt::f32, tag::ab);
  post_scale_ = memory(pmd, dnnl_engine(), scales_.data());
  if (bias_) post_bias_ = memory(pmd, dnnl_engine(), bias_.get_data_handle());
}

std::vector<int8_t> DnnlWeight::int8_values() const {
  if (!qweights_) return {};
  const int64_t O = shape_[0];
  memory::desc plain_md = kind_ == Kind::Conv2d
                              ? memory::desc({O, shape_[1], shape_[2], shape_[3]}, dt::s8, tag::oihw)
                              : memory::desc({shape_[1], O}, dt::s8, tag::ba);
  std::vector<int8_t> out(plain_md.get_size());
  memory plain(plain_md, dnnl_engine(), out.data());
  reorder_now(qweights_, plain);
  dnnl_stream().wait();
  return out;
}

// int8 -> f32 or bf16, exact (|q| <= 127 has at most 7 significant bits).
static void convert_s8(const int8_t* q, void* out, dt cdt, size_t n) {
  const int64_t nn = int64_t(n);
  if (cdt == dt::f32) {
    auto* d = static_cast<float*>(out);
#pragma omp parallel for schedule(static) if (nn > (1 << 16))
    for (int64_t i = 0; i < nn; ++i) d[i] = float(q[i]);
    return;
  }
  auto* d = static_cast<uint16_t*>(out);
#pragma omp parallel for schedule(static) if (nn > (1 << 16))
  for (int64_t i = 0; i < nn; ++i) {
    float f = float(q[i]);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    d[i] = uint16_t(u >> 16);  // the low half is zero: truncation is exact
  }
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
  if (format_ == WeightFormat::Int8) {
    // Integer-valued weights: y = (x·q)·scale + bias as post-ops (a bias in the op itself would
    // be added before the scale).
    dnnl::post_ops po;
    po.append_binary(dnnl::algorithm::binary_mul, post_scale_.get_desc());
    if (bias_) po.append_binary(dnnl::algorithm::binary_add, post_bias_.get_desc());
    dnnl::primitive_attr attr = user_scratchpad();
    attr.set_post_ops(po);
    if (kind_ == Kind::Conv2d) {
      const int64_t N = d[0], H = d[1], W = d[2];
      memory::desc src({N, I, H, W}, src_dt, tag::nhwc);
      memory::desc wei({O, I, kh(), kw()}, cdt_, tag::any);
      memory::desc dst({N, O, conv_out_h(H), conv_out_w(W)}, dst_dt, tag::nhwc);
      return dnnl::convolution_forward::primitive_desc(
          dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                          dnnl::algorithm::convolution_direct, src, wei, dst,
                                          {params_.stride, params_.stride},
                                          {params_.pad_top, params_.pad_left},
                                          {params_.pad_bottom, params_.pad_right}),
          attr, dnnl_engine());
    }
    memory::desc src({d[0], I}, src_dt, tag::ab);
    memory::desc wei({I, O}, cdt_, tag::any);
    memory::desc dst({d[0], O}, dst_dt, tag::ab);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), attr, dnnl_engine());
  }
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
    return dnnl::convolution_forward::primitive_desc(desc, user_scratchpad(), dnnl_engine());
  }
  const int64_t M = d[0];
  memory::desc src({M, I}, src_dt, tag::ab);
  memory::desc wei({I, O}, cdt_, tag::any);
  memory::desc dst({M, O}, dst_dt, tag::ab);
  if (bias_) {
    memory::desc b2({1, O}, dt::f32, tag::ab);
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, b2, dst), user_scratchpad(), dnnl_engine());
  }
  return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), user_scratchpad(), dnnl_engine());
}

const memory& DnnlWeight::weights_for(const memory::desc& md) const {
  for (const memory& m : weights_)
    if (m.get_desc() == md) return m;
  memory target = new_weight_memory(md, false);
  reorder_now(weights_[0], target);
  note_primitive_created();
  dnnl_stream().wait();
  weights_.push_back(target);
  return weights_.back();
}

const CachedPrimitive& DnnlWeight::primitive(const std::vector<int64_t>& dims, dt src_dt, dt dst_dt) const {
  std::vector<int64_t> key = dims;
  key.push_back(int64_t(src_dt));
  key.push_back(int64_t(dst_dt));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = cache_.find(key);
  if (it != cache_.end()) return it->second;

  dnnl::primitive_desc pd = make_pd(dims, src_dt, dst_dt);
  CachedPrimitive e;
  e.prim = dnnl::primitive(pd);
  e.scratchpad = pd.scratchpad_desc();
  note_primitive_created();
  e.impl = pd.impl_info_str();
  e.src = memory(pd.src_desc(), dnnl_engine(), DNNL_MEMORY_NONE);
  e.dst = memory(pd.dst_desc(), dnnl_engine(), DNNL_MEMORY_NONE);
  if (format_ == WeightFormat::Int8) {
    const memory::desc wmd = pd.weights_desc();
    e.weights = memory(wmd, dnnl_engine(), DNNL_MEMORY_NONE);
    if (!int8_placed_) {
      // The first primitive (normally the shape every later call has): store q in its layout,
      // so that its calls only convert the type.
      const memory::desc qmd = as_s8(wmd);
      memory placed(qmd, dnnl_engine());
      std::memset(placed.get_data_handle(), 0, qmd.get_size());
      reorder_now(qweights_, placed);
      note_primitive_created();
      dnnl_stream().wait();
      qweights_ = placed;
      int8_placed_ = true;
    }
    if (!(as_s8(wmd) == qweights_.get_desc())) {
      // Another layout than the stored one (another input shape or output type): a converting
      // reorder, made once per layout.
      auto d = std::find_if(dequants_.begin(), dequants_.end(), [&](const auto& r) { return r.md == wmd; });
      if (d == dequants_.end()) {
        dnnl::reorder::primitive_desc rpd(dnnl_engine(), qweights_.get_desc(), dnnl_engine(), wmd, user_scratchpad());
        dequants_.push_back({wmd, dnnl::reorder(rpd), rpd.scratchpad_desc()});
        note_primitive_created();
        d = dequants_.end() - 1;
      }
      e.dequant = d->prim;
      e.dequant_scratchpad = d->scratchpad;
    }
    e.args = {{DNNL_ARG_SRC, e.src}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_DST, e.dst},
              {DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, post_scale_}};
    if (bias_) e.args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1] = post_bias_;
    impl_ = e.impl;
    return cache_.emplace(std::move(key), std::move(e)).first->second;
  }
  e.weights = weights_for(pd.weights_desc());
  e.args = {{DNNL_ARG_SRC, e.src}, {DNNL_ARG_WEIGHTS, e.weights}, {DNNL_ARG_DST, e.dst}};
  if (bias_) e.args[DNNL_ARG_BIAS] = kind_ == Kind::Conv2d ? bias_ : bias2d_;
  impl_ = e.impl;
  return cache_.emplace(std::move(key), std::move(e)).first->second;
}

void DnnlWeight::swap_contents(PreparedWeight& other_pw) {
  auto* o = dynamic_cast<DnnlWeight*>(&other_pw);
  DF_CHECK(o != nullptr, "swap_contents: weight ", other_pw.shape().str(), " was not prepared by the CPU backend");
  if (o == this) return;
  DF_CHECK(o->kind_ == kind_ && o->shape_ == shape_ && o->cdt_ == cdt_ && o->format_ == format_,
           "swap_contents: weights ", shape_.str(), " and ", o->shape_.str(), " differ in kind, shape, type or format");
  std::scoped_lock lock(mu_, o->mu_);
  // Native weights whose replacement holds every layout the other's primitives use (prepare_like):
  // the primitives stay, their weight and bias arguments are pointed at the swapped values.
  auto covers = [](const std::vector<memory>& ws, const std::map<std::vector<int64_t>, CachedPrimitive>& cache) {
    for (const auto& [k, e] : cache) {
      auto it = e.args.find(DNNL_ARG_WEIGHTS);
      if (it == e.args.end()) return false;
      const memory::desc md = it->second.get_desc();
      if (std::none_of(ws.begin(), ws.end(), [&](const memory& m) { return m.get_desc() == md; })) return false;
    }
    return true;
  };
  const bool keep_primitives = !is_int8() && !o->is_int8() && covers(o->weights_, cache_) && covers(weights_, o->cache_);
  std::swap(params_, o->params_);
  std::swap(bias_, o->bias_);
  std::swap(bias2d_, o->bias2d_);
  std::swap(weights_, o->weights_);
  std::swap(buffers_, o->buffers_);
  if (keep_primitives) {
    rebind_cache();
    o->rebind_cache();
    return;
  }
  // Otherwise every member but the mutex; cached primitives and post-op memories keep pointing at
  // the buffers they were made for, which move along with them.
  std::swap(cache_, o->cache_);
  std::swap(impl_, o->impl_);
  std::swap(qweights_, o->qweights_);
  std::swap(int8_placed_, o->int8_placed_);
  std::swap(scales_, o->scales_);
  std::swap(post_scale_, o->post_scale_);
  std::swap(post_bias_, o->post_bias_);
  std::swap(dequants_, o->dequants_);
}

void DnnlWeight::rebind_cache() {
  for (auto& [k, e] : cache_) {
    auto w = e.args.find(DNNL_ARG_WEIGHTS);
    const memory::desc md = w->second.get_desc();
    for (const memory& m : weights_)
      if (m.get_desc() == md) {
        w->second = m;
        e.weights = m;
        break;
      }
    auto b = e.args.find(DNNL_ARG_BIAS);
    if (b != e.args.end()) b->second = kind_ == Kind::Conv2d ? bias_ : bias2d_;
  }
}

void DnnlWeight::dequantize(const CachedPrimitive& e, void* buf) const {
  DF_CHECK(format_ == WeightFormat::Int8, "dequantize: weight ", shape_.str(), " is not int8");
  if (e.dequant) {
    // Per-call argument memories: the cached ones are shared by concurrent runs.
    std::unordered_map<int, memory> args = {{DNNL_ARG_FROM, qweights_},
                                            {DNNL_ARG_TO, memory(e.weights.get_desc(), dnnl_engine(), buf)}};
    add_scratchpad(args, e.dequant_scratchpad);
    e.dequant.execute(dnnl_stream(), args);
    dnnl_stream().wait();
    return;
  }
  convert_s8(static_cast<const int8_t*>(qweights_.get_data_handle()), buf,
             e.weights.get_desc().data_type(), qweights_.get_desc().get_size());
}

void run_primitive(const CachedPrimitive& e, const void* src, void* dst, const void* weights) {
  std::unordered_map<int, memory> args = e.args;
  args[DNNL_ARG_SRC] = memory(e.src.get_desc(), dnnl_engine(), const_cast<void*>(src));
  args[DNNL_ARG_DST] = memory(e.dst.get_desc(), dnnl_engine(), dst);
  if (weights) args[DNNL_ARG_WEIGHTS] = memory(e.weights.get_desc(), dnnl_engine(), const_cast<void*>(weights));
  add_scratchpad(args, e.scratchpad);
  e.prim.execute(dnnl_stream(), args);
  dnnl_stream().wait();
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
  dnnl::primitive_attr attr = user_scratchpad();
  if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, dnnl_engine());
  CachedPrimitive e;
  e.prim = dnnl::matmul(pd);
  e.scratchpad = pd.scratchpad_desc();
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
