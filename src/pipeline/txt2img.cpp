// txt2img / img2img / inpaint: conditioning, initial latents, the denoising loop, VAE decode.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "core/error.h"
#include "core/memory_stats.h"
#include "io/tensor_file.h"
#include "models/name_map.h"
#include "pipeline/conditioning.h"
#include "pipeline/control.h"
#include "pipeline/denoise.h"
#include "pipeline/generate.h"
#include "pipeline/prompt_schedule.h"
#include "pipeline/refiner.h"
#include "pipeline/schedule.h"
#include "pipeline/variation.h"

namespace diffuse {

namespace {

// The generators of a batch: one shared (Cpu) or one per image (Cuda, seeds seed + i).
class NoiseSource {
 public:
  NoiseSource(RngKind kind, uint64_t seed, int batch) : kind_(kind), batch_(batch) {
    int n = kind == RngKind::Cpu ? 1 : batch;
    for (int i = 0; i < n; ++i) gens_.push_back(make_rng(kind, seed + uint64_t(i)));
  }
  // [B, h, w, c] NHWC noise: torch.randn((B, c, h, w)) permuted.
  Tensor batch(int64_t h, int64_t w, int64_t c) {
    const int64_t per = c * h * w;
    Tensor t = Tensor::empty({batch_, c, h, w});
    if (kind_ == RngKind::Cpu) {
      gens_[0]->randn(t.f32(), batch_ * per);
    } else {
      for (int i = 0; i < batch_; ++i) gens_[size_t(i)]->randn(t.f32() + i * per, per);
    }
    return nchw_to_nhwc(t);
  }
  // [B, h, w, c] posterior samples mean + std · randn of one encoded image (mean/std: [1, h, w, c]
  // NHWC): Cpu draws once (1, c, h, w) and repeats it, Cuda draws per image.
  Tensor posterior_sample(const Tensor& mean, const Tensor& stdv) {
    const int64_t h = mean.dim(1), w = mean.dim(2), c = mean.dim(3), per = c * h * w;
    Tensor out = Tensor::empty({batch_, h, w, c});
    const float* m = mean.f32();
    const float* s = stdv.f32();
    for (int i = 0; i < batch_; ++i) {
      if (kind_ == RngKind::Cpu && i > 0) {
        std::memcpy(out.f32() + i * per, out.f32(), size_t(per) * sizeof(float));
        continue;
      }
      Tensor z = Tensor::empty({1, c, h, w});
      gens_[kind_ == RngKind::Cpu ? 0 : size_t(i)]->randn(z.f32(), per);
      Tensor zn = nchw_to_nhwc(z);
      float* o = out.f32() + i * per;
      for (int64_t k = 0; k < per; ++k) o[k] = m[k] + s[k] * zn.f32()[k];
    }
    return out;
  }

 private:
  RngKind kind_;
  int64_t batch_;
  std::vector<std::unique_ptr<Rng>> gens_;
};

void scale_inplace(Tensor& t, float s) {
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = p[i] * s;
}

// 8-bit image -> [1, H, W, 3] in [-1, 1] (diffusers: x / 255, then 2x - 1, in f32).
Tensor image_to_tensor(const Image& im) {
  Image rgb = im.channels == 3 ? im : to_rgb(im);
  Tensor t = Tensor::empty({1, rgb.height, rgb.width, 3});
  float* d = t.f32();
  for (size_t i = 0; i < rgb.pixels.size(); ++i) d[i] = 2.0f * (float(rgb.pixels[i]) / 255.0f) - 1.0f;
  return t;
}

// Grey value of a pixel as PIL's convert("L") computes it (ITU-R 601-2 luma, fixed point).
uint8_t grey_at(const Image& im, size_t px) {
  const uint8_t* p = im.pixels.data() + px * size_t(im.channels);
  if (im.channels <= 2) return p[0];
  return uint8_t((uint32_t(p[0]) * 19595 + uint32_t(p[1]) * 38470 + uint32_t(p[2]) * 7471 + 0x8000) >> 16);
}

// Binary mask (1 = repaint) at pixel size.
std::vector<uint8_t> binary_mask(const Image& m) {
  std::vector<uint8_t> out(size_t(m.width) * size_t(m.height));
  for (size_t i = 0; i < out.size(); ++i) out[i] = float(grey_at(m, i)) / 255.0f >= 0.5f ? 1 : 0;
  return out;
}

}  // namespace

namespace {

bool all_finite(const Tensor& t) {
  const float* p = t.f32();
  for (int64_t k = 0, n = t.numel(); k < n; ++k)
    if (!std::isfinite(p[k])) return false;
  return true;
}

// The model's VAE decoder loaded again with an fp32 backend (the retry of a decode that overflowed
// in bf16): f32 weights, f32 compute, f32 activations.
struct Fp32Decoder {
  std::unique_ptr<Backend> be = make_cpu_backend(Precision::F32);
  VAE vae;
  explicit Fp32Decoder(const SDModel& model) {
    const TensorFile f = open_model_file(model.path);
    WeightStore w = component_weights(f, Component::VAE, model.family);
    for (const std::string& n : w.names())
      if (n.rfind("encoder.", 0) == 0 || n.rfind("quant_conv.", 0) == 0) w.ignore(n);
    vae.load(*be, w, model.vae_cfg, /*encoder=*/false, /*decoder=*/true);
  }
  // z: [1, h, w, 4] already divided by the scaling factor -> f32 image [1, H, W, 3]
  Tensor decode(const Tensor& z, const VAETiling& tiling) {
    Arena arena;
    Workspace ws;
    Ctx c{*be, arena, DType::F32, &ws};
    return vae.decode(c, z, tiling).to(DType::F32);
  }
};

}  // namespace

std::vector<Result> generate(const SDModel& model, Backend& be, const GenerateParams& p, const ProgressFn& progress,
                             Workspace* ws_in) {
  auto report = [&](Stage s, int done, int total) {
    if (progress) progress(s, done, total);
    if (p.cancelled && p.cancelled()) throw Cancelled();
  };
  DF_CHECK(p.width > 0 && p.height > 0 && p.width % 8 == 0 && p.height % 8 == 0, "size ", p.width, "x", p.height,
           ": -W/--width and -H/--height must be positive multiples of 8");
  DF_CHECK(p.steps >= 1, "--steps ", p.steps, ": must be at least 1");
  DF_CHECK(p.batch >= 1, "--batch ", p.batch, ": must be at least 1");
  DF_CHECK(p.strength >= 0.0 && p.strength <= 1.0, "--strength ", p.strength, ": must be in [0, 1]");
  DF_CHECK(!p.mask || p.init, "--mask needs an init image (-i/--init)");
  DF_CHECK(!p.init_latent || !p.init, "generate: an init image and an init latent together");
  DF_CHECK(p.img2img_steps >= 0, "generate: img2img_steps ", p.img2img_steps, " is negative");
  DF_CHECK(model.unet.loaded(), "generate: the model's UNet is not loaded");
  const int in_ch = model.unet_cfg.in_channels;
  const bool inpaint9 = in_ch == 9;
  DF_CHECK(in_ch == 4 || in_ch == 9, "generate: UNet with ", in_ch, " input channels (expected 4, or 9 for inpainting)");
  DF_CHECK(!inpaint9 || (p.init && p.mask), model.path,
           ": an inpainting model (9-channel UNet) needs -i/--init and --mask");
  for (const Image* im : {p.init, p.mask}) {
    if (!im) continue;
    DF_CHECK(im->width == p.width && im->height == p.height, im == p.init ? "-i/--init" : "--mask", " image is ",
             im->width, "x", im->height, " but the output is ", p.width, "x", p.height,
             ": images are not resized, give one of the output size (or -W/-H matching it)");
  }

  const int64_t f = model.vae_cfg.downscale();  // 8 for SD; the latents are 1/f of the image
  DF_CHECK(p.width % f == 0 && p.height % f == 0, "size ", p.width, "x", p.height, ": must be a multiple of ", f,
           " (the VAE of ", model.path, " shrinks images ", f, " times)");
  const int64_t B = p.batch, h = p.height / f, w = p.width / f, C = 4;
  const float sf = model.vae_cfg.scaling_factor;
  Workspace local_ws;
  Workspace& ws = ws_in ? *ws_in : local_ws;
  Arena arena;
  Ctx ctx{be, arena, DType::F32, &ws};

  // Text conditioning.
  report(Stage::Encode, 0, 1);
  PromptOptions po;
  po.clip_skip = p.clip_skip;
  po.embeddings = p.embeddings;
  // A1111 prompt editing / alternation: the texts of each step (one entry for a plain prompt).
  const std::vector<PromptStep> sched_c = prompt_schedule(p.prompt, p.steps), sched_u = prompt_schedule(p.negative, p.steps);
  PromptPair pp = encode_prompts(ctx, model, sched_c[0].text, sched_u[0].text, po);
  arena.reset();
  Guidance g;
  g.cfg = float(p.cfg);
  g.cond = pp.cond.context;
  if (p.cfg > 1.0) g.uncond = pp.uncond.context;
  if (model.unet_cfg.text_time) {
    g.cond_pooled = pp.cond.pooled;
    g.uncond_pooled = pp.uncond.pooled;
    g.time_ids = Tensor::empty({1, 6});
    float ids[6] = {float(p.height), float(p.width), 0.0f, 0.0f, float(p.height), float(p.width)};
    std::memcpy(g.time_ids.f32(), ids, sizeof ids);
    if (model.refiner) {  // a refiner on its own
      g.time_ids = refiner_time_ids(p.width, p.height, kRefinerAestheticScore);
      g.uncond_time_ids = refiner_time_ids(p.width, p.height, kRefinerNegativeAestheticScore);
    }
  }
  RefinerGuides g_refiner;  // the refiner's encodings of the texts each step uses
  if (p.refiner) {
    check_refiner(model, *p.refiner, p);
    g_refiner = refiner_guides(ctx, *p.refiner, p);
  }
  // Every other (prompt, negative) pair a step uses, encoded now (the text encoders may be freed
  // after this): evaluation i uses the entries whose end_step >= i (evaluations past `steps`, as
  // second-order samplers make, keep the last).
  std::map<std::pair<size_t, size_t>, Guidance> step_guides;
  std::vector<const Guidance*> guide_at;
  if (sched_c.size() > 1 || sched_u.size() > 1) {
    step_guides[{0, 0}] = g;
    for (int i = 0; i <= p.steps; ++i) {
      const std::pair<size_t, size_t> k{schedule_index(sched_c, i), schedule_index(sched_u, i)};
      auto it = step_guides.find(k);
      if (it == step_guides.end()) {
        PromptPair q = encode_prompts(ctx, model, sched_c[k.first].text, sched_u[k.second].text, po);
        arena.reset();
        Guidance gi = g;
        gi.cond = q.cond.context;
        gi.uncond = p.cfg > 1.0 ? q.uncond.context : Tensor();
        if (model.unet_cfg.text_time) {
          gi.cond_pooled = q.cond.pooled;
          gi.uncond_pooled = q.uncond.pooled;
        }
        it = step_guides.emplace(k, std::move(gi)).first;
      }
      guide_at.push_back(&it->second);
    }
  }
  report(Stage::Encode, 1, 1);
  if (p.on_conditioned) p.on_conditioned();

  // Scheduler and the timesteps that run.
  auto sched = make_scheduler(p.sampler, p.schedule, p.prediction, p.zero_terminal_snr);
  sched->set_timesteps(p.steps);
  const std::vector<double> full = sched->timesteps();
  std::vector<double> run = full;
  int first = 0;
  if (p.init || p.init_latent) {
    const int init_timestep = p.img2img_steps > 0 ? std::min(p.img2img_steps, p.steps)
                                                  : std::min(int(double(p.steps) * p.strength), p.steps);
    const int t_start = std::max(p.steps - init_timestep, 0);
    const int begin = std::min(t_start * sched->order(), int(full.size()));
    sched->set_begin_index(begin);
    run.assign(full.begin() + begin, full.end());
    // Schedulers may list the whole schedule after set_begin_index or only what is left.
    first = sched->timesteps().size() == full.size() ? begin : 0;
  }

  NoiseSource rng(p.rng, p.seed, p.batch);
  DF_CHECK(std::isfinite(p.subseed_strength) && p.subseed_strength >= 0 && p.subseed_strength <= 1,
           "--subseed-strength ", p.subseed_strength, ": must be in [0, 1]");
  // The run's first noise (the initial latent, or img2img's noise), with any variation seed.
  auto first_noise = [&] {
    Tensor n = rng.batch(h, w, C);
    apply_variation(n, p.rng, p.subseed, p.subseed_strength);
    return n;
  };
  Tensor x, init_latent, noise, mask_lat, masked_latent;
  auto encode_image = [&](const Tensor& img) {
    DF_CHECK(model.vae.has_encoder(), model.path, ": the VAE encoder is not loaded");
    VAE::Posterior post = model.vae.encode(ctx, img, p.vae_tiling);
    Tensor mean = post.mean.to(DType::F32), stdv = post.std.to(DType::F32);
    arena.reset();
    Tensor s = rng.posterior_sample(mean, stdv);
    scale_inplace(s, sf);
    return s;
  };
  if (p.init_latent) {
    const Tensor& il = *p.init_latent;
    DF_CHECK(il.dtype() == DType::F32 && il.rank() == 4 && (il.dim(0) == 1 || il.dim(0) == B) && il.dim(1) == h &&
                 il.dim(2) == w && il.dim(3) == C,
             "generate: init latent ", il.str(), ", expected f32 [1 or ", B, ", ", h, ", ", w, ", ", C, "]");
    init_latent = Tensor::empty({B, h, w, C});
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(init_latent.f32() + b * h * w * C, il.f32() + (il.dim(0) == 1 ? 0 : b) * h * w * C,
                  size_t(h * w * C) * 4);
    noise = first_noise();
    x = run.empty() ? init_latent.clone() : sched->add_noise(init_latent, noise, run.front());
  } else if (!p.init) {
    x = first_noise();
    scale_inplace(x, float(sched->init_noise_sigma()));
  } else {
    Tensor img = image_to_tensor(*p.init);
    const bool strength_max = p.strength >= 1.0;
    const bool need_init = !p.mask || !inpaint9 || !strength_max;
    if (need_init) init_latent = encode_image(img);
    noise = first_noise();
    if (p.mask && strength_max) {
      x = noise.clone();
      scale_inplace(x, float(sched->init_noise_sigma()));
    } else if (run.empty()) {
      x = init_latent.clone();
    } else {
      x = sched->add_noise(init_latent, noise, run.front());
    }
    if (p.mask) {
      std::vector<uint8_t> m = binary_mask(*p.mask);
      // Masked image: the repaint area set to 0 (mid grey in [-1, 1]).
      Tensor masked = img.clone();
      for (size_t i = 0; i < m.size(); ++i)
        if (m[i]) std::fill_n(masked.f32() + i * 3, 3, 0.0f);
      masked_latent = encode_image(masked);
      // Nearest resize to the latent size (torch interpolate: source index floor(i · in / out)).
      mask_lat = Tensor::empty({B, h, w, 1});
      for (int64_t b = 0; b < B; ++b)
        for (int64_t y = 0; y < h; ++y)
          for (int64_t xx = 0; xx < w; ++xx) {
            int64_t sy = y * p.height / h, sx = xx * p.width / w;
            mask_lat.f32()[(b * h + y) * w + xx] = float(m[size_t(sy * p.width + sx)]);
          }
      if (need_init && p.latent_fill != GenerateParams::LatentFill::Keep) {
        // A1111's "latent noise" / "latent nothing": the init latent replaced under the mask.
        const bool fill_noise = p.latent_fill == GenerateParams::LatentFill::Noise;
        for (int64_t q = 0; q < B * h * w; ++q)
          if (mask_lat.f32()[q] != 0.0f)
            for (int64_t c = 0; c < C; ++c) init_latent.f32()[q * C + c] = fill_noise ? noise.f32()[q * C + c] : 0.0f;
        if (!strength_max) x = run.empty() ? init_latent.clone() : sched->add_noise(init_latent, noise, run.front());
      }
    }
  }

  DenoiseHooks hooks;
  if (inpaint9) {
    hooks.model_input = [&](Ctx& c, const Tensor& scaled) {
      Tensor a = c.alloc({B, h, w, C + 1});
      c.be.concat_last(scaled, mask_lat, a);
      Tensor out = c.alloc({B, h, w, 2 * C + 1});
      c.be.concat_last(a, masked_latent, out);
      return out;
    };
  } else if (p.mask) {
    // Masked img2img: after each step the kept area is the init latent noised to the next timestep
    // (the clean init latent after the last step).
    hooks.after_step = [&](Tensor& lat, int i) {
      Tensor proper = size_t(i) + 1 < run.size() ? sched->add_noise(init_latent, noise, run[size_t(i) + 1]) : init_latent;
      float* d = lat.f32();
      const float* k = proper.f32();
      const float* m = mask_lat.f32();
      for (int64_t q = 0; q < B * h * w; ++q)
        if (m[q] == 0.0f)
          for (int64_t c = 0; c < C; ++c) d[q * C + c] = k[q * C + c];
    };
  }
  if (p.control || !p.controls.empty()) hooks.control = control_hook(p);
  if (p.on_latent) {
    // After the kept-area blend above, so a preview shows the latent the next step starts from.
    auto blend = hooks.after_step;
    const int steps_run = int(run.size());
    hooks.after_step = [&p, blend, steps_run](Tensor& lat, int i) {
      if (blend) blend(lat, i);
      p.on_latent(lat, i + 1, steps_run);
    };
  }
  if (!guide_at.empty())
    hooks.guidance = [&guide_at](int i) -> const Guidance& { return *guide_at[size_t(std::min(i, int(guide_at.size()) - 1))]; };
  hooks.progress = [&](int done, int total) { report(Stage::Denoise, done, total); };
  hooks.stop = p.finish_early;
  NoiseFn draw = [&] { return rng.batch(h, w, C); };
  Tensor lat = run.empty()  ? x
               : !p.refiner ? denoise(ctx, model.unet, *sched, x, g, draw, hooks, first)
                            : denoise_refined(ctx, model.unet, g, p.refiner->unet,
                                              [&](int i) -> const Guidance& { return g_refiner.at(i); },
                                              refiner_switch_index(run, p.refiner_switch_at,
                                                                   train_sigmas(NoiseSchedule::scaled_linear())),
                                              *sched, x, draw, hooks, first);
  // The UNet's pass memory is not needed while decoding.
  ws.release(Workspace::kUNet);
  be.release_scratch();
  arena = Arena();
  return_free_memory();

  // Decode, one image at a time.
  std::vector<Result> results;
  std::unique_ptr<Fp32Decoder> fp32_vae;  // loaded on the first overflow
  for (int64_t b = 0; b < B; ++b) {
    report(Stage::Decode, int(b), int(B));
    Tensor one = lat.slice0(b, b + 1).clone();
    Result r;
    r.latent = nhwc_to_nchw(one);
    r.seed = p.rng == RngKind::Cuda ? p.seed + uint64_t(b) : p.seed;
    if (!p.decode) {
      results.push_back(std::move(r));
      continue;
    }
    DF_CHECK(model.vae.has_decoder(), model.path, ": the VAE decoder is not loaded");
    float* z = one.f32();
    for (int64_t i = 0; i < one.numel(); ++i) z[i] = z[i] / sf;
    Tensor dec = model.vae.decode(ctx, one, p.vae_tiling);
    Tensor d = dec.to(DType::F32);
    arena.reset();
    const bool reduced = be.effective_precision() != Precision::F32;
    if (reduced && p.test_decode_hook) p.test_decode_hook(d);
    if (reduced && !all_finite(d)) {
      if (p.on_warning)
        p.on_warning("the VAE decode of image " + std::to_string(b + 1) + " overflowed in " +
                     precision_name(be.effective_precision()) + "; decoding it again in fp32");
      if (!fp32_vae) fp32_vae = std::make_unique<Fp32Decoder>(model);
      d = fp32_vae->decode(one, p.vae_tiling);
    }
    DF_CHECK(all_finite(d), "non-finite image after the VAE decode of image ", b + 1, " of ", B,
             reduced ? " (also when decoded again in fp32)" : " (in fp32)");
    r.image.width = p.width;
    r.image.height = p.height;
    r.image.channels = 3;
    r.image.format = "png";
    r.image.pixels.resize(size_t(d.numel()));
    const float* s = d.f32();
    for (int64_t i = 0; i < d.numel(); ++i) {
      float v = std::clamp(s[i] / 2.0f + 0.5f, 0.0f, 1.0f);
      r.image.pixels[size_t(i)] = uint8_t(std::nearbyint(v * 255.0f));  // numpy round: half to even
    }
    if (p.on_result) p.on_result(r, int(b));
    results.push_back(std::move(r));
  }
  report(Stage::Decode, int(B), int(B));
  return results;
}

}  // namespace diffuse
