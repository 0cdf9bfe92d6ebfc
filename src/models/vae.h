// The Stable Diffusion VAE (diffusers AutoencoderKL): an encoder from images to the latent
// posterior and a decoder from latents to images. Weights bind under diffusers names
// ("encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.mid_block.attentions.0.to_q.weight",
// "quant_conv.weight", ...); name_map.h converts other layouts to these names.
//
// Activations are NHWC. Large intermediates live in scratch arenas owned by the VAE (stage
// outputs ping-pong between two arenas, per-stage temporaries in a third, each reset as soon as
// it is dead), so a 512² decode needs about 1 GiB rather than the sum of every intermediate;
// only the results are allocated from the caller's arena. One forward pass runs at a time per
// VAE object (a mutex serialises concurrent callers).
#pragma once
#include <memory>
#include <vector>

#include "nn/layers.h"
#include "nn/weights.h"

namespace diffuse {

struct VAEConfig {
  int in_channels = 3, out_channels = 3, latent_channels = 4;
  std::vector<int> block_out_channels;  // per encoder level, e.g. {128, 256, 512, 512}
  int layers_per_block = 2;             // encoder resnets per level (decoder: one more)
  int norm_groups = 32;
  float norm_eps = 1e-6f;
  float scaling_factor = 0.18215f;  // 0.18215 SD1/SD2, 0.13025 SDXL (applied by callers)
  bool mid_attention = true;        // mid blocks carry a self-attention layer
  bool use_quant_conv = true, use_post_quant_conv = true;

  static VAEConfig sd();    // SD 1.x / 2.x: 128/256/512/512, scaling 0.18215
  static VAEConfig sdxl();  // same architecture, scaling 0.13025
  // Detects block_out_channels, layers_per_block, channel counts and the optional layers from
  // the diffusers-named tensors in `w` (encoder or decoder, whichever is present).
  static VAEConfig from_weights(const WeightStore& w, float scaling_factor);
  int downscale() const { return 1 << (int(block_out_channels.size()) - 1); }  // 8 for SD
};

class VAE {
 public:
  VAE();
  ~VAE();
  VAE(VAE&&) noexcept;
  VAE& operator=(VAE&&) noexcept;

  // Binds and prepares the weights (strictly: missing, mis-shaped or unused tensors throw,
  // except that the tensors of a part not loaded are allowed to remain unused).
  void load(Backend& be, WeightStore& w, const VAEConfig& cfg, bool encoder = true, bool decoder = true);
  const VAEConfig& config() const { return cfg_; }
  bool has_encoder() const;
  bool has_decoder() const;

  // z: [B, h, w, latent] NHWC latent, NOT pre-scaled (callers divide by scaling_factor first)
  // -> [B, h·f, w·f, out_channels] raw decoder output (no clamp), f = config().downscale().
  Tensor decode(Ctx& c, const Tensor& z) const;

  // image: [B, H, W, in_channels] in [-1, 1], H and W multiples of f -> the posterior
  // mean and std: [B, H/f, W/f, latent] each, std = exp(0.5 · clamp(logvar, -30, 20)).
  struct Posterior {
    Tensor mean, std;
  };
  Posterior encode(Ctx& c, const Tensor& image) const;

  // The bytes held by the internal scratch arenas (their capacity), and the sum of their peak
  // uses (an upper bound on the scratch a pass needs). An arena that grew during a pass is
  // re-made at exactly its peak at the end of it, so capacity tracks the peak.
  size_t scratch_capacity() const;
  size_t scratch_peak() const;
  // Frees the scratch arenas (the next forward pass allocates them again).
  void release_scratch();

  struct Impl;

 private:
  VAEConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffuse
