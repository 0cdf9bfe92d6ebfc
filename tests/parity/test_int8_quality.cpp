// Quality of the 8-bit weight mode end to end: txt2img on the tiny fixture models (64×64, Euler,
// 20 steps, guidance 7.5, torch CPU generator seed 42) with int8 weights (per-output-channel
// scales, WeightFormat::Int8), and with bf16 compute, against the fp32 result: cosine similarity
// of the final latents.
//  - int8 weights (fp32 or bf16 compute) vs fp32: >= 0.995 (the bound);
//  - bf16 compute (native weights) vs fp32: >= 0.999 (no other test covers 20 full steps).
// The int8 runs must also differ from their native-weight counterparts (the weights really are
// quantised). sd1 is bundled; sd2 and sdxl run when ../shared/fixtures has them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "backend/backend.h"
#include "models/sd_model.h"
#include "pipeline/generate.h"

namespace diffuse {
namespace {

namespace fs = std::filesystem;

std::string model_path(const std::string& family) {
  const std::string rel = family + "/model/tiny-" + family + ".safetensors";
  for (const std::string& p : {std::string(DIFFUSE_SHARED_DIR) + "/fixtures/" + rel, std::string(DIFFUSE_TEST_DATA) + "/" + rel})
    if (fs::exists(p)) return p;
  return {};
}

// The final latent (f32 NCHW) of the fixtures' txt2img run, 20 Euler steps.
Tensor run(const std::string& path, Precision prec, WeightFormat wf) {
  auto be = make_cpu_backend(prec, wf);
  EXPECT_EQ(be->weight_format(), wf);
  auto model = SDModel::load(path, *be);
  GenerateParams p;
  p.prompt = "a photograph of an astronaut riding a horse";
  p.negative = "blurry, low quality";
  p.width = p.height = 64;
  p.steps = 20;
  p.cfg = 7.5;
  p.seed = 42;
  p.sampler = "euler";
  p.rng = RngKind::Cpu;
  std::vector<Result> r = generate(*model, *be, p);
  EXPECT_EQ(r.size(), 1u);
  return r.at(0).latent;
}

double cosine(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double d = 0, na = 0, nb = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.f32()[i], y = b.f32()[i];
    d += x * y, na += x * x, nb += y * y;
  }
  return d / std::sqrt(na * nb);
}

void check_family(const std::string& family) {
  const std::string path = model_path(family);
  if (path.empty()) GTEST_SKIP() << "needs " << family << "/model/tiny-" << family << ".safetensors (tests/data or ../shared/fixtures)";
  const Tensor fp32 = run(path, Precision::F32, WeightFormat::Native);
  const Tensor i8 = run(path, Precision::F32, WeightFormat::Int8);
  const double c_i8 = cosine(i8, fp32);
  std::printf("[%s] 20 steps: int8 weights (fp32 compute) vs fp32: cosine %.6f\n", family.c_str(), c_i8);
  EXPECT_GE(c_i8, 0.995) << family << " int8 (fp32 compute)";
  EXPECT_NE(std::memcmp(i8.data(), fp32.data(), fp32.bytes()), 0) << family << ": int8 run equals fp32 bit for bit";

  auto probe = make_cpu_backend(Precision::BF16);
  if (probe->effective_precision() != Precision::BF16) {
    std::printf("[%s] bf16 compute not supported by this CPU: bf16 runs skipped\n", family.c_str());
    return;
  }
  const Tensor bf16 = run(path, Precision::BF16, WeightFormat::Native);
  const Tensor i8b = run(path, Precision::BF16, WeightFormat::Int8);
  const double c_bf16 = cosine(bf16, fp32), c_i8b = cosine(i8b, fp32);
  std::printf("[%s] 20 steps: bf16 vs fp32: cosine %.6f; int8 weights (bf16 compute) vs fp32: cosine %.6f\n",
              family.c_str(), c_bf16, c_i8b);
  EXPECT_GE(c_bf16, 0.999) << family << " bf16";
  EXPECT_GE(c_i8b, 0.995) << family << " int8 (bf16 compute)";
  EXPECT_NE(std::memcmp(i8b.data(), bf16.data(), bf16.bytes()), 0) << family << ": int8 run equals bf16 bit for bit";
}

TEST(Int8Quality, Sd1) { check_family("sd1"); }
TEST(Int8Quality, Sd2) { check_family("sd2"); }
TEST(Int8Quality, Sdxl) { check_family("sdxl"); }

}  // namespace
}  // namespace diffuse
