// Every HTTP route of `diffuse serve`, in one place: the A1111 API (/sdapi/v1/*, plus the
// ControlNet extension's and Gradio's routes clients probe), OpenAI's images API (/v1/*) and the
// web UI (/). Handlers parse (request.h), resolve names (model_registry.h), queue a job
// (job_queue.h), wait for it while watching the client, and answer in each API's shapes.
#include "server/routes.h"

#include <chrono>
#include <ctime>
#include <fstream>

#include "api/infotext.h"
#include "core/error.h"
#include "models/embedding.h"
#include "models/lora.h"
#include "pipeline/scheduler.h"
#include "server/client_socket.h"
#include "server/web_assets.h"

namespace diffuse::server {

using json = nlohmann::json;

ServerState::ServerState(const ServerOptions& o)
    : opts(o),
      engine(o.engine),
      registry(o.models_dir, o.lora_dir, o.model, [this](const std::string& p) { return engine.model_sha256(p); },
               o.controlnet_dir),
      queue(engine, o.workers, o.max_queue, o.preview_every) {
  queue.set_taesd(o.taesd, o.engine.precision);
  options = {
      {"sd_vae", "Automatic"},
      {"CLIP_stop_at_last_layers", 1},
      {"samples_format", "png"},
      {"show_progress_every_n_steps", o.preview_every},
      {"live_previews_enable", o.preview_every > 0},
      {"sd_lora", "None"},
      {"eta_noise_seed_delta", 0},
      {"sd_checkpoint_cache", 0},
  };
}

namespace {

// ---------------------------------------------------------------------------------------------
// Answers

void send_json(httplib::Response& res, const json& j, int status = 200) {
  res.status = status;
  res.set_content(j.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

// A1111's error body: {error, detail, body, errors}.
void a1111_error(httplib::Response& res, int status, const std::string& msg, const std::string& kind = "HTTPException") {
  send_json(res, {{"error", kind}, {"detail", msg}, {"body", ""}, {"errors", msg}}, status);
}

// OpenAI's error body: {error: {message, type, param, code}}.
void openai_error(httplib::Response& res, int status, const std::string& msg, const std::string& param = "") {
  const char* type = status == 401 ? "authentication_error" : status >= 500 ? "server_error" : "invalid_request_error";
  send_json(res, {{"error", {{"message", msg}, {"type", type}, {"param", param.empty() ? json() : json(param)}, {"code", json()}}}},
            status);
}

std::string image_b64(const Image& im) {
  const std::vector<uint8_t> png = encode_png(im);
  return base64_encode(png.data(), png.size());
}

std::string schedule_label(const std::string& s) {
  return s == "karras" ? "Karras" : s == "trailing" ? "SGM Uniform" : "Automatic";
}

// A1111's `info`: a JSON document (sent as a string) describing the run.
json a1111_info(const JobSpec& s, const JobOutcome& o, const ModelInfo& m) {
  const api::Request& r = s.req;
  const size_t n = o.images.size();
  json infotexts = json::array();
  for (const auto& g : o.images) infotexts.push_back(g.parameters);
  std::string sampler;
  try {
    sampler = sampler_display_name(o.sampler);
  } catch (const Error&) {
    sampler = o.sampler;
  }
  json extra = json::object();
  if (o.schedule != "default") extra["Schedule type"] = schedule_label(o.schedule);
  std::vector<uint64_t> subseeds = o.seeds;  // A1111 repeats the seeds when there is no variation
  if (r.subseed_strength > 0 && r.subseed)
    for (size_t k = 0; k < subseeds.size(); ++k) subseeds[k] = *r.subseed + k;
  return {
      {"prompt", r.prompt},
      {"all_prompts", json(std::vector<std::string>(std::max<size_t>(n, 1), r.prompt))},
      {"negative_prompt", r.negative},
      {"all_negative_prompts", json(std::vector<std::string>(std::max<size_t>(n, 1), r.negative))},
      {"seed", o.seed},
      {"all_seeds", o.seeds},
      {"subseed", r.subseed_strength > 0 && r.subseed ? *r.subseed : o.seed},
      {"all_subseeds", subseeds},
      {"subseed_strength", r.subseed_strength},
      {"width", o.width ? o.width : r.width},
      {"height", o.height ? o.height : r.height},
      {"sampler_name", sampler},
      {"sampler_requested", s.sampler_requested.empty() ? json() : json(s.sampler_requested)},
      {"cfg_scale", r.cfg},
      {"steps", r.steps},
      {"batch_size", r.batch},
      {"n_iter", s.n_iter},
      {"restore_faces", false},
      {"face_restoration_model", json()},
      {"sd_model_name", m.model_name},
      {"sd_model_hash", m.hash.empty() ? json() : json(m.hash)},
      {"sd_vae_name", json()},
      {"sd_vae_hash", json()},
      {"seed_resize_from_w", -1},
      {"seed_resize_from_h", -1},
      {"denoising_strength", r.init.pixels.empty() ? json() : json(r.strength >= 0 ? r.strength : 0.75)},
      {"extra_generation_params", extra},
      {"index_of_first_image", 0},
      {"infotexts", infotexts},
      {"styles", json::array()},
      {"job_timestamp", o.job_timestamp},
      {"clip_skip", std::max(1, r.clip_skip)},
      {"is_using_inpainting_conditioning", false},
      {"version", "diffuse " DIFFUSE_VERSION},
      // diffuse's own: what was ignored or fell back, and how far an interrupted run got.
      {"warnings", o.warnings},
      {"interrupted", o.interrupted},
      {"steps_run", o.steps_run},
      {"steps_total", o.steps_total},
  };
}

// ---------------------------------------------------------------------------------------------
// Requests → jobs

// The request's checkpoint: its alias when known (an unknown one falls back to the current
// model, as A1111 drops it), else the current model.
ModelInfo choose_model(ServerState& st, JobSpec& s, const std::string& field) {
  if (!s.model_alias.empty()) {
    if (auto m = st.registry.find_model(s.model_alias, field)) return *m;
    s.warnings.push_back("checkpoint '" + s.model_alias + "' not found; the current model was used");
  }
  auto cur = st.queue.current_model();
  if (!cur) throw RequestError(503, "", "no checkpoint is loaded: put one in --models-dir or give --model");
  return *cur;
}

// <lora:NAME:W> tags: names that try to leave the LoRA folder are refused (400 naming the tag);
// unknown names are dropped from the prompt with a warning (A1111); known ones are rewritten to
// their path under the folder, which is where the engine looks them up.
void resolve_lora_tags(ServerState& st, JobSpec& s) {
  std::string& p = s.req.prompt;
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t b = p.find("<lora:", pos);
    if (b == std::string::npos) break;
    const size_t e = p.find('>', b);
    if (e == std::string::npos) break;
    out += p.substr(pos, b - pos);
    const std::string body = p.substr(b + 6, e - b - 6);
    const size_t colon = body.find(':');
    const std::string name = body.substr(0, colon);
    const std::string rest = colon == std::string::npos ? "" : body.substr(colon);
    std::optional<LoraInfo> l = st.registry.find_lora(name);
    if (!l) {
      s.warnings.push_back("LoRA '" + name + "' not found in --lora-dir; <lora:" + body + "> was skipped");
    } else {
      std::string rel = l->rel;
      const size_t dot = rel.rfind('.');
      if (dot != std::string::npos && rel.find('/', dot) == std::string::npos) rel.resize(dot);
      out += "<lora:" + rel + rest + ">";
    }
    pos = e + 1;
  }
  out += p.substr(pos);
  p = out;
}

std::shared_ptr<Job> prepare_generation(ServerState& st, JobSpec spec, const std::string& model_field) {
  auto job = std::make_shared<Job>();
  job->model = choose_model(st, spec, model_field);
  spec.req.model = job->model.filename;
  if (!spec.refiner_alias.empty()) {
    auto m = st.registry.find_model(spec.refiner_alias, "refiner_checkpoint");
    if (!m)
      throw RequestError(422, "refiner_checkpoint", "refiner_checkpoint: checkpoint '" + spec.refiner_alias +
                                                        "' not found (GET /sdapi/v1/sd-models lists them)");
    spec.req.refiner = m->filename;
  }
  resolve_lora_tags(st, spec);
  if (spec.req.clip_skip == 0) {
    std::lock_guard<std::mutex> lk(st.options_mu);
    const int cs = st.options.value("CLIP_stop_at_last_layers", 1);
    if (cs > 1) spec.req.clip_skip = cs;
  }
  for (size_t i = 0; i < spec.control_models.size() && i < spec.req.controls.size(); ++i) {
    const std::string& name = spec.control_models[i];
    auto c = st.registry.find_controlnet(name, "alwayson_scripts.controlnet.args.model");
    if (!c)
      throw RequestError(422, "alwayson_scripts.controlnet.args.model",
                         "alwayson_scripts.controlnet.args.model: ControlNet '" + name +
                             "' not found (GET /controlnet/model_list lists them)");
    spec.req.controls[i].net = c->filename;
    if (spec.req.controls[i].image.pixels.empty()) {
      if (spec.req.init.pixels.empty())
        throw RequestError(422, "alwayson_scripts.controlnet.args.image",
                           "alwayson_scripts.controlnet.args.image: the ControlNet unit has no image");
      spec.req.controls[i].image = spec.req.init;  // A1111's ControlNet uses the img2img input then
    }
  }
  api::Engine::ImagesGiven given;
  given.init = !spec.req.init.pixels.empty();
  given.mask = !spec.req.mask.pixels.empty();
  given.control_image = !spec.req.control_image.pixels.empty();
  api::Request check = spec.req;
  if (given.init && check.width == 0) check.width = check.init.width, check.height = check.init.height;
  try {
    api::Engine::validate_settings(check, given);
  } catch (const FileError& e) {
    throw RequestError(500, "", e.what());
  } catch (const Error& e) {
    throw RequestError(422, "", e.what());
  }
  job->spec = std::move(spec);
  return job;
}

std::function<bool()> client_watch(const httplib::Request& req) {
  const int fd = find_client_socket(req.local_addr, req.local_port, req.remote_addr, req.remote_port);
  return [fd] { return client_connected(fd); };
}

JobOutcome run_job(ServerState& st, const std::shared_ptr<Job>& job, const httplib::Request& req) {
  st.queue.submit(job);
  return st.queue.wait(job, client_watch(req));
}

// ---------------------------------------------------------------------------------------------
// A1111 handlers

void a1111_generate(ServerState& st, const httplib::Request& req, httplib::Response& res, bool img2img) {
  try {
    const json body = parse_json_body(req.body);
    JobSpec spec = img2img ? parse_a1111_img2img(body, st.opts.limits) : parse_a1111_txt2img(body, st.opts.limits);
    std::shared_ptr<Job> job = prepare_generation(st, std::move(spec), "override_settings.sd_model_checkpoint");
    const JobOutcome o = run_job(st, job, req);
    if (o.error_status) return a1111_error(res, o.error_status == 499 ? 503 : o.error_status, o.error);
    json images = json::array();
    if (job->spec.send_images)
      for (const auto& g : o.images) images.push_back(image_b64(g.image));
    send_json(res, {{"images", images}, {"parameters", job->spec.echo}, {"info", a1111_info(job->spec, o, job->model).dump()}});
  } catch (const RequestError& e) {
    a1111_error(res, e.status, e.what());
  }
}

json sd_model_item(const ModelInfo& m) {
  return {{"title", m.title},
          {"model_name", m.model_name},
          {"hash", m.hash.empty() ? json() : json(m.hash)},
          {"sha256", m.sha256.empty() ? json() : json(m.sha256)},
          {"filename", m.filename},
          {"config", json()}};
}

json options_json(ServerState& st) {
  json o;
  {
    std::lock_guard<std::mutex> lk(st.options_mu);
    o = st.options;
  }
  auto cur = st.queue.current_model();
  o["sd_model_checkpoint"] = cur ? cur->title : "";
  o["sd_checkpoint_hash"] = cur && !cur->sha256.empty() ? json(cur->sha256) : json();
  return o;
}

// GET /sdapi/v1/embeddings: the current model's textual inversions, "loaded" when they fit its
// text encoder(s), else "skipped" (A1111's shape: name -> {step, sd_checkpoint, sd_checkpoint_name,
// shape, vectors}); files that are not embeddings are left out.
json embeddings_json(ServerState& st) {
  json loaded = json::object(), skipped = json::object();
  auto cur = st.queue.current_model();
  if (!cur) return json{{"loaded", loaded}, {"skipped", skipped}};
  const Family fam = st.engine.family_of(cur->filename);
  const int64_t width = fam == Family::SD2 ? 1024 : 768;
  std::shared_ptr<EmbeddingSet> set = EmbeddingSet::from_dir(st.engine.embeddings_dir(cur->filename));
  for (const std::string& name : set->names()) {
    const Embedding* e = set->find(name);
    if (!e) continue;
    const bool fits = fam == Family::SDXL ? e->sdxl() && e->vec[0].dim(1) == 768 && e->vec[1].dim(1) == 1280
                                          : !e->sdxl() && e->vec[0].dim(1) == width;
    const int64_t shape = e->vec[0].dim(1) + (e->sdxl() ? e->vec[1].dim(1) : 0);
    (fits ? loaded : skipped)[name] = {{"step", json()}, {"sd_checkpoint", json()}, {"sd_checkpoint_name", json()},
                                       {"shape", shape}, {"vectors", e->vectors()}};
  }
  return json{{"loaded", loaded}, {"skipped", skipped}};
}

// POST /sdapi/v1/options: the settings diffuse keeps are stored; a new sd_model_checkpoint is
// loaded in queue order and the request returns once it is current (A1111 blocks the same way).
void post_options(ServerState& st, const httplib::Request& req, httplib::Response& res) {
  try {
    const json body = parse_json_body(req.body);
    {
      std::lock_guard<std::mutex> lk(st.options_mu);
      for (auto it = body.begin(); it != body.end(); ++it) {
        auto known = st.options.find(it.key());
        if (known == st.options.end()) continue;  // unknown settings (Open WebUI echoes them all) are ignored
        if (known->type() == it->type() || (known->is_number() && it->is_number())) *known = *it;
      }
    }
    auto ck = body.find("sd_model_checkpoint");
    if (ck != body.end() && ck->is_string() && !ck->get<std::string>().empty()) {
      auto m = st.registry.find_model(ck->get<std::string>(), "sd_model_checkpoint");
      if (!m) throw RequestError(422, "sd_model_checkpoint", "sd_model_checkpoint: model '" + ck->get<std::string>() +
                                                                "' not found (GET /sdapi/v1/sd-models lists them)");
      // Queued even when it is the current model already: the answer then still comes once that
      // model is loaded (the start-up load may be running), as SillyTavern's set-model expects.
      auto job = std::make_shared<Job>();
      job->kind = Job::Kind::LoadModel;
      job->model = *m;
      const JobOutcome o = run_job(st, job, req);
      if (o.error_status) return a1111_error(res, o.error_status == 499 ? 503 : o.error_status, o.error);
    }
    send_json(res, json());
  } catch (const RequestError& e) {
    a1111_error(res, e.status, e.what());
  }
}

json progress_json(ServerState& st, bool skip_image) {
  const ProgressView v = st.queue.progress();
  json state = {{"skipped", v.skipped},
                {"interrupted", v.interrupted},
                {"stopping_generation", false},
                {"job", v.job},
                {"job_count", v.busy ? v.job_count : 0},
                {"job_timestamp", v.job_timestamp.empty() ? "0" : v.job_timestamp},
                {"job_no", v.job_no},
                {"sampling_step", v.sampling_step},
                {"sampling_steps", v.sampling_steps},
                {"queued", v.queued}};
  return {{"progress", v.busy ? v.progress : 0.0},
          {"eta_relative", v.busy ? v.eta_relative : 0.0},
          {"state", state},
          {"current_image", skip_image || v.current_image.empty() ? json() : json(v.current_image)},
          {"textinfo", v.busy ? json(v.textinfo) : json()}};
}

// PNG text → A1111's png-info answer: the infotext, the other chunks, and the infotext parsed
// into its fields ("Prompt", "Negative prompt", "Steps", ...).
void png_info(const httplib::Request& req, httplib::Response& res, const Limits& lim) {
  try {
    const json body = parse_json_body(req.body);
    auto im = body.find("image");
    if (im == body.end() || !im->is_string()) throw RequestError(422, "image", "image: a base64 image is required");
    const Image img = decode_request_image(im->get<std::string>(), "image", lim);
    std::string info;
    json items = json::object();
    for (const auto& [k, v] : img.text) {
      if (k == "parameters") info = v;
      else items[k] = v;
    }
    json params = json::object();
    for (const auto& [k, v] : api::parse_infotext(info)) params[k] = v;
    send_json(res, {{"info", info}, {"items", items}, {"parameters", params}});
  } catch (const RequestError& e) {
    a1111_error(res, e.status, e.what());
  }
}

json memory_json() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  long long kb = 0, total = 0, avail = 0;
  std::string unit;
  while (f >> key >> kb) {
    std::getline(f, unit);
    if (key == "MemTotal:") total = kb * 1024;
    if (key == "MemAvailable:") avail = kb * 1024;
  }
  return {{"ram", {{"free", avail}, {"used", total - avail}, {"total", total}}}, {"cuda", {{"error", "no CUDA device"}}}};
}

// ---------------------------------------------------------------------------------------------
// OpenAI handlers

void openai_answer(ServerState& st, const httplib::Request& req, httplib::Response& res, JobSpec spec) {
  std::shared_ptr<Job> job = prepare_generation(st, std::move(spec), "model");
  const JobOutcome o = run_job(st, job, req);
  if (o.error_status) return openai_error(res, o.error_status == 499 ? 503 : o.error_status, o.error);
  json data = json::array();
  for (const auto& g : o.images) data.push_back({{"b64_json", image_b64(g.image)}, {"revised_prompt", job->spec.req.prompt}});
  send_json(res, {{"created", (long long)std::time(nullptr)},
                  {"data", data},
                  {"output_format", "png"},
                  {"size", std::to_string(o.width) + "x" + std::to_string(o.height)}});
}

}  // namespace

void register_routes(httplib::Server& svr, ServerState& st) {
  const Limits& lim = st.opts.limits;
  auto get_json = [&svr](const std::string& path, std::function<json()> f) {
    svr.Get(path, [f](const httplib::Request&, httplib::Response& res) { send_json(res, f()); });
  };

  // --- A1111: generation
  svr.Post("/sdapi/v1/txt2img", [&st](const httplib::Request& q, httplib::Response& r) { a1111_generate(st, q, r, false); });
  svr.Post("/sdapi/v1/img2img", [&st](const httplib::Request& q, httplib::Response& r) { a1111_generate(st, q, r, true); });

  // --- A1111: the running job
  svr.Get("/sdapi/v1/progress", [&st](const httplib::Request& q, httplib::Response& r) {
    const std::string skip = q.get_param_value("skip_current_image");
    send_json(r, progress_json(st, skip == "true" || skip == "True" || skip == "1"));
  });
  svr.Post("/sdapi/v1/interrupt", [&st](const httplib::Request&, httplib::Response& r) {
    st.queue.interrupt();
    send_json(r, json::object());
  });
  svr.Post("/sdapi/v1/skip", [&st](const httplib::Request&, httplib::Response& r) {
    st.queue.skip();
    send_json(r, json());
  });

  // --- A1111: settings and models
  get_json("/sdapi/v1/options", [&st] { return options_json(st); });
  svr.Post("/sdapi/v1/options", [&st](const httplib::Request& q, httplib::Response& r) { post_options(st, q, r); });
  get_json("/sdapi/v1/sd-models", [&st] {
    json a = json::array();
    for (const ModelInfo& m : st.registry.models()) a.push_back(sd_model_item(m));
    return a;
  });
  svr.Post("/sdapi/v1/refresh-checkpoints", [&st](const httplib::Request&, httplib::Response& r) {
    st.registry.refresh_models();
    send_json(r, json());
  });
  get_json("/sdapi/v1/loras", [&st] {
    json a = json::array();
    for (const LoraInfo& l : st.registry.loras())
      a.push_back({{"name", l.name}, {"alias", l.alias}, {"path", l.path}, {"metadata", l.metadata}});
    return a;
  });
  svr.Post("/sdapi/v1/refresh-loras", [&st](const httplib::Request&, httplib::Response& r) {
    st.registry.refresh_loras();
    send_json(r, json());
  });
  for (const char* p : {"/sdapi/v1/refresh-vae", "/sdapi/v1/refresh-embeddings"})
    svr.Post(p, [](const httplib::Request&, httplib::Response& r) { send_json(r, json()); });
  get_json("/sdapi/v1/samplers", [] { return a1111_sampler_list(); });
  get_json("/sdapi/v1/schedulers", [] { return a1111_scheduler_list(); });
  get_json("/sdapi/v1/upscalers", [] {
    json a = json::array();
    for (const char* n : {"None", "Lanczos", "Nearest"})
      a.push_back({{"name", n}, {"model_name", json()}, {"model_path", json()}, {"model_url", json()}, {"scale", 4}});
    return a;
  });
  get_json("/sdapi/v1/latent-upscale-modes", [] {
    json a = json::array();
    for (const char* n : {"Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (nearest)", "Latent (nearest-exact)"})
      a.push_back({{"name", n}});
    return a;
  });
  get_json("/sdapi/v1/sd-vae", [] { return json::array(); });
  get_json("/sdapi/v1/embeddings", [&st] { return embeddings_json(st); });
  for (const char* p : {"/sdapi/v1/prompt-styles", "/sdapi/v1/face-restorers", "/sdapi/v1/hypernetworks",
                        "/sdapi/v1/realesrgan-models", "/sdapi/v1/extensions"})
    get_json(p, [] { return json::array(); });
  get_json("/sdapi/v1/scripts", [] { return json{{"txt2img", json::array()}, {"img2img", json::array()}}; });
  get_json("/sdapi/v1/cmd-flags", [&st] {
    const ServerOptions& o = st.opts;
    return json{{"api", true},        {"listen", o.host != "127.0.0.1"}, {"port", o.port},
                {"ckpt_dir", o.models_dir}, {"lora_dir", o.lora_dir},   {"api_auth", json()},
                {"nowebui", false}};
  });
  get_json("/sdapi/v1/memory", [] { return memory_json(); });
  svr.Post("/sdapi/v1/png-info", [&lim](const httplib::Request& q, httplib::Response& r) { png_info(q, r, lim); });

  // --- The ControlNet extension's discovery routes and Gradio's queue probe (Krita plugins).
  get_json("/controlnet/version", [] { return json{{"version", 2}}; });
  get_json("/controlnet/model_list", [&st] {
    json a = json::array();
    for (const ModelInfo& m : st.registry.controlnets()) a.push_back(m.title);
    return json{{"model_list", a}};
  });
  get_json("/controlnet/module_list", [] { return json{{"module_list", {"none", "canny"}}}; });
  get_json("/queue/status", [&st] {
    const ProgressView v = st.queue.progress();
    return json{{"msg", "estimation"}, {"queue_size", v.queued + (v.busy ? 1 : 0)}};
  });

  // --- OpenAI images API
  svr.Post("/v1/images/generations", [&st](const httplib::Request& q, httplib::Response& r) {
    try {
      openai_answer(st, q, r, parse_openai_generation(parse_json_body(q.body), st.opts.limits));
    } catch (const RequestError& e) {
      openai_error(r, e.status, e.what(), e.field);
    }
  });
  svr.Post("/v1/images/edits", [&st](const httplib::Request& q, httplib::Response& r) {
    try {
      if (!q.is_multipart_form_data()) throw RequestError(400, "", "send multipart/form-data (image, mask, prompt, ...)");
      Form form;
      for (const auto& [k, f] : q.files) form.emplace(k, FormField{f.content, f.filename, f.content_type});
      openai_answer(st, q, r, parse_openai_edit(form, st.opts.limits));
    } catch (const RequestError& e) {
      openai_error(r, e.status, e.what(), e.field);
    }
  });
  get_json("/v1/models", [&st] {
    json a = json::array();
    for (const ModelInfo& m : st.registry.models())
      a.push_back({{"id", m.title}, {"object", "model"}, {"created", 0}, {"owned_by", "diffuse"}});
    return json{{"object", "list"}, {"data", a}};
  });

  // --- The web UI (files compiled in).
  svr.Get(R"(/|/[A-Za-z0-9_\-]+\.(html|js|css|svg|png|ico))", [](const httplib::Request& q, httplib::Response& r) {
    const WebAsset* a = find_web_asset(q.path);
    if (!a) {
      r.status = 404;
      return;
    }
    r.set_content(reinterpret_cast<const char*>(a->data), a->size, a->content_type);
  });
}

}  // namespace diffuse::server
