#include "core/layout.h"

#include "core/error.h"

namespace diffuse {

namespace {
// Permutes [N, A, B] -> [N, B, A] in f32 (A, B: channels and pixels in either order).
Tensor swap_last_two(const Tensor& x, int64_t n, int64_t a, int64_t b, const Shape& out_shape) {
  Tensor s = x.dtype() == DType::F32 ? x : x.to(DType::F32);
  Tensor y = Tensor::empty(out_shape);
  const float* src = s.f32();
  float* dst = y.f32();
#pragma omp parallel for if (n * a * b > (1 << 16))
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < a; ++j)
      for (int64_t k = 0; k < b; ++k) dst[(i * b + k) * a + j] = src[(i * a + j) * b + k];
  return y;
}
}  // namespace

Tensor nchw_to_nhwc(const Tensor& x) {
  DF_CHECK(x.rank() == 4 && dtype_is_float(x.dtype()), "nchw_to_nhwc: expected a 4-D float tensor, got ", x.str());
  const int64_t N = x.dim(0), C = x.dim(1), H = x.dim(2), W = x.dim(3);
  return swap_last_two(x, N, C, H * W, {N, H, W, C});
}

Tensor nhwc_to_nchw(const Tensor& x) {
  DF_CHECK(x.rank() == 4 && dtype_is_float(x.dtype()), "nhwc_to_nchw: expected a 4-D float tensor, got ", x.str());
  const int64_t N = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  return swap_last_two(x, N, H * W, C, {N, C, H, W});
}

}  // namespace diffuse
