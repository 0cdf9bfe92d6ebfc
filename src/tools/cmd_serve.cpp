// `diffuse serve`: flags, signals and start-up lines; the server itself is src/server/.
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "server/server.h"
#include "tools/commands.h"

namespace diffuse::tools {

namespace {

struct ServeFlags {
  server::ServerOptions o;
  bool listen = false;
  std::string auth, cors, embeddings_dir;
  double max_body_mb = 64;
  std::string precision = "auto", weights = "native";
  int threads = 0;
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

int run_serve(ServeFlags& f) {
  server::ServerOptions& o = f.o;
  if (f.listen && o.host == "127.0.0.1") o.host = "0.0.0.0";
  for (const std::string& pair : split(f.auth, ',')) {
    const size_t c = pair.find(':');
    DF_CHECK(c != std::string::npos && c > 0, "--api-auth: '", pair, "' is not user:password");
    o.basic_auth.emplace_back(pair.substr(0, c), pair.substr(c + 1));
  }
  o.cors_origins = split(f.cors, ',');
  DF_CHECK(f.max_body_mb > 0 && f.max_body_mb <= 4096, "--max-body-mb ", f.max_body_mb, ": must be in (0, 4096]");
  o.limits.max_body_bytes = size_t(f.max_body_mb * 1024 * 1024);
  DF_CHECK(o.limits.max_pixels >= 64 * 64, "--max-pixels ", o.limits.max_pixels, ": at least 4096");
  DF_CHECK(o.limits.max_steps >= 1 && o.limits.max_batch >= 1, "--max-steps and --max-batch must be at least 1");
  DF_CHECK(o.workers >= 1 && o.workers <= 16, "--workers ", o.workers, ": 1 to 16");
  DF_CHECK(o.max_queue >= 1, "--max-queue must be at least 1");
  DF_CHECK(!o.models_dir.empty() || !o.model.empty(), "give --models-dir DIR (or --model FILE)");
  if (!o.taesd.empty()) {
    std::error_code ec;
    DF_CHECK(std::filesystem::exists(o.taesd, ec), "--taesd ", o.taesd, ": no such file or folder");
  }
  o.engine.threads = f.threads;
  o.engine.precision = f.precision;
  o.engine.weights = f.weights;
  o.engine.lora_dir = o.lora_dir;
  o.engine.embeddings_dir = f.embeddings_dir;

  // SIGTERM / SIGINT are taken by one thread (blocked everywhere else, before any thread starts):
  // it stops the server, which finishes or interrupts the running job first.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  server::Server srv(o);
  const int port = srv.bind();
  std::fprintf(stderr, "diffuse serve: listening on http://%s:%d (web UI at /, A1111 API at /sdapi/v1, OpenAI at /v1)%s\n",
               o.host == "0.0.0.0" ? "0.0.0.0" : o.host.c_str(), port,
               o.basic_auth.empty() && o.api_key.empty() ? "" : ", auth on");
  std::atomic<bool> ended{false};
  std::thread signals([&srv, &ended, set] {
    int sig = 0;
    sigwait(&set, &sig);
    if (ended) return;
    std::fprintf(stderr, "diffuse serve: %s: finishing the running job and stopping\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    srv.stop();
  });
  srv.run();
  srv.stop();
  ended = true;
  pthread_kill(signals.native_handle(), SIGTERM);  // wakes the waiting thread (it ignores this one)
  signals.join();
  std::fprintf(stderr, "diffuse serve: stopped\n");
  return 0;
}

}  // namespace

Run add_serve_command(CLI::App& app) {
  CLI::App* c = app.add_subcommand(
      "serve", "HTTP server: the A1111 API (/sdapi/v1), OpenAI's images API (/v1/images) and a web UI (/)");
  auto f = std::make_shared<ServeFlags>();
  server::ServerOptions& o = f->o;
  c->add_option("--models-dir,--ckpt-dir", o.models_dir, "Checkpoints offered (single files and diffusers folders, subfolders too)");
  c->add_option("--model,-m", o.model, "The checkpoint current at start (default: the first in --models-dir)");
  c->add_option("--lora-dir", o.lora_dir, "LoRA files for <lora:NAME:W> prompt tags");
  c->add_option("--embeddings-dir", f->embeddings_dir,
                "Textual-inversion embeddings used by name in prompts (default: 'embeddings' beside each model)");
  c->add_option("--controlnet-dir", o.controlnet_dir, "ControlNet models (default: MODELS_DIR/ControlNet)");
  c->add_option("--port", o.port, "Port (A1111's default 7860; 0: any free port)")->check(CLI::Range(0, 65535));
  c->add_option("--host", o.host, "Address to listen on (default 127.0.0.1: this machine only)");
  c->add_flag("--listen", f->listen, "Listen on every address (0.0.0.0), as A1111's --listen");
  c->add_option("--api-auth", f->auth, "HTTP Basic auth: user:password[,user:password...] (A1111's flag)");
  c->add_option("--api-key", o.api_key, "Bearer key the OpenAI routes require (Authorization: Bearer KEY)");
  c->add_option("--cors-allow", f->cors, "Origins allowed by CORS, comma-separated ('*': any); default: none");
  c->add_option("--max-pixels", o.limits.max_pixels, "Largest width x height a request may ask for")
      ->capture_default_str();
  c->add_option("--max-steps", o.limits.max_steps, "Most sampling steps a request may ask for")->capture_default_str();
  c->add_option("--max-batch", o.limits.max_batch, "Most images per request (batch_size x n_iter, OpenAI n)")
      ->capture_default_str();
  c->add_option("--max-body-mb", f->max_body_mb, "Largest request body, MiB")->capture_default_str();
  c->add_option("--workers", o.workers, "Jobs run at once (each has its own memory)")->capture_default_str();
  c->add_option("--max-queue", o.max_queue, "Jobs that may wait; more get 503")->capture_default_str();
  c->add_option("--preview-every", o.preview_every, "Steps between live previews (progress current_image; 0: none)")
      ->capture_default_str();
  c->add_option("--taesd", o.taesd,
                "TAESD decoder for full-size live previews: a file, or a folder with taesd_decoder.* (SD 1.x/2.x) "
                "and taesdxl_decoder.* (SDXL), loaded for a model family when a job first needs it");
  c->add_option("--precision", f->precision, "auto | fp32 | bf16")->check(CLI::IsMember({"auto", "fp32", "bf16"}));
  c->add_option("--weights", f->weights, "native | int8")->check(CLI::IsMember({"native", "int8"}));
  c->add_option("-t,--threads", f->threads, "Threads per job (0: all physical cores)");
  return [f] { return run_serve(*f); };
}

}  // namespace diffuse::tools
