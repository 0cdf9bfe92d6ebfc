// OpenAI's images API → JobSpec: POST /v1/images/generations (JSON) and /v1/images/edits
// (multipart form). Every bad parameter is a 400 naming it (OpenAI's invalid_request_error).
// The answer is always b64_json PNG, so response_format, output_format, output_compression,
// quality, style, background, moderation, input_fidelity, stream and user are accepted and
// ignored. diffuse's extensions: negative_prompt, seed, steps, cfg_scale, sampler, scheduler
// (A1111 or diffuse names) and, for edits, strength.
#include <algorithm>
#include <charconv>
#include <limits>
#include <string_view>

#include "core/error.h"
#include "core/text.h"
#include "server/request.h"

namespace diffuse::server {

namespace {

using json = nlohmann::json;

constexpr int kDefaultSteps = 20;
constexpr const char* kDefaultSampler = "euler_a";

// OpenAI answers 400 for every bad parameter; the shared field reads say 422 (A1111's status).
template <typename Fn>
JobSpec as_400(Fn&& fn) {
  try {
    return fn();
  } catch (const RequestError& e) {
    if (e.status == 422) throw RequestError(400, e.field, e.what());
    throw;
  }
}

// size: "WIDTHxHEIGHT" (rounded down to multiples of 8) or "auto"; absent or auto leaves 0 (the
// model's native size, or an edit's image size).
void parse_size(const Fields& f, const Limits& lim, api::Request& r) {
  const std::string s = name_key(f.str("size").value_or(""));
  if (s.empty() || s == "auto") return;
  const auto bad = [&](const std::string& why) {
    return RequestError(400, "size", cat("size: ", quote_name(s), " ", why));
  };
  const size_t x = s.find('x');
  int64_t w = 0, h = 0;
  const auto number = [](std::string_view v, int64_t* out) {
    auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), *out);
    return !v.empty() && ec == std::errc() && p == v.data() + v.size();
  };
  if (x == std::string::npos || !number(std::string_view(s).substr(0, x), &w) ||
      !number(std::string_view(s).substr(x + 1), &h))
    throw bad("is not WIDTHxHEIGHT (e.g. \"1024x1024\") or \"auto\"");
  if (w < 8 || h < 8 || w > kMaxImageSide || h > kMaxImageSide)
    throw bad(cat("is out of range: each side 8 to ", kMaxImageSide, " pixels"));
  w = w / 8 * 8;  // the latents are 1/8 of the image
  h = h / 8 * 8;
  if (w * h > lim.max_pixels) throw bad(cat("is ", w * h, " pixels; the limit is ", lim.max_pixels));
  r.width = int(w);
  r.height = int(h);
}

// What generations and edits share: prompt, model, n, size and the extensions.
void parse_shared(const Fields& f, const Limits& lim, JobSpec& spec) {
  api::Request& r = spec.req;
  spec.api = ApiKind::OpenAI;
  r.prompt = f.str("prompt").value_or("");
  if (r.prompt.empty()) throw RequestError(400, "prompt", "prompt: required");
  spec.model_alias = f.str("model").value_or("");
  r.batch = int(f.integer("n", 1, std::clamp(lim.max_batch, 1, 64)).value_or(1));
  parse_size(f, lim, r);

  r.negative = f.str("negative_prompt").value_or("");
  r.seed = f.seed("seed");
  const int max_steps = std::clamp(lim.max_steps, 1, 1000);  // the engine's limit is 1000
  r.steps = int(f.integer("steps", 1, max_steps).value_or(std::min(kDefaultSteps, max_steps)));
  r.cfg = f.number("cfg_scale", 0, std::numeric_limits<double>::max()).value_or(7.0);
  // Sampler names as diffuse's CLI reads them: no A1111 "Automatic" schedule here, only what
  // the name (a legacy "... Karras") or `scheduler` says.
  const std::string sampler = f.str("sampler").value_or("");
  spec.sampler_requested = sampler;
  const SamplerChoice c = map_a1111_sampler(sampler.empty() ? kDefaultSampler : sampler);
  if (c.sampler.empty())
    throw RequestError(400, "sampler",
                       cat("sampler: ", quote_name(sampler), " is not available (GET /sdapi/v1/samplers lists them)"));
  std::string schedule = c.schedule.empty() ? "default" : c.schedule;
  if (auto s = f.str("scheduler"); s && !is_a1111_automatic(*s)) {
    schedule = map_a1111_scheduler(*s);
    if (schedule.empty())
      throw RequestError(400, "scheduler",
                         cat("scheduler: ", quote_name(*s), " is not available (allowed: default, karras, trailing)"));
  }
  if ((schedule == "karras" && !c.karras_ok) || (schedule == "trailing" && !c.trailing_ok))
    throw RequestError(400, "scheduler", cat("scheduler: ", schedule, " does not apply to sampler ", c.sampler));
  r.sampler = c.sampler;
  r.schedule = schedule;
}

bool is_file_field(const std::string& name) { return name == "image" || name == "image[]" || name == "mask"; }

// A form file; a text field holding a data: URL or base64 is taken too.
Image form_image(const FormField& field, const std::string& name, const Limits& lim) {
  const std::string& c = field.content;
  const bool binary =
      !c.empty() && (static_cast<unsigned char>(c[0]) == 0x89 || static_cast<unsigned char>(c[0]) == 0xFF);
  if (field.filename.empty() && !binary) return decode_request_image(c, name, lim);
  return decode_request_image_bytes(reinterpret_cast<const uint8_t*>(c.data()), c.size(), name, lim);
}

int alpha_channel(const Image& im) { return im.channels == 2 ? 1 : im.channels == 4 ? 3 : -1; }

}  // namespace

JobSpec parse_openai_generation(const json& body, const Limits& lim) {
  return as_400([&] {
    JobSpec spec;
    parse_shared(Fields(body), lim, spec);
    return spec;
  });
}

JobSpec parse_openai_edit(const Form& form, const Limits& lim) {
  return as_400([&] {
    // The text fields as a JSON object (the first of each name), so that the same reads apply:
    // numbers arrive as strings, which Fields takes.
    json text = json::object();
    for (const auto& [name, field] : form) {
      if (is_file_field(name) || text.contains(name)) continue;
      if (!valid_utf8(name)) throw RequestError(400, "", "a form field's name is not valid UTF-8");
      if (!valid_utf8(field.content)) throw RequestError(400, name, cat(printable(name), ": not valid UTF-8 text"));
      text[name] = field.content;
    }
    JobSpec spec;
    const Fields f(text);
    parse_shared(f, lim, spec);
    api::Request& r = spec.req;
    r.strength = f.number("strength", 0, 1).value_or(-1.0);

    auto image_it = form.find("image");
    const char* image_name = "image";
    if (image_it == form.end()) {
      image_it = form.find("image[]");
      image_name = "image[]";
    }
    if (image_it == form.end()) throw RequestError(400, "image", "image: required (a PNG or JPEG file)");
    if (form.count("image") + form.count("image[]") > 1)
      spec.warnings.push_back("image: several images sent; only the first is used");
    Image image = form_image(image_it->second, image_name, lim);

    // OpenAI's convention: fully transparent pixels (alpha 0) of the mask, or without a mask of
    // the image itself, are the area to edit. diffuse's mask is grey, white = repaint.
    Image mask;
    auto mask_it = form.find("mask");
    if (mask_it != form.end()) {
      mask = form_image(mask_it->second, "mask", lim);
      if (mask.width != image.width || mask.height != image.height)
        throw RequestError(400, "mask",
                           cat("mask: is ", mask.width, "x", mask.height, " but the image is ", image.width, "x",
                               image.height, "; they must be the same size"));
      if (alpha_channel(mask) < 0)
        throw RequestError(400, "mask",
                           "mask: has no alpha channel; its fully transparent pixels mark the area to edit");
    }
    const Image& source = mask_it != form.end() ? mask : image;
    const int a = alpha_channel(source);
    Image grey;
    grey.width = source.width;
    grey.height = source.height;
    grey.channels = 1;
    grey.pixels.assign(size_t(source.width) * size_t(source.height), 0);
    size_t transparent = 0;
    if (a >= 0) {
      for (size_t i = 0; i < grey.pixels.size(); ++i) {
        if (source.pixels[i * size_t(source.channels) + size_t(a)] != 0) continue;
        grey.pixels[i] = 255;
        ++transparent;
      }
    }
    if (transparent > 0)
      r.mask = std::move(grey);
    else if (mask_it != form.end())
      spec.warnings.push_back("mask: no fully transparent pixels; the whole image is edited (img2img)");
    r.init = image.channels == 3 ? std::move(image) : to_rgb(image);
    return spec;
  });
}

}  // namespace diffuse::server
