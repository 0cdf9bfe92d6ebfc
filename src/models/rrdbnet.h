// ESRGAN / Real-ESRGAN upscalers: RRDBNet (Wang et al. 2018, "ESRGAN"; BasicSR's rrdbnet_arch).
//
//   [pixel-unshuffle by 2 or 4 for Real-ESRGAN's x2 / x1 models]
//   feat = conv_first(x)
//   trunk = feat + conv_body(RRDB_{num_block}(...RRDB_1(feat)))
//   num_upsample × { nearest ×2, conv, LeakyReLU(0.2) }
//   out = conv_last(LeakyReLU(conv_hr(·)))
// where RRDB(x) = x + 0.2·RDB3(RDB2(RDB1(x))) and each residual dense block RDB(x) =
// x + 0.2·conv5(cat(x, x1, x2, x3, x4)), x_k = LeakyReLU(conv_k(cat(x, x1, ..., x_{k-1}))), the
// first four convs growing num_grow_ch channels each. Every conv is 3×3, stride 1, padding 1, biased.
//
// Weights bind strictly (every tensor used, shapes checked) under the names of one of the
// published layouts, detected from the file:
//   Real-ESRGAN / BasicSR: conv_first, body.N.rdbK.convM, conv_body, conv_up1, conv_up2, conv_hr,
//     conv_last (a BasicSR .pth nests them under params_ema / params: the reader names them
//     "params_ema.conv_first.weight", ...; params_ema is used when both are there, as BasicSR does).
//   ESRGAN (xinntao/ESRGAN's RRDBNet_arch, BSRGAN): conv_first, RRDB_trunk.N.RDBK.convM, trunk_conv,
//     upconv1, upconv2, HRconv, conv_last.
//   old ESRGAN (the "old arch" of most community models): model.0, model.1.sub.N.RDBK.convM.0,
//     model.1.sub.<num_block>, then model.3, model.6, ... (one per upsample), HR conv and last conv
//     at model.<3u+2> and model.<3u+4> for u upsamples (x4: model.3, 6, 8, 10).
// The configuration (channels, widths, block count, upsamples, pixel-unshuffle) comes from the
// shapes. Images are RGB in [0, 1] (Real-ESRGAN's and ESRGAN's convention); outputs are not clamped.
#pragma once
#include <memory>
#include <string>

#include "nn/layers.h"
#include "nn/weights.h"

namespace diffuse {

struct RRDBNetConfig {
  int in_channels = 3;   // image channels (before the pixel-unshuffle)
  int out_channels = 3;
  int num_feat = 64, num_block = 23, num_grow_ch = 32;
  int num_upsample = 2;  // nearest ×2 + conv stages
  int unshuffle = 1;     // pixel-unshuffle factor of the input: 1, 2 (Real-ESRGAN x2) or 4 (x1)
  int scale() const { return (1 << num_upsample) / unshuffle; }
};

enum class RRDBLayout { RealESRGAN, ESRGAN, OldESRGAN };
const char* rrdb_layout_name(RRDBLayout l);  // "Real-ESRGAN", "ESRGAN", "old ESRGAN"

class RRDBNet {
 public:
  RRDBNet();
  ~RRDBNet();
  RRDBNet(RRDBNet&&) noexcept;
  RRDBNet& operator=(RRDBNet&&) noexcept;

  // Detects the layout and configuration of the tensors in `w` and binds them strictly (missing,
  // mis-shaped or unused tensors throw, naming w.origin()). A file that is no RRDBNet throws
  // "<origin>: not an ESRGAN / Real-ESRGAN upscaler (RRDBNet): expected ...".
  void load(Backend& be, WeightStore& w);
  const RRDBNetConfig& config() const { return cfg_; }
  RRDBLayout layout() const { return layout_; }
  bool loaded() const { return impl_ != nullptr; }

  // x: [N, H, W, in_channels] f32 or bf16, H and W multiples of config().unshuffle
  // -> [N, H·s, W·s, out_channels] f32 (in c.arena), s = config().scale().
  // Activations are f32 (convs compute as the backend's precision says). Scratch: the model's
  // own arenas, one pass at a time (a mutex serialises callers); they keep their size for the
  // next pass until release_scratch(). Peak scratch ≈ 2.25 · num_feat · (H·s)(W·s) · 4 bytes plus
  // the trunk's few input-resolution tensors (x4, 64 features: ~0.5 GB for a 224² input).
  Tensor forward(Ctx& c, const Tensor& x) const;

  size_t scratch_capacity() const;
  void release_scratch();

  struct Impl;

 private:
  RRDBNetConfig cfg_;
  RRDBLayout layout_ = RRDBLayout::RealESRGAN;
  std::unique_ptr<Impl> impl_;
};

// Opens `path` (safetensors, or a PyTorch .pth/.pt zip) and loads it as an RRDBNet prepared for
// `be`. Errors name the file and what was expected.
RRDBNet load_rrdbnet(const std::string& path, Backend& be);

}  // namespace diffuse
