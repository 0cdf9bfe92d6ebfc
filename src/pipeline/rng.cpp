// torch-compatible normal draws.
//
// CPU generator (torch.Generator("cpu")): mt19937 seeded with the low 32 bits of the seed.
//  - n < 16: per element at::normal_distribution<double>: two 53-bit uniforms from random64()
//    (first 32-bit output is the high word), r = sqrt(-2 log1p(-u2)), θ = 2π u1, returns r cos θ
//    and caches r sin θ in the generator for the next scalar draw (manual_seed clears it; the
//    16-wide path neither uses nor clears it).
//  - n ≥ 16: normal_fill_AVX2: n float uniforms (24-bit), Box–Muller on blocks of 16 (u1 = 1 -
//    d[j], u2 = d[j+8], j < 8) and, when n % 16 != 0, 16 fresh uniforms overwrite the last 16
//    values, which are transformed again. log and sin/cos are avx_mathfun's cephes polynomials
//    (log256_ps, sincos256_ps), evaluated here in scalar float with the FMAs GCC contracts
//    the AVX2 build into; this reproduces torch's values bit for bit.
// CUDA generator: torch's distribution_nullary_kernel with curand_normal4 (see CudaRng).
#include "pipeline/rng.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "core/error.h"

namespace diffuse {

RngKind parse_rng_kind(const std::string& s) {
  if (s == "cpu") return RngKind::Cpu;
  if (s == "cuda") return RngKind::Cuda;
  fail("--rng: unknown value '", s, "' (allowed: cpu, cuda)");
}

Tensor Rng::randn(const Shape& shape) {
  Tensor t = Tensor::empty(shape, DType::F32);
  randn(t.f32(), t.numel());
  return t;
}

namespace {

constexpr double kPi = 3.14159265358979323846;

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- avx_mathfun (cephes) in scalar float ----
// Every multiply-add below is written either as an explicit fmaf (where torch's AVX2 build has
// an FMA) or as a product that feeds nothing but an fmaf/sqrt/store, so the compiler has nothing
// left to contract and the result does not depend on -ffp-contract or -mfma.

// log256_ps for x in [2^-24, 1].
float cephes_logf(float x) {
  x = std::max(x, bits_to_float(0x00800000u));  // smallest normal
  const uint32_t b = float_to_bits(x);
  const int32_t exponent = int32_t(b >> 23) - 127;
  x = bits_to_float((b & ~0x7f800000u) | float_to_bits(0.5f));  // mantissa in [0.5, 1)
  float e = float(exponent) + 1.0f;
  const bool small = x < 0.707106781186547524f;
  const float tmp = small ? x : 0.0f;
  x = x - 1.0f;
  e = e - (small ? 1.0f : 0.0f);
  x = x + tmp;
  const float z = x * x;
  static constexpr float p[9] = {7.0376836292E-2f,  -1.1514610310E-1f, 1.1676998740E-1f,
                                 -1.2420140846E-1f, 1.4249322787E-1f,  -1.6668057665E-1f,
                                 2.0000714765E-1f,  -2.4999993993E-1f, 3.3333331174E-1f};
  float y = p[0];
  for (int i = 1; i < 9; ++i) y = std::fmaf(y, x, p[i]);
  y = y * x;
  y = std::fmaf(y, z, e * -2.12194440e-4f);
  y = std::fmaf(-z, 0.5f, y);
  x = x + y;
  return std::fmaf(e, 0.693359375f, x);
}

// sincos256_ps for x ≥ 0.
void cephes_sincosf(float x, float* s, float* c) {
  float y = x * 1.27323954473516f;  // 4/π
  int32_t j = int32_t(y);           // truncation, as cvttps
  j = (j + 1) & ~1;
  y = float(j);
  const uint32_t sign_sin = uint32_t(j & 4) << 29;
  const uint32_t sign_cos = uint32_t(~(j - 2) & 4) << 29;
  const bool sin_poly = (j & 2) == 0;
  // Extended-precision reduction x - y·π/4 in three parts.
  x = std::fmaf(y, -0.78515625f, x);
  x = std::fmaf(y, -2.4187564849853515625e-4f, x);
  x = std::fmaf(y, -3.77489497744594108e-8f, x);
  const float z = x * x;
  float yc = std::fmaf(2.443315711809948E-005f, z, -1.388731625493765E-003f);
  yc = std::fmaf(yc, z, 4.166664568298827E-002f);
  yc = yc * z;
  yc = std::fmaf(yc, z, -(z * 0.5f));
  yc = yc + 1.0f;
  float ys = std::fmaf(-1.9515295891E-4f, z, 8.3321608736E-3f);
  ys = std::fmaf(ys, z, -1.6666654611E-1f);
  ys = ys * z;
  ys = std::fmaf(ys, x, x);
  const float sv = sin_poly ? ys : yc, cv = sin_poly ? yc : ys;
  *s = bits_to_float(float_to_bits(sv) ^ sign_sin);
  *c = bits_to_float(float_to_bits(cv) ^ sign_cos);
}

class CpuRng final : public Rng {
 public:
  explicit CpuRng(uint64_t seed) : engine_(uint32_t(seed & 0xffffffffu)) {}

  void randn(float* out, int64_t n) override {
    if (n <= 0) return;
    if (n < 16) {
      for (int64_t i = 0; i < n; ++i) out[i] = float(normal_double());
      return;
    }
    for (int64_t i = 0; i < n; ++i) out[i] = uniform_float();
    for (int64_t i = 0; i + 16 <= n; i += 16) box_muller16(out + i);
    if (n % 16 != 0) {
      float* tail = out + n - 16;
      for (int i = 0; i < 16; ++i) tail[i] = uniform_float();
      box_muller16(tail);
    }
  }

 private:
  uint64_t random64() {
    const uint64_t hi = engine_(), lo = engine_();
    return (hi << 32) | lo;
  }
  // at::uniform_real_distribution<double>(0, 1) and <float>(0, 1).
  double uniform_double() { return double(random64() & ((uint64_t(1) << 53) - 1)) * 0x1p-53; }
  float uniform_float() { return float(uint32_t(engine_()) & ((1u << 24) - 1)) * 0x1p-24f; }

  double normal_double() {
    if (has_cached_) {
      has_cached_ = false;
      return cached_;
    }
    const double u1 = uniform_double(), u2 = uniform_double();
    const double r = std::sqrt(-2.0 * std::log1p(-u2));
    const double theta = 2.0 * kPi * u1;
    cached_ = r * std::sin(theta);
    has_cached_ = true;
    return r * std::cos(theta);
  }

  static void box_muller16(float* d) {
    const float two_pi = float(2.0 * kPi);
    for (int j = 0; j < 8; ++j) {
      const float u1 = 1.0f - d[j], u2 = d[j + 8];
      const float radius = std::sqrt(-2.0f * cephes_logf(u1));
      float s, c;
      cephes_sincosf(two_pi * u2, &s, &c);
      d[j] = radius * c;
      d[j + 8] = radius * s;
    }
  }

  std::mt19937 engine_;
  bool has_cached_ = false;
  double cached_ = 0.0;
};

// ---- CUDA: Philox 4x32-10 (curand) ----
struct U4 {
  uint32_t v[4];
};

U4 philox4x32_10(U4 ctr, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * ctr.v[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * ctr.v[2];
    ctr = U4{{uint32_t(p1 >> 32) ^ ctr.v[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ ctr.v[3] ^ k1,
              uint32_t(p0)}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// __sincosf on the GPU: FMUL.RZ by 1/(2π) (float), then MUFU.SIN / MUFU.COS of the
// revolutions. The MUFU table interpolation is not public; an exact sine and cosine of the same
// reduced argument stay within its ~2^-21 error.
void cuda_sincosf(float v, float* s, float* c) {
  const double p = double(v) * double(0.15915493667125701904f);  // exact (24 × 24 bits)
  float r = float(p);
  if (std::fabs(double(r)) > std::fabs(p)) r = std::nextafter(r, 0.0f);  // round toward zero
  const double a = 2.0 * kPi * double(r);
  *s = float(std::sin(a));
  *c = float(std::cos(a));
}

// _curand_box_muller(x, y): {s·sin v, s·cos v}. nvcc fuses x·c + c/2 into one FMA; logf is
// CUDA's accurate one (here: the correctly rounded value).
void curand_box_muller(uint32_t x, uint32_t y, float* out) {
  const float inv32 = 0x1p-32f;
  const float inv32_2pi = 0x1p-32f * 6.2831855f;
  const float u = std::fmaf(float(x), inv32, inv32 * 0.5f);
  const float v = std::fmaf(float(y), inv32_2pi, inv32_2pi * 0.5f);
  const float radius = std::sqrt(-2.0f * float(std::log(double(u))));
  float s, c;
  cuda_sincosf(v, &s, &c);
  out[0] = s * radius;
  out[1] = c * radius;
}

// torch's CUDA normal: distribution_nullary_kernel<float, float, 4> with curand_normal4.
// Launch: 256 threads per block, grid = min(ceil(n/256), max_blocks); thread t runs
// curand_init(seed, t, offset) and, for it = 0, 1, … while t + it·4·S < ceil-to-4S(n)
// (S = 256·grid), draws one curand_normal4 whose component ii goes to element
// t + it·4·S + ii·S. The generator's offset grows by 4 per iteration count.
class CudaRng final : public Rng {
 public:
  CudaRng(uint64_t seed, int64_t max_blocks) : seed_(seed), max_blocks_(max_blocks) {
    DF_CHECK(max_blocks > 0, "cuda rng: max_blocks must be positive, got ", max_blocks);
  }

  void randn(float* out, int64_t n) override {
    if (n <= 0) return;
    const int64_t block = 256;
    const int64_t grid = std::min((n + block - 1) / block, max_blocks_);
    const int64_t stride = block * grid;
    const int64_t iters = (n - 1) / (stride * 4) + 1;
    const uint64_t offset = offset_;
    offset_ += uint64_t(iters) * 4;  // philox_cuda_state(counter_offset), already a multiple of 4
    const uint32_t k0 = uint32_t(seed_), k1 = uint32_t(seed_ >> 32);
    for (int64_t t = 0; t < stride; ++t) {
      for (int64_t it = 0; it < iters; ++it) {
        const int64_t first = t + it * stride * 4;
        if (first >= n) break;
        // curand_init: subsequence t in the counter's high 64 bits, offset/4 in its low 64 bits;
        // offset % 4 == 0 here, so curand4 returns this block whole.
        const uint64_t lo = offset / 4 + uint64_t(it);
        const U4 ctr{{uint32_t(lo), uint32_t(lo >> 32), uint32_t(t), uint32_t(uint64_t(t) >> 32)}};
        const U4 r = philox4x32_10(ctr, k0, k1);
        float normals[4];
        curand_box_muller(r.v[0], r.v[1], normals);
        if (first + stride * 2 < n) curand_box_muller(r.v[2], r.v[3], normals + 2);
        for (int ii = 0; ii < 4; ++ii) {
          const int64_t li = first + stride * ii;
          if (li >= n) break;
          out[li] = normals[ii];
        }
      }
    }
  }

 private:
  uint64_t seed_;
  int64_t max_blocks_;
  uint64_t offset_ = 0;
};

}  // namespace

std::unique_ptr<Rng> make_cpu_rng(uint64_t seed) { return std::make_unique<CpuRng>(seed); }
std::unique_ptr<Rng> make_cuda_rng(uint64_t seed, int64_t max_blocks) {
  return std::make_unique<CudaRng>(seed, max_blocks);
}
std::unique_ptr<Rng> make_rng(RngKind kind, uint64_t seed) {
  return kind == RngKind::Cpu ? make_cpu_rng(seed) : make_cuda_rng(seed);
}

}  // namespace diffuse
