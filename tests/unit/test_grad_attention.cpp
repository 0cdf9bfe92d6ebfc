// Backward of the fused CPU attention (cpu::attention_backward_f32, called directly): gradients
// against a double-precision reference (central finite differences and an analytic backward),
// with per-element tolerances derived from f32 rounding; exact zeros with a single key; the
// extra peak memory at N = 4096 (O(N·D), never N×N); validation messages.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/attention.h"
#include "backend/cpu/kernels.h"
#include "core/error.h"

using namespace diffuse;
using namespace diffuse::cpu;

namespace {

using Vd = std::vector<double>;
constexpr double kU = 0x1p-24;  // f32 unit roundoff

struct Dims {
  int64_t B, H, Nq, Nk, D;
  double scale;
  int64_t C() const { return H * D; }
};

std::string str(const Dims& p) {
  return cat("B", p.B, " H", p.H, " Nq", p.Nq, " Nk", p.Nk, " D", p.D, " scale", p.scale);
}

// Values uniform in [-amp, amp], rounded to f32 (so the f32 kernel and the double reference see
// the same numbers).
Vd random_values(size_t n, std::mt19937& rng, double amp) {
  std::uniform_real_distribution<float> u(float(-amp), float(amp));
  Vd x(n);
  for (double& e : x) e = u(rng);
  return x;
}

Tensor to_tensor(const Vd& x, int64_t B, int64_t N, int64_t C) {
  Tensor t = Tensor::empty({B, N, C}, DType::F32);
  for (size_t i = 0; i < x.size(); ++i) t.f32()[i] = float(x[i]);
  return t;
}

Vd to_vd(const Tensor& t) { return Vd(t.f32(), t.f32() + t.numel()); }

Tensor nan_tensor(int64_t B, int64_t N, int64_t C) {  // outputs start as NaN: must be overwritten
  Tensor t = Tensor::empty({B, N, C}, DType::F32);
  std::fill(t.f32(), t.f32() + t.numel(), std::numeric_limits<float>::quiet_NaN());
  return t;
}

// Plain double forward: o = softmax(scale·q·kᵀ)·v per (batch, head).
Vd ref_forward(const Dims& p, const Vd& q, const Vd& k, const Vd& v) {
  const int64_t C = p.C(), D = p.D;
  Vd o(size_t(p.B * p.Nq * C), 0.0), s(size_t(p.Nk));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t i = 0; i < p.Nq; ++i) {
        const double* qi = &q[size_t((b * p.Nq + i) * C + h * D)];
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < p.Nk; ++j) {
          const double* kj = &k[size_t((b * p.Nk + j) * C + h * D)];
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += qi[d] * kj[d];
          s[j] = p.scale * acc;
          mx = std::max(mx, s[j]);
        }
        for (double& x : s) sum += (x = std::exp(x - mx));
        double* oi = &o[size_t((b * p.Nq + i) * C + h * D)];
        for (int64_t j = 0; j < p.Nk; ++j)
          for (int64_t d = 0; d < D; ++d) oi[d] += s[j] / sum * v[size_t((b * p.Nk + j) * C + h * D + d)];
      }
  return o;
}

struct Grads {
  Vd dq, dk, dv;
};

// Analytic backward in double, row by row (the full score row of query i at a time):
//   dv += Pᵀ·dO, dP = dO·vᵀ, D_i = Σ_j P_ij·dP_ij, dS = P∘(dP − D_i), dq = scale·dS·k,
//   dk += scale·dSᵀ·q.
// Also, per element, the magnitude `bound` of the terms the f32 kernel sums (see tolerance()):
//   bv[j,d] = Σ_i P_ij·|dO_id|,  bq[i,d] = scale·Σ_j W_ij·|k_jd|,  bk[j,d] = scale·Σ_i W_ij·|q_id|,
// with W_ij = P_ij·(Σ_d|dO_id·v_jd| + Σ_d|dO_id|·Σ_j' P_ij'·|v_j'd|) ≥ |dS_ij| (each dS term's
// size before cancellation), and smax = max_ij Σ_d |scale·q_id·k_jd| (the size of a score's terms).
// `rows` limits the query rows (dk, dv then hold only those rows' contributions).
struct RefBackward {
  Grads g, bound;
  double smax = 0;
};
RefBackward ref_backward(const Dims& p, const Vd& q, const Vd& k, const Vd& v, const Vd& dO,
                         std::vector<int64_t> rows = {}) {
  const int64_t C = p.C(), D = p.D, Nk = p.Nk;
  if (rows.empty())
    for (int64_t i = 0; i < p.Nq; ++i) rows.push_back(i);
  RefBackward r;
  for (Grads* g : {&r.g, &r.bound}) {
    g->dq.assign(size_t(p.B * p.Nq * C), 0.0);
    g->dk.assign(size_t(p.B * Nk * C), 0.0);
    g->dv.assign(size_t(p.B * Nk * C), 0.0);
  }
  Vd P(static_cast<size_t>(Nk)), dP(static_cast<size_t>(Nk)), W(static_cast<size_t>(Nk)), pv(static_cast<size_t>(D));
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t i : rows) {
        const size_t qi = size_t((b * p.Nq + i) * C + h * D);
        auto kv = [&](int64_t j) { return size_t((b * Nk + j) * C + h * D); };
        double mx = -INFINITY, sum = 0, Di = 0, Diabs = 0;
        for (int64_t j = 0; j < Nk; ++j) {
          double acc = 0, abs_acc = 0;
          for (int64_t d = 0; d < D; ++d) {
            acc += q[qi + d] * k[kv(j) + d];
            abs_acc += std::abs(p.scale * q[qi + d] * k[kv(j) + d]);
          }
          P[j] = p.scale * acc;
          mx = std::max(mx, P[j]);
          r.smax = std::max(r.smax, abs_acc);
        }
        for (double& x : P) sum += (x = std::exp(x - mx));
        for (double& x : P) x /= sum;
        std::fill(pv.begin(), pv.end(), 0.0);
        for (int64_t j = 0; j < Nk; ++j) {
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) {
            acc += dO[qi + d] * v[kv(j) + d];
            pv[d] += P[j] * std::abs(v[kv(j) + d]);
          }
          dP[j] = acc;
          Di += P[j] * acc;
        }
        for (int64_t d = 0; d < D; ++d) Diabs += std::abs(dO[qi + d]) * pv[d];
        for (int64_t j = 0; j < Nk; ++j) {
          double dpabs = 0;
          for (int64_t d = 0; d < D; ++d) dpabs += std::abs(dO[qi + d] * v[kv(j) + d]);
          W[j] = P[j] * (dpabs + Diabs);
          const double dS = P[j] * (dP[j] - Di);
          for (int64_t d = 0; d < D; ++d) {
            r.g.dq[qi + d] += p.scale * dS * k[kv(j) + d];
            r.bound.dq[qi + d] += p.scale * W[j] * std::abs(k[kv(j) + d]);
            r.g.dk[kv(j) + d] += p.scale * dS * q[qi + d];
            r.bound.dk[kv(j) + d] += p.scale * W[j] * std::abs(q[qi + d]);
            r.g.dv[kv(j) + d] += P[j] * dO[qi + d];
            r.bound.dv[kv(j) + d] += P[j] * std::abs(dO[qi + d]);
          }
        }
      }
  return r;
}

// Gradient of L = Σ G∘o(q, k, v) by central differences of ref_forward, step h in double.
// Truncation error ~h²·|L'''|/6 ≈ 1e-11 and cancellation ~ε_double·Σ|G∘o|/h ≈ 1e-10 here; the
// tests confirm it agrees with the analytic gradient to kFdErr (observed ≤ 2e-10).
constexpr double kFdErr = 2e-9;
Grads fd_gradient(const Dims& p, Vd q, Vd k, Vd v, const Vd& G, double h = 1e-5) {
  auto loss = [&] {
    const Vd o = ref_forward(p, q, k, v);
    double L = 0;
    for (size_t i = 0; i < o.size(); ++i) L += G[i] * o[i];
    return L;
  };
  auto grad = [&](Vd& x) {
    Vd g(x.size());
    for (size_t e = 0; e < x.size(); ++e) {
      const double x0 = x[e];
      x[e] = x0 + h;
      const double lp = loss();
      x[e] = x0 - h;
      const double lm = loss();
      x[e] = x0;
      g[e] = (lp - lm) / (2 * h);
    }
    return g;
  };
  Grads g;
  g.dq = grad(q);
  g.dk = grad(k);
  g.dv = grad(v);
  return g;
}

// Tolerance for one element of the f32 kernel's gradient: rel·bound (+ the reference's own
// error), rel from first-order rounding-error bounds of each step of the kernel (u = 2^-24):
//   score S = Σ_D scale·q·k:               |δS| ≤ (D+1)·u·smax
//   lse = m + log Σ_Nk exp (online):        |δlse| ≤ (Nk+4)·u + |δS|
//   P = exp(S − lse):                       |δP|/P ≤ 2(D+1)·u·smax + (Nk+6)·u
//   dP = Σ_D dO·v, D_i = Σ_D dO·o (o itself rounded to f32, or from the f32 forward with its
//   error ≤ (Nk+D+8)·u relative to Σ P|v|):  ≤ (Nk+2D+10)·u·(Σ|dO·v| + Σ|dO|·Σ P|v|)
//   so |δdS_ij| ≤ u·(2(D+1)·smax + 2Nk + 2D + 16)·W_ij;
//   dq = scale·Σ_Nk dS·k, dk = Σ_Nq dS·(scale·q), dv = Σ_Nq P·dO add (Nk or Nq)+2 roundings
//   of terms bounded by `bound`.
// With m = 2Nk + Nq + 2D + 18 (the roundings counted above, covering all three gradients):
//   worst case:     rel = 2·u·(m + 2(D+1)·smax)   (factor 2: dropped second-order terms)
//   probabilistic:  rel = λ·u·(√m + 2√(D+1)·smax), λ = 6: rounding errors taken as independent
//     zero-mean variables grow like √n, not n (Higham & Mary, SIAM J. Sci. Comput. 2019): the
//     bound n·u becomes λ·√n·u, exceeded with probability ≤ 2·exp(−λ²/2) ≈ 3e-8.
// The smaller of the two is used. A 1e-3 relative error in a gradient (2e-2 in the N = 4096
// rows) or a missing scale must exceed it (checked below).
double rel_tolerance(const Dims& p, double smax) {
  const double m = 2.0 * double(p.Nk) + double(p.Nq) + 2.0 * double(p.D) + 18.0, d1 = double(p.D + 1);
  const double worst = 2.0 * kU * (m + 2.0 * d1 * smax);
  const double prob = 6.0 * kU * (std::sqrt(m) + 2.0 * std::sqrt(d1) * smax);
  return std::min(worst, prob);
}

// max over elements of |got − ref| / (rel·bound + extra): ≤ 1 passes.
double error_ratio(const Vd& got, const Vd& ref, const Vd& bound, double rel, double extra) {
  double worst = 0;
  for (size_t e = 0; e < ref.size(); ++e) {
    const double tol = rel * bound[e] + extra;
    const double err = std::abs(got[e] - ref[e]);
    worst = std::max(worst, std::isfinite(got[e]) ? err / tol : INFINITY);
  }
  return worst;
}

Vd scaled(Vd x, double f) {
  for (double& e : x) e *= f;
  return x;
}

struct Problem {
  Dims p;
  Vd q, k, v, dO;
};
Problem make_problem(const Dims& p, uint32_t seed, double qk_amp) {
  std::mt19937 rng(seed);
  Problem pr{p, {}, {}, {}, {}};
  pr.q = random_values(size_t(p.B * p.Nq * p.C()), rng, qk_amp);
  pr.k = random_values(size_t(p.B * p.Nk * p.C()), rng, qk_amp);
  pr.v = random_values(size_t(p.B * p.Nk * p.C()), rng, 1.0);
  pr.dO = random_values(size_t(p.B * p.Nq * p.C()), rng, 1.0);  // G = dL/do
  return pr;
}

// Runs the f32 kernel. o: the double reference rounded to f32, or the f32 forward's output.
Grads run_kernel(const Problem& pr, bool o_from_f32_forward = false) {
  const Dims& p = pr.p;
  Tensor q = to_tensor(pr.q, p.B, p.Nq, p.C()), k = to_tensor(pr.k, p.B, p.Nk, p.C());
  Tensor v = to_tensor(pr.v, p.B, p.Nk, p.C()), d_o = to_tensor(pr.dO, p.B, p.Nq, p.C());
  Tensor o = to_tensor(ref_forward(p, pr.q, pr.k, pr.v), p.B, p.Nq, p.C());
  if (o_from_f32_forward) attention_f32(q, k, v, int(p.H), float(p.scale), o);
  Tensor dq = nan_tensor(p.B, p.Nq, p.C()), dk = nan_tensor(p.B, p.Nk, p.C()), dv = nan_tensor(p.B, p.Nk, p.C());
  attention_backward_f32(q, k, v, o, d_o, int(p.H), float(p.scale), dq, dk, dv);
  return {to_vd(dq), to_vd(dk), to_vd(dv)};
}

// Checks the kernel against `ref` within the derived tolerance, and that the tolerance is tight
// enough to reject a gradient off by 0.1% (or with the scale left out of dq/dk).
void check_gradients(const std::string& what, const Dims& p, const Grads& got, const Grads& ref,
                     const RefBackward& mag, double extra, bool dq_dk_zero = false) {
  const double n = rel_tolerance(p, mag.smax);
  const double rq = error_ratio(got.dq, ref.dq, mag.bound.dq, n, extra);
  const double rk = error_ratio(got.dk, ref.dk, mag.bound.dk, n, extra);
  const double rv = error_ratio(got.dv, ref.dv, mag.bound.dv, n, extra);
  std::printf("  %s [%s]: max err/tol dq %.3g, dk %.3g, dv %.3g (tol = %.2g·bound)\n", what.c_str(),
              str(p).c_str(), rq, rk, rv, n);
  EXPECT_LE(rq, 1.0) << what << " dq, " << str(p);
  EXPECT_LE(rk, 1.0) << what << " dk, " << str(p);
  EXPECT_LE(rv, 1.0) << what << " dv, " << str(p);
  // Sensitivity: a wrong gradient must fail the same comparison.
  EXPECT_GT(error_ratio(scaled(got.dv, 1.001), ref.dv, mag.bound.dv, n, extra), 1.0) << what << " dv·1.001";
  if (dq_dk_zero) return;
  EXPECT_GT(error_ratio(scaled(got.dq, 1.001), ref.dq, mag.bound.dq, n, extra), 1.0) << what << " dq·1.001";
  EXPECT_GT(error_ratio(scaled(got.dk, 1.001), ref.dk, mag.bound.dk, n, extra), 1.0) << what << " dk·1.001";
  EXPECT_GT(error_ratio(scaled(got.dq, 1 / p.scale), ref.dq, mag.bound.dq, n, extra), 1.0) << what << " dq/scale";
  EXPECT_GT(error_ratio(scaled(got.dk, 1 / p.scale), ref.dk, mag.bound.dk, n, extra), 1.0) << what << " dk/scale";
}

// Finite-difference check of one problem; also returns the kernel's gradients.
Grads fd_check(const Dims& p, uint32_t seed, double qk_amp, bool dq_dk_zero = false) {
  const Problem pr = make_problem(p, seed, qk_amp);
  const Grads fd = fd_gradient(p, pr.q, pr.k, pr.v, pr.dO);
  const RefBackward an = ref_backward(p, pr.q, pr.k, pr.v, pr.dO);
  // The two double references agree (validates both, and bounds the FD error by kFdErr).
  double fd_vs_an = 0;
  for (auto [a, b] : {std::pair{&fd.dq, &an.g.dq}, {&fd.dk, &an.g.dk}, {&fd.dv, &an.g.dv}})
    for (size_t e = 0; e < a->size(); ++e) fd_vs_an = std::max(fd_vs_an, std::abs((*a)[e] - (*b)[e]));
  std::printf("  FD vs analytic double gradient: max |diff| %.3g\n", fd_vs_an);
  EXPECT_LE(fd_vs_an, kFdErr) << str(p);
  const Grads got = run_kernel(pr);
  check_gradients("f32 kernel vs FD", p, got, fd, an, kFdErr, dq_dk_zero);
  return got;
}

// VmHWM (peak resident set, KiB) from /proc/self/status; getrusage's ru_maxrss if unreadable.
long peak_rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#else
constexpr bool kAddressSanitizer = false;
#endif

// Resets VmHWM to the current RSS (Linux ≥ 4.0). Each TEST runs in its own CTest process anyway,
// so without the reset the baseline is this process's own peak.
void reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
}

}  // namespace

// N = 4096 self-attention: the backward's extra peak memory is O(N·D), nowhere near one head's
// N×N f32 score matrix (4096² · 4 B = 64 MiB).
TEST(GradAttention, MemoryAt4096Tokens) {
  const Dims p{1, 2, 4096, 4096, 40, 1 / std::sqrt(40.0)};
  const int64_t C = p.C();
  std::mt19937 rng(4096);
  const Vd qd = random_values(size_t(p.Nq * C), rng, 1.5), kd = random_values(size_t(p.Nk * C), rng, 1.5);
  const Vd vd = random_values(size_t(p.Nk * C), rng, 1.0), dOd = random_values(size_t(p.Nq * C), rng, 1.0);
  // Every input and output allocated and written (all pages touched) before the measurement.
  Tensor q = to_tensor(qd, 1, p.Nq, C), k = to_tensor(kd, 1, p.Nk, C), v = to_tensor(vd, 1, p.Nk, C);
  Tensor d_o = to_tensor(dOd, 1, p.Nq, C), o = nan_tensor(1, p.Nq, C);
  attention_f32(q, k, v, int(p.H), float(p.scale), o);
  Tensor dq = nan_tensor(1, p.Nq, C), dk = nan_tensor(1, p.Nk, C), dv = nan_tensor(1, p.Nk, C);

  reset_peak_rss();
  const long before = peak_rss_kib();
  const auto t0 = std::chrono::steady_clock::now();
  attention_backward_f32(q, k, v, o, d_o, int(p.H), float(p.scale), dq, dk, dv);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long after = peak_rss_kib();
  ASSERT_GT(before, 0) << "cannot read VmHWM";
  const double extra_mib = double(after - before) / 1024.0;
  std::printf("  N=4096, H=2, D=40 backward: %.3f s, peak RSS %ld -> %ld KiB (+%.2f MiB; one head's N×N f32 "
              "scores would be 64 MiB)\n",
              secs, before, after, extra_mib);
  if (kAddressSanitizer)  // oneDNN's sgemm allocates and frees per call; ASan keeps freed blocks
    std::printf("  AddressSanitizer build: freed blocks stay in its quarantine, so the peak RSS is not live "
                "memory; the plain build checks the bound\n");
  else
    EXPECT_LT(extra_mib, 16.0);

  for (const Tensor* t : {&dq, &dk, &dv})
    for (int64_t e = 0; e < t->numel(); ++e) ASSERT_TRUE(std::isfinite(t->f32()[e])) << "element " << e;
  // dq rows 0 and 4095 against the row-wise double backward (dk/dv would need every row). o comes
  // from the f32 forward (rel_tolerance covers its error); dq·1.02 must fail.
  const RefBackward ref = ref_backward(p, qd, kd, vd, dOd, {0, p.Nq - 1});
  const Vd got = to_vd(dq);
  const double n = rel_tolerance(p, ref.smax);
  double worst = 0, worst_102 = INFINITY;
  for (int64_t i : {int64_t(0), p.Nq - 1}) {
    const size_t r0 = size_t(i * C), r1 = r0 + size_t(C);
    const Vd g(got.begin() + r0, got.begin() + r1), r(ref.g.dq.begin() + r0, ref.g.dq.begin() + r1);
    const Vd bnd(ref.bound.dq.begin() + r0, ref.bound.dq.begin() + r1);
    worst = std::max(worst, error_ratio(g, r, bnd, n, 0));
    worst_102 = std::min(worst_102, error_ratio(scaled(g, 1.02), r, bnd, n, 0));
  }
  std::printf("  dq rows 0, 4095: max err/tol %.3g (tol = %.2g·bound); dq·1.02 gives %.3g\n", worst, n,
              worst_102);
  EXPECT_LE(worst, 1.0);
  EXPECT_GT(worst_102, 1.0);
}

// Cross-attention, odd sizes, several heads and batches.
TEST(GradAttention, FiniteDifferencesCross) { fd_check({2, 3, 7, 11, 5, 0.8}, 1, 1.5); }

// Self-attention shape (Nq = Nk), one head.
TEST(GradAttention, FiniteDifferencesSelf) { fd_check({1, 1, 13, 13, 8, 1 / std::sqrt(8.0)}, 2, 2.0); }

// One key: the softmax is identically 1, so o = v and the gradients of q and k are exactly 0
// (dS = 1·(dO·v − dO·o) with o = v, summed in the same order), and dv_j = Σ_i dO_i.
TEST(GradAttention, SingleKeyGivesExactZeros) {
  const Dims p{2, 2, 5, 1, 6, 0.7};
  const Grads got = fd_check(p, 3, 1.5, /*dq_dk_zero=*/true);
  for (float x : got.dq) EXPECT_EQ(x, 0.f);
  for (float x : got.dk) EXPECT_EQ(x, 0.f);
}

// Nq and Nk above the kernel's 64-row/64-key blocks and not multiples of them, against the
// analytic double backward; once with o from the double forward, once from the f32 forward.
TEST(GradAttention, BlockBoundariesAnalytic) {
  // Every compiled copy of the kernel the CPU supports (x86-64 baseline, AVX2, AVX-512).
  const KernelIsa initial = kernel_isa();
  for (KernelIsa isa : {KernelIsa::Baseline, KernelIsa::Avx2, KernelIsa::Avx512}) {
    if (!kernel_isa_supported(isa)) continue;
    set_kernel_isa(isa);
    std::printf("kernel: %s\n", kernel_isa_name(isa));
  for (const Dims& p : {Dims{2, 2, 70, 131, 16, 0.3}, Dims{1, 3, 129, 65, 7, 0.5}, Dims{2, 8, 64, 77, 4, 0.5}, Dims{2, 8, 16, 77, 8, 0.5}, Dims{2, 8, 4, 77, 16, 0.5}, Dims{2, 8, 1, 77, 16, 0.5}}) {
    const Problem pr = make_problem(p, 4, 1.5);
    const RefBackward an = ref_backward(p, pr.q, pr.k, pr.v, pr.dO);
    check_gradients("f32 kernel vs analytic (o from double)", p, run_kernel(pr), an.g, an, 0);
    check_gradients("f32 kernel vs analytic (o from attention_f32)", p, run_kernel(pr, true), an.g, an, 0);
  }
  }
  set_kernel_isa(initial);
}

TEST(GradAttention, EmptyQueriesGiveZeroKeyGradients) {
  Tensor q = Tensor::empty({1, 0, 8}), o = Tensor::empty({1, 0, 8}), d_o = Tensor::empty({1, 0, 8});
  Tensor dq = Tensor::empty({1, 0, 8});
  Tensor k = Tensor::full({1, 3, 8}, 1.f), v = Tensor::full({1, 3, 8}, 1.f);
  Tensor dk = nan_tensor(1, 3, 8), dv = nan_tensor(1, 3, 8);
  attention_backward_f32(q, k, v, o, d_o, 2, 0.5f, dq, dk, dv);
  for (int64_t e = 0; e < dk.numel(); ++e) {
    EXPECT_EQ(dk.f32()[e], 0.f);
    EXPECT_EQ(dv.f32()[e], 0.f);
  }
}

TEST(GradAttention, Validation) {
  auto expect_error = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one mentioning " << needle;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("attention_backward"), std::string::npos) << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    }
  };
  Tensor q = Tensor::zeros({2, 7, 15}), o = Tensor::zeros({2, 7, 15}), d_o = Tensor::zeros({2, 7, 15});
  Tensor k = Tensor::zeros({2, 11, 15}), v = Tensor::zeros({2, 11, 15});
  Tensor dq = Tensor::zeros({2, 7, 15}), dk = Tensor::zeros({2, 11, 15}), dv = Tensor::zeros({2, 11, 15});
  Tensor bad = Tensor::zeros({2, 11, 14}), bf = Tensor::zeros({2, 7, 15}, DType::BF16);
  expect_error([&] { attention_backward_f32(q, k, v, o, d_o, 3, 1.f, dq, bad, dv); }, "f32[2, 11, 14]");
  expect_error([&] { attention_backward_f32(q, k, v, o, bf, 3, 1.f, dq, dk, dv); }, "bf16[2, 7, 15]");
  expect_error([&] { attention_backward_f32(q, k, v, o, d_o, 4, 1.f, dq, dk, dv); }, "heads 4");
  expect_error([&] { attention_backward_f32(q, k, v, o, d_o, 3, 1.f, dq, dk, dk); }, "overlap");
  Tensor dv_t = dv.reshape({2, 15, 11});
  expect_error([&] { attention_backward_f32(q, k, v, o, d_o, 3, 1.f, dq, dk, dv_t); }, "f32[2, 15, 11]");
}
