// The denoising UNet of Stable Diffusion 1.x, 2.x and XL: diffusers' UNet2DConditionModel with
// CrossAttnDownBlock2D/DownBlock2D, UNetMidBlock2DCrossAttn and CrossAttnUpBlock2D/UpBlock2D,
// positional (sinusoidal) time embedding and, for SDXL, the "text_time" added embedding.
//
// Weights are bound by diffusers names (component "unet", without the "unet/" prefix); single-file
// checkpoints go through component_weights() first. Activations are NHWC.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "nn/layers.h"

namespace diffuse {

struct UNetConfig {
  int in_channels = 4, out_channels = 4;
  std::vector<int> block_out_channels;  // per level, e.g. {320, 640, 1280, 1280}
  int layers_per_block = 2;
  std::vector<bool> cross_attn;         // per level: CrossAttn{Down,Up}Block2D
  std::vector<int> transformer_depth;   // per level (ignored where !cross_attn)
  int mid_depth = 0;                    // mid-block transformer depth; 0: transformer_depth.back()
  // Heads: exactly one of heads_fixed (SD 1.x: 8 heads at every level) and head_dim (SD 2.x/XL:
  // 64, heads = channels / 64) is set, unless heads_per_level (from a diffusers config) is given.
  int heads_fixed = 0;
  int head_dim = 0;
  std::vector<int> heads_per_level;
  bool linear_proj = false;             // proj_in/out as Linear (SD 2.x/XL) or 1×1 conv (SD 1.x)
  int context_dim = 768;
  bool text_time = false;               // SDXL added embedding (pooled text + 6 size/crop ids)
  int addition_time_embed_dim = 256;    // sinusoidal width per time id
  int projection_class_embeddings_input_dim = 0;  // pooled width + 6 · addition_time_embed_dim
  int num_time_ids = 6;
  int norm_groups = 32;
  float norm_eps = 1e-5f;

  int levels() const { return int(block_out_channels.size()); }
  int time_embed_dim() const { return block_out_channels.empty() ? 0 : 4 * block_out_channels[0]; }
  int heads_at(int level) const;  // attention heads of the transformers at `level`
  int mid_transformer_depth() const { return mid_depth > 0 ? mid_depth : transformer_depth.back(); }
  // Throws diffuse::Error naming the first inconsistency.
  void validate() const;
  std::string str() const;  // one line, for logs and messages

  // The published architectures.
  static UNetConfig sd15();
  static UNetConfig sd21();
  static UNetConfig sdxl();
  // Everything detected from diffusers-named tensor shapes (single files carry no config):
  // widths, layers, attention levels and depths, proj kind, context width, in/out channels, the
  // SDXL added embedding. Heads follow the family conventions (conv proj: 8 heads; linear proj:
  // head dim 64); addition_time_embed_dim is 256 unless the add_embedding width only fits a
  // smaller power of two.
  static UNetConfig from_weights(const WeightStore& w);
  // From a diffusers unet/config.json (TensorFile::metadata["unet/config.json"]); throws on
  // settings this implementation does not support.
  static UNetConfig from_diffusers_config(const std::string& json);
};

// What UNet::forward_train keeps for UNet::backward: every block's input (gradient checkpointing
// at block boundaries: the backward recomputes one block at a time, keeping its intermediates
// only while that block's backward runs), the skip connections and the time embedding.
struct UNetSavedBlocks;  // every block's intermediates (models/unet_impl.h)
struct UNetTrace {
  Tensor x, context, emb, semb;
  // Without gradient checkpointing: every resnet's and transformer's intermediates, by input
  // index, so that the backward recomputes nothing (more memory, one forward less per step).
  std::shared_ptr<UNetSavedBlocks> saved;
  std::vector<float> t;
  const Tensor* text_embeds = nullptr;
  const Tensor* time_ids = nullptr;
  std::vector<Tensor> skips;   // forward order
  std::vector<Tensor> inputs;  // each block's input, in execution order
};

class UNet {
 public:
  UNet();
  ~UNet();
  UNet(UNet&&) noexcept;
  UNet& operator=(UNet&&) noexcept;

  // Binds every tensor of `w` (strictly: missing, mis-shaped or unused tensors throw, naming them).
  void load(Backend& be, WeightStore& w, const UNetConfig& cfg);
  bool loaded() const { return impl_ != nullptr; }
  const UNetConfig& config() const;

  // x: [B, H, W, in_channels] latent (already concatenated with mask + masked latent for 9-channel
  // models); t: one timestep per batch item; context: [B, S, context_dim];
  // SDXL: text_embeds [B, pooled], time_ids [B, 6] (required when config().text_time).
  // ControlNet (optional): down_residuals, one per skip connection in order (conv_in output, then
  // each down resnet/attention output and downsampler output: [B, h, w, c] each), added to the
  // skips; mid_residual [B, h, w, c] added to the mid-block output.
  // T2I-Adapter (optional): intrablock, one feature per level [B, h_l, w_l, c_l], added to the down
  // path at the end of level l (after its last resnet/attention, before its downsampler: the
  // level's last skip carries it and the following blocks see it).
  // Returns [B, H, W, out_channels] (epsilon or v, whatever the model predicts), arena-backed.
  // Any H, W >= 1 works: upsamplers resize to their skip connection's size.
  Tensor forward(Ctx& c, const Tensor& x, const std::vector<float>& t, const Tensor& context,
                 const Tensor* text_embeds = nullptr, const Tensor* time_ids = nullptr,
                 const std::vector<Tensor>* down_residuals = nullptr,
                 const Tensor* mid_residual = nullptr, const std::vector<Tensor>* intrablock = nullptr) const;

  // Training (c.grads set: its LoRA adapters apply; models/unet_backward.cpp). forward_train runs
  // forward() keeping what backward() needs in `trace` (tensors of c.arena, which must outlive
  // the backward); backward takes dy = dL/d(prediction) [B, H, W, out_channels], adds the
  // parameter gradients c.grads asks for and writes dL/dx, dL/dcontext and (SDXL, through the
  // add_embedding MLP) dL/dtext_embeds when given (f32, shapes of x, context and text_embeds).
  // Activations are f32 (c.act).
  // checkpointing = false keeps every block's intermediates in c.arena (UNetTrace::saved).
  Tensor forward_train(Ctx& c, const Tensor& x, const std::vector<float>& t, const Tensor& context,
                       const Tensor* text_embeds, const Tensor* time_ids, UNetTrace& trace,
                       bool checkpointing = true) const;
  void backward(Ctx& c, const UNetTrace& trace, const Tensor& dy, Tensor* dx, Tensor* dcontext,
                Tensor* dtext_embeds = nullptr) const;

  // Number of skip connections (= ControlNet down residuals): 1 + levels·layers + levels - 1.
  int num_skips() const;

  // forward() keeps block temporaries in scratch arenas (sized by the largest block after the
  // first pass): the Ctx's workspace (slot kUNet), so passes with separate workspaces run side by
  // side; without one, the UNet's own (one pass at a time, concurrent callers wait). The bytes of
  // the UNet's own scratch, and a way to free it; the next forward allocates it again.
  size_t scratch_capacity() const;
  void release_scratch() const;

  // The prepared conv/linear weights by checkpoint name (diffusers names, "<module>.weight"):
  // LoRA patches replace single entries' contents (PreparedWeight::swap_contents).
  PreparedIndex& prepared();
  // The norm layers' gamma/beta by checkpoint name ("<module>.weight"), for training.
  const NormIndex& norms() const;

  struct Impl;

 private:
  Tensor run(Ctx& c, const Tensor& x, const std::vector<float>& t, const Tensor& context, const Tensor* text_embeds,
             const Tensor* time_ids, const std::vector<Tensor>* down_residuals, const Tensor* mid_residual,
             UNetTrace* trace, const std::vector<Tensor>* intrablock = nullptr) const;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffuse
