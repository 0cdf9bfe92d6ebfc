// The UNet's down path and mid block (binding, input checks, the block-by-block forward with its
// scratch reuse), shared by the UNet and the ControlNet.
#include <cstring>

#include "core/error.h"
#include "models/unet_impl.h"

namespace diffuse {

using namespace unet_blocks;

std::vector<int> UNetTrunk::bind_trunk(Backend& be, const Binder& root, const UNetConfig& c) {
  cfg = c;
  const int L = c.levels(), C0 = c.block_out_channels[0], T = c.time_embed_dim();
  temb.bind(be, root, c);
  conv_in.bind(be, root.sub("conv_in"), c.in_channels, C0, 3);
  std::vector<int> skip_ch = {C0};
  int ch = C0;
  down.clear();
  down.resize(size_t(L));
  for (int l = 0; l < L; ++l) {
    const Binder b = root.sub("down_blocks").sub(l);
    const int out = c.block_out_channels[l];
    Level& lv = down[size_t(l)];
    lv.resnets.resize(size_t(c.layers_per_block));
    if (c.cross_attn[l]) lv.attentions.resize(size_t(c.layers_per_block));
    for (int j = 0; j < c.layers_per_block; ++j) {
      lv.resnets[size_t(j)].bind(be, b.sub("resnets").sub(j), ch, out, T, c);
      ch = out;
      if (c.cross_attn[l])
        lv.attentions[size_t(j)].bind(be, b.sub("attentions").sub(j), out, c.transformer_depth[l], c.heads_at(l), c);
      skip_ch.push_back(out);
    }
    lv.resample = l + 1 < L;
    if (lv.resample) {
      lv.resampler.bind(be, b.sub("downsamplers").sub(0).sub("conv"), out, out, 3, 2);
      skip_ch.push_back(out);
    }
  }
  const Binder mid = root.sub("mid_block");
  mid_res0.bind(be, mid.sub("resnets").sub(0), ch, ch, T, c);
  mid_attn.bind(be, mid.sub("attentions").sub(0), ch, c.mid_transformer_depth(), c.heads_at(L - 1), c);
  mid_res1.bind(be, mid.sub("resnets").sub(1), ch, ch, T, c);
  return skip_ch;
}

void UNetTrunk::check_inputs(const char* who, const Tensor& x, const std::vector<float>& t,
                             const Tensor& context) const {
  DF_CHECK(x.rank() == 4 && x.dim(3) == cfg.in_channels && x.dim(0) >= 1 && x.dim(1) >= 1 && x.dim(2) >= 1, who,
           ": latent ", x.str(), " should be [B, H, W, ", cfg.in_channels, "] (NHWC)");
  const int64_t B = x.dim(0);
  DF_CHECK(int64_t(t.size()) == B, who, ": ", t.size(), " timesteps for a batch of ", B);
  DF_CHECK(context.rank() == 3 && context.dim(0) == B && context.dim(2) == cfg.context_dim, who, ": context ",
           context.str(), " should be [", B, ", S, ", cfg.context_dim, "]");
}

// Scratch arenas: 0 holds block temporaries, 1 the transformer blocks' temporaries, 2 and 3
// ping-pong the running activation.
BlockRunner::BlockRunner(Ctx& c, const UNetTrunk& m, UNetTrace* trace)
    : c_(c),
      lease_(c, Workspace::kUNet, m.own, m.mu),
      temp_(lease_->arenas[0]),
      inner_(&lease_->arenas[1]),
      ping_{&lease_->arenas[2], &lease_->arenas[3]},
      trace_(trace),
      saved_(trace ? trace->saved.get() : nullptr) {}

Tensor BlockRunner::settle(const Tensor& out, bool keep) {
  Tensor dst;
  if (keep) {
    dst = c_.alloc(out.shape(), out.dtype());
    cur_ = -1;
  } else {
    const int next = cur_ == 0 ? 1 : 0;
    ping_[next]->reset();
    dst = ping_[next]->alloc(out.shape(), out.dtype());
    cur_ = next;
  }
  std::memcpy(dst.data(), out.data(), out.bytes());
  temp_.reset();
  return dst;
}

Resnet::Saved* BlockRunner::res_saved() const {
  return saved_ ? UNetSavedBlocks::slot(saved_->res, trace_->inputs.size() - 1) : nullptr;
}

Transformer::Saved* BlockRunner::attn_saved() const {
  return saved_ ? UNetSavedBlocks::slot(saved_->attn, trace_->inputs.size() - 1) : nullptr;
}

Tensor BlockRunner::down(const UNetTrunk& m, Tensor h, const Tensor& semb, const Tensor& context,
                         std::vector<Tensor>& skips, const std::vector<Tensor>* intrablock) {
  BlockRunner& block = *this;
  DF_CHECK(!intrablock || intrablock->size() == m.down.size(), "UNet: ", intrablock ? intrablock->size() : 0,
           " T2I-Adapter features for ", m.down.size(), " levels");
  DF_CHECK(!intrablock || !trace_, "UNet: training with T2I-Adapter features is not supported");
  for (size_t l = 0; l < m.down.size(); ++l) {
    const UNetTrunk::Level& lv = m.down[l];
    for (size_t j = 0; j < lv.resnets.size(); ++j) {
      const bool attn = !lv.attentions.empty();
      h = block(h, !attn, [&](Ctx& tc) { return lv.resnets[j](tc, h, semb, res_saved()); });
      if (attn)
        h = block(h, true, [&](Ctx& tc) { return lv.attentions[j](tc, h, context, tf_scratch(), attn_saved()); });
      if (intrablock && j + 1 == lv.resnets.size()) {  // h is kept (the caller's arena): add in place
        const Tensor& f = (*intrablock)[l];
        DF_CHECK(f.shape() == h.shape(), "UNet: T2I-Adapter feature ", l, " is ", f.str(), ", expected ",
                 h.shape().str(), " (the hint must be the output image's size)");
        c_.be.binary(Binary::Add, h, f.dtype() == h.dtype() ? f : f.to(h.dtype()), h);
      }
      skips.push_back(h);
    }
    if (lv.resample) {
      h = block(h, true, [&](Ctx& tc) { return lv.resampler(tc, h); });
      skips.push_back(h);
    }
  }
  return h;
}

Tensor BlockRunner::mid(const UNetTrunk& m, Tensor h, const Tensor& semb, const Tensor& context) {
  BlockRunner& block = *this;
  h = block(h, false, [&](Ctx& tc) { return m.mid_res0(tc, h, semb, res_saved()); });
  h = block(h, false, [&](Ctx& tc) { return m.mid_attn(tc, h, context, tf_scratch(), attn_saved()); });
  h = block(h, false, [&](Ctx& tc) { return m.mid_res1(tc, h, semb, res_saved()); });
  return h;
}

}  // namespace diffuse
