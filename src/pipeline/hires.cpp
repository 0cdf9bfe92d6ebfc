// Hires fix: two passes with an upscale between them (see hires.h).
#include "pipeline/hires.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/layout.h"
#include "models/controlnet.h"
#include "pipeline/scheduler.h"
#include "pipeline/upscale.h"

namespace diffuse {

namespace {

struct UpscalerName {
  const char* flag;
  const char* display;
};
constexpr UpscalerName kUpscalers[] = {
    {"latent", "Latent"},
    {"latent-antialiased", "Latent (antialiased)"},
    {"latent-bicubic", "Latent (bicubic)"},
    {"latent-nearest", "Latent (nearest)"},
    {"latent-nearest-exact", "Latent (nearest-exact)"},
    {"lanczos", "Lanczos"},
    {"nearest", "Nearest"},
    {"esrgan", "ESRGAN"},
};

bool is_latent(const std::string& u) { return u.rfind("latent", 0) == 0; }

LatentResize latent_mode(const std::string& u) {
  if (u == "latent-bicubic") return LatentResize::Bicubic;
  if (u == "latent-nearest") return LatentResize::Nearest;
  if (u == "latent-nearest-exact") return LatentResize::NearestExact;
  // "latent-antialiased": torch's antialiased bilinear filter is the triangle filter of plain
  // bilinear when enlarging (support 1, the same two taps and weights): the same numbers.
  return LatentResize::Bilinear;
}

// Nearest-neighbour resize of an 8-bit image (PIL's NEAREST: source floor((x + 0.5) · in / out)).
Image resize_nearest(const Image& im, int width, int height) {
  Image out = im;
  out.width = width;
  out.height = height;
  out.pixels.assign(size_t(width) * size_t(height) * size_t(im.channels), 0);
  for (int y = 0; y < height; ++y) {
    const int sy = std::min(int((y + 0.5) * im.height / height), im.height - 1);
    for (int x = 0; x < width; ++x) {
      const int sx = std::min(int((x + 0.5) * im.width / width), im.width - 1);
      std::memcpy(&out.pixels[(size_t(y) * size_t(width) + size_t(x)) * size_t(im.channels)],
                  &im.pixels[(size_t(sy) * size_t(im.width) + size_t(sx)) * size_t(im.channels)], size_t(im.channels));
    }
  }
  return out;
}

// The model evaluations (Stage::Denoise steps) one generate() call makes.
int evaluations(const GenerateParams& p, int steps, int img2img_steps) {
  auto s = make_scheduler(p.sampler, p.schedule, p.prediction, p.zero_terminal_snr);
  s->set_timesteps(steps);
  const int n = int(s->timesteps().size());
  if (img2img_steps <= 0) return n;
  const int t_start = std::max(steps - std::min(img2img_steps, steps), 0);
  return n - std::min(t_start * s->order(), n);
}

// torch's cubic convolution weights (A = -0.75) for fraction t.
void cubic_weights(float t, float w[4]) {
  const float A = -0.75f;
  auto near = [&](float x) { return ((A + 2) * x - (A + 3)) * x * x + 1; };          // |x| <= 1
  auto far = [&](float x) { return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A; };     // 1 < |x| < 2
  w[0] = far(t + 1);
  w[1] = near(t);
  w[2] = near(1 - t);
  w[3] = far(2 - t);
}

// Source taps and weights of one output index along an axis of `in` samples.
struct Taps {
  int idx[4];
  float w[4];
  int n;
};

Taps taps(int o, int in, int out, LatentResize mode) {
  const float scale = float(in) / float(out);
  Taps t{};
  switch (mode) {
    case LatentResize::Nearest:
      t.n = 1;
      t.idx[0] = std::min(int(std::floor(float(o) * scale)), in - 1);
      t.w[0] = 1;
      break;
    case LatentResize::NearestExact:
      t.n = 1;
      t.idx[0] = std::min(int(std::floor((float(o) + 0.5f) * scale)), in - 1);
      t.w[0] = 1;
      break;
    case LatentResize::Bilinear: {
      const float src = std::max(scale * (float(o) + 0.5f) - 0.5f, 0.0f);
      const int i0 = std::min(int(src), in - 1);
      const int i1 = std::min(i0 + 1, in - 1);
      const float l = src - float(i0);
      t.n = 2;
      t.idx[0] = i0;
      t.idx[1] = i1;
      t.w[0] = 1 - l;
      t.w[1] = l;
      break;
    }
    case LatentResize::Bicubic: {
      const float src = scale * (float(o) + 0.5f) - 0.5f;
      const int i = int(std::floor(src));
      cubic_weights(src - float(i), t.w);
      t.n = 4;
      for (int k = 0; k < 4; ++k) t.idx[k] = std::clamp(i - 1 + k, 0, in - 1);
      break;
    }
  }
  return t;
}

}  // namespace

std::string hires_upscaler_display(const std::string& upscaler, const std::string& esrgan_name) {
  if (upscaler == "esrgan") return esrgan_name;
  for (const UpscalerName& u : kUpscalers)
    if (upscaler == u.flag) return u.display;
  return upscaler;
}

void check_hires_upscaler(const std::string& upscaler) {
  std::string names;
  for (const UpscalerName& u : kUpscalers) {
    if (upscaler == u.flag) return;
    names += (names.empty() ? "" : ", ") + std::string(u.flag);
  }
  throw Error(cat("--hires-upscaler ", upscaler, ": unknown; one of ", names));
}

void hires_target(const HiresParams& h, int base_w, int base_h, int* w, int* h_out) {
  int tw = int(double(base_w) * h.scale), th = int(double(base_h) * h.scale);
  if (h.width > 0 || h.height > 0) {  // A1111's "resize to": a missing side keeps the aspect ratio
    tw = h.width > 0 ? h.width : h.height * base_w / base_h;
    th = h.height > 0 ? h.height : h.width * base_h / base_w;
  }
  *w = tw - tw % 8;
  *h_out = th - th % 8;
}

Tensor resize_latent(const Tensor& x, int oh, int ow, LatentResize mode) {
  DF_CHECK(x.dtype() == DType::F32 && x.rank() == 4 && oh > 0 && ow > 0, "resize_latent: ", x.str(), " to ", oh,
           "x", ow);
  const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  std::vector<Taps> ty(static_cast<size_t>(oh)), tx(static_cast<size_t>(ow));
  for (int o = 0; o < oh; ++o) ty[size_t(o)] = taps(o, int(H), oh, mode);
  for (int o = 0; o < ow; ++o) tx[size_t(o)] = taps(o, int(W), ow, mode);
  Tensor y = Tensor::zeros({B, oh, ow, C});
  const float* s = x.f32();
  float* d = y.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int oy = 0; oy < oh; ++oy)
      for (int ox = 0; ox < ow; ++ox) {
        float* out = d + ((b * oh + oy) * ow + ox) * C;
        const Taps& a = ty[size_t(oy)];
        const Taps& c = tx[size_t(ox)];
        for (int i = 0; i < a.n; ++i)
          for (int j = 0; j < c.n; ++j) {
            const float wgt = a.w[i] * c.w[j];
            const float* in = s + ((b * H + a.idx[i]) * W + c.idx[j]) * C;
            for (int64_t k = 0; k < C; ++k) out[k] += wgt * in[k];
          }
      }
  return y;
}

std::vector<Result> generate_hires(const SDModel& model, Backend& be, const GenerateParams& p, const HiresParams& h,
                                   const ProgressFn& progress, Workspace* ws) {
  DF_CHECK(!p.init && !p.mask && !p.init_latent, "--hires-scale: the hires fix is for txt2img (no -i/--init, --mask)");
  check_hires_upscaler(h.upscaler);
  DF_CHECK(h.denoise > 0 && h.denoise <= 1, "--hires-denoise ", h.denoise, ": must be in (0, 1]");
  DF_CHECK(h.steps >= 0 && h.steps <= 1000, "--hires-steps ", h.steps, ": 0 (the first pass's) to 1000");
  DF_CHECK(h.width > 0 || h.height > 0 || (h.scale >= 1 && h.scale <= 8), "--hires-scale ", h.scale,
           ": must be in [1, 8]");
  DF_CHECK(h.upscaler != "esrgan" || h.esrgan, "--hires-upscaler esrgan: give the model with --hires-upscaler-model FILE");
  int tw = 0, th = 0;
  hires_target(h, p.width, p.height, &tw, &th);
  DF_CHECK(tw >= 8 && th >= 8, "--hires-scale: the target size ", tw, "x", th, " is too small");

  const int hs = h.steps > 0 ? h.steps : p.steps;
  const int steps2 = int(double(hs) / std::min(h.denoise, 0.999));
  const int evals1 = evaluations(p, p.steps, 0), evals2 = evaluations(p, steps2, hs);
  const int B = p.batch, total = evals1 + B * evals2;
  const bool latent = is_latent(h.upscaler);

  // Pass 1: the base image (not reported as a result; decoded only for an image upscaler).
  GenerateParams p1 = p;
  p1.decode = !latent;
  p1.on_result = nullptr;
  p1.on_conditioned = nullptr;  // pass 2 encodes the prompts again
  p1.refiner = nullptr;         // A1111's hires_fix_refiner_pass default: the refiner in the second pass
  ProgressFn prog1 = [&](Stage s, int done, int) {
    if (s == Stage::Encode && progress) progress(s, done, 1);
    if (s == Stage::Denoise && progress) progress(s, done, total);
  };
  std::vector<Result> first = generate(model, be, p1, prog1, ws);

  std::vector<Result> out;
  for (int i = 0; i < B; ++i) {
    GenerateParams p2 = p;
    p2.batch = 1;
    p2.seed = first[size_t(i)].seed;
    p2.subseed = p.subseed + uint64_t(i);  // A1111's all_subseeds: subseed + i
    p2.width = tw;
    p2.height = th;
    p2.steps = steps2;
    p2.img2img_steps = hs;
    p2.strength = h.denoise;
    p2.on_conditioned = i + 1 == B ? p.on_conditioned : nullptr;
    p2.on_result = [&p, i](const Result& r, int) {
      if (p.on_result) p.on_result(r, i);
    };
    Tensor init_latent;
    Image init;
    if (latent) {
      const int ds = model.vae_cfg.downscale();
      init_latent = resize_latent(nchw_to_nhwc(first[size_t(i)].latent), th / ds, tw / ds, latent_mode(h.upscaler));
      p2.init_latent = &init_latent;
    } else {
      const Image& base = first[size_t(i)].image;
      if (h.upscaler == "lanczos") init = resize_lanczos(base, tw, th);
      else if (h.upscaler == "nearest") init = resize_nearest(base, tw, th);
      else {
        init = upscale_image_to(*h.esrgan, be, base, tw, th);
        h.esrgan->release_scratch();  // ~0.5 GB of tile activations, not needed by the second pass
      }
      p2.init = &init;
    }
    ProgressFn prog2 = [&](Stage s, int done, int) {
      if (!progress) return;
      if (s == Stage::Denoise) progress(s, evals1 + i * evals2 + done, total);
      if (s == Stage::Decode && done == 0) progress(s, i, B);
    };
    std::vector<Result> r = generate(model, be, p2, prog2, ws);
    r[0].seed = first[size_t(i)].seed;
    out.push_back(std::move(r[0]));
  }
  if (progress) progress(Stage::Decode, B, B);
  return out;
}

}  // namespace diffuse
