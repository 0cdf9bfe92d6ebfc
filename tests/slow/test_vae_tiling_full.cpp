// slow: tiled vs untiled VAE at full size (the SD 1.5 VAE of a checkpoint, e.g. the synthetic
// one from `diffuse synth --manifest sd15 --layout ldm`), one step per process so that
// `/usr/bin/time -v` gives each its own peak memory. Skipped unless $DIFFUSE_VAE_MODEL names the
// checkpoint; $DIFFUSE_VAE_DIR (default /tmp/diffuse-vae-tiling) holds the files passed between
// steps; $DIFFUSE_VAE_SIZE the image side (default 1024); $DIFFUSE_VAE_PRECISION fp32 (default)
// or bf16. Steps, in order (each a --gtest_filter):
//   *Latent          a picture-like latent: the posterior mean of a synthetic picture (untiled)
//   *DecodeUntiled   decode it untiled  -> untiled.safetensors
//   *DecodeTiled     decode it tiled (default VAETiling, forced on) -> tiled.safetensors
//   *EncodeUntiled / *EncodeTiled   the picture's posterior, untiled / tiled
//   *Compare         the figures: max/mean |Δ| and the seam metric (border vs inside)
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "backend/backend.h"
#include "core/threads.h"
#include "io/tensor_file.h"
#include "models/family.h"
#include "models/name_map.h"
#include "models/vae.h"
#include "../common/vae_tiling_check.h"

using namespace diffuse;
using namespace diffuse::vae_tiling_check;
namespace fs = std::filesystem;

namespace {

struct Env {
  std::string model, dir;
  int64_t size = 1024;
  Precision prec = Precision::F32;
};

bool get_env(Env* e) {
  const char* m = std::getenv("DIFFUSE_VAE_MODEL");
  if (!m || !*m) return false;
  e->model = m;
  const char* d = std::getenv("DIFFUSE_VAE_DIR");
  e->dir = d && *d ? d : "/tmp/diffuse-vae-tiling";
  fs::create_directories(e->dir);
  if (const char* s = std::getenv("DIFFUSE_VAE_SIZE")) e->size = std::atoll(s);
  if (const char* p = std::getenv("DIFFUSE_VAE_PRECISION")) e->prec = std::string(p) == "bf16" ? Precision::BF16 : Precision::F32;
  return true;
}

#define NEED_ENV(e)                                                                                   \
  Env e;                                                                                              \
  if (!get_env(&e)) GTEST_SKIP() << "set DIFFUSE_VAE_MODEL to a full-size SD 1.x checkpoint to run"

struct Loaded {
  std::unique_ptr<Backend> be;
  VAE vae;
};

void load(const Env& e, Loaded* l, bool encoder, bool decoder) {
  l->be = make_cpu_backend(e.prec);
  WeightStore w = component_weights(open_model_file(e.model), Component::VAE, Family::SD1);
  l->vae.load(*l->be, w, VAEConfig::from_weights(w, 0.18215f), encoder, decoder);
}

VAETiling forced() {
  VAETiling t;
  t.mode = VAETiling::Mode::On;
  return t;
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Tensor read(const std::string& path, const char* name) {
  TensorFile f = load_safetensors(path);
  const Tensor* t = f.find(name);
  EXPECT_NE(t, nullptr) << path << ": no " << name;
  return t ? t->to(DType::F32) : Tensor();
}

void decode_step(bool tiled) {
  NEED_ENV(e);
  Loaded l;
  load(e, &l, false, true);
  Tensor z = read(e.dir + "/latent.safetensors", "z");
  ASSERT_TRUE(z.defined());
  Arena arena;
  Ctx c{*l.be, arena};
  auto t0 = std::chrono::steady_clock::now();
  Tensor img = tiled ? l.vae.decode(c, z, forced()) : l.vae.decode(c, z);
  const double s = since(t0);
  std::printf("decode %s %s: %.1f s, %d threads, VAE scratch peak %.0f MiB\n", tiled ? "tiled" : "untiled",
              img.shape().str().c_str(), s, num_threads(), l.vae.scratch_peak() / 1048576.0);
  save_safetensors(e.dir + (tiled ? "/tiled.safetensors" : "/untiled.safetensors"), {{"image", img.clone()}});
}

void encode_step(bool tiled) {
  NEED_ENV(e);
  Loaded l;
  load(e, &l, true, false);
  Tensor x = picture(1, e.size, e.size, 11);
  Arena arena;
  Ctx c{*l.be, arena};
  auto t0 = std::chrono::steady_clock::now();
  VAE::Posterior p = tiled ? l.vae.encode(c, x, forced()) : l.vae.encode(c, x);
  const double s = since(t0);
  std::printf("encode %s %s: %.1f s, VAE scratch peak %.0f MiB\n", tiled ? "tiled" : "untiled",
              x.shape().str().c_str(), s, l.vae.scratch_peak() / 1048576.0);
  save_safetensors(e.dir + (tiled ? "/enc_tiled.safetensors" : "/enc_untiled.safetensors"),
                   {{"mean", p.mean.clone()}, {"std", p.std.clone()}});
}

}  // namespace

TEST(VAETilingFull, Latent) {
  NEED_ENV(e);
  Loaded l;
  load(e, &l, true, false);
  Arena arena;
  Ctx c{*l.be, arena};
  Tensor z = l.vae.encode(c, picture(1, e.size, e.size, 7)).mean.clone();
  save_safetensors(e.dir + "/latent.safetensors", {{"z", z}});
  std::printf("latent %s written\n", z.str().c_str());
}

TEST(VAETilingFull, DecodeUntiled) { decode_step(false); }
TEST(VAETilingFull, DecodeTiled) { decode_step(true); }
TEST(VAETilingFull, EncodeUntiled) { encode_step(false); }
TEST(VAETilingFull, EncodeTiled) { encode_step(true); }

TEST(VAETilingFull, Compare) {
  NEED_ENV(e);
  const VAETiling t = forced();
  if (fs::exists(e.dir + "/tiled.safetensors") && fs::exists(e.dir + "/untiled.safetensors")) {
    Tensor a = read(e.dir + "/tiled.safetensors", "image"), r = read(e.dir + "/untiled.safetensors", "image");
    ASSERT_EQ(a.shape(), r.shape());
    const VAETileAxis ay = vae_tile_axis(t, a.dim(1), 8), ax = vae_tile_axis(t, a.dim(2), 8);
    std::printf("decode %s, %zux%zu tiles of %lld px (images in [-1, 1] units):\n", a.shape().str().c_str(),
                ay.starts.size(), ax.starts.size(), (long long)ay.size);
    print("tiled vs untiled", compare(a, r));
    print("seams (band of 24 px)", seam_metric(a, r, ay, ax, t.overlap_px / 8.0 + 8));
    // What an image shows: both clamped to [-1, 1] (the pipeline maps that to 0..255).
    for (Tensor* x : {&a, &r})
      for (int64_t i = 0; i < x->numel(); ++i) x->f32()[i] = std::clamp(x->f32()[i], -1.0f, 1.0f);
    print("clamped to [-1, 1]: tiled vs untiled", compare(a, r));
  }
  if (fs::exists(e.dir + "/enc_tiled.safetensors") && fs::exists(e.dir + "/enc_untiled.safetensors")) {
    for (const char* k : {"mean", "std"}) {
      Tensor a = read(e.dir + "/enc_tiled.safetensors", k), r = read(e.dir + "/enc_untiled.safetensors", k);
      print((std::string("encode posterior ") + k + ", tiled vs untiled").c_str(), compare(a, r));
    }
  }
}
