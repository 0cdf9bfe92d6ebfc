// `diffuse serve`: the A1111 `/sdapi/v1` API, OpenAI's images API and the web UI over HTTP
// (cpp-httplib), on a job queue (job_queue.h) in front of one engine. The routes are all in
// routes.cpp; this file holds what wraps them: listening, auth, CORS, limits, shutdown.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "api/engine.h"
#include "server/request.h"

namespace diffuse::server {

struct ServerOptions {
  std::string host = "127.0.0.1";  // --listen: 0.0.0.0
  int port = 7860;                 // 0: any free port (tests)
  std::string models_dir, lora_dir, controlnet_dir;
  std::string model;               // --model: the checkpoint current at start (else the first found)
  std::vector<std::pair<std::string, std::string>> basic_auth;  // --api-auth user:pass[,user:pass]
  std::string api_key;             // --api-key: Bearer key for the OpenAI routes
  std::vector<std::string> cors_origins;  // --cors-allow (comma list; "*" any origin)
  Limits limits;
  int workers = 1;
  size_t max_queue = 64;
  int preview_every = 3;           // steps between live previews unless a request says
  std::string taesd;               // --taesd DIR|FILE: previews decoded by TAESD (per family, on first use)
  api::EngineOptions engine;
  bool log_requests = true;        // one line per request on stderr
};

class Server {
 public:
  explicit Server(ServerOptions o);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds the listening socket; returns the port (the chosen one when options.port is 0).
  // Throws diffuse::Error when the address cannot be bound.
  int bind();
  // Serves until stop(); call after bind().
  void run();
  // From any thread: queued jobs are refused, running jobs stop at their next step and answer
  // with what they have, then the listener closes and run() returns.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace diffuse::server
