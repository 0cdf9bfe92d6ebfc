// UNet::Impl: the UNet's layers, shared by unet.cpp (load, forward) and unet_backward.cpp.
// Internal to src/models.
#pragma once
#include <memory>
#include <mutex>
#include <vector>

#include "models/unet.h"
#include "models/unet_blocks.h"

namespace diffuse {

struct UNet::Impl {
  using Level = unet_blocks::Level;
  UNetConfig cfg;
  unet_blocks::TimeEmbedding temb;
  Conv2d conv_in, conv_out;
  GroupNorm norm_out;
  std::vector<Level> down;  // by level
  unet_blocks::Resnet mid_res0, mid_res1;
  unet_blocks::Transformer mid_attn;
  std::vector<Level> up;    // by up block (level L-1-i)
  // Scratch for forward passes without a workspace (see forward()), guarded by `mu`.
  mutable ModelScratch own;
  mutable std::mutex mu;
  // What was prepared, by weight name (LoRA patches single layers, models/lora.h).
  PreparedIndex prepared;
  NormIndex norms;
};

// UNetTrace::saved: the Saved of each resnet / transformer, at the index of its input in
// UNetTrace::inputs (null where that block is of the other kind or not kept).
struct UNetSavedBlocks {
  std::vector<std::unique_ptr<unet_blocks::Resnet::Saved>> res;
  std::vector<std::unique_ptr<unet_blocks::Transformer::Saved>> attn;

  template <class T>
  static T* slot(std::vector<std::unique_ptr<T>>& v, size_t i) {
    if (v.size() <= i) v.resize(i + 1);
    v[i] = std::make_unique<T>();
    return v[i].get();
  }
  template <class T>
  static const T* at(const std::vector<std::unique_ptr<T>>& v, size_t i) {
    return i < v.size() ? v[i].get() : nullptr;
  }
};

}  // namespace diffuse
