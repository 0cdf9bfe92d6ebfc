// oneDNN 2.6 glue for the CPU backend: the engine/stream singleton, prepared (reordered) weights
// for convolution and linear layers, and shape-keyed primitive caches.
//
// Every primitive is created once per input shape (+ dtypes) and kept together with its argument
// memory descriptions, so a steady-state call only wraps its data pointers in memory objects and
// executes: no primitive creation.
//
// Threads: a backend object (its conversion scratch and matmul cache) is used from one thread at
// a time; prepared weights may be shared by several backends running on different threads at
// once (their primitive caches are locked, every call binds its own argument memories, and each
// thread has its own stream). The parallelism is inside each op (OpenMP, which oneDNN shares).
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "backend/backend.h"
#include "core/tensor.h"

namespace diffuse::cpu {

dnnl::engine& dnnl_engine();
dnnl::stream& dnnl_stream();

// f32 / bf16 only (the activation and compute types); throws for anything else.
dnnl::memory::data_type dnnl_dt(DType t);

// Primitives (convolutions, matmuls, weight reorders) created since process start.
size_t primitives_created();
void note_primitive_created();

// A growable 64-byte-aligned buffer; reused across calls (grows, never shrinks).
class Scratch {
 public:
  void* get(size_t bytes);
  size_t capacity() const { return storage_ ? storage_->bytes() : 0; }
 private:
  std::shared_ptr<Storage> storage_;
};

// The calling thread's buffer for weights converted to f32 before their reorder into a
// primitive's layout (prepare_conv2d / prepare_linear / prepare_like); reused from weight to
// weight, freed by release_weight_scratch() (CpuBackend::release_scratch, e.g. after a model load).
Scratch& weight_scratch();
void release_weight_scratch();

// One cached primitive with the memory objects of its fixed arguments. src, dst (and weights for
// matmul and int8 weights) only describe their argument: every call binds its own memory object
// to its data (run_primitive), so concurrent calls never share a handle.
struct CachedPrimitive {
  dnnl::primitive prim;
  dnnl::memory src, dst;   // DNNL_ARG_SRC, DNNL_ARG_DST: descriptions (no data)
  dnnl::memory weights;    // DNNL_ARG_WEIGHTS: per call for matmul and int8, fixed for prepared weights
  std::unordered_map<int, dnnl::memory> args;  // the fixed arguments (prepared weights, bias, post-ops)
  std::string impl;
  // Int8 weights only: `weights` (bound per call to a backend scratch buffer) receives the int8 values converted to the compute type; when the primitive wants another
  // layout than the stored one, by this reorder (with its bound arguments), else by a plain
  // element-wise conversion.
  dnnl::primitive dequant;
  dnnl::memory::desc scratchpad, dequant_scratchpad;  // user scratchpads (size 0: none)
};

// Attributes with a user-managed scratchpad (every primitive here: executions pass a per-thread
// buffer, so primitives running on different threads never share oneDNN's global one).
dnnl::primitive_attr user_scratchpad();
// Executes a reorder from -> to now (weight preparation).
void reorder_now(const dnnl::memory& from, const dnnl::memory& to);

// Executes `e` with src, dst (and weights, when not fixed) bound to these pointers; waits.
void run_primitive(const CachedPrimitive& e, const void* src, void* dst, const void* weights = nullptr);

// Weights of a conv2d or linear layer, prepared for one compute type (f32 or bf16).
// WeightFormat::Int8 keeps only int8 weights q (plain until the first primitive is made, then in
// that primitive's blocked layout), one f32 scale s per output channel and the f32 bias b. Before
// each execution the caller has q converted to the compute type (exact: |q| <= 127) into a
// shared buffer (dequantize()); the primitive computes y = (x·q)·s + b with s and b as fused
// per-channel post-ops (binary mul, binary add), so the weights are never rounded again.
class DnnlWeight : public PreparedWeight {
 public:
  enum class Kind { Conv2d, Linear };
  // w: conv [O, I, kh, kw] / linear [O, I], any float dtype; bias [O] or undefined.
  DnnlWeight(Kind kind, const Tensor& w, const Tensor& bias, const Conv2dParams& p,
             dnnl::memory::data_type compute_dt, WeightFormat wf = WeightFormat::Native);
  // Native weights `w`, `bias` in the layouts like's cached primitives use (every layout it holds
  // before its first pass), with like's kind, shape, parameters and compute type; no primitive
  // descriptor is made: a replacement whose swap keeps like's primitives (swap_contents).
  DnnlWeight(const DnnlWeight& like, const Tensor& w, const Tensor& bias);
  DnnlWeight(const DnnlWeight&) = delete;  // int8 post-op memories point into the object
  DnnlWeight& operator=(const DnnlWeight&) = delete;
  const Shape& shape() const override { return shape_; }
  void swap_contents(PreparedWeight& other) override;

  Kind kind() const { return kind_; }
  const Conv2dParams& params() const { return params_; }
  int64_t out_channels() const { return shape_[0]; }
  int64_t in_channels() const { return shape_[1]; }
  int64_t kh() const { return kind_ == Kind::Conv2d ? shape_[2] : 1; }
  int64_t kw() const { return kind_ == Kind::Conv2d ? shape_[3] : 1; }
  dnnl::memory::data_type compute_dt() const { return cdt_; }
  bool has_bias() const { return bool(bias_); }
  // Output size of a convolution over an h×w input (may be <= 0 for a too-small input).
  int64_t conv_out_h(int64_t h) const;
  int64_t conv_out_w(int64_t w) const;

  // The primitive for this input shape; created (and weights reordered) on first use.
  // conv2d: dims = {N, H, W}; linear: dims = {M}.
  const CachedPrimitive& primitive(const std::vector<int64_t>& dims, dnnl::memory::data_type src_dt,
                                   dnnl::memory::data_type dst_dt) const;
  const std::string& impl_info() const { return impl_; }  // kernel of the last-created primitive
  size_t weight_layouts() const { return weights_.size(); }  // reordered copies held (normally 1; 0 for int8)

  // ---- int8 weights ----
  WeightFormat format() const { return format_; }
  bool is_int8() const { return format_ == WeightFormat::Int8; }
  // The int8 values as row-major [O, I·kh·kw] (a copy, for tests) and the per-output-channel
  // scales (empty unless int8).
  std::vector<int8_t> int8_values() const;
  const std::vector<float>& scales() const { return scales_; }
  size_t int8_bytes() const { return qweights_ ? qweights_.get_desc().get_size() : 0; }  // stored int8 (padded)
  size_t int8_relayouts() const { return dequants_.size(); }  // layouts other than the stored one in use
  // Bytes the compute-type weights of primitive `e` need (its weights_desc size).
  static size_t dequant_bytes(const CachedPrimitive& e) { return e.weights.get_desc().get_size(); }
  // Int8 only: converts the int8 weights into `buf` (>= dequant_bytes(e), 64-byte aligned), to be
  // passed as e's weights. Call before every execution of e: the buffer is shared between layers.
  void dequantize(const CachedPrimitive& e, void* buf) const;

 private:
  dnnl::primitive_desc make_pd(const std::vector<int64_t>& dims, dnnl::memory::data_type src_dt,
                               dnnl::memory::data_type dst_dt) const;
  void prepare_int8(const char* op, const Tensor& w);
  void set_bias(const char* op, const Tensor& w, const Tensor& bias);
  dnnl::memory plain_source(const Tensor& w, Tensor& keep) const;
  void rebind_cache();  // cached primitives' weight/bias arguments -> the current weights_/bias_
  dnnl::memory new_weight_memory(const dnnl::memory::desc& md, bool recycled) const;
  // Weights in layout `md`, reordered from the first prepared copy once per distinct layout.
  const dnnl::memory& weights_for(const dnnl::memory::desc& md) const;

  Kind kind_;
  Shape shape_;
  Conv2dParams params_;
  dnnl::memory::data_type cdt_;
  dnnl::memory bias_;    // f32 [O]
  dnnl::memory bias2d_;  // the same values as [1, O] (matmul's bias argument)
  mutable std::vector<dnnl::memory> weights_;
  mutable std::vector<std::shared_ptr<void>> buffers_;  // weights_' own buffers (new_weight_memory)
  mutable std::map<std::vector<int64_t>, CachedPrimitive> cache_;
  mutable std::string impl_;
  WeightFormat format_ = WeightFormat::Native;
  // int8: s8, plain ([O, I, kh, kw] oihw / logical [I, O] ba) until the first primitive, then in
  // its weight layout (zero-padded); `int8_placed_` says which.
  mutable dnnl::memory qweights_;
  mutable bool int8_placed_ = false;
  std::vector<float> scales_;   // int8: [O]
  dnnl::memory post_scale_, post_bias_;  // int8: scales_ / bias_ as post-op operands [1, O(, 1, 1)]
  // int8: reorders from the stored layout to other layouts (compute type), one per layout.
  struct Dequant {
    dnnl::memory::desc md;
    dnnl::primitive prim;
    dnnl::memory::desc scratchpad;
  };
  mutable std::vector<Dequant> dequants_;
  mutable std::mutex mu_;  // guards the caches above (weights_, cache_, impl_, qweights_, dequants_)
};

// Batched matmul primitives of activations × activations, keyed by shape, dtypes and alpha.
class MatmulCache {
 public:
  // a: [B, M, K], b: [B, K, N] (or [B, N, K] with trans_b), c: [B, M, N].
  CachedPrimitive& get(int64_t B, int64_t M, int64_t K, int64_t N, bool trans_b, float alpha,
                       dnnl::memory::data_type src_dt, dnnl::memory::data_type dst_dt);
  const std::string& impl_info() const { return impl_; }
 private:
  std::map<std::vector<int64_t>, CachedPrimitive> cache_;
  std::string impl_;
};

}  // namespace diffuse::cpu
