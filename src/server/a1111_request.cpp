// A1111's /sdapi/v1/txt2img and /sdapi/v1/img2img bodies → JobSpec: A1111's defaults and
// coercions, its sampler fallback (1.9+: an unknown name runs the default), ControlNet's
// alwayson_scripts unit, and warnings for the fields diffuse accepts but does not apply.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>

#include "core/error.h"
#include "server/request.h"

namespace diffuse::server {

namespace {

using json = nlohmann::json;

// A1111 1.9+'s default sampler (the first of its list). Its "Automatic" scheduler runs it with
// Karras sigmas (SamplerChoice::automatic).
constexpr const char* kDefaultSampler = "DPM++ 2M";

// The fields of A1111's API models (modules/api/models.py over StableDiffusionProcessingTxt2Img
// and Img2Img, v1.10) with their defaults: the echo (`parameters`) lists these, as A1111 does.
json common_defaults() {
  return {
      {"prompt", ""},
      {"negative_prompt", ""},
      {"styles", nullptr},
      {"seed", -1},
      {"subseed", -1},
      {"subseed_strength", 0},
      {"seed_resize_from_h", -1},
      {"seed_resize_from_w", -1},
      {"sampler_name", nullptr},
      {"scheduler", nullptr},
      {"batch_size", 1},
      {"n_iter", 1},
      {"steps", 50},
      {"cfg_scale", 7.0},
      {"width", 512},
      {"height", 512},
      {"restore_faces", nullptr},
      {"tiling", nullptr},
      {"do_not_save_samples", false},
      {"do_not_save_grid", false},
      {"eta", nullptr},
      {"s_min_uncond", nullptr},
      {"s_churn", nullptr},
      {"s_tmax", nullptr},
      {"s_tmin", nullptr},
      {"s_noise", nullptr},
      {"override_settings", nullptr},
      {"override_settings_restore_afterwards", true},
      {"refiner_checkpoint", nullptr},
      {"refiner_switch_at", nullptr},
      {"disable_extra_networks", false},
      {"firstpass_image", nullptr},
      {"comments", nullptr},
      {"infotext", nullptr},
      {"force_task_id", nullptr},
      {"sampler_index", kDefaultSampler},
      {"script_name", nullptr},
      {"script_args", json::array()},
      {"send_images", true},
      {"save_images", false},
      {"alwayson_scripts", json::object()},
  };
}

json txt2img_defaults() {
  json d = common_defaults();
  d.update({
      {"denoising_strength", nullptr},
      {"enable_hr", false},
      {"firstphase_width", 0},
      {"firstphase_height", 0},
      {"hr_scale", 2.0},
      {"hr_upscaler", nullptr},
      {"hr_second_pass_steps", 0},
      {"hr_resize_x", 0},
      {"hr_resize_y", 0},
      {"hr_checkpoint_name", nullptr},
      {"hr_sampler_name", nullptr},
      {"hr_scheduler", nullptr},
      {"hr_prompt", ""},
      {"hr_negative_prompt", ""},
  });
  return d;
}

json img2img_defaults() {
  json d = common_defaults();
  d.update({
      {"init_images", nullptr},
      {"resize_mode", 0},
      {"denoising_strength", 0.75},
      {"image_cfg_scale", nullptr},
      {"mask", nullptr},
      {"mask_blur_x", 4},
      {"mask_blur_y", 4},
      {"mask_blur", nullptr},
      {"mask_round", true},
      {"inpainting_fill", 0},
      {"inpaint_full_res", true},
      {"inpaint_full_res_padding", 0},
      {"inpainting_mask_invert", 0},
      {"initial_noise_multiplier", nullptr},
      {"latent_mask", nullptr},
      {"include_init_images", false},
  });
  return d;
}

// The body's known fields over the defaults, images nulled (A1111 drops init images and masks
// from `parameters`; ControlNet units' images go too, or the answer would carry them back).
json make_echo(const json& body, json echo) {
  for (auto it = echo.begin(); it != echo.end(); ++it) {
    auto b = body.find(it.key());
    if (b != body.end()) *it = *b;
  }
  for (const char* k : {"init_images", "mask", "latent_mask", "firstpass_image"})
    if (echo.contains(k)) echo[k] = nullptr;
  json& scripts = echo["alwayson_scripts"];
  if (scripts.is_object()) {
    for (auto& [key, script] : scripts.items()) {
      if (!script.is_object() || !script.contains("args") || !script["args"].is_array()) continue;
      for (json& unit : script["args"])
        if (unit.is_object())
          for (const char* k : {"image", "input_image", "mask", "mask_image"})
            if (unit.contains(k)) unit[k] = nullptr;
    }
  }
  return echo;
}

int size_field(const Fields& f, const char* key) {
  const int64_t v = f.integer(key, 1, kMaxImageSide).value_or(512);
  // A1111 samples latents of width / 8 × height / 8, so a size rounds down to a multiple of 8.
  if (v < 8) throw RequestError(422, key, cat(key, ": ", v, " is below 8 pixels (sizes are multiples of 8)"));
  return int(v / 8 * 8);
}

// Sampler and schedule as A1111 1.9+ resolves them: sampler_name (else the legacy sampler_index,
// else the default); a legacy suffix ("DPM++ 2M Karras") wins over `scheduler`; "Automatic" (or
// none, or a scheduler diffuse lacks) is the sampler's own (SamplerChoice::automatic); an unknown
// sampler runs the default with a warning instead of failing.
void resolve_sampler(const Fields& f, JobSpec& spec) {
  std::string asked = f.str("sampler_name").value_or("");
  const char* field = "sampler_name";
  if (name_key(asked).empty()) {
    asked = f.str("sampler_index").value_or("");
    field = "sampler_index";
  }
  spec.sampler_requested = asked;
  SamplerChoice c = map_a1111_sampler(name_key(asked).empty() ? kDefaultSampler : asked);
  if (c.sampler.empty()) {
    c = map_a1111_sampler(kDefaultSampler);
    spec.warnings.push_back(cat(field, " ", quote_name(asked), " is not available; ran ", kDefaultSampler));
  }
  std::string schedule = c.schedule;
  const std::string scheduler = f.str("scheduler").value_or("");
  if (schedule.empty() && !is_a1111_automatic(scheduler)) {
    schedule = map_a1111_scheduler(scheduler);
    if (schedule.empty())
      spec.warnings.push_back(cat("scheduler ", quote_name(scheduler), " is not available; ran Automatic"));
  }
  if (schedule.empty()) schedule = c.automatic;
  if ((schedule == "karras" && !c.karras_ok) || (schedule == "trailing" && !c.trailing_ok)) {
    spec.warnings.push_back(cat("schedule ", schedule, " does not apply to sampler ", c.sampler, "; ran its default"));
    schedule = "default";
  }
  spec.req.sampler = c.sampler;
  spec.req.schedule = schedule;
}

// Fields A1111 accepts that diffuse does not apply: a warning only where they would change the
// picture (a client sending A1111's defaults hears nothing).
void warn_ignored(const Fields& f, const Fields& overrides, JobSpec& spec) {
  auto warn = [&](std::string s) { spec.warnings.push_back(std::move(s)); };
  if (f.boolean("restore_faces").value_or(false)) warn("restore_faces: face restoration is not available; ignored");
  if (f.boolean("tiling").value_or(false)) warn("tiling: seamless tiling is not available; ignored");
  if (const json* s = f.get("styles");
      s && ((s->is_array() && !s->empty()) || (s->is_string() && !s->get_ref<const std::string&>().empty())))
    warn("styles: prompt styles are not applied");
  if (auto s = f.str("script_name"); s && !name_key(*s).empty() && name_key(*s) != "none")
    warn(cat("script_name ", quote_name(*s), " is not available; ignored"));
  if (auto s = f.str("infotext"); s && !s->empty()) warn("infotext: parameters text is not applied");
  if (auto v = overrides.str("sd_vae")) {
    const std::string l = name_key(*v);
    if (!l.empty() && l != "automatic" && l != "none")
      warn(cat("override_settings.sd_vae ", quote_name(*v), " is not applied; the model's own VAE ran"));
  }
}

// What txt2img and img2img share.
void parse_common(const json& body, const Limits& lim, JobSpec& spec) {
  const Fields f(body);
  api::Request& r = spec.req;
  spec.api = ApiKind::A1111;
  r.prompt = f.str("prompt").value_or("");
  r.negative = f.str("negative_prompt").value_or("");
  r.seed = f.seed("seed");
  // Variation seeds: a random subseed (-1) is drawn here so info can say which ran.
  r.subseed_strength = f.number("subseed_strength", 0, 1).value_or(0);
  if (r.subseed_strength > 0) {
    r.subseed = f.seed("subseed");
    if (!r.subseed) r.subseed = api::random_seed();
  }
  // The schedules have 1000 training timesteps: the engine takes at most that many steps.
  r.steps = int(f.integer("steps", 1, std::clamp(lim.max_steps, 1, 1000)).value_or(50));
  r.cfg = f.number("cfg_scale", 0, std::numeric_limits<double>::max()).value_or(7.0);

  r.width = size_field(f, "width");
  r.height = size_field(f, "height");
  if (int64_t(r.width) * r.height > lim.max_pixels)
    throw RequestError(422, "width, height",
                       cat("width, height: ", r.width, "x", r.height, " is ", int64_t(r.width) * r.height,
                           " pixels; the limit is ", lim.max_pixels));

  const int64_t max_batch = std::max(lim.max_batch, 1);
  // The engine runs at most 64 images side by side.
  r.batch = int(f.integer("batch_size", 1, std::min<int64_t>(max_batch, 64)).value_or(1));
  spec.n_iter = int(f.integer("n_iter", 1, max_batch).value_or(1));
  if (int64_t(r.batch) * spec.n_iter > max_batch)
    throw RequestError(422, "batch_size, n_iter",
                       cat("batch_size, n_iter: ", r.batch, " x ", spec.n_iter, " = ", int64_t(r.batch) * spec.n_iter,
                           " images; the limit is ", max_batch));

  const json* os = f.object("override_settings");
  static const json kNone;
  const Fields o(os ? *os : kNone, "override_settings.");
  // A1111's own setting first; the top-level clip_skip is SD.Next's (SillyTavern sends both).
  std::optional<int64_t> clip_skip = o.integer("CLIP_stop_at_last_layers", 0, 12);
  if (!clip_skip) clip_skip = f.integer("clip_skip", 0, 12);
  r.clip_skip = int(clip_skip.value_or(0));
  spec.model_alias = o.str("sd_model_checkpoint").value_or("");
  // The SDXL refiner (pipeline/refiner.h); A1111's UI default switch point 0.8 when none is sent.
  if (auto s = f.str("refiner_checkpoint"); s && !name_key(*s).empty() && name_key(*s) != "none") spec.refiner_alias = *s;
  r.refiner_switch = f.number("refiner_switch_at", 0, 1).value_or(0.8);
  // A1111: 0 turns live previews off, -1 shows only the finished image; neither previews steps.
  if (auto n = o.integer("show_progress_every_n_steps", -1, 1000000)) spec.preview_every = *n > 0 ? int(*n) : -1;

  spec.send_images = f.boolean("send_images").value_or(true);
  resolve_sampler(f, spec);
  warn_ignored(f, o, spec);
}

// ControlNet (Mikubill/sd-webui-controlnet) through alwayson_scripts: every enabled unit, in
// order (api::Request::controls). `enabled` defaults to false as in the extension's current
// ControlNetUnit. Without an image of its own, an img2img unit uses the init image (the extension
// does the same).
void parse_controlnet_unit(const Fields& u, const std::string& unit_name, const Limits& lim, JobSpec& spec,
                           bool img2img) {
  const api::Request& req = spec.req;
  api::ControlUnitRequest r;
  auto warn = [&](std::string s) { spec.warnings.push_back(std::move(s)); };
  const std::string model = u.str("model").value_or("");
  if (name_key(model).empty() || name_key(model) == "none") {
    warn(cat(unit_name, ": no model; the unit is ignored"));
    return;
  }
  // image: base64, or {image, mask} (the mask is not used); input_image is the legacy name.
  const char* image_key = u.get("image") || !u.get("input_image") ? "image" : "input_image";
  std::string image_field = u.name(image_key), image_b64;
  if (const json* image = u.get(image_key); image && image->is_object()) {
    const Fields inner(*image, image_field + ".");
    image_field = inner.name("image");
    image_b64 = inner.str("image").value_or("");
  } else {
    image_b64 = u.str(image_key).value_or("");
  }
  r.strength = u.number("weight", 0, 10).value_or(1.0);

  const std::string module = name_key(u.str("module").value_or("none"));
  if (module == "canny") {
    r.canny = true;
    // threshold_a / threshold_b are the extension's low / high thresholds (-1 or absent: 100 / 200).
    const double inf = std::numeric_limits<double>::infinity();
    const double a = u.number("threshold_a", -inf, inf).value_or(-1),
                 b = u.number("threshold_b", -inf, inf).value_or(-1);
    if (a > 0) r.canny_low = int(std::lround(std::min(a, 1e6)));
    if (b > 0) r.canny_high = int(std::lround(std::min(b, 1e6)));
    if (r.canny_low > r.canny_high || r.canny_high > 1020) {
      const std::string field = u.name("threshold_a") + ", threshold_b";
      throw RequestError(
          422, field,
          cat(field, ": the Canny thresholds ", r.canny_low, " / ", r.canny_high, " must satisfy low <= high <= 1020"));
    }
  } else if (!module.empty() && module != "none") {
    warn(cat(unit_name, ".module ", quote_name(module), " is not available; the image is used as the control map"));
  }
  r.start = u.number("guidance_start", 0, 1).value_or(0.0);
  r.end = u.number("guidance_end", 0, 1).value_or(1.0);
  if (r.start > r.end) {
    const std::string field = u.name("guidance_start") + ", guidance_end";
    throw RequestError(422, field, cat(field, ": guidance_start ", r.start, " is after guidance_end ", r.end));
  }
  if (const json* m = u.get("control_mode"); m && !(m->is_number() && m->get<double>() == 0) &&
                                             !(m->is_string() && name_key(m->get<std::string>()) == "balanced"))
    warn(cat(unit_name, ".control_mode is not applied; ran Balanced"));

  if (!image_b64.empty()) {
    r.image = decode_request_image(image_b64, image_field, lim);
  } else if (img2img) {
    r.image = req.init;
  } else {
    throw RequestError(422, u.name("image"), cat(u.name("image"), ": an enabled ControlNet unit needs an image"));
  }
  spec.req.controls.push_back(std::move(r));
  spec.control_models.push_back(model);
}

constexpr size_t kMaxControlUnits = 8;  // each holds a ControlNet and its residuals during a run

void parse_controlnet(const Fields& f, const Limits& lim, JobSpec& spec, bool img2img) {
  const json* scripts = f.object("alwayson_scripts");
  if (!scripts) return;
  for (const auto& [key, script] : scripts->items()) {
    const std::string base = f.name("alwayson_scripts.") + key;
    if (!script.is_object() && !script.is_null())
      throw RequestError(422, base, cat(base, ": expected an object ({\"args\": [...]})"));
    const Fields s(script, base + ".");
    const json* args = s.array("args");
    if (name_key(key) != "controlnet") {
      if (args && !args->empty()) spec.warnings.push_back(cat(base, ": the script is not available; ignored"));
      continue;
    }
    if (!args) continue;
    for (size_t i = 0; i < args->size(); ++i) {
      const std::string unit_name = cat(base, ".args[", i, "]");
      const json& unit = (*args)[i];
      if (!unit.is_object())
        throw RequestError(422, unit_name, cat(unit_name, ": expected an object (a ControlNet unit)"));
      const Fields u(unit, unit_name + ".");
      if (!u.boolean("enabled").value_or(false)) continue;
      if (spec.req.controls.size() >= kMaxControlUnits)
        throw RequestError(422, unit_name, cat(unit_name, ": at most ", kMaxControlUnits, " enabled ControlNet units"));
      parse_controlnet_unit(u, unit_name, lim, spec, img2img);
    }
  }
}

// A1111's mask: an RGBA mask that is not fully opaque is its alpha channel, anything else its
// luma (modules/processing.py create_binary_mask, PIL's "L" weights); white (opaque) = repaint.
// Kept grey (not rounded to black and white): the job runner fits it to the output size.
Image a1111_mask(const Image& im, bool invert) {
  const size_t n = size_t(im.width) * size_t(im.height);
  const int c = im.channels;
  bool use_alpha = false;
  if (c == 4)
    for (size_t i = 0; i < n && !use_alpha; ++i) use_alpha = im.pixels[i * 4 + 3] != 255;
  Image out;
  out.width = im.width;
  out.height = im.height;
  out.channels = 1;
  out.format = im.format;
  out.pixels.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &im.pixels[i * size_t(c)];
    uint8_t v;
    if (use_alpha)
      v = p[3];
    else if (c <= 2)
      v = p[0];
    else
      v = uint8_t((uint32_t(p[0]) * 19595 + uint32_t(p[1]) * 38470 + uint32_t(p[2]) * 7471 + 0x8000) >> 16);
    out.pixels[i] = invert ? uint8_t(255 - v) : v;
  }
  return out;
}

// init_images: a list of base64 images (a bare string is taken as a list of one); the first is
// used. Missing or empty is A1111's "Init image not found".
std::string first_init_image(const Fields& f, JobSpec& spec) {
  const json* init = f.get("init_images");
  const bool none = !init || (init->is_array() && init->empty()) ||
                    (init->is_string() && init->get_ref<const std::string&>().empty());
  if (none) throw RequestError(422, "init_images", "init_images: Init image not found");
  const json& first = init->is_array() ? (*init)[0] : *init;
  if (!first.is_string())
    throw RequestError(422, "init_images", "init_images: expected a list of base64 images (strings)");
  if (init->is_array() && init->size() > 1)
    spec.warnings.push_back(cat("init_images: ", init->size(), " images sent; only the first is used"));
  return first.get<std::string>();
}

// mask: a base64 image, or (defensively, as some clients send it) a list of one; "" is none.
std::string mask_image(const Fields& f) {
  const json* m = f.get("mask");
  if (!m) return "";
  if (m->is_array()) {
    if (m->empty()) return "";
    if (m->size() > 1) throw RequestError(422, "mask", cat("mask: expected one image, got a list of ", m->size()));
    m = &(*m)[0];
  }
  if (!m->is_string()) throw RequestError(422, "mask", "mask: expected a base64 image (a string)");
  return m->get<std::string>();
}

// A1111's hr_upscaler names -> the engine's (pipeline/hires.h); "" when not available here.
std::string hires_upscaler(const std::string& name) {
  static const std::pair<const char*, const char*> kNames[] = {
      {"Latent", "latent"},
      {"Latent (antialiased)", "latent-antialiased"},
      {"Latent (bicubic)", "latent-bicubic"},
      {"Latent (nearest)", "latent-nearest"},
      {"Latent (nearest-exact)", "latent-nearest-exact"},
      {"None", "lanczos"},  // A1111's "None": a plain (Lanczos) resize
      {"Lanczos", "lanczos"},
      {"Nearest", "nearest"},
  };
  for (const auto& [a1111, ours] : kNames)
    if (name == a1111) return ours;
  return "";
}

// enable_hr: the hires fix (hr_scale or hr_resize_x/y, hr_upscaler, hr_second_pass_steps,
// denoising_strength), its output size within the pixel limit.
void parse_hires(const Fields& f, const Limits& lim, JobSpec& spec) {
  api::Request& r = spec.req;
  r.hires_scale = f.number("hr_scale", 1, 8).value_or(2.0);
  r.hires_width = int(f.integer("hr_resize_x", 0, kMaxImageSide).value_or(0));
  r.hires_height = int(f.integer("hr_resize_y", 0, kMaxImageSide).value_or(0));
  r.hires_steps = int(f.integer("hr_second_pass_steps", 0, std::clamp(lim.max_steps, 1, 1000)).value_or(0));
  r.hires_denoise = f.number("denoising_strength", 0, 1).value_or(0.7);
  if (r.hires_denoise <= 0) throw RequestError(422, "denoising_strength", "denoising_strength: must be above 0 with enable_hr");
  const std::string name = f.str("hr_upscaler").value_or("Latent");
  r.hires_upscaler = hires_upscaler(name);
  if (r.hires_upscaler.empty()) {
    spec.warnings.push_back(cat("hr_upscaler: '", name, "' is not available; Latent was used"));
    r.hires_upscaler = "latent";
  }
  // A second pass with its own checkpoint, sampler or prompt is not available ("" and A1111's
  // "Use same ..." mean the first pass's).
  for (const char* k : {"hr_checkpoint_name", "hr_sampler_name", "hr_prompt", "hr_negative_prompt"}) {
    const std::string v = f.str(k).value_or("");
    if (!v.empty() && v.rfind("Use same", 0) != 0)
      spec.warnings.push_back(cat(k, ": a different second pass is not available; the first pass's was used"));
  }
  // The second pass's size (pipeline/hires.h hires_target), within the pixel limit.
  const int64_t w = r.width, h = r.height;
  int64_t tw = int64_t(double(w) * r.hires_scale), th = int64_t(double(h) * r.hires_scale);
  if (r.hires_width > 0 || r.hires_height > 0) {
    tw = r.hires_width > 0 ? r.hires_width : r.hires_height * w / h;
    th = r.hires_height > 0 ? r.hires_height : r.hires_width * h / w;
  }
  tw -= tw % 8;
  th -= th % 8;
  if (tw * th > lim.max_pixels)
    throw RequestError(422, "hr_scale", cat("hr_scale: the hires size ", tw, "x", th, " is ", tw * th,
                                            " pixels; the limit is ", lim.max_pixels));
}

}  // namespace

JobSpec parse_a1111_txt2img(const json& body, const Limits& lim) {
  JobSpec spec;
  parse_common(body, lim, spec);
  const Fields f(body);
  if (f.boolean("enable_hr").value_or(false)) parse_hires(f, lim, spec);
  parse_controlnet(f, lim, spec, false);
  spec.echo = make_echo(body, txt2img_defaults());
  return spec;
}

JobSpec parse_a1111_img2img(const json& body, const Limits& lim) {
  JobSpec spec;
  parse_common(body, lim, spec);
  const Fields f(body);
  api::Request& r = spec.req;
  r.strength = f.number("denoising_strength", 0, 1).value_or(0.75);
  spec.resize_mode = int(f.integer("resize_mode", 0, 3).value_or(0));
  if (spec.resize_mode == 3) {
    spec.warnings.push_back("resize_mode 3 (latent upscale) is not available; ran 0 (just resize)");
    spec.resize_mode = 0;
  }
  spec.inpaint_full_res = f.boolean("inpaint_full_res").value_or(true);
  spec.inpaint_full_res_padding = int(f.integer("inpaint_full_res_padding", 0, kMaxImageSide).value_or(0));
  spec.mask_invert = f.boolean("inpainting_mask_invert").value_or(false);
  // A1111's mask blur (mask_blur sets both axes) and masked content, for a request with a mask:
  // the engine blurs, fills and composites as A1111 does (api/inpaint_request.h).
  const int64_t blur = f.integer("mask_blur", 0, 64).value_or(-1);
  const int blur_x = int(blur >= 0 ? blur : f.integer("mask_blur_x", 0, 64).value_or(4));
  const int blur_y = int(blur >= 0 ? blur : f.integer("mask_blur_y", 0, 64).value_or(4));
  static const char* const kMaskedContent[] = {"fill", "original", "latent noise", "latent nothing"};
  const char* content = kMaskedContent[f.integer("inpainting_fill", 0, 3).value_or(0)];

  // Images last: every cheaper check has passed before anything is decoded.
  const std::string init = first_init_image(f, spec);
  const std::string mask = mask_image(f);
  r.init = decode_request_image(init, "init_images", lim);
  if (!mask.empty()) {
    r.mask = a1111_mask(decode_request_image(mask, "mask", lim), spec.mask_invert);
    r.mask_blur = blur_x;
    r.mask_blur_y = blur_y;
    r.masked_content = content;
  }
  parse_controlnet(f, lim, spec, true);
  spec.echo = make_echo(body, img2img_defaults());
  return spec;
}

}  // namespace diffuse::server
