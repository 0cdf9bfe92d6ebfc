// Fused backward of multi-head attention (f32), flash-attention style: the scores of one block of
// MQ queries against one block of NB keys are recomputed when needed, so memory is O(N·D) plus
// small per-thread blocks; the Nq×Nk score matrix is never materialised.
//
// Per (batch, head), with S = scale·q·kᵀ, P = softmax_rows(S), o = P·v and dO = dL/do:
//   D_i = Σ_d dO[i,d]·o[i,d]               (= Σ_j P_ij·dP_ij)
//   dv  = Pᵀ·dO,   dP = dO·vᵀ,   dS = P∘(dP − D_i),   dq = scale·dS·k,   dk = scale·dSᵀ·q.
// Per query block, pass 1 runs over the key blocks to get each row's log-sum-exp (online
// softmax: running max m and sum l of exp(s − m)); pass 2 runs over them again and forms P
// exactly as exp(S − lse). dk/dv of a (batch, head) accumulate over all query blocks, so a
// (batch, head) pair is the unit of work of one thread and they accumulate in place in dk/dv.
#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <cstdlib>

#include "backend/cpu/attention.h"
#include "core/error.h"
#include "backend/cpu/kernels.h"
#include "core/threads.h"

namespace diffuse::cpu {
namespace {

constexpr int64_t MQ = 64;  // query rows per block
constexpr int64_t NB = 64;  // keys per block

struct BwdArgs {
  const float *Q, *K, *V, *O, *dO;
  float *dQ, *dK, *dV;
  int64_t B, Nq, Nk, H, C, D;
  float scale;
  int threads;
};

bool overlaps(const Tensor& a, const Tensor& b) {
  const auto* pa = static_cast<const char*>(a.data());
  const auto* pb = static_cast<const char*>(b.data());
  return pa < pb + b.bytes() && pb < pa + a.bytes();
}

// The kernel (attention_backward_body.h), compiled three times: for the x86-64 baseline, AVX2 and
// AVX-512 (its softmax loops; without contraction into FMAs, so all round alike); kernel_isa()
// picks one at run time.
namespace baseline {
#include "backend/cpu/attention_backward_body.h"
}  // namespace baseline

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2")
#pragma GCC optimize("fp-contract=off")
#endif
namespace avx2 {
#include "backend/cpu/attention_backward_body.h"
}  // namespace avx2
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,prefer-vector-width=512")
#pragma GCC optimize("fp-contract=off")
#endif
namespace avx512 {
#include "backend/cpu/attention_backward_body.h"
}  // namespace avx512
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace

void attention_backward_f32(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& d_o,
                            int heads, float scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Tensor* ins[] = {&q, &k, &v, &o, &d_o};
  const Tensor* outs[] = {&dq, &dk, &dv};
  auto shapes = [&] {
    auto s = [](const Tensor& t) { return t.defined() ? t.str() : std::string("undefined"); };
    return cat(" (attention_backward: q ", s(q), ", k ", s(k), ", v ", s(v), ", o ", s(o), ", d_o ", s(d_o),
               ", dq ", s(dq), ", dk ", s(dk), ", dv ", s(dv), ", heads ", heads, ")");
  };
  for (const Tensor* t : ins) DF_CHECK(t->defined(), "attention_backward: undefined tensor", shapes());
  for (const Tensor* t : outs) DF_CHECK(t->defined(), "attention_backward: undefined tensor", shapes());
  for (const Tensor* t : ins)
    DF_CHECK(t->rank() == 3 && t->dtype() == DType::F32, "attention_backward: tensors must be f32 [B, N, H*D]",
             shapes());
  for (const Tensor* t : outs)
    DF_CHECK(t->rank() == 3 && t->dtype() == DType::F32, "attention_backward: tensors must be f32 [B, N, H*D]",
             shapes());
  DF_CHECK(k.shape() == v.shape() && dk.shape() == k.shape() && dv.shape() == k.shape(),
           "attention_backward: k, v, dk and dv must have one shape", shapes());
  DF_CHECK(o.shape() == q.shape() && d_o.shape() == q.shape() && dq.shape() == q.shape(),
           "attention_backward: q, o, d_o and dq must have one shape", shapes());
  DF_CHECK(q.dim(0) == k.dim(0) && q.dim(2) == k.dim(2),
           "attention_backward: q and k disagree on batch or channels", shapes());
  DF_CHECK(heads >= 1 && q.dim(2) > 0 && q.dim(2) % heads == 0,
           "attention_backward: channels not divisible by heads", shapes());
  DF_CHECK(k.dim(1) >= 1 || q.dim(1) == 0 || q.dim(0) == 0, "attention_backward: no keys", shapes());
  DF_CHECK(std::isfinite(scale), "attention_backward: scale must be finite", shapes());
  for (int a = 0; a < 3; ++a) {
    for (const Tensor* u : ins)
      DF_CHECK(!overlaps(*outs[a], *u), "attention_backward: an output overlaps an input", shapes());
    for (int b = a + 1; b < 3; ++b)
      DF_CHECK(!overlaps(*outs[a], *outs[b]), "attention_backward: outputs overlap", shapes());
  }

  const int64_t B = q.dim(0), Nq = q.dim(1), Nk = k.dim(1), H = heads, C = q.dim(2), D = C / heads;
  if (B == 0 || Nq == 0 || Nk == 0) {  // no queries: the keys get no gradient
    for (int64_t e = 0; e < dk.numel(); ++e) dk.f32()[e] = 0.f, dv.f32()[e] = 0.f;
    return;
  }
  const int T = int(std::max<int64_t>(1, std::min<int64_t>(num_threads(), B * H)));
  const BwdArgs a{q.f32(), k.f32(), v.f32(), o.f32(), d_o.f32(), dq.f32(), dk.f32(), dv.f32(), B, Nq, Nk, H, C, D, scale, T};
  const KernelIsa isa = kernel_isa();
  const bool ok = isa == KernelIsa::Avx512 ? avx512::run(a) : isa == KernelIsa::Avx2 ? avx2::run(a) : baseline::run(a);
  DF_CHECK(ok, "attention_backward: oneDNN's sgemm failed", shapes());
}

}  // namespace diffuse::cpu
