// A1111's inpainting controls and outpainting, as image operations around a generation
// (modules/processing.py StableDiffusionProcessingImg2Img.init, modules/masking.py and the
// "poor man's outpainting" script): the mask read as A1111 reads it, inverted, Gaussian-blurred;
// the "only masked" crop with its paste-back; the masked content "fill"; outpainting's padded
// image and feathered mask; the final composite over the original (A1111's overlay).
//
// Masks here are 1-channel 8-bit images, 255 = repaint.
#pragma once
#include <string>

#include "io/image.h"

namespace diffuse {

// A1111's inpainting_fill: 0 fill, 1 original, 2 latent noise, 3 latent nothing.
enum class MaskedContent { Fill = 0, Original = 1, LatentNoise = 2, LatentNothing = 3 };
// "fill", "original", "latent noise", "latent nothing" (A1111's labels).
const char* masked_content_label(MaskedContent c);
// The labels, or the CLI's spelling with '-' for ' ' ("latent-noise"); false if unknown.
bool parse_masked_content(const std::string& s, MaskedContent* out);

// A1111's create_binary_mask: an RGBA mask whose alpha is not all opaque is its alpha, else its
// grey value (PIL's "L": ITU-R 601-2 luma in fixed point); round: > 128 → 255, else 0.
Image mask_to_grey(const Image& m, bool round);
// 255 - v per pixel (A1111's "Inpaint not masked").
Image invert_mask(const Image& m);
// cv2.GaussianBlur as A1111's mask blur: along x with sigma sx (kernel 2·int(2.5·sx + 0.5) + 1
// taps, weights exp(-d² / 2sx²) normalized), then along y with sy; reflect-101 borders; each pass
// rounded to 8 bits (computed in double: OpenCV's 8-bit path uses fixed-point weights, so a
// pixel may differ from it by 1). sigma 0: that pass is skipped.
Image gaussian_blur_mask(const Image& m, double sx, double sy);

// A rectangle [x0, x1) × [y0, y1).
struct CropBox {
  int x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  int width() const { return x1 - x0; }
  int height() const { return y1 - y0; }
  bool empty() const { return x1 <= x0 || y1 <= y0; }
};
// "Only masked": the bounding box of the mask's non-zero pixels grown by `padding` (clamped to the
// image; A1111's get_crop_region_v2), then grown on its short side to the aspect ratio of the
// processing size proc_w × proc_h, centred and shifted back inside the image (expand_crop_region).
// Empty when the mask is all zero.
CropBox only_masked_box(const Image& mask, int padding, int proc_w, int proc_h);
// The pixels of `box` (inside the image).
Image crop_image(const Image& im, const CropBox& box);
// A1111's images.resize_image (Lanczos): mode 0 just resize, 1 crop and resize (cover, centred
// crop), 2 resize and fill (fit, centred, the border filled by stretching the edge pixels).
Image resize_image(const Image& im, int w, int h, int mode);

// A1111's masked content "fill" (masking.fill): the unmasked pixels, premultiplied by 255 - mask,
// blurred (PIL's GaussianBlur: three box blurs per axis, edges extended) at radii 256, 64, 16, 16,
// 4 ×4, 2 ×2 and 0, each un-premultiplied and alpha-composited over the last: the masked area
// takes the colours around it, the unmasked pixels stay. Computed in float. rgb: 3 channels.
Image fill_masked(const Image& rgb, const Image& mask);
// PIL's GaussianBlur(radius) on float planes (exposed for tests): `channels` interleaved.
void pil_gaussian_blur(std::vector<float>& px, int w, int h, int channels, float radius);

// Outpainting padding in pixels.
struct OutpaintPad {
  int left = 0, right = 0, top = 0, bottom = 0;
  bool any() const { return left > 0 || right > 0 || top > 0 || bottom > 0; }
};
// The image on a black canvas of (w + left + right) × (h + top + bottom), at (left, top).
Image pad_image(const Image& rgb, const OutpaintPad& pad);
// The outpainting mask for a w × h image padded by `pad` (poor man's outpainting): white, with
// the original's area black, shrunk by `shrink` pixels on each padded side (A1111: 2·mask blur
// for the mask that is then blurred, mask blur / 2 for the latent mask).
Image outpaint_mask(int w, int h, const OutpaintPad& pad, int shrink);

// What one generation needs around it.
struct InpaintSettings {
  double blur_x = 0, blur_y = 0;  // mask blur sigmas (A1111 mask_blur_x / mask_blur_y)
  bool invert = false;
  MaskedContent content = MaskedContent::Original;
  bool only_masked = false;
  int only_masked_padding = 32;
  OutpaintPad outpaint;  // any(): outpainting (no mask given: it is built)
};

struct InpaintPlan {
  int width = 0, height = 0;  // the processing size
  Image init, mask;           // what the pipeline gets: RGB and the generation mask, width × height
  bool only_masked = false;   // false also when "only masked" found an empty mask (whole image)
  CropBox box;                // only masked: where the generated image goes back
  Image base, overlay;        // the original (padded) image and the mask it is composited through
  bool composite = false;     // finish() pastes back / composites
  // The generated image (width × height) → the final one: only masked, resized (crop and resize)
  // into `box` of `base`; then `base` kept where `overlay` is 0, blended by overlay / 255.
  void finish(Image& out) const;
};

// init: any channels; mask: null for outpainting. The processing size: init + padding when
// outpainting, else proc_w × proc_h (only masked: the crop is resized to it; otherwise the init
// image must already be that size).
InpaintPlan prepare_inpaint(const Image& init, const Image* mask, int proc_w, int proc_h, const InpaintSettings& s);

}  // namespace diffuse
