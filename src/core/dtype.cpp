#include "core/dtype.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/threads.h"

namespace diffuse {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::Bool: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::F64: return "f64";
    case DType::I64: return "i64";
    case DType::I32: return "i32";
    case DType::I16: return "i16";
    case DType::I8: return "i8";
    case DType::U8: return "u8";
    case DType::Bool: return "bool";
  }
  return "?";
}

bool dtype_is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);           // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);          // overflow -> inf
  if (a < 0x38800000u) {                                          // subnormal or zero
    if (a < 0x33000000u) return uint16_t(sign);                   // < half of smallest subnormal
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;                                     // 14 + (113 - e) - 1 ... in [14, 24]
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
  r -= 0x38000000u;                            // rebias exponent 127 -> 15
  return uint16_t(sign | (r >> 13));
}

namespace {
template <typename T>
double load_as_double(const void* p, size_t i) { return double(static_cast<const T*>(p)[i]); }

double load(const void* src, DType s, size_t i) {
  switch (s) {
    case DType::F32: return load_as_double<float>(src, i);
    case DType::F64: return load_as_double<double>(src, i);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::I64: return load_as_double<int64_t>(src, i);
    case DType::I32: return load_as_double<int32_t>(src, i);
    case DType::I16: return load_as_double<int16_t>(src, i);
    case DType::I8: return load_as_double<int8_t>(src, i);
    case DType::U8: return load_as_double<uint8_t>(src, i);
    case DType::Bool: return static_cast<const uint8_t*>(src)[i] ? 1.0 : 0.0;
  }
  return 0;
}

void store(void* dst, DType d, size_t i, double v) {
  switch (d) {
    case DType::F32: static_cast<float*>(dst)[i] = float(v); break;
    case DType::F64: static_cast<double*>(dst)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(float(v)); break;
    case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(float(v)); break;
    case DType::I64: static_cast<int64_t*>(dst)[i] = int64_t(v); break;
    case DType::I32: static_cast<int32_t*>(dst)[i] = int32_t(v); break;
    case DType::I16: static_cast<int16_t*>(dst)[i] = int16_t(v); break;
    case DType::I8: static_cast<int8_t*>(dst)[i] = int8_t(v); break;
    case DType::U8: static_cast<uint8_t*>(dst)[i] = uint8_t(v); break;
    case DType::Bool: static_cast<uint8_t*>(dst)[i] = v != 0; break;
  }
}
}  // namespace

// f16 -> f32 with F16C (vcvtph2ps), for CPUs that have it (checked by the caller); the binary
// otherwise assumes only x86-64.
__attribute__((target("avx,f16c"))) static void f16_to_f32_f16c(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = f16_to_f32(in[i]);
}

void convert(const void* src, DType s, void* dst, DType d, size_t n) {
  if (s == d) {
    std::memcpy(dst, src, n * dtype_size(s));
    return;
  }
  // Fast paths for the float types the engine uses.
  if (d == DType::F32 && s == DType::F16) {
    auto* in = static_cast<const uint16_t*>(src);
    auto* out = static_cast<float*>(dst);
    static const bool f16c = cpu_features().f16c && cpu_features().avx2;  // avx2: the OS saves ymm state
    if (f16c) {  // the hardware conversion (exact, like the scalar one), 8 at a time
      const int64_t blocks = int64_t(n / 4096);
#pragma omp parallel for if (n > (1 << 16))
      for (int64_t b = 0; b < blocks; ++b) f16_to_f32_f16c(in + b * 4096, out + b * 4096, 4096);
      const size_t done = size_t(blocks) * 4096;
      f16_to_f32_f16c(in + done, out + done, n - done);
      return;
    }
#pragma omp parallel for if (n > (1 << 16))
    for (size_t i = 0; i < n; ++i) out[i] = f16_to_f32(in[i]);
    return;
  }
  if (d == DType::BF16 && s == DType::F16) {  // via f32 (exact), rounded to nearest even once
    auto* in = static_cast<const uint16_t*>(src);
    auto* out = static_cast<uint16_t*>(dst);
    static const bool f16c = cpu_features().f16c && cpu_features().avx2;
    const int64_t blocks = int64_t((n + 1023) / 1024);
#pragma omp parallel for if (n > (1 << 16))
    for (int64_t b = 0; b < blocks; ++b) {
      float buf[1024];
      const size_t from = size_t(b) * 1024, len = std::min<size_t>(1024, n - from);
      if (f16c) f16_to_f32_f16c(in + from, buf, len);
      else
        for (size_t i = 0; i < len; ++i) buf[i] = f16_to_f32(in[from + i]);
      for (size_t i = 0; i < len; ++i) out[from + i] = f32_to_bf16(buf[i]);
    }
    return;
  }
  if (d == DType::F32 && s == DType::BF16) {
    auto* in = static_cast<const uint16_t*>(src);
    auto* out = static_cast<float*>(dst);
#pragma omp parallel for if (n > (1 << 16))
    for (size_t i = 0; i < n; ++i) out[i] = bf16_to_f32(in[i]);
    return;
  }
  if (s == DType::F32 && d == DType::BF16) {
    auto* in = static_cast<const float*>(src);
    auto* out = static_cast<uint16_t*>(dst);
#pragma omp parallel for if (n > (1 << 16))
    for (size_t i = 0; i < n; ++i) out[i] = f32_to_bf16(in[i]);
    return;
  }
  if (s == DType::F32 && d == DType::F16) {
    auto* in = static_cast<const float*>(src);
    auto* out = static_cast<uint16_t*>(dst);
#pragma omp parallel for if (n > (1 << 16))
    for (size_t i = 0; i < n; ++i) out[i] = f32_to_f16(in[i]);
    return;
  }
  for (size_t i = 0; i < n; ++i) store(dst, d, i, load(src, s, i));
}

}  // namespace diffuse
