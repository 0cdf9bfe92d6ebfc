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
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend/cpu/attention.h"
#include "core/error.h"
#include "core/threads.h"

namespace diffuse::cpu {
namespace {

constexpr int64_t MQ = 64;  // query rows per block
constexpr int64_t NB = 64;  // keys per block

// out[i*NB + j] = Σ_d a[i*D + d]·bt[d*NB + j] for i < m, j < n (bt is the transposed right
// operand, row stride NB). The inner loop runs along j (contiguous), and every output is summed
// in the order d = 0, 1, ... from 0, so a dot product formed here equals the same dot product
// summed by a plain loop bit for bit (that keeps dS exactly 0 when there is a single key).
void gemm_abt(const float* a, int64_t m, int64_t D, const float* bt, int64_t n, float* out) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = out + i * NB;
    std::fill(row, row + n, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const float ad = a[i * D + d];
      const float* b = bt + d * NB;
      for (int64_t j = 0; j < n; ++j) row[j] += ad * b[j];
    }
  }
}

bool overlaps(const Tensor& a, const Tensor& b) {
  const auto* pa = static_cast<const char*>(a.data());
  const auto* pb = static_cast<const char*>(b.data());
  return pa < pb + b.bytes() && pb < pa + a.bytes();
}

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
  const float* Q = q.f32();
  const float* K = k.f32();
  const float* V = v.f32();
  const float* O = o.f32();
  const float* dO = d_o.f32();
  float* dQ = dq.f32();
  float* dK = dk.f32();
  float* dV = dv.f32();
  if (B == 0 || Nq == 0 || Nk == 0) {  // no queries: the keys get no gradient
    std::fill(dK, dK + dk.numel(), 0.f);
    std::fill(dV, dV + dv.numel(), 0.f);
    return;
  }

  const int T = int(std::max<int64_t>(1, std::min<int64_t>(num_threads(), B * H)));
#pragma omp parallel num_threads(T)
  {
    // Per-thread blocks: queries (pre-scaled) and dO of the query block, its dq accumulator,
    // its lse and D_i; k (row-major and transposed) and vᵀ of the key block; S/P and dP/dS.
    std::vector<float> qs(MQ * D), dob(MQ * D), dqb(MQ * D), lse(MQ), di(MQ), m(MQ), l(MQ);
    std::vector<float> kb(NB * D), kt(D * NB), vt(D * NB), s(MQ * NB), dp(MQ * NB);

    auto pack_keys = [&](int64_t b, int64_t h, int64_t j0, int64_t nb, bool all) {
      for (int64_t j = 0; j < nb; ++j) {
        const float* kr = K + (b * Nk + j0 + j) * C + h * D;
        const float* vr = V + (b * Nk + j0 + j) * C + h * D;
        for (int64_t d = 0; d < D; ++d) kt[d * NB + j] = kr[d];
        if (!all) continue;
        for (int64_t d = 0; d < D; ++d) kb[j * D + d] = kr[d];
        for (int64_t d = 0; d < D; ++d) vt[d * NB + j] = vr[d];
      }
    };

#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t j = 0; j < Nk; ++j) {
        std::fill_n(dK + (b * Nk + j) * C + h * D, D, 0.f);
        std::fill_n(dV + (b * Nk + j) * C + h * D, D, 0.f);
      }
      for (int64_t q0 = 0; q0 < Nq; q0 += MQ) {
        const int64_t mq = std::min(MQ, Nq - q0);
        for (int64_t i = 0; i < mq; ++i) {
          const int64_t row = (b * Nq + q0 + i) * C + h * D;
          float acc = 0.f;  // D_i, summed in the order gemm_abt sums dP
          for (int64_t d = 0; d < D; ++d) {
            qs[i * D + d] = Q[row + d] * scale;
            dob[i * D + d] = dO[row + d];
            acc += dO[row + d] * O[row + d];
          }
          di[i] = acc;
          m[i] = -std::numeric_limits<float>::infinity();
          l[i] = 0.f;
        }

        // Pass 1: lse_i = m_i + log l_i over all keys (online softmax).
        for (int64_t j0 = 0; j0 < Nk; j0 += NB) {
          const int64_t nb = std::min(NB, Nk - j0);
          pack_keys(b, h, j0, nb, false);
          gemm_abt(qs.data(), mq, D, kt.data(), nb, s.data());
          for (int64_t i = 0; i < mq; ++i) {
            const float* si = s.data() + i * NB;
            float mb = m[i];
            for (int64_t j = 0; j < nb; ++j) mb = std::max(mb, si[j]);
            float sum = 0.f;
            for (int64_t j = 0; j < nb; ++j) sum += std::exp(si[j] - mb);
            l[i] = l[i] * std::exp(m[i] - mb) + sum;  // exp(-inf) = 0 on the first block
            m[i] = mb;
          }
        }
        for (int64_t i = 0; i < mq; ++i) lse[i] = m[i] + std::log(l[i]);

        // Pass 2: P, then the gradients of this (query block, key block) pair.
        std::fill(dqb.begin(), dqb.end(), 0.f);
        for (int64_t j0 = 0; j0 < Nk; j0 += NB) {
          const int64_t nb = std::min(NB, Nk - j0);
          pack_keys(b, h, j0, nb, true);
          gemm_abt(qs.data(), mq, D, kt.data(), nb, s.data());  // bit-identical to pass 1
          for (int64_t i = 0; i < mq; ++i) {
            float* pi = s.data() + i * NB;
            for (int64_t j = 0; j < nb; ++j) pi[j] = std::exp(pi[j] - lse[i]);
          }
          gemm_abt(dob.data(), mq, D, vt.data(), nb, dp.data());  // dP = dO·vᵀ
          for (int64_t i = 0; i < mq; ++i) {  // dS = P∘(dP − D_i), in place of dP
            const float* pi = s.data() + i * NB;
            float* dsi = dp.data() + i * NB;
            for (int64_t j = 0; j < nb; ++j) dsi[j] = pi[j] * (dsi[j] - di[i]);
          }
          // dv_j += Σ_i P_ij·dO_i and dk_j += Σ_i dS_ij·(scale·q_i): one key row stays hot.
          for (int64_t j = 0; j < nb; ++j) {
            float* dvr = dV + (b * Nk + j0 + j) * C + h * D;
            float* dkr = dK + (b * Nk + j0 + j) * C + h * D;
            for (int64_t i = 0; i < mq; ++i) {
              const float p = s[i * NB + j], ds = dp[i * NB + j];
              const float* doi = dob.data() + i * D;
              const float* qi = qs.data() + i * D;
              for (int64_t d = 0; d < D; ++d) dvr[d] += p * doi[d];
              for (int64_t d = 0; d < D; ++d) dkr[d] += ds * qi[d];
            }
          }
          // dq_i += Σ_j dS_ij·k_j (times scale on the way out).
          for (int64_t i = 0; i < mq; ++i) {
            const float* dsi = dp.data() + i * NB;
            float* dqi = dqb.data() + i * D;
            for (int64_t j = 0; j < nb; ++j) {
              const float ds = dsi[j];
              const float* kj = kb.data() + j * D;
              for (int64_t d = 0; d < D; ++d) dqi[d] += ds * kj[d];
            }
          }
        }
        for (int64_t i = 0; i < mq; ++i) {
          float* dst = dQ + (b * Nq + q0 + i) * C + h * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = dqb[i * D + d] * scale;
        }
      }
    }
  }
}

}  // namespace diffuse::cpu
