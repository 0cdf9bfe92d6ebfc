// Variation seeds (see variation.h).
#include "pipeline/variation.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/layout.h"

namespace diffuse {

Tensor slerp_a1111(double val, const Tensor& low, const Tensor& high) {
  DF_CHECK(low.rank() == 3 && low.shape() == high.shape() && low.dtype() == DType::F32 && high.dtype() == DType::F32,
           "slerp: ", low.str(), " and ", high.str(), " must be f32 [C, H, W] of one shape");
  const int64_t C = low.dim(0), H = low.dim(1), W = low.dim(2);
  const float* a = low.f32();
  const float* b = high.f32();
  // Per (c, w): the norms over h, the dot product of the normalised columns.
  std::vector<double> na(size_t(C * W)), nb(size_t(C * W)), dot(size_t(C * W));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) {
      double sa = 0, sb = 0;
      for (int64_t h = 0; h < H; ++h) {
        const size_t i = size_t((c * H + h) * W + w);
        sa += double(a[i]) * a[i];
        sb += double(b[i]) * b[i];
      }
      na[size_t(c * W + w)] = std::sqrt(sa);
      nb[size_t(c * W + w)] = std::sqrt(sb);
    }
  double mean = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) {
      double d = 0;
      for (int64_t h = 0; h < H; ++h) {
        const size_t i = size_t((c * H + h) * W + w);
        d += (double(a[i]) / na[size_t(c * W + w)]) * (double(b[i]) / nb[size_t(c * W + w)]);
      }
      dot[size_t(c * W + w)] = d;
      mean += d;
    }
  mean /= double(C * W);
  Tensor out = Tensor::empty(low.shape());
  float* o = out.f32();
  if (mean > 0.9995) {
    for (int64_t i = 0; i < low.numel(); ++i) o[i] = float(a[i] * val + b[i] * (1 - val));
    return out;
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t w = 0; w < W; ++w) {
      const double omega = std::acos(dot[size_t(c * W + w)]), so = std::sin(omega);
      const double ka = std::sin((1.0 - val) * omega) / so, kb = std::sin(val * omega) / so;
      for (int64_t h = 0; h < H; ++h) {
        const size_t i = size_t((c * H + h) * W + w);
        o[i] = float(ka * a[i] + kb * b[i]);
      }
    }
  return out;
}

void apply_variation(Tensor& noise, RngKind kind, uint64_t subseed, double strength) {
  if (strength == 0) return;
  DF_CHECK(noise.rank() == 4 && noise.dtype() == DType::F32, "variation seed: noise ", noise.str());
  const int64_t B = noise.dim(0), h = noise.dim(1), w = noise.dim(2), C = noise.dim(3);
  Tensor nchw = nhwc_to_nchw(noise);
  for (int64_t b = 0; b < B; ++b) {
    Tensor low = nchw.slice0(b, b + 1).reshape({C, h, w});
    Tensor high = make_rng(kind, subseed + uint64_t(b))->randn({C, h, w});
    Tensor mixed = slerp_a1111(strength, low, high);
    low.copy_from(mixed);
  }
  noise = nchw_to_nhwc(nchw);
}

}  // namespace diffuse
