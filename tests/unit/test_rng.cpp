// torch-compatible RNG: every draw in randn.safetensors (CPU within 1e-6, CUDA within 1e-5),
// with the max error and bit-exact count per key and in total; determinism; consecutive draws.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/tensor_file.h"
#include "pipeline/rng.h"

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

std::string reference_path() {
  for (fs::path p : {fs::path(DIFFUSE_TEST_DATA) / "randn.safetensors",
                     fs::path(DIFFUSE_SHARED_DIR) / "fixtures" / "randn.safetensors"})
    if (fs::exists(p)) return p.string();
  return "";
}

struct Case {
  const char* name;
  Shape shape;
};
const std::vector<Case>& cases() {
  static const std::vector<Case> c = {{"5", Shape{5}},
                                      {"17", Shape{17}},
                                      {"1x4x8x8", Shape{1, 4, 8, 8}},
                                      {"2x4x12x16", Shape{2, 4, 12, 16}},
                                      {"1x4x64x64", Shape{1, 4, 64, 64}}};
  return c;
}
constexpr uint64_t kSeeds[] = {0, 42, 1234};

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

struct Totals {
  int64_t exact = 0, count = 0;
  double max_err = 0;
};

// Draws every reference shape twice from a fresh generator per seed and compares with the
// `<kind>_…` and `<kind>2_…` keys.
Totals check_kind(const TensorFile& ref, RngKind kind, double bound) {
  const std::string prefix = kind == RngKind::Cpu ? "cpu" : "cuda";
  Totals tot;
  for (uint64_t seed : kSeeds) {
    for (const Case& c : cases()) {
      auto rng = make_rng(kind, seed);
      for (int draw = 0; draw < 2; ++draw) {
        const std::string key = prefix + (draw ? "2" : "") + "_seed" + std::to_string(seed) + "_" + c.name;
        const Tensor* want = ref.find(key);
        if (!want) {
          ADD_FAILURE() << "missing reference key " << key;
          continue;
        }
        Tensor got = rng->randn(c.shape);
        EXPECT_EQ(got.shape(), want->shape()) << key;
        Tensor w = want->to(DType::F32);
        const float* a = got.f32();
        const float* b = w.f32();
        int64_t exact = 0;
        double err = 0;
        for (int64_t i = 0; i < got.numel(); ++i) {
          exact += same_bits(a[i], b[i]);
          err = std::max(err, double(std::fabs(a[i] - b[i])));
        }
        std::printf("  %-28s max|d| %.3g  bit-exact %6lld/%6lld\n", key.c_str(), err, (long long)exact,
                    (long long)got.numel());
        EXPECT_LE(err, bound) << key;
        tot.exact += exact;
        tot.count += got.numel();
        tot.max_err = std::max(tot.max_err, err);
      }
    }
  }
  std::printf("TOTAL %s: max|d| %.3g, bit-exact %lld/%lld (%.2f%%)\n", prefix.c_str(), tot.max_err,
              (long long)tot.exact, (long long)tot.count, 100.0 * double(tot.exact) / double(tot.count));
  return tot;
}

std::vector<float> draw(Rng& rng, int64_t n) {
  std::vector<float> v(size_t(std::max<int64_t>(n, 0)));
  rng.randn(v.data(), n);
  return v;
}

}  // namespace

TEST(Rng, CpuMatchesTorch) {
  const std::string path = reference_path();
  if (path.empty()) GTEST_SKIP() << "randn.safetensors not in DIFFUSE_TEST_DATA or the shared fixtures";
  TensorFile ref = load_safetensors(path);
  Totals t = check_kind(ref, RngKind::Cpu, 1e-6);
  EXPECT_EQ(t.count, 109188);
  // The avx_mathfun emulation makes CPU draws bit-exact; libm log/sin/cos would give ~83%.
  EXPECT_GE(double(t.exact), 0.999 * double(t.count));
}

TEST(Rng, CudaMatchesTorch) {
  const std::string path = reference_path();
  if (path.empty()) GTEST_SKIP() << "randn.safetensors not in DIFFUSE_TEST_DATA or the shared fixtures";
  TensorFile ref = load_safetensors(path);
  Totals t = check_kind(ref, RngKind::Cuda, 1e-5);
  EXPECT_EQ(t.count, 109188);
  // __sincosf is hardware-approximated on the GPU, so only part is bit-exact; a wrong mapping or
  // Box–Muller input would leave (almost) none.
  EXPECT_GE(double(t.exact), 0.1 * double(t.count));
}

TEST(Rng, Deterministic) {
  for (RngKind kind : {RngKind::Cpu, RngKind::Cuda}) {
    for (int64_t n : {3, 16, 1000}) {
      auto a = make_rng(kind, 7), b = make_rng(kind, 7), c = make_rng(kind, 8);
      std::vector<float> x = draw(*a, n), y = draw(*b, n), z = draw(*c, n);
      EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * sizeof(float))) << n;
      EXPECT_NE(x, z) << "seeds 7 and 8 gave the same draw of " << n;
      double sum = 0, sq = 0;
      for (float v : x) {
        EXPECT_TRUE(std::isfinite(v));
        sum += v;
        sq += double(v) * v;
      }
      if (n == 1000) {  // loose moments: mean ~ 0 ± 0.03, variance ~ 1 ± 0.045
        EXPECT_LT(std::fabs(sum / n), 0.15);
        EXPECT_NEAR(sq / n, 1.0, 0.25);
      }
    }
  }
}

TEST(Rng, ConsecutiveDrawsAdvance) {
  for (RngKind kind : {RngKind::Cpu, RngKind::Cuda}) {
    for (int64_t n : {5, 17, 256}) {
      auto g = make_rng(kind, 42);
      std::vector<float> first = draw(*g, n), second = draw(*g, n);
      EXPECT_NE(first, second) << "second draw repeats the first, n=" << n;
    }
  }
}

TEST(Rng, CpuScalarDrawsShareTheCachedNormal) {
  // Below 16 elements each normal comes from a Box–Muller pair whose second value is kept in the
  // generator: randn(5) then randn(5) is the same stream as randn(10).
  auto whole = make_cpu_rng(3);
  std::vector<float> ten = draw(*whole, 10);
  auto split = make_cpu_rng(3);
  std::vector<float> a = draw(*split, 5), b = draw(*split, 5);
  a.insert(a.end(), b.begin(), b.end());
  EXPECT_EQ(0, std::memcmp(a.data(), ten.data(), 10 * sizeof(float)));
  // The 16-wide path neither uses nor clears that cached value.
  auto six = make_cpu_rng(3);
  std::vector<float> ref6 = draw(*six, 6);
  auto mixed = make_cpu_rng(3);
  draw(*mixed, 5);
  draw(*mixed, 17);
  std::vector<float> next = draw(*mixed, 1);
  EXPECT_TRUE(same_bits(next[0], ref6[5])) << next[0] << " vs " << ref6[5];
}

TEST(Rng, CudaGridCapAndOffsets) {
  // With the grid capped at one block (256 threads), a draw of 300 puts elements 0..255 in
  // component 0 of threads 0..255, exactly as an uncapped draw of 256 does.
  auto capped = make_cuda_rng(5, /*max_blocks=*/1);
  std::vector<float> c300 = draw(*capped, 300);
  auto plain = make_cuda_rng(5);
  std::vector<float> p256 = draw(*plain, 256);
  EXPECT_EQ(0, std::memcmp(c300.data(), p256.data(), 256 * sizeof(float)));
  // A capped draw of 2048 needs two curand_normal4 per thread: the offset moves by 8, so the
  // next draw is the third uncapped one (offsets 0, 4, 8).
  auto capped2 = make_cuda_rng(5, 1);
  draw(*capped2, 2048);
  std::vector<float> after = draw(*capped2, 256);
  auto plain2 = make_cuda_rng(5);
  draw(*plain2, 256);
  draw(*plain2, 256);
  std::vector<float> third = draw(*plain2, 256);
  EXPECT_EQ(0, std::memcmp(after.data(), third.data(), 256 * sizeof(float)));
  EXPECT_THROW(make_cuda_rng(5, 0), Error);
}

TEST(Rng, TensorDrawMatchesPointerDraw) {
  auto a = make_rng(RngKind::Cpu, 11), b = make_rng(RngKind::Cpu, 11);
  Tensor t = a->randn(Shape{1, 4, 3, 5});
  EXPECT_EQ(t.shape(), (Shape{1, 4, 3, 5}));
  EXPECT_EQ(t.dtype(), DType::F32);
  std::vector<float> v = draw(*b, 60);
  EXPECT_EQ(0, std::memcmp(t.f32(), v.data(), 60 * sizeof(float)));
  std::vector<float> none = draw(*b, 0);  // n = 0 draws nothing and does not crash
  EXPECT_TRUE(none.empty());
}

TEST(Rng, ParseKind) {
  EXPECT_EQ(parse_rng_kind("cpu"), RngKind::Cpu);
  EXPECT_EQ(parse_rng_kind("cuda"), RngKind::Cuda);
  try {
    parse_rng_kind("gpu");
    ADD_FAILURE() << "no error for 'gpu'";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("'gpu'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("cpu, cuda"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}
