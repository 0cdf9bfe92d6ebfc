// A1111's inpainting controls and outpainting (inpaint_prep.h).
#include "pipeline/inpaint_prep.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "models/controlnet.h"  // resize_lanczos

namespace diffuse {

const char* masked_content_label(MaskedContent c) {
  switch (c) {
    case MaskedContent::Fill: return "fill";
    case MaskedContent::Original: return "original";
    case MaskedContent::LatentNoise: return "latent noise";
    case MaskedContent::LatentNothing: return "latent nothing";
  }
  return "original";
}

bool parse_masked_content(const std::string& s, MaskedContent* out) {
  for (MaskedContent c : {MaskedContent::Fill, MaskedContent::Original, MaskedContent::LatentNoise,
                          MaskedContent::LatentNothing}) {
    std::string label = masked_content_label(c), dashed = label;
    std::replace(dashed.begin(), dashed.end(), ' ', '-');
    if (s == label || s == dashed) {
      *out = c;
      return true;
    }
  }
  return false;
}

namespace {

Image grey_like(int w, int h, uint8_t v) {
  Image m;
  m.width = w;
  m.height = h;
  m.channels = 1;
  m.format = "png";
  m.pixels.assign(size_t(w) * size_t(h), v);
  return m;
}

// Reflect-101 index (…2 1 | 0 1 2 … n-1 | n-2 …) for any offset.
int reflect101(int i, int n) {
  if (n == 1) return 0;
  const int period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// One cv2 GaussianBlur pass along x (dx = 1) or y, rounded to 8 bits.
Image blur_pass(const Image& m, double sigma, bool along_x) {
  const int k = 2 * int(2.5 * sigma + 0.5) + 1, r = k / 2;
  std::vector<double> wts(static_cast<size_t>(k));
  double sum = 0;
  for (int i = 0; i < k; ++i) sum += wts[size_t(i)] = std::exp(-double((i - r) * (i - r)) / (2 * sigma * sigma));
  for (double& v : wts) v /= sum;
  Image out = m;
  for (int y = 0; y < m.height; ++y)
    for (int x = 0; x < m.width; ++x) {
      double acc = 0;
      for (int i = -r; i <= r; ++i) {
        const int sx = along_x ? reflect101(x + i, m.width) : x, sy = along_x ? y : reflect101(y + i, m.height);
        acc += wts[size_t(i + r)] * m.pixels[size_t(sy) * m.width + sx];
      }
      out.pixels[size_t(y) * m.width + x] = uint8_t(std::clamp(std::lround(acc), 0L, 255L));
    }
  return out;
}

// One of PIL's box blurs along a line of n values (stride `step`), fractional radius l + a,
// edge values extended.
void box_line(float* p, int n, size_t step, int l, float a, std::vector<float>& buf) {
  buf.resize(size_t(n) + 2 * size_t(l) + 2);
  for (int i = 0; i < int(buf.size()); ++i) buf[size_t(i)] = p[size_t(std::clamp(i - l - 1, 0, n - 1)) * step];
  const float inv = 1.0f / (2.0f * (float(l) + a) + 1.0f);
  // buf[j] holds p[j - l - 1]; window for x: buf[x+1 .. x+2l+1] fully, buf[x] and buf[x+2l+2] by a.
  double s = 0;
  for (int j = 1; j <= 2 * l + 1; ++j) s += buf[size_t(j)];
  for (int x = 0; x < n; ++x) {
    p[size_t(x) * step] = float((s + a * (buf[size_t(x)] + buf[size_t(x) + 2 * size_t(l) + 2])) * inv);
    if (x + 1 < n) s += buf[size_t(x) + 2 * size_t(l) + 2] - buf[size_t(x) + 1];
  }
}

}  // namespace

Image mask_to_grey(const Image& m, bool round) {
  const size_t n = size_t(m.width) * size_t(m.height);
  const int c = m.channels;
  bool use_alpha = false;
  if (c == 4)
    for (size_t i = 0; i < n && !use_alpha; ++i) use_alpha = m.pixels[i * 4 + 3] != 255;
  Image out = grey_like(m.width, m.height, 0);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &m.pixels[i * size_t(c)];
    uint8_t v = use_alpha ? p[3]
                : c <= 2  ? p[0]
                          : uint8_t((uint32_t(p[0]) * 19595 + uint32_t(p[1]) * 38470 + uint32_t(p[2]) * 7471 + 0x8000) >> 16);
    out.pixels[i] = round ? (v > 128 ? 255 : 0) : v;
  }
  return out;
}

Image invert_mask(const Image& m) {
  Image out = m;
  for (uint8_t& v : out.pixels) v = uint8_t(255 - v);
  return out;
}

Image gaussian_blur_mask(const Image& m, double sx, double sy) {
  DF_CHECK(m.channels == 1, "gaussian_blur_mask: a 1-channel mask expected, got ", m.channels, " channels");
  Image out = m;
  if (sx > 0) out = blur_pass(out, sx, true);
  if (sy > 0) out = blur_pass(out, sy, false);
  return out;
}

CropBox only_masked_box(const Image& mask, int padding, int proc_w, int proc_h) {
  CropBox b{mask.width, mask.height, 0, 0};
  for (int y = 0; y < mask.height; ++y)
    for (int x = 0; x < mask.width; ++x)
      if (mask.pixels[(size_t(y) * mask.width + x) * size_t(mask.channels)]) {
        b.x0 = std::min(b.x0, x), b.y0 = std::min(b.y0, y);
        b.x1 = std::max(b.x1, x + 1), b.y1 = std::max(b.y1, y + 1);
      }
  if (b.empty()) return {};
  b.x0 = std::max(b.x0 - padding, 0), b.y0 = std::max(b.y0 - padding, 0);
  b.x1 = std::min(b.x1 + padding, mask.width), b.y1 = std::min(b.y1 + padding, mask.height);
  // Grow the short axis to the processing aspect ratio: the difference split (the floor half
  // before), then shifted back inside [0, size).
  const double ratio_box = double(b.width()) / b.height(), ratio_proc = double(proc_w) / proc_h;
  auto expand = [](int& lo, int& hi, double want, int size) {
    // The short axis grows: want >= hi - lo, so diff >= 0 (Python's int() and // agree with C's).
    const int diff = int(want - (hi - lo)), half = diff / 2;
    lo -= half;
    hi += diff - half;
    if (hi >= size) {
      lo -= hi - size;
      hi = size;
    }
    if (lo < 0) {
      hi -= lo;
      lo = 0;
    }
    if (hi >= size) hi = size;
  };
  if (ratio_box > ratio_proc)
    expand(b.y0, b.y1, b.width() / ratio_proc, mask.height);
  else
    expand(b.x0, b.x1, b.height() * ratio_proc, mask.width);
  return b;
}

Image crop_image(const Image& im, const CropBox& box) {
  DF_CHECK(box.x0 >= 0 && box.y0 >= 0 && box.x1 <= im.width && box.y1 <= im.height && !box.empty(),
           "crop_image: box outside the image");
  Image out = im;
  out.width = box.width();
  out.height = box.height();
  out.pixels.resize(size_t(out.width) * out.height * im.channels);
  const size_t row = size_t(out.width) * im.channels;
  for (int y = 0; y < out.height; ++y)
    std::copy_n(&im.pixels[(size_t(box.y0 + y) * im.width + box.x0) * im.channels], row, &out.pixels[size_t(y) * row]);
  return out;
}

Image resize_image(const Image& im, int w, int h, int mode) {
  if (im.width == w && im.height == h) return im;
  if (mode != 1 && mode != 2) return resize_lanczos(im, w, h);
  const double sw = double(w) / im.width, sh = double(h) / im.height;
  const double s = mode == 1 ? std::max(sw, sh) : std::min(sw, sh);  // cover / fit
  const int rw = std::max(1, int(std::lround(im.width * s))), rh = std::max(1, int(std::lround(im.height * s)));
  const Image r = resize_lanczos(im, rw, rh);
  Image out = im;
  out.width = w;
  out.height = h;
  out.pixels.assign(size_t(w) * h * im.channels, 0);
  const int ox = (rw - w) / 2, oy = (rh - h) / 2;  // crop offset (mode 1) or minus the border (mode 2)
  for (int y = 0; y < h; ++y) {
    const int sy = std::clamp(y + oy, 0, rh - 1);  // mode 2: edge pixels stretched into the border
    for (int x = 0; x < w; ++x) {
      const int sx = std::clamp(x + ox, 0, rw - 1);
      std::copy_n(&r.pixels[(size_t(sy) * rw + sx) * im.channels], im.channels, &out.pixels[(size_t(y) * w + x) * im.channels]);
    }
  }
  return out;
}

void pil_gaussian_blur(std::vector<float>& px, int w, int h, int channels, float radius) {
  if (radius <= 0) return;
  // Pillow's box radius for 3 passes approximating a Gaussian of sigma = radius (Gwosdek et al.).
  const double sigma2 = double(radius) * radius / 3.0;
  const double L = std::sqrt(12.0 * sigma2 + 1.0);
  const double l = std::floor((L - 1.0) / 2.0);
  const double a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)));
  std::vector<float> buf;
  for (int pass = 0; pass < 3; ++pass)
    for (int y = 0; y < h; ++y)
      for (int c = 0; c < channels; ++c) box_line(&px[size_t(y) * w * channels + c], w, size_t(channels), int(l), float(a), buf);
  for (int pass = 0; pass < 3; ++pass)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < channels; ++c)
        box_line(&px[size_t(x) * channels + c], h, size_t(w) * channels, int(l), float(a), buf);
}

Image fill_masked(const Image& rgb, const Image& mask) {
  DF_CHECK(rgb.channels == 3 && mask.channels == 1 && rgb.width == mask.width && rgb.height == mask.height,
           "fill_masked: an RGB image and a 1-channel mask of its size expected");
  const int w = rgb.width, h = rgb.height;
  const size_t n = size_t(w) * h;
  // Premultiplied RGBA in [0, 1]: colour × k, alpha k, k = 1 - mask.
  std::vector<float> pre(n * 4);
  for (size_t i = 0; i < n; ++i) {
    const float k = 1.0f - mask.pixels[i] / 255.0f;
    for (int c = 0; c < 3; ++c) pre[i * 4 + c] = rgb.pixels[i * 3 + c] / 255.0f * k;
    pre[i * 4 + 3] = k;
  }
  std::vector<float> col(n * 3, 0.0f), alpha(n, 0.0f);  // the composite, straight alpha
  const struct {
    float radius;
    int repeats;
  } passes[] = {{256, 1}, {64, 1}, {16, 2}, {4, 4}, {2, 2}, {0, 1}};
  for (const auto& ps : passes) {
    std::vector<float> b = pre;
    pil_gaussian_blur(b, w, h, 4, ps.radius);
    for (int rep = 0; rep < ps.repeats; ++rep)
      for (size_t i = 0; i < n; ++i) {
        const float as = b[i * 4 + 3];
        if (as <= 0) continue;
        const float ad = alpha[i], ao = as + ad * (1 - as);
        for (int c = 0; c < 3; ++c) {
          const float cs = b[i * 4 + c] / as;  // un-premultiplied
          col[i * 3 + c] = (cs * as + col[i * 3 + c] * ad * (1 - as)) / ao;
        }
        alpha[i] = ao;
      }
  }
  Image out = rgb;
  for (size_t i = 0; i < n * 3; ++i) out.pixels[i] = uint8_t(std::clamp(std::lround(col[i] * 255.0f), 0L, 255L));
  return out;
}

Image pad_image(const Image& rgb, const OutpaintPad& pad) {
  DF_CHECK(rgb.channels == 3, "pad_image: an RGB image expected");
  Image out = rgb;
  out.width = rgb.width + pad.left + pad.right;
  out.height = rgb.height + pad.top + pad.bottom;
  out.pixels.assign(size_t(out.width) * out.height * 3, 0);
  const size_t row = size_t(rgb.width) * 3;
  for (int y = 0; y < rgb.height; ++y)
    std::copy_n(&rgb.pixels[size_t(y) * row], row, &out.pixels[(size_t(y + pad.top) * out.width + pad.left) * 3]);
  return out;
}

Image outpaint_mask(int w, int h, const OutpaintPad& pad, int shrink) {
  const int W = w + pad.left + pad.right, H = h + pad.top + pad.bottom;
  Image m = grey_like(W, H, 255);
  const int x0 = pad.left + (pad.left > 0 ? shrink : 0), x1 = pad.left + w - (pad.right > 0 ? shrink : 0);
  const int y0 = pad.top + (pad.top > 0 ? shrink : 0), y1 = pad.top + h - (pad.bottom > 0 ? shrink : 0);
  for (int y = std::max(y0, 0); y < std::min(y1, H); ++y)
    for (int x = std::max(x0, 0); x < std::min(x1, W); ++x) m.pixels[size_t(y) * W + x] = 0;
  return m;
}

void InpaintPlan::finish(Image& out) const {
  if (!composite) return;
  Image gen = to_rgb(out);
  if (only_masked) gen = resize_image(gen, box.width(), box.height(), 1);
  const CropBox at = only_masked ? box : CropBox{0, 0, base.width, base.height};
  DF_CHECK(gen.width == at.width() && gen.height == at.height(), "inpaint: generated image ", gen.width, "x",
           gen.height, " does not fit the paste-back area ", at.width(), "x", at.height());
  Image full = base;
  full.text = out.text;
  for (int y = 0; y < at.height(); ++y)
    for (int x = 0; x < at.width(); ++x) {
      const size_t di = size_t(at.y0 + y) * base.width + size_t(at.x0 + x);
      const int a = overlay.pixels[di];
      for (int c = 0; c < 3; ++c) {
        uint8_t& d = full.pixels[di * 3 + c];
        d = uint8_t((d * (255 - a) + gen.pixels[(size_t(y) * at.width() + x) * 3 + c] * a + 127) / 255);
      }
    }
  out = std::move(full);
}

InpaintPlan prepare_inpaint(const Image& init, const Image* mask, int proc_w, int proc_h, const InpaintSettings& s) {
  InpaintPlan plan;
  const bool outpaint = s.outpaint.any();
  DF_CHECK(outpaint != (mask != nullptr), "prepare_inpaint: a mask, or outpainting padding, expected (not both)");
  Image m, gen_mask;
  if (outpaint) {
    plan.base = pad_image(to_rgb(init), s.outpaint);
    // Poor man's outpainting: the mask's black area shrunk by 2 × blur (then blurred), the latent
    // mask's by blur / 2 (not blurred).
    m = outpaint_mask(init.width, init.height, s.outpaint, 2 * int(s.blur_x));
    gen_mask = outpaint_mask(init.width, init.height, s.outpaint, int(s.blur_x) / 2);
  } else {
    plan.base = to_rgb(init);
    m = mask_to_grey(*mask, true);
    DF_CHECK(m.width == plan.base.width && m.height == plan.base.height, "--mask image is ", m.width, "x", m.height,
             " but the init image is ", plan.base.width, "x", plan.base.height, ": they must be the same size");
    if (s.invert) m = invert_mask(m);
  }
  m = gaussian_blur_mask(m, s.blur_x, s.blur_y);
  if (!outpaint) gen_mask = m;
  if (s.only_masked && !outpaint) plan.box = only_masked_box(m, s.only_masked_padding, proc_w, proc_h);
  plan.only_masked = !plan.box.empty();
  if (plan.only_masked) {
    plan.width = proc_w;
    plan.height = proc_h;
    plan.init = resize_image(crop_image(plan.base, plan.box), proc_w, proc_h, 2);
    plan.mask = resize_image(crop_image(gen_mask, plan.box), proc_w, proc_h, 2);
    plan.overlay = m;
  } else {
    if (s.only_masked && (plan.base.width != proc_w || plan.base.height != proc_h)) {
      // An empty mask: A1111 falls back to img2img of the whole image, resized to the output.
      plan.base = resize_image(plan.base, proc_w, proc_h, 0);
      m = resize_image(m, proc_w, proc_h, 0);
      gen_mask = m;
    }
    plan.width = plan.base.width;
    plan.height = plan.base.height;
    plan.init = plan.base;
    plan.mask = gen_mask;
    plan.overlay = m;
    for (uint8_t& v : plan.overlay.pixels) v = uint8_t(std::min(2 * int(v), 255));  // A1111: clip(mask × 2)
  }
  if (s.content == MaskedContent::Fill) plan.init = fill_masked(plan.init, plan.mask);
  plan.composite = plan.only_masked || outpaint || s.blur_x > 0 || s.blur_y > 0;
  return plan;
}

}  // namespace diffuse
