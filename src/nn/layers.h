// Basic layers over the Backend: each binds its weights by checkpoint name (strictly, through a
// Binder) and runs one or two backend ops, allocating outputs from the context's arena.
#pragma once
#include <memory>

#include "backend/backend.h"
#include "core/arena.h"
#include "nn/weights.h"

namespace diffuse {

// What a forward pass needs: the backend, the arena its activations live in, and the dtype
// activations are stored in (f32, or bf16 to halve activation memory and bandwidth; the backend
// computes in f32 or bf16 either way). Layers allocate their outputs with alloc(shape).
struct Ctx {
  Backend& be;
  Arena& arena;
  DType act = DType::F32;
  Tensor alloc(const Shape& s) { return arena.alloc(s, act); }
  Tensor alloc(const Shape& s, DType t) { return arena.alloc(s, t); }
};

struct Linear {
  std::shared_ptr<PreparedWeight> w;
  int64_t in = 0, out = 0;
  // Binds "<b>weight" [out, in] and, if bias, "<b>bias" [out].
  void bind(Backend& be, const Binder& b, int64_t in, int64_t out, bool bias = true);
  // x: [..., in] -> [..., out]
  Tensor operator()(Ctx& c, const Tensor& x) const;
};

struct Conv2d {
  std::shared_ptr<PreparedWeight> w;
  int64_t in = 0, out = 0, k = 1;
  Conv2dParams p;
  // Binds "<b>weight" [out, in, k, k] and "<b>bias" [out]; padding (k-1)/2 unless given.
  void bind(Backend& be, const Binder& b, int64_t in, int64_t out, int64_t k, int stride = 1);
  void bind(Backend& be, const Binder& b, int64_t in, int64_t out, int64_t k, const Conv2dParams& p);
  // x: [N, H, W, in] -> [N, Ho, Wo, out]
  Tensor operator()(Ctx& c, const Tensor& x) const;
};

struct GroupNorm {
  Tensor gamma, beta;  // f32 [C]
  int groups = 32;
  float eps = 1e-5f;
  void bind(const Binder& b, int64_t channels, int groups, float eps);
  // x: [N, ..., C] -> same; fused SiLU if silu.
  Tensor operator()(Ctx& c, const Tensor& x, bool silu = false) const;
};

struct LayerNorm {
  Tensor gamma, beta;  // f32 [C]
  float eps = 1e-5f;
  void bind(const Binder& b, int64_t channels, float eps = 1e-5f);
  // x: [..., C] -> same
  Tensor operator()(Ctx& c, const Tensor& x) const;
};

// A float tensor of any dtype as an owned f32 copy (norm parameters, embeddings).
Tensor to_f32(const Tensor& t);

}  // namespace diffuse
