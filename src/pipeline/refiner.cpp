// The SDXL refiner hand-over: where it happens, the refiner's conditioning, and the denoising loop
// run in two parts on one scheduler.
#include "pipeline/refiner.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "pipeline/conditioning.h"
#include "pipeline/prompt_schedule.h"

namespace diffuse {

Tensor refiner_time_ids(int width, int height, double aesthetic_score) {
  Tensor t = Tensor::empty({1, 5});
  float* d = t.f32();
  d[0] = float(height);
  d[1] = float(width);
  d[2] = 0.0f;  // crop top
  d[3] = 0.0f;  // crop left
  d[4] = float(aesthetic_score);
  return t;
}

namespace {

// The training timestep nearest `t` in sigma (A1111: argmin |sigmas − sigma|, the lower on a tie).
int nearest_train_timestep(double t, const std::vector<double>& sig) {
  const int T = int(sig.size());
  if (t <= 0) return 0;
  if (t >= T - 1) return T - 1;
  const int lo = int(std::floor(t));
  const double frac = t - lo;
  if (frac == 0) return lo;
  const double s = std::exp(std::log(sig[size_t(lo)]) + frac * (std::log(sig[size_t(lo) + 1]) - std::log(sig[size_t(lo)])));
  return s - sig[size_t(lo)] <= sig[size_t(lo) + 1] - s ? lo : lo + 1;
}

}  // namespace

int refiner_switch_index(const std::vector<double>& run, double switch_at, const std::vector<double>& train_sigmas) {
  DF_CHECK(std::isfinite(switch_at) && switch_at >= 0 && switch_at <= 1, "--refiner-switch ", switch_at,
           ": must be in [0, 1]");
  DF_CHECK(train_sigmas.size() >= 2, "refiner switch: no training sigmas");
  const int T = int(train_sigmas.size());
  for (size_t i = 0; i < run.size(); ++i) {
    // torch: (999 − timestep) / 1000 is a float32 tensor, compared with the setting as float32.
    const float completed = float(T - 1 - nearest_train_timestep(run[i], train_sigmas)) / float(T);
    if (!(completed < float(switch_at))) return int(i);
  }
  return int(run.size());
}

void check_refiner(const SDModel& base, const SDModel& refiner, const GenerateParams& p) {
  DF_CHECK(refiner.refiner, refiner.path, ": --refiner expects an SDXL refiner (one OpenCLIP ViT-bigG text encoder, ",
           "conditioner.embedders.0.model.*, and a UNet conditioned on 5 time ids, as sd_xl_refiner_1.0), but this is ",
           refiner.family == Family::Unknown ? std::string("not a model the engine knows") : cat("an ", model_kind_name(refiner.summary), " model"));
  DF_CHECK(refiner.unet.loaded() && refiner.te2.loaded(), refiner.path, ": the refiner's UNet or text encoder is not loaded");
  DF_CHECK(base.family == Family::SDXL, base.path, ": an SDXL refiner continues SDXL latents, this model is ",
           model_kind_name(base.summary));
  DF_CHECK(base.unet_cfg.in_channels == 4, base.path, ": a refiner cannot continue a 9-channel inpainting model");
  DF_CHECK(!p.control && p.controls.empty(), "--refiner with a ControlNet: the ControlNet does not fit the refiner's UNet");
}

Guidance refiner_guidance(Ctx& ctx, const SDModel& refiner, const GenerateParams& p) {
  return refiner_guidance(ctx, refiner, p, p.prompt, p.negative);
}

Guidance refiner_guidance(Ctx& ctx, const SDModel& refiner, const GenerateParams& p, const std::string& prompt,
                          const std::string& negative) {
  DF_CHECK(refiner.refiner, refiner.path, ": not an SDXL refiner");
  PromptOptions po;
  po.clip_skip = p.clip_skip;
  po.embeddings = p.embeddings;
  PromptPair pp = encode_prompts(ctx, refiner, prompt, negative, po);
  Guidance g;
  g.cfg = float(p.cfg);
  g.cond = pp.cond.context;
  if (p.cfg > 1.0) g.uncond = pp.uncond.context;
  g.cond_pooled = pp.cond.pooled;
  g.uncond_pooled = pp.uncond.pooled;
  g.time_ids = refiner_time_ids(p.width, p.height, kRefinerAestheticScore);
  g.uncond_time_ids = refiner_time_ids(p.width, p.height, kRefinerNegativeAestheticScore);
  return g;
}

const Guidance& RefinerGuides::at(int i) const {
  DF_CHECK(!keys.empty(), "refiner: no guidance");
  return by_texts.at(keys[size_t(std::clamp(i, 0, int(keys.size()) - 1))]);
}

RefinerGuides refiner_guides(Ctx& ctx, const SDModel& refiner, const GenerateParams& p) {
  const std::vector<PromptStep> c = prompt_schedule(p.prompt, p.steps), u = prompt_schedule(p.negative, p.steps);
  RefinerGuides g;
  for (int i = 0; i <= p.steps; ++i) {
    const std::pair<size_t, size_t> k{schedule_index(c, i), schedule_index(u, i)};
    if (!g.by_texts.count(k)) {
      g.by_texts.emplace(k, refiner_guidance(ctx, refiner, p, c[k.first].text, u[k.second].text));
      ctx.arena.reset();
    }
    g.keys.push_back(k);
  }
  return g;
}

Tensor denoise_refined(Ctx& ctx, const UNet& base, const Guidance& gb, const UNet& refiner,
                       const std::function<const Guidance&(int)>& gr,
                       int switch_index, Scheduler& sched, Tensor x, const NoiseFn& draw_noise,
                       const DenoiseHooks& hooks, int first) {
  const int total = int(sched.timesteps().size()) - first;
  DF_CHECK(total >= 0 && switch_index >= 0 && switch_index <= total, "refiner: hand-over at evaluation ",
           switch_index, " of ", total);
  const int k = switch_index;
  bool stopped = false;
  if (k > 0) {
    DenoiseHooks h = hooks;
    int done = 0;
    h.stop = [&] {
      if (hooks.stop && hooks.stop()) return stopped = true;
      return ++done == k;  // polled once after each evaluation
    };
    x = denoise(ctx, base, sched, x, gb, draw_noise, h, first);
    if (stopped || k == total) return x;
    if (ctx.ws) ctx.ws->release(Workspace::kUNet);  // the refiner sizes its own pass scratch
  }
  DenoiseHooks h;
  if (hooks.after_step) h.after_step = [&](Tensor& lat, int i) { hooks.after_step(lat, i + k); };
  if (hooks.progress) h.progress = [&](int done, int) { hooks.progress(done + k, total); };
  h.stop = hooks.stop;
  h.guidance = [&](int i) -> const Guidance& { return gr(i + k); };
  return denoise(ctx, refiner, sched, x, gr(k), draw_noise, h, first + k);
}

}  // namespace diffuse
