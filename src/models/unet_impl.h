// UNet::Impl: the UNet's layers, shared by unet.cpp (load, forward) and unet_backward.cpp.
// Internal to src/models.
#pragma once
#include <memory>
#include <mutex>
#include <vector>

#include "models/unet.h"
#include "models/unet_blocks.h"

namespace diffuse {

// The trunk the UNet and the ControlNet share: the time (and SDXL added) embedding, conv_in, the
// down path and the mid block, bound by diffusers names, with the scratch a forward pass without a
// workspace uses (guarded by `mu`).
struct UNetTrunk {
  using Level = unet_blocks::Level;
  UNetConfig cfg;
  unet_blocks::TimeEmbedding temb;
  Conv2d conv_in;
  std::vector<Level> down;  // by level
  unet_blocks::Resnet mid_res0, mid_res1;
  unet_blocks::Transformer mid_attn;
  mutable ModelScratch own;
  mutable std::mutex mu;

  // Binds time_embedding (add_embedding), conv_in, down_blocks.N and mid_block under `root`.
  // Returns the channels of every skip connection, in order (conv_in's output first).
  std::vector<int> bind_trunk(Backend& be, const Binder& root, const UNetConfig& cfg);
  // Checks x [B, H, W, in_channels], one timestep per row and context [B, S, context_dim]; `who`
  // names the model in the message.
  void check_inputs(const char* who, const Tensor& x, const std::vector<float>& t, const Tensor& context) const;
};

struct UNetSavedBlocks;

// Runs a forward pass block by block (resnet, transformer, resampler), each with its temporaries
// in the pass's scratch (the workspace's slot kUNet, or the trunk's own), reset after the block;
// a block's output is copied into the caller's arena (kept: skip connections, read again later)
// or into the ping-pong arena not holding the block's input. A pass so holds the kept tensors, one
// running activation and one block's temporaries, not every intermediate.
// A training pass (trace) keeps every block's input and output in the caller's arena; without
// checkpointing (trace->saved) blocks run in the caller's arena and keep their intermediates.
class BlockRunner {
 public:
  BlockRunner(Ctx& c, const UNetTrunk& m, UNetTrace* trace);
  BlockRunner(const BlockRunner&) = delete;
  BlockRunner& operator=(const BlockRunner&) = delete;

  // Runs fn(block ctx) on the block input `in`; returns its output (kept: in the caller's arena).
  template <class F>
  Tensor operator()(const Tensor& in, bool keep, const F& fn) {
    Ctx tc{c_.be, saved_ ? c_.arena : temp_, c_.act, c_.ws, c_.grads};
    if (trace_) trace_->inputs.push_back(in);
    Tensor out = fn(tc);
    if (saved_) return out;
    return settle(out, keep || trace_);
  }
  // Where the current block (the last input given) keeps its intermediates: null unless saving.
  unet_blocks::Resnet::Saved* res_saved() const;
  unet_blocks::Transformer::Saved* attn_saved() const;
  // The transformer blocks' own scratch (null when saving).
  Arena* tf_scratch() const { return saved_ ? nullptr : inner_; }

  // The trunk's blocks. down(): the down path from h (conv_in's output, already the first skip),
  // pushing each resnet/attention/downsampler output to `skips` (kept); mid(): the mid block.
  // semb: SiLU(time embedding) [B, 4·C0]; context [B, S, context_dim]. intrablock (T2I-Adapter):
  // one feature per level, added after the level's last resnet/attention (before its skip is kept).
  Tensor down(const UNetTrunk& m, Tensor h, const Tensor& semb, const Tensor& context, std::vector<Tensor>& skips,
              const std::vector<Tensor>* intrablock = nullptr);
  Tensor mid(const UNetTrunk& m, Tensor h, const Tensor& semb, const Tensor& context);

 private:
  Tensor settle(const Tensor& out, bool keep);
  Ctx& c_;
  ScratchLease lease_;
  Arena& temp_;
  Arena* inner_;
  Arena* ping_[2];
  int cur_ = -1;  // ping arena holding the running activation; -1: the caller's arena
  UNetTrace* trace_;
  UNetSavedBlocks* saved_;
};

struct UNet::Impl : UNetTrunk {
  GroupNorm norm_out;
  Conv2d conv_out;
  std::vector<Level> up;    // by up block (level L-1-i)
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
