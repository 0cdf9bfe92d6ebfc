// A request's inpainting controls and outpainting (Request::mask_blur … outpaint_*): their checks,
// the images the pipeline gets (pipeline/inpaint_prep.h) and their A1111 infotext entries.
#pragma once
#include <string>

#include "api/engine.h"
#include "pipeline/inpaint_prep.h"

namespace diffuse::api {

// Settings checks (before any image is read); throws diffuse::Error naming the CLI flag.
void check_inpaint_settings(const Request& r, Engine::ImagesGiven given);
// Whether the init image may differ from the output size (only masked, outpainting): then
// check_inpaint_images checks the sizes instead of the plain img2img rule.
bool inpaint_resizes(const Request& r);
void check_inpaint_images(const Request& r);
// The output (processing) size of a request with an init image.
void inpaint_output_size(const Request& r, int* w, int* h);
// Whether the run goes through prepare_inpaint (a mask or outpainting, with any control set).
bool uses_inpaint_plan(const Request& r);
InpaintSettings inpaint_settings(const Request& r);
MaskedContent masked_content(const Request& r);
// ", Mask blur: 4, Inpaint area: Only masked, …" (A1111's entries; "" none).
std::string inpaint_infotext(const Request& r, const InpaintPlan& plan);

}  // namespace diffuse::api
