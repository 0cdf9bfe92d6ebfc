// The fused attention backward's kernel, included twice by attention_backward.cpp: for the x86-64
// baseline and under `#pragma GCC target` for AVX-512 (no FMA contraction), each in its own namespace (one is
// chosen at run time). Not a standalone header: it expects attention_backward.cpp's includes,
// MQ, NB and BwdArgs. Plain loops and malloc'd per-thread blocks, no library templates (a
// template instantiated under the target pragma could be picked by the linker for the whole
// program; see kernels_body.h).
//
// Per (batch, head) — one thread's unit of work, as dk/dv of a pair accumulate over all query
// blocks — and per block of MQ queries: pass 1 runs over the key blocks for each row's
// log-sum-exp (online softmax); pass 2 recomputes the scores, forms P = exp(S − lse) and
// accumulates dv = Pᵀ·dO, dk = scale·dSᵀ·q and dq = scale·dS·k with dS = P∘(dP − D_i).

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


// out[i*NB + j] = Σ_d a[i*D + d]·bt[d*NB + j] for i < m, j < n (bt: the transposed right operand,
// row stride NB), summed in the order d = 0, 1, …, so pass 1 and pass 2 form the same scores.
static void gemm_abt(const float* a, int64_t m, int64_t D, const float* bt, int64_t n, float* out) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = out + i * NB;
    for (int64_t j = 0; j < n; ++j) row[j] = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float ad = a[i * D + d];
      const float* b = bt + d * NB;
      for (int64_t j = 0; j < n; ++j) row[j] += ad * b[j];
    }
  }
}

static void run(const BwdArgs& A) {
  const int64_t Nq = A.Nq, Nk = A.Nk, H = A.H, C = A.C, D = A.D;
  const float scale = A.scale;
#pragma omp parallel num_threads(A.threads)
  {
    // Per-thread blocks: queries (pre-scaled) and dO of the query block, its dq accumulator,
    // its lse and D_i; k (row-major and transposed) and vᵀ of the key block; S/P and dP/dS.
    float* buf = static_cast<float*>(std::malloc(sizeof(float) * size_t(3 * MQ * D + 4 * MQ + NB * D + 2 * D * NB + 2 * MQ * NB)));
    float *qs = buf, *dob = qs + MQ * D, *dqb = dob + MQ * D, *lse = dqb + MQ * D, *di = lse + MQ, *m = di + MQ,
          *l = m + MQ, *kb = l + MQ, *kt = kb + NB * D, *vt = kt + D * NB, *s = vt + D * NB, *dp = s + MQ * NB;
#pragma omp for schedule(dynamic)
    for (int64_t bh = 0; bh < A.B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t j = 0; j < Nk; ++j)
        for (int64_t d = 0; d < D; ++d) A.dK[(b * Nk + j) * C + h * D + d] = 0.f, A.dV[(b * Nk + j) * C + h * D + d] = 0.f;
      for (int64_t q0 = 0; q0 < Nq; q0 += MQ) {
        const int64_t mq = Nq - q0 < MQ ? Nq - q0 : MQ;
        for (int64_t i = 0; i < mq; ++i) {
          const int64_t row = (b * Nq + q0 + i) * C + h * D;
          float acc = 0.f;  // D_i, summed in the order gemm_abt sums dP
          for (int64_t d = 0; d < D; ++d) {
            qs[i * D + d] = A.Q[row + d] * scale;
            dob[i * D + d] = A.dO[row + d];
            acc += A.dO[row + d] * A.O[row + d];
          }
          di[i] = acc;
          m[i] = -__builtin_inff();
          l[i] = 0.f;
        }
        // Pass 1: lse_i = m_i + log l_i over all keys (online softmax).
        for (int64_t j0 = 0; j0 < Nk; j0 += NB) {
          const int64_t nb = Nk - j0 < NB ? Nk - j0 : NB;
          for (int64_t j = 0; j < nb; ++j)
            for (int64_t d = 0; d < D; ++d) kt[d * NB + j] = A.K[(b * Nk + j0 + j) * C + h * D + d];
          gemm_abt(qs, mq, D, kt, nb, s);
          for (int64_t i = 0; i < mq; ++i) {
            float* si = s + i * NB;
            float mb = m[i];
            for (int64_t j = 0; j < nb; ++j) mb = si[j] > mb ? si[j] : mb;
            float sum = 0.f;
            for (int64_t j = 0; j < nb; ++j) sum += ex(si[j] - mb);
            l[i] = l[i] * (m[i] == -__builtin_inff() ? 0.f : ex(m[i] - mb)) + sum;
            m[i] = mb;
          }
        }
        for (int64_t i = 0; i < mq; ++i) lse[i] = m[i] + __builtin_logf(l[i]);
        // Pass 2: P, then the gradients of this (query block, key block) pair.
        for (int64_t e = 0; e < MQ * D; ++e) dqb[e] = 0.f;
        for (int64_t j0 = 0; j0 < Nk; j0 += NB) {
          const int64_t nb = Nk - j0 < NB ? Nk - j0 : NB;
          for (int64_t j = 0; j < nb; ++j)
            for (int64_t d = 0; d < D; ++d) {
              const int64_t at = (b * Nk + j0 + j) * C + h * D + d;
              kt[d * NB + j] = A.K[at];
              kb[j * D + d] = A.K[at];
              vt[d * NB + j] = A.V[at];
            }
          gemm_abt(qs, mq, D, kt, nb, s);  // bit-identical to pass 1
          for (int64_t i = 0; i < mq; ++i) {
            float* pi = s + i * NB;
            for (int64_t j = 0; j < nb; ++j) pi[j] = ex(pi[j] - lse[i]);
          }
          gemm_abt(dob, mq, D, vt, nb, dp);  // dP = dO·vᵀ
          for (int64_t i = 0; i < mq; ++i) {  // dS = P∘(dP − D_i), in place of dP
            const float* pi = s + i * NB;
            float* dsi = dp + i * NB;
            for (int64_t j = 0; j < nb; ++j) dsi[j] = pi[j] * (dsi[j] - di[i]);
          }
          // dv_j += Σ_i P_ij·dO_i and dk_j += Σ_i dS_ij·(scale·q_i): one key row stays hot.
          for (int64_t j = 0; j < nb; ++j) {
            float* dvr = A.dV + (b * Nk + j0 + j) * C + h * D;
            float* dkr = A.dK + (b * Nk + j0 + j) * C + h * D;
            for (int64_t i = 0; i < mq; ++i) {
              const float p = s[i * NB + j], ds = dp[i * NB + j];
              const float* doi = dob + i * D;
              const float* qi = qs + i * D;
              for (int64_t d = 0; d < D; ++d) dvr[d] += p * doi[d];
              for (int64_t d = 0; d < D; ++d) dkr[d] += ds * qi[d];
            }
          }
          // dq_i += Σ_j dS_ij·k_j (times scale on the way out).
          for (int64_t i = 0; i < mq; ++i) {
            const float* dsi = dp + i * NB;
            float* dqi = dqb + i * D;
            for (int64_t j = 0; j < nb; ++j) {
              const float ds = dsi[j];
              const float* kj = kb + j * D;
              for (int64_t d = 0; d < D; ++d) dqi[d] += ds * kj[d];
            }
          }
        }
        for (int64_t i = 0; i < mq; ++i) {
          float* dst = A.dQ + (b * Nq + q0 + i) * C + h * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = dqb[i * D + d] * scale;
        }
      }
    }
    std::free(buf);
  }
}

