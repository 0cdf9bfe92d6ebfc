// The guided denoising loop: one UNet batch [uncond; cond] per step, classifier-free guidance,
// one scheduler step. Per-step activations live in a private arena that is reset every step (it
// coalesces to its peak after the first step, so later steps allocate nothing); the latent
// itself is an owned tensor that survives the resets.
#include "pipeline/denoise.h"

#include <cmath>

#include <cstring>
#include <memory>

#include "core/error.h"

namespace diffuse {

namespace {

Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

// [B, ...] twice along dim 0 -> [2B, ...] (a then b), in the arena.
Tensor concat_batch(Ctx& c, const Tensor& a, const Tensor& b) {
  DF_ASSERT(a.dtype() == b.dtype() && a.rank() == b.rank());
  Shape s = a.shape();
  s[0] = a.dim(0) + b.dim(0);
  Tensor out = c.alloc(s, a.dtype());
  std::memcpy(out.data(), a.data(), a.bytes());
  std::memcpy(static_cast<uint8_t*>(out.data()) + a.bytes(), b.data(), b.bytes());
  return out;
}

// Rows of `t` repeated so that dim 0 becomes `n` (t has 1 or n rows).
Tensor repeat_batch(Ctx& c, const Tensor& t, int64_t n) {
  if (t.dim(0) == n) return t;
  DF_CHECK(t.dim(0) == 1, "denoise: conditioning ", t.str(), " has neither 1 nor ", n, " rows");
  Shape s = t.shape();
  s[0] = n;
  Tensor out = c.alloc(s, t.dtype());
  for (int64_t i = 0; i < n; ++i) std::memcpy(static_cast<uint8_t*>(out.data()) + size_t(i) * t.bytes(), t.data(), t.bytes());
  return out;
}

}  // namespace

Tensor denoise(Ctx& ctx, const UNet& unet, Scheduler& sched, Tensor x, const Guidance& g_all, const NoiseFn& draw_noise,
               const DenoiseHooks& hooks, int first) {
  DF_CHECK(x.rank() == 4, "denoise: latent ", x.str(), " should be [B, h, w, C] (NHWC)");
  x = x.to(DType::F32);  // an owned copy: the caller's tensor is left alone
  const int64_t B = x.dim(0);
  const bool guided = g_all.uncond.defined();
  DF_CHECK(g_all.cond.defined(), "denoise: no conditioning");

  Arena step_arena;
  Ctx sc{ctx.be, step_arena, ctx.act, ctx.ws};
  const std::vector<double> ts = sched.timesteps();  // a copy: schedulers may rebuild theirs
  DF_CHECK(first >= 0 && first <= int(ts.size()), "denoise: first step ", first, " of ", ts.size());
  const int total = int(ts.size()) - first;
  for (int i = 0; i < total; ++i) {
    const double t = ts[size_t(first + i)];
    const Guidance& g = hooks.guidance ? hooks.guidance(i) : g_all;  // prompt editing: per evaluation
    DF_CHECK(g.uncond.defined() == guided && g.cond.defined(), "denoise: the guidance of step ", i + 1,
             " does not match the first step's");
    step_arena.reset();
    Tensor scaled = sched.scale_model_input(x, t);
    Tensor in = hooks.model_input ? hooks.model_input(sc, scaled) : scaled;
    Tensor eps;
    if (guided) {
      Tensor xin = concat_batch(sc, as_f32(in), as_f32(in));
      Tensor context = concat_batch(sc, repeat_batch(sc, as_f32(g.uncond), B), repeat_batch(sc, as_f32(g.cond), B));
      Tensor pooled, tids;
      if (g.cond_pooled.defined()) {
        DF_CHECK(g.uncond_pooled.defined() && g.time_ids.defined(), "denoise: SDXL conditioning is incomplete");
        pooled = concat_batch(sc, repeat_batch(sc, as_f32(g.uncond_pooled), B),
                              repeat_batch(sc, as_f32(g.cond_pooled), B));
        Tensor ti = repeat_batch(sc, as_f32(g.time_ids), B);
        Tensor tu = g.uncond_time_ids.defined() ? repeat_batch(sc, as_f32(g.uncond_time_ids), B) : ti;
        tids = concat_batch(sc, tu, ti);
      }
      std::vector<float> tv(static_cast<size_t>(2 * B), static_cast<float>(t));
      ControlResiduals res;
      if (hooks.control) {
        const Tensor cx = hooks.model_input ? concat_batch(sc, as_f32(scaled), as_f32(scaled)) : xin;
        res = hooks.control(sc, ControlInputs{cx, tv, context, pooled.defined() ? &pooled : nullptr,
                                              tids.defined() ? &tids : nullptr, i, total, true});
      }
      Tensor out = as_f32(unet.forward(sc, xin, tv, context, pooled.defined() ? &pooled : nullptr,
                                       tids.defined() ? &tids : nullptr, res.down.empty() ? nullptr : &res.down,
                                       res.down.empty() ? nullptr : &res.mid,
                                       res.intrablock.empty() ? nullptr : &res.intrablock));
      const int64_t half = out.numel() / 2;
      eps = Tensor::empty(x.shape());
      DF_CHECK(eps.numel() == half, "denoise: UNet output ", out.str(), " does not match the latent ", x.str());
      const float* u = out.f32();
      const float* c = out.f32() + half;
      float* e = eps.f32();
      const float s = g.cfg;
      for (int64_t k = 0; k < half; ++k) e[k] = u[k] + s * (c[k] - u[k]);
    } else {
      Tensor context = repeat_batch(sc, as_f32(g.cond), B);
      Tensor pooled, tids;
      if (g.cond_pooled.defined()) {
        DF_CHECK(g.time_ids.defined(), "denoise: SDXL conditioning is incomplete");
        pooled = repeat_batch(sc, as_f32(g.cond_pooled), B);
        tids = repeat_batch(sc, as_f32(g.time_ids), B);
      }
      std::vector<float> tv(static_cast<size_t>(B), static_cast<float>(t));
      ControlResiduals res;
      if (hooks.control)
        res = hooks.control(sc, ControlInputs{as_f32(scaled), tv, context, pooled.defined() ? &pooled : nullptr,
                                              tids.defined() ? &tids : nullptr, i, total});
      Tensor out = unet.forward(sc, as_f32(in), tv, context, pooled.defined() ? &pooled : nullptr,
                                tids.defined() ? &tids : nullptr, res.down.empty() ? nullptr : &res.down,
                                res.down.empty() ? nullptr : &res.mid,
                                res.intrablock.empty() ? nullptr : &res.intrablock);
      DF_CHECK(out.numel() == x.numel(), "denoise: UNet output ", out.str(), " does not match the latent ", x.str());
      eps = out.to(DType::F32).reshape(x.shape());  // owned: survives the arena reset inside step()
    }
    sched.step(eps, t, x, draw_noise);
    if (hooks.after_step) hooks.after_step(x, i);
    // A NaN or infinity never recovers and would decode to a black image: stop here, saying where.
    const float* xp = x.f32();
    bool finite = true;
    for (int64_t k = 0, n = x.numel(); k < n && finite; ++k) finite = std::isfinite(xp[k]);
    DF_CHECK(finite, "non-finite latent after step ", i + 1, " of ", total,
             " (an overflow: check --cfg-scale, LoRA multipliers and prompt weights; --precision fp32 may help)");
    if (hooks.progress) hooks.progress(i + 1, total);
    if (hooks.stop && hooks.stop()) break;
  }
  return x;
}

std::function<ControlResiduals(Ctx&, const ControlInputs&)> control_hook(const ControlNet& net, Tensor hint,
                                                                         float scale, bool guess_mode) {
  DF_CHECK(net.loaded(), "control_hook: ControlNet not loaded");
  DF_CHECK(hint.rank() == 4, "control_hook: hint ", hint.str(), " should be [N, H, W, C] (NHWC)");
  auto embedding = std::make_shared<Tensor>();  // owned, computed on the first call
  Tensor h = hint.to(DType::F32);
  return [&net, h, scale, guess_mode, embedding](Ctx& c, const ControlInputs& in) {
    if (!embedding->defined()) *embedding = net.embed_hint(c, h).to(DType::F32);  // an owned copy
    Tensor e = *embedding;
    const int64_t rows = in.x.dim(0);
    if (e.dim(0) != 1 && e.dim(0) != rows) {
      // One embedding per image: repeat it for each guidance half.
      DF_CHECK(rows % e.dim(0) == 0, "control_hook: hint has ", e.dim(0), " rows for a batch of ", rows);
      Shape s = e.shape();
      s[0] = rows;
      Tensor r = c.alloc(s);
      for (int64_t k = 0; k < rows / e.dim(0); ++k)
        std::memcpy(r.f32() + k * e.numel(), e.f32(), e.bytes());
      e = r;
    }
    return net.forward(c, in.x, in.t, in.context, e, scale, in.text_embeds, in.time_ids, guess_mode);
  };
}

}  // namespace diffuse
