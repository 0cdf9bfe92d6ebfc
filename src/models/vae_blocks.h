// The VAE's building blocks (diffusers AutoencoderKL names) and its private state, shared by the
// untiled forward passes (vae.cpp) and the tiled ones (vae_tiling.cpp). Internal to src/models.
#pragma once
#include <algorithm>
#include <cmath>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

#include "core/error.h"
#include "models/vae.h"
#include "nn/layers.h"

namespace diffuse::vae_blocks {

// Runs a forward pass stage by stage. Each stage reads its input from where the previous stage
// left it and writes its output into the other ping-pong arena (or the caller's arena for the
// final stage); its temporaries go to the temp arena, reset after every stage. After stage k,
// the arena holding stage k's input is dead and reset.
class Stages {
 public:
  // arenas: ping, pong, temp; peaks: their peak use so far (kept across re-made arenas).
  Stages(Ctx& caller, Arena* arenas, size_t* peaks) : peaks_(peaks), caller_(caller), ping_{&arenas[0], &arenas[1]}, temp_(&arenas[2]) {
    for (int i = 0; i < 3; ++i) allocs_[i] = all(i)->heap_allocations();
  }
  // Resets the scratch. An arena that had to grow during this pass is re-made at exactly its
  // peak (growth by doubling chunks leaves up to ~2.5× the peak reserved otherwise).
  ~Stages() {
    for (int i = 0; i < 3; ++i) {
      Arena* a = all(i);
      peaks_[i] = std::max(peaks_[i], a->peak());
      a->reset();
      if (a->heap_allocations() > allocs_[i] && a->capacity() > a->peak()) *a = Arena(a->peak());
    }
  }
  Stages(const Stages&) = delete;
  Stages& operator=(const Stages&) = delete;
  using Fn = std::function<Tensor(Ctx& tmp, Ctx& out)>;
  Tensor run(const Fn& f, bool final_stage = false) {
    Ctx t{caller_.be, *temp_, caller_.act, caller_.ws};
    Ctx o{caller_.be, final_stage ? caller_.arena : *ping_[k_ % 2], caller_.act, caller_.ws};
    Tensor y = f(t, o);
    temp_->reset();
    ping_[(k_ + 1) % 2]->reset();  // held this stage's input
    ++k_;
    return y;
  }
  Ctx temp() { return Ctx{caller_.be, *temp_, caller_.act, caller_.ws}; }
  Ctx& caller() { return caller_; }

 private:
  Arena* all(int i) const { return i < 2 ? ping_[i] : temp_; }
  size_t* peaks_;
  size_t allocs_[3] = {};
  Ctx& caller_;
  Arena* ping_[2];
  Arena* temp_;
  int k_ = 0;
};

// Where the GroupNorms of a tiled pass take their statistics from (vae_tiling.cpp). Record:
// from their own input (what GroupNorm does), remembered in call order. Apply: the remembered
// ones, in the same order, so every tile is normalised alike; optionally also measuring each
// GroupNorm's input over the part of the image the tile owns, so that after a pass over all
// tiles the measured statistics (of the whole image, as computed with the applied ones) can
// replace the applied ones.
class NormStats {
 public:
  // The rows [y0, y1) and columns [x0, x1) a tile owns, in global units of the tiled input
  // (seams may fall between units), and where the tile starts (y, x) in those units.
  struct Owned {
    double y0 = 0, y1 = 0, x0 = 0, x1 = 0;
    int64_t start_y = 0, start_x = 0;
    int64_t in_h = 0;  // the tile input's height (a GroupNorm input of height h is at scale h / in_h)
  };
  void record();
  void apply();
  void apply_and_measure(const Owned& owned);
  void take_measured();  // after a measuring pass over all tiles: measured -> applied
  size_t size() const { return stats_.size(); }
  bool all_used() const { return next_ == stats_.size(); }  // every remembered set was taken
  // x: [N, ..., C] -> same (in c)
  Tensor operator()(Ctx& c, const GroupNorm& gn, const Tensor& x, bool silu);

 private:
  struct Acc {  // per (sample, group): count, mean, sum of squared deviations (Chan et al.)
    double n = 0;
    std::vector<double> mean, m2;
  };
  void measure(Ctx& c, const Tensor& x, int groups, Acc& acc) const;
  enum class Mode { Record, Apply } mode_ = Mode::Record;
  bool measuring_ = false;
  Owned owned_;
  std::vector<std::pair<Tensor, Tensor>> stats_;  // (mean, var), each [N, groups]
  std::vector<Acc> acc_;
  size_t next_ = 0;
};

// gn(x) with the statistics from `ns` when given, else GroupNorm's own.
inline Tensor norm(Ctx& c, const GroupNorm& gn, const Tensor& x, bool silu, NormStats* ns) {
  return ns ? (*ns)(c, gn, x, silu) : gn(c, x, silu);
}

// Hand-prepared conv (for the halves of a split conv).
inline Conv2d make_conv(Backend& be, const Tensor& w, const Tensor& b, int64_t k, const Conv2dParams& p) {
  Conv2d c;
  c.in = w.dim(1);
  c.out = w.dim(0);
  c.k = k;
  c.p = p;
  c.w = be.prepare_conv2d(w, b, p);
  return c;
}

// diffusers ResnetBlock2D without time embedding: GN-SiLU-conv, GN-SiLU-conv, + (1×1 conv) skip.
struct ResBlock {
  GroupNorm norm1, norm2;
  Conv2d conv1, conv2, shortcut;
  bool has_shortcut = false;
  void bind(Backend& be, const Binder& b, int64_t in, int64_t out, const VAEConfig& cfg) {
    norm1.bind(b.sub("norm1"), in, cfg.norm_groups, cfg.norm_eps);
    conv1.bind(be, b.sub("conv1"), in, out, 3);
    norm2.bind(b.sub("norm2"), out, cfg.norm_groups, cfg.norm_eps);
    conv2.bind(be, b.sub("conv2"), out, out, 3);
    has_shortcut = in != out;
    if (has_shortcut) shortcut.bind(be, b.sub("conv_shortcut"), in, out, 1);
  }
  // x: [N, H, W, in] -> [N, H, W, out] (in `o`); GroupNorm statistics from `ns` when given.
  Tensor operator()(Ctx& t, Ctx& o, const Tensor& x, NormStats* ns = nullptr) const {
    Tensor h = norm(t, norm1, x, true, ns);
    h = conv1(t, h);
    h = norm(t, norm2, h, true, ns);
    Tensor y = conv2(o, h);
    Tensor skip = has_shortcut ? shortcut(t, x) : x;
    o.be.binary(Binary::Add, y, skip, y);
    return y;
  }
};

// diffusers Attention as built by UNetMidBlock2D for the VAE: one head of width C, GroupNorm on
// the tokens, biased q/k/v/out projections, residual added, rescale factor 1.
struct AttnBlock {
  GroupNorm norm;
  Linear q, k, v, out;
  int64_t channels = 0;
  void bind(Backend& be, const Binder& b, int64_t c, const VAEConfig& cfg) {
    channels = c;
    norm.bind(b.sub("group_norm"), c, cfg.norm_groups, cfg.norm_eps);
    q.bind(be, b.sub("to_q"), c, c);
    k.bind(be, b.sub("to_k"), c, c);
    v.bind(be, b.sub("to_v"), c, c);
    out.bind(be, b.sub("to_out").sub(0), c, c);
  }
  // x: [N, H, W, C] -> same (in `o`)
  Tensor operator()(Ctx& t, Ctx& o, const Tensor& x) const {
    const int64_t n = x.dim(0), hw = x.dim(1) * x.dim(2);
    Tensor tokens = x.reshape({n, hw, channels});  // [N, HW, C]
    Tensor h = norm(t, tokens);
    Tensor qt = q(t, h), kt = k(t, h), vt = v(t, h);
    Tensor a = t.alloc({n, hw, channels});
    t.be.attention(qt, kt, vt, 1, 1.0f / std::sqrt(float(channels)), a);
    Tensor y = out(o, a);
    o.be.binary(Binary::Add, y, tokens, y);
    return y.reshape(x.shape());
  }
};

struct MidBlock {
  ResBlock r0, r1;
  AttnBlock attn;
  bool has_attn = true;
  void bind(Backend& be, const Binder& b, int64_t c, const VAEConfig& cfg) {
    r0.bind(be, b.sub("resnets").sub(0), c, c, cfg);
    has_attn = cfg.mid_attention;
    if (has_attn) attn.bind(be, b.sub("attentions").sub(0), c, cfg);
    r1.bind(be, b.sub("resnets").sub(1), c, c, cfg);
  }
  // x: [N, H, W, C] -> same
  Tensor operator()(Stages& s, Tensor x) const {
    x = s.run([&](Ctx& t, Ctx& o) { return r0(t, o, x); });
    if (has_attn) x = s.run([&](Ctx& t, Ctx& o) { return attn(t, o, x); });
    return s.run([&](Ctx& t, Ctx& o) { return r1(t, o, x); });
  }
};

struct Level {
  std::vector<ResBlock> resnets;
  bool resample = false;  // encoder: downsampler; decoder: upsampler
  Conv2d conv;
};

}  // namespace diffuse::vae_blocks

namespace diffuse {

struct VAE::Impl {
  using Stages = vae_blocks::Stages;
  using NormStats = vae_blocks::NormStats;
  // Encoder
  bool has_enc = false;
  Conv2d enc_in;
  std::vector<vae_blocks::Level> down;
  vae_blocks::MidBlock enc_mid;
  GroupNorm enc_norm_out;
  Conv2d enc_out;                    // whole, when quant_conv follows it
  Conv2d head_mean, head_logvar;     // quant_conv (or conv_out without one) split in halves
  Conv2d quant;                      // quant_conv whole (loaded for training only)
  bool training = false;
  PreparedIndex prepared;            // every bound layer and norm by diffusers name (training)
  NormIndex norms;
  // Decoder
  bool has_dec = false;
  Conv2d post_quant, dec_in;
  vae_blocks::MidBlock dec_mid;
  std::vector<vae_blocks::Level> up;
  GroupNorm dec_norm_out;
  Conv2d dec_out;
  VAEConfig cfg;
  // Scratch for callers without a workspace (nn/layers.h): arenas 0, 1 ping-pong stage outputs,
  // 2 holds per-stage temporaries. A workspace's kVAE slot is used the same way.
  mutable std::mutex mu;
  mutable ModelScratch own;

  // The decoder split where tiling starts (vae.cpp), before up level `split`'s upsampler.
  // Trunk: post_quant_conv, conv_in, the mid block and up levels 0..split (their upsamplers
  // below `split`): z [N, h, w, L] -> [N, h·2^split, w·2^split, C]. Tail: up level split's
  // upsampler and everything after it, norm_out + SiLU, conv_out -> [N, h·f, w·f, out]; in the
  // caller's arena if final, else in scratch. Untiled: tail(trunk(z, k), k) for any k.
  Tensor dec_trunk(Stages& s, Tensor z, size_t split) const;
  Tensor dec_tail(Stages& s, Tensor x, NormStats* ns, bool final, size_t split) const;
  Tensor upsample(Stages& s, const vae_blocks::Level& lv, Tensor x) const;  // lv's upsampler, if any
  // The encoder split. Head: conv_in and the levels up to the last downsampler:
  // image [N, H, W, in] -> [N, H/f, W/f, C]. Rest: the latent-resolution levels, mid block,
  // norm_out + SiLU, conv_out, quant_conv -> the posterior (mean in the caller's arena).
  Tensor enc_head(Stages& s, Tensor x, NormStats* ns) const;
  VAE::Posterior enc_rest(Stages& s, Tensor x) const;
};

}  // namespace diffuse
