// Fitting a request's images to its output size as A1111's img2img does: resize_mode (0 just
// resize, 1 crop and resize, 2 resize and fill) and the inpaint "only masked" crop
// (inpaint_full_res) with its paste-back.
#pragma once
#include "server/request.h"

namespace diffuse::server {

// Fits spec.req's init and mask to req.width × req.height (resize_mode). With inpaint_full_res
// and a mask, the images keep the init's size and the request asks the engine for "only masked"
// (Request::only_masked: the crop, and the paste-back into the init image).
void fit_request_images(JobSpec& spec);

}  // namespace diffuse::server
