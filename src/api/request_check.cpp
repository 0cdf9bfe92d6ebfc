// Engine::validate_settings / validate: everything about a Request that can be checked before
// anything loads (flags' ranges, files that exist and are regular, prompts the encoders can take,
// image sizes), each error naming the CLI flag (the server and the C API map their fields to them).
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "api/engine.h"
#include "api/inpaint_request.h"
#include "core/error.h"
#include "core/text.h"
#include "io/output_file.h"
#include "pipeline/conditioning.h"
#include "pipeline/hires.h"
#include "pipeline/scheduler.h"

namespace diffuse::api {

namespace {

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// A prompt the text encoders can take: UTF-8, at most 64 KiB, at most kMaxChunks BREAK-separated
// parts, weights representable in f32 (checked before any model loads).
void check_prompt(const std::string& p, const char* flag) {
  constexpr size_t kMaxBytes = 65536;
  constexpr int kMaxBreaks = 256;
  DF_CHECK(valid_utf8(p), flag, ": not valid UTF-8 text (re-encode it, e.g. from Latin-1, as UTF-8)");
  DF_CHECK(p.size() <= kMaxBytes, flag, ": ", p.size(), " bytes; at most ", kMaxBytes);
  std::vector<WeightedText> runs;
  try {
    runs = parse_prompt_weights(p);
  } catch (const Error& e) {
    fail(flag, ": ", e.what());
  }
  int breaks = 0;
  for (const WeightedText& w : runs) breaks += w.is_break();
  DF_CHECK(breaks <= kMaxBreaks, flag, ": ", breaks, " BREAKs; at most ", kMaxBreaks);
}

// The hires-fix settings (ranges as A1111's UI, checked before anything loads).
void check_hires(const Request& r, Engine::ImagesGiven given) {
  const bool model_given = !r.hires_upscaler_model.empty();
  DF_CHECK(r.hires() || (!model_given && r.hires_steps == 0),
           "--hires-steps / --hires-upscaler-model need the hires fix: give --hires-scale S (or --hires-width/--hires-height)");
  if (!r.hires()) return;
  DF_CHECK(!given.init && !given.mask, "--hires-scale: the hires fix is for txt2img (no -i/--init, --mask)");
  DF_CHECK(std::isfinite(r.hires_scale) && (r.hires_scale == 0 || (r.hires_scale >= 1 && r.hires_scale <= 8)),
           "--hires-scale ", r.hires_scale, ": must be in [1, 8]");
  DF_CHECK(r.hires_width >= 0 && r.hires_width <= kMaxImageSide && r.hires_height >= 0 &&
               r.hires_height <= kMaxImageSide,
           "--hires-width / --hires-height: 0 to ", kMaxImageSide, " pixels");
  DF_CHECK(r.hires_steps >= 0 && r.hires_steps <= 1000, "--hires-steps ", r.hires_steps, ": must be in [0, 1000]");
  DF_CHECK(std::isfinite(r.hires_denoise) && r.hires_denoise > 0 && r.hires_denoise <= 1, "--hires-denoise ",
           r.hires_denoise, ": must be in (0, 1]");
  check_hires_upscaler(r.hires_upscaler);
  DF_CHECK((r.hires_upscaler == "esrgan") == model_given,
           model_given ? "--hires-upscaler-model needs --hires-upscaler esrgan"
                       : "--hires-upscaler esrgan: give the model with --hires-upscaler-model FILE");
  if (model_given) check_input_file(r.hires_upscaler_model, "--hires-upscaler-model");
}

}  // namespace

void Engine::validate_settings(const Request& r, ImagesGiven given) {
  std::error_code ec;
  DF_CHECK(!r.model.empty(), "-m/--model: a model file or diffusers folder is required");
  DF_CHECK(valid_utf8(r.model), "-m/--model: the path is not valid UTF-8");
  check_input_file(r.model, "-m/--model", true);
  DF_CHECK(r.rng == "cpu" || r.rng == "cuda", "--rng ", r.rng, ": unknown; allowed: cpu, cuda");
  DF_CHECK(r.schedule == "default" || r.schedule == "karras" || r.schedule == "trailing", "--scheduler ", r.schedule,
           ": unknown; allowed: default, karras, trailing");
  DF_CHECK(r.prediction.empty() || r.prediction == "eps" || r.prediction == "v" || r.prediction == "epsilon" ||
               r.prediction == "v_prediction",
           "--prediction ", r.prediction, ": unknown; allowed: eps, v");
  try {
    make_scheduler(r.sampler, r.schedule, Prediction::Epsilon);
  } catch (const Error& e) {
    const auto& names = sampler_names();
    if (std::find(names.begin(), names.end(), r.sampler) == names.end())
      fail("--sampler ", r.sampler, ": unknown; allowed: ", join(names));
    fail("--sampler ", r.sampler, " --scheduler ", r.schedule, ": ", e.what());
  }
  if (!r.refiner.empty()) check_input_file(r.refiner, "--refiner", true);
  DF_CHECK(std::isfinite(r.refiner_switch) && r.refiner_switch >= 0 && r.refiner_switch <= 1, "--refiner-switch ",
           r.refiner_switch, ": must be in [0, 1]");
  // The schedules have 1000 training timesteps; more sampling steps than that cannot be spaced.
  DF_CHECK(r.steps >= 1 && r.steps <= 1000, "--steps ", r.steps, ": must be in [1, 1000]");
  check_prompt(r.prompt, "-p/--prompt");
  check_prompt(r.negative, "-n/--negative");
  DF_CHECK(r.batch >= 1 && r.batch <= 64, "-b/--batch ", r.batch, ": must be in [1, 64]");
  DF_CHECK(r.clip_skip >= 0 && r.clip_skip <= 12, "--clip-skip ", r.clip_skip, ": must be in [0, 12]");
  DF_CHECK(std::isfinite(r.cfg) && r.cfg >= 0, "--cfg-scale ", r.cfg, ": must be a number >= 0");
  DF_CHECK(std::isfinite(r.subseed_strength) && r.subseed_strength >= 0 && r.subseed_strength <= 1,
           "--subseed-strength ", r.subseed_strength, ": must be in [0, 1]");
  DF_CHECK(std::isnan(r.strength) == false && (r.strength < 0 || r.strength <= 1.0), "--strength ", r.strength,
           ": must be in [0, 1]");
  const bool has_init = given.init, has_mask = given.mask;
  DF_CHECK(!has_mask || has_init, "--mask needs an init image: give -i/--init too");
  DF_CHECK(r.strength < 0 || has_init, "--strength applies to img2img/inpainting: give -i/--init too");
  DF_CHECK(r.width == 0 || (r.width > 0 && r.width % 8 == 0), "-W/--width ", r.width, ": must be a positive multiple of 8");
  DF_CHECK(r.height == 0 || (r.height > 0 && r.height % 8 == 0), "-H/--height ", r.height,
           ": must be a positive multiple of 8");
  DF_CHECK(r.width <= kMaxImageSide, "-W/--width ", r.width, ": at most ", kMaxImageSide, " pixels");
  DF_CHECK(r.height <= kMaxImageSide, "-H/--height ", r.height, ": at most ", kMaxImageSide, " pixels");
  DF_CHECK(r.vae_tiling.tile_px >= 2 * r.vae_tiling.overlap_px && r.vae_tiling.tile_px % 8 == 0, "--vae-tile-size ",
           r.vae_tiling.tile_px, ": must be a multiple of 8 and at least ", 2 * r.vae_tiling.overlap_px);
  DF_CHECK(r.control_net.empty() == !given.control_image,
           r.control_net.empty() ? "--control-image needs --control-net PATH" : "--control-net needs --control-image IMG");
  DF_CHECK(!r.canny || !r.control_net.empty(), "--canny needs --control-net and --control-image");
  if (!r.vae.empty()) {
    DF_CHECK(valid_utf8(r.vae), "--vae: the file name is not valid UTF-8");
    check_input_file(r.vae, "--vae");
  }
  if (!r.unet.empty()) {
    DF_CHECK(valid_utf8(r.unet), "--unet: the file name is not valid UTF-8");
    check_input_file(r.unet, "--unet", true);
  }
  if (!r.control_net.empty()) check_input_file(r.control_net, "--control-net", true);
  check_hires(r, given);
  check_inpaint_settings(r, given);
  DF_CHECK(std::isfinite(r.control_strength) && r.control_strength >= 0 && r.control_strength <= 10,
           "--control-strength ", r.control_strength, ": must be in [0, 10]");
  DF_CHECK(r.canny_low >= 0 && r.canny_low <= r.canny_high && r.canny_high <= 1020, "--canny-low ", r.canny_low,
           " / --canny-high ", r.canny_high, ": need 0 <= low <= high <= 1020");
  for (size_t i = 0; i < r.controls.size(); ++i)
    check_control_unit(r.controls[i], cat("ControlNet unit ", i + (r.control_net.empty() ? 0 : 1), " (",
                                          r.controls[i].net, ")"));
  for (const LoraSpec& l : r.loras) {
    DF_CHECK(valid_utf8(l.path), "--lora: the file name is not valid UTF-8");
    check_input_file(l.path, "--lora");
    DF_CHECK(std::isfinite(l.multiplier) && std::fabs(l.multiplier) <= 1000.0f, "--lora ", l.path, ": multiplier ",
             l.multiplier, " is out of range (at most ±1000)");
  }
}

void Engine::validate(const Request& r) {
  const bool has_init = !r.init.pixels.empty(), has_mask = !r.mask.pixels.empty();
  validate_settings(r, {has_init, has_mask, !r.control_image.pixels.empty()});
  if (has_init && inpaint_resizes(r)) {
    check_inpaint_images(r);  // only masked / outpainting: the init image is cropped or padded
  } else if (has_init) {
    const int w = r.width ? r.width : r.init.width, h = r.height ? r.height : r.init.height;
    DF_CHECK(r.init.width == w && r.init.height == h, "-i/--init image is ", r.init.width, "x", r.init.height,
             " but the output size is ", w, "x", h,
             ": images are not resized; give an image of the output size (or leave -W/-H out)");
    DF_CHECK(r.init.width % 8 == 0 && r.init.height % 8 == 0, "-i/--init image is ", r.init.width, "x",
             r.init.height, ": width and height must be multiples of 8");
  }
  if (has_mask)
    DF_CHECK(r.mask.width == r.init.width && r.mask.height == r.init.height, "--mask image is ", r.mask.width, "x",
             r.mask.height, " but the init image is ", r.init.width, "x", r.init.height,
             ": they must be the same size");
}

}  // namespace diffuse::api
