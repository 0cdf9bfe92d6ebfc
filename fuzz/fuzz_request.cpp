// libFuzzer: diffuse serve's request parsing must answer RequestError for anything hostile and
// never crash, hang or allocate without bound. The first byte picks the surface (mod 3):
//   0: the rest is a JSON body → parse_json_body, then A1111 txt2img, img2img, OpenAI generation
//   1: the rest is a crude multipart form → OpenAI edit. Fields: [name index][length, 2 bytes
//      little-endian][content] repeated (kNames below; image/mask fields are files)
//   2: the rest is a request image (base64 or a data: URL) → decode_request_image
// Only RequestError is expected: a diffuse::Error or nlohmann exception escaping a parser would be
// a 500 for a client's mistake, so it stays uncaught and counts as a finding.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "server/request.h"

namespace {

using diffuse::server::JobSpec;
using diffuse::server::Limits;
using diffuse::server::RequestError;

const char* const kNames[] = {"prompt",    "image",    "image[]",         "mask",    "n",         "size",
                              "model",     "seed",     "steps",           "sampler", "scheduler", "negative_prompt",
                              "cfg_scale", "strength", "response_format", "user"};

// What the server relies on once a parser accepted a request.
void check(const JobSpec& s, const Limits& lim) {
  const auto& r = s.req;
  if (r.width % 8 || r.height % 8 || r.width < 0 || r.height < 0) __builtin_trap();
  if (int64_t(r.width) * r.height > lim.max_pixels) __builtin_trap();
  if (r.steps < 1 || r.steps > lim.max_steps || r.batch < 1 || int64_t(r.batch) * s.n_iter > lim.max_batch)
    __builtin_trap();
  if (r.sampler.empty() || r.schedule.empty()) __builtin_trap();
  for (const diffuse::Image* im : {&r.init, &r.mask, &r.control_image})
    if (im->pixels.size() != size_t(im->width) * size_t(im->height) * size_t(im->channels)) __builtin_trap();
  if (!r.mask.pixels.empty() && r.mask.channels != 1) __builtin_trap();
  // The server sends warnings and the echo back as JSON: they must serialise.
  volatile size_t n = nlohmann::json{{"warnings", s.warnings}, {"echo", s.echo}, {"prompt", r.prompt}}.dump().size();
  (void)n;
}

template <typename Fn>
void attempt(Fn&& fn) {
  try {
    fn();
  } catch (const RequestError& e) {
    if (e.status < 400 || e.status > 499) __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  Limits lim;
  lim.max_pixels = 256 * 256;  // input images up to 4 × that: small allocations
  const std::string rest(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 3) {
    case 0: {
      nlohmann::json body;
      attempt([&] { body = diffuse::server::parse_json_body(rest); });
      if (!body.is_object()) break;
      attempt([&] { check(diffuse::server::parse_a1111_txt2img(body, lim), lim); });
      attempt([&] { check(diffuse::server::parse_a1111_img2img(body, lim), lim); });
      attempt([&] { check(diffuse::server::parse_openai_generation(body, lim), lim); });
      break;
    }
    case 1: {
      diffuse::server::Form form;
      size_t p = 0;
      while (p + 3 <= rest.size()) {
        const std::string name = kNames[uint8_t(rest[p]) % (sizeof kNames / sizeof kNames[0])];
        const size_t len =
            std::min<size_t>(uint8_t(rest[p + 1]) | size_t(uint8_t(rest[p + 2])) << 8, rest.size() - p - 3);
        const bool file = name == "image" || name == "image[]" || name == "mask";
        form.insert({name, {rest.substr(p + 3, len), file ? "f.png" : "", file ? "image/png" : ""}});
        p += 3 + len;
      }
      attempt([&] { check(diffuse::server::parse_openai_edit(form, lim), lim); });
      break;
    }
    default:
      attempt([&] {
        const diffuse::Image im = diffuse::server::decode_request_image(rest, "image", lim);
        if (int64_t(im.width) * im.height > lim.max_pixels * 4) __builtin_trap();
      });
  }
  return 0;
}
