// Fitting a request's images to its output size as A1111's img2img does: resize_mode (0 just
// resize, 1 crop and resize, 2 resize and fill) and the inpaint "only masked" crop
// (inpaint_full_res) with its paste-back.
#pragma once
#include <functional>

#include "server/request.h"

namespace diffuse::server {

// Fits spec.req's init and mask to req.width × req.height. Returns the paste-back step for
// inpaint_full_res (applied to each generated image), else an empty function.
std::function<void(Image&)> fit_request_images(JobSpec& spec);

}  // namespace diffuse::server
