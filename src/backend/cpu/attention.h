// Fused multi-head attention kernels for the CPU backend (online softmax over key blocks; the
// Nq×Nk score matrix is never materialised).
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace diffuse::cpu {

// q: [B, Nq, H*D], k, v: [B, Nk, H*D] (f32 or bf16) -> o: [B, Nq, H*D] (f32 or bf16).
// Head h uses columns h*D .. h*D+D-1. o may alias q, but not k or v.
// fp32 path: f32 math throughout (reference precision).
void attention_f32(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o);
// bf16 path: q·kᵀ and p·v with bf16 inputs and f32 accumulation (AMX tiles where available,
// else AVX512-BF16, else falls back to attention_f32).
void attention_bf16(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o);

// Backward of attention_f32 (attention_backward.cpp): q, o, d_o = dL/do: [B, Nq, H*D]; k, v:
// [B, Nk, H*D]; all f32. Writes (overwrites) dq [B, Nq, H*D], dk and dv [B, Nk, H*D]; outputs
// must not overlap the inputs or each other. o must be the forward's output for these q, k, v,
// heads and scale. Fused (scores recomputed per block): memory O(N·D), never Nq×Nk.
void attention_backward_f32(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o, const Tensor& d_o,
                            int heads, float scale, Tensor& dq, Tensor& dk, Tensor& dv);

// Which path the last attention_bf16 call of this process took: "amx", "avx512bf16" or
// "f32-fallback" ("none" before the first call).
const char* attention_bf16_path();
// Which path the last attention_f32 call took: "avx512", "avx2" or "portable" ("none" before any).
const char* attention_f32_path();

// Explicit implementations, for tests and benchmarks. Portable, Avx2 (avx2 + fma) and Avx512
// compute in f32; the others in bf16 (AmxEmulated runs the AMX kernel with tiles emulated in
// software: slow, it exists to check the AMX data layouts on machines without AMX).
enum class AttnImpl { Portable, Avx512, Avx512Bf16, Amx, AmxEmulated, Avx2 };
const char* attn_impl_name(AttnImpl impl);
bool attn_impl_available(AttnImpl impl);
// Implementations treated as unavailable although the CPU has them: bit (1u << int(impl)) set
// means attn_impl_available(impl) is false, attention_with(impl) throws, and the automatic
// choices skip it (attention_bf16: amx, else avx512bf16, else attention_f32; attention_f32:
// avx512, else avx2, else portable). For tests of the fallback chain on any CPU, and for forcing a slower
// path. Process-wide; 0 (the default) disables nothing. Portable cannot be disabled (its bit
// throws diffuse::Error), so the chain always ends at a kernel.
void set_attn_impls_disabled(unsigned mask);
unsigned attn_impls_disabled();
// Validates like attention_f32; throws diffuse::Error when `impl` is not available here.
void attention_with(AttnImpl impl, const Tensor& q, const Tensor& k, const Tensor& v, int heads,
                    float scale, Tensor& o);

namespace detail {

// One attention problem, validated. Rows are dense: element (b, n, c) of q is at
// q[(b*Nq + n)*H*D + c] (same for o; k and v with Nk).
struct AttnProblem {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  DType qt = DType::F32, kt = DType::F32, vt = DType::F32, ot = DType::F32;
  int64_t B = 0, Nq = 0, Nk = 0, H = 0, D = 0;
  float scale = 1.f;
  int threads = 1;
};

// attention.cpp: baseline x86-64 kernel (f32).
void attn_f32_portable(const AttnProblem& p);

// attention_avx2.cpp, compiled with -mavx2 -mfma (call only where cpu_features() has both): the
// f32 kernel in two phases. The caller allocates attn_avx2_packed_floats(p) floats and, per thread,
// attn_avx2_scratch_floats(p), both 32-byte aligned; runs attn_avx2_pack for every (batch, head)
// index bh < B·H, then (after all packing) attn_avx2_compute for every task < attn_avx2_tasks(p).
int64_t attn_avx2_packed_floats(const AttnProblem& p);
int64_t attn_avx2_scratch_floats(const AttnProblem& p);
int64_t attn_avx2_tasks(const AttnProblem& p);
void attn_avx2_pack(const AttnProblem& p, float* packed, int64_t bh);
void attn_avx2_compute(const AttnProblem& p, const float* packed, float* scratch, int64_t task);

// attention_amx.cpp, compiled with AVX-512/AMX flags: call only after checking cpu_features()
// (F32Avx512: avx512f+bw+vl+fma; Bf16*: + avx512_bf16; Bf16Amx: + amx_tile+amx_bf16 and
// enable_amx()). That file uses no OpenMP: the caller runs attn_pack on every thread, then (after
// a barrier) attn_compute on every thread, each with its thread id < p.threads and the team size.
// attn_begin returns nonzero when memory could not be allocated; attn_end must follow it always.
enum class AttnKernel { F32Avx512 = 0, Bf16Avx512 = 1, Bf16Amx = 2, Bf16AmxEmulated = 3 };
struct AttnCall {
  void* state = nullptr;
};
int attn_begin(AttnCall& call, const AttnProblem& p, AttnKernel kernel);
void attn_pack(const AttnCall& call, int tid, int nth);
void attn_compute(const AttnCall& call, int tid, int nth);
void attn_end(AttnCall& call);
// y[i] = 2^x[i] as used by the softmax: range reduction + polynomial of degree 6 (f32 kernels,
// ≲ 5e-7 relative) or 4 (bf16 kernels, ≲ 1e-4 relative, below P's bf16 rounding); -inf and
// x < -150 give 0. Needs avx512f.
void exp2_avx512(const float* x, float* y, int64_t n, int degree = 6);

}  // namespace detail
}  // namespace diffuse::cpu
