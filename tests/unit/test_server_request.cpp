// Request parsing for diffuse serve: A1111 txt2img/img2img bodies, OpenAI generations and edits,
// base64, request images, sampler names — the mappings, the defaults and every refusal (status
// and field).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "io/image.h"
#include "server/request.h"

using diffuse::Image;
using diffuse::server::ApiKind;
using diffuse::server::base64_decode;
using diffuse::server::base64_encode;
using diffuse::server::decode_request_image;
using diffuse::server::Form;
using diffuse::server::JobSpec;
using diffuse::server::Limits;
using diffuse::server::RequestError;
using json = nlohmann::json;
namespace srv = diffuse::server;

namespace {

struct Caught {
  int status = 0;
  std::string field, message;
};

Caught caught(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const RequestError& e) {
    return {e.status, e.field, e.what()};
  }
  return {0, "", "<no RequestError>"};
}

// The statement is refused with this status and field, and the message names the field.
#define EXPECT_REFUSED(stmt, want_status, want_field)                          \
  do {                                                                         \
    const Caught c_ = caught([&] { stmt; });                                   \
    EXPECT_EQ(c_.status, want_status) << c_.message;                           \
    EXPECT_EQ(c_.field, want_field) << c_.message;                             \
    EXPECT_EQ(c_.message.rfind(std::string(want_field), 0), 0u) << c_.message; \
  } while (0)

// A PNG / JPEG of w × h with `channels` channels: pixel i, channel k = f(x, y, k).
Image make_image(int w, int h, int channels, const std::function<uint8_t(int, int, int)>& f) {
  Image im;
  im.width = w;
  im.height = h;
  im.channels = channels;
  im.pixels.resize(size_t(w) * h * channels);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int k = 0; k < channels; ++k) im.pixels[(size_t(y) * w + x) * channels + k] = f(x, y, k);
  return im;
}

std::string b64(const std::vector<uint8_t>& bytes) { return base64_encode(bytes.data(), bytes.size()); }

std::string png_b64(int w, int h, int channels = 3, uint8_t value = 128) {
  return b64(diffuse::encode_png(make_image(w, h, channels, [&](int, int, int) { return value; })));
}

std::string as_string(const std::vector<uint8_t>& b) { return std::string(b.begin(), b.end()); }

bool has_warning(const JobSpec& s, const std::string& part) {
  for (const std::string& w : s.warnings)
    if (w.find(part) != std::string::npos) return true;
  return false;
}

std::string all_warnings(const JobSpec& s) {
  std::string out;
  for (const std::string& w : s.warnings) out += w + "\n";
  return out;
}

JobSpec txt2img(const json& body, const Limits& lim = {}) { return srv::parse_a1111_txt2img(body, lim); }
JobSpec img2img(const json& body, const Limits& lim = {}) { return srv::parse_a1111_img2img(body, lim); }
JobSpec generation(const json& body, const Limits& lim = {}) { return srv::parse_openai_generation(body, lim); }
JobSpec edit(const Form& form, const Limits& lim = {}) { return srv::parse_openai_edit(form, lim); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// JSON body

TEST(ServerRequest, JsonBody) {
  EXPECT_EQ(srv::parse_json_body(R"({"prompt": "a cat"})")["prompt"], "a cat");
  const Caught bad = caught([] { srv::parse_json_body(R"({"prompt": )"); });
  EXPECT_EQ(bad.status, 400);
  EXPECT_EQ(bad.field, "");
  EXPECT_NE(bad.message.find("parse error"), std::string::npos) << bad.message;  // nlohmann's message
  EXPECT_EQ(caught([] { srv::parse_json_body(""); }).status, 400);
  EXPECT_EQ(caught([] { srv::parse_json_body("{\"a\": 1} x"); }).status, 400);
  EXPECT_EQ(caught([] { srv::parse_json_body("{\"steps\": 1e999}"); }).status, 400);  // nlohmann's out_of_range
  for (const char* not_object : {"[]", "1", "\"x\"", "null", "true"}) {
    const Caught c = caught([&] { srv::parse_json_body(not_object); });
    EXPECT_EQ(c.status, 422) << not_object;
    EXPECT_NE(c.message.find("object"), std::string::npos) << c.message;
  }
  // Deep nesting is refused before parsing (copies and dumps of such values recurse).
  const std::string deep = "{\"a\": " + std::string(100000, '[') + std::string(100000, ']') + "}";
  EXPECT_EQ(caught([&] { srv::parse_json_body(deep); }).status, 400);
  // Brackets inside strings do not count.
  EXPECT_NO_THROW(srv::parse_json_body("{\"a\": \"" + std::string(1000, '[') + "\\\"\"}"));
}

TEST(ServerRequest, FieldCoercions) {
  const json body = {{"t", true},
                     {"one", 1},
                     {"zero", 0.0},
                     {"yes", " TRUE "},
                     {"no", "off"},
                     {"two", 2},
                     {"s", "x"},
                     {"num", 12},
                     {"f", "1e3"},
                     {"neg", -5},
                     {"big", 18446744073709551615ull},
                     {"null", nullptr},
                     {"nested", {{"k", "v"}}}};
  const srv::Fields f(body);
  EXPECT_EQ(f.boolean("t"), true);
  EXPECT_EQ(f.boolean("one"), true);
  EXPECT_EQ(f.boolean("zero"), false);
  EXPECT_EQ(f.boolean("yes"), true);
  EXPECT_EQ(f.boolean("no"), false);
  EXPECT_FALSE(f.boolean("null").has_value());
  EXPECT_FALSE(f.boolean("missing").has_value());
  EXPECT_REFUSED(f.boolean("two"), 422, "two");
  EXPECT_REFUSED(f.boolean("s"), 422, "s");
  EXPECT_EQ(f.str("num"), "12");
  EXPECT_REFUSED(f.str("nested"), 422, "nested");
  EXPECT_EQ(f.number("f", 0, 10000), 1000.0);
  EXPECT_EQ(f.integer("f", 0, 10000), 1000);
  EXPECT_EQ(f.integer("neg", -10, 10), -5);
  EXPECT_REFUSED(f.integer("big", 0, 100), 422, "big");
  EXPECT_REFUSED(f.integer("neg", 0, 100), 422, "neg");
  EXPECT_REFUSED(f.array("s"), 422, "s");
  EXPECT_NE(f.object("nested"), nullptr);
  const srv::Fields inner(body["nested"], "nested.");
  EXPECT_EQ(inner.str("k"), "v");
  EXPECT_REFUSED(inner.integer("k", 0, 1), 422, "nested.k");
  // Anything but an object has no fields.
  EXPECT_FALSE(srv::Fields(json::array({1})).get("0"));
}

TEST(ServerRequest, NamesInMessages) {
  EXPECT_EQ(srv::quote_name("Euler"), "'Euler'");
  EXPECT_EQ(srv::quote_name("a\nb"), "'a\\x0ab'");
  // Cut past 64 bytes, never inside a UTF-8 character (é is 2 bytes).
  std::string s;
  for (int i = 0; i < 40; ++i) s += "\xc3\xa9";
  const std::string q = srv::quote_name(s);
  EXPECT_EQ(q.size(), 64u + 5u);    // 32 characters, the quotes and "..."
  EXPECT_NO_THROW(json(q).dump());  // still valid UTF-8
  EXPECT_EQ(srv::name_key("  DPM++ 2M Karras \t"), "dpm++ 2m karras");
}

// ---------------------------------------------------------------------------------------------
// Base64

TEST(ServerRequest, Base64RoundTrip) {
  std::mt19937 rng(7);
  for (size_t n = 0; n < 70; ++n) {
    std::vector<uint8_t> data(n);
    for (auto& b : data) b = uint8_t(rng());
    const std::string enc = base64_encode(data.data(), data.size());
    EXPECT_EQ(enc.size() % 4, 0u);
    EXPECT_EQ(base64_decode(enc, "x"), data) << n;
    // Without padding, URL-safe, with line breaks and spaces: the same bytes.
    std::string unpadded = enc;
    while (!unpadded.empty() && unpadded.back() == '=') unpadded.pop_back();
    EXPECT_EQ(base64_decode(unpadded, "x"), data) << n;
    std::string url = enc;
    for (char& c : url) c = c == '+' ? '-' : c == '/' ? '_' : c;
    EXPECT_EQ(base64_decode(url, "x"), data) << n;
    std::string spaced;
    for (size_t i = 0; i < enc.size(); ++i) spaced += std::string(i % 5 == 0 ? "\r\n " : "") + enc[i];
    EXPECT_EQ(base64_decode(spaced, "x"), data) << n;
  }
  EXPECT_EQ(as_string(base64_decode("Zm9vYmFy", "x")), "foobar");
  EXPECT_EQ(as_string(base64_decode("Zm9vYg", "x")), "foob");
  EXPECT_EQ(base64_encode(reinterpret_cast<const uint8_t*>("fo"), 2), "Zm8=");
  EXPECT_EQ(base64_encode(reinterpret_cast<const uint8_t*>("\xfb\xff"), 2), "+/8=");
  EXPECT_EQ(as_string(base64_decode("-_8=", "x")), "\xfb\xff");
}

TEST(ServerRequest, Base64Refusals) {
  EXPECT_REFUSED(base64_decode("Zm9v!mFy", "init_images"), 400, "init_images");
  EXPECT_REFUSED(base64_decode("Zm9vY", "mask"), 400, "mask");     // 6 bits: not a byte
  EXPECT_REFUSED(base64_decode("Zm8=Zm8=", "mask"), 400, "mask");  // data after the padding
  EXPECT_REFUSED(base64_decode(std::string("Zm\0v", 4), "mask"), 400, "mask");
  const Caught c = caught([] { base64_decode("Zm9v\x80", "image"); });
  EXPECT_NE(c.message.find("0x80"), std::string::npos) << c.message;
  EXPECT_NE(c.message.find("offset 4"), std::string::npos) << c.message;
}

// ---------------------------------------------------------------------------------------------
// Request images

TEST(ServerRequest, PngRoundTripsThroughDecodeRequestImage) {
  const Image src = make_image(24, 16, 4, [](int x, int y, int k) { return uint8_t(x * 7 + y * 13 + k * 50); });
  const std::string enc = b64(diffuse::encode_png(src));
  for (const std::string& s : {enc, "data:image/png;base64," + enc, "  DATA:image/png;BASE64," + enc + "\n"}) {
    const Image im = decode_request_image(s, "init_images", {});
    EXPECT_EQ(im.width, 24);
    EXPECT_EQ(im.height, 16);
    EXPECT_EQ(im.channels, 4);
    EXPECT_EQ(im.pixels, src.pixels);
  }
  // A JPEG (and a data: URL whose media type says otherwise: the bytes decide).
  const Image rgb = make_image(40, 32, 3, [](int x, int, int) { return uint8_t(x * 6); });
  const Image j = decode_request_image("data:image/png;base64," + b64(diffuse::encode_jpeg(rgb, 90)), "mask", {});
  EXPECT_EQ(j.format, "jpeg");
  EXPECT_EQ(j.width, 40);
  EXPECT_EQ(j.height, 32);
}

TEST(ServerRequest, RequestImageRefusals) {
  const Limits lim;
  EXPECT_REFUSED(decode_request_image("", "init_images", lim), 400, "init_images");
  EXPECT_REFUSED(decode_request_image("   ", "init_images", lim), 400, "init_images");
  const Caught url = caught([&] { decode_request_image("https://example.com/cat.png", "init_images", lim); });
  EXPECT_EQ(url.status, 400);
  EXPECT_NE(url.message.find("URLs are not fetched"), std::string::npos) << url.message;
  EXPECT_REFUSED(decode_request_image("HTTP://example.com/cat.png", "mask", lim), 400, "mask");
  EXPECT_REFUSED(decode_request_image("data:image/png," + png_b64(8, 8), "mask", lim), 400, "mask");  // not base64
  EXPECT_REFUSED(decode_request_image("data:image/png;base64", "mask", lim), 400, "mask");            // no comma
  EXPECT_REFUSED(decode_request_image(b64({'h', 'e', 'l', 'l', 'o'}), "mask", lim), 400, "mask");     // not an image
  // A truncated PNG: diffuse::Error becomes a 400 naming the field.
  std::string png = as_string(base64_decode(png_b64(16, 16), "x"));
  png.resize(png.size() / 2);
  const Caught cut = caught([&] {
    decode_request_image(base64_encode(reinterpret_cast<const uint8_t*>(png.data()), png.size()), "init_images", lim);
  });
  EXPECT_EQ(cut.status, 400);
  EXPECT_EQ(cut.field, "init_images");
  EXPECT_EQ(cut.message.rfind("init_images: ", 0), 0u) << cut.message;
}

// A PNG declaring 60000 × 60000 pixels is refused from its header, before anything is allocated.
TEST(ServerRequest, HostilePngDeclaring60000x60000) {
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
  for (uint32_t v : {60000u, 60000u})
    for (int s = 24; s >= 0; s -= 8) png.push_back(uint8_t(v >> s));
  for (uint8_t b : {8, 6, 0, 0, 0, 0, 0, 0, 0}) png.push_back(b);  // depth, RGBA, ..., CRC (unchecked)
  const Caught c = caught([&] { decode_request_image(b64(png), "init_images", {}); });
  EXPECT_EQ(c.status, 400);
  EXPECT_EQ(c.field, "init_images");
  EXPECT_NE(c.message.find("60000x60000"), std::string::npos) << c.message;
  // Within decode_image's own side limit but over 4 × max_pixels: still refused from the header,
  // for PNG (IHDR) and JPEG (SOF).
  Limits small;
  small.max_pixels = 32 * 32;
  const Image big = make_image(80, 64, 3, [](int, int, int) { return uint8_t(9); });
  for (const auto& bytes : {diffuse::encode_png(big), diffuse::encode_jpeg(big, 80)}) {
    const Caught d = caught([&] { decode_request_image(b64(bytes), "mask", small); });
    EXPECT_EQ(d.status, 400);
    EXPECT_NE(d.message.find("declares 80x64"), std::string::npos) << d.message;
  }
  // 4 × max_pixels is allowed (inputs may be larger than the output).
  EXPECT_NO_THROW(decode_request_image(png_b64(64, 64), "mask", small));
  EXPECT_REFUSED(decode_request_image(png_b64(64, 65), "mask", small), 400, "mask");
}

TEST(ServerRequest, GarbageImagesNeverCrash) {
  std::mt19937 rng(3);
  const std::vector<uint8_t> png = base64_decode(png_b64(8, 8), "x");
  for (int i = 0; i < 300; ++i) {
    std::vector<uint8_t> b = png;
    for (int k = 0; k < 4; ++k) b[rng() % b.size()] = uint8_t(rng());
    b.resize(rng() % (b.size() + 1));
    try {
      decode_request_image(b64(b), "init_images", {});
    } catch (const RequestError& e) {
      EXPECT_EQ(e.status, 400);
      EXPECT_EQ(e.field, "init_images");
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sampler and scheduler names

TEST(ServerRequest, SamplerNames) {
  struct Case {
    const char* in;
    const char* sampler;
    const char* schedule;
  };
  const Case cases[] = {
      {"Euler a", "euler_a", ""},
      {"euler A", "euler_a", ""},
      {"Euler", "euler", ""},
      {"LMS", "lms", ""},
      {"Heun", "heun", ""},
      {"DPM2", "dpm2", ""},
      {"DPM2 a", "dpm2_a", ""},
      {"DPM++ 2M", "dpm++2m", ""},
      {"DPM++ 2M SDE", "dpm++2m_sde", ""},
      {"DPM++ 2S a", "dpm++2s", ""},
      {"DPM++ 2S", "dpm++2s", ""},
      {"DDIM", "ddim", ""},
      {"PLMS", "pndm", ""},
      {"UniPC", "unipc", ""},
      {"DEIS", "deis", ""},
      {"LCM", "lcm", ""},
      {"DDPM", "ddpm", ""},
      {"  Euler a ", "euler_a", ""},
      {"DPM++ 2M Karras", "dpm++2m", "karras"},
      {"dpm++ 2m karras", "dpm++2m", "karras"},
      {"DPM2 a Karras", "dpm2_a", "karras"},
      {"DPM++ 2S a Karras", "dpm++2s", "karras"},
      {"LMS Karras", "lms", "karras"},
      {"Euler SGM Uniform", "euler", "trailing"},
      {"Euler Uniform", "euler", "default"},
      {"k_euler_a", "euler_a", ""},
      {"k_euler_ancestral", "euler_a", ""},
      {"k_euler", "euler", ""},
      {"k_lms", "lms", ""},
      {"k_heun", "heun", ""},
      {"k_dpm_2", "dpm2", ""},
      {"k_dpm_2_a", "dpm2_a", ""},
      {"k_dpmpp_2m", "dpm++2m", ""},
      {"k_dpmpp_2s_a", "dpm++2s", ""},
      {"k_dpmpp_2m_sde", "dpm++2m_sde", ""},
      {"k_dpmpp_2m_ka", "dpm++2m", "karras"},
      {"k_lms_ka", "lms", "karras"},
      {"euler_a", "euler_a", ""},
      {"dpm++2m", "dpm++2m", ""},
      {"dpm++2m_sde", "dpm++2m_sde", ""},
      {"pndm", "pndm", ""},
      {"Nonexistent", "", ""},
      {"", "", ""},
      {"Karras", "", ""},
      {"Foo Karras", "", ""},
      {"DPM++ SDE", "", ""},
      {"k_foo_ka", "", ""},
  };
  for (const Case& c : cases) {
    const srv::SamplerChoice got = srv::map_a1111_sampler(c.in);
    EXPECT_EQ(got.sampler, c.sampler) << c.in;
    EXPECT_EQ(got.schedule, c.schedule) << c.in;
  }
  // A1111 1.9+'s "Automatic": Karras for DPM++ 2M, DPM++ 2S a, DPM2, DPM2 a; the rest their own.
  for (const char* k : {"DPM++ 2M", "DPM++ 2S a", "DPM2", "DPM2 a"})
    EXPECT_EQ(srv::map_a1111_sampler(k).automatic, "karras") << k;
  for (const char* d : {"Euler a", "Euler", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM"})
    EXPECT_EQ(srv::map_a1111_sampler(d).automatic, "default") << d;
  // Which schedules apply (registry.cpp's has_sigmas / has_spacing).
  EXPECT_FALSE(srv::map_a1111_sampler("Euler a").karras_ok);
  EXPECT_TRUE(srv::map_a1111_sampler("Euler").karras_ok);
  EXPECT_FALSE(srv::map_a1111_sampler("DPM++ 2S a").trailing_ok);
  EXPECT_FALSE(srv::map_a1111_sampler("LCM").trailing_ok);
}

TEST(ServerRequest, SchedulerNames) {
  for (const char* a : {"automatic", "Automatic", " AUTOMATIC "}) {
    EXPECT_EQ(srv::map_a1111_scheduler(a), "") << a;
    EXPECT_TRUE(srv::is_a1111_automatic(a)) << a;
  }
  EXPECT_TRUE(srv::is_a1111_automatic(""));
  for (const char* k : {"karras", "Karras"}) EXPECT_EQ(srv::map_a1111_scheduler(k), "karras") << k;
  for (const char* u : {"uniform", "Uniform", "default"}) EXPECT_EQ(srv::map_a1111_scheduler(u), "default") << u;
  for (const char* t : {"sgm_uniform", "SGM Uniform", "SGMUniform", "trailing"})
    EXPECT_EQ(srv::map_a1111_scheduler(t), "trailing") << t;
  for (const char* n : {"exponential", "Beta", "align_your_steps", "garbage"}) {
    EXPECT_EQ(srv::map_a1111_scheduler(n), "") << n;
    EXPECT_FALSE(srv::is_a1111_automatic(n)) << n;
  }
}

TEST(ServerRequest, SamplerAndSchedulerLists) {
  const json samplers = srv::a1111_sampler_list();
  ASSERT_TRUE(samplers.is_array());
  EXPECT_EQ(samplers.size(), 15u);  // every diffuse sampler
  EXPECT_EQ(samplers[0]["name"], "DPM++ 2M");
  std::set<std::string> diffuse_names;
  for (const json& s : samplers) {
    ASSERT_TRUE(s["name"].is_string());
    ASSERT_TRUE(s["aliases"].is_array());
    ASSERT_TRUE(s["options"].is_object());
    const std::string own = srv::map_a1111_sampler(s["name"]).sampler;
    EXPECT_FALSE(own.empty()) << s;
    diffuse_names.insert(own);
    // Every alias maps back to the same sampler; diffuse's own name is among them.
    bool has_own = false;
    for (const json& a : s["aliases"]) {
      EXPECT_EQ(srv::map_a1111_sampler(a).sampler, own) << a;
      has_own = has_own || a == own;
    }
    EXPECT_TRUE(has_own) << s;
  }
  EXPECT_EQ(diffuse_names.size(), 15u);
  const json schedulers = srv::a1111_scheduler_list();
  ASSERT_EQ(schedulers.size(), 4u);
  const char* names[] = {"automatic", "uniform", "karras", "sgm_uniform"};
  for (size_t i = 0; i < 4; ++i) {
    const json& s = schedulers[i];
    EXPECT_EQ(s["name"], names[i]);
    for (const char* k : {"label", "aliases", "default_rho", "need_inner_model"}) EXPECT_TRUE(s.contains(k)) << k;
  }
  EXPECT_EQ(schedulers[2]["label"], "Karras");
  EXPECT_EQ(schedulers[2]["default_rho"], 7.0);
  EXPECT_EQ(schedulers[3]["aliases"], json::array({"SGMUniform"}));
  EXPECT_TRUE(schedulers[0]["aliases"].is_null());
}

// ---------------------------------------------------------------------------------------------
// A1111 txt2img

TEST(ServerRequest, Txt2ImgDefaults) {
  const JobSpec s = txt2img(json::object());
  EXPECT_EQ(s.api, ApiKind::A1111);
  EXPECT_EQ(s.req.prompt, "");
  EXPECT_EQ(s.req.steps, 50);
  EXPECT_EQ(s.req.cfg, 7.0);
  EXPECT_EQ(s.req.width, 512);
  EXPECT_EQ(s.req.height, 512);
  EXPECT_EQ(s.req.batch, 1);
  EXPECT_EQ(s.n_iter, 1);
  EXPECT_FALSE(s.req.seed.has_value());
  EXPECT_EQ(s.req.sampler, "dpm++2m");  // A1111 1.9+: DPM++ 2M under Automatic = Karras
  EXPECT_EQ(s.req.schedule, "karras");
  EXPECT_EQ(s.sampler_requested, "");
  EXPECT_EQ(s.req.clip_skip, 0);
  EXPECT_TRUE(s.send_images);
  EXPECT_EQ(s.preview_every, 0);
  EXPECT_EQ(s.model_alias, "");
  EXPECT_TRUE(s.control_models.empty() && s.req.controls.empty());
  EXPECT_TRUE(s.req.init.pixels.empty());
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  EXPECT_EQ(s.echo["steps"], 50);
  EXPECT_EQ(s.echo["width"], 512);
  EXPECT_EQ(s.echo["seed"], -1);
  EXPECT_EQ(s.echo["sampler_index"], "DPM++ 2M");
  EXPECT_EQ(s.echo["enable_hr"], false);
  EXPECT_FALSE(s.echo.contains("init_images"));
}

TEST(ServerRequest, Txt2ImgMapping) {
  const json body = {
      {"prompt", "a cat <lora:x:0.5>"},
      {"negative_prompt", "blurry"},
      {"seed", 1234},
      {"steps", 30},
      {"cfg_scale", 6.5},
      {"width", 768},
      {"height", 512},
      {"batch_size", 2},
      {"n_iter", 3},
      {"sampler_name", "Euler a"},
      {"send_images", false},
      {"override_settings", {{"sd_model_checkpoint", "v1-5 [6ce0161689]"}, {"show_progress_every_n_steps", 5}}},
  };
  const JobSpec s = txt2img(body);
  EXPECT_EQ(s.req.prompt, "a cat <lora:x:0.5>");
  EXPECT_EQ(s.req.negative, "blurry");
  EXPECT_EQ(s.req.seed, 1234u);
  EXPECT_EQ(s.req.steps, 30);
  EXPECT_EQ(s.req.cfg, 6.5);
  EXPECT_EQ(s.req.width, 768);
  EXPECT_EQ(s.req.height, 512);
  EXPECT_EQ(s.req.batch, 2);
  EXPECT_EQ(s.n_iter, 3);
  EXPECT_EQ(s.req.sampler, "euler_a");
  EXPECT_EQ(s.req.schedule, "default");
  EXPECT_EQ(s.sampler_requested, "Euler a");
  EXPECT_FALSE(s.send_images);
  EXPECT_EQ(s.model_alias, "v1-5 [6ce0161689]");
  EXPECT_EQ(s.preview_every, 5);
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  EXPECT_EQ(s.echo["prompt"], "a cat <lora:x:0.5>");
  EXPECT_EQ(s.echo["n_iter"], 3);
  EXPECT_EQ(s.echo["override_settings"]["show_progress_every_n_steps"], 5);
  // Numbers as floats and strings (pydantic's coercion).
  const JobSpec c = txt2img({{"steps", 20.7}, {"width", "640"}, {"cfg_scale", "7.5"}, {"batch_size", 2.0}});
  EXPECT_EQ(c.req.steps, 20);
  EXPECT_EQ(c.req.width, 640);
  EXPECT_EQ(c.req.cfg, 7.5);
  EXPECT_EQ(c.req.batch, 2);
  // Previews: A1111's 0 (off) and -1 (end only) are none.
  for (int n : {0, -1})
    EXPECT_EQ(txt2img({{"override_settings", {{"show_progress_every_n_steps", n}}}}).preview_every, -1) << n;
}

TEST(ServerRequest, Seeds) {
  EXPECT_EQ(txt2img({{"seed", 1.0}}).req.seed, 1u);
  EXPECT_EQ(txt2img({{"seed", 0}}).req.seed, 0u);
  EXPECT_EQ(txt2img({{"seed", 18446744073709551615ull}}).req.seed, 18446744073709551615ull);
  EXPECT_EQ(txt2img({{"seed", "18446744073709551615"}}).req.seed, 18446744073709551615ull);
  EXPECT_EQ(txt2img({{"seed", "42"}}).req.seed, 42u);
  EXPECT_FALSE(txt2img({{"seed", -1}}).req.seed.has_value());
  EXPECT_FALSE(txt2img({{"seed", -1.0}}).req.seed.has_value());
  EXPECT_FALSE(txt2img({{"seed", nullptr}}).req.seed.has_value());
  EXPECT_EQ(txt2img({{"seed", -2}}).req.seed, 18446744073709551614ull);  // torch.manual_seed wraps negatives
  EXPECT_REFUSED(txt2img({{"seed", "abc"}}), 422, "seed");
  EXPECT_REFUSED(txt2img({{"seed", json::object()}}), 422, "seed");
  EXPECT_REFUSED(txt2img({{"seed", 1e30}}), 422, "seed");
}

TEST(ServerRequest, SizesRoundDownAndLimits) {
  const JobSpec s = txt2img({{"width", 500}, {"height", 333}});
  EXPECT_EQ(s.req.width, 496);
  EXPECT_EQ(s.req.height, 328);
  EXPECT_EQ(txt2img({{"width", 2048}, {"height", 2048}}).req.width, 2048);  // exactly the default limit
  for (const json& bad : {json(0), json(-8), json(7), json("abc"), json(true), json::array()}) {
    EXPECT_REFUSED(txt2img({{"width", bad}}), 422, "width");
    EXPECT_REFUSED(txt2img({{"height", bad}}), 422, "height");
  }
  EXPECT_REFUSED(txt2img({{"width", 100000}}), 422, "width");
  const Caught c = caught([] { txt2img({{"width", 4096}, {"height", 2048}}); });
  EXPECT_EQ(c.status, 422);
  EXPECT_EQ(c.field, "width, height");
  EXPECT_NE(c.message.find(std::to_string(2048 * 2048)), std::string::npos) << c.message;  // the limit
  Limits small;
  small.max_pixels = 256 * 256;
  EXPECT_REFUSED(txt2img(json::object(), small), 422, "width, height");  // the 512x512 default
  EXPECT_NO_THROW(txt2img({{"width", 256}, {"height", 256}}, small));
}

TEST(ServerRequest, StepsAndBatchLimits) {
  EXPECT_EQ(txt2img({{"steps", 150}}).req.steps, 150);
  for (const json& bad : {json(0), json(151), json(-3), json("abc"), json(nullptr) /* absent: fine */}) {
    if (bad.is_null()) continue;
    EXPECT_REFUSED(txt2img({{"steps", bad}}), 422, "steps");
  }
  Limits lim;
  lim.max_steps = 10;
  EXPECT_REFUSED(txt2img({{"steps", 11}}, lim), 422, "steps");
  EXPECT_EQ(txt2img({{"batch_size", 4}, {"n_iter", 4}}).req.batch, 4);
  EXPECT_REFUSED(txt2img({{"batch_size", 5}, {"n_iter", 4}}), 422, "batch_size, n_iter");
  EXPECT_REFUSED(txt2img({{"batch_size", 17}}), 422, "batch_size");
  EXPECT_REFUSED(txt2img({{"batch_size", 0}}), 422, "batch_size");
  EXPECT_REFUSED(txt2img({{"n_iter", 0}}), 422, "n_iter");
  EXPECT_REFUSED(txt2img({{"n_iter", 17}}), 422, "n_iter");
  EXPECT_REFUSED(txt2img({{"cfg_scale", "x"}}), 422, "cfg_scale");
  EXPECT_REFUSED(txt2img({{"cfg_scale", -1}}), 422, "cfg_scale");
}

TEST(ServerRequest, ClipSkipAndOverrideSettings) {
  EXPECT_EQ(txt2img({{"clip_skip", 2}}).req.clip_skip, 2);
  EXPECT_EQ(txt2img({{"override_settings", {{"CLIP_stop_at_last_layers", 2}}}}).req.clip_skip, 2);
  // A1111's setting wins over SD.Next's top-level clip_skip.
  EXPECT_EQ(txt2img({{"clip_skip", 2}, {"override_settings", {{"CLIP_stop_at_last_layers", 3}}}}).req.clip_skip, 3);
  EXPECT_REFUSED(txt2img({{"override_settings", {{"CLIP_stop_at_last_layers", 13}}}}), 422,
                 "override_settings.CLIP_stop_at_last_layers");
  EXPECT_REFUSED(txt2img({{"clip_skip", "two"}}), 422, "clip_skip");
  EXPECT_REFUSED(txt2img({{"override_settings", "x"}}), 422, "override_settings");
  EXPECT_REFUSED(txt2img({{"override_settings", {{"sd_model_checkpoint", json::array()}}}}), 422,
                 "override_settings.sd_model_checkpoint");
  EXPECT_REFUSED(txt2img({{"send_images", "maybe"}}), 422, "send_images");
  EXPECT_REFUSED(txt2img({{"prompt", json::array({"a"})}}), 422, "prompt");
  EXPECT_REFUSED(txt2img({{"negative_prompt", json::object()}}), 422, "negative_prompt");
  for (const char* vae : {"Automatic", "None", ""})
    EXPECT_TRUE(txt2img({{"override_settings", {{"sd_vae", vae}}}}).warnings.empty()) << vae;
  EXPECT_TRUE(has_warning(txt2img({{"override_settings", {{"sd_vae", "vae-ft-mse.safetensors"}}}}), "sd_vae"));
}

TEST(ServerRequest, SamplerResolution) {
  struct Case {
    json body;
    const char* sampler;
    const char* schedule;
    bool warned;
  };
  const Case cases[] = {
      {{{"sampler_name", "Euler a"}}, "euler_a", "default", false},
      {{{"sampler_name", "DPM++ 2M"}, {"scheduler", "Automatic"}}, "dpm++2m", "karras", false},
      {{{"sampler_name", "DPM++ 2M"}, {"scheduler", "uniform"}}, "dpm++2m", "default", false},
      {{{"sampler_name", "Euler"}, {"scheduler", "Karras"}}, "euler", "karras", false},
      {{{"sampler_name", "Euler"}, {"scheduler", "sgm_uniform"}}, "euler", "trailing", false},
      {{{"sampler_name", "DPM2 a"}}, "dpm2_a", "karras", false},
      {{{"sampler_name", "DPM++ 2M Karras"}, {"scheduler", "sgm_uniform"}}, "dpm++2m", "karras", false},
      {{{"sampler_name", "UniPC"}, {"scheduler", "automatic"}}, "unipc", "default", false},
      {{{"sampler_name", "Euler a"}, {"scheduler", "karras"}}, "euler_a", "default", true},  // no sigmas
      {{{"sampler_name", "LCM"}, {"scheduler", "sgm_uniform"}}, "lcm", "default", true},     // no spacing
      {{{"sampler_name", "Euler"}, {"scheduler", "beta"}}, "euler", "default", true},        // not in diffuse
      {{{"sampler_name", "Restart"}}, "dpm++2m", "karras", true},                            // the default
      {{{"sampler_name", nullptr}, {"sampler_index", "Euler"}}, "euler", "default", false},
      {{{"sampler_name", ""}, {"sampler_index", "Heun"}}, "heun", "default", false},
      {{{"sampler_index", "DPM++ 2M"}}, "dpm++2m", "karras", false},
      {{{"sampler_name", "euler_a"}}, "euler_a", "default", false},
  };
  for (const Case& c : cases) {
    const JobSpec s = txt2img(c.body);
    EXPECT_EQ(s.req.sampler, c.sampler) << c.body;
    EXPECT_EQ(s.req.schedule, c.schedule) << c.body;
    EXPECT_EQ(!s.warnings.empty(), c.warned) << c.body << "\n" << all_warnings(s);
  }
  // The fallback's warning names what was asked and what ran.
  const JobSpec s = txt2img({{"sampler_name", "Restart"}});
  EXPECT_EQ(s.sampler_requested, "Restart");
  ASSERT_EQ(s.warnings.size(), 1u);
  EXPECT_NE(s.warnings[0].find("'Restart'"), std::string::npos) << s.warnings[0];
  EXPECT_NE(s.warnings[0].find("DPM++ 2M"), std::string::npos) << s.warnings[0];
  // A number is taken as a name (pydantic makes it a string): unknown, so the default runs.
  EXPECT_TRUE(has_warning(txt2img({{"sampler_name", 5.5}}), "'5.5'"));
}

// enable_hr: the hires fix with A1111's field names; unknown upscalers fall back to Latent with a
// warning; the second pass's size is held to the pixel limit.
TEST(ServerRequest, HiresFix) {
  JobSpec s = txt2img({{"enable_hr", true}, {"width", 256}, {"height", 192}});
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  EXPECT_TRUE(s.req.hires());
  EXPECT_EQ(s.req.hires_scale, 2.0);
  EXPECT_EQ(s.req.hires_upscaler, "latent");
  EXPECT_EQ(s.req.hires_denoise, 0.7);
  s = txt2img({{"enable_hr", true}, {"hr_scale", 1.5}, {"hr_upscaler", "Latent (nearest-exact)"},
               {"hr_second_pass_steps", 12}, {"denoising_strength", 0.45}, {"hr_sampler_name", "Use same sampler"}});
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  EXPECT_EQ(s.req.hires_scale, 1.5);
  EXPECT_EQ(s.req.hires_upscaler, "latent-nearest-exact");
  EXPECT_EQ(s.req.hires_steps, 12);
  EXPECT_EQ(s.req.hires_denoise, 0.45);
  s = txt2img({{"enable_hr", true}, {"hr_resize_x", 1024}, {"hr_upscaler", "Lanczos"}});
  EXPECT_EQ(s.req.hires_width, 1024);
  EXPECT_EQ(s.req.hires_upscaler, "lanczos");
  s = txt2img({{"enable_hr", true}, {"hr_upscaler", "R-ESRGAN 4x+"}, {"hr_prompt", "sharper"}});
  EXPECT_EQ(s.req.hires_upscaler, "latent");
  EXPECT_TRUE(has_warning(s, "hr_upscaler: 'R-ESRGAN 4x+'")) << all_warnings(s);
  EXPECT_TRUE(has_warning(s, "hr_prompt")) << all_warnings(s);
  EXPECT_FALSE(txt2img({{"enable_hr", false}, {"hr_scale", 2}}).req.hires());
  EXPECT_REFUSED(txt2img({{"enable_hr", true}, {"width", 2048}, {"height", 2048}, {"hr_scale", 2}}), 422, "hr_scale");
  EXPECT_REFUSED(txt2img({{"enable_hr", true}, {"hr_scale", 9}}), 422, "hr_scale");
  EXPECT_REFUSED(txt2img({{"enable_hr", true}, {"denoising_strength", 0}}), 422, "denoising_strength");
}

// Variation seeds: subseed and subseed_strength reach the request; a random subseed is drawn here.
TEST(ServerRequest, VariationSeeds) {
  JobSpec s = txt2img({{"subseed", 1234}, {"subseed_strength", 0.25}});
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  ASSERT_TRUE(s.req.subseed);
  EXPECT_EQ(*s.req.subseed, 1234u);
  EXPECT_EQ(s.req.subseed_strength, 0.25);
  s = txt2img({{"subseed", -1}, {"subseed_strength", 0.5}});
  EXPECT_TRUE(s.req.subseed.has_value());
  EXPECT_EQ(txt2img({{"subseed", 77}}).req.subseed_strength, 0.0);
  EXPECT_REFUSED(txt2img({{"subseed_strength", 1.5}}), 422, "subseed_strength");
}

TEST(ServerRequest, IgnoredFieldsWarnOnlyWhenTheyMatter) {
  const json harmless = {{"enable_hr", false},
                         {"restore_faces", false},
                         {"tiling", false},
                         {"styles", json::array()},
                         {"script_name", nullptr},
                         {"subseed_strength", 0},
                         {"eta", 0.5},
                         {"s_churn", 1},
                         {"hr_scale", 2},
                         {"override_settings_restore_afterwards", true},
                         {"do_not_save_grid", false}};
  EXPECT_TRUE(txt2img(harmless).warnings.empty()) << all_warnings(txt2img(harmless));
  const std::pair<json, const char*> cases[] = {
      {{{"restore_faces", true}}, "restore_faces"},
      {{{"tiling", true}}, "tiling"},
      {{{"styles", json::array({"cinematic"})}}, "styles"},
      {{{"script_name", "X/Y/Z plot"}}, "script_name"},
      {{{"infotext", "a cat\nSteps: 20"}}, "infotext"},
  };
  for (const auto& [body, name] : cases) {
    const JobSpec s = txt2img(body);
    EXPECT_EQ(s.warnings.size(), 1u) << body << "\n" << all_warnings(s);
    EXPECT_TRUE(has_warning(s, name)) << all_warnings(s);
  }
  EXPECT_REFUSED(txt2img({{"restore_faces", "abc"}}), 422, "restore_faces");
  EXPECT_REFUSED(txt2img({{"enable_hr", json::object()}}), 422, "enable_hr");
}

TEST(ServerRequest, Refiner) {
  const JobSpec none = txt2img({{"refiner_checkpoint", "None"}});
  EXPECT_TRUE(none.refiner_alias.empty());
  EXPECT_TRUE(none.warnings.empty()) << all_warnings(none);
  const JobSpec s = txt2img({{"refiner_checkpoint", "sd_xl_refiner_1.0.safetensors [7440042bbd]"}, {"refiner_switch_at", 0.7}});
  EXPECT_EQ(s.refiner_alias, "sd_xl_refiner_1.0.safetensors [7440042bbd]");  // resolved by the registry
  EXPECT_DOUBLE_EQ(s.req.refiner_switch, 0.7);
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  EXPECT_DOUBLE_EQ(txt2img({{"refiner_checkpoint", "r"}}).req.refiner_switch, 0.8);
  EXPECT_REFUSED(txt2img({{"refiner_switch_at", 1.5}}), 422, "refiner_switch_at");
}

// SillyTavern's proxy sends its own `url` and `auth` keys inside the body (notes §4.2).
TEST(ServerRequest, SillyTavernBody) {
  const json body = json::parse(R"({
    "url": "http://127.0.0.1:7860", "auth": "user:secret",
    "prompt": "a knight, masterpiece", "negative_prompt": "lowres", "sampler_name": "DPM++ 2M",
    "scheduler": "Karras", "steps": 25, "cfg_scale": 7, "width": 512, "height": 768,
    "restore_faces": false, "enable_hr": false, "hr_upscaler": "Latent", "hr_scale": 2,
    "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": 42,
    "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"},
    "override_settings_restore_afterwards": true, "clip_skip": 2,
    "save_images": true, "send_images": true, "do_not_save_grid": false, "do_not_save_samples": false
  })");
  const JobSpec s = txt2img(body);
  EXPECT_EQ(s.req.prompt, "a knight, masterpiece");
  EXPECT_EQ(s.req.sampler, "dpm++2m");
  EXPECT_EQ(s.req.schedule, "karras");
  EXPECT_EQ(s.req.steps, 25);
  EXPECT_EQ(s.req.height, 768);
  EXPECT_EQ(s.req.seed, 42u);
  EXPECT_EQ(s.req.clip_skip, 2);
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  // Unknown keys are not echoed (the auth string must not travel back).
  EXPECT_FALSE(s.echo.contains("url"));
  EXPECT_FALSE(s.echo.contains("auth"));
  EXPECT_EQ(s.echo["hr_upscaler"], "Latent");
}

// ---------------------------------------------------------------------------------------------
// A1111 img2img

TEST(ServerRequest, Img2ImgDefaultsAndImages) {
  const JobSpec s = img2img({{"init_images", json::array({png_b64(64, 48)})}, {"prompt", "x"}});
  EXPECT_EQ(s.req.init.width, 64);
  EXPECT_EQ(s.req.init.height, 48);
  EXPECT_TRUE(s.req.mask.pixels.empty());
  EXPECT_EQ(s.req.strength, 0.75);
  EXPECT_EQ(s.req.width, 512);  // A1111's default output size, the init image is fitted to it
  EXPECT_TRUE(s.inpaint_full_res);
  EXPECT_EQ(s.inpaint_full_res_padding, 0);
  EXPECT_EQ(s.resize_mode, 0);
  EXPECT_FALSE(s.mask_invert);
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  EXPECT_TRUE(s.echo["init_images"].is_null());
  EXPECT_EQ(s.echo["denoising_strength"], 0.75);
  EXPECT_EQ(s.echo["inpaint_full_res"], true);
  // A bare string, a data: URL, several images (the first used).
  EXPECT_EQ(img2img({{"init_images", png_b64(16, 16)}}).req.init.width, 16);
  EXPECT_EQ(img2img({{"init_images", {"data:image/png;base64," + png_b64(24, 8)}}}).req.init.width, 24);
  const JobSpec two = img2img({{"init_images", {png_b64(16, 16), png_b64(8, 8)}}});
  EXPECT_EQ(two.req.init.width, 16);
  EXPECT_TRUE(has_warning(two, "init_images"));
  const JobSpec m = img2img({{"init_images", {png_b64(16, 16)}},
                             {"denoising_strength", 0.4},
                             {"resize_mode", 2},
                             {"inpaint_full_res", 0},
                             {"inpaint_full_res_padding", 32}});
  EXPECT_EQ(m.req.strength, 0.4);
  EXPECT_EQ(m.resize_mode, 2);
  EXPECT_FALSE(m.inpaint_full_res);
  EXPECT_EQ(m.inpaint_full_res_padding, 32);
  const JobSpec latent = img2img({{"init_images", {png_b64(16, 16)}}, {"resize_mode", 3}});
  EXPECT_EQ(latent.resize_mode, 0);
  EXPECT_TRUE(has_warning(latent, "resize_mode"));
}

TEST(ServerRequest, Img2ImgRefusals) {
  for (const json& none : {json::object(), json({{"init_images", json::array()}}), json({{"init_images", nullptr}}),
                           json({{"init_images", ""}})}) {
    const Caught c = caught([&] { img2img(none); });
    EXPECT_EQ(c.status, 422) << none;
    EXPECT_EQ(c.field, "init_images");
    EXPECT_NE(c.message.find("Init image not found"), std::string::npos) << c.message;
  }
  const std::string png = png_b64(16, 16);
  EXPECT_REFUSED(img2img({{"init_images", {5}}}), 422, "init_images");
  EXPECT_REFUSED(img2img({{"init_images", {"not base64!"}}}), 400, "init_images");
  EXPECT_REFUSED(img2img({{"init_images", {"https://example.com/a.png"}}}), 400, "init_images");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"denoising_strength", 1.5}}), 422, "denoising_strength");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"denoising_strength", "x"}}), 422, "denoising_strength");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"resize_mode", 4}}), 422, "resize_mode");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"inpaint_full_res_padding", -1}}), 422, "inpaint_full_res_padding");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"mask", {png, png}}}), 422, "mask");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"mask", 3}}), 422, "mask");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"mask", "AAAA"}}), 400, "mask");
  EXPECT_REFUSED(img2img({{"init_images", {png}}, {"inpainting_mask_invert", 2}}), 422, "inpainting_mask_invert");
  // Cheap fields are checked before any image is decoded.
  EXPECT_REFUSED(img2img({{"init_images", {"garbage"}}, {"steps", 0}}), 422, "steps");
}

TEST(ServerRequest, Img2ImgMasks) {
  const std::string init = png_b64(8, 4);
  // White = repaint; grey RGB masks become one grey channel.
  const std::string rgb =
      b64(diffuse::encode_png(make_image(8, 4, 3, [](int x, int, int) { return uint8_t(x < 4 ? 255 : 0); })));
  for (const json& mask : {json(rgb), json::array({rgb})}) {
    const JobSpec s = img2img({{"init_images", {init}}, {"mask", mask}});
    ASSERT_EQ(s.req.mask.channels, 1);
    ASSERT_EQ(s.req.mask.pixels.size(), 32u);
    EXPECT_EQ(s.req.mask.pixels[0], 255);
    EXPECT_EQ(s.req.mask.pixels[7], 0);
    EXPECT_TRUE(s.echo["mask"].is_null());
  }
  // inpainting_mask_invert: applied to the mask.
  const JobSpec inv = img2img({{"init_images", {init}}, {"mask", rgb}, {"inpainting_mask_invert", 1}});
  EXPECT_TRUE(inv.mask_invert);
  EXPECT_EQ(inv.req.mask.pixels[0], 0);
  // Mask blur and masked content (A1111's API defaults: blur 4 on both axes, inpainting_fill 0 =
  // "fill"); mask_blur sets both axes; none of them without a mask.
  const JobSpec d = img2img({{"init_images", {init}}, {"mask", rgb}});
  EXPECT_EQ(d.req.mask_blur, 4);
  EXPECT_EQ(d.req.mask_blur_y, 4);
  EXPECT_EQ(d.req.masked_content, "fill");
  const JobSpec b = img2img({{"init_images", {init}}, {"mask", rgb}, {"mask_blur_x", 2}, {"inpainting_fill", 2}});
  EXPECT_EQ(b.req.mask_blur, 2);
  EXPECT_EQ(b.req.mask_blur_y, 4);
  EXPECT_EQ(b.req.masked_content, "latent noise");
  const JobSpec both = img2img({{"init_images", {init}}, {"mask", rgb}, {"mask_blur", 7}, {"mask_blur_y", 1}});
  EXPECT_EQ(both.req.mask_blur, 7);
  EXPECT_EQ(both.req.mask_blur_y, 7);
  const JobSpec plain = img2img({{"init_images", {init}}, {"mask_blur", 7}});
  EXPECT_EQ(plain.req.mask_blur, -1);
  EXPECT_TRUE(plain.req.masked_content.empty());
  EXPECT_REFUSED(img2img({{"init_images", {init}}, {"mask_blur", 65}}), 422, "mask_blur");
  EXPECT_REFUSED(img2img({{"init_images", {init}}, {"inpainting_fill", 4}}), 422, "inpainting_fill");
  EXPECT_EQ(inv.req.mask.pixels[7], 255);
  // An RGBA mask that is not fully opaque is its alpha (A1111's create_binary_mask).
  const std::string rgba = b64(diffuse::encode_png(make_image(8, 4, 4, [](int x, int, int k) {
    return uint8_t(k == 3 ? (x < 2 ? 255 : 0) : 255);  // white everywhere; opaque only at x < 2
  })));
  const JobSpec a = img2img({{"init_images", {init}}, {"mask", rgba}});
  EXPECT_EQ(a.req.mask.pixels[0], 255);
  EXPECT_EQ(a.req.mask.pixels[3], 0);
  // "" and [] are no mask.
  EXPECT_TRUE(img2img({{"init_images", {init}}, {"mask", ""}}).req.mask.pixels.empty());
  EXPECT_TRUE(img2img({{"init_images", {init}}, {"mask", json::array()}}).req.mask.pixels.empty());
}

// ---------------------------------------------------------------------------------------------
// ControlNet through alwayson_scripts

TEST(ServerRequest, ControlNetUnits) {
  const std::string control = png_b64(32, 24);
  const json unit = {{"enabled", true},   {"model", "control_v11p_sd15_canny [d14c016b]"},
                     {"module", "canny"}, {"image", control},
                     {"weight", 0.8},     {"threshold_a", 50},
                     {"threshold_b", 150}};
  const JobSpec s = txt2img({{"alwayson_scripts", {{"ControlNet", {{"args", {unit}}}}}}});
  ASSERT_EQ(s.control_models, std::vector<std::string>{"control_v11p_sd15_canny [d14c016b]"});
  ASSERT_EQ(s.req.controls.size(), 1u);
  const diffuse::api::ControlUnitRequest& u0 = s.req.controls[0];
  EXPECT_TRUE(u0.canny);
  EXPECT_EQ(u0.canny_low, 50);
  EXPECT_EQ(u0.canny_high, 150);
  EXPECT_DOUBLE_EQ(u0.strength, 0.8);
  EXPECT_EQ(u0.image.width, 32);
  EXPECT_EQ(u0.start, 0.0);
  EXPECT_EQ(u0.end, 1.0);
  EXPECT_TRUE(s.warnings.empty()) << all_warnings(s);
  // The echo keeps the unit without its image.
  EXPECT_TRUE(s.echo["alwayson_scripts"]["ControlNet"]["args"][0]["image"].is_null());
  EXPECT_EQ(s.echo["alwayson_scripts"]["ControlNet"]["args"][0]["model"], unit["model"]);

  // Disabled (or not marked enabled) units are skipped; every enabled one is used, in order, with
  // its guidance start/end.
  json off = unit, later = unit, depth = unit;
  off["enabled"] = false;
  off["model"] = "off";
  later["model"] = "later";
  json unmarked = unit;
  unmarked.erase("enabled");
  later["guidance_start"] = 0.25;
  later["guidance_end"] = 0.75;
  const JobSpec two = txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {off, unmarked, unit, later}}}}}}});
  EXPECT_EQ(two.control_models, (std::vector<std::string>{unit["model"], "later"}));
  ASSERT_EQ(two.req.controls.size(), 2u);
  EXPECT_EQ(two.req.controls[1].start, 0.25);
  EXPECT_EQ(two.req.controls[1].end, 0.75);
  EXPECT_TRUE(two.warnings.empty()) << all_warnings(two);
  // Thresholds -1 (the extension's "default"): 100 / 200.
  json dflt = unit;
  dflt["threshold_a"] = -1;
  dflt.erase("threshold_b");
  const JobSpec d = txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {dflt}}}}}}});
  EXPECT_EQ(d.req.controls.at(0).canny_low, 100);
  EXPECT_EQ(d.req.controls.at(0).canny_high, 200);
  // Other preprocessors: a warning, the image used as the map.
  depth["module"] = "depth_midas";
  const JobSpec dm = txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {depth}}}}}}});
  EXPECT_FALSE(dm.req.controls.at(0).canny);
  EXPECT_TRUE(has_warning(dm, "depth_midas"));
  json none = unit;
  none["module"] = nullptr;
  EXPECT_FALSE(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {none}}}}}}}).req.controls.at(0).canny);
  // {image, mask} and the legacy input_image.
  json nested = unit, legacy = unit;
  nested["image"] = {{"image", control}, {"mask", nullptr}};
  legacy.erase("image");
  legacy["input_image"] = control;
  EXPECT_EQ(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {nested}}}}}}}).req.controls.at(0).image.height, 24);
  EXPECT_EQ(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {legacy}}}}}}}).req.controls.at(0).image.height, 24);
  // No model: ignored with a warning.
  json nomodel = unit;
  nomodel["model"] = "None";
  const JobSpec nm = txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {nomodel}}}}}}});
  EXPECT_TRUE(nm.control_models.empty() && nm.req.controls.empty());
  EXPECT_TRUE(has_warning(nm, "no model"));
  // Other scripts: a warning when they have arguments (webuiapi sends empty ControlNet args).
  EXPECT_TRUE(has_warning(txt2img({{"alwayson_scripts", {{"ADetailer", {{"args", {true}}}}}}}), "ADetailer"));
  EXPECT_TRUE(txt2img({{"alwayson_scripts",
                        {{"ADetailer", {{"args", json::array()}}}, {"ControlNet", {{"args", json::array()}}}}}})
                  .warnings.empty());
}

TEST(ServerRequest, ControlNetImagesAndRefusals) {
  const json unit = {{"enabled", true}, {"model", "canny"}, {"module", "none"}};
  // txt2img needs the unit's image; img2img uses the init image.
  const std::string field = "alwayson_scripts.controlnet.args[0].image";
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {unit}}}}}}}), 422, field);
  const JobSpec s =
      img2img({{"init_images", {png_b64(40, 16)}}, {"alwayson_scripts", {{"controlnet", {{"args", {unit}}}}}}});
  EXPECT_EQ(s.req.controls.at(0).image.width, 40);
  EXPECT_EQ(s.control_models, std::vector<std::string>{"canny"});
  json bad = unit;
  bad["image"] = "!!";
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {bad}}}}}}}), 400, field);
  bad["image"] = {{"image", "!!"}};
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {bad}}}}}}}), 400, field + ".image");
  json weight = unit;
  weight["image"] = png_b64(8, 8);
  weight["weight"] = 11;
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {weight}}}}}}}), 422,
                 "alwayson_scripts.controlnet.args[0].weight");
  json thresholds = weight;
  thresholds["weight"] = 1;
  thresholds["module"] = "canny";
  thresholds["threshold_a"] = 250;
  thresholds["threshold_b"] = 100;
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {thresholds}}}}}}}), 422,
                 "alwayson_scripts.controlnet.args[0].threshold_a, threshold_b");
  json late = thresholds;
  late["module"] = "none";
  late["guidance_start"] = 0.8;
  late["guidance_end"] = 0.2;
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {late}}}}}}}), 422,
                 "alwayson_scripts.controlnet.args[0].guidance_start, guidance_end");
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", "x"}}), 422, "alwayson_scripts");
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", 5}}}}), 422, "alwayson_scripts.controlnet");
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", 5}}}}}}), 422,
                 "alwayson_scripts.controlnet.args");
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {5}}}}}}}), 422,
                 "alwayson_scripts.controlnet.args[0]");
  EXPECT_REFUSED(txt2img({{"alwayson_scripts", {{"controlnet", {{"args", {{{"enabled", "x"}}}}}}}}}), 422,
                 "alwayson_scripts.controlnet.args[0].enabled");
}

// ---------------------------------------------------------------------------------------------
// OpenAI generations

TEST(ServerRequest, OpenAIGeneration) {
  const JobSpec s = generation({{"prompt", "a lighthouse"}});
  EXPECT_EQ(s.api, ApiKind::OpenAI);
  EXPECT_EQ(s.req.prompt, "a lighthouse");
  EXPECT_EQ(s.req.steps, 20);
  EXPECT_EQ(s.req.sampler, "euler_a");
  EXPECT_EQ(s.req.schedule, "default");
  EXPECT_EQ(s.req.batch, 1);
  EXPECT_EQ(s.n_iter, 1);
  EXPECT_EQ(s.req.width, 0);  // the model's native size
  EXPECT_EQ(s.req.height, 0);
  EXPECT_FALSE(s.req.seed.has_value());
  // What Open WebUI sends, and fields that are accepted and ignored.
  const JobSpec w = generation({{"model", "sd_xl_base_1.0"},
                                {"prompt", "p"},
                                {"n", 2},
                                {"size", "1024x768"},
                                {"response_format", "b64_json"},
                                {"quality", "hd"},
                                {"style", "vivid"},
                                {"background", "transparent"},
                                {"output_format", "jpeg"},
                                {"user", "u1"}});
  EXPECT_EQ(w.model_alias, "sd_xl_base_1.0");
  EXPECT_EQ(w.req.batch, 2);
  EXPECT_EQ(w.req.width, 1024);
  EXPECT_EQ(w.req.height, 768);
  EXPECT_TRUE(w.warnings.empty()) << all_warnings(w);
  EXPECT_EQ(generation({{"prompt", "p"}, {"size", "auto"}}).req.width, 0);
  const JobSpec r = generation({{"prompt", "p"}, {"size", "1001x999"}});
  EXPECT_EQ(r.req.width, 1000);
  EXPECT_EQ(r.req.height, 992);
  // diffuse's extensions.
  const JobSpec e = generation({{"prompt", "p"},
                                {"negative_prompt", "n"},
                                {"seed", 7},
                                {"steps", 30},
                                {"cfg_scale", 5},
                                {"sampler", "DPM++ 2M Karras"}});
  EXPECT_EQ(e.req.negative, "n");
  EXPECT_EQ(e.req.seed, 7u);
  EXPECT_EQ(e.req.steps, 30);
  EXPECT_EQ(e.req.cfg, 5.0);
  EXPECT_EQ(e.req.sampler, "dpm++2m");
  EXPECT_EQ(e.req.schedule, "karras");
  EXPECT_EQ(e.sampler_requested, "DPM++ 2M Karras");
  EXPECT_EQ(generation({{"prompt", "p"}, {"sampler", "dpm++2m"}}).req.schedule, "default");
  const JobSpec t = generation({{"prompt", "p"}, {"sampler", "euler"}, {"scheduler", "trailing"}});
  EXPECT_EQ(t.req.schedule, "trailing");
}

TEST(ServerRequest, OpenAIGenerationRefusals) {
  EXPECT_REFUSED(generation(json::object()), 400, "prompt");
  EXPECT_REFUSED(generation({{"prompt", ""}}), 400, "prompt");
  EXPECT_REFUSED(generation({{"prompt", nullptr}}), 400, "prompt");
  EXPECT_REFUSED(generation({{"prompt", json::array()}}), 400, "prompt");
  for (const json& n : {json(0), json(17), json("many"), json(-1)})
    EXPECT_REFUSED(generation({{"prompt", "p"}, {"n", n}}), 400, "n");
  for (const char* size : {"big", "0x512", "512", "512x", "x512", "512x-8", "4096x4096", "20000x8", "512x512x1"})
    EXPECT_REFUSED(generation({{"prompt", "p"}, {"size", size}}), 400, "size");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"size", 512}}), 400, "size");  // "512": no height
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"size", json::object()}}), 400, "size");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"steps", "abc"}}), 400, "steps");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"steps", 151}}), 400, "steps");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"seed", "x"}}), 400, "seed");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"cfg_scale", true}}), 400, "cfg_scale");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"sampler", "bogus"}}), 400, "sampler");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"scheduler", "beta"}}), 400, "scheduler");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"sampler", "euler_a"}, {"scheduler", "karras"}}), 400, "scheduler");
  EXPECT_REFUSED(generation({{"prompt", "p"}, {"model", json::object()}}), 400, "model");
}

// ---------------------------------------------------------------------------------------------
// OpenAI edits (multipart)

namespace {

srv::FormField file(const std::vector<uint8_t>& bytes, const std::string& name = "image.png") {
  return {std::string(bytes.begin(), bytes.end()), name, "image/png"};
}

srv::FormField text(const std::string& s) { return {s, "", ""}; }

// 8 × 4 RGBA, white; alpha 0 where transparent(x, y).
std::vector<uint8_t> rgba_png(int w, int h, const std::function<bool(int, int)>& transparent) {
  return diffuse::encode_png(
      make_image(w, h, 4, [&](int x, int y, int k) { return uint8_t(k == 3 ? (transparent(x, y) ? 0 : 255) : 200); }));
}

}  // namespace

TEST(ServerRequest, OpenAIEditTransparentImage) {
  // Without a mask, the image's own transparent pixels are the area to edit.
  Form form{{"prompt", text("a hat")}, {"image", file(rgba_png(8, 4, [](int x, int) { return x >= 6; }))},
            {"n", text("2")},          {"size", text("256x256")},
            {"model", text("v1-5")},   {"response_format", text("b64_json")}};
  const JobSpec s = edit(form);
  EXPECT_EQ(s.api, ApiKind::OpenAI);
  EXPECT_EQ(s.req.prompt, "a hat");
  EXPECT_EQ(s.req.batch, 2);
  EXPECT_EQ(s.req.width, 256);
  EXPECT_EQ(s.model_alias, "v1-5");
  EXPECT_EQ(s.req.init.channels, 3);  // the alpha went into the mask
  EXPECT_EQ(s.req.init.width, 8);
  ASSERT_EQ(s.req.mask.channels, 1);
  ASSERT_EQ(s.req.mask.pixels.size(), 32u);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 8; ++x) EXPECT_EQ(s.req.mask.pixels[size_t(y) * 8 + x], x >= 6 ? 255 : 0) << x << "," << y;
  // Fully opaque (or RGB) images without a mask: plain img2img.
  Form opaque{{"prompt", text("p")}, {"image", file(rgba_png(8, 4, [](int, int) { return false; }))}};
  EXPECT_TRUE(edit(opaque).req.mask.pixels.empty());
  EXPECT_TRUE(edit(opaque).warnings.empty());
  Form rgb{{"prompt", text("p")},
           {"image[]", file(base64_decode(png_b64(16, 8), "x"))},
           {"image[]", file(base64_decode(png_b64(8, 8), "x"))}};
  const JobSpec r = edit(rgb);
  EXPECT_EQ(r.req.init.width, 16);
  EXPECT_TRUE(r.req.mask.pixels.empty());
  EXPECT_TRUE(has_warning(r, "only the first"));
  EXPECT_EQ(r.req.width, 0);  // no size: the image's own
}

TEST(ServerRequest, OpenAIEditMask) {
  const auto image = file(base64_decode(png_b64(8, 4), "x"));
  Form form{{"prompt", text("p")},
            {"image", image},
            {"mask", file(rgba_png(8, 4, [](int x, int y) { return x == 1 && y == 2; }), "mask.png")},
            {"strength", text("0.6")},
            {"seed", text("99")},
            {"steps", text("12")}};
  const JobSpec s = edit(form);
  ASSERT_EQ(s.req.mask.pixels.size(), 32u);
  for (size_t i = 0; i < 32; ++i) EXPECT_EQ(s.req.mask.pixels[i], i == 2 * 8 + 1 ? 255 : 0) << i;
  EXPECT_EQ(s.req.strength, 0.6);
  EXPECT_EQ(s.req.seed, 99u);
  EXPECT_EQ(s.req.steps, 12);
  // An opaque mask: nothing marked, plain img2img with a warning.
  Form opaque{{"prompt", text("p")}, {"image", image}, {"mask", file(rgba_png(8, 4, [](int, int) { return false; }))}};
  const JobSpec o = edit(opaque);
  EXPECT_TRUE(o.req.mask.pixels.empty());
  EXPECT_TRUE(has_warning(o, "mask"));
  // A base64 text field is taken as well.
  Form b64form{{"prompt", text("p")}, {"image", text("data:image/png;base64," + png_b64(8, 8))}};
  EXPECT_EQ(edit(b64form).req.init.width, 8);
}

TEST(ServerRequest, OpenAIEditRefusals) {
  const auto image = file(base64_decode(png_b64(8, 4), "x"));
  EXPECT_REFUSED(edit(Form{{"prompt", text("p")}}), 400, "image");
  EXPECT_REFUSED(edit(Form{{"image", image}}), 400, "prompt");
  EXPECT_REFUSED(edit(Form{{"prompt", text("")}, {"image", image}}), 400, "prompt");
  EXPECT_REFUSED(edit(Form({{"prompt", text("p")}, {"image", file({'n', 'o', 'p', 'e'})}})), 400, "image");
  EXPECT_REFUSED(
      edit(Form(
          {{"prompt", text("p")}, {"image", image}, {"mask", file(rgba_png(4, 4, [](int, int) { return true; }))}})),
      400, "mask");  // another size
  EXPECT_REFUSED(
      edit(Form({{"prompt", text("p")}, {"image", image}, {"mask", file(base64_decode(png_b64(8, 4), "x"))}})), 400,
      "mask");  // no alpha
  EXPECT_REFUSED(edit(Form({{"prompt", text("p")}, {"image", image}, {"n", text("0")}})), 400, "n");
  EXPECT_REFUSED(edit(Form({{"prompt", text("p")}, {"image", image}, {"size", text("huge")}})), 400, "size");
  EXPECT_REFUSED(edit(Form({{"prompt", text("p")}, {"image", image}, {"strength", text("2")}})), 400, "strength");
  EXPECT_REFUSED(edit(Form({{"prompt", text("a\xff")}, {"image", image}})), 400, "prompt");  // not UTF-8
  Limits small;
  small.max_pixels = 2 * 2;
  EXPECT_REFUSED(edit(Form({{"prompt", text("p")}, {"image", image}}), small), 400, "image");
}
