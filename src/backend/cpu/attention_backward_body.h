// The fused attention backward's kernel, included three times by attention_backward.cpp: for the
// x86-64 baseline and under `#pragma GCC target` for AVX2 and AVX-512 (no FMA contraction), each in
// its own namespace (one is chosen at run time). Not a standalone header: it expects attention_backward.cpp's includes,
// MQ, NB and BwdArgs. Plain loops and malloc'd per-thread blocks, no library templates (a
// template instantiated under the target pragma could be picked by the linker for the whole
// program; see kernels_body.h).
//
// Per (batch, head) — one thread's unit of work, as dk/dv of a pair accumulate over all query
// blocks — and per block of MQ queries: pass 1 runs over the key blocks for each row's
// log-sum-exp (online softmax); pass 2 recomputes the scores, forms P = exp(S − lse) and
// accumulates dv = Pᵀ·dO, dk = scale·dSᵀ·q and dq = scale·dS·k with dS = P∘(dP − D_i). This file
// compiles the softmax loops per instruction set; the block products are oneDNN's sgemm.

// exp by a Cody–Waite reduction and a degree-7 polynomial (≲ 2 ulp), branch-free so it vectorises.
static inline float ex(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float fn = x * 1.44269504088896341f + 12582912.0f;  // 1.5·2^23: rounds to the nearest integer
  fn -= 12582912.0f;
  float r = x - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(fn) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}


// Row-major C = alpha·op(A)·op(B) + beta·C for one thread's block (oneDNN's sgemm runs
// sequentially inside the parallel region). Returns false on failure (reported after the region).
static bool gemm(char ta, char tb, int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  return dnnl_sgemm(ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc) == dnnl_success;
}

// Block products by oneDNN's sgemm straight on the strided q, k, v, dO and gradient rows (no
// copies); the softmax pieces in plain loops. A single key (Nk = 1) is exact by construction:
// P = 1, so dS = 0 — dq and dk are exactly zero and dv = Σ_i dO_i (what PyTorch's softmax
// backward gives too).
static bool run(const BwdArgs& A) {
  const int64_t Nq = A.Nq, Nk = A.Nk, H = A.H, C = A.C, D = A.D;
  const float scale = A.scale;
  bool ok = true;
#pragma omp parallel num_threads(A.threads) reduction(&& : ok)
  {
    // The block products run sequentially in each thread: a team of one thread is not an active
    // parallel region, and oneDNN would otherwise wake its own threads for every small sgemm.
    omp_set_num_threads(1);
    // Per-thread blocks: lse, D_i and the running max/sum of a query block; S/P and dP/dS.
    float* buf = static_cast<float*>(std::malloc(sizeof(float) * size_t(4 * MQ + 2 * MQ * NB)));
    float *lse = buf, *di = lse + MQ, *m = di + MQ, *l = m + MQ, *s = l + MQ, *dp = s + MQ * NB;
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < A.B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* Q = A.Q + b * Nq * C + h * D;
      const float* dO = A.dO + b * Nq * C + h * D;
      const float* O = A.O + b * Nq * C + h * D;
      const float* K = A.K + b * Nk * C + h * D;
      const float* V = A.V + b * Nk * C + h * D;
      float* dQ = A.dQ + b * Nq * C + h * D;
      float* dK = A.dK + b * Nk * C + h * D;
      float* dV = A.dV + b * Nk * C + h * D;
      for (int64_t j = 0; j < Nk; ++j)
        for (int64_t d = 0; d < D; ++d) dK[j * C + d] = 0.f, dV[j * C + d] = 0.f;
      if (Nk == 1) {
        for (int64_t i = 0; i < Nq; ++i)
          for (int64_t d = 0; d < D; ++d) dQ[i * C + d] = 0.f, dV[d] += dO[i * C + d];
        continue;
      }
      for (int64_t q0 = 0; q0 < Nq; q0 += MQ) {
        const int64_t mq = Nq - q0 < MQ ? Nq - q0 : MQ;
        const float *Qb = Q + q0 * C, *dOb = dO + q0 * C;
        float* dQb = dQ + q0 * C;
        for (int64_t i = 0; i < mq; ++i) {
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc += dOb[i * C + d] * O[(q0 + i) * C + d];
          di[i] = acc;
          m[i] = -__builtin_inff();
          l[i] = 0.f;
        }
        // Pass 1: lse_i = m_i + log l_i over all keys (online softmax).
        for (int64_t j0 = 0; j0 < Nk; j0 += NB) {
          const int64_t nb = Nk - j0 < NB ? Nk - j0 : NB;
          ok = ok && gemm('N', 'T', mq, nb, D, scale, Qb, C, K + j0 * C, C, 0.f, s, NB);
          for (int64_t i = 0; i < mq; ++i) {
            const float* si = s + i * NB;
            float mb = m[i];
            for (int64_t j = 0; j < nb; ++j) mb = si[j] > mb ? si[j] : mb;
            float sum = 0.f;
            for (int64_t j = 0; j < nb; ++j) sum += ex(si[j] - mb);
            l[i] = l[i] * (m[i] == -__builtin_inff() ? 0.f : ex(m[i] - mb)) + sum;
            m[i] = mb;
          }
        }
        for (int64_t i = 0; i < mq; ++i) lse[i] = m[i] + __builtin_logf(l[i]);
        // Pass 2: P = exp(S − lse) (the same sgemm call: the same scores), then this key block's
        // share of every gradient.
        for (int64_t j0 = 0; j0 < Nk; j0 += NB) {
          const int64_t nb = Nk - j0 < NB ? Nk - j0 : NB;
          const float *Kb = K + j0 * C, *Vb = V + j0 * C;
          ok = ok && gemm('N', 'T', mq, nb, D, scale, Qb, C, Kb, C, 0.f, s, NB);
          for (int64_t i = 0; i < mq; ++i) {
            float* pi = s + i * NB;
            for (int64_t j = 0; j < nb; ++j) pi[j] = ex(pi[j] - lse[i]);
          }
          ok = ok && gemm('N', 'T', mq, nb, D, 1.f, dOb, C, Vb, C, 0.f, dp, NB);  // dP = dO·vᵀ
          for (int64_t i = 0; i < mq; ++i) {  // dS = P∘(dP − D_i), in place of dP
            const float* pi = s + i * NB;
            float* dsi = dp + i * NB;
            for (int64_t j = 0; j < nb; ++j) dsi[j] = pi[j] * (dsi[j] - di[i]);
          }
          ok = ok && gemm('T', 'N', nb, D, mq, 1.f, s, NB, dOb, C, 1.f, dV + j0 * C, C);       // dv += Pᵀ·dO
          ok = ok && gemm('T', 'N', nb, D, mq, scale, dp, NB, Qb, C, 1.f, dK + j0 * C, C);     // dk += scale·dSᵀ·q
          ok = ok && gemm('N', 'N', mq, D, nb, scale, dp, NB, Kb, C, j0 == 0 ? 0.f : 1.f, dQb, C);  // dq += scale·dS·k
        }
      }
    }
    std::free(buf);
  }
  return ok;
}
