// Element types and conversions between them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace diffuse {

// F32/F16/BF16 are compute/storage types; the others appear in checkpoints (position_ids, step
// counters) and are carried so files can be read and reported. I8 is reserved for quantised
// weights (per-output-channel scales live beside the tensor).
enum class DType : uint8_t { F32, F16, BF16, F64, I64, I32, I16, I8, U8, Bool };

size_t dtype_size(DType t);
const char* dtype_name(DType t);          // "f32", "f16", "bf16", ...
bool dtype_is_float(DType t);

// Conversions (round-to-nearest-even for narrowing, NaN preserved).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Convert n elements from src (type s) to dst (type d). Float and integer types are supported
// in any direction (integers via double).
void convert(const void* src, DType s, void* dst, DType d, size_t n);

}  // namespace diffuse
