// What the routes share, and the one function that registers every HTTP route (routes.cpp).
#pragma once
#include <mutex>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "api/engine.h"
#include "server/job_queue.h"
#include "server/model_registry.h"
#include "server/server.h"

namespace diffuse::server {

struct ServerState {
  explicit ServerState(const ServerOptions& o);
  ServerOptions opts;
  api::Engine engine;
  ModelRegistry registry;
  JobQueue queue;
  std::mutex options_mu;
  nlohmann::json options;  // what GET /sdapi/v1/options answers besides the model keys
};

void register_routes(httplib::Server& svr, ServerState& st);

}  // namespace diffuse::server
