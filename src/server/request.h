// What an HTTP request asks for, parsed and checked before anything runs: the A1111 routes
// (/sdapi/v1/txt2img, /sdapi/v1/img2img) and the OpenAI images routes (/v1/images/generations
// JSON, /v1/images/edits multipart) become one JobSpec around the engine's api::Request.
// Parsing needs only core + io (the fuzz build links it alone): sampler and scheduler names are
// mapped here to diffuse's names; the engine checks them again when the job runs.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "api/engine.h"
#include "io/image.h"

namespace diffuse::server {

// A request the server refuses: HTTP status (4xx), the request field it is about ("" none:
// the body as a whole) and the message (which names the field).
class RequestError : public std::runtime_error {
 public:
  RequestError(int status, std::string field, const std::string& msg)
      : std::runtime_error(msg), status(status), field(std::move(field)) {}
  int status;
  std::string field;
};

// Server limits (`diffuse serve --max-pixels/--max-steps/--max-batch/--max-body-mb`).
struct Limits {
  int64_t max_pixels = 2048 * 2048;    // width × height of the output (and of any input image)
  int max_steps = 150;
  int max_batch = 16;                  // images per request: batch_size × n_iter (OpenAI: n)
  size_t max_body_bytes = 64u << 20;   // checked by the HTTP layer (413)
};

enum class ApiKind { A1111, OpenAI };

struct JobSpec {
  ApiKind api = ApiKind::A1111;
  api::Request req;               // req.model empty: the server fills in the model (below)
  std::string model_alias;        // override_settings.sd_model_checkpoint / OpenAI `model` ("" none);
                                  // a generation falls back to the current model when it is unknown
  std::string refiner_alias;      // A1111 refiner_checkpoint ("" none): an unknown one is refused (as A1111)
  int n_iter = 1;                 // A1111: batches run one after another (req.batch each)
  bool send_images = true;
  std::string sampler_requested;  // the name as sent ("" none)
  int preview_every = 0;          // override_settings.show_progress_every_n_steps (0: server default;
                                  // -1: none, A1111's 0 "off" and -1 "at the end only")
  bool mask_invert = false;       // inpainting_mask_invert (already applied to req.mask)
  // img2img: req.init / req.mask / req.control_image keep their own sizes here; the job runner
  // fits them to req.width × req.height (A1111's resize_mode: 0 just resize, 1 crop and resize,
  // 2 resize and fill) and, with inpaint_full_res (A1111's API default: true), inpaints only the
  // mask's bounding box grown by the padding, at width × height, pasted back into the init image.
  int resize_mode = 0;
  bool inpaint_full_res = true;
  int inpaint_full_res_padding = 0;
  // alwayson_scripts.controlnet: each enabled unit's model name as sent, one per req.controls entry
  // (whose image, weight, canny thresholds and guidance start/end are set from the unit); the
  // registry resolves them into req.controls[i].net when the job is prepared.
  std::vector<std::string> control_models;
  std::vector<std::string> warnings;  // fields accepted but ignored, fallbacks (reported in `info`)
  nlohmann::json echo;            // A1111 `parameters`: the request with defaults filled, images nulled
};

// JSON body → json, 400 naming the problem (position) for malformed JSON and 422 when the body
// is not an object.
nlohmann::json parse_json_body(const std::string& body);

// A1111 txt2img / img2img bodies (A1111's defaults, unknown keys ignored, numbers as int or
// float, images bare base64 or data: URLs).
JobSpec parse_a1111_txt2img(const nlohmann::json& body, const Limits& lim);
JobSpec parse_a1111_img2img(const nlohmann::json& body, const Limits& lim);

// OpenAI: POST /v1/images/generations (JSON) and /v1/images/edits (multipart form fields).
struct FormField {
  std::string content, filename, content_type;
};
using Form = std::multimap<std::string, FormField>;
JobSpec parse_openai_generation(const nlohmann::json& body, const Limits& lim);
JobSpec parse_openai_edit(const Form& form, const Limits& lim);

// Base64 (standard and URL-safe alphabets, padding optional, whitespace skipped); throws
// RequestError(400, field, "<field>: invalid base64 ...").
std::vector<uint8_t> base64_decode(const std::string& s, const std::string& field);
std::string base64_encode(const uint8_t* data, size_t n);
// A request image: bare base64 or a data: URL (http(s) URLs refused), decoded as the CLI
// decodes files; hostile or oversized images are a RequestError(400) naming the field. Inputs may
// be larger than outputs (the job fits them to the output size), up to 4 × lim.max_pixels: the
// size a PNG or JPEG declares is checked before anything is allocated, the decoded size after.
Image decode_request_image(const std::string& s, const std::string& field, const Limits& lim);
// The same for an image's bytes (a multipart file).
Image decode_request_image_bytes(const uint8_t* data, size_t n, const std::string& field, const Limits& lim);

// Typed reads of a JSON object's fields, shared by the parsers. A missing key and null both read
// as absent (std::nullopt); a value of the wrong type or out of range is RequestError(422) naming
// the field by its full path (prefix + key: "override_settings.sd_vae"). Numbers may come as ints,
// floats or numeric strings, and integers as floats (truncated): pydantic's coercion, which A1111
// accepts and clients rely on. Booleans may also be 0/1 or "true"/"false".
class Fields {
 public:
  // obj (which must outlive the reader) need not be an object: anything else has no fields.
  explicit Fields(const nlohmann::json& obj, std::string prefix = "") : obj_(obj), prefix_(std::move(prefix)) {}
  std::string name(const std::string& key) const { return prefix_ + key; }
  const nlohmann::json* get(const std::string& key) const;  // nullptr: absent or null
  std::optional<std::string> str(const std::string& key) const;
  std::optional<double> number(const std::string& key, double lo, double hi) const;
  std::optional<int64_t> integer(const std::string& key, int64_t lo, int64_t hi) const;
  std::optional<bool> boolean(const std::string& key) const;
  const nlohmann::json* object(const std::string& key) const;  // nullptr: absent; 422 unless an object
  const nlohmann::json* array(const std::string& key) const;   // nullptr: absent; 422 unless an array
  // A seed: the whole uint64 range; -1 (and absent) is random (std::nullopt); other negatives wrap
  // modulo 2^64 as torch.manual_seed takes them (A1111 hands negative seeds to torch unchanged).
  std::optional<uint64_t> seed(const std::string& key) const;

 private:
  const nlohmann::json& obj_;
  std::string prefix_;
};

// A name a client sent, for a message or warning: quoted, control characters escaped, cut (at a
// UTF-8 character boundary) past 64 bytes. (Not `quoted`: for a non-const std::string argument,
// argument-dependent lookup would pick std::quoted.)
std::string quote_name(const std::string& s);
// s without surrounding whitespace, ASCII letters lower-cased: names (samplers, schedulers,
// scripts, preprocessors) compare case-insensitively, as A1111 looks them up.
std::string name_key(std::string_view s);

// A1111 sampler names ("Euler a", "DPM++ 2M Karras", "k_euler_a", diffuse's own names) → diffuse
// sampler + schedule; unknown → ("", "") (the caller falls back to the default, as A1111 1.9+).
struct SamplerChoice {
  std::string sampler, schedule;  // schedule "" when the name does not imply one
  // The schedule A1111 1.9+'s "Automatic" scheduler gives this sampler ("default" or "karras").
  std::string automatic;
  // Whether diffuse's sampler takes schedule karras / trailing (pipeline/samplers/registry.cpp:
  // the diffusers class has Karras sigmas / uses timestep_spacing).
  bool karras_ok = false, trailing_ok = false;
};
SamplerChoice map_a1111_sampler(const std::string& name);
// A1111 scheduler names/labels ("automatic", "Karras", "sgm_uniform", ...) → diffuse schedule
// ("default", "karras", "trailing"); "" for "automatic" (the sampler's own: SamplerChoice::automatic)
// and when diffuse has no equivalent (is_a1111_automatic tells the two apart).
std::string map_a1111_scheduler(const std::string& name);
bool is_a1111_automatic(const std::string& scheduler);
// The lists /sdapi/v1/samplers and /sdapi/v1/schedulers answer (A1111's item shapes).
nlohmann::json a1111_sampler_list();
nlohmann::json a1111_scheduler_list();

}  // namespace diffuse::server
