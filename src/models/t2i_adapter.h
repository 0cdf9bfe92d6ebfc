// T2I-Adapter (TencentARC, Mou et al. 2023; diffusers' T2IAdapter with adapter_type
// "full_adapter"): a small conv net that turns a hint image into one feature map per UNet level,
// added to the UNet's down path at the end of each level (before its downsampler; the skip
// connection carries it), as the original ldm UNet and diffusers' down_intrablock_additional_residuals do.
//
//   x = pixel_unshuffle(hint, 8)                       [N, H/8, W/8, 64·hint channels]
//   x = conv_in(x)                                     3×3 -> channels[0]
//   per level i: [AvgPool 2×2 if i > 0] [in_conv 1×1 if the width changes]
//                nums_rb × { x = x + block2(ReLU(block1(x))) }   block1 3×3, block2 1×1
//                feature_i = x
//
// Weights bind strictly under the published names of one of two layouts, detected from the file:
//   diffusers (T2IAdapter folders / safetensors): adapter.conv_in, adapter.body.I.in_conv,
//     adapter.body.I.resnets.J.block1, adapter.body.I.resnets.J.block2;
//   TencentARC's original (t2iadapter_*_sd14v1.pth, Adapter(ksize=1, sk=True, use_conv=False)):
//     conv_in, body.K.in_conv, body.K.block1, body.K.block2 with K = I·nums_rb + J (the file does
//     not mark levels that keep their width: 4 levels, as every published config, when they fit).
// Other adapter kinds (the light adapter, SDXL's full_adapter_xl, sk=False / use_conv=True
// variants with skep / down_opt.op tensors) are errors naming the file and what was expected.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "models/unet.h"
#include "nn/layers.h"
#include "nn/weights.h"

namespace diffuse {

struct T2IAdapterConfig {
  int in_channels = 3;          // hint channels (conv_in's input / 64): 3 RGB, 1 grey (sketch, canny)
  std::vector<int> channels;    // per level, e.g. {320, 640, 1280, 1280}
  int nums_rb = 2;              // residual blocks per level
  int downscale() const { return 8 << (int(channels.size()) - 1); }  // pixels per last-level feature pixel
};

class T2IAdapter {
 public:
  T2IAdapter();
  ~T2IAdapter();
  T2IAdapter(T2IAdapter&&) noexcept;
  T2IAdapter& operator=(T2IAdapter&&) noexcept;

  // Whether `w` holds a T2I-Adapter (either layout), from its names alone.
  static bool is_adapter(const WeightStore& w);
  // The same for a file or folder (its tensor names; unreadable files: false, the loader reports).
  static bool is_adapter_file(const std::string& path);
  // Detects the layout and configuration and binds strictly (errors name w.origin()).
  void load(Backend& be, WeightStore& w);
  static T2IAdapter load_file(const std::string& path, Backend& be);
  bool loaded() const { return impl_ != nullptr; }
  const T2IAdapterConfig& config() const;
  const std::string& layout() const;  // "diffusers" or "TencentARC"
  // Throws diffuse::Error unless there is one feature per UNet level with its width.
  void check_compatible(const UNetConfig& unet) const;

  // hint: [N, H, W, 3] RGB in [0, 1] (a 1-channel adapter takes its luma, as PIL's "L");
  // H and W multiples of 8. Returns one feature per level: [N, H/8/2^i, W/8/2^i, channels[i]]
  // (each 2×2 average pool rounds up, as the UNet's downsamplers), arena-backed.
  std::vector<Tensor> forward(Ctx& c, const Tensor& hint) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffuse
