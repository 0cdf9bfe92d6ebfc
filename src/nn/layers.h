// Basic layers over the Backend: each binds its weights by checkpoint name (strictly, through a
// Binder) and runs one or two backend ops, allocating outputs from the context's arena.
#pragma once
#include <memory>
#include <mutex>

#include "backend/backend.h"
#include "core/arena.h"
#include "nn/grad.h"
#include "nn/weights.h"

namespace diffuse {

// The scratch arenas one model component uses inside a forward pass (block temporaries,
// ping-pong activations), with the peak use of each so far.
struct ModelScratch {
  static constexpr int kArenas = 4;
  Arena arenas[kArenas];
  size_t peaks[kArenas] = {};
  size_t capacity() const;
  size_t peak() const;  // sum over the arenas of max(remembered peak, current peak)
  void release();       // frees the arenas (the next pass allocates them again)
};

// Per-run scratch memory, owned by whoever runs the models (one per run / request / thread):
// the models themselves hold only weights, so one loaded model serves several runs one after
// another or side by side, each with its own Workspace (and its own Backend object, whose
// conversion buffers are per backend). A forward pass whose Ctx carries no workspace uses one the
// model keeps for such callers, one pass at a time (tests and tools that run a single model).
class Workspace {
 public:
  enum Slot { kUNet = 0, kVAE = 1, kSlots = 2 };
  ModelScratch& scratch(Slot s) { return slots_[s]; }
  const ModelScratch& scratch(Slot s) const { return slots_[s]; }
  size_t capacity() const;
  void release();
  void release(Slot s) { slots_[s].release(); }

 private:
  ModelScratch slots_[kSlots];
};

// What a forward pass needs: the backend, the arena its activations live in, the dtype
// activations are stored in (f32, or bf16 to halve activation memory and bandwidth; the backend
// computes in f32 or bf16 either way) and the run's workspace (may be null, see Workspace).
// A training pass also carries `grads` (nn/grad.h: plain weights, gradient buffers, LoRA
// adapters); inference passes leave it null. Layers allocate their outputs with alloc(shape).
// Derived contexts keep `ws` and `grads`.
struct Ctx {
  Backend& be;
  Arena& arena;
  DType act = DType::F32;
  Workspace* ws = nullptr;
  Grads* grads = nullptr;
  Tensor alloc(const Shape& s) { return arena.alloc(s, act); }
  Tensor alloc(const Shape& s, DType t) { return arena.alloc(s, t); }
};

// The scratch one forward pass of a model component uses: the Ctx's workspace slot, or the
// component's own scratch `own` (locked with `mu` for the pass) when the Ctx carries none.
class ScratchLease {
 public:
  ScratchLease(const Ctx& c, Workspace::Slot slot, ModelScratch& own, std::mutex& mu) {
    if (c.ws) {
      s_ = &c.ws->scratch(slot);
    } else {
      lock_ = std::unique_lock<std::mutex>(mu);
      s_ = &own;
    }
  }
  ModelScratch& operator*() const { return *s_; }
  ModelScratch* operator->() const { return s_; }

 private:
  std::unique_lock<std::mutex> lock_;
  ModelScratch* s_ = nullptr;
};

struct Linear {
  std::shared_ptr<PreparedWeight> w;
  int64_t in = 0, out = 0;
  // Binds "<b>weight" [out, in] and, if bias, "<b>bias" [out].
  void bind(Backend& be, const Binder& b, int64_t in, int64_t out, bool bias = true);
  // x: [..., in] -> [..., out] (+ scale·up·down·x when c.grads holds an adapter for this layer)
  Tensor operator()(Ctx& c, const Tensor& x) const;
  // Backward (c.grads set): x is the forward's input, dy [..., out] = dL/dy. Writes dL/dx into
  // *dx (+= when accumulate; dx may be null when not wanted) and adds the weight, bias and
  // adapter gradients the Grads asks for.
  void backward(Ctx& c, const Tensor& x, const Tensor& dy, Tensor* dx, bool accumulate = false) const;
  Tensor backward(Ctx& c, const Tensor& x, const Tensor& dy) const;  // a new dx
};

struct Conv2d {
  std::shared_ptr<PreparedWeight> w;
  int64_t in = 0, out = 0, k = 1;
  Conv2dParams p;
  // Binds "<b>weight" [out, in, k, k] and "<b>bias" [out]; padding (k-1)/2 unless given.
  void bind(Backend& be, const Binder& b, int64_t in, int64_t out, int64_t k, int stride = 1);
  void bind(Backend& be, const Binder& b, int64_t in, int64_t out, int64_t k, const Conv2dParams& p);
  // x: [N, H, W, in] -> [N, Ho, Wo, out] (+ scale·up·conv(x, down) when c.grads holds an adapter
  // for this layer: LoCon, down with this layer's kernel, stride and padding, up 1×1)
  Tensor operator()(Ctx& c, const Tensor& x) const;
  // Backward: x the forward's input, dy [N, Ho, Wo, out] -> a new dx [N, H, W, in] (or none when
  // !want_dx); adds the weight, bias and adapter gradients the Grads asks for.
  Tensor backward(Ctx& c, const Tensor& x, const Tensor& dy, bool want_dx = true) const;
};

struct GroupNorm {
  Tensor gamma, beta;  // f32 [C]
  int groups = 32;
  float eps = 1e-5f;
  void bind(const Binder& b, int64_t channels, int groups, float eps);
  // x: [N, ..., C] -> same; fused SiLU if silu.
  Tensor operator()(Ctx& c, const Tensor& x, bool silu = false) const;
  // Backward: x the forward's input, dy = dL/dy -> a new dx; gamma/beta gradients if trained.
  Tensor backward(Ctx& c, const Tensor& x, const Tensor& dy, bool silu = false) const;
};

struct LayerNorm {
  Tensor gamma, beta;  // f32 [C]
  float eps = 1e-5f;
  void bind(const Binder& b, int64_t channels, float eps = 1e-5f);
  // x: [..., C] -> same
  Tensor operator()(Ctx& c, const Tensor& x) const;
  Tensor backward(Ctx& c, const Tensor& x, const Tensor& dy) const;  // as GroupNorm::backward
};

// A float tensor of any dtype as an owned f32 copy (norm parameters, embeddings).
Tensor to_f32(const Tensor& t);

}  // namespace diffuse
