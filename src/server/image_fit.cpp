// Fitting a request's images to its output size, as A1111's img2img does (image_fit.h).
#include "server/image_fit.h"

#include <algorithm>
#include <cmath>

#include "models/controlnet.h"

namespace diffuse::server {

namespace {

// A1111's "just resize" / "crop and resize" / "resize and fill" (resize_mode 0/1/2).
Image fit_image(const Image& im, int w, int h, int mode) {
  if (im.width == w && im.height == h) return im;
  if (mode == 1 || mode == 2) {
    const double sw = double(w) / im.width, sh = double(h) / im.height;
    const double s = mode == 1 ? std::max(sw, sh) : std::min(sw, sh);  // cover / fit
    const int rw = std::max(1, int(std::lround(im.width * s))), rh = std::max(1, int(std::lround(im.height * s)));
    Image r = resize_lanczos(im, rw, rh);
    Image out = im;
    out.width = w;
    out.height = h;
    out.pixels.assign(size_t(w) * h * im.channels, 0);
    const int ox = (rw - w) / 2, oy = (rh - h) / 2;  // crop offset (mode 1) or minus the pad (mode 2)
    for (int y = 0; y < h; ++y) {
      const int sy = std::clamp(y + oy, 0, rh - 1);  // mode 2: edge pixels stretched into the border
      for (int x = 0; x < w; ++x) {
        const int sx = std::clamp(x + ox, 0, rw - 1);
        std::copy_n(&r.pixels[(size_t(sy) * rw + sx) * im.channels], im.channels,
                    &out.pixels[(size_t(y) * w + x) * im.channels]);
      }
    }
    return out;
  }
  return resize_lanczos(im, w, h);
}

// Grey value of pixel i of a mask image (A1111: RGBA masks use their alpha when not opaque).
uint8_t mask_value(const Image& m, size_t i) {
  const uint8_t* p = &m.pixels[i * m.channels];
  if (m.channels == 1 || m.channels == 2) return p[0];
  return uint8_t((int(p[0]) * 299 + int(p[1]) * 587 + int(p[2]) * 114) / 1000);
}

Image crop(const Image& im, int x0, int y0, int w, int h) {
  Image out = im;
  out.width = w;
  out.height = h;
  out.pixels.assign(size_t(w) * h * im.channels, 0);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      const int sx = std::clamp(x0 + x, 0, im.width - 1), sy = std::clamp(y0 + y, 0, im.height - 1);
      std::copy_n(&im.pixels[(size_t(sy) * im.width + sx) * im.channels], im.channels,
                  &out.pixels[(size_t(y) * w + x) * im.channels]);
    }
  return out;
}

}  // namespace

std::function<void(Image&)> fit_request_images(JobSpec& spec) {
  api::Request& r = spec.req;
  if (r.init.pixels.empty()) return {};
  const int w = r.width ? r.width : r.init.width, h = r.height ? r.height : r.init.height;
  const bool has_mask = !r.mask.pixels.empty();
  if (has_mask && (r.mask.width != r.init.width || r.mask.height != r.init.height))
    r.mask = fit_image(r.mask, r.init.width, r.init.height, 0);
  if (!(has_mask && spec.inpaint_full_res)) {
    r.init = fit_image(r.init, w, h, spec.resize_mode);
    if (has_mask) r.mask = fit_image(r.mask, w, h, spec.resize_mode);
    r.width = w;
    r.height = h;
    return {};
  }
  // "Only masked": the mask's bounding box grown by the padding and then to the output's aspect
  // ratio, cut out, generated at w × h, and pasted back where the mask is.
  const Image init = to_rgb(r.init), mask = r.mask;
  int x0 = init.width, y0 = init.height, x1 = -1, y1 = -1;
  for (int y = 0; y < init.height; ++y)
    for (int x = 0; x < init.width; ++x)
      if (mask_value(mask, size_t(y) * init.width + x) >= 128) {
        x0 = std::min(x0, x), y0 = std::min(y0, y), x1 = std::max(x1, x), y1 = std::max(y1, y);
      }
  if (x1 < 0) {  // an empty mask: nothing to repaint, plain resize as A1111 does
    r.init = fit_image(r.init, w, h, 0);
    r.mask = fit_image(r.mask, w, h, 0);
    r.width = w;
    r.height = h;
    return {};
  }
  const int pad = std::max(0, spec.inpaint_full_res_padding);
  x0 = std::max(0, x0 - pad), y0 = std::max(0, y0 - pad);
  x1 = std::min(init.width - 1, x1 + pad), y1 = std::min(init.height - 1, y1 + pad);
  int cw = x1 - x0 + 1, ch = y1 - y0 + 1;
  // Grow the short side so the crop has the output's aspect ratio (centred, clamped to the image).
  const double ratio = double(w) / h;
  if (double(cw) / ch < ratio) {
    const int nw = std::min(init.width, int(std::lround(ch * ratio)));
    x0 = std::clamp(x0 - (nw - cw) / 2, 0, init.width - nw);
    cw = nw;
  } else {
    const int nh = std::min(init.height, int(std::lround(cw / ratio)));
    y0 = std::clamp(y0 - (nh - ch) / 2, 0, init.height - nh);
    ch = nh;
  }
  r.init = resize_lanczos(crop(init, x0, y0, cw, ch), w, h);
  r.mask = resize_lanczos(crop(mask, x0, y0, cw, ch), w, h);
  r.width = w;
  r.height = h;
  return [init, mask, x0, y0, cw, ch](Image& out) {
    const Image patch = resize_lanczos(to_rgb(out), cw, ch);
    Image full = init;
    full.text = out.text;
    for (int y = 0; y < ch; ++y)
      for (int x = 0; x < cw; ++x) {
        const size_t di = size_t(y0 + y) * init.width + (x0 + x);
        const int a = mask_value(mask, di);  // soft edge where the mask is grey
        for (int c = 0; c < 3; ++c) {
          uint8_t& d = full.pixels[di * 3 + c];
          d = uint8_t((d * (255 - a) + patch.pixels[(size_t(y) * cw + x) * 3 + c] * a + 127) / 255);
        }
      }
    out = std::move(full);
  };
}

}  // namespace diffuse::server
