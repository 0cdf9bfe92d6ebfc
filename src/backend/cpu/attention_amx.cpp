// Fused attention kernels needing AVX-512 (f32), AVX512-BF16 and AMX-BF16. This translation unit
// is compiled with -mavx512f ... -mamx-bf16; it is only entered after a run-time feature check.
//
// To keep ISA-specific code from leaking into the rest of the program through COMDAT folding
// (an inline function or template instantiated here with AVX-512 code could be picked by the
// linker for baseline callers too), this file uses no std:: templates or header inline
// functions: only intrinsics, C library calls and helpers in an anonymous namespace.
//
// Scheme (all paths): pack K and V of every (batch, head) once per call into layouts suited to
// the kernel, then for each (batch, head, block of MQ queries), walk the keys in blocks of NB:
//   S = Q·Kᵀ (Q pre-multiplied by scale·log2 e, so S is in log2 units),
//   online softmax: m' = max(m, rowmax S), corr = 2^(m-m'), P = 2^(S-m'), l = l·corr + ΣP,
//   O = O·corr + P·V,
// and finally o = O / l. Only S (MQ×NB f32) and P are materialised, both cache resident.
// GCC 12 reports its own _mm512_undefined_* idiom inside the intrinsic headers as uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <math.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "backend/cpu/attention.h"

namespace diffuse::cpu::detail {
namespace {

using i64 = int64_t;

inline i64 rup(i64 a, i64 b) { return (a + b - 1) / b * b; }
inline i64 imin(i64 a, i64 b) { return a < b ? a : b; }
inline float fmaxf_(float a, float b) { return a > b ? a : b; }

inline float bf2f(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f2bf(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float getf(const void* base, DType t, i64 i) {
  return t == DType::F32 ? static_cast<const float*>(base)[i] : bf2f(static_cast<const uint16_t*>(base)[i]);
}
inline uint32_t ld32(const void* p) {
  uint32_t x;
  memcpy(&x, p, 4);
  return x;
}

// Zeroed, 64-byte aligned heap block.
struct Buf {
  void* p = nullptr;
  bool alloc(size_t bytes) {
    size_t n = size_t(rup(i64(bytes ? bytes : 64), 64));
    p = aligned_alloc(64, n);
    if (p) memset(p, 0, n);
    return p != nullptr;
  }
  ~Buf() { free(p); }
  template <typename T> T* as() const { return static_cast<T*>(p); }
};

// ---------------------------------------------------------------------------------------------
// 2^x: x = n + f with n = round(x), |f| <= 1/2; 2^f by its Taylor series in f·ln2 to degree
// DEG, then scaled by 2^n with vscalefps (which underflows gracefully to 0 for very negative n).
// Truncation error (relative): degree 6 < 2.4e-7, degree 4 < 8.5e-5 (used where P is rounded to
// bf16 anyway, 2^-9 = 2e-3). CLAMP maps -inf (and x < -150) to 0; the softmax does not need it
// because its arguments are finite and ≤ 0.
template <int DEG, bool CLAMP>
inline __m512 exp2v(__m512 x) {
  if (CLAMP) x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);
  // c_k = ln2^k / k!
  __m512 p;
  if (DEG >= 6) {
    p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  } else {
    p = _mm512_set1_ps(9.6181291076284772e-3f);
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(i64 n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// ---------------------------------------------------------------------------------------------
// Kernel modes and their block sizes.
enum Mode { kF32 = 0, kBf16 = 1, kAmx = 2, kAmxEmu = 3 };
constexpr i64 MQ = 32;  // queries per block (the AMX kernels assume exactly 2 tiles of 16 rows)
template <int M> constexpr i64 kNB = M == kF32 ? 128 : 256;  // keys per block (multiple of 64)

// Per-call geometry.
struct Geo {
  i64 B, Nq, Nk, H, D, C;
  i64 NkP;   // Nk rounded up to 32 (padded keys are zero in the packs and masked in softmax)
  i64 Dp16;  // D rounded up to 16: columns of the packed V and of the O accumulator
  i64 Dp32;  // D rounded up to 32: bf16 Q row length / packed K pairs (2 AMX k-steps of 32 for D=40)
  i64 kbh, vbh;  // packed elements per (batch, head)
};

// Packed layouts, per (b, h):
//  f32:  K as [NkP/16 groups][D][16 keys] f32,   V as [NkP][Dp16] f32.
//  bf16: K as [NkP/16 groups][Dp32/2 pairs][16 keys][2] bf16 (the VNNI B-operand of Q·Kᵀ: one
//        16×64-byte AMX tile per group and k-step of 32 dims; one zmm per group and pair),
//        V as [NkP/2 key pairs][Dp16][2] bf16 (VNNI B-operand of P·V along keys).
// Columns [d, d + 16) of row `src` of a k/v tensor (zero past D, or all zero for a padding key)
// rounded to bf16 (to nearest even).
inline __m256i bf16_cols(const void* base, DType t, i64 src, i64 d, i64 D, bool valid) {
  if (!valid || d >= D) return _mm256_setzero_si256();
  const __mmask16 k = tail_mask(D - d);
  if (t == DType::BF16) return _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + src + d);
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + src + d));
}

template <bool BF>
void pack_kv(const AttnProblem& p, const Geo& g, void* kp, void* vp, int tid, int nth) {
  const i64 nchunks = g.NkP / 32, tasks = g.B * g.H * nchunks;
  // Interleaves two rows of 16 bf16 (a, b) into pairs a0 b0 a1 b1 ...
  const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (i64 t = tasks * tid / nth; t < tasks * (tid + 1) / nth; ++t) {
    const i64 bh = t / nchunks, chunk = t % nchunks, b = bh / g.H, h = bh % g.H;
    if (!BF) {
      for (i64 j = chunk * 32; j < chunk * 32 + 32; ++j) {
        const bool valid = j < g.Nk;
        const i64 src = (b * g.Nk + (valid ? j : 0)) * g.C + h * g.D;
        const i64 grp = j / 16, lane = j % 16;
        float* K = static_cast<float*>(kp) + bh * g.kbh + grp * g.D * 16 + lane;
        float* V = static_cast<float*>(vp) + bh * g.vbh + j * g.Dp16;
        for (i64 d = 0; d < g.D; ++d) K[d * 16] = valid ? getf(p.k, p.kt, src + d) : 0.f;
        for (i64 d = 0; d < g.Dp16; ++d) V[d] = valid && d < g.D ? getf(p.v, p.vt, src + d) : 0.f;
      }
      continue;
    }
    const i64 npair = g.Dp32 / 2;
    for (i64 j = chunk * 32; j < chunk * 32 + 32; j += 2) {  // a key pair: V interleaves them
      const bool va = j < g.Nk, vb = j + 1 < g.Nk;
      const i64 sa = (b * g.Nk + (va ? j : 0)) * g.C + h * g.D, sb = (b * g.Nk + (vb ? j + 1 : 0)) * g.C + h * g.D;
      for (int e = 0; e < 2; ++e) {  // K: each key's pairs go 16 keys apart ([group][pair][16][2])
        const i64 jj = j + e, src = e ? sb : sa;
        const bool valid = e ? vb : va;
        uint32_t* K = reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(kp) + bh * g.kbh + (jj / 16) * npair * 32) + jj % 16;
        for (i64 d = 0; d < g.Dp32; d += 16) {
          alignas(32) uint32_t pairs[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), bf16_cols(p.k, p.kt, src, d, g.D, valid));
          for (int q = 0; q < 8; ++q) K[(d / 2 + q) * 16] = pairs[q];
        }
      }
      uint16_t* V = static_cast<uint16_t*>(vp) + bh * g.vbh + (j / 2) * g.Dp16 * 2;
      for (i64 d = 0; d < g.Dp16; d += 16) {
        const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_cols(p.v, p.vt, sa, d, g.D, va)),
                                              bf16_cols(p.v, p.vt, sb, d, g.D, vb), 1);
        _mm512_storeu_si512(V + d * 2, _mm512_permutexvar_epi16(inter, ab));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// f32 micro-kernels (AVX-512F). Rows in groups of 4 (the Q/P/O buffers have MQ rows, so a
// partial last group computes harmless rows).

// S[r][j] = Σ_d Q[r][d]·K[j][d] for 4 rows and 16·G keys; K packed [group][D][16].
template <int G>
void qk_f32(const float* Q, i64 D, const float* K, float* S, i64 ldS, i64 rows) {
  for (i64 r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][G];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < G; ++c) acc[r][c] = _mm512_setzero_ps();
    const float* q = Q + r0 * D;
    for (i64 d = 0; d < D; ++d) {
      __m512 kv[G];
      for (int c = 0; c < G; ++c) kv[c] = _mm512_load_ps(K + (c * D + d) * 16);
      for (int r = 0; r < 4; ++r) {
        __m512 qb = _mm512_set1_ps(q[r * D + d]);
        for (int c = 0; c < G; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < G; ++c) _mm512_store_ps(S + (r0 + r) * ldS + c * 16, acc[r][c]);
  }
}

// O[r][c0 + 16c ..] = O·corr[r] + Σ_j P[r][j]·V[j][..] for 4 rows, 16·NC columns, W keys.
template <int NC>
void pv_f32(const float* P, i64 ldP, const float* V, i64 ldV, i64 W, float* O, i64 ldO,
            const float* corr, i64 rows, i64 c0) {
  for (i64 r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][NC];
    for (int r = 0; r < 4; ++r) {
      __m512 cr = _mm512_set1_ps(corr[r0 + r]);
      for (int c = 0; c < NC; ++c)
        acc[r][c] = _mm512_mul_ps(cr, _mm512_load_ps(O + (r0 + r) * ldO + c0 + c * 16));
    }
    const float* pr = P + r0 * ldP;
    for (i64 j = 0; j < W; ++j) {
      __m512 vv[NC];
      for (int c = 0; c < NC; ++c) vv[c] = _mm512_load_ps(V + j * ldV + c0 + c * 16);
      for (int r = 0; r < 4; ++r) {
        __m512 pb = _mm512_set1_ps(pr[r * ldP + j]);
        for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NC; ++c) _mm512_store_ps(O + (r0 + r) * ldO + c0 + c * 16, acc[r][c]);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX512-BF16 micro-kernels: vdpbf16ps multiplies bf16 pairs and adds both products into f32.

// Q: [rows][Dp32] bf16; K: packed groups [npair_stride][16][2]; only the first npair pairs
// (ceil(D/2)) are summed, the rest are zero padding.
template <int G>
void qk_bf16(const uint16_t* Q, i64 ldQ, i64 npair, i64 pstride, const uint16_t* K, float* S,
             i64 ldS, i64 rows) {
  for (i64 r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][G];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < G; ++c) acc[r][c] = _mm512_setzero_ps();
    const uint16_t* q = Q + r0 * ldQ;
    for (i64 pp = 0; pp < npair; ++pp) {
      __m512bh kv[G];
      for (int c = 0; c < G; ++c) kv[c] = (__m512bh)_mm512_load_si512(K + (c * pstride + pp) * 32);
      for (int r = 0; r < 4; ++r) {
        __m512bh qb = (__m512bh)_mm512_set1_epi32(int(ld32(q + r * ldQ + 2 * pp)));
        for (int c = 0; c < G; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < G; ++c) _mm512_store_ps(S + (r0 + r) * ldS + c * 16, acc[r][c]);
  }
}

// P: [rows][ldP] bf16 (keys), V: [key pairs][ldV = Dp16][2] bf16 starting at the block's first pair.
template <int NC>
void pv_bf16(const uint16_t* P, i64 ldP, const uint16_t* V, i64 ldV, i64 W, float* O, i64 ldO,
             const float* corr, i64 rows, i64 c0) {
  for (i64 r0 = 0; r0 < rows; r0 += 4) {
    __m512 acc[4][NC];
    for (int r = 0; r < 4; ++r) {
      __m512 cr = _mm512_set1_ps(corr[r0 + r]);
      for (int c = 0; c < NC; ++c)
        acc[r][c] = _mm512_mul_ps(cr, _mm512_load_ps(O + (r0 + r) * ldO + c0 + c * 16));
    }
    const uint16_t* pr = P + r0 * ldP;
    for (i64 jp = 0; jp < W / 2; ++jp) {
      __m512bh vv[NC];
      for (int c = 0; c < NC; ++c)
        vv[c] = (__m512bh)_mm512_load_si512(V + (jp * ldV + c0 + c * 16) * 2);
      for (int r = 0; r < 4; ++r) {
        __m512bh pb = (__m512bh)_mm512_set1_epi32(int(ld32(pr + r * ldP + 2 * jp)));
        for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NC; ++c) _mm512_store_ps(O + (r0 + r) * ldO + c0 + c * 16, acc[r][c]);
  }
}

// ---------------------------------------------------------------------------------------------
// AMX: 8 tiles, all configured 16 rows × 64 bytes. Tiles 0-3 accumulate (rows 0-15 / 16-31 ×
// column group 0 / 1), 4-5 hold the A operand (rows 0-15 / 16-31), 6-7 the B operand.
// The tile intrinsics stringify their tile number, so each use needs a literal.
struct alignas(64) TileCfg {
  uint8_t palette, start;
  uint8_t rsv[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct HwTiles {
  void begin() {
    TileCfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.rows[t] = 16;
      cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
  }
  void end() { _tile_release(); }
  template <int T> void zero() {
    if constexpr (T == 0) _tile_zero(0);
    else if constexpr (T == 1) _tile_zero(1);
    else if constexpr (T == 2) _tile_zero(2);
    else if constexpr (T == 3) _tile_zero(3);
    else static_assert(T < 4);
  }
  template <int T> void load(const void* p, i64 stride) {
    if constexpr (T == 4) _tile_loadd(4, p, stride);
    else if constexpr (T == 5) _tile_loadd(5, p, stride);
    else if constexpr (T == 6) _tile_loadd(6, p, stride);
    else if constexpr (T == 7) _tile_loadd(7, p, stride);
    else static_assert(T >= 4 && T < 8);
  }
  template <int T> void store(void* p, i64 stride) {
    if constexpr (T == 0) _tile_stored(0, p, stride);
    else if constexpr (T == 1) _tile_stored(1, p, stride);
    else if constexpr (T == 2) _tile_stored(2, p, stride);
    else if constexpr (T == 3) _tile_stored(3, p, stride);
    else static_assert(T < 4);
  }
  template <int Cc, int A, int Bb> void dp() {
    if constexpr (Cc == 0 && A == 4 && Bb == 6) _tile_dpbf16ps(0, 4, 6);
    else if constexpr (Cc == 1 && A == 4 && Bb == 7) _tile_dpbf16ps(1, 4, 7);
    else if constexpr (Cc == 2 && A == 5 && Bb == 6) _tile_dpbf16ps(2, 5, 6);
    else if constexpr (Cc == 3 && A == 5 && Bb == 7) _tile_dpbf16ps(3, 5, 7);
    else static_assert(Cc < 0, "unused tile combination");
  }
};

// Software model of the same tile operations (TDPBF16PS: C[m][n] += Σ_k A[m][2k]·B[k][2n] +
// A[m][2k+1]·B[k][2n+1], f32 accumulation).
struct EmuTiles {
  alignas(64) unsigned char t[8][16 * 64];
  void begin() { memset(t, 0, sizeof t); }
  void end() {}
  template <int T> void zero() { memset(t[T], 0, 16 * 64); }
  template <int T> void load(const void* p, i64 stride) {
    for (int r = 0; r < 16; ++r) memcpy(t[T] + r * 64, static_cast<const char*>(p) + r * stride, 64);
  }
  template <int T> void store(void* p, i64 stride) {
    for (int r = 0; r < 16; ++r) memcpy(static_cast<char*>(p) + r * stride, t[T] + r * 64, 64);
  }
  template <int Cc, int A, int Bb> void dp() {
    float c[16][16];
    uint16_t a[16][32], b[16][32];
    memcpy(c, t[Cc], sizeof c);
    memcpy(a, t[A], sizeof a);
    memcpy(b, t[Bb], sizeof b);
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 16; ++n) {
        float acc = c[m][n];
        for (int k = 0; k < 16; ++k)
          acc += bf2f(a[m][2 * k]) * bf2f(b[k][2 * n]) + bf2f(a[m][2 * k + 1]) * bf2f(b[k][2 * n + 1]);
        c[m][n] = acc;
      }
    memcpy(t[Cc], c, sizeof c);
  }
};

// S[32][W] = Q[32][Dp32] · Kᵀ (K packed per 16-key group as [Dp32/2 pairs][16][2]).
template <class Tl>
void qk_amx(Tl& tl, const uint16_t* Q, i64 Dp32, const uint16_t* K, i64 W, float* S, i64 ldS) {
  const i64 qs = Dp32 * 2, gstride = Dp32 * 16;  // bytes per Q row; elements per key group
  for (i64 kg = 0; kg < W / 32; ++kg) {
    const uint16_t* k0 = K + (2 * kg) * gstride;
    const uint16_t* k1 = k0 + gstride;
    tl.template zero<0>(); tl.template zero<1>(); tl.template zero<2>(); tl.template zero<3>();
    for (i64 ks = 0; ks < Dp32 / 32; ++ks) {
      tl.template load<4>(Q + ks * 32, qs);
      tl.template load<5>(Q + 16 * Dp32 + ks * 32, qs);
      tl.template load<6>(k0 + ks * 16 * 32, 64);
      tl.template load<7>(k1 + ks * 16 * 32, 64);
      tl.template dp<0, 4, 6>(); tl.template dp<1, 4, 7>();
      tl.template dp<2, 5, 6>(); tl.template dp<3, 5, 7>();
    }
    float* s = S + kg * 32;
    tl.template store<0>(s, ldS * 4);
    tl.template store<1>(s + 16, ldS * 4);
    tl.template store<2>(s + 16 * ldS, ldS * 4);
    tl.template store<3>(s + 16 * ldS + 16, ldS * 4);
  }
}

// T[32][Dp16] = P[32][W] (bf16, row stride ldP) · V (packed pairs [W/2][Dp16][2]).
template <class Tl>
void pv_amx(Tl& tl, const uint16_t* P, i64 ldP, const uint16_t* V, i64 Dp16, i64 W, float* T) {
  const i64 nct = Dp16 / 16, vs = Dp16 * 4;  // column tiles; bytes per packed V pair row
  for (i64 c0 = 0; c0 < nct; c0 += 2) {
    const bool two = c0 + 1 < nct;
    tl.template zero<0>(); tl.template zero<1>(); tl.template zero<2>(); tl.template zero<3>();
    for (i64 ks = 0; ks < W / 32; ++ks) {
      tl.template load<4>(P + ks * 32, ldP * 2);
      tl.template load<5>(P + 16 * ldP + ks * 32, ldP * 2);
      const uint16_t* v = V + (ks * 16 * Dp16 + c0 * 16) * 2;
      tl.template load<6>(v, vs);
      tl.template dp<0, 4, 6>(); tl.template dp<2, 5, 6>();
      if (two) {
        tl.template load<7>(v + 32, vs);
        tl.template dp<1, 4, 7>(); tl.template dp<3, 5, 7>();
      }
    }
    float* t = T + c0 * 16;
    tl.template store<0>(t, Dp16 * 4);
    tl.template store<2>(t + 16 * Dp16, Dp16 * 4);
    if (two) {
      tl.template store<1>(t + 16, Dp16 * 4);
      tl.template store<3>(t + 16 * Dp16 + 16, Dp16 * 4);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Online softmax over one key block for rows [0, rows): S in log2 units, nvalid real keys out of
// W (the rest are padding, weight 0). Writes P (f32 or bf16, row stride ldP) and corr, updates
// the running max m and sum l.
template <bool BF>
void softmax_block(const float* S, i64 ldS, i64 rows, i64 nvalid, i64 W, float* m, float* l,
                   float* corr, void* P, i64 ldP) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  for (i64 i = 0; i < rows; ++i) {
    const float* s = S + i * ldS;
    __m512 vmax = ninf;
    for (i64 j = 0; j < nvalid; j += 16)
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(ninf, tail_mask(nvalid - j), s + j));
    const float mnew = fmaxf_(m[i], _mm512_reduce_max_ps(vmax));
    const float c = exp2f(m[i] - mnew);  // m = -inf on the first block: 0
    const __m512 vm = _mm512_set1_ps(mnew);
    __m512 vsum = _mm512_setzero_ps();
    for (i64 j = 0; j < W; j += 16) {
      __m512 e = exp2v<BF ? 4 : 6, false>(_mm512_sub_ps(_mm512_load_ps(s + j), vm));
      if (j + 16 > nvalid) e = _mm512_maskz_mov_ps(tail_mask(nvalid > j ? nvalid - j : 0), e);
      vsum = _mm512_add_ps(vsum, e);
      if (BF)
        _mm256_store_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(P) + i * ldP + j),
                           (__m256i)_mm512_cvtneps_pbh(e));
      else
        _mm512_store_ps(static_cast<float*>(P) + i * ldP + j, e);
    }
    l[i] = l[i] * c + _mm512_reduce_add_ps(vsum);
    m[i] = mnew;
    corr[i] = c;
  }
}

// ---------------------------------------------------------------------------------------------
// The Q block of queries [q0, q0 + mq) of (b, h), scaled by c2 (log2 units) into MQ rows of ldQ
// elements (bf16 for the BF kernels, else f32); rows past mq and columns past D are zero. Vector
// loads and conversions (16 columns at a time): this runs once per block of 32 queries, which for
// cross-attention (77 keys) is as much work as the block's products.
template <bool BF>
void load_q_block(const AttnProblem& p, const Geo& g, i64 b, i64 h, i64 q0, i64 mq, float c2, i64 ldQ, void* Qb) {
  const __m512 vc = _mm512_set1_ps(c2);
  for (i64 i = 0; i < MQ; ++i) {
    const i64 src = (b * g.Nq + q0 + i) * g.C + h * g.D;
    for (i64 d = 0; d < ldQ; d += 16) {
      __m512 x = _mm512_setzero_ps();
      if (i < mq && d < g.D) {
        const __mmask16 k = tail_mask(g.D - d);
        if (p.qt == DType::F32) {
          x = _mm512_maskz_loadu_ps(k, static_cast<const float*>(p.q) + src + d);
        } else {
          const __m256i raw = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p.q) + src + d);
          x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        }
        x = _mm512_mul_ps(x, vc);
      }
      const __mmask16 st = tail_mask(ldQ - d);
      if (BF)
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(Qb) + i * ldQ + d, st, (__m256i)_mm512_cvtneps_pbh(x));
      else
        _mm512_mask_storeu_ps(static_cast<float*>(Qb) + i * ldQ + d, st, x);
    }
  }
}

// One output row: o[dst .. dst + D) = O · inv, in the output's dtype. The f32 kernel may run on a
// CPU without AVX512-BF16: it rounds a bf16 output with the scalar f2bf.
template <bool BF>
void store_o_row(const AttnProblem& p, const Geo& g, const float* O, float inv, i64 dst) {
  const __m512 vi = _mm512_set1_ps(inv);
  if (p.ot == DType::F32) {
    float* out = static_cast<float*>(p.o) + dst;
    for (i64 d = 0; d < g.D; d += 16)
      _mm512_mask_storeu_ps(out + d, tail_mask(g.D - d), _mm512_mul_ps(_mm512_load_ps(O + d), vi));
    return;
  }
  uint16_t* out = static_cast<uint16_t*>(p.o) + dst;
  if (!BF) {
    for (i64 d = 0; d < g.D; ++d) out[d] = f2bf(O[d] * inv);
    return;
  }
  for (i64 d = 0; d < g.D; d += 16)
    _mm256_mask_storeu_epi16(out + d, tail_mask(g.D - d), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(O + d), vi)));
}

// ---------------------------------------------------------------------------------------------
// Everything one call needs, shared by its threads (threads come from attention.cpp, which owns
// all OpenMP use: this file may be built without -fopenmp).
struct State {
  AttnProblem p;
  int mode;
  Geo g;
  Buf kp, vp, scratch;
  i64 ldQ, szQ, szS, szP, szO, szE, per;
  i64 nqb, tasks;
};

template <int M> constexpr i64 esz_of = M == kF32 ? 4 : 2;

template <int M>
bool init(State& st) {
  constexpr bool BF = M != kF32;
  constexpr i64 NB = kNB<M>, esz = esz_of<M>;
  const AttnProblem& p = st.p;
  Geo& g = st.g;
  g.B = p.B; g.Nq = p.Nq; g.Nk = p.Nk; g.H = p.H; g.D = p.D; g.C = p.H * p.D;
  g.NkP = rup(g.Nk, 32);
  g.Dp16 = rup(g.D, 16);
  g.Dp32 = rup(g.D, 32);
  g.kbh = BF ? g.NkP * g.Dp32 : g.NkP * g.D;
  g.vbh = g.NkP * g.Dp16;
  const int T = p.threads > 0 ? p.threads : 1;
  // Per-thread scratch: Q block, S, P, O accumulator, AMX partial product, m / l / corr, tiles.
  st.ldQ = BF ? g.Dp32 : g.D;
  st.szQ = rup(MQ * st.ldQ * esz, 64);
  st.szS = MQ * NB * 4;
  st.szP = MQ * NB * esz;
  st.szO = MQ * g.Dp16 * 4;
  st.szE = M == kAmxEmu ? rup(i64(sizeof(EmuTiles)), 64) : 0;
  st.per = st.szQ + st.szS + st.szP + 2 * st.szO + rup(3 * MQ * 4, 64) + st.szE;
  st.nqb = (g.Nq + MQ - 1) / MQ;
  st.tasks = g.B * g.H * st.nqb;
  return st.kp.alloc(size_t(g.B * g.H * g.kbh * esz)) && st.vp.alloc(size_t(g.B * g.H * g.vbh * esz)) &&
         st.scratch.alloc(size_t(st.per * T));
}

template <int M>
void run_thread(const State& st, int tid, int nth) {
  constexpr bool BF = M != kF32;
  constexpr i64 NB = kNB<M>, esz = esz_of<M>;
  const AttnProblem& p = st.p;
  const Geo& g = st.g;
  const i64 ldQ = st.ldQ, szO = st.szO, nqb = st.nqb;
  const float c2 = p.scale * 1.4426950408889634f;  // scores in log2 units
  {
    char* base = st.scratch.as<char>() + st.per * tid;
    void* Qb = base;
    float* S = reinterpret_cast<float*>(base + st.szQ);
    void* Pb = base + st.szQ + st.szS;
    float* O = reinterpret_cast<float*>(base + st.szQ + st.szS + st.szP);
    float* Ot = O + MQ * g.Dp16;
    float* m = Ot + MQ * g.Dp16;
    float* l = m + MQ;
    float* corr = l + MQ;
    [[maybe_unused]] HwTiles hw;
    [[maybe_unused]] EmuTiles* emu = reinterpret_cast<EmuTiles*>(base + st.per - st.szE);
    if constexpr (M == kAmx) hw.begin();
    if constexpr (M == kAmxEmu) emu->begin();

    for (i64 t = st.tasks * tid / nth; t < st.tasks * (tid + 1) / nth; ++t) {
      const i64 bh = t / nqb, b = bh / g.H, h = bh % g.H;
      const i64 q0 = (t % nqb) * MQ, mq = imin(MQ, g.Nq - q0);
      const i64 rows4 = rup(mq, 4);
      load_q_block<BF>(p, g, b, h, q0, mq, c2, ldQ, Qb);
      for (i64 i = 0; i < MQ; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
        corr[i] = 0.f;
      }
      memset(O, 0, size_t(szO));
      const char* kb = static_cast<const char*>(st.kp.p) + bh * g.kbh * esz;
      const char* vb = static_cast<const char*>(st.vp.p) + bh * g.vbh * esz;

      for (i64 j0 = 0; j0 < g.NkP; j0 += NB) {
        const i64 W = imin(NB, g.NkP - j0), nvalid = imin(W, g.Nk - j0);
        // --- S = Q·Kᵀ
        if constexpr (M == kF32) {
          const float* K = reinterpret_cast<const float*>(kb) + (j0 / 16) * g.D * 16;
          i64 j = 0;
          for (; j + 64 <= W; j += 64) qk_f32<4>(static_cast<float*>(Qb), g.D, K + j * g.D, S + j, NB, rows4);
          if (j < W) qk_f32<2>(static_cast<float*>(Qb), g.D, K + j * g.D, S + j, NB, rows4);
        } else if constexpr (M == kBf16) {
          const uint16_t* K = reinterpret_cast<const uint16_t*>(kb) + (j0 / 16) * g.Dp32 * 16;
          const i64 npair = (g.D + 1) / 2, ps = g.Dp32 / 2;
          i64 j = 0;
          for (; j + 64 <= W; j += 64)
            qk_bf16<4>(static_cast<uint16_t*>(Qb), ldQ, npair, ps, K + j * g.Dp32, S + j, NB, rows4);
          if (j < W) qk_bf16<2>(static_cast<uint16_t*>(Qb), ldQ, npair, ps, K + j * g.Dp32, S + j, NB, rows4);
        } else {
          const uint16_t* K = reinterpret_cast<const uint16_t*>(kb) + (j0 / 16) * g.Dp32 * 16;
          if constexpr (M == kAmx) qk_amx(hw, static_cast<uint16_t*>(Qb), g.Dp32, K, W, S, NB);
          else qk_amx(*emu, static_cast<uint16_t*>(Qb), g.Dp32, K, W, S, NB);
        }
        // --- online softmax
        softmax_block<BF>(S, NB, mq, nvalid, W, m, l, corr, Pb, NB);
        // --- O = O·corr + P·V
        if constexpr (M == kF32 || M == kBf16) {
          for (i64 c0 = 0; c0 < g.Dp16; c0 += 64) {
            const i64 nc = imin(4, (g.Dp16 - c0) / 16);
            if constexpr (M == kF32) {
              const float* V = reinterpret_cast<const float*>(vb) + j0 * g.Dp16;
              const float* P = static_cast<const float*>(Pb);
              switch (nc) {
                case 4: pv_f32<4>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
                case 3: pv_f32<3>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
                case 2: pv_f32<2>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
                default: pv_f32<1>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
              }
            } else {
              const uint16_t* V = reinterpret_cast<const uint16_t*>(vb) + j0 * g.Dp16;
              const uint16_t* P = static_cast<const uint16_t*>(Pb);
              switch (nc) {
                case 4: pv_bf16<4>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
                case 3: pv_bf16<3>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
                case 2: pv_bf16<2>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
                default: pv_bf16<1>(P, NB, V, g.Dp16, W, O, g.Dp16, corr, rows4, c0); break;
              }
            }
          }
        } else {
          const uint16_t* V = reinterpret_cast<const uint16_t*>(vb) + j0 * g.Dp16;
          if constexpr (M == kAmx) pv_amx(hw, static_cast<const uint16_t*>(Pb), NB, V, g.Dp16, W, Ot);
          else pv_amx(*emu, static_cast<const uint16_t*>(Pb), NB, V, g.Dp16, W, Ot);
          for (i64 i = 0; i < rows4; ++i) {
            const __m512 cr = _mm512_set1_ps(corr[i]);
            for (i64 d = 0; d < g.Dp16; d += 16) {
              float* o = O + i * g.Dp16 + d;
              _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o), cr, _mm512_load_ps(Ot + i * g.Dp16 + d)));
            }
          }
        }
      }
      // --- o = O / l
      for (i64 i = 0; i < mq; ++i) store_o_row<BF>(p, g, O + i * g.Dp16, 1.f / l[i], (b * g.Nq + q0 + i) * g.C + h * g.D);
    }
    if constexpr (M == kAmx) hw.end();
  }
}

template <int M>
void pack_thread(const State& st, int tid, int nth) {
  pack_kv<M != kF32>(st.p, st.g, st.kp.p, st.vp.p, tid, nth);
}

}  // namespace

int attn_begin(AttnCall& call, const AttnProblem& p, AttnKernel kernel) {
  State* st = new (std::nothrow) State();
  if (!st) return 1;
  st->p = p;
  st->mode = int(kernel);
  bool ok = false;
  switch (kernel) {
    case AttnKernel::F32Avx512: ok = init<kF32>(*st); break;
    case AttnKernel::Bf16Avx512: ok = init<kBf16>(*st); break;
    case AttnKernel::Bf16Amx: ok = init<kAmx>(*st); break;
    case AttnKernel::Bf16AmxEmulated: ok = init<kAmxEmu>(*st); break;
  }
  call.state = st;
  return ok ? 0 : 1;
}

void attn_pack(const AttnCall& call, int tid, int nth) {
  const State& st = *static_cast<const State*>(call.state);
  switch (st.mode) {
    case kF32: pack_thread<kF32>(st, tid, nth); break;
    case kBf16: pack_thread<kBf16>(st, tid, nth); break;
    case kAmx: pack_thread<kAmx>(st, tid, nth); break;
    default: pack_thread<kAmxEmu>(st, tid, nth); break;
  }
}

void attn_compute(const AttnCall& call, int tid, int nth) {
  const State& st = *static_cast<const State*>(call.state);
  switch (st.mode) {
    case kF32: run_thread<kF32>(st, tid, nth); break;
    case kBf16: run_thread<kBf16>(st, tid, nth); break;
    case kAmx: run_thread<kAmx>(st, tid, nth); break;
    default: run_thread<kAmxEmu>(st, tid, nth); break;
  }
}

void attn_end(AttnCall& call) {
  delete static_cast<State*>(call.state);
  call.state = nullptr;
}

void exp2_avx512(const float* x, float* y, int64_t n, int degree) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 k = tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    _mm512_mask_storeu_ps(y + i, k, degree <= 4 ? exp2v<4, true>(v) : exp2v<6, true>(v));
  }
}

}  // namespace diffuse::cpu::detail
