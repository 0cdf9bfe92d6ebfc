// Upscaling images with an ESRGAN / Real-ESRGAN model (models/rrdbnet.h), tile by tile.
//
// Tiling: the image is cut into a grid of the fewest near-equal tiles of at most `tile` pixels a
// side; each tile runs with `overlap` pixels of context on every side (clipped at the image
// border) and only its own part of the output is kept (Real-ESRGAN's tile_process: a crop, not
// a blend). A pixel's output depends only on input within the network's receptive field, so with
// overlap ≥ that radius the tiles give exactly the untiled result (up to the convolution's f32
// rounding); RRDBNet's radius is at most (4 + 15·num_block + num_upsample)·r input pixels (351 for
// the 23-block x4 models), but its response decays long before that, so 8-16 pixels of overlap
// show no seams in practice.
// For Real-ESRGAN's x2 / x1 models (pixel-unshuffle by r) the image is reflect-padded to a
// multiple of r and tiles start on multiples of r, as the untiled pass groups them.
//
// Memory: one tile's pass at a time. With the defaults (192 px tiles, 16 px overlap: at most
// 224² px of input) an x4 model with 64 features needs ≈ 2.25 · 64 · 896² · 4 B ≈ 0.46 GB of
// scratch (RRDBNet::forward), whatever the image size; the 512² → 2048² x4 upscale measured
// (diffuse upscale, synthetic 23-block x4 model): see README "Upscaling". The model keeps that
// scratch for its next pass: net.release_scratch() frees it (e.g. before hires fix's second pass).
#pragma once
#include <functional>
#include <vector>

#include "backend/backend.h"
#include "io/image.h"
#include "models/rrdbnet.h"

namespace diffuse {

struct UpscaleOptions {
  int tile = 192;    // largest tile side, input pixels; 0: the whole image in one pass
  int overlap = 16;  // context around each tile, input pixels (>= 0)
  // After each tile: (tiles done, tiles in this pass, pass index from 0).
  std::function<void(int done, int total, int pass)> progress;
};

// One tile: the part of the (padded) input it owns [x0, x1) × [y0, y1) and the part it reads
// (owned part plus overlap, clipped), in input pixels.
struct UpscaleTile {
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  int rx0 = 0, ry0 = 0, rx1 = 0, ry1 = 0;
};
// The tiles of a width × height input (width, height multiples of `multiple`; every boundary a
// multiple of it). Throws on tile < 0 (or 0 < tile < multiple) or overlap < 0.
std::vector<UpscaleTile> upscale_tiles(int width, int height, int tile, int overlap, int multiple = 1);

// One pass of the model: an 8-bit image (grey, grey+alpha, RGB or RGBA) -> RGB (RGBA with an
// alpha input, the alpha plane resized with Lanczos) of scale × the size, s = net.config().scale().
// The model must take and give 3-channel images. Text chunks are kept.
Image upscale_image(const RRDBNet& net, Backend& be, const Image& in, const UpscaleOptions& o = {});

// To exactly width × height (hires fix, `diffuse upscale --scale`): one model pass, more while
// the result is smaller than the target (at most 4 in all), then a Lanczos resize to the exact
// size when it differs (2× with an x4 model: one pass, then down to 2×).
Image upscale_image_to(const RRDBNet& net, Backend& be, const Image& in, int width, int height,
                       const UpscaleOptions& o = {});

}  // namespace diffuse
