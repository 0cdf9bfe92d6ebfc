// Fused attention: validation, run-time dispatch, and the baseline x86-64 (f32) kernel. The
// AVX-512 / AVX512-BF16 / AMX kernels live in attention_amx.cpp, the AVX2 one in
// attention_avx2.cpp (each with its own compile flags).
#include "backend/cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/threads.h"

namespace diffuse::cpu {
namespace {

std::atomic<const char*> g_bf16_path{"none"};
std::atomic<const char*> g_f32_path{"none"};
std::atomic<unsigned> g_disabled{0};
constexpr unsigned bit(AttnImpl impl) { return 1u << unsigned(impl); }

bool is_f32_or_bf16(DType t) { return t == DType::F32 || t == DType::BF16; }

detail::AttnProblem make_problem(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                                 int heads, float scale, Tensor& o) {
  auto shapes = [&] {
    return cat(" (", fn, ": q ", q.defined() ? q.str() : "undefined", ", k ",
               k.defined() ? k.str() : "undefined", ", v ", v.defined() ? v.str() : "undefined", ", o ",
               o.defined() ? o.str() : "undefined", ", heads ", heads, ")");
  };
  DF_CHECK(q.defined() && k.defined() && v.defined() && o.defined(), "attention: undefined tensor", shapes());
  DF_CHECK(q.rank() == 3 && k.rank() == 3 && v.rank() == 3 && o.rank() == 3,
           "attention: q, k, v and o must be [B, N, H*D]", shapes());
  DF_CHECK(k.shape() == v.shape(), "attention: k and v shapes differ", shapes());
  DF_CHECK(q.dim(0) == k.dim(0) && q.dim(2) == k.dim(2), "attention: q and k disagree on batch or channels",
           shapes());
  DF_CHECK(o.shape() == q.shape(), "attention: o must have the shape of q", shapes());
  DF_CHECK(heads >= 1 && q.dim(2) % heads == 0 && q.dim(2) > 0,
           "attention: channels not divisible by heads", shapes());
  DF_CHECK(is_f32_or_bf16(q.dtype()) && is_f32_or_bf16(k.dtype()) && is_f32_or_bf16(v.dtype()) &&
               is_f32_or_bf16(o.dtype()),
           "attention: dtypes must be f32 or bf16", shapes());
  DF_CHECK(k.dim(1) >= 1 || q.dim(1) == 0 || q.dim(0) == 0, "attention: no keys", shapes());
  DF_CHECK(std::isfinite(scale), "attention: scale must be finite", shapes());
  detail::AttnProblem p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.o = o.data();
  p.qt = q.dtype();
  p.kt = k.dtype();
  p.vt = v.dtype();
  p.ot = o.dtype();
  p.B = q.dim(0);
  p.Nq = q.dim(1);
  p.Nk = k.dim(1);
  p.H = heads;
  p.D = q.dim(2) / heads;
  p.scale = scale;
  p.threads = std::max(1, num_threads());
  return p;
}

bool empty(const detail::AttnProblem& p) { return p.B == 0 || p.Nq == 0; }

bool has_avx2() {
  const auto& f = cpu_features();
  return f.avx2 && f.fma;
}
bool has_avx512() {
  const auto& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512vl && f.fma && f.f16c;
}
bool has_avx512bf16() { return has_avx512() && cpu_features().avx512_bf16; }
bool has_amx() {
  const auto& f = cpu_features();
  return has_avx512bf16() && f.amx_tile && f.amx_bf16 && enable_amx();
}

// Runs one of the attention_amx.cpp kernels on an OpenMP team (that file has no OpenMP itself).
void run_simd(const detail::AttnProblem& p, detail::AttnKernel kernel) {
  detail::AttnCall call;
  struct End {
    detail::AttnCall& c;
    ~End() { detail::attn_end(c); }
  } end{call};
  DF_CHECK(detail::attn_begin(call, p, kernel) == 0, "attention: out of memory for packed k/v and scratch (B ",
           p.B, ", Nq ", p.Nq, ", Nk ", p.Nk, ", H ", p.H, ", D ", p.D, ")");
#pragma omp parallel num_threads(p.threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    detail::attn_pack(call, tid, nth);
#pragma omp barrier
    detail::attn_compute(call, tid, nth);
  }
}

// Runs the attention_avx2.cpp kernel: K/V packed per (batch, head), then the query blocks, on an
// OpenMP team (that file has no OpenMP itself). Buffers are 64-byte aligned (the kernel's aligned
// vector loads).
void run_avx2(const detail::AttnProblem& p) {
  struct Free {
    void operator()(float* f) const { std::free(f); }
  };
  auto aligned = [&](int64_t floats) {
    const size_t bytes = (size_t(floats) * sizeof(float) + 63) / 64 * 64;
    float* f = static_cast<float*>(std::aligned_alloc(64, bytes));
    DF_CHECK(f, "attention: out of memory for packed k/v and scratch (B ", p.B, ", Nq ", p.Nq, ", Nk ", p.Nk,
             ", H ", p.H, ", D ", p.D, ")");
    return std::unique_ptr<float[], Free>(f);
  };
  const int64_t per = (detail::attn_avx2_scratch_floats(p) + 15) / 16 * 16;
  auto packed = aligned(detail::attn_avx2_packed_floats(p));
  auto scratch = aligned(per * p.threads);
  const int64_t pairs = p.B * p.H, tasks = detail::attn_avx2_tasks(p);
#pragma omp parallel num_threads(p.threads)
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < pairs; ++bh) detail::attn_avx2_pack(p, packed.get(), bh);
    float* mine = scratch.get() + per * omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) detail::attn_avx2_compute(p, packed.get(), mine, t);
  }
}

// 2^x for x <= 0 in plain float arithmetic that the compiler vectorises (baseline SSE2):
// n = round(x) by the 1.5·2^23 trick, 2^(x-n) by its degree-6 Taylor series in (x-n)·ln2
// (< 2.4e-7 relative), 2^n by building the exponent bits, clamped at 2^-126 (a weight of 1e-38
// instead of 0: invisible next to the row maximum's weight of 1). The clamp is on the integer
// exponent because a float compare-select keeps GCC from vectorising the loop. x must be finite
// with |x| < 2^22 (x is a difference of two scores in log2 units).
inline float exp2_poly(float x) {
  const float n = (x + 12582912.f) - 12582912.f;
  const float f = x - n;
  float p = 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  int32_t e = int32_t(n) + 127;
  e = e < 1 ? 1 : e;
  return p * std::bit_cast<float>(e << 23);
}

inline float load_elem(const void* base, DType t, int64_t i) {
  return t == DType::F32 ? static_cast<const float*>(base)[i] : bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
}

// Runs `impl` (already checked available) on a validated problem.
void run_impl(AttnImpl impl, const detail::AttnProblem& p) {
  if (empty(p)) return;
  switch (impl) {
    case AttnImpl::Portable: detail::attn_f32_portable(p); break;
    case AttnImpl::Avx512: run_simd(p, detail::AttnKernel::F32Avx512); break;
    case AttnImpl::Avx512Bf16: run_simd(p, detail::AttnKernel::Bf16Avx512); break;
    case AttnImpl::Amx: run_simd(p, detail::AttnKernel::Bf16Amx); break;
    case AttnImpl::AmxEmulated: run_simd(p, detail::AttnKernel::Bf16AmxEmulated); break;
    case AttnImpl::Avx2: run_avx2(p); break;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Baseline kernel: per (batch, head, block of MQ queries) and block of NB keys, S = Q·Kᵀ with Kᵀ
// packed so the inner loop runs along keys, online softmax in log2 units (q is pre-multiplied by
// scale·log2 e), O = O·corr + P·V with the inner loop along the head dimension. All inner loops
// are simple enough to auto-vectorise.
void detail::attn_f32_portable(const AttnProblem& p) {
  constexpr int64_t MQ = 32, NB = 128;
  const int64_t D = p.D, C = p.H * p.D;
  const int64_t nqb = (p.Nq + MQ - 1) / MQ, tasks = p.B * p.H * nqb;
  const int T = p.threads;
  const float c2 = p.scale * 1.4426950408889634f;
  const int64_t per = MQ * D + D * NB + NB * D + MQ * NB + MQ * D + 2 * MQ;
  std::vector<float> scratch(size_t(per * T));
#pragma omp parallel num_threads(T)
  {
    float* Q = scratch.data() + per * omp_get_thread_num();
    float* KT = Q + MQ * D;  // [D][NB]
    float* V = KT + D * NB;  // [NB][D]
    float* S = V + NB * D;   // [MQ][NB]
    float* O = S + MQ * NB;  // [MQ][D]
    float* m = O + MQ * D;
    float* l = m + MQ;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / nqb, b = bh / p.H, h = bh % p.H;
      const int64_t q0 = (t % nqb) * MQ, mq = std::min(MQ, p.Nq - q0);
      for (int64_t i = 0; i < mq; ++i) {
        const int64_t src = (b * p.Nq + q0 + i) * C + h * D;
        for (int64_t d = 0; d < D; ++d) Q[i * D + d] = load_elem(p.q, p.qt, src + d) * c2;
        m[i] = -std::numeric_limits<float>::infinity();
        l[i] = 0.f;
      }
      std::fill(O, O + MQ * D, 0.f);
      for (int64_t j0 = 0; j0 < p.Nk; j0 += NB) {
        const int64_t nb = std::min(NB, p.Nk - j0);
        for (int64_t j = 0; j < nb; ++j) {
          const int64_t src = (b * p.Nk + j0 + j) * C + h * D;
          for (int64_t d = 0; d < D; ++d) {
            KT[d * NB + j] = load_elem(p.k, p.kt, src + d);
            V[j * D + d] = load_elem(p.v, p.vt, src + d);
          }
        }
        for (int64_t i = 0; i < mq; ++i) {
          float* s = S + i * NB;
          std::fill(s, s + nb, 0.f);
          for (int64_t d = 0; d < D; ++d) {
            const float qd = Q[i * D + d];
            const float* kt = KT + d * NB;
            for (int64_t j = 0; j < nb; ++j) s[j] += qd * kt[j];
          }
          float mb = m[i];
          for (int64_t j = 0; j < nb; ++j) mb = std::max(mb, s[j]);
          const float corr = std::exp2(m[i] - mb);  // 0 on the first block (m = -inf)
          for (int64_t j = 0; j < nb; ++j) s[j] = exp2_poly(s[j] - mb);
          float part[8] = {};
          int64_t j = 0;
          for (; j + 8 <= nb; j += 8)
            for (int u = 0; u < 8; ++u) part[u] += s[j + u];
          float sum = 0.f;
          for (; j < nb; ++j) sum += s[j];
          for (float x : part) sum += x;
          l[i] = l[i] * corr + sum;
          m[i] = mb;
          float* o = O + i * D;
          for (int64_t d = 0; d < D; ++d) o[d] *= corr;
          for (int64_t j = 0; j < nb; ++j) {
            const float pj = s[j];
            const float* vj = V + j * D;
            for (int64_t d = 0; d < D; ++d) o[d] += pj * vj[d];
          }
        }
      }
      for (int64_t i = 0; i < mq; ++i) {
        const float inv = 1.f / l[i];
        const int64_t dst = (b * p.Nq + q0 + i) * C + h * D;
        for (int64_t d = 0; d < D; ++d) {
          const float x = O[i * D + d] * inv;
          if (p.ot == DType::F32) static_cast<float*>(p.o)[dst + d] = x;
          else static_cast<uint16_t*>(p.o)[dst + d] = f32_to_bf16(x);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
const char* attn_impl_name(AttnImpl impl) {
  switch (impl) {
    case AttnImpl::Portable: return "portable";
    case AttnImpl::Avx512: return "avx512";
    case AttnImpl::Avx512Bf16: return "avx512bf16";
    case AttnImpl::Amx: return "amx";
    case AttnImpl::AmxEmulated: return "amx-emulated";
    case AttnImpl::Avx2: return "avx2";
  }
  return "?";
}

void set_attn_impls_disabled(unsigned mask) {
  constexpr unsigned all = bit(AttnImpl::Avx2) * 2 - 1;  // Avx2: the last enumerator
  DF_CHECK((mask & ~all) == 0, "attention: implementation mask ", mask, " has bits beyond the ",
           std::bit_width(all), " implementations");
  DF_CHECK(!(mask & bit(AttnImpl::Portable)), "attention: the portable implementation cannot be disabled");
  g_disabled = mask;
}

unsigned attn_impls_disabled() { return g_disabled.load(); }

bool attn_impl_available(AttnImpl impl) {
  if (g_disabled.load() & bit(impl)) return false;
  switch (impl) {
    case AttnImpl::Portable: return true;
    case AttnImpl::Avx512: return has_avx512();
    case AttnImpl::Avx512Bf16: return has_avx512bf16();
    case AttnImpl::Amx: return has_amx();
    case AttnImpl::AmxEmulated: return has_avx512bf16();
    case AttnImpl::Avx2: return has_avx2();
  }
  return false;
}

void attention_with(AttnImpl impl, const Tensor& q, const Tensor& k, const Tensor& v, int heads,
                    float scale, Tensor& o) {
  auto p = make_problem("attention_with", q, k, v, heads, scale, o);
  DF_CHECK(!(attn_impls_disabled() & bit(impl)), "attention: implementation ", attn_impl_name(impl),
           " is disabled (set_attn_impls_disabled mask ", attn_impls_disabled(), ")");
  DF_CHECK(attn_impl_available(impl), "attention: implementation ", attn_impl_name(impl),
           " is not available on this CPU (", cpu_features().str(), ")");
  run_impl(impl, p);
}

void attention_f32(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o) {
  auto p = make_problem("attention_f32", q, k, v, heads, scale, o);
  const AttnImpl impl = attn_impl_available(AttnImpl::Avx512) ? AttnImpl::Avx512
                        : attn_impl_available(AttnImpl::Avx2) ? AttnImpl::Avx2
                                                               : AttnImpl::Portable;
  g_f32_path = attn_impl_name(impl);
  run_impl(impl, p);
}

void attention_bf16(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o) {
  auto p = make_problem("attention_bf16", q, k, v, heads, scale, o);
  for (AttnImpl impl : {AttnImpl::Amx, AttnImpl::Avx512Bf16}) {
    if (!attn_impl_available(impl)) continue;
    g_bf16_path = attn_impl_name(impl);
    run_impl(impl, p);
    return;
  }
  g_bf16_path = "f32-fallback";
  attention_f32(q, k, v, heads, scale, o);
}

const char* attention_bf16_path() { return g_bf16_path.load(); }
const char* attention_f32_path() { return g_f32_path.load(); }

}  // namespace diffuse::cpu
