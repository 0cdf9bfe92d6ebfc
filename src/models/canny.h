// Canny edge detection for ControlNet "canny" hints (what the ControlNet canny annotator makes with
// cv2.Canny(img, 100, 200)): white 1-pixel edges on black.
//
// Steps: grey (ITU-R 601: 0.299 R + 0.587 G + 0.114 B, kept in float), 5×5 Gaussian blur (σ 1.4 by
// default; σ 0 skips it: cv2.Canny itself does not blur), 3×3 Sobel (unnormalised, as OpenCV's
// aperture 3: |g| reaches 4·255 on a black/white step), gradient magnitude |gx| + |gy| (OpenCV's
// default L1; l2 = true gives sqrt(gx² + gy²)), non-maximum suppression across the gradient
// direction quantised to 0°/45°/90°/135° (ties kept on one side only, so a symmetric step gives one
// line), double threshold (a pixel is an edge candidate above `low` and a seed above `high`, both on
// that magnitude scale, like cv2.Canny's thresholds), hysteresis (candidates 8-connected to a seed
// are kept). Borders are mirrored without repeating the edge pixel (OpenCV's BORDER_REFLECT_101).
#pragma once
#include "io/image.h"

namespace diffuse {

struct CannyOptions {
  double low = 100.0;   // candidate threshold (gradient magnitude, 0..255 image scale)
  double high = 200.0;  // seed threshold; must be >= low
  double sigma = 1.4;   // Gaussian blur σ (5×5 kernel); 0: no blur
  bool l2 = false;      // L2 gradient magnitude instead of L1
};

// Any 8-bit image (grey, grey+alpha, RGB, RGBA; alpha ignored) -> RGB image of the same size with
// edges 255 on 0. Throws diffuse::Error naming the option for bad thresholds or sigma.
Image canny(const Image& im, const CannyOptions& opts = {});

}  // namespace diffuse
