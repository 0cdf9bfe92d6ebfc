// Fitting a request's images to its output size, as A1111's img2img does (image_fit.h).
#include "server/image_fit.h"

#include "pipeline/inpaint_prep.h"

namespace diffuse::server {

void fit_request_images(JobSpec& spec) {
  api::Request& r = spec.req;
  if (r.init.pixels.empty()) return;
  const int w = r.width ? r.width : r.init.width, h = r.height ? r.height : r.init.height;
  const bool has_mask = !r.mask.pixels.empty();
  if (has_mask && (r.mask.width != r.init.width || r.mask.height != r.init.height))
    r.mask = resize_image(r.mask, r.init.width, r.init.height, 0);
  r.width = w;
  r.height = h;
  if (has_mask && spec.inpaint_full_res) {
    // "Only masked": the engine crops the mask's box from the init image at its own size,
    // generates it at w × h and pastes it back (pipeline/inpaint_prep.h).
    r.only_masked = true;
    r.only_masked_padding = spec.inpaint_full_res_padding;
    return;
  }
  r.init = resize_image(r.init, w, h, spec.resize_mode);
  if (has_mask) r.mask = resize_image(r.mask, w, h, spec.resize_mode);
}

}  // namespace diffuse::server
