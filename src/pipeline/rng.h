// Random numbers that reproduce PyTorch's, so a seed gives the image it gives in diffusers (CPU
// generator) or A1111 (CUDA generator) on every machine.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "core/tensor.h"

namespace diffuse {

enum class RngKind { Cpu, Cuda };
RngKind parse_rng_kind(const std::string& s);  // "cpu" | "cuda"; throws naming the value

class Rng {
 public:
  virtual ~Rng() = default;
  // Fills out[0..n) exactly as torch.randn of a tensor with n elements would (values in the
  // tensor's row-major order), advancing the generator as torch does. Consecutive calls are
  // consecutive draws from the same generator.
  virtual void randn(float* out, int64_t n) = 0;
  // torch.randn(shape): f32, row-major in `shape` (PyTorch layout, e.g. NCHW latents).
  Tensor randn(const Shape& shape);
};

// torch.Generator("cpu").manual_seed(seed): mt19937; scalar Box–Muller (doubles) below 16
// elements, torch's 16-wide float Box–Muller from 16 up.
std::unique_ptr<Rng> make_cpu_rng(uint64_t seed);
// torch.Generator("cuda").manual_seed(seed): Philox 4×32-10 with torch's offsets and launch
// layout. torch caps its grid at SMs × (max threads per SM / 256) blocks, so draws of more than
// 256 × that many elements depend on the GPU; the default is an H100 (132 SMs × 8 = 1056 blocks,
// i.e. identical on every GPU up to 270336 elements: every SD/SDXL latent of batch ≤ 4).
// curand's Box–Muller uses __sincosf, a hardware approximation (MUFU) that is emulated here by
// an exact sine of the same reduced argument: values agree to ~1e-6, about a quarter bit for bit.
inline constexpr int64_t kCudaMaxBlocksH100 = 132 * 8;
std::unique_ptr<Rng> make_cuda_rng(uint64_t seed, int64_t max_blocks = kCudaMaxBlocksH100);
std::unique_ptr<Rng> make_rng(RngKind kind, uint64_t seed);

}  // namespace diffuse
