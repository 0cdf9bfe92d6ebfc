// Fused multi-head attention kernels for the CPU backend (online softmax over key blocks; the
// Nq×Nk score matrix is never materialised).
#pragma once
#include "core/tensor.h"

namespace diffuse::cpu {

// q: [B, Nq, H*D], k, v: [B, Nk, H*D] (f32 or bf16) -> o: [B, Nq, H*D] (f32 or bf16).
// fp32 path: f32 math throughout (reference precision).
void attention_f32(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o);
// bf16 path: q·kᵀ and p·v with bf16 inputs and f32 accumulation (AMX tiles where available,
// else AVX512-BF16, else falls back to attention_f32).
void attention_bf16(const Tensor& q, const Tensor& k, const Tensor& v, int heads, float scale, Tensor& o);

}  // namespace diffuse::cpu
