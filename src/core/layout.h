// Layout changes at the boundary with PyTorch: the engine keeps image activations and latents
// NHWC; references, torch's random draws and saved latents are NCHW.
#pragma once
#include "core/tensor.h"

namespace diffuse {

// x: [N, C, H, W] (any float dtype) -> owned f32 [N, H, W, C]
Tensor nchw_to_nhwc(const Tensor& x);
// x: [N, H, W, C] (any float dtype) -> owned f32 [N, C, H, W]
Tensor nhwc_to_nchw(const Tensor& x);

}  // namespace diffuse
