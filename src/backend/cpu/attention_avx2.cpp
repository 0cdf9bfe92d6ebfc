// Fused attention in f32 with AVX2 + FMA: the kernel CPUs without AVX-512 run (AMD Zen 1-3,
// Intel before Skylake-SP and most client parts). This translation unit is compiled with
// -mavx2 -mfma and only entered after a run-time feature check (attention.cpp).
//
// Like attention_amx.cpp, it uses no std:: templates and no inline functions from headers (an
// instantiation compiled here with AVX2 code could be picked by the linker for baseline callers
// through COMDAT folding): only intrinsics, C library calls and helpers in an anonymous namespace.
//
// Scheme: K and V of every (batch, head) are packed once per call, K as [Nk/8 groups][D][8 keys]
// (so Q·Kᵀ runs 8 keys per vector) and V as [Nk][Dp8] (rows padded with zeros to a multiple of
// 8 floats). Then per (batch, head, block of MQ queries), over key blocks of NB:
//   S = Q·Kᵀ in log2 units (Q pre-multiplied by scale·log2 e), register-blocked 4 rows × 16 keys;
//   online softmax: m' = max(m, rowmax S), corr = 2^(m - m'), P = 2^(S - m'), l = l·corr + ΣP;
//   O = O·corr + P·V, register-blocked 4 rows × up to 24 columns;
// and finally o = O / l. Each task's arithmetic depends only on its own rows, so results do not
// depend on the batch size or the thread count.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "backend/cpu/attention.h"

namespace diffuse::cpu::detail {
namespace {

using i64 = int64_t;

constexpr i64 MQ = 32;   // queries per task (a multiple of 4)
constexpr i64 NB = 128;  // keys per block (a multiple of 16)

inline i64 rup8(i64 a) { return (a + 7) / 8 * 8; }
inline i64 imin(i64 a, i64 b) { return a < b ? a : b; }

inline float bf2f(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2bf(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float getf(const void* base, DType t, i64 i) {
  return t == DType::F32 ? static_cast<const float*>(base)[i] : bf2f(static_cast<const uint16_t*>(base)[i]);
}

// 2^x for finite x <= 0 (the softmax's S - max): n = round(x), 2^(x-n) by its degree-6 Taylor
// series in (x-n)·ln2 (< 2.4e-7 relative), 2^n built in the exponent bits and clamped at 2^-126
// (a weight of ~1e-38 instead of 0 for x < -126: invisible next to the row maximum's weight of 1).
inline __m256 exp2v(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-150.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  e = _mm256_max_epi32(e, _mm256_set1_epi32(1));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

struct Geo {
  i64 D, Dp8, NkP, C;
  i64 kfloats, vfloats;  // packed K and V floats per (batch, head)
};

Geo geometry(const AttnProblem& p) {
  Geo g;
  g.D = p.D;
  g.Dp8 = rup8(p.D);
  g.NkP = rup8(p.Nk);
  g.C = p.H * p.D;
  g.kfloats = g.NkP * g.D;
  g.vfloats = g.NkP * g.Dp8;
  return g;
}

// S[r][j0 + 8g ..] for 4 rows (Q rows of D floats) and G groups of 8 keys (K packed [group][D][8]).
template <int G>
void qk4(const float* Q, i64 D, const float* K, float* S) {
  __m256 acc[4][G];
  for (int r = 0; r < 4; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = _mm256_setzero_ps();
  for (i64 d = 0; d < D; ++d) {
    __m256 kv[G];
    for (int g = 0; g < G; ++g) kv[g] = _mm256_load_ps(K + (g * D + d) * 8);
    for (int r = 0; r < 4; ++r) {
      const __m256 q = _mm256_broadcast_ss(Q + r * D + d);
      for (int g = 0; g < G; ++g) acc[r][g] = _mm256_fmadd_ps(q, kv[g], acc[r][g]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int g = 0; g < G; ++g) _mm256_store_ps(S + r * NB + g * 8, acc[r][g]);
}

// O[r][c0 .. c0 + 8·NC) += Σ_j P[r][j]·V[j][c0 ..] for 4 rows over W keys (V rows of Dp8 floats).
template <int NC>
void pv4(const float* P, const float* V, i64 Dp8, i64 W, float* O) {
  __m256 acc[4][NC];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm256_load_ps(O + r * Dp8 + c * 8);
  for (i64 j = 0; j < W; ++j) {
    __m256 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = _mm256_load_ps(V + j * Dp8 + c * 8);
    for (int r = 0; r < 4; ++r) {
      const __m256 pr = _mm256_broadcast_ss(P + r * NB + j);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm256_fmadd_ps(pr, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NC; ++c) _mm256_store_ps(O + r * Dp8 + c * 8, acc[r][c]);
}

void pv_rows4(const float* P, const float* V, i64 Dp8, i64 W, float* O) {
  i64 c = 0;
  for (; c + 24 <= Dp8; c += 24) pv4<3>(P, V + c, Dp8, W, O + c);
  if (Dp8 - c == 16) pv4<2>(P, V + c, Dp8, W, O + c);
  else if (Dp8 - c == 8) pv4<1>(P, V + c, Dp8, W, O + c);
}

// One task: queries [q0, q0 + mq) of (b, h). Scratch: Q [MQ][D], S [MQ][NB], O [MQ][Dp8], m, l.
void run_task(const AttnProblem& p, const Geo& g, const float* kp, const float* vp, float* scratch, i64 b,
              i64 h, i64 q0, i64 mq) {
  const i64 D = g.D, Dp8 = g.Dp8;
  float* Q = scratch;
  float* S = Q + MQ * D;
  float* O = S + MQ * NB;
  float* m = O + MQ * Dp8;
  float* l = m + MQ;
  const float c2 = p.scale * 1.4426950408889634f;
  const i64 mq4 = (mq + 3) / 4 * 4;
  for (i64 i = 0; i < mq4; ++i) {
    const i64 src = (b * p.Nq + q0 + i) * g.C + h * D;
    for (i64 d = 0; d < D; ++d) Q[i * D + d] = i < mq ? getf(p.q, p.qt, src + d) * c2 : 0.f;
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  std::memset(O, 0, sizeof(float) * size_t(mq4 * Dp8));
  std::memset(S, 0, sizeof(float) * size_t(mq4 * NB));
  const float* K = kp + (b * p.H + h) * g.kfloats;
  const float* V = vp + (b * p.H + h) * g.vfloats;
  for (i64 j0 = 0; j0 < p.Nk; j0 += NB) {
    const i64 nb = imin(NB, p.Nk - j0), groups = (nb + 7) / 8;
    const float* Kb = K + j0 * D;  // group j0/8
    for (i64 r = 0; r < mq4; r += 4) {
      i64 gi = 0;
      for (; gi + 2 <= groups; gi += 2) qk4<2>(Q + r * D, D, Kb + gi * 8 * D, S + r * NB + gi * 8);
      if (gi < groups) qk4<1>(Q + r * D, D, Kb + gi * 8 * D, S + r * NB + gi * 8);
    }
    const i64 full = nb / 8 * 8, padded = groups * 8;
    for (i64 i = 0; i < mq; ++i) {
      float* s = S + i * NB;
      __m256 vm = _mm256_set1_ps(m[i]);
      for (i64 j = 0; j < full; j += 8) vm = _mm256_max_ps(vm, _mm256_load_ps(s + j));
      float mb = hmax(vm);
      for (i64 j = full; j < nb; ++j) mb = s[j] > mb ? s[j] : mb;
      const float corr = exp2f(m[i] - mb);  // 0 on the first block (m = -inf)
      const __m256 vmb = _mm256_set1_ps(mb);
      __m256 vs = _mm256_setzero_ps();
      for (i64 j = 0; j < padded; j += 8) {
        const __m256 e = exp2v(_mm256_sub_ps(_mm256_load_ps(s + j), vmb));
        _mm256_store_ps(s + j, e);
        if (j < full) vs = _mm256_add_ps(vs, e);
      }
      float sum = hsum(vs);
      for (i64 j = full; j < nb; ++j) sum += s[j];
      for (i64 j = nb; j < padded; ++j) s[j] = 0.f;  // padding keys weigh nothing
      l[i] = l[i] * corr + sum;
      m[i] = mb;
      const __m256 vc = _mm256_set1_ps(corr);
      float* o = O + i * Dp8;
      for (i64 c = 0; c < Dp8; c += 8) _mm256_store_ps(o + c, _mm256_mul_ps(_mm256_load_ps(o + c), vc));
    }
    for (i64 r = 0; r < mq4; r += 4) pv_rows4(S + r * NB, V + j0 * Dp8, Dp8, nb, O + r * Dp8);
  }
  for (i64 i = 0; i < mq; ++i) {
    const float inv = 1.f / l[i];
    const i64 dst = (b * p.Nq + q0 + i) * g.C + h * D;
    for (i64 d = 0; d < D; ++d) {
      const float x = O[i * Dp8 + d] * inv;
      if (p.ot == DType::F32) static_cast<float*>(p.o)[dst + d] = x;
      else static_cast<uint16_t*>(p.o)[dst + d] = f2bf(x);
    }
  }
}

}  // namespace

i64 attn_avx2_packed_floats(const AttnProblem& p) {
  const Geo g = geometry(p);
  return p.B * p.H * (g.kfloats + g.vfloats);
}

i64 attn_avx2_scratch_floats(const AttnProblem& p) {
  const Geo g = geometry(p);
  return MQ * g.D + MQ * NB + MQ * g.Dp8 + 2 * MQ;
}

i64 attn_avx2_tasks(const AttnProblem& p) { return p.B * p.H * ((p.Nq + MQ - 1) / MQ); }

void attn_avx2_pack(const AttnProblem& p, float* packed, i64 bh) {
  const Geo g = geometry(p);
  const i64 b = bh / p.H, h = bh % p.H, D = g.D;
  float* K = packed + bh * g.kfloats;
  float* V = packed + p.B * p.H * g.kfloats + bh * g.vfloats;
  for (i64 j = 0; j < g.NkP; ++j) {
    const bool valid = j < p.Nk;
    const i64 src = (b * p.Nk + j) * g.C + h * D;
    float* kg = K + (j / 8) * D * 8 + j % 8;
    float* vr = V + j * g.Dp8;
    for (i64 d = 0; d < D; ++d) {
      kg[d * 8] = valid ? getf(p.k, p.kt, src + d) : 0.f;
      vr[d] = valid ? getf(p.v, p.vt, src + d) : 0.f;
    }
    for (i64 d = D; d < g.Dp8; ++d) vr[d] = 0.f;
  }
}

void attn_avx2_compute(const AttnProblem& p, const float* packed, float* scratch, i64 task) {
  const Geo g = geometry(p);
  const i64 nqb = (p.Nq + MQ - 1) / MQ, bh = task / nqb, q0 = (task % nqb) * MQ;
  run_task(p, g, packed, packed + p.B * p.H * g.kfloats, scratch, bh / p.H, bh % p.H, q0, imin(MQ, p.Nq - q0));
}

}  // namespace diffuse::cpu::detail
