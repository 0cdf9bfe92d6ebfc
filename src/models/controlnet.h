// ControlNet (diffusers ControlNetModel): a copy of the UNet's down path and mid block that also
// sees a hint image. The hint goes through the conditioning embedding (conv_in, pairs of 3×3 convs
// — the second of each pair with stride 2 — all followed by SiLU, then conv_out) and is added to
// the conv_in output; every skip connection of the down path and the mid-block output then passes
// a zero-initialised 1×1 conv (controlnet_down_blocks.N, controlnet_mid_block). The results, each
// multiplied by the conditioning scale, are what UNet::forward takes as down_residuals /
// mid_residual.
//
// Weights bind by diffusers names; controlnet_weights() (name_map.h) converts the original
// (cldm, "control_model.") single-file layout. Activations are NHWC.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "io/image.h"
#include "models/unet.h"

namespace diffuse {

struct ControlNetConfig {
  // The trunk: conv_in, time (and SDXL added) embedding, down blocks and mid block exactly as in
  // the UNet it controls (up-path fields and out_channels are unused).
  UNetConfig unet;
  std::vector<int> embedding_channels;  // conditioning_embedding_out_channels, e.g. {16, 32, 96, 256}
  int conditioning_channels = 3;        // hint channels
  bool bgr = false;                     // controlnet_conditioning_channel_order "bgr": channels flipped

  // Pixels per latent pixel the embedding's stride-2 convs reduce the hint by (2^(levels-1)).
  int hint_downscale() const { return 1 << (int(embedding_channels.size()) - 1); }
  void validate() const;  // throws diffuse::Error naming the first inconsistency
  std::string str() const;

  // From diffusers-named tensor shapes (heads follow the UNet conventions of from_weights).
  static ControlNetConfig from_weights(const WeightStore& w);
  // From a diffusers ControlNetModel config.json; throws on settings this implementation does
  // not support (global_pool_conditions, class/addition embeddings other than SDXL's text_time).
  static ControlNetConfig from_diffusers_config(const std::string& json);
};

// One ControlNet evaluation: a residual for each UNet skip connection (UNet::num_skips(), in the
// UNet's order) and one for the mid block; arena-backed, already multiplied by the scale.
// T2I-Adapter features (intrablock: one per UNet level, UNet::forward's intrablock) travel with them.
struct ControlResiduals {
  std::vector<Tensor> down;
  Tensor mid;
  std::vector<Tensor> intrablock;
  bool empty() const { return down.empty() && intrablock.empty(); }
};

class ControlNet {
 public:
  ControlNet();
  ~ControlNet();
  ControlNet(ControlNet&&) noexcept;
  ControlNet& operator=(ControlNet&&) noexcept;

  // Binds every tensor of `w` strictly (missing, mis-shaped or unused tensors throw, naming them).
  void load(Backend& be, WeightStore& w, const ControlNetConfig& cfg);
  // A ControlNet file of any layout (diffusers folder, single file in diffusers or original
  // names; safetensors or .ckpt/.pth). The config comes from config.json when the folder has one,
  // else from the tensor shapes.
  static ControlNet load_file(const std::string& path, Backend& be);
  bool loaded() const { return impl_ != nullptr; }
  const ControlNetConfig& config() const;
  // Number of down residuals (= the controlled UNet's num_skips()).
  int num_skips() const;
  // Throws diffuse::Error when this ControlNet cannot drive `unet` (widths, levels, context).
  void check_compatible(const UNetConfig& unet) const;

  // The conditioning embedding of a hint [N, H, W, conditioning_channels] (values in [0, 1]):
  // [N, H/d, W/d, block_out_channels[0]] with d = hint_downscale() (each stride-2 conv rounds up).
  // It does not depend on the timestep: compute it once per generation and keep a copy.
  Tensor embed_hint(Ctx& c, const Tensor& hint) const;

  // x: [B, h, w, in_channels] scheduler-scaled latent (the UNet's input before any inpainting
  // concatenation); t: one timestep per row; context [B, S, context_dim]; hint_embedding from
  // embed_hint, with 1 row (shared by every batch row) or B rows, spatially equal to the conv_in
  // output [h, w]; SDXL ControlNets also take text_embeds and time_ids as the UNet does. Every
  // residual is multiplied by `scale`; in guess mode (diffusers' guess_mode) residual i of the n
  // down residuals by scale · guess_mode_scale(i, n) and the mid residual by scale (the last of
  // logspace(-1, 0, n + 1)).
  ControlResiduals forward(Ctx& c, const Tensor& x, const std::vector<float>& t, const Tensor& context,
                           const Tensor& hint_embedding, float scale, const Tensor* text_embeds = nullptr,
                           const Tensor* time_ids = nullptr, bool guess_mode = false) const;
  // 10^(-1 + i/n): entry i of logspace(-1, 0, n + 1), from 0.1 (conv_in's skip) to 1 (the mid block).
  static float guess_mode_scale(int i, int n);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// A hint image as the ControlNet pipeline feeds it: 8-bit RGB (grey replicated, alpha dropped)
// mapped to [0, 1] as x/255, NHWC [1, height, width, 3] (owned, f32). When the image is not
// width×height it is resized the way diffusers' control image processor does (PIL Lanczos, a = 3,
// the kernel widened by the scale factor when shrinking, separable: horizontal then vertical, each
// pass rounded to 8 bits); the aspect ratio is not kept.
Tensor prepare_hint(const Image& im, int width, int height);
// The resampling step alone (any channel count): PIL-style Lanczos resize of 8-bit HWC pixels.
Image resize_lanczos(const Image& im, int width, int height);

}  // namespace diffuse
