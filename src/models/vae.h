// The Stable Diffusion VAE (diffusers AutoencoderKL): an encoder from images to the latent
// posterior and a decoder from latents to images. Weights bind under diffusers names
// ("encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.mid_block.attentions.0.to_q.weight",
// "quant_conv.weight", ...); name_map.h converts other layouts to these names.
//
// Activations are NHWC. Large intermediates live in scratch arenas (stage outputs ping-pong
// between two arenas, per-stage temporaries in a third, each reset as soon as it is dead), so a
// 512² decode needs about 1 GiB rather than the sum of every intermediate; only the results are
// allocated from the caller's arena. The scratch is the run's Workspace (Ctx::ws, slot kVAE), so
// passes with separate workspaces run side by side; without one, the VAE's own scratch is used
// by one pass at a time (a mutex serialises those callers).
#pragma once
#include <functional>
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

// Tiled decode/encode: only the high-resolution part of the network runs tile by tile, so the
// memory is one tile's working set plus the result instead of growing with the image.
//  - Decode: post_quant_conv, conv_in, the mid block (with its global attention) and up block 0's
//    resnets run untiled at latent resolution (cheap); every later layer runs per tile of that
//    trunk output. Encode: conv_in and the levels up to the last downsampler run per tile of the
//    image; the latent-resolution rest (last level, mid block, heads) untiled.
//  - Tiles overlap by at least overlap_px; the tile outputs are blended with complementary linear
//    ramps `overlap_px / 4` wide centred in each overlap, so every output pixel used lies at
//    least 3/8 overlap_px from its tile's cut edge (the SD decoder's receptive field reaches
//    ~50 px past a cut, the encoder's ~45: with the default 128 px overlap the pixels used are
//    those a whole-image pass computes, up to the GroupNorm statistics).
//  - GroupNorm statistics: each tiled GroupNorm uses the same per-(sample, group) mean and
//    variance in every tile (per-tile statistics would shift colours from tile to tile). They are
//    measured once by a pass over a nearest-subsampled copy of the whole tiled input (trunk output
//    or image) about one tile big; nearest subsampling keeps the values' distribution (averaging
//    would shrink the variance of noise-like parts). The estimate is shared by all tiles, so it
//    cannot make seams; it costs accuracy against the untiled pass: at 1024² with SD 1.5-shaped
//    synthetic weights, mean|Δ| 0.011 (1.5 % of the output's std), max|Δ| 0.25 in [-1, 1] units
//    (tests/slow/test_vae_tiling_full.cpp; bounds in tests/parity/test_vae_tiling.cpp). Exact
//    statistics would need every layer before a GroupNorm over the whole image: a tiled pass per
//    GroupNorm (~10× the work), or the untiled memory. stats_passes trades time for accuracy.
//  - Memory at 1024² (SD 1.5 decoder, 2×2 tiles of 576 px): peak RSS 1.97 GB tiled, 5.01 GB untiled.
struct VAETiling {
  enum class Mode { Off, On, Auto };
  Mode mode = Mode::Auto;
  int tile_px = 640;     // largest tile side in image pixels (a multiple of 8); an axis is cut into
                         // the fewest equal tiles of at most this size that overlap by overlap_px
  int overlap_px = 128;  // least overlap of neighbouring tiles, pixels (a multiple of 8, <= tile_px/2)
  int64_t auto_above = int64_t(1024) * 1024;  // Auto tiles when width·height exceeds this
  // GroupNorm statistics from a copy subsampled by this factor per axis; 0: the smallest factor
  // that makes it fit one tile. 1 gives the exact statistics but needs the untiled pass's memory
  // (for tests and for measuring what the estimate costs).
  int stats_subsample = 0;
  // Measuring passes (0 to 8): each runs every tile with the current statistics and measures
  // every tiled GroupNorm's input over the whole image (each tile over the part it owns); the
  // measured statistics replace the current ones. Each costs one more pass over the tiles. The
  // k-th pass makes the k-th GroupNorm exact; the rest improve on picture-like inputs (full-size
  // decode at 512², picture latent: mean|Δ| 0.021 -> 0.016 -> 0.007 for 0, 1, 2 passes) but not
  // necessarily on noise-like ones.
  int stats_passes = 0;
  // Whether an image of height × width pixels is tiled (it may still fit one tile: then the
  // untiled pass runs).
  bool active(int64_t height, int64_t width) const {
    return mode == Mode::On || (mode == Mode::Auto && height * width > auto_above);
  }
};

// How tiling cuts one axis of `pixels` image pixels (f: the VAE's downscale factor): the tile
// size and starts, in pixels, and the seams (centres of the blend ramps between neighbours).
// One tile of the whole axis when it fits. For tests and reports.
struct VAETileAxis {
  int64_t size = 0;
  std::vector<int64_t> starts;
  std::vector<double> seams;
};
VAETileAxis vae_tile_axis(const VAETiling& t, int64_t pixels, int64_t f);

class VAE {
 public:
  VAE();
  ~VAE();
  VAE(VAE&&) noexcept;
  VAE& operator=(VAE&&) noexcept;

  // Binds and prepares the weights (strictly: missing, mis-shaped or unused tensors throw,
  // except that the tensors of a part not loaded are allowed to remain unused). `training`:
  // also binds quant_conv whole for forward_train (inference runs it as two halves).
  void load(Backend& be, WeightStore& w, const VAEConfig& cfg, bool encoder = true, bool decoder = true,
            bool training = false);
  const VAEConfig& config() const { return cfg_; }
  bool has_encoder() const;
  bool has_decoder() const;

  // z: [B, h, w, latent] NHWC latent, NOT pre-scaled (callers divide by scaling_factor first)
  // -> [B, h·f, w·f, out_channels] raw decoder output (no clamp), f = config().downscale().
  // Activations (and the result) are bf16 when the backend computes in bf16, else f32.
  Tensor decode(Ctx& c, const Tensor& z) const;

  // image: [B, H, W, in_channels] in [-1, 1], H and W multiples of f -> the posterior
  // mean and std: [B, H/f, W/f, latent] each, std = exp(0.5 · clamp(logvar, -30, 20)).
  struct Posterior {
    Tensor mean, std;
  };
  Posterior encode(Ctx& c, const Tensor& image) const;

  // The same, tiled as `tiling` says (see VAETiling); an image that is not tiled, or fits one
  // tile, takes the untiled path above (bit-identical). Throws on an invalid tiling.
  Tensor decode(Ctx& c, const Tensor& z, const VAETiling& tiling) const;
  Posterior encode(Ctx& c, const Tensor& image, const VAETiling& tiling) const;

  // The bytes held by the VAE's own scratch arenas (passes without a workspace: their capacity),
  // and the sum of their peak uses (an upper bound on the scratch a pass needs). An arena that grew during a pass is
  // re-made at exactly its peak at the end of it, so capacity tracks the peak.
  size_t scratch_capacity() const;
  size_t scratch_peak() const;
  // Frees the scratch arenas (the next forward pass allocates them again).
  void release_scratch();

  // ---- training (models/vae_backward.cpp; a VAE loaded with training = true, both parts) ----
  // The prepared layers and norms by diffusers name, for the trainer's Grads (nn/grad.h).
  PreparedIndex& prepared();
  const NormIndex& norms() const;
  // What forward_train keeps for backward: every layer's backward step, in forward order.
  struct TrainPass {
    std::vector<std::function<Tensor(Ctx&, const Tensor&)>> enc, dec;  // dy -> dx
    Tensor mean, logvar, std, eps, z;  // [B, h, w, L] f32
  };
  // image: [B, H, W, in] f32 in [-1, 1], eps: [B, H/f, W/f, L] standard normal ->
  // the posterior (pass.mean, pass.logvar clamped to [-30, 20] as the encoder does), the sample
  // z = mean + std·eps and the decoder's output [B, H, W, out] (f32, in c.arena, which must
  // outlive the backward). c.act must be F32 and c.grads set.
  Tensor forward_train(Ctx& c, const Tensor& image, const Tensor& eps, TrainPass& pass) const;
  // d_recon = dL/d(decoder output); d_mean, d_logvar = the loss's own gradients of the posterior
  // (the KL term; undefined: none). Adds the parameter gradients c.grads asks for.
  // encoder = false stops at the decoder's input (nothing of the encoder trains).
  void backward(Ctx& c, const TrainPass& pass, const Tensor& d_recon, const Tensor& d_mean,
                const Tensor& d_logvar, bool encoder = true) const;

  struct Impl;

 private:
  VAEConfig cfg_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffuse
