// `diffuse serve` over loopback with the tiny SD 1.x model: the A1111 routes' shapes, txt2img and
// img2img/inpainting answers (images equal to the CLI's), LoRA tags, model switching, png-info,
// errors, auth, CORS, the OpenAI routes and the web UI's page.
#include "server_util.h"

using namespace servertest;

namespace {

struct Shared {
  Folders dirs{"api"};
  ServerProcess srv{{"--models-dir", dirs.models, "--lora-dir", dirs.loras, "--max-pixels", "1048576"}, "api"};
};

Shared& shared() {
  static Shared* s = new Shared();  // one server for the suite; SIGTERM at exit (PDEATHSIG)
  return *s;
}

json txt2img_body(const std::string& prompt, int seed, int steps = 4) {
  return {{"prompt", prompt}, {"negative_prompt", "blurry"}, {"width", 64}, {"height", 64}, {"steps", steps},
          {"cfg_scale", 5}, {"seed", seed}, {"sampler_name", "Euler a"}};
}

}  // namespace

TEST(ServerApi, DiscoveryRoutesHaveA1111Shapes) {
  Shared& s = shared();
  ASSERT_GT(s.srv.port(), 0) << s.srv.log();
  auto c = s.srv.client();
  json models = parse(c.Get("/sdapi/v1/sd-models"));
  ASSERT_TRUE(models.is_array()) << models;
  ASSERT_EQ(models.size(), 2u);
  for (const json& m : models)
    for (const char* k : {"title", "model_name", "hash", "sha256", "filename", "config"}) EXPECT_TRUE(m.contains(k)) << k;
  EXPECT_EQ(models[0]["model_name"], "sub_other");
  EXPECT_NE(models[0]["title"].get<std::string>().find("sub/other.safetensors ["), std::string::npos);

  json opts = parse(c.Get("/sdapi/v1/options"));
  ASSERT_TRUE(opts.is_object());
  EXPECT_EQ(opts["sd_model_checkpoint"], models[0]["title"]);  // the first checkpoint is current at start

  json samplers = parse(c.Get("/sdapi/v1/samplers"));
  ASSERT_TRUE(samplers.is_array());
  bool euler_a = false;
  for (const json& x : samplers) {
    EXPECT_TRUE(x.contains("aliases") && x.contains("options"));
    euler_a |= x["name"] == "Euler a";
  }
  EXPECT_TRUE(euler_a);
  json sched = parse(c.Get("/sdapi/v1/schedulers"));
  ASSERT_TRUE(sched.is_array() && !sched.empty());
  for (const char* k : {"name", "label", "aliases", "default_rho", "need_inner_model"}) EXPECT_TRUE(sched[0].contains(k));
  json ups = parse(c.Get("/sdapi/v1/upscalers"));
  ASSERT_TRUE(ups.is_array() && !ups.empty());
  EXPECT_EQ(ups[0]["name"], "None");
  EXPECT_TRUE(parse(c.Get("/sdapi/v1/sd-vae")).is_array());
  EXPECT_TRUE(parse(c.Get("/sdapi/v1/latent-upscale-modes")).is_array());
  json loras = parse(c.Get("/sdapi/v1/loras"));
  ASSERT_EQ(loras.size(), 1u);
  EXPECT_EQ(loras[0]["name"], "style");
  json prog = parse(c.Get("/sdapi/v1/progress"));
  for (const char* k : {"progress", "eta_relative", "state", "current_image", "textinfo"}) EXPECT_TRUE(prog.contains(k));
  for (const char* k : {"job_count", "job_no", "sampling_step", "sampling_steps", "interrupted", "skipped", "job_timestamp"})
    EXPECT_TRUE(prog["state"].contains(k)) << k;
  EXPECT_EQ(c.Post("/sdapi/v1/refresh-checkpoints")->status, 200);
  EXPECT_EQ(c.Post("/sdapi/v1/refresh-loras")->status, 200);
  auto nf = c.Get("/sdapi/v1/no-such-route");
  ASSERT_TRUE(nf);
  EXPECT_EQ(nf->status, 404);
}

TEST(ServerApi, Txt2ImgAnswersLikeA1111AndEqualsTheCli) {
  Shared& s = shared();
  auto c = s.srv.client();
  json body = txt2img_body("a red cube", 42);
  body["n_iter"] = 2;
  body["some_unknown_key"] = {{"x", 1}};
  auto r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  ASSERT_EQ(j["images"].size(), 2u);
  ASSERT_TRUE(j["info"].is_string());
  json info = json::parse(j["info"].get<std::string>());
  EXPECT_EQ(info["seed"], 42);
  EXPECT_EQ(info["all_seeds"], json({42, 43}));  // batch k of n_iter starts at seed + k·batch_size
  EXPECT_EQ(info["prompt"], "a red cube");
  EXPECT_EQ(info["sampler_name"], "Euler a");
  EXPECT_EQ(info["infotexts"].size(), 2u);
  EXPECT_TRUE(j["parameters"].is_object());
  const diffuse::Image im = decode_b64_png(j["images"][0]);
  EXPECT_EQ(im.width, 64);
  const std::string params = text_of(im, "parameters");
  EXPECT_NE(params.find("Seed: 42"), std::string::npos) << params;
  EXPECT_NE(params.find("a red cube"), std::string::npos);

  // The same settings through the CLI: the same pixels.
  const std::string out = s.dirs.root + "/cli.png";
  const std::string cmd = std::string(DIFFUSE_BIN) + " generate -q -m " + s.dirs.models + "/sub/other.safetensors" +
                          " -p 'a red cube' -n blurry -W 64 -H 64 --steps 4 --cfg-scale 5 -s 42 --sampler euler_a -o " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const diffuse::Image cli = diffuse::read_image(out);
  EXPECT_EQ(cli.pixels, im.pixels);
}

TEST(ServerApi, UnknownSamplerFallsBackAndInfoSaysWhichRan) {
  auto c = shared().srv.client();
  json body = txt2img_body("x", 3, 2);
  body["sampler_name"] = "No Such Sampler";
  auto r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json info = json::parse(json::parse(r->body)["info"].get<std::string>());
  EXPECT_NE(info["sampler_name"], "No Such Sampler");
  EXPECT_FALSE(info["sampler_name"].get<std::string>().empty());
  EXPECT_NE(info["warnings"].dump().find("No Such Sampler"), std::string::npos) << info["warnings"];
}

TEST(ServerApi, HiresFixDoublesTheSizeAndSaysSo) {
  auto c = shared().srv.client();
  json body = txt2img_body("a tower", 8, 2);
  body.update({{"enable_hr", true}, {"hr_scale", 2}, {"hr_upscaler", "Latent (nearest)"}, {"hr_second_pass_steps", 1},
               {"denoising_strength", 0.5}});
  auto r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  diffuse::Image im = decode_b64_png(j["images"][0].get<std::string>());
  EXPECT_EQ(im.width, 128);
  EXPECT_EQ(im.height, 128);
  json info = json::parse(j["info"].get<std::string>());
  const std::string text = info["infotexts"][0].get<std::string>();
  EXPECT_NE(text.find("Denoising strength: 0.5, Hires upscale: 2, Hires steps: 1, Hires upscaler: Latent (nearest)"),
            std::string::npos)
      << text;
}

TEST(ServerApi, VariationSeedsAndPromptEditing) {
  auto c = shared().srv.client();
  json body = txt2img_body("a [red:blue:0.5] [cube|ball]", 8, 2);
  body.update({{"subseed", 5}, {"subseed_strength", 0.3}, {"batch_size", 2}});
  auto r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json info = json::parse(json::parse(r->body)["info"].get<std::string>());
  EXPECT_EQ(info["all_subseeds"], json::array({5, 6}));
  EXPECT_EQ(info["subseed_strength"], 0.3);
  EXPECT_TRUE(info["warnings"].empty()) << info["warnings"];
  const std::string second = info["infotexts"][1].get<std::string>();
  EXPECT_NE(second.find("Seed: 9, Size: 64x64"), std::string::npos) << second;
  EXPECT_NE(second.find("Variation seed: 6, Variation seed strength: 0.3"), std::string::npos) << second;
  EXPECT_EQ(second.rfind("a [red:blue:0.5] [cube|ball]\n", 0), 0u) << second;  // the prompt as written
}

TEST(ServerApi, LoraTagsAreResolvedSkippedOrRefused) {
  auto c = shared().srv.client();
  auto r = post(c, "/sdapi/v1/txt2img", txt2img_body("a cat <lora:style:0.8>", 5, 2));
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json info = json::parse(json::parse(r->body)["info"].get<std::string>());
  EXPECT_NE(info["infotexts"][0].get<std::string>().find("Lora hashes"), std::string::npos) << info["infotexts"][0];

  r = post(c, "/sdapi/v1/txt2img", txt2img_body("a cat <lora:missing:1>", 5, 2));
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  info = json::parse(json::parse(r->body)["info"].get<std::string>());
  EXPECT_NE(info["warnings"].dump().find("missing"), std::string::npos);

  for (const char* bad : {"<lora:../loras/style:1>", "<lora:/etc/passwd:1>"}) {
    r = post(c, "/sdapi/v1/txt2img", txt2img_body(std::string("a cat ") + bad, 5, 2));
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 400) << bad << " " << r->body;
    json e = json::parse(r->body);
    EXPECT_TRUE(e.contains("error") && e.contains("detail") && e.contains("body") && e.contains("errors"));
    EXPECT_NE(e["detail"].get<std::string>().find("lora"), std::string::npos) << e;
  }
}

TEST(ServerApi, ModelSwitchByOptionsAndPerRequestOverride) {
  Shared& s = shared();
  auto c = s.srv.client();
  json models = parse(c.Get("/sdapi/v1/sd-models"));
  const std::string tiny = models[1]["title"];
  json opts = parse(c.Get("/sdapi/v1/options"));
  opts["sd_model_checkpoint"] = tiny;  // Open WebUI echoes the whole dict back
  auto r = post(c, "/sdapi/v1/options", opts);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(parse(c.Get("/sdapi/v1/options"))["sd_model_checkpoint"], tiny);
  r = post(c, "/sdapi/v1/options", {{"sd_model_checkpoint", "nope.safetensors"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 422);
  EXPECT_NE(r->body.find("nope.safetensors"), std::string::npos);
  // Per request, by model_name; the current model stays.
  json body = txt2img_body("x", 1, 2);
  body["override_settings"] = {{"sd_model_checkpoint", "sub_other"}};
  r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  EXPECT_EQ(json::parse(json::parse(r->body)["info"].get<std::string>())["sd_model_name"], "sub_other");
  EXPECT_EQ(parse(c.Get("/sdapi/v1/options"))["sd_model_checkpoint"], tiny);
  body["override_settings"] = {{"sd_model_checkpoint", "../../etc/passwd"}};
  r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400) << r->body;
}

TEST(ServerApi, Img2ImgInpaintsOnlyTheMaskedAreaAtTheInitSize) {
  auto c = shared().srv.client();
  diffuse::Image init;
  init.width = 96;
  init.height = 80;
  init.channels = 3;
  init.pixels.resize(size_t(96) * 80 * 3);
  for (size_t i = 0; i < init.pixels.size(); ++i) init.pixels[i] = uint8_t((i * 7) % 251);
  diffuse::Image mask = init;
  mask.channels = 1;
  mask.pixels.assign(size_t(96) * 80, 0);
  for (int y = 20; y < 40; ++y)
    for (int x = 30; x < 50; ++x) mask.pixels[size_t(y) * 96 + x] = 255;
  json body = txt2img_body("x", 9, 3);
  body["init_images"] = {png_b64(init)};
  body["mask"] = "data:image/png;base64," + png_b64(mask);
  body["denoising_strength"] = 0.9;
  body["mask_blur"] = 0;  // a hard edge; A1111's default 4 feathers it (below)
  auto r = post(c, "/sdapi/v1/img2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const diffuse::Image out = decode_b64_png(json::parse(r->body)["images"][0]);
  ASSERT_EQ(out.width, 96);  // inpaint_full_res (the API's default): pasted back into the init image
  ASSERT_EQ(out.height, 80);
  size_t same_outside = 0, outside = 0, changed_inside = 0;
  for (int y = 0; y < 80; ++y)
    for (int x = 0; x < 96; ++x) {
      const bool in = mask.pixels[size_t(y) * 96 + x] != 0;
      const size_t i = (size_t(y) * 96 + x) * 3;
      const bool same = out.pixels[i] == init.pixels[i] && out.pixels[i + 1] == init.pixels[i + 1];
      if (!in) outside++, same_outside += same;
      else changed_inside += !same;
    }
  EXPECT_EQ(same_outside, outside);
  EXPECT_GT(changed_inside, 300u);
  // The default mask blur (4: cv2's 21 taps) composites through the blurred mask: pixels more
  // than 10 px from the mask keep the init image, the edge is blended.
  body.erase("mask_blur");
  r = post(c, "/sdapi/v1/img2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const diffuse::Image soft = decode_b64_png(json::parse(r->body)["images"][0]);
  ASSERT_EQ(soft.width, 96);
  size_t far_changed = 0, near_changed = 0;
  for (int y = 0; y < 80; ++y)
    for (int x = 0; x < 96; ++x) {
      const bool far = x < 30 - 10 || x >= 50 + 10 || y < 20 - 10 || y >= 40 + 10;
      const bool near = !far && (x < 30 || x >= 50 || y < 20 || y >= 40);
      const size_t i = (size_t(y) * 96 + x) * 3;
      const bool same = soft.pixels[i] == init.pixels[i] && soft.pixels[i + 1] == init.pixels[i + 1];
      far_changed += far && !same;
      near_changed += near && !same;
    }
  EXPECT_EQ(far_changed, 0u);
  EXPECT_GT(near_changed, 0u);
  EXPECT_NE(json::parse(r->body)["info"].get<std::string>().find("Mask blur: 4"), std::string::npos);

  // No init image: A1111's 4xx naming the field.
  json bad = txt2img_body("x", 9, 3);
  r = post(c, "/sdapi/v1/img2img", bad);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status / 100, 4);
  EXPECT_NE(r->body.find("init_images"), std::string::npos);
}

TEST(ServerApi, ControlNetUnitsFromAlwaysonScripts) {
  Shared& s = shared();
  auto c = s.srv.client();
  json list = parse(c.Get("/controlnet/model_list"));
  ASSERT_EQ(list["model_list"].size(), 1u) << list;
  const std::string hint_path = std::string(DIFFUSE_TEST_DATA) + "/sd1-controlnet/control.png";
  const diffuse::Image hint = diffuse::read_image(hint_path);
  json body = txt2img_body("a statue", 11, 3);
  body["alwayson_scripts"] = {{"ControlNet", {{"args", {{{"enabled", true}, {"module", "none"},
                                                           {"model", list["model_list"][0]}, {"weight", 1.0},
                                                           {"image", png_b64(hint)}}}}}}};
  auto r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const diffuse::Image im = decode_b64_png(json::parse(r->body)["images"][0]);
  const std::string params = text_of(im, "parameters");
  EXPECT_NE(params.find("ControlNet 0: \"Module: none, Model: diffusers-controlnet, Weight: 1\""), std::string::npos)
      << params;
  // The CLI with the same ControlNet and hint draws the same pixels.
  const std::string out = s.dirs.root + "/cli_cn.png";
  const std::string cmd = std::string(DIFFUSE_BIN) + " generate -q -m " + s.dirs.models + "/sub/other.safetensors" +
                          " -p 'a statue' -n blurry -W 64 -H 64 --steps 3 --cfg-scale 5 -s 11 --sampler euler_a" +
                          " --control-net " + s.dirs.models + "/ControlNet/diffusers-controlnet --control-image " +
                          hint_path + " -o " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(diffuse::read_image(out).pixels, im.pixels);

  body["alwayson_scripts"]["ControlNet"]["args"][0]["model"] = "control_nope [12345678]";
  r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 422) << r->body;
  EXPECT_NE(r->body.find("control_nope"), std::string::npos);
}

TEST(ServerApi, SeveralControlNetUnitsWithGuidanceStartEnd) {
  Shared& s = shared();
  auto c = s.srv.client();
  json list = parse(c.Get("/controlnet/model_list"));
  ASSERT_EQ(list["model_list"].size(), 1u) << list;
  const std::string hint_path = std::string(DIFFUSE_TEST_DATA) + "/sd1-controlnet/control.png";
  const diffuse::Image hint = diffuse::read_image(hint_path);
  json body = txt2img_body("a statue", 11, 3);
  json unit = {{"enabled", true}, {"module", "none"}, {"model", list["model_list"][0]}, {"weight", 0.5},
               {"image", png_b64(hint)}, {"guidance_start", 0.0}, {"guidance_end", 0.6}};
  json second = unit;
  second["weight"] = 0.25;
  second["guidance_start"] = 0.3;
  second["guidance_end"] = 1.0;
  body["alwayson_scripts"] = {{"ControlNet", {{"args", {unit, {{"enabled", false}}, second}}}}};
  auto r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const diffuse::Image im = decode_b64_png(json::parse(r->body)["images"][0]);
  const std::string params = text_of(im, "parameters");
  EXPECT_NE(params.find("ControlNet 0: \"Module: none, Model: diffusers-controlnet, Weight: 0.5, Guidance Start: 0, "
                        "Guidance End: 0.6\", ControlNet 1: \"Module: none, Model: diffusers-controlnet, Weight: 0.25, "
                        "Guidance Start: 0.3, Guidance End: 1\""),
            std::string::npos)
      << params;
  // The CLI with the same two units draws the same pixels.
  const std::string net = s.dirs.models + "/ControlNet/diffusers-controlnet";
  const std::string out = s.dirs.root + "/cli_cn_units.png";
  const std::string cmd = std::string(DIFFUSE_BIN) + " generate -q -m " + s.dirs.models + "/sub/other.safetensors" +
                          " -p 'a statue' -n blurry -W 64 -H 64 --steps 3 --cfg-scale 5 -s 11 --sampler euler_a" +
                          " --control-net " + net + " --control-image " + hint_path + " --control-net " + net +
                          " --control-image " + hint_path + " --control-strength 0.5 0.25 --control-start 0 0.3" +
                          " --control-end 0.6 1 -o " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(diffuse::read_image(out).pixels, im.pixels);
  // A start after its end is refused, naming the field.
  body["alwayson_scripts"]["ControlNet"]["args"][2]["guidance_start"] = 0.9;
  body["alwayson_scripts"]["ControlNet"]["args"][2]["guidance_end"] = 0.2;
  r = post(c, "/sdapi/v1/txt2img", body);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 422) << r->body;
  EXPECT_NE(r->body.find("guidance_start"), std::string::npos) << r->body;
}

TEST(ServerApi, PngInfoReadsTheParametersBack) {
  auto c = shared().srv.client();
  auto r = post(c, "/sdapi/v1/txt2img", txt2img_body("a blue ball", 77, 2));
  ASSERT_TRUE(r && r->status == 200);
  const std::string img = json::parse(r->body)["images"][0];
  json info = parse(post(c, "/sdapi/v1/png-info", {{"image", img}}));
  EXPECT_NE(info["info"].get<std::string>().find("a blue ball"), std::string::npos);
  EXPECT_EQ(info["parameters"]["Prompt"], "a blue ball");
  EXPECT_EQ(info["parameters"]["Negative prompt"], "blurry");
  EXPECT_EQ(info["parameters"]["Seed"], "77");
  EXPECT_EQ(info["parameters"]["Size"], "64x64");
}

TEST(ServerApi, BadRequestsGetA4xxNamingTheField) {
  auto c = shared().srv.client();
  struct Case {
    std::string body;
    int status;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {"{\"prompt\": \"x\", ", 400, ""},
      {"[1, 2]", 422, ""},
      {json{{"prompt", "x"}, {"width", -64}}.dump(), 422, "width"},
      {json{{"prompt", "x"}, {"width", 10000}, {"height", 10000}}.dump(), 422, "width"},
      {json{{"prompt", "x"}, {"steps", "many"}}.dump(), 422, "steps"},
      {json{{"prompt", "x"}, {"steps", 100000}}.dump(), 422, "steps"},
      {json{{"prompt", "x"}, {"batch_size", 1000}}.dump(), 422, "batch"},
  };
  for (const Case& k : cases) {
    auto r = c.Post("/sdapi/v1/txt2img", k.body, "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, k.status) << k.body << " -> " << r->body;
    json e = json::parse(r->body, nullptr, false);
    EXPECT_TRUE(e.contains("detail")) << r->body;
    if (!k.needle.empty()) {
      EXPECT_NE(r->body.find(k.needle), std::string::npos) << r->body;
    }
  }
  json bad64 = txt2img_body("x", 1, 2);
  bad64["init_images"] = {"!!!not base64!!!"};
  auto r = post(c, "/sdapi/v1/img2img", bad64);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400) << r->body;
  EXPECT_NE(r->body.find("init_images"), std::string::npos);
  bad64["init_images"] = {diffuse::server::base64_encode(reinterpret_cast<const uint8_t*>("\x89PNG\r\n\x1a\nxx"), 10)};
  r = post(c, "/sdapi/v1/img2img", bad64);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400) << r->body;
  // Still serving.
  EXPECT_EQ(c.Get("/sdapi/v1/options")->status, 200);
}

TEST(ServerApi, OpenAiGenerationsAndEdits) {
  auto c = shared().srv.client();
  auto r = post(c, "/v1/images/generations",
                {{"model", "dall-e-3"}, {"prompt", "a house"}, {"n", 2}, {"size", "64x48"}, {"response_format", "b64_json"}, {"seed", 4}, {"steps", 2}},
                {{"Authorization", "Bearer whatever"}});
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  json j = json::parse(r->body);
  EXPECT_TRUE(j["created"].is_number());
  ASSERT_EQ(j["data"].size(), 2u);
  const diffuse::Image im = decode_b64_png(j["data"][0]["b64_json"]);
  EXPECT_EQ(im.width, 64);
  EXPECT_EQ(im.height, 48);

  r = post(c, "/v1/images/generations", {{"n", 1}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  json e = json::parse(r->body);
  EXPECT_EQ(e["error"]["param"], "prompt");
  EXPECT_TRUE(e["error"]["message"].is_string() && e["error"]["type"].is_string());

  // Edits: the transparent pixels of the mask are the area to change.
  diffuse::Image img;
  img.width = img.height = 64;
  img.channels = 3;
  img.pixels.assign(64 * 64 * 3, 90);
  diffuse::Image mask;
  mask.width = mask.height = 64;
  mask.channels = 4;
  mask.pixels.assign(64 * 64 * 4, 255);
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 64; ++x) mask.pixels[(size_t(y) * 64 + x) * 4 + 3] = 0;
  const std::vector<uint8_t> ip = diffuse::encode_png(img), mp = diffuse::encode_png(mask);
  httplib::MultipartFormDataItems items = {
      {"prompt", "a window", "", ""},
      {"image", std::string(ip.begin(), ip.end()), "image.png", "image/png"},
      {"mask", std::string(mp.begin(), mp.end()), "mask.png", "image/png"},
      {"size", "64x64", "", ""},
      {"steps", "3", "", ""},
  };
  r = c.Post("/v1/images/edits", items);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->status, 200) << r->body;
  const diffuse::Image ed = decode_b64_png(json::parse(r->body)["data"][0]["b64_json"]);
  ASSERT_EQ(ed.width, 64);
  size_t kept = 0;
  for (int y = 40; y < 64; ++y)
    for (int x = 0; x < 64; ++x) kept += ed.pixels[(size_t(y) * 64 + x) * 3] == 90;
  EXPECT_EQ(kept, size_t(24 * 64));  // the opaque (kept) half is the input's pixels
  json models = parse(c.Get("/v1/models"));
  EXPECT_EQ(models["data"].size(), 2u);
}

TEST(ServerApi, WebUiIsServed) {
  auto c = shared().srv.client();
  auto r = c.Get("/");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_NE(r->get_header_value("Content-Type").find("text/html"), std::string::npos);
  EXPECT_NE(r->body.find("<html"), std::string::npos);
  r = c.Get("/app.js");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
}

TEST(ServerAuth, BasicAuthBearerKeyAndCors) {
  Folders dirs("auth");
  ServerProcess srv({"--models-dir", dirs.models, "--api-auth", "alice:s3cret,bob:pw", "--api-key", "sk-test",
                     "--cors-allow", "http://app.example"},
                    "auth");
  ASSERT_GT(srv.port(), 0) << srv.log();
  auto c = srv.client();
  auto r = c.Get("/sdapi/v1/options");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  EXPECT_NE(r->get_header_value("WWW-Authenticate").find("Basic"), std::string::npos);
  r = c.Get("/sdapi/v1/options", {{"Authorization", "Basic " + diffuse::server::base64_encode(
                                                                     reinterpret_cast<const uint8_t*>("alice:wrong"), 11)}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  c.set_basic_auth("bob", "pw");
  r = c.Get("/sdapi/v1/options");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);

  auto o = srv.client();
  r = post(o, "/v1/images/generations", {{"prompt", "x"}, {"size", "64x64"}, {"steps", 1}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  EXPECT_EQ(json::parse(r->body)["error"]["type"], "authentication_error");
  r = post(o, "/v1/images/generations", {{"prompt", "x"}, {"size", "64x64"}, {"steps", 1}}, {{"Authorization", "Bearer sk-test"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;

  // CORS: the allowed origin is echoed, on preflight too; another origin gets no CORS headers.
  r = o.Options("/sdapi/v1/txt2img", {{"Origin", "http://app.example"}, {"Access-Control-Request-Method", "POST"}});
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 204);
  EXPECT_EQ(r->get_header_value("Access-Control-Allow-Origin"), "http://app.example");
  r = c.Get("/sdapi/v1/options", {{"Origin", "http://evil.example"}});
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->has_header("Access-Control-Allow-Origin"));
  EXPECT_EQ(srv.stop(), 0) << srv.log();
}

TEST(ServerAuth, AuthorizationHeaderIgnoredWhenAuthIsOffAndNoCorsByDefault) {
  auto c = shared().srv.client();
  for (const std::string h : {"", "Basic ", "Basic dW5kZWZpbmVk", "Bearer garbage", "\x01\x02"}) {
    auto r = c.Get("/sdapi/v1/options", {{"Authorization", h}, {"Origin", "http://app.example"}});
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 200) << h;
    EXPECT_FALSE(r->has_header("Access-Control-Allow-Origin"));
  }
}
