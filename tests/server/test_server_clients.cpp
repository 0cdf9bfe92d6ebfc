// The request sequences real clients send (../shared/notes/a1111-api.md §4.1 Open WebUI, §4.2
// SillyTavern, §4.4 webuiapi), replayed against `diffuse serve` with their headers and extra keys.
#include "server_util.h"

using namespace servertest;

namespace {

struct ClientsServer {
  Folders dirs{"clients"};
  ServerProcess srv{{"--models-dir", dirs.models, "--lora-dir", dirs.loras}, "clients"};
};

ClientsServer& shared() {
  static ClientsServer* s = new ClientsServer();
  return *s;
}

void expect_png_images(const httplib::Result& r, size_t n) {
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  ASSERT_TRUE(j["images"].is_array());
  ASSERT_EQ(j["images"].size(), n);
  for (const json& b64 : j["images"]) {
    const std::string s = b64;
    EXPECT_EQ(s.rfind("data:", 0), std::string::npos) << "images are bare base64";
    EXPECT_EQ(decode_b64_png(s).format, "png");
  }
  ASSERT_TRUE(j["info"].is_string());
  EXPECT_TRUE(json::parse(j["info"].get<std::string>()).is_object());
}

}  // namespace

// Open WebUI's "automatic1111" engine: verification, model list, model switch by echoing the whole
// options dict, txt2img with its params merged in, with an empty Authorization header throughout.
TEST(ServerClients, OpenWebUiSequence) {
  ClientsServer& s = shared();
  ASSERT_GT(s.srv.port(), 0) << s.srv.log();
  auto c = s.srv.client();
  const httplib::Headers h = {{"authorization", ""}};
  auto r = c.Get("/sdapi/v1/options", h);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200);
  json options = json::parse(r->body);
  const std::string current = options["sd_model_checkpoint"];

  r = c.Get("/sdapi/v1/sd-models", h);
  ASSERT_TRUE(r);
  json models = json::parse(r->body);
  ASSERT_EQ(models.size(), 2u);
  std::string other;
  for (const json& m : models) {
    ASSERT_TRUE(m["title"].is_string() && m["model_name"].is_string());
    if (m["title"] != current) other = m["title"];
  }
  ASSERT_FALSE(other.empty());

  // Model switch: GET options, replace the checkpoint, POST the whole dict back.
  options = json::parse(c.Get("/sdapi/v1/options", h)->body);
  options["sd_model_checkpoint"] = other;
  r = c.Post("/sdapi/v1/options", h, options.dump(), "application/json");
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(json::parse(c.Get("/sdapi/v1/options", h)->body)["sd_model_checkpoint"], other);

  json body = {{"prompt", "a lighthouse at dusk"}, {"batch_size", 2}, {"width", 64}, {"height", 64}, {"steps", 3},
               {"negative_prompt", "ugly"},
               // AUTOMATIC1111_PARAMS / the older CFG, sampler and scheduler settings
               {"cfg_scale", 6.5}, {"sampler_name", "DPM++ 2M"}, {"scheduler", "Karras"}};
  r = c.Post("/sdapi/v1/txt2img", h, body.dump(), "application/json");
  expect_png_images(r, 2);
  json info = json::parse(json::parse(r->body)["info"].get<std::string>());
  EXPECT_EQ(info["sampler_name"], "DPM++ 2M");
  EXPECT_EQ(info["extra_generation_params"]["Schedule type"], "Karras");
  EXPECT_EQ(info["prompt"], "a lighthouse at dusk");
}

// SillyTavern's "SD Web UI" source through its server-side proxy: every call carries
// "Authorization: Basic " + base64 of the (empty or "undefined") auth string.
TEST(ServerClients, SillyTavernSequence) {
  ClientsServer& s = shared();
  auto c = s.srv.client();
  for (const std::string auth : {"Basic ", "Basic dW5kZWZpbmVk"}) {
    const httplib::Headers h = {{"Authorization", auth}};
    ASSERT_EQ(c.Get("/sdapi/v1/options", h)->status, 200);  // ping
    json ups = json::parse(c.Get("/sdapi/v1/upscalers", h)->body);
    json latent = json::parse(c.Get("/sdapi/v1/latent-upscale-modes", h)->body);
    ASSERT_TRUE(ups.is_array() && latent.is_array());
    for (const json& u : ups) EXPECT_TRUE(u["name"].is_string());
    for (const char* list : {"/sdapi/v1/sd-vae", "/sdapi/v1/samplers", "/sdapi/v1/schedulers", "/sdapi/v1/sd-models"}) {
      auto r = c.Get(list, h);
      ASSERT_TRUE(r);
      ASSERT_EQ(r->status, 200) << list;
      json a = json::parse(r->body);
      ASSERT_TRUE(a.is_array()) << list;
      for (const json& x : a) EXPECT_TRUE(x.contains(std::string(list) == "/sdapi/v1/sd-vae" ? "model_name" :
                                                      std::string(list) == "/sdapi/v1/sd-models" ? "title" : "name"));
    }
    json models = json::parse(c.Get("/sdapi/v1/sd-models", h)->body);
    // get-model: the current checkpoint is one of the titles (so the dropdown preselects it).
    const std::string current = json::parse(c.Get("/sdapi/v1/options", h)->body)["sd_model_checkpoint"];
    bool listed = false;
    for (const json& m : models) listed |= m["title"] == current;
    EXPECT_TRUE(listed) << current;

    // set-model, then wait for idle as SillyTavern does (progress == 0 && job_count == 0).
    const std::string target = models[0]["title"];
    auto r = c.Post("/sdapi/v1/options", h, json{{"sd_model_checkpoint", target}}.dump(), "application/json");
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    bool idle = false;
    for (int i = 0; i < 10 && !idle; ++i) {
      json p = json::parse(c.Get("/sdapi/v1/progress", h)->body);
      idle = p["progress"] == 0 && p["state"]["job_count"] == 0;
      if (!idle) std::this_thread::sleep_for(std::chrono::seconds(2));  // SillyTavern's interval
    }
    EXPECT_TRUE(idle);

    // generate: the extension's body with its own url/auth keys and A1111 fields it always sends.
    json body = {{"url", "http://127.0.0.1:7860"}, {"auth", ""}, {"prompt", "a castle, <lora:style:0.5>"},
                 {"negative_prompt", "lowres"}, {"sampler_name", "Euler a"}, {"scheduler", "Automatic"},
                 {"steps", 3}, {"cfg_scale", 7}, {"width", 64}, {"height", 64}, {"restore_faces", false},
                 {"enable_hr", false}, {"hr_upscaler", "Latent"}, {"hr_scale", 2}, {"denoising_strength", 0.7},
                 {"hr_second_pass_steps", 0}, {"seed", 1234},
                 {"override_settings", {{"CLIP_stop_at_last_layers", 2}, {"sd_vae", "Automatic"}}},
                 {"override_settings_restore_afterwards", true}, {"clip_skip", 2}, {"save_images", true},
                 {"send_images", true}, {"do_not_save_grid", false}, {"do_not_save_samples", false}};
    r = c.Post("/sdapi/v1/txt2img", h, body.dump(), "application/json");
    expect_png_images(r, 1);
    json info = json::parse(json::parse(r->body)["info"].get<std::string>());
    EXPECT_EQ(info["seed"], 1234);
    EXPECT_EQ(info["clip_skip"], 2);
    const std::string params = info["infotexts"][0];
    EXPECT_NE(params.find("Clip skip: 2"), std::string::npos) << params;
    EXPECT_NE(params.find("Lora hashes"), std::string::npos) << params;
    // On the browser's abort SillyTavern fires interrupt; with nothing running it is harmless.
    EXPECT_EQ(c.Post("/sdapi/v1/interrupt", h, "", "application/json")->status, 200);
  }
}

// webuiapi (mix1009/sdwebuiapi): probes scripts, then sends its ~50 keys, ControlNet's empty args list
// included; img2img with its inpaint keys.
TEST(ServerClients, WebuiapiStyleBodies) {
  ClientsServer& s = shared();
  auto c = s.srv.client();
  ASSERT_EQ(c.Get("/sdapi/v1/scripts")->status, 200);
  json body = {{"enable_hr", false}, {"denoising_strength", 0.7}, {"firstphase_width", 0}, {"firstphase_height", 0},
               {"hr_scale", 2}, {"hr_upscaler", "Latent"}, {"hr_second_pass_steps", 0}, {"hr_resize_x", 0},
               {"hr_resize_y", 0}, {"prompt", "a bird"}, {"styles", json::array()}, {"seed", 7}, {"subseed", -1},
               {"subseed_strength", 0.0}, {"seed_resize_from_h", 0}, {"seed_resize_from_w", 0},
               {"sampler_name", "Euler a"}, {"batch_size", 1}, {"n_iter", 1}, {"steps", 3}, {"cfg_scale", 7.0},
               {"width", 64}, {"height", 64}, {"restore_faces", false}, {"tiling", false},
               {"do_not_save_samples", false}, {"do_not_save_grid", false}, {"negative_prompt", ""}, {"eta", 1.0},
               {"s_churn", 0}, {"s_tmax", 0}, {"s_tmin", 0}, {"s_noise", 1}, {"override_settings", json::object()},
               {"override_settings_restore_afterwards", true}, {"sampler_index", "Euler a"},
               {"script_name", nullptr}, {"script_args", json::array()}, {"send_images", true},
               {"save_images", false}, {"alwayson_scripts", {{"ControlNet", {{"args", json::array()}}}}},
               {"scheduler", "automatic"}};
  expect_png_images(post(c, "/sdapi/v1/txt2img", body), 1);

  diffuse::Image init;
  init.width = init.height = 64;
  init.channels = 3;
  init.pixels.assign(64 * 64 * 3, 128);
  body["init_images"] = {png_b64(init)};
  body["resize_mode"] = 0;
  body["mask"] = nullptr;
  body["mask_blur"] = 4;
  body["inpainting_fill"] = 0;
  body["inpaint_full_res"] = true;
  body["inpaint_full_res_padding"] = 0;
  body["inpainting_mask_invert"] = 0;
  body["include_init_images"] = false;
  expect_png_images(post(c, "/sdapi/v1/img2img", body), 1);
}
