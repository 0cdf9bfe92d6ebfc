// Core: dtype conversions, tensors, arena, threads.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "core/arena.h"
#include "core/error.h"
#include "core/tensor.h"
#include "core/threads.h"

using namespace diffuse;

TEST(DType, F16RoundTripAllValues) {
  // Every finite f16 survives f16 -> f32 -> f16 exactly.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    uint16_t v = uint16_t(h);
    if ((v & 0x7c00) == 0x7c00 && (v & 0x3ff)) continue;  // NaN payloads
    EXPECT_EQ(f32_to_f16(f16_to_f32(v)), v) << std::hex << h;
  }
}

TEST(DType, F16KnownValues) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie to even -> 0
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(DType, Bf16Rounding) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1).
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

// The f16 -> bf16 fast path (weights of f16 checkpoints on their way into bf16 layouts) rounds
// each value once, to nearest even, from its exact f32 value: every f16 bit pattern, in a buffer
// large enough for the parallel blocked path and with a tail past the last full block.
TEST(DType, ConvertF16ToBf16AllValues) {
  const size_t n = 3 * 65536 + 77;
  std::vector<uint16_t> in(n), out(n);
  for (size_t i = 0; i < n; ++i) in[i] = uint16_t((i * 40503u) & 0xffffu);
  convert(in.data(), DType::F16, out.data(), DType::BF16, n);
  for (size_t i = 0; i < n; ++i) {
    const float f = f16_to_f32(in[i]);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(out[i]))) << std::hex << in[i];
      continue;
    }
    // The reference: round f to the nearest bf16 by the value (ties to the even mantissa).
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t trunc = u & 0xffff0000u, rest = u & 0xffffu;
    uint32_t r = trunc;
    if (rest > 0x8000u || (rest == 0x8000u && (trunc & 0x10000u))) r += 0x10000u;
    ASSERT_EQ(out[i], uint16_t(r >> 16)) << "f16 0x" << std::hex << in[i] << " = " << f;
  }
}

TEST(DType, ConvertIntegersAndFloats) {
  int64_t src[4] = {-3, 0, 7, 49407};
  float dst[4];
  convert(src, DType::I64, dst, DType::F32, 4);
  EXPECT_EQ(dst[0], -3.0f);
  EXPECT_EQ(dst[3], 49407.0f);
  uint16_t h[4];
  convert(dst, DType::F32, h, DType::F16, 4);
  EXPECT_EQ(f16_to_f32(h[2]), 7.0f);
}

TEST(Tensor, ShapeAndViews) {
  Tensor t = Tensor::zeros({3, 4, 5});
  EXPECT_EQ(t.numel(), 60);
  EXPECT_EQ(t.shape().str(), "[3, 4, 5]");
  EXPECT_EQ(t.str(), "f32[3, 4, 5]");
  for (int i = 0; i < 60; ++i) t.f32()[i] = float(i);
  Tensor s = t.slice0(1, 3);
  EXPECT_EQ(s.shape(), Shape({2, 4, 5}));
  EXPECT_EQ(s.f32()[0], 20.0f);
  Tensor r = t.reshape({12, 5});
  EXPECT_EQ(r.f32()[59], 59.0f);
  EXPECT_THROW(t.reshape({7, 9}), Error);
  EXPECT_THROW(t.slice0(2, 4), Error);
  EXPECT_THROW(Tensor::zeros({2}, DType::F16).f32(), Error);
}

TEST(Tensor, ConversionCopiesAndRoundTrips) {
  Tensor t = Tensor::empty({17});
  for (int i = 0; i < 17; ++i) t.f32()[i] = 0.25f * float(i) - 2.0f;
  Tensor h = t.to(DType::F16);
  EXPECT_EQ(h.dtype(), DType::F16);
  Tensor back = h.to(DType::F32);
  for (int i = 0; i < 17; ++i) EXPECT_EQ(back.f32()[i], t.f32()[i]);
  Tensor c = t.clone();
  c.f32()[0] = 100;
  EXPECT_NE(t.f32()[0], 100);
}

TEST(Tensor, BorrowKeepsOwnerAlive) {
  auto owner = std::make_shared<std::vector<float>>(8, 1.5f);
  Tensor t = Tensor::borrow(owner->data(), {2, 4}, DType::F32, owner);
  std::weak_ptr<std::vector<float>> weak = owner;
  owner.reset();
  EXPECT_FALSE(weak.expired());
  EXPECT_EQ(t.f32()[7], 1.5f);
  t = Tensor();
  EXPECT_TRUE(weak.expired());
}

TEST(Arena, SteadyStateDoesNotAllocate) {
  Arena arena;
  auto pass = [&] {
    for (int i = 0; i < 20; ++i) {
      Tensor t = arena.alloc({int64_t(1000 + i * 5000)});
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
      t.f32()[t.numel() - 1] = 1.0f;  // touch the last element (ASan checks bounds)
    }
    arena.reset();
  };
  pass();
  size_t after_first = arena.heap_allocations();
  pass();
  pass();
  EXPECT_EQ(arena.heap_allocations(), after_first);
  EXPECT_GE(arena.capacity(), arena.peak());
}

TEST(Threads, Counts) {
  EXPECT_GE(physical_cores(), 1);
  set_num_threads(1);
  EXPECT_EQ(num_threads(), 1);
  set_num_threads(0);
  EXPECT_EQ(num_threads(), physical_cores());
  EXPECT_FALSE(cpu_features().str().empty());
}
