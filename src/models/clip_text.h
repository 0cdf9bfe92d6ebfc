// CLIP text encoders (transformers' CLIPTextModel / CLIPTextModelWithProjection): SD 1.x's
// CLIP ViT-L/14, SD 2.x's OpenCLIP ViT-H/14 and SDXL's two encoders (CLIP-L and OpenCLIP
// bigG/14 with its text projection). Weights are bound under diffusers names (see name_map.h for
// single files):
//   text_model.embeddings.{token_embedding,position_embedding}.weight
//   text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}
//   text_model.final_layer_norm
//   text_projection.weight (no bias; CLIPTextModelWithProjection only)
//
// Pre-LN transformer with a causal mask (each token attends to itself and the tokens before it):
//   h = h + out_proj(attn(layer_norm1(h)));  h = h + fc2(act(fc1(layer_norm2(h))))
// The backend's fused attention has no mask, so this model runs its own masked attention
// (per-head q·kᵀ with backend matmul, an exact causal softmax, ·v): 77 tokens make it cheap.
#pragma once
#include <utility>
#include <vector>

#include "nn/layers.h"

namespace diffuse {

struct ClipTextConfig {
  enum Act { QuickGelu, Gelu };  // Gelu: transformers' "gelu" (exact, erf)
  int vocab = 49408;
  int width = 768;
  int layers = 12;
  int heads = 12;
  int intermediate = 3072;
  int max_positions = 77;
  Act act = QuickGelu;
  int projection_dim = 0;  // 0: no text_projection
  float eps = 1e-5f;
  int eos_token = 49407;  // <|endoftext|>: the pooled output is taken at its first occurrence

  // Everything from the tensors themselves (single files carry no config): width and vocab from
  // the token embedding [V, W], positions from the position embedding, layers by counting
  // text_model.encoder.layers.N, heads = W / 64 (CLIP's head dim 64), intermediate from fc1,
  // projection_dim from text_projection.weight if present. Throws diffuse::Error naming the
  // store's file if the token embedding or layer 0 is absent.
  static ClipTextConfig from_weights(const WeightStore& w, Act act);

  static ClipTextConfig clip_l();         // SD 1.x, SDXL encoder 1: 768 wide, 12 layers, quick_gelu
  static ClipTextConfig openclip_h();     // SD 2.x: 1024 wide, 23 layers used (of 24), gelu
  static ClipTextConfig openclip_bigg();  // SDXL encoder 2: 1280 wide, 32 layers, gelu, projection 1280
};

// One token embedding row replaced by a given vector: row b, position t, `vec` f32 of the model's
// width (owned by the caller for the duration of the call).
struct TokenOverride {
  int64_t row = 0, pos = 0;
  const float* vec = nullptr;
};

class ClipTextModel {
 public:
  // Binds every tensor of `cfg` strictly (missing/mis-shaped/unused tensors are reported together,
  // naming the file); position_ids, if present, is ignored. Weights are prepared for `be`.
  void load(Backend& be, WeightStore& w, const ClipTextConfig& cfg);
  bool loaded() const { return !layers_.empty(); }
  const ClipTextConfig& config() const { return cfg_; }
  // Frees the weights (prepared copies and embeddings); loaded() is false afterwards.
  void unload() { *this = ClipTextModel(); }
  // The prepared linear weights by checkpoint name ("text_model.encoder.layers.0.self_attn.q_proj.weight"):
  // LoRA patches replace single entries' contents (PreparedWeight::swap_contents).
  PreparedIndex& prepared() { return prepared_; }

  // All owned f32 tensors (not arena memory): valid for as long as the caller keeps them.
  struct Output {
    Tensor last_hidden;  // [B, T, W]: after the final layer norm
    Tensor penultimate;  // [B, T, W]: hidden_states[-2] (output of the layer before the last, no final norm)
    Tensor pooled;       // [B, W]: last_hidden at the first eos_token of each row (argmax of ids if none)
    Tensor text_embeds;  // [B, P]: pooled · text_projectionᵀ; undefined if the model has no projection
  };

  // ids: B rows of T ≤ max_positions token ids (T = 77 for SD). stop_at_layer = n (1 ≤ n ≤ layers)
  // runs only the first n layers, exactly as if the model had n layers: last_hidden is the final
  // norm of the hidden state after n layers, penultimate the state after n - 1 (the embeddings for
  // n = 1), pooled/text_embeds from that last_hidden. 0 runs all layers. Clip skip:
  //  - A1111 "clip skip k" (SD 1.x/2.x): last_hidden of stop_at_layer = layers - k + 1
  //    (k = 2: apply_final_norm(penultimate) of a full run, the same numbers);
  //  - diffusers SD 1.x clip_skip c: last_hidden of stop_at_layer = layers - c;
  //  - diffusers SDXL clip_skip c (hidden_states[-(c + 2)], no final norm): penultimate of
  //    stop_at_layer = layers - c; the pooled text_embeds still come from a full run.
  // Scratch memory comes from a private arena reset per layer; ctx.arena is not used.
  // overrides: token rows replaced before the position embedding is added (textual inversion:
  // the vectors of an embedding stand in for placeholder ids).
  Output forward(Ctx& ctx, const std::vector<std::vector<int>>& ids, int stop_at_layer = 0,
                 const std::vector<TokenOverride>& overrides = {}) const;

  // hidden: [B, T, W] -> owned [B, T, W]: the final layer norm (SD 2.x / clip skip use it on a
  // penultimate state).
  Tensor apply_final_norm(Ctx& ctx, const Tensor& hidden) const;

  // The norm layers' gamma/beta by checkpoint name, for training.
  const NormIndex& norms() const { return norms_; }
  // Training the embeddings (a model trained from scratch): makes the token embedding an owned
  // f32 tensor and returns {token [V, W], position [P, W]}, the tensors the forward passes read
  // (an optimiser's updates of them apply at once). Their gradients go where ctx.grads->tables
  // says (key: the tensor's data pointer).
  std::pair<Tensor, Tensor> trainable_embeddings();

  // ---- training (ctx.grads set: its adapters apply; models/clip_text_backward.cpp) ----
  // What forward_train keeps: each layer's input (gradient checkpointing per layer: backward
  // recomputes one layer at a time) and where the pooled rows were taken.
  struct Trace {
    std::vector<Tensor> inputs;  // inputs[i]: layer i's input (inputs[0]: the embeddings); owned
    Tensor last;                 // the last layer's output (the final norm's input)
    std::vector<int64_t> pooled_at;
    std::vector<std::vector<int>> ids;  // the token ids (the embedding tables' gradients scatter to their rows)
    Output out;
  };
  Output forward_train(Ctx& ctx, const std::vector<std::vector<int>>& ids, int stop_at_layer, Trace& tr) const;
  // Gradients of the outputs (each may be undefined: not used by the loss): d_last [B, T, W],
  // d_penultimate [B, T, W], d_text_embeds [B, P]. Adds the parameter gradients ctx.grads asks for
  // (layers, norms, projection; the embedding tables when trainable_embeddings() made them
  // trained and ctx.grads->tables holds their gradients: rows scatter-added by token id / position).
  void backward(Ctx& ctx, const Trace& tr, const Tensor& d_last, const Tensor& d_penultimate,
                const Tensor& d_text_embeds) const;

 private:
  struct Layer {
    LayerNorm ln1, ln2;
    Linear q, k, v, out, fc1, fc2;
  };
  // The intermediates a layer's backward reads (layer input x, ln1 out, q/k/v split per head
  // [B·H, T, D], softmax probabilities [B·H, T, T], attention output, residual h, ln2 out, fc1
  // out f, activation out g).
  struct LayerSaved {
    Tensor x, n1, qh, kh, vh, p, a, h, n2, f, g;
  };
  // x: [B, T, W] -> [B, T, W] (new owned tensor, x + attention + MLP)
  Tensor run_layer(Ctx& scratch, const Layer& l, const Tensor& x, LayerSaved* s = nullptr) const;
  // dy [B, T, W] -> dx (scratch arena), from a recomputed layer's intermediates.
  Tensor layer_backward(Ctx& scratch, const Layer& l, const LayerSaved& s, const Tensor& dy) const;
  // q, k, v: [B, T, heads*64] -> [B, T, heads*64], causal
  Tensor causal_attention(Ctx& scratch, const Tensor& q, const Tensor& k, const Tensor& v,
                          LayerSaved* s = nullptr) const;
  // [B, T, H·D] <-> [B·H, T, D]
  Tensor split_heads(Ctx& scratch, const Tensor& x) const;
  Tensor merge_heads(Ctx& scratch, const Tensor& xh, int64_t B) const;
  Output run(Ctx& ctx, const std::vector<std::vector<int>>& ids, int stop_at_layer, Trace* tr,
             const std::vector<TokenOverride>& overrides = {}) const;

  ClipTextConfig cfg_;
  Tensor tok_emb_;  // [V, W] as stored (any float dtype; rows converted on lookup)
  Tensor pos_emb_;  // [P, W] f32
  bool emb_trained_ = false;  // trainable_embeddings() made both owned f32 tensors
  std::vector<Layer> layers_;
  LayerNorm final_ln_;
  Linear proj_;  // bound only if cfg_.projection_dim > 0
  bool has_proj_ = false;
  PreparedIndex prepared_;
  NormIndex norms_;
};

}  // namespace diffuse
