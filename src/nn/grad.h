// What a training pass adds to the layers: the plain f32 weights every backward pass through a
// layer needs, which parameters collect gradients, and LoRA adapters beside frozen layers.
//
// A forward pass whose Ctx carries a Grads (Ctx::grads) applies the adapters it holds; without
// one (inference) the layers run exactly as before. Layers are looked up by their prepared
// weight (conv2d/linear) or their gamma tensor (norms), so binding code stays as it is: the
// trainer fills a Grads from a model's PreparedIndex and NormIndex (nn/weights.h).
#pragma once
#include <memory>
#include <string>
#include <unordered_map>

#include "backend/backend.h"
#include "core/tensor.h"
#include "nn/weights.h"

namespace diffuse {

// A conv2d/linear layer's weights as the backward passes need them (f32, [O, I, kh, kw] for
// convolutions, [O, I] for linear layers, including 1×1 convolutions bound as linear).
struct LayerParams {
  std::string name;  // "<module>.weight" (component names)
  Tensor w, b;       // b undefined without a bias
  Tensor gw, gb;     // gradients (+=), defined only for trained parameters
};

struct NormParams {
  std::string name;  // "<module>.weight"
  Tensor ggamma, gbeta;  // gradients (+=), defined only when the norm is trained
};

// LoRA beside a frozen layer. A linear layer (or 1×1 convolution bound as one):
// y = W·x + b + scale·up·(down·x). A convolution (kohya's LoCon, Conv2d layers): down is a
// convolution with the layer's kernel size, stride and padding, up a 1×1 convolution:
// y = conv(x, W) + b + scale·up·conv(x, down).
struct LoraAdapter {
  std::string key;          // the file's module stem ("lora_unet_down_blocks_0_..._to_q")
  // f32 views of the trained tensors: [r, in] and [out, r] (linear), [r, in, kh, kw] and
  // [out, r, 1, 1] (convolution; [r, in] and [out, r] are accepted for a 1×1 one).
  Tensor down, up;
  float scale = 1;          // alpha / rank (× multiplier)
  Tensor gdown, gup;        // gradients (+=), same shapes; undefined when frozen
  // Convolutions: down as the backend runs it, prepared by the layer's first pass and again
  // whenever down's values differ from `down_prepared_from` (the optimiser updates down in place).
  mutable std::shared_ptr<PreparedWeight> down_prepared;
  mutable Tensor down_prepared_from;
};

struct Grads {
  std::unordered_map<const PreparedWeight*, LayerParams> layers;
  std::unordered_map<const void*, NormParams> norms;  // key: the norm's gamma data pointer
  std::unordered_map<const PreparedWeight*, LoraAdapter*> adapters;
  // Trained lookup tables (embeddings): key the table's data pointer, value its f32 gradient (+=).
  std::unordered_map<const void*, Tensor> tables;

  // The layer's params; throws naming the op when the trainer registered none.
  LayerParams& layer(const PreparedWeight* w, const char* what);
  const LoraAdapter* adapter(const PreparedWeight* w) const {
    auto it = adapters.find(w);
    return it == adapters.end() ? nullptr : it->second;
  }
  Tensor* table(const void* data) {
    auto it = tables.find(data);
    return it == tables.end() ? nullptr : &it->second;
  }
  NormParams* norm(const void* gamma_data) {
    auto it = norms.find(gamma_data);
    return it == norms.end() ? nullptr : &it->second;
  }
};

// Registers every layer of `prepared` with its plain f32 weights read from `store` (the tensors
// the layers were prepared from, under the same names; 1×1 convolutions bound as linear get
// their prepared [O, I] shape), and every norm of `norms` (no gradients yet). Throws naming the
// store's file if a tensor is missing.
// `weights` is the type the plain weights are kept in: F32, or BF16 (bf16 training: frozen
// layers' weights in half the memory, converted to f32 per backward pass).
void register_layers(Grads& g, const PreparedIndex& prepared, const NormIndex& norms, const WeightStore& store,
                     DType weights = DType::F32);

}  // namespace diffuse
