// A1111's variation seeds ("Variation seed", "Variation seed strength"): the first noise of image i
// is slerp(strength, noise(seed + i), noise(subseed + i)), the second drawn from a generator of its
// own (the image's generator goes on as without it), as modules/rng.py ImageRNG.first() does.
#pragma once
#include <cstdint>

#include "core/tensor.h"
#include "pipeline/rng.h"

namespace diffuse {

// A1111's slerp (modules/rng.py) of two noises of one image, low/high: f32 [C, H, W] (NCHW
// order): the norms and dot products are taken along dim 1 (H) per (c, w), as A1111 writes it;
// when their mean is above 0.9995 it falls back to low·val + high·(1 − val) (A1111's formula).
Tensor slerp_a1111(double val, const Tensor& low, const Tensor& high);

// noise: f32 [B, h, w, C] NHWC, image b drawn from seed + b; replaced in place by the variation
// with subseed + b at `strength` (0: unchanged). kind: the run's generator type.
void apply_variation(Tensor& noise, RngKind kind, uint64_t subseed, double strength);

}  // namespace diffuse
