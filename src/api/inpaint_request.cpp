// A request's inpainting controls and outpainting (inpaint_request.h).
#include "api/inpaint_request.h"

#include "core/error.h"

namespace diffuse::api {

namespace {

bool any_control(const Request& r) {
  return r.mask_blur >= 0 || r.mask_blur_y >= 0 || r.invert_mask || !r.masked_content.empty() || r.only_masked;
}

std::string pad_text(const Request& r) {
  return std::to_string(r.outpaint_left) + "," + std::to_string(r.outpaint_right) + "," +
         std::to_string(r.outpaint_top) + "," + std::to_string(r.outpaint_bottom);
}

}  // namespace

void check_inpaint_settings(const Request& r, Engine::ImagesGiven given) {
  const int pads[] = {r.outpaint_left, r.outpaint_right, r.outpaint_top, r.outpaint_bottom};
  for (int v : pads)
    DF_CHECK(v >= 0 && v <= kMaxImageSide, "--outpaint ", pad_text(r), ": each padding must be 0 to ", kMaxImageSide,
             " pixels");
  MaskedContent mc;
  DF_CHECK(r.masked_content.empty() || parse_masked_content(r.masked_content, &mc), "--masked-content ",
           r.masked_content, ": unknown; allowed: fill, original, latent-noise, latent-nothing");
  DF_CHECK(r.mask_blur >= -1 && r.mask_blur <= 64 && r.mask_blur_y >= -1 && r.mask_blur_y <= 64, "--mask-blur ",
           r.mask_blur, ": must be in [0, 64] pixels");
  DF_CHECK(r.only_masked_padding >= 0 && r.only_masked_padding <= 256, "--only-masked-padding ",
           r.only_masked_padding, ": must be in [0, 256] pixels");
  if (r.outpaint()) {
    DF_CHECK(given.init, "--outpaint needs an init image: give -i/--init");
    DF_CHECK(!given.mask, "--outpaint builds its own mask from the padding: leave --mask out");
    DF_CHECK(r.width == 0 && r.height == 0, "-W/--width, -H/--height do not apply with --outpaint: the output is the "
                                            "init image's size plus the padding");
    DF_CHECK(!r.only_masked, "--inpaint-only-masked does not apply with --outpaint");
    DF_CHECK(!r.invert_mask, "--invert-mask needs --mask (--outpaint's mask is the padding)");
    return;
  }
  if (given.mask) return;
  const char* flag = r.invert_mask ? "--invert-mask"
                     : r.only_masked ? "--inpaint-only-masked"
                     : !r.masked_content.empty() ? "--masked-content"
                                                 : "--mask-blur";
  DF_CHECK(!any_control(r), flag, " needs a mask: give -i/--init and --mask (or --outpaint)");
}

bool inpaint_resizes(const Request& r) { return r.outpaint() || r.only_masked; }

void inpaint_output_size(const Request& r, int* w, int* h) {
  if (r.outpaint()) {
    *w = r.init.width + r.outpaint_left + r.outpaint_right;
    *h = r.init.height + r.outpaint_top + r.outpaint_bottom;
  } else {
    *w = r.width ? r.width : r.init.width;
    *h = r.height ? r.height : r.init.height;
  }
}

void check_inpaint_images(const Request& r) {
  int w = 0, h = 0;
  inpaint_output_size(r, &w, &h);
  if (r.outpaint()) {
    DF_CHECK(w % 8 == 0 && h % 8 == 0 && w <= kMaxImageSide && h <= kMaxImageSide, "--outpaint ", pad_text(r),
             ": the init image (", r.init.width, "x", r.init.height, ") plus the padding is ", w, "x", h,
             "; width and height must be multiples of 8 up to ", kMaxImageSide, " (e.g. --outpaint ", r.outpaint_left,
             ",", r.outpaint_right + (8 - w % 8) % 8, ",", r.outpaint_top, ",", r.outpaint_bottom + (8 - h % 8) % 8, ")");
  } else {
    DF_CHECK(w % 8 == 0 && h % 8 == 0, "--inpaint-only-masked: the output size ", w, "x", h,
             " (the init image's unless -W/-H are given) must be multiples of 8");
  }
}

bool uses_inpaint_plan(const Request& r) {
  return !r.init.pixels.empty() && (r.outpaint() || (!r.mask.pixels.empty() && any_control(r)));
}

MaskedContent masked_content(const Request& r) {
  MaskedContent mc = r.outpaint() ? MaskedContent::Fill : MaskedContent::Original;
  if (!r.masked_content.empty()) parse_masked_content(r.masked_content, &mc);
  return mc;
}

InpaintSettings inpaint_settings(const Request& r) {
  InpaintSettings s;
  s.blur_x = r.mask_blur >= 0 ? r.mask_blur : r.outpaint() ? 4 : 0;
  s.blur_y = r.mask_blur_y >= 0 ? r.mask_blur_y : s.blur_x;
  s.invert = r.invert_mask;
  s.content = masked_content(r);
  s.only_masked = r.only_masked;
  s.only_masked_padding = r.only_masked_padding;
  s.outpaint = {r.outpaint_left, r.outpaint_right, r.outpaint_top, r.outpaint_bottom};
  return s;
}

std::string inpaint_infotext(const Request& r, const InpaintPlan& plan) {
  const InpaintSettings s = inpaint_settings(r);
  std::string t;
  if (s.invert) t += ", Mask mode: Inpaint not masked";
  if (s.blur_x > 0 || s.blur_y > 0) t += ", Mask blur: " + std::to_string(int(s.blur_x));
  if (plan.only_masked)
    t += ", Inpaint area: Only masked, Masked area padding: " + std::to_string(s.only_masked_padding);
  if (s.content != MaskedContent::Original) t += std::string(", Masked content: ") + masked_content_label(s.content);
  if (r.outpaint()) t += ", Outpaint: \"" + pad_text(r) + "\"";
  return t;
}

}  // namespace diffuse::api
